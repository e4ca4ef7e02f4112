"""`orchestrator store move` (issue #16): an SQLite store moved into PostgreSQL, against real
SQLite files and the test session's real PostgreSQL server. A daemon then started on the
database finds every job as it was, with its history, numbers new events after the moved ones
and owns the unfinished local jobs. A store a daemon serves, a file that is not a store, a
store written by a newer version and a database that already holds jobs are refused, with
nothing written; a store written by an older version moves whole and is left as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orchestrator import events, models
from orchestrator.client import Client
from orchestrator.settings import StoreSettings
from orchestrator.store import SCHEMA_VERSION, SqliteStore
from orchestrator.store.move import MoveReport, move
from orchestrator.store.postgres import PostgresStore
from tests.support.daemon import DaemonProcess
from tests.support.postgres import PostgresServer
from tests.support.waits import wait_for

pytestmark = pytest.mark.timeout(90)


def store_move(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`orchestrator store move ARGS` run to its end, its output kept."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "store", "move", *args],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def with_password(url: str) -> str:
    """The test server's URL with a password in it (the server trusts local connections, so
    it is never asked for): what the command prints must leave it out."""
    return url.replace("@/", ":s3cret@/", 1)


async def fetch(url: str, query: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(query)]
    finally:
        await conn.close()


def sqlite_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def small_store(path: Path, count: int = 2) -> list[models.Job]:
    """A store at `path` holding `count` new local jobs."""
    settings = StoreSettings(path=path, synchronous="NORMAL", min_free_bytes=0)
    store = SqliteStore(settings, events.Hub())
    await store.open()
    try:
        spec = models.JobSpec(command=["true"])
        outcomes = await store.accept_many([(spec, "local")] * count, None)
    finally:
        await store.close()
    return [outcome[0] for outcome in outcomes if isinstance(outcome, tuple)]


async def test_a_daemons_store_moves_whole_and_a_daemon_on_postgresql_goes_on_with_it(
    daemon: DaemonProcess, postgres_server: PostgresServer
) -> None:
    daemon.start()
    with daemon.client() as client:
        first = client.submit({"command": ["true"], "name": "first", "labels": {"team": "a"}})
        failed = client.submit({"command": ["false"]})
        after = client.submit(
            {"command": ["true"], "name": "after", "depends_on": ["first"], "labels": {"k": "v"}}
        )
        sleeper = client.submit({"command": ["sleep", "1000"], "name": "sleeper"})
        ids = [first["id"], failed["id"], after["id"], sleeper["id"]]
        for job_id in ids[:3]:
            client.wait(job_id)
        wait_for(lambda: client.get(sleeper["id"])["state"] == "RUNNING", "the sleeper to run")
        before = {job_id: client.get(job_id, history=True) for job_id in ids}
        listed_before = client.call("list", limit=100)["jobs"]
    assert daemon.stop() == 0  # the sleeper runs on, as it does across a restart
    assert [before[i]["state"] for i in ids] == ["SUCCEEDED", "FAILED", "SUCCEEDED", "RUNNING"]
    assert before[ids[1]]["exit_code"] == 1
    old_events = sqlite_rows(daemon.store_path, "SELECT seq, job_id, to_state FROM events")
    counts = [
        sqlite_rows(daemon.store_path, f"SELECT count(*) FROM {table}")[0][0]
        for table in ("events", "attempts", "definitions", "dependencies")
    ]
    assert counts[0] == len(old_events) >= 10
    assert counts[3] == 1  # after → first
    last_seq = max(seq for seq, _, _ in old_events)

    url = await postgres_server.new_database()
    moved = daemon.cli("store", "move", "--to", with_password(url))  # --from: store.path
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == (
        f"moved 4 jobs ({counts[0]} events, {counts[1]} attempts, {counts[2]} definitions, "
        f"{counts[3]} dependencies) from {daemon.store_path} to {url}\n"
    )
    assert "s3cret" not in moved.stdout + moved.stderr
    assert sqlite_rows(daemon.store_path, "SELECT count(*) FROM jobs") == [(4,)]  # kept
    node = socket.gethostname()  # cluster.node's default
    owned = await fetch(url, "SELECT id, info::jsonb ->> 'owner' FROM jobs ORDER BY id")
    assert dict(owned) == {job_id: (node if job_id == sleeper["id"] else None) for job_id in ids}

    daemon.start({"ORCHESTRATOR__STORE__URL": url})
    try:
        with daemon.client() as client:
            for job_id in ids[:3]:  # every finished job as it was, with its history
                assert client.get(job_id, history=True) == before[job_id]
            running = client.get(sleeper["id"], history=True)
            assert running["info"]["owner"] == node
            assert {**running, "info": {}} == {**before[sleeper["id"]], "info": {}}
            listed = client.call("list", limit=100)["jobs"]
            assert [(j["id"], j["state"], j["name"], j["exit_code"]) for j in listed] == [
                (j["id"], j["state"], j["name"], j["exit_code"]) for j in listed_before
            ]
            assert client.get("after", history=True)["depends_on"] == [first["id"]]
            assert before[ids[0]]["dependents"] == [after["id"]]
            new = client.submit({"command": ["true"], "name": "new"})
            assert client.wait(new["id"])["state"] == "SUCCEEDED"
        seen: list[tuple[int, str, str]] = []
        async with Client(daemon.socket_path) as watcher:
            async for reply in watcher.watch(since=0):  # the moved events, then the new ones
                if (event := reply.get("event")) is not None:
                    seen.append((event["seq"], event["job_id"], event["to"]))
                    if (event["job_id"], event["to"]) == (new["id"], "SUCCEEDED"):
                        break
        assert seen[: len(old_events)] == old_events
        fresh = seen[len(old_events) :]
        assert {job_id for _, job_id, _ in fresh} == {new["id"]}
        assert all(seq > last_seq for seq, _, _ in fresh)
    finally:
        with daemon.client() as client:
            client.cancel(sleeper["id"])
            assert client.wait(sleeper["id"])["state"] == "CANCELLED"
        assert daemon.stop() == 0


async def test_a_store_written_by_an_older_version_moves_whole_and_is_left_as_it_was(
    short_tmp: Path, postgres_server: PostgresServer
) -> None:
    path = short_tmp / "old.db"
    settings = StoreSettings(path=path, synchronous="NORMAL", min_free_bytes=0)
    store = SqliteStore(settings, events.Hub())
    await store.open()
    try:
        spec = models.JobSpec(command=["true"], name="base")
        (base,) = (
            o[0] for o in await store.accept_many([(spec, "local")], None) if isinstance(o, tuple)
        )
        accepted = await store.accept_many(
            [
                (models.JobSpec(command=["x"], depends_on=[base.id]), "local"),
                (models.JobSpec(command=["y"]), "ecs"),
            ],
            None,
        )
        waiting, remote = (o[0] for o in accepted if isinstance(o, tuple))
        assert await store.begin_attempt(base.id) is not None
        await store.record_submitted(base.id, external_id="pid-1", state=models.JobState.RUNNING)
        await store.transition(
            base.id,
            models.JobState.RUNNING,
            models.JobState.FAILED,
            exit_code=3,
            info={"failure": "user"},
        )
        jobs = {job.id: await store.get(job.id) for job in (base, waiting, remote)}
        history = await store.events_since(0)
        attempts = await store.attempts(base.id)
    finally:
        await store.close()
    conn = sqlite3.connect(path)  # as version 1 wrote it
    try:
        conn.execute("ALTER TABLE events DROP COLUMN failure")
        conn.execute("DROP INDEX jobs_name")
        conn.execute("ALTER TABLE jobs DROP COLUMN name")
        conn.execute("DROP TABLE definitions")
        conn.execute("DROP TABLE dependencies")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.commit()
    finally:
        conn.close()
    kept = digest(path)

    url = await postgres_server.new_database()
    report = await move(path, url, node="node-a")

    assert report == MoveReport(
        jobs=3, events=len(history), attempts=1, definitions=0, dependencies=1
    )
    assert digest(path) == kept  # not migrated in place: still the backup it was
    assert sqlite_rows(path, "SELECT value FROM meta") == [("1",)]
    moved = PostgresStore(url, events.Hub())
    await moved.open()
    try:
        assert await moved.get(base.id) == jobs[base.id]  # finished: as it was
        assert await moved.get(remote.id) == jobs[remote.id]  # not local: nobody's
        owned = await moved.get(waiting.id)
        assert owned.info == {**jobs[waiting.id].info, "owner": "node-a"}
        assert dataclasses.replace(owned, info={}) == dataclasses.replace(jobs[waiting.id], info={})
        # Version 1 kept no failure classes; its dependencies come from the specs.
        assert await moved.events_since(0) == [
            dataclasses.replace(event, failure=None) for event in history
        ]
        assert await moved.attempts(base.id) == attempts
        assert await moved.dependents(base.id) == [waiting.id]
        assert [j.id for j in await moved.list_jobs()] == sorted(jobs, reverse=True)
    finally:
        await moved.close()


async def test_a_database_that_already_holds_jobs_is_refused_and_left_as_it_was(
    short_tmp: Path, postgres_server: PostgresServer
) -> None:
    path = short_tmp / "jobs.db"
    await small_store(path, 3)
    url = await postgres_server.new_database()
    env = {"ORCHESTRATOR__STORE__PATH": str(path), "ORCHESTRATOR__STORE__URL": url}
    first = store_move(env=env)  # --from and --to: the configured store.path and store.url
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("moved 3 jobs (3 events, 0 attempts, ")
    before = await fetch(url, "SELECT id, info FROM jobs ORDER BY id")

    again = store_move("--node", "elsewhere", env=env)
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr == (
        f"orchestrator: not moved: {url} already holds 3 jobs and 3 events: a store moves only "
        "into a database without jobs (nothing is merged)\n"
    )
    assert await fetch(url, "SELECT id, info FROM jobs ORDER BY id") == before
    assert await fetch(url, "SELECT count(*) FROM events") == [(3,)]

    missing = store_move(env={"ORCHESTRATOR__STORE__PATH": str(path)})
    assert missing.returncode == 2
    assert "no database to move into: --to postgresql://" in missing.stderr


async def test_a_store_a_daemon_serves_is_refused_until_it_stops(
    daemon: DaemonProcess, postgres_server: PostgresServer
) -> None:
    daemon.start()
    with daemon.client() as client:
        client.wait(client.submit({"command": ["true"]})["id"])
    url = await postgres_server.new_database()

    refused = daemon.cli("store", "move", "--to", url)

    assert refused.returncode == 1
    assert daemon.proc is not None
    assert refused.stderr == (
        f"orchestrator: not moved: store {daemon.store_path} is in use by another orchestrator "
        f"daemon (pid {daemon.proc.pid}); one store is served by one daemon at a time\n"
    )
    assert await fetch(url, "SELECT to_regclass('jobs') IS NULL") == [(True,)]  # untouched
    with daemon.client() as client:
        assert client.ping()["pong"] is True  # and the daemon serves on
    assert daemon.stop() == 0
    moved = daemon.cli("store", "move", "--to", url)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.startswith("moved 1 jobs (")


async def test_what_is_not_a_store_or_is_too_new_is_refused_and_left_as_it_was(
    short_tmp: Path, postgres_server: PostgresServer
) -> None:
    url = await postgres_server.new_database()
    text = short_tmp / "notes.txt"
    text.write_text("not a database\n")
    other = short_tmp / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    newer = short_tmp / "newer.db"
    await small_store(newer, 1)
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    files = {path: digest(path) for path in (text, other, newer)}

    said = {
        path: store_move("--from", str(path), "--to", url)
        for path in (short_tmp / "nothing.db", text, other, newer)
    }

    assert {result.returncode for result in said.values()} == {1}
    assert [result.stderr for result in said.values()] == [
        f"orchestrator: not moved: {short_tmp / 'nothing.db'}: no such file: there is no "
        "SQLite store there\n",
        f"orchestrator: not moved: {text} is not an orchestrator store (not an SQLite "
        "database); refusing to use it: point store.path at another file, or move this one "
        "away\n",
        f"orchestrator: not moved: {other} is not an orchestrator store (an SQLite database "
        "without orchestrator's schema_version; its tables: things); refusing to use it: point "
        "store.path at another file, or move this one away\n",
        f"orchestrator: not moved: store {newer} has schema_version {SCHEMA_VERSION + 1}, "
        f"newer than this orchestrator understands ({SCHEMA_VERSION}): run the newer version "
        "(downgrading is not supported)\n",
    ]
    assert {path: digest(path) for path in files} == files
    assert not (short_tmp / "notes.txt.lock").exists()  # refused before its lock was taken
    assert await fetch(url, "SELECT to_regclass('jobs') IS NULL") == [(True,)]
