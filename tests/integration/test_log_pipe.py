"""A stdout that breaks or fills costs log lines only, never a request, a dispatch or a shutdown:
`orchestrator serve | head -n 1`, and a stdout nobody reads. The lines lost are counted in
/metrics and reported once on stderr."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog

from orchestrator.client import SyncClient
from orchestrator.testing import make_settings
from tests.support.daemon import DaemonProcess, running

pytestmark = pytest.mark.timeout(120)

WAIT_S = 20.0


class PipedDaemon(DaemonProcess):
    """`orchestrator serve` with stdout the write end of a pipe whose read end the test holds,
    stderr in `root/stderr.log`, and /metrics on a port of its own."""

    def __init__(self, root: Path) -> None:
        self.metrics_address = f"127.0.0.1:{free_port()}"
        super().__init__(root, env={"ORCHESTRATOR__METRICS__LISTEN": self.metrics_address})
        self.stderr_path = root / "stderr.log"

    def start_piped(self, extra_env: dict[str, str] | None = None) -> int:
        """Start the daemon; return the read end of its stdout (the caller closes it)."""
        read_end, write_end = os.pipe()
        self.starts += 1
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "serve"],
                env={**self.env, **(extra_env or {})},
                stdout=write_end,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        os.close(write_end)
        return read_end

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def client(self) -> SyncClient:
        return SyncClient(self.socket_path, timeout_s=WAIT_S)

    def dropped(self, reason: str) -> float:
        """orchestrator_log_lines_dropped_total{reason} as /metrics reports it now."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT_S) as reply:
            text: str = reply.read().decode()
        prefix = f'orchestrator_log_lines_dropped_total{{reason="{reason}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line.removeprefix(prefix))
        return 0.0

    def drop_reports(self) -> list[str]:
        return [line for line in self.log().splitlines() if "dropping log lines" in line]


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[PipedDaemon]:
    proc = PipedDaemon(short_tmp)
    yield proc
    proc.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def first_line(fd: int, timeout_s: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line on stdout within {timeout_s}s"
        chunk = os.read(fd, 65536)
        assert chunk, "stdout closed before its first line"
        data += chunk
    return data.split(b"\n", 1)[0]


def run_jobs(client: SyncClient) -> None:
    """Local jobs are dispatched and end with their own exit code; ping answers."""
    ok = client.submit({"command": ["true"]})
    failing = client.submit({"command": ["sh", "-c", "exit 3"]})
    for job, expected in ((ok, ("SUCCEEDED", 0)), (failing, ("FAILED", 3))):
        final = client.wait(job["id"])
        assert (final["state"], final["exit_code"]) == expected
    assert client.call("ping")["ok"]


def test_a_stdout_closed_after_its_first_line_costs_log_lines_only(daemon: PipedDaemon) -> None:
    read_end = daemon.start_piped()
    assert orjson.loads(first_line(read_end, WAIT_S))["event"]  # a log line
    os.close(read_end)  # what `head -n 1` does next
    daemon.wait_ready()
    with daemon.client() as client:
        for _ in range(3):
            run_jobs(client)
    assert daemon.dropped("epipe") > 0
    assert daemon.stop(signal.SIGTERM, timeout_s=WAIT_S) == 0, daemon.log()
    (report,) = daemon.drop_reports()
    assert 'orchestrator_log_lines_dropped_total{reason="epipe"}' in report


def test_a_stdout_nobody_reads_costs_log_lines_only(daemon: PipedDaemon) -> None:
    read_end = daemon.start_piped({"ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": "1"})
    try:  # the read end stays open and unread: the pipe fills, then the sink's queue
        daemon.wait_ready()
        with daemon.client() as client:
            blocker = client.submit({"command": ["sleep", "60"]})  # holds the one slot
            # Jobs that wait behind it and expire: three log lines each, and no process.
            filler = {"command": ["true"], "queue_timeout_s": 0.01}
            for _ in range(40):
                replies = client.call("submit_many", jobs=[filler] * 1000)["results"]
                assert len(replies) == 1000
                if daemon.dropped("queue_full") > 0:
                    break
            assert daemon.dropped("queue_full") > 0
            client.cancel(blocker["id"])
            assert client.wait(blocker["id"])["state"] == "CANCELLED"
            run_jobs(client)
        assert daemon.stop(signal.SIGTERM, timeout_s=WAIT_S) == 0, daemon.log()
    finally:
        os.close(read_end)
    (report,) = daemon.drop_reports()
    assert 'orchestrator_log_lines_dropped_total{reason="queue_full"}' in report


async def test_the_signal_handler_only_sets_flags_and_the_signal_is_logged_after(
    short_tmp: Path,
) -> None:
    with structlog.testing.capture_logs() as logged:
        async with running(make_settings(short_tmp)) as daemon:
            before = len(logged)
            daemon._on_signal(signal.SIGTERM)  # what the event loop calls on the signal
            daemon._on_signal(signal.SIGINT)
            assert logged[before:] == []  # no logging inside the handler
    events = [e["event"] for e in logged]
    signals = [(e["signal"], e["count"]) for e in logged if e["event"] == "daemon.signal"]
    assert signals == [("SIGTERM", 1), ("SIGINT", 2)]
    assert events.index("daemon.signal") < events.index("daemon.stopping")
    assert events[-1] == "daemon.stopped"
