"""Local jobs run as their submitter (`local.run_as = "submitter"`): real peers of another uid
(`setpriv`) submit to a real daemon whose jobs then run as that uid, its gid and groups, with
no capabilities, and cannot reach the store, other jobs' files and processes, the daemon or
their cgroup's files; cancel still stops them. The daemon as root (in this process), and as a
service user holding ambient capabilities (`orchestrator serve` under `setpriv`, as the shipped
systemd drop-in runs it), with cgroups and without; and one that cannot switch users refuses to
start."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator import models
from orchestrator.client import Client
from orchestrator.daemon import Daemon
from orchestrator.settings import Settings
from orchestrator.testing import make_settings
from tests.support.cgroup import FOUND, scratch
from tests.support.daemon import DaemonProcess, running
from tests.support.peers import PeerClient, open_to_others
from tests.support.probes import (
    SLEEPER,
    printed_pid,
    probes,
    refused,
    run,
    running_pid,
    submit,
)
from tests.support.service import (
    SERVICE,
    as_service,
    service_daemon,
    service_python,
    service_root,
)
from tests.support.waits import wait_for

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.getuid() != 0, reason="needs root to run peers and daemons as others"),
]

PEER = 4242  # a made-up uid: no passwd entry
needs_cgroups = pytest.mark.skipif(
    not FOUND.enabled, reason=f"no cgroup v2 this process may make cgroups in: {FOUND.detail}"
)
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")
NO_CAPABILITIES = dict.fromkeys(CAPABILITY_SETS, "0000000000000000")


def submitter_settings(root: Path, **local: Any) -> Settings:
    return make_settings(
        root,
        server={"allowed_uids": [0, PEER]},
        local={"run_as": "submitter", "kill_grace_s": 1.0, **local},
    )


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    """An in-process daemon (root) running local jobs as their submitters, its socket open to
    other uids."""
    settings = submitter_settings(short_tmp)
    async with running(settings) as started:
        open_to_others(settings.server.socket_path)
        yield started


@pytest.fixture
def peer_dir(short_tmp: Path) -> Path:
    """A working directory of the peer's own (0700), reachable through `short_tmp`."""
    os.chmod(short_tmp, 0o711)
    path = short_tmp / "peer"
    path.mkdir(mode=0o700)
    os.chown(path, PEER, PEER)
    return path


def capabilities(text: str) -> dict[str, str]:
    """The capability lines of a /proc/PID/status printed in `text`, but the bounding set."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in CAPABILITY_SETS:
            found[name] = value.strip()
    return found


# -- who the job is ----------------------------------------------------------------------------

WHO = "id -u; id -g; id -G; grep ^Cap /proc/self/status; env\n"


async def test_a_job_runs_as_its_submitters_uid_gid_and_groups_with_no_capabilities(
    daemon: Daemon, peer_dir: Path
) -> None:
    async with PeerClient(PEER, daemon.settings.server.socket_path) as peer:
        job, out, err = await run(
            peer, {"command": ["sh", "-c", WHO + "exit 7"], "cwd": str(peer_dir)}
        )
    lines = out.splitlines()
    assert lines[:3] == [str(PEER), str(PEER), str(PEER)], out + err
    assert capabilities(out) == NO_CAPABILITIES
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    # No passwd entry for the uid: none of the daemon's (root's) HOME, USER, LOGNAME either.
    assert {name: env.get(name) for name in ("HOME", "USER", "LOGNAME", "SHELL")} == dict.fromkeys(
        ("HOME", "USER", "LOGNAME", "SHELL")
    )
    assert env["ORCHESTRATOR_JOB_ID"] == job["id"]
    # Its own exit status is what is recorded.
    assert (job["state"], job["exit_code"], job["reason"]) == ("FAILED", 7, "exit code 7")
    assert (job["info"]["uid"], job["info"]["gid"]) == (PEER, PEER)


async def test_groups_home_and_name_come_from_the_user_database(
    short_tmp: Path, peer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The peer's uid gets a passwd entry and two more groups, for this daemon (in this process).
    real_getpwuid, real_getgrouplist = pwd.getpwuid, os.getgrouplist
    entry = pwd.struct_passwd(("alice", "x", PEER, PEER, "", str(peer_dir), "/bin/sh"))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: entry if uid == PEER else real_getpwuid(uid))
    monkeypatch.setattr(
        os,
        "getgrouplist",
        lambda name, gid: [5556, gid, 5555] if name == "alice" else real_getgrouplist(name, gid),
    )
    settings = submitter_settings(short_tmp)
    async with running(settings):
        open_to_others(settings.server.socket_path)
        async with PeerClient(PEER, settings.server.socket_path) as peer:
            # No cwd: the job starts in its user's home.
            job, out, err = await run(peer, {"command": ["sh", "-c", WHO + "echo PWD=$(pwd)"]})
            own_home, home_out, _ = await run(
                peer, {"command": ["sh", "-c", "echo $HOME"], "env": {"HOME": "/elsewhere"}}
            )
    lines = out.splitlines()
    assert lines[:3] == [str(PEER), str(PEER), f"{PEER} 5555 5556"], out + err
    assert capabilities(out) == NO_CAPABILITIES
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert {name: env.get(name) for name in ("HOME", "USER", "LOGNAME", "SHELL")} == {
        "HOME": str(peer_dir),
        "USER": "alice",
        "LOGNAME": "alice",
        "SHELL": "/bin/sh",
    }
    assert env["PWD"] == str(peer_dir)
    assert job["state"] == "SUCCEEDED"
    # The job's own env wins over the passwd entry.
    assert (own_home["state"], home_out) == ("SUCCEEDED", "/elsewhere\n")


# -- what it cannot reach -----------------------------------------------------------------------


async def test_a_job_cannot_reach_the_store_other_jobs_or_the_daemon(
    daemon: Daemon, peer_dir: Path, short_tmp: Path
) -> None:
    path = daemon.settings.server.socket_path
    store = daemon.settings.store.path
    async with Client(path) as admin, PeerClient(PEER, path) as peer:
        # Another user's job (root's, here), running, with a secret in its environment.
        other = await admin.submit({"command": ["sh", "-c", SLEEPER], "env": {"SECRET": "s3"}})
        deadline = time.monotonic() + 20
        while not (printed := "".join([r.get("data", "") async for r in admin.logs(other["id"])])):
            assert time.monotonic() < deadline, "the other job did not start"
            await asyncio.sleep(0.05)
        pid = int(printed.split()[1])  # "pid N"
        other_dir = Path((await admin.get(other["id"]))["info"]["dir"])
        # Only the files' own modes stand in the way: every directory above them is opened
        # to others for the test (the daemon makes the store's and the jobs' 0700 too).
        for directory in (store.parent, other_dir.parent.parent, other_dir.parent):
            os.chmod(directory, 0o711)
        checks = {
            "store": f"cat {store}",
            "wal": f"cat {store}-wal",
            "lock": f"cat {store}.lock",
            "other_dir": f"ls {other_dir}",
            "other_out": f"cat {other_dir}/stdout",
            "other_exit": f"echo '{{\"exit_code\": 0}}' > {other_dir}/exit",
            "other_env": f"cat /proc/{pid}/environ",
            "other_kill": f"kill -0 {pid}",
            "daemon_kill": f"kill -0 {os.getpid()}",
            "daemon_env": f"cat /proc/{os.getpid()}/environ",
            "runner_kill": "kill -0 $PPID",
            "own_exit": 'echo x > "$OWN/$ORCHESTRATOR_JOB_ID/$ORCHESTRATOR_ATTEMPT/exit"',
        }
        job, out, err = await run(
            peer,
            {
                "command": ["bash", "-c", probes(checks) + "\nexit 3"],
                "cwd": str(peer_dir),
                "env": {"OWN": str(daemon.settings.local_work_dir())},
            },
        )
        await admin.cancel(other["id"])
        other_final = await admin.wait(other["id"])
    signals = ("other_kill", "daemon_kill", "runner_kill")
    for name in checks:
        why = "Operation not permitted" if name in signals else "Permission denied"
        assert refused(out, err, name, why), (name, out, err)
    # The job's own exit status is what is recorded, and the other job ran on until cancelled.
    assert (job["state"], job["exit_code"]) == ("FAILED", 3), (job, out, err)
    assert (other_final["state"], other_final["stop_reason"]) == ("CANCELLED", "cancel")


def cgroup2_mount() -> str:
    with open("/proc/self/mountinfo") as fh:
        return next(line.split()[4] for line in fh if " - cgroup2 " in line)


@needs_cgroups
async def test_a_job_cannot_write_its_cgroups_files_nor_leave_it(
    daemon: Daemon, peer_dir: Path
) -> None:
    cgroup2 = cgroup2_mount()
    checks = {
        "procs": 'echo $$ > "$CG/cgroup.procs"',
        "kill": 'echo 1 > "$CG/cgroup.kill"',
        "freeze": 'echo 1 > "$CG/cgroup.freeze"',
        "leave": 'echo $$ > "$CG/../cgroup.procs"',
        "subtree": 'mkdir "$CG/mine"',
    }
    script = f'CG="{cgroup2}$(sed -n "s/^0:://p" /proc/self/cgroup)"; echo "cgroup $CG"\n'
    async with PeerClient(PEER, daemon.settings.server.socket_path) as peer:
        job, out, err = await run(
            peer, {"command": ["bash", "-c", script + probes(checks)], "cwd": str(peer_dir)}
        )
    assert f"cgroup {job['info']['cgroup']}" in out.splitlines(), out
    for name in checks:
        assert refused(out, err, name, "Permission denied"), (name, out, err)
    assert job["state"] == "SUCCEEDED"


# -- the job's life -----------------------------------------------------------------------------


@pytest.mark.parametrize("cgroup", ["auto", "off"])
async def test_cancel_stops_a_job_of_another_uid(
    short_tmp: Path, peer_dir: Path, cgroup: str
) -> None:
    settings = submitter_settings(short_tmp, cgroup=cgroup)
    async with running(settings):
        open_to_others(settings.server.socket_path)
        async with PeerClient(PEER, settings.server.socket_path) as peer:
            job = await submit(peer, {"command": ["sh", "-c", SLEEPER], "cwd": str(peer_dir)})
            pid, _, _ = await printed_pid(peer, job["id"])
            assert os.stat(f"/proc/{pid}").st_uid == PEER
            assert (await peer.call("cancel", job_id=job["id"]))["ok"]
            final = (await peer.request("wait", job_id=job["id"]))[-1]["job"]
    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel")
    wait_for(lambda: not running_pid(pid), f"the job's process {pid} to end", timeout_s=10)


async def test_a_working_directory_the_submitter_cannot_enter_fails_the_job(
    daemon: Daemon, short_tmp: Path, peer_dir: Path
) -> None:
    private = short_tmp / "roots-only"
    private.mkdir(mode=0o700)
    async with PeerClient(PEER, daemon.settings.server.socket_path) as peer:
        job, _, err = await run(peer, {"command": ["true"], "cwd": str(private)})
    why = f"cannot enter working directory {str(private)!r}: Permission denied"
    assert (job["state"], job["exit_code"], job["reason"]) == ("FAILED", 126, why)
    assert err == f"orchestrator: {why}\n"


async def test_a_job_with_no_recorded_submitter_is_not_run(daemon: Daemon, short_tmp: Path) -> None:
    marker = short_tmp / "ran"
    spec = models.JobSpec(command=["touch", str(marker)], name="from-an-older-store")
    (outcome,) = await daemon.store.accept_many([(spec, "local")], None)
    assert isinstance(outcome, tuple), outcome
    job = outcome[0]
    daemon.router.enqueue(job)
    async with Client(daemon.settings.server.socket_path) as admin:
        final = await admin.wait(job.id)
        attempts = (await admin.get(job.id, history=True))["attempts"]
    assert final["state"] == "FAILED"
    assert final["reason"] is not None
    assert "no recorded submitter" in final["reason"], final["reason"]
    assert len(attempts) == 1  # not retried
    assert not marker.exists()


# -- the daemon as a service user: ambient capabilities, or none ---------------------------------


def test_a_daemon_that_cannot_switch_users_refuses_to_start(
    short_tmp: Path, service_daemons: list[DaemonProcess]
) -> None:
    root = service_root(short_tmp)
    # As the service user with no capabilities, running jobs as itself, it starts and serves.
    control = service_daemon(root, as_service(), run_as="daemon")
    service_daemons.append(control)
    control.start()
    assert control.stop() == 0, control.log()

    daemon = service_daemon(root, as_service())
    service_daemons.append(daemon)
    daemon.start(wait=False)
    assert daemon.wait_exit(timeout_s=30) == 2, daemon.log()
    (failed,) = [e for e in daemon.log_events() if e.get("event") == "daemon.failed"]
    assert failed["code"] == "cannot_run_as_submitter", failed
    assert failed["error"].startswith(
        'local.run_as = "submitter", but this daemon cannot run jobs as other users: '
        "a job's process cannot run as uid 65534 (gid 65534, supplementary groups none): "
        "setgroups: Operation not permitted. It needs CAP_SETUID, CAP_SETGID and CAP_KILL"
    ), failed


def test_check_says_whether_this_process_can_run_jobs_as_their_submitters(
    short_tmp: Path,
) -> None:
    root = service_root(short_tmp)
    python, python_env = service_python()
    env = {**os.environ, **python_env, "ORCHESTRATOR__LOCAL__RUN_AS": "submitter"}
    found: dict[str, tuple[int, bool]] = {}
    for who, wrapper in (("root", []), ("service user", [*as_service(), *python])):
        store = root / f"state-{len(found)}" / "o.db"  # writable by each: only run_as may fail
        result = subprocess.run(
            [*wrapper, sys.executable, "-m", "orchestrator", "check", "--json"],
            env={**env, "ORCHESTRATOR__STORE__PATH": str(store)},
            capture_output=True,
            timeout=60,
            check=False,
        )
        checks = {c["name"]: c for c in orjson.loads(result.stdout)["checks"]}
        found[who] = (result.returncode, checks["local.run_as"]["ok"])
        assert [c["name"] for c in checks.values() if not c["ok"]] in ([], ["local.run_as"])
        if who == "service user":
            assert "setgroups: Operation not permitted" in checks["local.run_as"]["detail"]
    assert found == {"root": (0, True), "service user": (1, False)}


@pytest.fixture
def delegated_cgroup(short_tmp: Path) -> Iterator[Path]:
    """A cgroup delegated to the service user, as systemd's Delegate=yes does (the directory
    and its cgroup.procs, cgroup.threads, cgroup.subtree_control chowned to it)."""
    if not FOUND.enabled:
        pytest.skip(f"no cgroup v2 this process may make cgroups in: {FOUND.detail}")
    with scratch(f"svc-{short_tmp.name}", owner=SERVICE) as unit:
        yield unit


@pytest.mark.parametrize("containment", ["process groups", "delegated cgroup"])
async def test_a_service_user_with_ambient_capabilities_runs_jobs_as_their_submitters(
    short_tmp: Path,
    peer_dir: Path,
    service_daemons: list[DaemonProcess],
    containment: str,
    request: pytest.FixtureRequest,
) -> None:
    root = service_root(short_tmp)
    wrapper = as_service("setuid", "setgid", "kill")
    local: dict[str, Any] = {"cgroup": "off"}
    if containment == "delegated cgroup":
        unit: Path = request.getfixturevalue("delegated_cgroup")
        wrapper = ["sh", "-c", f'echo $$ > {unit}/cgroup.procs && exec "$@"', "sh", *wrapper]
        local = {}
    daemon = service_daemon(root, wrapper, **local)
    service_daemons.append(daemon)
    daemon.start()
    assert daemon.proc is not None
    events = daemon.log_events()
    if containment == "delegated cgroup":
        assert not [e for e in events if e.get("event") == "local.cgroup_unavailable"], events
    open_to_others(daemon.socket_path)
    checks = {"daemon_kill": f"kill -0 {daemon.proc.pid}", "store": f"cat {daemon.store_path}"}
    script = WHO + probes(checks) + "\n" + SLEEPER
    async with PeerClient(PEER, daemon.socket_path) as peer:
        job = await submit(peer, {"command": ["bash", "-c", script], "cwd": str(peer_dir)})
        pid, out, err = await printed_pid(peer, job["id"])
        assert (await peer.call("cancel", job_id=job["id"]))["ok"]
        final = (await peer.request("wait", job_id=job["id"]))[-1]["job"]
    lines = out.splitlines()
    assert lines[:3] == [str(PEER), str(PEER), str(PEER)], out + err
    # The daemon's ambient CAP_SETUID, CAP_SETGID, CAP_KILL do not reach the job.
    assert capabilities(out) == NO_CAPABILITIES, out
    assert refused(out, err, "daemon_kill", "Operation not permitted"), (out, err)
    assert refused(out, err, "store", "Permission denied"), (out, err)
    # Its process is another uid's: stopping it takes the daemon's CAP_KILL.
    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel")
    wait_for(lambda: not running_pid(pid), f"the job's process {pid} to end", timeout_s=10)
    if containment == "delegated cgroup":
        assert Path(final["info"]["cgroup"]).parent == unit / "jobs"
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    assert not [e for e in daemon.log_events() if e.get("level") == "error"], orjson.dumps(
        daemon.log_events()
    ).decode()
