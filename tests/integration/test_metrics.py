"""The Prometheus endpoint, scraped over HTTP from a running daemon."""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support.daemon import running

pytestmark = pytest.mark.timeout(60)


def scrape(address: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        body: bytes = reply.read()
    return body.decode()


def sample(text: str, name: str) -> float:
    """The value of the sample line starting with `name` (labels included)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in:\n{text}")


async def test_metrics_endpoint_reports_jobs_latencies_and_rejections(short_tmp: Path) -> None:
    settings = make_settings(
        short_tmp, metrics={"listen": "127.0.0.1:0"}, server={"allowed_uids": [os.getuid()]}
    )
    async with running(settings) as daemon, Client(settings.server.socket_path) as client:
        assert daemon.metrics_address is not None
        for command in (["true"], ["true"], ["false"]):
            await client.wait((await client.submit({"command": command}))["id"])
        retried: dict[str, Any] = {
            "command": ["sh", "-c", "exit 75"],
            "retry": {"exit_codes": [75]},
        }
        retried["retry"] |= {"attempts": 2, "backoff_s": 0}
        await client.wait((await client.submit(retried))["id"])
        text = await asyncio.to_thread(scrape, daemon.metrics_address)
        missing = await asyncio.to_thread(_status_of, daemon.metrics_address, "/nope")
    assert sample(text, 'orchestrator_jobs_submitted_total{backend="local"}') == 4
    succeeded = 'orchestrator_jobs_finished_total{backend="local",failure="",state="SUCCEEDED"}'
    assert sample(text, succeeded) == 2
    failed = 'orchestrator_jobs_finished_total{backend="local",failure="user",state="FAILED"}'
    assert sample(text, failed) == 2  # their own non-zero exit; a retried job finishes once
    assert sample(text, 'orchestrator_jobs_retried_total{backend="local",failure="user"}') == 1
    assert sample(text, 'orchestrator_jobs{state="SUCCEEDED"}') == 2
    assert sample(text, 'orchestrator_jobs{state="QUEUED"}') == 0
    assert sample(text, 'orchestrator_dispatch_seconds_count{backend="local"}') == 5  # attempts
    assert sample(text, 'orchestrator_detection_lag_seconds_count{backend="local"}') == 4
    assert 'orchestrator_build_info{python="' in text
    assert "job_id" not in text  # no per-job labels
    assert missing == 404


def _status_of(address: str, path: str) -> int:
    try:
        scrape(address, path)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


async def test_a_flood_of_idle_or_oversized_scrapers_holds_nothing_and_scrapes_go_on(
    short_tmp: Path,
) -> None:
    """Any local user can reach the port: connections past the cap are closed at once, a
    request line over the reader's limit ends its connection, and a real scrape still works."""
    settings = make_settings(short_tmp, metrics={"listen": "127.0.0.1:0"})
    async with running(settings) as daemon:
        assert daemon.metrics_address is not None
        host, port = daemon.metrics_address.rsplit(":", 1)
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(100)]
        huge_reader, huge = await asyncio.open_connection(host, int(port))
        huge.write(b"GET /" + b"x" * 200_000)  # no newline: past the 64 KiB line limit
        try:
            async with asyncio.timeout(5):  # well inside the 10 s a connection may live
                closed = sum([await _closed(reader) for reader, _ in idle[16:]])
                assert await _closed(huge_reader)
            assert closed == len(idle) - 16
            for _, writer in idle[:16]:  # the flood ends: its slots come back for scrapers
                writer.close()
            text = await asyncio.to_thread(scrape, daemon.metrics_address)
            assert "orchestrator_build_info" in text
        finally:
            for _, writer in [*idle, (huge_reader, huge)]:
                writer.close()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server ended the connection without a reply (EOF, or a reset for one that
    had unread bytes)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True
