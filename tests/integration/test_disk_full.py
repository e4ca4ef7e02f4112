"""A full disk under the store, on a real small tmpfs (root only): new jobs are refused with
`store_full`, the daemon says it is degraded (ping, /metrics) and why, the jobs it already
accepted are still tracked and recorded in the reserve, a cancel still stops its job when
nothing can be written, and all is well again once space is freed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors
from orchestrator.client import SyncClient
from orchestrator.testing import make_settings
from tests.support import tmpfs
from tests.support.daemon import DaemonProcess, running
from tests.support.waits import wait_for

pytestmark = pytest.mark.timeout(120)

FS_SIZE = "16m"
MIN_FREE = 6 * 2**20


@pytest.fixture
def small_fs(short_tmp: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at `short_tmp/fs`."""
    with tmpfs.mounted(short_tmp / "fs", FS_SIZE) as mount_point:
        yield mount_point


@pytest.fixture
def daemon(short_tmp: Path, small_fs: Path) -> Iterator[DaemonProcess]:
    """The store on the small file system; the jobs' own files off it."""
    proc = DaemonProcess(
        short_tmp,
        env={
            "ORCHESTRATOR__STORE__PATH": str(small_fs / "state" / "orchestrator.db"),
            "ORCHESTRATOR__STORE__MIN_FREE_BYTES": str(MIN_FREE),
            "ORCHESTRATOR__LOCAL__WORK_DIR": str(short_tmp / "jobs"),
            "ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": "1",
            "ORCHESTRATOR__METRICS__LISTEN": "127.0.0.1:0",
        },
    )
    proc.store_path = small_fs / "state" / "orchestrator.db"
    yield proc
    proc.close()


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(fs: Path, leave_bytes: int) -> Path:
    """A file that leaves about `leave_bytes` free on `fs`; with 0, written until the disk
    refuses even one byte more."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\0" * 2**20
        while (left := free_bytes(fs) - leave_bytes) > 0:
            os.write(fd, chunk[: min(len(chunk), left)])
        if leave_bytes == 0:
            for size in (2**16, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, chunk[:size])
    finally:
        os.close(fd)
    return filler


def ping(client: SyncClient) -> dict[str, Any]:
    return client.call("ping")


def reasons(reply: dict[str, Any]) -> set[str]:
    return {problem["reason"] for problem in reply["problems"]}


def ping_when(client: SyncClient, expected: set[str]) -> dict[str, Any] | None:
    """The ping reply if its problems are exactly `expected`, else None."""
    reply = ping(client)
    return reply if reasons(reply) == expected else None


def all_running(client: SyncClient, job_ids: list[str]) -> bool:
    return all(client.get(job_id)["state"] == "RUNNING" for job_id in job_ids)


def refusal(call: Callable[[], object]) -> errors.RemoteError:
    with pytest.raises(errors.RemoteError) as caught:
        call()
    return caught.value


def scrape(daemon: DaemonProcess) -> dict[str, float]:
    address = next(
        e["address"] for e in daemon.log_events() if e.get("event") == "metrics.listening"
    )
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith(("orchestrator_degraded", "orchestrator_store_free")):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def gate_job(gate: Path, exit_code: int) -> dict[str, Any]:
    """A job that runs until `gate` exists, then exits with `exit_code`."""
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; exit {exit_code}"
    return {"command": ["sh", "-c", script]}


def test_short_of_space_new_jobs_are_refused_accepted_ones_finish_and_all_recovers(
    daemon: DaemonProcess, small_fs: Path, short_tmp: Path
) -> None:
    daemon.env["ORCHESTRATOR__LOCAL__MAX_CONCURRENCY"] = "2"
    daemon.start()
    gate = short_tmp / "gate"
    with daemon.client() as client:
        assert (ping(client)["status"], ping(client)["problems"]) == ("ok", [])
        running = [client.submit(gate_job(gate, 3))["id"] for _ in range(2)]
        queued = client.submit(gate_job(gate, 4))["id"]  # waits for a slot: accepted, QUEUED
        wait_for(lambda: all_running(client, running), "the jobs to run")

        filler = fill(small_fs, leave_bytes=MIN_FREE // 2)  # below the threshold, not at zero
        degraded = wait_for(lambda: ping_when(client, {"store_low_space"}), "low space")
        assert reasons(degraded) == {"store_low_space"}
        (problem,) = degraded["problems"]
        assert f"store.min_free_bytes={MIN_FREE}" in problem["message"]
        assert str(daemon.store_path) in problem["message"]
        assert degraded["store_free_bytes"] < MIN_FREE

        refused = refusal(lambda: client.call("submit", job={"command": ["true"]}))
        assert refused.remote_code == "store_full"
        assert f"store.min_free_bytes={MIN_FREE}" in refused.message
        assert "bytes" in refused.message
        assert str(daemon.store_path) in refused.message
        bulk = refusal(lambda: client.call("submit_many", jobs=[{"command": ["true"]}] * 3))
        assert bulk.remote_code == "store_full"

        cli = subprocess.run(
            [sys.executable, "-m", "orchestrator", "ping", "--socket", str(daemon.socket_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0, cli.stderr  # degraded, but serving: still healthy
        assert "; degraded; " in cli.stdout
        assert cli.stderr.startswith("orchestrator: degraded: the store ")

        metrics = scrape(daemon)
        assert metrics['orchestrator_degraded{reason="store_low_space"}'] == 1
        assert metrics['orchestrator_degraded{reason="store_commit_failed"}'] == 0
        assert 0 < metrics["orchestrator_store_free_bytes"] < MIN_FREE

        # What was accepted goes on in the reserve: the running jobs end and are recorded,
        # the queued one is launched and ends too.
        gate.touch()
        finals = [client.wait(job_id) for job_id in [*running, queued]]
        assert [(job["state"], job["exit_code"]) for job in finals] == [
            ("FAILED", 3),
            ("FAILED", 3),
            ("FAILED", 4),
        ]
        assert reasons(ping(client)) == {"store_low_space"}  # never a failed commit

        filler.unlink()
        wait_for(lambda: ping(client)["status"] == "ok", "ping to be ok again")
        assert ping(client)["problems"] == []
        assert client.wait(client.submit({"command": ["true"]})["id"])["state"] == "SUCCEEDED"
        metrics = scrape(daemon)
        assert metrics['orchestrator_degraded{reason="store_low_space"}'] == 0
        assert metrics["orchestrator_store_free_bytes"] > MIN_FREE


def test_with_the_disk_full_cancel_still_stops_jobs_and_is_recorded_once_space_is_freed(
    daemon: DaemonProcess, small_fs: Path, short_tmp: Path
) -> None:
    daemon.start()
    ran = short_tmp / "queued-job-ran"
    with daemon.client() as client:
        sleeper = client.submit({"command": ["sleep", "1000"]})["id"]
        wait_for(lambda: client.get(sleeper)["state"] == "RUNNING", "the job to run")
        pid = client.get(sleeper)["info"]["pid"]
        queued = client.submit({"command": ["touch", str(ran)]})["id"]  # behind it: QUEUED

        filler = fill(small_fs, leave_bytes=0)
        assert free_bytes(small_fs) == 0

        # Nothing can be written: the queued job's cancel and the running job's cancel are
        # both acted on at once, and say they are not recorded yet.
        first = client.call("cancel", job_id=queued)
        assert (first["recorded"], first["job"]["stop_reason"]) == (False, "cancel")
        second = client.call("cancel", job_id=sleeper)
        assert (second["recorded"], second["job"]["stop_reason"]) == (False, "cancel")
        wait_for(lambda: not group_alive(pid), "the cancelled job's processes to be gone")

        both = {"store_commit_failed", "store_low_space"}  # free space is looked at each second
        degraded = wait_for(lambda: ping_when(client, both), "both problems")
        assert degraded["status"] == "degraded"
        failed = next(p for p in degraded["problems"] if p["reason"] == "store_commit_failed")
        assert "full" in failed["message"]
        assert scrape(daemon)['orchestrator_degraded{reason="store_commit_failed"}'] == 1
        assert client.get(sleeper)["state"] == "RUNNING"  # as recorded, for now

        filler.unlink()
        final = client.wait(sleeper)
        assert (final["state"], final["reason"]) == ("CANCELLED", "cancelled by request")
        client.wait(queued)
        final_queued = client.get(queued, history=True)
        assert (final_queued["state"], final_queued["reason"]) == (
            "CANCELLED",
            "cancelled by request",
        )
        assert final_queued["attempts"] == []  # never launched
        wait_for(lambda: ping(client)["status"] == "ok", "ping to be ok again")
        metrics = scrape(daemon)
        assert metrics['orchestrator_degraded{reason="store_commit_failed"}'] == 0
    assert not ran.exists()
    events = [e["event"] for e in daemon.log_events()]
    assert events.count("job.cancel_unrecorded") == 2
    assert events.count("job.stop_recorded") >= 1


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_timeout_that_expires_with_the_disk_full_still_stops_the_job(
    daemon: DaemonProcess, small_fs: Path
) -> None:
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["sleep", "1000"], "timeout_s": 3})["id"]
        wait_for(lambda: client.get(job_id)["state"] == "RUNNING", "the job to run")
        pid = client.get(job_id)["info"]["pid"]
        filler = fill(small_fs, leave_bytes=0)  # well before the timeout expires

        wait_for(lambda: not group_alive(pid), "the timed-out job to be stopped")
        assert client.get(job_id)["state"] == "RUNNING"  # nothing could be recorded yet
        filler.unlink()
        final = client.wait(job_id)
    assert final["state"] == "FAILED"
    assert final["reason"] is not None
    assert final["reason"].startswith("timeout: ran longer than timeout_s=3")
    unrecorded = [e for e in daemon.log_events() if e.get("event") == "job.stop_unrecorded"]
    assert [(e["job_id"], e["kind"]) for e in unrecorded] == [(job_id, "timeout")]


async def test_the_systemd_status_line_says_degraded_and_why(
    small_fs: Path, short_tmp: Path
) -> None:
    settings = make_settings(
        short_tmp,
        store={"path": small_fs / "state" / "orchestrator.db", "min_free_bytes": MIN_FREE},
        local={"work_dir": short_tmp / "jobs"},
    )
    async with running(settings) as daemon:
        assert daemon.status_line() == "ready; local: 0 in flight, 0 queued"
        filler = fill(small_fs, leave_bytes=MIN_FREE // 2)
        line = await status_until(daemon.status_line, "degraded (")
        assert f"below store.min_free_bytes={MIN_FREE}" in line
        assert line.endswith("); local: 0 in flight, 0 queued")
        filler.unlink()
        await status_until(daemon.status_line, "ready; ")


async def status_until(status_line: Callable[[], str], prefix: str, timeout_s: float = 20.0) -> str:
    """The status line, once it starts with `prefix` (free space is looked at each second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (line := status_line()).startswith(prefix):
            return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"the status line never started with {prefix!r}: {status_line()!r}")
