"""The local backend when the host misbehaves: a full disk (a small tmpfs, mounted by the test
when root), a job that floods its output, a daemon out of descriptors, a descriptor inherited
above the fd limit. Whatever happens, a job ends with its true outcome, never LOST on a guess."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import settings
from orchestrator.backends import _runner
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support.daemon import DaemonProcess, running, until_state

pytestmark = pytest.mark.timeout(90)

CAP = 1024 * 1024
MARKER = f"\n[orchestrator: output truncated at {CAP} bytes; further output discarded]\n".encode()


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs at `short_tmp/disk`."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = short_tmp / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)


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


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Return once `predicate()` holds (it looks at files a job writes: nothing to wait on)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert predicate(), what


@contextlib.contextmanager
def killed_at_exit(pid: int) -> Iterator[None]:
    """Whatever happens in the block, the process group `pid` leads (a job's runner) is gone
    after it: a failing test leaves no job running on the tmpfs."""
    started = _runner.start_time(pid)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _runner.start_time(pid) == started:  # still that process, not a reused pid
                os.killpg(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


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


async def test_exit_status_recorded_once_the_disk_has_room_again(
    short_tmp: Path, small_disk: Path
) -> None:
    store = {"path": small_disk / "state" / "orchestrator.db"}
    go, pid_file = short_tmp / "go", short_tmp / "job.pid"
    script = f"echo $$ > {pid_file}; while [ ! -e {go} ]; do sleep 0.05; done; exit 5"
    async with running(disk_settings(short_tmp, store=store)), Client(short_tmp / "o.sock") as c:
        job = await c.submit({"command": ["sh", "-c", script]})
        await until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "job start")
        job_pid = int(pid_file.read_text())
        job = await c.get(job["id"])
        assert job["state"] == "RUNNING"
        runner_pid = int(job["info"]["pid"])
        with killed_at_exit(runner_pid):
            filler = small_disk / "filler"
            fill(filler)
            go.touch()
            await until(lambda: gone(job_pid), "the job to exit")
            # The runner cannot write the exit file: it waits, alive; the job is not lost.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert (await c.get(job["id"]))["state"] == "RUNNING"
                assert not gone(runner_pid)
                await asyncio.sleep(0.1)
            filler.unlink()
            final = await c.wait(job["id"])
    assert (final["state"], final["exit_code"], final["reason"]) == ("FAILED", 5, "exit code 5")


async def test_a_runner_that_cannot_claim_its_attempt_fails_the_job_saying_why(
    short_tmp: Path, small_disk: Path
) -> None:
    config = disk_settings(short_tmp, local={"work_dir": small_disk / "jobs"})
    async with running(config), Client(short_tmp / "o.sock") as client:
        (small_disk / "jobs").mkdir(exist_ok=True)
        fill(small_disk / "filler")
        job = await client.submit({"command": ["true"]})
        final = await client.wait(job["id"])
        full = await client.get(job["id"], history=True)
    assert final["state"] == "FAILED"
    assert "No space left on device (ENOSPC)" in final["reason"], final["reason"]
    assert len(full["attempts"]) == 1  # a start failure, not retried in a loop


# -- the daemon out of descriptors ----------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_job_ending_while_the_daemon_is_out_of_descriptors_keeps_its_exit_code(
    short_tmp: Path,
) -> None:
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
    try:
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        with daemon.client() as client:
            job = client.submit(
                {"command": ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; exit 5"]}
            )
            deadline = time.monotonic() + 15
            while client.get(job["id"])["state"] != "RUNNING":
                assert time.monotonic() < deadline, "the job never ran"
                time.sleep(0.02)
        # Connections until the daemon has no descriptor left (refusals are fine).
        deadline = time.monotonic() + 20
        while open_fds(pid) < limit:
            assert time.monotonic() < deadline, f"the daemon holds {open_fds(pid)} descriptors"
            for _ in range(8):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(0.2)
                try:
                    sock.connect(str(daemon.socket_path))
                except OSError:
                    sock.close()
                    continue
                held.append(sock)
            time.sleep(0.05)
        go.touch()  # the job ends now, while the daemon cannot open its exit file
        exit_file = daemon.store_path.parent / "jobs" / job["id"] / "1" / "exit"
        deadline = time.monotonic() + 20
        while not any(e.get("event") == "local.read_failed" for e in daemon.log_events()):
            assert time.monotonic() < deadline, "the daemon never tried to read the exit file"
            assert "LOST" not in daemon.log(), daemon.log()[-3000:]
            time.sleep(0.05)
        assert exit_file.exists()
        read_failed = [e for e in daemon.log_events() if e.get("event") == "local.read_failed"]
        assert read_failed[0]["errno"] == "EMFILE"
        assert read_failed[0]["job_id"] == job["id"]
        for sock in held:
            sock.close()
        held.clear()
        with daemon.client() as client:
            final = client.wait(job["id"])
            history = client.get(job["id"], history=True)["history"]
        assert (final["state"], final["exit_code"]) == ("FAILED", 5)
        assert "LOST" not in [event["to"] for event in history]
    finally:
        for sock in held:
            sock.close()
        go.touch()
        daemon.close()


# -- a descriptor inherited above the soft fd limit ------------------------------------------


def test_a_descriptor_inherited_above_the_fd_limit_is_not_passed_to_jobs(short_tmp: Path) -> None:
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
        daemon.start()
        assert daemon.proc is not None
        assert str(high) in os.listdir(f"/proc/{daemon.proc.pid}/fd")  # the daemon holds it
        with daemon.client() as client:
            job = client.submit({"command": ["ls", "/proc/self/fd"]})
            final = client.wait(job["id"])
            listed = "".join(r.get("data", "") for r in client.stream("logs", job_id=job["id"]))
        assert final["state"] == "SUCCEEDED", final
        fds = sorted(int(fd) for fd in listed.split())
        assert high not in fds
        assert fds[:3] == [0, 1, 2]
        assert len(fds) == 4, fds  # and the descriptor `ls` opened to list the directory
    finally:
        daemon.close()
        for fd in (read_end, write_end, high):
            with contextlib.suppress(OSError):
                os.close(fd)
