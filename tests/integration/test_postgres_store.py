"""The daemon on PostgreSQL (`store.url`, issue #16's first part), against a real server
started by the test session: jobs accepted, run and recorded there; a restart on the same
database finds them; a database written by a newer version is refused at start-up; a database
that is unreachable at start-up is said so."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from orchestrator import errors, events
from orchestrator.client import Client
from orchestrator.daemon import Daemon
from orchestrator.store import postgres
from orchestrator.store.postgres import SCHEMA_VERSION, PostgresStore
from orchestrator.testing import make_settings
from tests.support.daemon import running
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.timeout(90)


async def test_jobs_live_in_postgresql_across_a_restart(
    short_tmp: Path, postgres_server: PostgresServer
) -> None:
    url = await postgres_server.new_database()
    settings = make_settings(short_tmp, store={"url": url})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        done = await client.wait((await client.submit({"command": ["true"], "name": "one"}))["id"])
        array = await client.wait(
            (await client.submit({"command": ["true"], "array_size": 3}))["id"]
        )
        ping = await client.ping()
    assert (done["state"], array["state"]) == ("SUCCEEDED", "SUCCEEDED")
    assert (ping["jobs"] or {})["SUCCEEDED"] == 5  # one, the array and its 3 children
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM jobs")
        states = await conn.fetch("SELECT to_state FROM events WHERE job_id = $1", done["id"])
    finally:
        await conn.close()
    assert stored == 5
    assert [r[0] for r in states][-1] == "SUCCEEDED"
    assert not (settings.store.path).exists()  # no SQLite file was made
    async with running(settings), Client(short_tmp / "o.sock") as client:  # a restart
        again = await client.get("one", history=True)
        listed, _ = await client.list_page()
    assert again["id"] == done["id"]
    assert [h["to"] for h in again.get("history", [])][-1] == "SUCCEEDED"
    assert [j["id"] for j in listed] == [array["id"], done["id"]]


async def test_a_newer_schema_is_refused_and_an_unreachable_database_said_so(
    short_tmp: Path, postgres_server: PostgresServer
) -> None:
    url = await postgres_server.new_database()
    async with running(make_settings(short_tmp, store={"url": url})):
        pass
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE meta SET value = $1 WHERE key = 'schema_version'", str(SCHEMA_VERSION + 1)
        )
    finally:
        await conn.close()
    with pytest.raises(errors.StoreTooNew):
        await Daemon(make_settings(short_tmp, store={"url": url})).run()
    nowhere = f"postgresql://nobody:secret@/nodb?host={short_tmp}/no-such-dir"
    with pytest.raises(errors.StoreError) as unreachable:
        await Daemon(make_settings(short_tmp, store={"url": nowhere})).run()
    assert "cannot connect to PostgreSQL" in str(unreachable.value)


def test_a_store_url_that_is_not_postgresql_is_refused(short_tmp: Path) -> None:
    with pytest.raises(Exception, match="postgresql://"):
        make_settings(short_tmp, store={"url": "mysql://x/y"})


async def test_a_database_of_schema_4_is_migrated_at_start_and_its_jobs_go_on(
    short_tmp: Path, postgres_server: PostgresServer
) -> None:
    """A database the previous version wrote (schema 4: no lease, nodes, or notification) is
    brought up to date under the advisory lock by several daemons starting at once, once."""
    url = await postgres_server.new_database()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(postgres.SCHEMA)  # version 4's DDL, whole
        await conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '4')")
        await conn.execute(
            "INSERT INTO jobs (id, backend, spec, state, created_at, updated_at, state_times) "
            "VALUES ('old1', 'local', '{\"command\": [\"true\"]}', 'QUEUED', 1, 1, '{}')"
        )
    finally:
        await conn.close()
    stores = [PostgresStore(url, events.Hub(), node=f"n{i}") for i in range(3)]
    await asyncio.gather(*(store.open() for store in stores))
    for store in stores:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
        tables = {
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'events_notify'"
        )
    finally:
        await conn.close()
    assert (version, triggers) == (str(SCHEMA_VERSION), 1)
    assert {"leases", "nodes"} <= tables
    async with (
        running(make_settings(short_tmp, store={"url": url})),
        Client(short_tmp / "o.sock") as client,
    ):
        old = await client.wait("old1")  # recovered and run by the migrated daemon
    assert old["state"] == "SUCCEEDED"
