"""Local jobs contained in cgroups (v2) of their own: nothing a job starts survives its cancel,
its timeout or its end, a job is terminal only once its cgroup is empty, and a job whose keeper
was killed while the daemon was down is re-adopted while its processes run. Real cgroups, real
double-forking jobs; skipped where this process may not make cgroups. The fallback (no cgroups:
process groups, and a warning) is tested everywhere."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator import views
from orchestrator.backends import cgroups
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support.cgroup import FOUND, scratch
from tests.support.daemon import DaemonProcess, running, until_state
from tests.support.keeper import keeper_pids
from tests.support.waits import until, wait_for

pytestmark = pytest.mark.timeout(90)

needs_cgroups = pytest.mark.skipif(
    not FOUND.enabled, reason=f"no cgroup v2 this process may make cgroups in: {FOUND.detail}"
)

# A job that double-forks: a grandchild in a session of its own (out of the job's process
# group), its pid in `pidfile`, while the job itself sleeps.
DOUBLE_FORK = "setsid sleep 1000 & echo $! > {pidfile}; sleep 1000"


def running_pid(pid: int) -> bool:
    """Whether `pid` is a process that still runs (a zombie has ended: only its parent, init
    here, has yet to collect it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone_for_good(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


@pytest.fixture
def pidfile(short_tmp: Path) -> Iterator[Path]:
    """Where a test job writes its grandchild's pid; whatever the outcome of the test, that
    process and the job's own are killed afterwards (without containment they would run on)."""
    path = short_tmp / "grandchild.pid"
    yield path
    if (pid := read_pid(path)) is not None and running_pid(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in Path("/proc").iterdir():  # the job's own shell, and its group (the sleep)
        with contextlib.suppress(OSError, ValueError):
            if str(path).encode() in (proc / "cmdline").read_bytes():
                os.killpg(os.getpgid(int(proc.name)), signal.SIGKILL)


def assert_ended_whole(job: views.Job, grandchild: int) -> None:
    """At the moment the job is reported terminal, nothing of it runs: its grandchild has
    ended and its cgroup is gone (removed once empty). The grandchild's pid is then released
    (collected by init) within a bounded wait."""
    assert not running_pid(grandchild), f"the job's grandchild {grandchild} still runs"
    cgroup = Path(job["info"]["cgroup"])
    assert cgroup.name == f"{job['id']}-{job['attempt']}"
    assert not cgroup.exists(), f"{cgroup} is still there"
    wait_for(lambda: gone_for_good(grandchild), f"pid {grandchild} to be released")


# -- cancel, timeout, the job's own end ---------------------------------------------------------


@needs_cgroups
async def test_cancel_kills_every_process_of_a_double_forking_job(
    short_tmp: Path, pidfile: Path
) -> None:
    script = DOUBLE_FORK.format(pidfile=pidfile)
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script]})
        await until_state(client, job["id"], "RUNNING")
        await until(lambda: read_pid(pidfile) is not None, "the job to fork")
        grandchild = read_pid(pidfile)
        assert grandchild is not None
        assert running_pid(grandchild)
        await client.cancel(job["id"])
        final = await client.wait(job["id"])
    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel")
    assert_ended_whole(final, grandchild)


@needs_cgroups
async def test_timeout_kills_every_process_of_a_double_forking_job(
    short_tmp: Path, pidfile: Path
) -> None:
    script = DOUBLE_FORK.format(pidfile=pidfile)
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script], "timeout_s": 1.0})
        await until(lambda: read_pid(pidfile) is not None, "the job to fork")
        grandchild = read_pid(pidfile)
        assert grandchild is not None
        final = await client.wait(job["id"])
    assert final["state"] == "FAILED"
    assert final["reason"] is not None
    assert final["reason"].startswith("timeout"), final["reason"]
    assert_ended_whole(final, grandchild)


@needs_cgroups
async def test_what_a_job_leaves_running_is_stopped_before_the_job_is_terminal(
    short_tmp: Path, pidfile: Path
) -> None:
    # The job's own process exits 0 at once; its grandchild ignores SIGTERM, so it takes the
    # SIGKILL after the grace period to end it. Only then is the job SUCCEEDED.
    leftover = "trap '' TERM; while :; do sleep 0.05; done"
    script = f'setsid sh -c "{leftover}" & echo $! > {pidfile}; exit 0'
    settings = make_settings(short_tmp, local={"kill_grace_s": 0.5})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script]})
        final = await client.wait(job["id"])
        history = (await client.get(job["id"], history=True))["history"]
    grandchild = read_pid(pidfile)
    assert grandchild is not None
    assert (final["state"], final["exit_code"], final["reason"]) == ("SUCCEEDED", 0, None)
    assert [(e["from"], e["to"]) for e in history] == [
        (None, "QUEUED"),
        ("QUEUED", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    assert_ended_whole(final, grandchild)


# -- restarts: the keeper killed while the daemon was down ---------------------------------------


def kill_daemon_and_keeper(daemon: DaemonProcess) -> None:
    """kill -9 the daemon, then the job keeper: the job's processes run on, with no one to
    learn their outcome."""
    (keeper,) = keeper_pids(daemon.store_path.parent / "jobs")
    daemon.kill()
    os.kill(keeper, signal.SIGKILL)
    wait_for(lambda: not running_pid(keeper), "the keeper to die")


def until_seen_after_restart(daemon: DaemonProcess, job_id: str) -> views.Job:
    """The job once the restarted daemon has looked at it: re-adopted (`orphaned`) or ended."""
    with daemon.client() as client:
        job: views.Job | None = None

        def seen() -> bool:
            nonlocal job
            job = client.get(job_id)
            return bool(job["vendor_status"] == "orphaned" or job["state"] != "RUNNING")

        wait_for(seen, "the restarted daemon to look at the job")
    assert job is not None
    return job


@needs_cgroups
def test_a_job_whose_keeper_was_killed_is_readopted_while_its_processes_run(
    daemon: DaemonProcess, short_tmp: Path, pidfile: Path
) -> None:
    daemon.start()
    with daemon.client() as client:
        job = client.submit({"command": ["sh", "-c", DOUBLE_FORK.format(pidfile=pidfile)]})
        wait_for(lambda: read_pid(pidfile) is not None, "the job to fork")
    grandchild = read_pid(pidfile)
    assert grandchild is not None
    kill_daemon_and_keeper(daemon)
    daemon.start()
    seen = until_seen_after_restart(daemon, job["id"])
    # Not LOST while its processes run: re-adopted, and still under control.
    assert seen["state"] == "RUNNING", seen
    assert running_pid(grandchild)
    with daemon.client() as client:
        client.cancel(job["id"])
        final = client.wait(job["id"])
    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel")
    assert_ended_whole(final, grandchild)


@needs_cgroups
def test_a_readopted_job_whose_processes_end_is_lost_saying_so(
    daemon: DaemonProcess, short_tmp: Path, pidfile: Path
) -> None:
    go = short_tmp / "go"
    wait_go = f"while [ ! -e {go} ]; do sleep 0.05; done"
    script = f"setsid sh -c '{wait_go}' & echo $! > {pidfile}; {wait_go}"
    daemon.start()
    with daemon.client() as client:
        job = client.submit({"command": ["sh", "-c", script]})
        wait_for(lambda: read_pid(pidfile) is not None, "the job to fork")
    grandchild = read_pid(pidfile)
    assert grandchild is not None
    kill_daemon_and_keeper(daemon)
    daemon.start()
    assert until_seen_after_restart(daemon, job["id"])["state"] == "RUNNING"
    go.touch()  # the job's processes end by themselves; no one records how
    with daemon.client() as client:
        final = client.wait(job["id"])
    assert final["state"] == "LOST"
    assert final["reason"] is not None
    assert "without telling its exit status" in final["reason"], final["reason"]
    assert "ran on" in final["reason"], final["reason"]
    assert_ended_whole(final, grandchild)


# -- a delegated cgroup, as under systemd with Delegate=yes --------------------------------------


def cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as fh:
        return next(line[3:].strip() for line in fh if line.startswith("0::"))


@pytest.fixture
def unit_cgroup(short_tmp: Path) -> Iterator[Path]:
    """A cgroup standing for a service's own (/system.slice/orchestrator.service under
    systemd): made for the test, emptied and removed after it."""
    with scratch(f"unit-{short_tmp.name}") as unit:
        yield unit


@needs_cgroups
def test_in_its_own_cgroup_the_daemon_moves_to_a_leaf_and_finds_its_jobs_after_restarts(
    short_tmp: Path, unit_cgroup: Path, pidfile: Path
) -> None:
    def started_in(cgroup: Path) -> DaemonProcess:
        """`orchestrator serve` started in `cgroup`, as systemd starts a unit's main process."""
        enter = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
        return DaemonProcess(short_tmp, wrapper=["sh", "-c", enter, "sh"])

    daemon = started_in(unit_cgroup)
    try:
        daemon.start()
        assert daemon.proc is not None
        # It left the unit's cgroup for a leaf beside the jobs' (no internal processes).
        assert Path(cgroup_of(daemon.proc.pid)).parts[-2:] == (unit_cgroup.name, "daemon")
        with daemon.client() as client:
            job = client.submit({"command": ["sh", "-c", DOUBLE_FORK.format(pidfile=pidfile)]})
            wait_for(lambda: read_pid(pidfile) is not None, "the job to fork")
            job = client.get(job["id"])
        grandchild = read_pid(pidfile)
        assert grandchild is not None
        assert Path(job["info"]["cgroup"]).parent == unit_cgroup / "jobs"
        # Restarted in the unit's cgroup, then (as a daemon started in its own leaf) in the
        # leaf itself: both times it makes jobs where the first daemon did, and keeps the job.
        for cgroup in (unit_cgroup, unit_cgroup / "daemon"):
            daemon.kill()
            daemon = started_in(cgroup)
            daemon.start()
            assert daemon.proc is not None
            assert Path(cgroup_of(daemon.proc.pid)).parts[-2:] == (unit_cgroup.name, "daemon")
            with daemon.client() as client:
                assert client.get(job["id"])["state"] == "RUNNING"
                another = client.wait(client.submit({"command": ["true"]})["id"])
            assert another["state"] == "SUCCEEDED"
            assert Path(another["info"]["cgroup"]).parent == unit_cgroup / "jobs"
        with daemon.client() as client:
            client.cancel(job["id"])
            final = client.wait(job["id"])
        assert final["state"] == "CANCELLED"
        assert_ended_whole(final, grandchild)
        assert [p.name for p in (unit_cgroup / "jobs").iterdir() if p.is_dir()] == []
    finally:
        daemon.close()


# -- the fallback: no cgroups ------------------------------------------------------------------


def check(short_tmp: Path, **env: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "check", "--json"],
        env={**os.environ, "ORCHESTRATOR__STORE__PATH": str(short_tmp / "state" / "o.db"), **env},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = orjson.loads(result.stdout)["checks"]
    return {c["name"]: c for c in checks}["local.cgroup"]  # type: ignore[no-any-return]


def test_without_a_usable_cgroup_the_daemon_says_so_and_uses_process_groups(
    short_tmp: Path, pidfile: Path
) -> None:
    not_a_cgroup = short_tmp / "not-a-cgroup"
    not_a_cgroup.mkdir()
    env = {"ORCHESTRATOR__LOCAL__CGROUP_ROOT": str(not_a_cgroup)}
    daemon = DaemonProcess(short_tmp, env)
    try:
        daemon.start()
        with daemon.client() as client:
            job = client.submit({"command": ["sh", "-c", f"echo $$ > {pidfile}; exit 3"]})
            final = client.wait(job["id"])
        warnings = [e for e in daemon.log_events() if e["event"] == "local.cgroup_unavailable"]
    finally:
        daemon.close()
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "warning"
    assert str(not_a_cgroup) in warnings[0]["reason"]
    assert "process groups" in warnings[0]["fallback"]
    assert (final["state"], final["exit_code"]) == ("FAILED", 3)
    assert "cgroup" not in final["info"]
    assert final["external_id"] is not None
    assert final["external_id"].count(":") == 1  # PID:START_TIME, no cgroup
    assert list(not_a_cgroup.iterdir()) == []
    found = check(short_tmp, **env)
    assert found["ok"] is True
    assert found["detail"].startswith("unavailable, jobs fall back to process groups")
    assert str(not_a_cgroup) in found["detail"]


def test_with_cgroups_off_jobs_run_in_process_groups_without_a_warning(short_tmp: Path) -> None:
    env = {"ORCHESTRATOR__LOCAL__CGROUP": "off"}
    daemon = DaemonProcess(short_tmp, env)
    try:
        daemon.start()
        with daemon.client() as client:
            final = client.wait(client.submit({"command": ["true"]})["id"])
        events = [e["event"] for e in daemon.log_events()]
    finally:
        daemon.close()
    assert final["state"] == "SUCCEEDED"
    assert final["external_id"] is not None
    assert final["external_id"].count(":") == 1
    assert "local.cgroup_unavailable" not in events
    assert "local.cgroups" not in events
    assert check(short_tmp, **env)["detail"].startswith("off")


@needs_cgroups
def test_check_reports_where_job_cgroups_are_made(short_tmp: Path) -> None:
    found = check(short_tmp)
    assert found["ok"] is True
    assert found["detail"].startswith(f"each job in a cgroup of its own under {FOUND.root}")


# -- the kill for kernels without cgroup.kill ----------------------------------------------------


@needs_cgroups
def test_without_cgroup_kill_each_member_is_killed_even_while_forking(short_tmp: Path) -> None:
    assert FOUND.root is not None
    FOUND.root.mkdir(parents=True, exist_ok=True)
    cgroup = FOUND.root / f"test-{os.getpid()}-{short_tmp.name}"
    cgroups.make(cgroup)
    # A fork bomb in slow motion: a new process in the background every 10 ms.
    forker = subprocess.Popen(
        [
            "sh",
            "-c",
            f"echo 0 > {cgroup}/cgroup.procs && while :; do sleep 60 & sleep 0.01; done",
        ],
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(cgroups.members(cgroup)) > 5, "the cgroup to fill")
        rounds = 0

        def killed() -> bool:  # as the daemon does: again on each round until it is empty
            nonlocal rounds
            rounds += 1
            cgroups.kill_each(cgroup)
            return not cgroups.populated(cgroup)

        wait_for(killed, "the cgroup to empty", timeout_s=10)
        assert rounds <= 3, rounds
        assert forker.wait(timeout=10) == -signal.SIGKILL
        cgroups.remove(cgroup)
        assert not cgroup.exists()
    finally:
        with contextlib.suppress(OSError):
            cgroups.kill(cgroup)
        forker.wait(timeout=10)
        with contextlib.suppress(OSError):
            wait_for(lambda: not cgroups.populated(cgroup), "the cgroup to empty", timeout_s=10)
            cgroups.remove(cgroup)
