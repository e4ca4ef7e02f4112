"""Local jobs running as the daemon's own user (`local.run_as = "daemon"`, the default) cannot
forge another job's outcome nor read the daemon's state: the keeper learns each exit status by
reaping the job, and the store's and work directory are empty in the job's mount namespace. The
attacker is a real job of the same uid that tries what the outside test did — write the victim's
`exit` file, read the store, talk to the keeper, read the daemon's and the keeper's environment
— while the victim runs. Both a root daemon and a service user's (ordinary uid, where hiding
takes a user namespace)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, settings_env
from tests.support.keeper import keeper_pids
from tests.support.peers import PeerClient, open_to_others
from tests.support.probes import output, probes, refused, submit
from tests.support.service import SERVICE, as_service, service_daemon, service_root

pytestmark = pytest.mark.timeout(90)

# The victim sleeps, then fails with 7; an attacker that could forge its record would make it
# SUCCEEDED with 0 (the old runner read its outcome back from a file in the attempt directory).
VICTIM = "sleep 3; exit 7"
FORGED = '{"exit_code": 0, "signal": null, "error": null, "started_at": 1, "finished_at": 2}'


def attack(daemon: DaemonProcess, victim_id: str, daemon_pid: int, keeper_pid: int) -> str:
    attempt = daemon.store_path.parent / "jobs" / victim_id / "1"
    sock = daemon.store_path.parent / "jobs" / "keeper.sock"
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect({str(sock)!r})"
    return probes(
        {
            "store": f"head -c 16 {daemon.store_path}",
            "forge": f"printf '%s' '{FORGED}' > {attempt}/exit",
            "victim_log": f"cat {attempt}/stdout",
            "keeper_socket": f"python3 -c {connect!r}",
            "daemon_environ": f"cat /proc/{daemon_pid}/environ",
            "keeper_environ": f"cat /proc/{keeper_pid}/environ",
        }
    )


async def run_attack(daemon: DaemonProcess, uid: int) -> tuple[dict[str, Any], str, str]:
    assert daemon.proc is not None
    async with PeerClient(uid, daemon.socket_path) as peer:
        victim = await submit(peer, {"command": ["sh", "-c", VICTIM]})
        (keeper,) = keeper_pids(daemon.store_path.parent / "jobs")
        script = attack(daemon, victim["id"], daemon.proc.pid, keeper)
        attacker = await submit(peer, {"command": ["bash", "-c", script]})
        attacked = (await peer.request("wait", job_id=attacker["id"]))[-1]["job"]
        out, err = await output(peer, attacker["id"])
        assert attacked["state"] == "SUCCEEDED", (attacked, out, err)
        final: dict[str, Any] = (await peer.request("wait", job_id=victim["id"]))[-1]["job"]
    return final, out, err


def assert_held(final: dict[str, Any], out: str, err: str, *, root: bool) -> None:
    # The victim's outcome is the kernel's, whatever the attacker wrote.
    assert (final["state"], final["exit_code"]) == ("FAILED", 7), (final, out, err)
    for name in ("store", "victim_log", "keeper_socket"):
        assert refused(out, err, name, "No such file or directory"), (name, out, err)
    assert refused(out, err, "forge", "No such file or directory") or refused(
        out, err, "forge", "Read-only file system"
    ), (out, err)
    if root:
        return  # root's jobs are root: CAP_SYS_PTRACE reads any process's environment
    for name in ("daemon_environ", "keeper_environ"):  # neither is dumpable
        assert refused(out, err, name, "Permission denied"), (name, out, err)


@pytest.mark.skipif(os.getuid() != 0, reason="the root daemon of this test is root's")
async def test_a_root_daemons_job_cannot_forge_another_jobs_outcome_nor_read_the_store(
    short_tmp: Path,
) -> None:
    # Without a cgroup the old daemon believed the exit file as soon as it appeared.
    env = settings_env({"local": {"kill_grace_s": 1.0, "cgroup": "off"}})
    daemon = DaemonProcess(short_tmp, env)
    daemon.start()
    try:
        final, out, err = await run_attack(daemon, 0)
    finally:
        daemon.close()
    assert_held(final, out, err, root=True)


async def test_a_service_users_job_cannot_forge_another_jobs_outcome_nor_read_the_store(
    short_tmp: Path, service_daemons: list[DaemonProcess]
) -> None:
    daemon = service_daemon(service_root(short_tmp), as_service(), run_as="daemon", cgroup="off")
    service_daemons.append(daemon)
    daemon.start()
    events = daemon.log_events()
    assert [e for e in events if e.get("event") == "local.state_hidden"], events
    open_to_others(daemon.socket_path)
    final, out, err = await run_attack(daemon, SERVICE)
    assert_held(final, out, err, root=False)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()


async def test_with_hiding_off_the_daemon_says_nothing_is_hidden_and_jobs_see_the_store(
    short_tmp: Path,
) -> None:
    """The control: with `hide_state = "off"` the same probe reads the store, so the test
    above would see it if hiding did not hold."""
    env = settings_env({"local": {"hide_state": "off"}})
    daemon = DaemonProcess(short_tmp, env)
    daemon.start()
    try:
        assert not [e for e in daemon.log_events() if e.get("event") == "local.state_hidden"]
        async with PeerClient(os.getuid(), daemon.socket_path) as peer:
            script = probes({"store": f"head -c 15 {daemon.store_path}"})
            job = await submit(peer, {"command": ["bash", "-c", script]})
            await peer.request("wait", job_id=job["id"])
            out, err = await output(peer, job["id"])
    finally:
        daemon.close()
    assert "store 0" in out, (out, err)
