"""The local backend when the host misbehaves: a full disk (a small tmpfs, mounted by the test
when root), a job that floods its output, a daemon out of descriptors, a descriptor inherited
above the fd limit, the job keeper killed. Whatever happens, a job ends with its true outcome,
never LOST on a guess; LOST only when its outcome cannot be known (its keeper was killed)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, events, models, settings, views
from orchestrator.backends import _runner, base
from orchestrator.backends.local import LocalBackend
from orchestrator.client import Client
from orchestrator.store import SqliteStore
from orchestrator.testing import make_settings
from tests.support import cgroup, fds, tmpfs
from tests.support.daemon import DaemonProcess, running, until_state
from tests.support.keeper import keeper_pids
from tests.support.waits import until

pytestmark = pytest.mark.timeout(90)

CAP = 1024 * 1024
MARKER = f"\n[orchestrator: output truncated at {CAP} bytes; further output discarded]\n".encode()


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs at `short_tmp/disk`."""
    with tmpfs.mounted(short_tmp / "disk", "8m") as disk:
        yield disk


def disk_settings(root: Path, **sections: Any) -> settings.Settings:
    """`make_settings`, with no free-space floor for the store where there is one (the tmpfs
    is smaller than any sensible floor)."""
    if "min_free_bytes" in settings.StoreSettings.model_fields:
        sections["store"] = {"min_free_bytes": 0, **sections.get("store", {})}
    return make_settings(root, **sections)


def fill(path: Path) -> None:
    """Write `path` until its file system has no byte left."""
    with open(path, "wb", buffering=0) as fh:
        for size in (1024 * 1024, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise


@contextlib.contextmanager
def killed_at_exit(pid: int, *, group: bool = True) -> Iterator[None]:
    """Whatever happens in the block, the process group `pid` leads (a job's own process: it
    has a session of its own), or with `group=False` the process alone, is gone after it: a
    failing test leaves no job running."""
    started = _runner.start_time(pid)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _runner.start_time(pid) == started:  # still that process, not a reused pid
                (os.killpg if group else os.kill)(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


@contextlib.contextmanager
def no_keeper_left(work_dir: Path) -> Iterator[None]:
    """After the block, no keeper of `work_dir` runs on: one that holds an outcome no daemon
    will forget (the test failed, or killed its daemon) would wait for one for ever."""
    try:
        yield
    finally:
        for pid in keeper_pids(work_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


_PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """This process adopts its orphaned descendants (a killed keeper's jobs) and the test reaps
    them (`reap`) as soon as they exit, as an init does. Pid 1 may reap late (here about 1.5 s
    later) or never (a container without an init): an orphan that has exited stays a zombie
    meanwhile, its /proc entry and start time in place."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


async def reap(pid: int) -> int:
    """The wait status of `pid`, a child of this process (adopted), once it has exited."""
    statuses: list[int] = []

    def reaped() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            statuses.append(status)
        return bool(done)

    await until(reaped, f"process {pid} to exit")
    return statuses[0]


# -- output is capped; a hog does not starve the others -------------------------------------


async def test_job_output_is_capped_and_the_job_runs_on(short_tmp: Path, small_disk: Path) -> None:
    store = {"path": small_disk / "state" / "orchestrator.db"}
    config = disk_settings(short_tmp, store=store, local={"max_output_bytes": CAP})
    async with running(config), Client(short_tmp / "o.sock") as client:
        hog = await client.submit({"command": ["yes"]})
        await until_state(client, hog["id"], "RUNNING")
        stdout = config.local_work_dir() / hog["id"] / "1" / "stdout"
        hog_pid = (await client.get(hog["id"]))["info"]["pid"]
        with killed_at_exit(hog_pid):
            await until(lambda: stdout.read_bytes().endswith(MARKER), "the truncation marker")
            # Others still run, to their true ends, on the disk the hog writes to.
            failing = await client.submit({"command": ["sh", "-c", "echo bye; exit 5"]})
            fine = await client.submit({"command": ["true"]})
            failed = await client.wait(failing["id"])
            assert (failed["state"], failed["exit_code"]) == ("FAILED", 5)
            assert (await client.wait(fine["id"]))["state"] == "SUCCEEDED"
            output = "".join([r.get("data", "") async for r in client.logs(failing["id"])])
            assert output == "bye\n"
            # The hog runs on, its output no longer growing.
            size = stdout.stat().st_size
            assert size == CAP + len(MARKER)
            assert stdout.read_bytes()[:8] == b"y\ny\ny\ny\n"
            assert (await client.get(hog["id"]))["state"] == "RUNNING"
            assert stdout.stat().st_size == size
            cancelled = await client.wait((await client.cancel(hog["id"]))["id"])
            assert cancelled["state"] == "CANCELLED"
            assert stdout.stat().st_size == size


# -- a disk full of something else ----------------------------------------------------------


def ends_on_go(go: Path, code: int) -> list[str]:
    """A job that waits for `go`, then writes more output than a pipe holds (a full disk drops
    it: the job is not blocked) and exits `code`."""
    script = f"while [ ! -e {go} ]; do sleep 0.05; done; head -c 1000000 /dev/zero; exit {code}"
    return ["sh", "-c", script]


async def end_while_the_disk_is_full(
    client: Client, job_id: str, job_pid: int, disk: Path, go: Path
) -> Path:
    """Fill `disk`, have the job end, and see that the daemon, unable to record the end, keeps
    the job RUNNING (not LOST, not ended on a guess) for a few polls. The filler, to unlink."""
    filler = disk / "filler"
    await asyncio.to_thread(fill, filler)
    await asyncio.to_thread(go.touch)
    await until(lambda: gone(job_pid), "the job to exit")
    deadline = time.monotonic() + 1.0  # the keeper told at once; this is a few polls more
    while time.monotonic() < deadline:
        job = await client.get(job_id)
        assert (job["state"], job["exit_code"]) == ("RUNNING", None), job
        await asyncio.sleep(0.1)
    return filler


async def test_exit_status_recorded_once_the_disk_has_room_again(
    short_tmp: Path, small_disk: Path
) -> None:
    """The job ends while the store cannot write: the keeper holds its exit status until the
    daemon has recorded it, and the daemon records it once the disk has room again."""
    config = disk_settings(short_tmp, store={"path": small_disk / "state" / "orchestrator.db"})
    go = short_tmp / "go"
    with no_keeper_left(config.local_work_dir()):
        async with running(config), Client(short_tmp / "o.sock") as client:
            job = await client.submit({"command": ends_on_go(go, 5)})
            await until_state(client, job["id"], "RUNNING")
            job_pid = int((await client.get(job["id"]))["info"]["pid"])
            with killed_at_exit(job_pid):
                filler = await end_while_the_disk_is_full(
                    client, job["id"], job_pid, small_disk, go
                )
                filler.unlink()
                final = await client.wait(job["id"])
    assert (final["state"], final["exit_code"], final["reason"]) == ("FAILED", 5, "exit code 5")


async def test_exit_status_of_a_job_ended_on_a_full_disk_survives_a_daemon_restart(
    short_tmp: Path, small_disk: Path
) -> None:
    """The daemon stops before it could record the end: the next one learns the exit status
    from the keeper (nothing was forgotten before it was recorded)."""
    config = disk_settings(short_tmp, store={"path": small_disk / "state" / "orchestrator.db"})
    go = short_tmp / "go"
    with no_keeper_left(config.local_work_dir()):
        async with running(config), Client(short_tmp / "o.sock") as client:
            job = await client.submit({"command": ends_on_go(go, 5)})
            await until_state(client, job["id"], "RUNNING")
            job_pid = int((await client.get(job["id"]))["info"]["pid"])
            with killed_at_exit(job_pid):
                filler = await end_while_the_disk_is_full(
                    client, job["id"], job_pid, small_disk, go
                )
        filler.unlink()
        async with running(config), Client(short_tmp / "o.sock") as client:
            final = await client.wait(job["id"])
            history = (await client.get(job["id"], history=True))["history"]
    assert (final["state"], final["exit_code"], final["reason"]) == ("FAILED", 5, "exit code 5")
    assert [event["to"] for event in history] == ["QUEUED", "RUNNING", "FAILED"]


async def test_a_launch_the_keeper_cannot_claim_fails_the_job_saying_why(
    short_tmp: Path, small_disk: Path
) -> None:
    """The work directory's disk is full: the keeper cannot write the attempt's claim, runs
    nothing and answers `failed` with the errno; each attempt is a start failure saying so,
    retried up to `dispatcher.max_start_attempts`, then the job FAILED. The keeper lives on:
    once the disk has room, the next job runs."""
    work_dir = small_disk / "jobs"
    config = disk_settings(short_tmp, local={"work_dir": work_dir})
    marker = short_tmp / "ran"
    why = "cannot start the job: No space left on device"
    with no_keeper_left(work_dir):
        async with running(config), Client(short_tmp / "o.sock") as client:
            fill(small_disk / "filler")
            job = await client.submit({"command": ["touch", str(marker)]})
            final = await client.wait(job["id"])
            full = await client.get(job["id"], history=True)
            (small_disk / "filler").unlink()
            after = await client.wait(
                (await client.submit({"command": ["sh", "-c", "exit 6"]}))["id"]
            )
    assert (final["state"], final["exit_code"], final["reason"]) == ("FAILED", None, why)
    attempts = config.dispatcher.max_start_attempts
    assert [a["outcome"] for a in full["attempts"]] == [f"start failed: {why}"] * attempts
    assert not marker.exists()  # nothing ran
    for attempt in range(1, attempts + 1):  # no attempt was claimed, so none may run later
        assert not (work_dir / job["id"] / str(attempt) / "claim").exists()
    assert (after["state"], after["exit_code"]) == ("FAILED", 6)


# -- the daemon out of descriptors ----------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def top_up(daemon: DaemonProcess, pid: int, limit: int, held: list[socket.socket]) -> None:
    """Connect (refusals are fine) until the daemon holds `limit` descriptors, or 8 times."""
    for _ in range(8):
        if open_fds(pid) >= limit:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(0.2)
        try:
            sock.connect(str(daemon.socket_path))
        except OSError:
            sock.close()
            continue
        held.append(sock)


def test_a_job_ending_while_the_daemon_is_out_of_descriptors_keeps_its_exit_code(
    short_tmp: Path,
) -> None:
    """The job ends while the daemon has no descriptor to spare. Its keeper, a process apart,
    reaps it and tells the daemon on the connection it already holds; what the daemon cannot
    look at now (the job's cgroup, where it has one) proves nothing and is said so: the job is
    never LOST, and ends with its true exit code once the daemon has descriptors again."""
    limit = 64
    daemon = DaemonProcess(
        short_tmp,
        env={
            "ORCHESTRATOR__SERVER__MAX_CONNECTIONS": "10000",
            "ORCHESTRATOR__SERVER__MAX_CONNECTIONS_PER_PEER": "10000",
        },
        wrapper=["prlimit", f"--nofile={limit}:{limit}", "--"],
    )
    go = short_tmp / "go"
    held: list[socket.socket] = []
    cleanup = contextlib.ExitStack()

    def hold_full_until(done: Callable[[], bool], what: str) -> None:
        """Keep the daemon out of descriptors (whatever it frees is taken again) until
        `done()`; it must never call the job LOST meanwhile."""
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, f"{what}; daemon log:\n{daemon.log()[-3000:]}"
            assert '"LOST"' not in daemon.log(), daemon.log()[-3000:]
            top_up(daemon, pid, limit, held)
            time.sleep(0.05)

    try:
        cleanup.enter_context(no_keeper_left(daemon.store_path.parent / "jobs"))
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        with daemon.client() as client:
            job = client.submit(
                {"command": ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; exit 5"]}
            )
            deadline = time.monotonic() + 15
            while (job := client.get(job["id"]))["state"] != "RUNNING":
                assert time.monotonic() < deadline, "the job never ran"
                time.sleep(0.02)
        job_pid = int(job["info"]["pid"])
        cleanup.enter_context(killed_at_exit(job_pid))
        # Connections (refused or reset ones are fine) until the daemon holds all it may.
        hold_full_until(lambda: open_fds(pid) >= limit, "the daemon never ran out of descriptors")
        # The job ends now, while the daemon is out of descriptors, and for a few of its polls
        # after that.
        go.touch()
        hold_full_until(lambda: gone(job_pid), "the job did not end")
        polls_later = time.monotonic() + 2.0
        hold_full_until(lambda: time.monotonic() > polls_later, "")
        for sock in held:
            sock.close()
        held.clear()
        final, history = None, []
        deadline = time.monotonic() + 20
        while final is None:  # a connection the daemon could not accept may be reset
            try:
                with daemon.client() as client:
                    final = client.wait(job["id"])
                    history = client.get(job["id"], history=True)["history"]
            except errors.DaemonUnreachable:
                assert time.monotonic() < deadline, "the daemon stopped answering"
                time.sleep(0.1)
        assert (final["state"], final["exit_code"]) == ("FAILED", 5)
        assert "LOST" not in [event["to"] for event in history]
        if "cgroup" in job["info"]:
            # The job had ended, but whether its cgroup was empty could not be read: that was
            # said, and the job waited for a read that could tell.
            failures = [e for e in daemon.log_events() if e.get("event") == "local.read_failed"]
            assert failures, daemon.log()[-3000:]
            assert (failures[0]["job_id"], failures[0]["file"], failures[0]["errno"]) == (
                job["id"],
                "cgroup.events",
                "EMFILE",
            )
    finally:
        for sock in held:
            sock.close()
        cleanup.close()
        daemon.close()


# -- a descriptor inherited above the soft fd limit ------------------------------------------


def test_a_descriptor_inherited_above_the_fd_limit_is_not_passed_to_jobs(short_tmp: Path) -> None:
    """The daemon was started holding an inheritable descriptor above its soft fd limit (one
    no spawn action can name): its jobs, forked by the keeper it starts, do not hold it."""
    high = 1500
    soft = 1024
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= high:
        pytest.skip(f"the hard fd limit ({hard}) does not allow descriptor {high}")
    read_end, write_end = os.pipe()
    os.dup2(write_end, high)
    daemon = DaemonProcess(
        short_tmp, wrapper=["prlimit", f"--nofile={soft}:", "--"], pass_fds=(high,)
    )
    try:
        with no_keeper_left(daemon.store_path.parent / "jobs"):
            daemon.start()
            assert daemon.proc is not None
            assert str(high) in os.listdir(f"/proc/{daemon.proc.pid}/fd")  # the daemon holds it
            with daemon.client() as client:
                job = client.submit({"command": fds.LIST_FDS})
                final = client.wait(job["id"])
                output = "".join(r.get("data", "") for r in client.stream("logs", job_id=job["id"]))
        assert final["state"] == "SUCCEEDED", final["reason"]
        held = fds.held(output)
        assert sorted(held) == [0, 1, 2], f"the job holds {held}"
    finally:
        daemon.close()
        for fd in (read_end, write_end, high):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- the keeper killed under running jobs ---------------------------------------------------


async def until_orphaned(client: Client, job_id: str) -> views.Job:
    """The job once the daemon, connected to a new keeper that does not know it, has found its
    process running on without one: RUNNING, `orphaned`."""
    deadline = time.monotonic() + 20
    while (job := await client.get(job_id))["vendor_status"] != "orphaned":
        assert job["state"] == "RUNNING", job
        assert time.monotonic() < deadline, f"never orphaned: {job}"
        await asyncio.sleep(0.05)
    return job


async def test_a_job_whose_keeper_was_killed_is_lost_once_its_process_ends(
    short_tmp: Path,
) -> None:
    """Without a cgroup. The keeper is SIGKILLed under a running job: the daemon starts a new
    keeper, finds the job's process still running (re-adopted: RUNNING, `orphaned`), and once
    that process has ended calls the job LOST, saying the keeper ended without telling its exit
    status (no one can know it: not an exit code on a guess). The next job runs under the new
    keeper, to its true end."""
    config = make_settings(short_tmp, local={"cgroup": "off"})
    work_dir = config.local_work_dir()
    go, ppid_file = short_tmp / "go", short_tmp / "next.ppid"
    script = f"while [ ! -e {go} ]; do sleep 0.05; done; exit 3"  # no output: no reader is left
    with no_keeper_left(work_dir), adopting_orphans():
        async with running(config), Client(short_tmp / "o.sock") as client:
            job = await client.submit({"command": ["sh", "-c", script]})
            await until_state(client, job["id"], "RUNNING")
            job_pid = int((await client.get(job["id"]))["info"]["pid"])
            with killed_at_exit(job_pid):
                # The job's parent is the keeper (its pid may still be listed as one: a child
                # forked by the keeper has its command line until it has exec'd the job's).
                old_keeper = parent(job_pid)
                assert old_keeper in keeper_pids(work_dir)
                os.kill(old_keeper, signal.SIGKILL)
                orphaned = await until_orphaned(client, job["id"])
                assert orphaned["exit_code"] is None
                (new_keeper,) = set(keeper_pids(work_dir)) - {job_pid}
                assert new_keeper != old_keeper
                go.touch()
                status = await reap(job_pid)  # adopted by this process, as by an init
                final = await client.wait(job["id"])
            assert os.waitstatus_to_exitcode(status) == 3  # what was there to tell
            after = await client.submit(
                {"command": ["sh", "-c", f"echo $PPID > {ppid_file}; exit 7"]}
            )
            after = await client.wait(after["id"])
            assert keeper_pids(work_dir) == [new_keeper]
    assert (final["state"], final["exit_code"]) == ("LOST", None)
    assert final["reason"] is not None
    assert "the keeper that ran the job ended" in final["reason"], final["reason"]
    assert "without telling its exit status" in final["reason"], final["reason"]
    assert (after["state"], after["exit_code"]) == ("FAILED", 7)
    assert int(ppid_file.read_text()) == new_keeper


@pytest.mark.skipif(not cgroup.FOUND.enabled, reason=f"no cgroups: {cgroup.FOUND.detail}")
async def test_a_job_whose_keeper_was_killed_runs_on_in_its_cgroup_until_its_last_process_ends(
    short_tmp: Path,
) -> None:
    """With a cgroup. The keeper is SIGKILLed, then the job's own process ends leaving a child
    running in the job's cgroup: the job stays RUNNING (`orphaned`) while that child runs, and
    is LOST once it has ended too, saying its processes ran on after the keeper ended."""
    config = make_settings(short_tmp)
    work_dir = config.local_work_dir()
    go, child_file = short_tmp / "go", short_tmp / "child.pid"
    script = f"sleep 600 & echo $! > {child_file}; while [ ! -e {go} ]; do sleep 0.05; done; exit 3"
    with no_keeper_left(work_dir), adopting_orphans():
        async with running(config), Client(short_tmp / "o.sock") as client:
            job = await client.submit({"command": ["sh", "-c", script]})
            await until_state(client, job["id"], "RUNNING")
            job = await client.get(job["id"])
            assert "cgroup" in job["info"], job["info"]
            job_pid = int(job["info"]["pid"])
            with killed_at_exit(job_pid), contextlib.ExitStack() as stack:
                await until(
                    lambda: child_file.read_text().strip() if child_file.exists() else "",
                    "the child",
                )
                child = int(child_file.read_text())
                stack.enter_context(killed_at_exit(child, group=False))
                old_keeper = parent(job_pid)
                assert old_keeper in keeper_pids(work_dir)
                os.kill(old_keeper, signal.SIGKILL)
                await until_orphaned(client, job["id"])
                go.touch()
                await reap(job_pid)
                deadline = time.monotonic() + 1.0  # a few polls: the child still runs
                while time.monotonic() < deadline:
                    seen = await client.get(job["id"])
                    assert (seen["state"], seen["vendor_status"]) == ("RUNNING", "orphaned"), seen
                    await asyncio.sleep(0.1)
                os.kill(child, signal.SIGKILL)
                await reap(child)  # it was the job's own process's: adopted too
                final = await client.wait(job["id"])
            after = await client.wait(
                (await client.submit({"command": ["sh", "-c", "exit 7"]}))["id"]
            )
    assert (final["state"], final["exit_code"]) == ("LOST", None)
    assert final["reason"] is not None
    assert "the keeper that ran the job ended" in final["reason"], final["reason"]
    assert "its processes ran on" in final["reason"], final["reason"]
    assert (after["state"], after["exit_code"]) == ("FAILED", 7)


async def test_a_job_that_kills_its_keeper_cannot_forge_its_outcome(short_tmp: Path) -> None:
    """A daemon-mode job may signal its keeper (same uid; it is the job's parent). Killing it
    makes the job's outcome unknown, never false (README, threat model): a job that forges, in
    its attempt directory, what a runner from before the keeper left (a claim naming itself, an
    `exit` file saying 0), kills its keeper and exits 3 is LOST, not SUCCEEDED."""
    config = make_settings(short_tmp)
    work_dir = config.local_work_dir()
    go, forged = short_tmp / "go", short_tmp / "forged"
    script = (
        """printf '{"exit_code": 0, "signal": null}' > exit; rm -f claim; """
        """printf '{"pid": %d, "start_time": %s}' $$ "$(cut -d' ' -f22 /proc/$$/stat)" > claim; """
        f"touch {forged}; kill -9 $PPID; while [ ! -e {go} ]; do sleep 0.05; done; exit 3"
    )
    with no_keeper_left(work_dir), adopting_orphans():
        async with running(config), Client(short_tmp / "o.sock") as client:
            job = await client.submit({"command": ["sh", "-c", script]})
            await until_state(client, job["id"], "RUNNING")
            job_pid = int((await client.get(job["id"]))["info"]["pid"])
            with killed_at_exit(job_pid):
                await until(forged.exists, "the job to forge its files and kill its keeper")
                await until(lambda: parent(job_pid) == os.getpid(), "the job to be orphaned")
                go.touch()
                await reap(job_pid)
                final = await client.wait(job["id"])
    assert (final["state"], final["exit_code"]) == ("LOST", None), final


# -- the backend's own reads, one by one ----------------------------------------------------


def adopted_job(work_dir: Path, pid: int) -> models.Job:
    """A RUNNING job whose own process is `pid`, launched by a keeper that has gone since: its
    attempt's claim is a keeper's, and the keeper the backend talks to does not know it (as
    after the keeper was killed)."""
    job = models.Job(
        id="01jobidjobidjobidjobidjob0",
        spec=models.JobSpec.model_validate({"command": ["true"]}),
        backend="local",
        state=models.JobState.RUNNING,
        created_at=0.0,
        updated_at=0.0,
        state_times={},
        attempt=1,
        external_id=f"{pid}:{_runner.start_time(pid)}",
        vendor_status="running",
    )
    attempt_dir = work_dir / job.id / "1"
    attempt_dir.mkdir(parents=True)
    (attempt_dir / "claim").write_text(json.dumps({"keeper": 1, "key": f"{job.id}/1"}))
    return job


async def test_a_proc_read_that_proves_nothing_leaves_the_job_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose keeper has gone is followed by its process in /proc: a read there that
    fails without proving anything (EMFILE, ENOMEM, EACCES, EIO) leaves it as it was, counted
    by errno; a read that tells finds it running on (`orphaned`), then gone: LOST."""
    backend = LocalBackend(settings.LocalSettings(cgroup="off"), tmp_path)
    await backend.start()
    sleeper = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        job = adopted_job(tmp_path, sleeper.pid)
        assert job.external_id is not None
        real_stat = _runner.stat
        for code in (errno.EMFILE, errno.ENOMEM, errno.EACCES, errno.EIO):

            def failing(pid: int, code: int = code) -> tuple[str, int]:
                raise OSError(code, os.strerror(code))

            monkeypatch.setattr(_runner, "stat", failing)
            seen = (await backend.describe([job]))[job.external_id]
            assert (seen.state, seen.vendor_status) == (job.state, job.vendor_status)
        monkeypatch.setattr(_runner, "stat", real_stat)
        # Only these: the keeper was reached, and did not know the job.
        assert dict(backend.telemetry().read_errors) == {
            "EMFILE": 1,
            "ENOMEM": 1,
            "EACCES": 1,
            "EIO": 1,
        }
        seen = (await backend.describe([job]))[job.external_id]
        assert (seen.state, seen.vendor_status) == (models.JobState.RUNNING, "orphaned")
        # Proof of absence still counts: the process is gone and no keeper told its end.
        sleeper.kill()
        await sleeper.wait()
        seen = (await backend.describe([job]))[job.external_id]
        assert (seen.state, seen.exit_code) == (models.JobState.LOST, None)
        assert seen.reason is not None
        assert "the keeper that ran the job ended" in seen.reason, seen.reason
    finally:
        with contextlib.suppress(ProcessLookupError):
            sleeper.kill()
        await sleeper.wait()
        await backend.close()


async def test_files_a_job_writes_beside_its_logs_do_not_decide_its_outcome(
    short_tmp: Path,
) -> None:
    """The job's working directory is its attempt directory, where a runner from before the
    keeper kept its claim and `exit` file. A job that forges both (an exit file saying 0, a
    runner's claim naming itself) is still RUNNING while it runs, and ends with the exit status
    its keeper reaped."""
    go, forged = short_tmp / "go", short_tmp / "forged"
    script = (
        """printf '{"exit_code": 0, "signal": null}' > exit; rm -f claim; """
        """printf '{"pid": %d, "start_time": %s}' $$ "$(cut -d' ' -f22 /proc/$$/stat)" > claim; """
        f"touch {forged}; while [ ! -e {go} ]; do sleep 0.05; done; exit 3"
    )
    config = make_settings(short_tmp)
    async with running(config), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script]})
        await until_state(client, job["id"], "RUNNING")
        with killed_at_exit(int((await client.get(job["id"]))["info"]["pid"])):
            await until(forged.exists, "the job to forge its files")
            claim = config.local_work_dir() / job["id"] / "1" / "claim"
            assert b"start_time" in claim.read_bytes()  # forged indeed
            deadline = time.monotonic() + 1.0  # a few polls
            while time.monotonic() < deadline:
                assert (await client.get(job["id"]))["state"] == "RUNNING"
                await asyncio.sleep(0.1)
            go.touch()
            final = await client.wait(job["id"])
    assert (final["state"], final["exit_code"]) == ("FAILED", 3)


async def test_a_claim_that_cannot_be_read_is_not_taken_for_never_launched(
    tmp_path: Path,
) -> None:
    """An attempt the keeper does not know, whose claim does not parse: "cannot tell", never
    "not launched" (which would launch it again), and the claim is left as it is."""
    backend = LocalBackend(settings.LocalSettings(), tmp_path)
    await backend.start()
    job = adopted_job(tmp_path, os.getpid())
    (tmp_path / job.id / "1" / "claim").write_bytes(b'{"pid": 12')  # a failing disk's doing
    assert await backend.locate(job) == base.Located(None, launched=None)
    assert list((tmp_path / job.id / "1").iterdir()) == [tmp_path / job.id / "1" / "claim"]
    assert backend.telemetry().read_errors == [("corrupt", 1)]  # the claim, not the keeper
    await backend.close()


async def test_logs_that_cannot_be_read_answer_an_error(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)) as daemon, Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["true"]})
        await client.wait(job["id"])
        stdout = make_settings(short_tmp).local_work_dir() / job["id"] / "1" / "stdout"
        stdout.unlink()
        stdout.mkdir()  # open() now fails with EISDIR: not a missing file
        with pytest.raises(errors.RemoteError) as info:
            [reply async for reply in client.logs(job["id"])]
        assert info.value.remote_code == "logs_unavailable"
        assert "EISDIR" in str(info.value) or "Is a directory" in str(info.value)
        assert (await client.ping())["pong"]
        exported = daemon.metrics.render().decode()
        assert 'orchestrator_local_read_errors_total{errno="EISDIR"} 1.0' in exported


async def test_a_stored_spec_that_cannot_be_launched_fails_at_once_saying_why(
    short_tmp: Path,
) -> None:
    """A spec an older version accepted (a NUL byte in an argument): the keeper's child
    cannot exec it and says why; the job FAILED (126) naming it, not retried (the same launch
    would fail the same way), never left queued for ever, and the keeper runs the next job."""
    config = make_settings(short_tmp)
    store = SqliteStore(config.store, events.Hub())
    await store.open()
    try:
        poison = models.JobSpec.model_construct(command=["echo", "a\x00b"], env={}, overrides={})
        (outcome,) = await store.accept_many([(poison, "local")], None)
        assert isinstance(outcome, tuple)
        poisoned = outcome[0].id
    finally:
        await store.close()
    async with running(config), Client(config.server.socket_path) as client:
        healthy = await client.submit({"command": ["sh", "-c", "exit 4"]})
        async with asyncio.timeout(30):
            job = await client.wait(poisoned)
            assert (await client.wait(healthy["id"]))["exit_code"] == 4
        assert (job["state"], job["exit_code"]) == ("FAILED", 126)
        assert job["reason"] is not None
        assert "null byte" in job["reason"]
        assert job["attempt"] == 1  # not retried: the same launch would fail the same way


def test_a_descriptor_limit_below_what_the_settings_allow_is_said_at_start_up(
    short_tmp: Path,
) -> None:
    """256 connections allowed under a limit of 128 descriptors: at the limit, connections
    would be closed unanswered. The daemon says so once, at start-up, and serves."""
    daemon = DaemonProcess(short_tmp, wrapper=["prlimit", "--nofile=128:128", "--"])
    daemon.start()
    try:
        with daemon.client() as client:
            assert client.call("ping")["pong"] is True
    finally:
        assert daemon.stop() == 0  # its log is flushed at exit
    (warning,) = [e for e in daemon.log_events() if e.get("event") == "daemon.fd_limit_low"]
    assert warning["limit"] == 128
    assert warning["wanted"] > 256
