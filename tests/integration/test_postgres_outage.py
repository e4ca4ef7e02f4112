"""PostgreSQL going away under a running daemon (issue #16, point 5, as far as this stop goes):
while the server is down, a submission is refused with the store's error (never acknowledged
and lost) and `ping` says the daemon is degraded; once the server is back the daemon carries on
by itself — new connections, submissions accepted and run — and what was acknowledged before is
all there. A server of the test's own, so that stopping it touches no other test."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import errors
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support import postgres
from tests.support.daemon import running

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def own_server(postgres_server: postgres.PostgresServer) -> Iterator[postgres.PostgresServer]:
    """A second server, this test's alone (the session's proves PostgreSQL is installed)."""
    root = Path(tempfile.mkdtemp(prefix="orc-pg-own-", dir="/tmp"))
    root.chmod(0o755)
    server = postgres.PostgresServer(root, postgres_server.bin)
    server.start(durable=True)  # stopped as a crash would stop it: commits must survive that
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_restarted_database_is_ridden_out_and_nothing_acknowledged_is_lost(
    short_tmp: Path, own_server: postgres.PostgresServer
) -> None:
    url = await own_server.new_database()
    async with (
        running(make_settings(short_tmp, store={"url": url})),
        Client(short_tmp / "o.sock") as client,
    ):
        before = await client.wait((await client.submit({"command": ["true"]}))["id"])
        await asyncio.to_thread(own_server.stop)
        with pytest.raises(errors.RemoteError) as refused:
            await client.submit({"command": ["true"], "name": "during"})
        down = await client.ping()
        await asyncio.to_thread(own_server.start, durable=True)
        after = None
        for _ in range(100):  # the pool makes new connections by itself
            try:
                after = await client.wait((await client.submit({"command": ["true"]}))["id"])
                break
            except errors.RemoteError:
                await asyncio.sleep(0.1)
        listed, _ = await client.list_page()
        up = await client.ping()
    assert before["state"] == "SUCCEEDED"
    assert refused.value.code == "store_unavailable", refused.value
    assert "PostgreSQL cannot be reached" in refused.value.message
    assert down["status"] == "degraded"
    assert after is not None
    assert after["state"] == "SUCCEEDED"
    assert {j["id"] for j in listed} == {before["id"], after["id"]}  # "during" never was
    assert up["status"] == "ok"


async def test_a_wait_begun_while_the_database_is_away_waits_for_it(
    short_tmp: Path, own_server: postgres.PostgresServer
) -> None:
    """`wait` (and `watch`, `logs`) outlive the database being away as they outlive a daemon
    restart: `store_unavailable` is tried again within `reconnect_s`."""
    url = await own_server.new_database()
    async with (
        running(make_settings(short_tmp, store={"url": url})),
        Client(short_tmp / "o.sock") as client,
    ):
        job = await client.submit({"command": ["true"]})
        await asyncio.to_thread(own_server.stop)
        with pytest.raises(errors.RemoteError) as said:
            await client.get(job["id"])  # a plain read says so at once
        waiting = asyncio.create_task(client.wait(job["id"]))
        await asyncio.sleep(1.0)  # the wait is being refused meanwhile, and tries again
        assert not waiting.done()
        await asyncio.to_thread(own_server.start, durable=True)
        final = await asyncio.wait_for(waiting, 60)
    assert said.value.code == "store_unavailable"
    assert final["state"] == "SUCCEEDED"
