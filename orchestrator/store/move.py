"""Moving an SQLite store into PostgreSQL (`orchestrator store move`, issue #16): every job, its
events (keeping their numbers), attempts, task definitions and dependencies, copied in one
PostgreSQL transaction, so the database holds all of the store or none of it.

The SQLite file is held the whole time under the lock a daemon takes (`schema.lock`): a daemon
serving it refuses the move, and none can start on it meanwhile. It is checked as a daemon
checks it (an orchestrator store, not written by a newer version, intact) and read, never
written: a store written by an older version is brought up to date in a copy in memory, by the
daemon's own migrations, and the file is left as it was (a backup). The database must hold no
jobs: a store is never merged into a cluster's. Events go on being numbered after the moved
ones. The unfinished local jobs belong to `node`: in a cluster of daemons sharing the database a
local job belongs to the daemon that accepted it (`info["owner"]`), here the one on the host the
SQLite store was on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from orchestrator import errors, events, models
from orchestrator.settings import without_password
from orchestrator.store import schema
from orchestrator.store.postgres import PostgresStore

_CHUNK = 5000  # rows read from SQLite and copied to PostgreSQL at a time
_TERMINAL = frozenset(s.value for s in models.TERMINAL)
_JOB_COLUMNS = (
    "id",
    "idempotency_key",
    "backend",
    "spec",
    "state",
    "attempt",
    "launching",
    "token",
    "external_id",
    "exit_code",
    "reason",
    "vendor_status",
    "stop_reason",
    "peer_uid",
    "peer_gid",
    "peer_pid",
    "created_at",
    "updated_at",
    "state_times",
    "info",
)  # not `name`: generated from the spec, on both sides
_EVENT_COLUMNS = ("seq", "job_id", "at", "from_state", "to_state", "reason", "exit_code", "failure")
_ATTEMPT_COLUMNS = ("job_id", "attempt", "token", "external_id", "started_at", "outcome")
_DEFINITION_COLUMNS = ("backend", "digest", "arn", "created_at")
_DEPENDENCY_COLUMNS = ("depends_on", "job_id")
_Row = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class MoveReport:
    """How many rows of each table were moved."""

    jobs: int
    events: int
    attempts: int
    definitions: int
    dependencies: int


async def move(sqlite_path: Path, url: str, *, node: str) -> MoveReport:
    """Copy the SQLite store at `sqlite_path` into the PostgreSQL database at `url` (which must
    hold no jobs), its unfinished local jobs given to `node`. Raises `StoreLocked` (a daemon
    serves the store), `NotAStore`, `StoreTooNew`, or `StoreError` (no such file, the database
    unreachable or already holding jobs, the copy failed); then nothing was written."""
    lock_fd = await asyncio.to_thread(_lock, sqlite_path)
    try:
        source = await asyncio.to_thread(_open_source, sqlite_path)
        try:
            return await _copy(source, url, node)
        finally:
            source.close()
    finally:
        os.close(lock_fd)


def _lock(path: Path) -> int:
    """The store's lock (as a daemon takes it), to be held to the end of the move: no daemon
    starts on it meanwhile. Something that cannot be a store is refused before its lock file
    is made."""
    if not os.path.lexists(path):
        raise errors.StoreError(f"{path}: no such file: there is no SQLite store there")
    schema._check_file(path)  # a regular, non-empty SQLite file
    return schema.lock(path)


def _open_source(path: Path) -> sqlite3.Connection:
    """A connection reading the store at `path` at the current schema version, in a read
    transaction (one snapshot of it): the file itself, or a copy in memory brought up to date
    (a store written by an older version)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        version = schema.check_schema(conn, path)
        if version < 1:
            raise errors.NotAStore(
                str(path), f"schema_version {version} is not one orchestrator writes"
            )
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise errors.StoreError(f"{path}: integrity check failed: {check}")
        if version < schema.SCHEMA_VERSION:
            conn = _migrated_copy(conn, version)
        conn.execute("BEGIN")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
            raise errors.NotAStore(str(path), "not an SQLite database") from exc
        raise errors.StoreError(f"{path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _migrated_copy(conn: sqlite3.Connection, version: int) -> sqlite3.Connection:
    """The store copied into memory and brought from `version` up to date by the migrations a
    daemon applies when it opens the file (`schema.MIGRATIONS`); `conn` is closed."""
    copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    try:
        conn.backup(copy)
        for step in range(version + 1, schema.SCHEMA_VERSION + 1):
            for statement in schema.MIGRATIONS[step]:
                copy.execute(statement)
    except BaseException:
        copy.close()
        raise
    conn.close()
    return copy


async def _copy(source: sqlite3.Connection, url: str, node: str) -> MoveReport:
    shown = without_password(url)
    store = PostgresStore(url, events.Hub())
    try:
        await store.open()  # the schema, created as a daemon creates it (or found current)
    except errors.StoreError as exc:
        if type(exc) is errors.StoreError:  # PostgreSQL's own failure: say which database
            raise errors.StoreError(f"{shown}: {exc.message}") from exc
        raise
    await store.close()
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise errors.StoreError(f"{shown}: cannot connect to PostgreSQL: {exc}") from exc
    try:
        async with conn.transaction():
            # Writers wait until the move commits (readers do not): nothing lands in between
            # the check below and the copy.
            await conn.execute(
                "LOCK TABLE jobs, events, attempts, definitions, dependencies "
                "IN SHARE ROW EXCLUSIVE MODE"
            )
            held = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM events)"
            )
            assert held is not None
            if held[0] or held[1]:
                raise errors.StoreError(
                    f"{shown} already holds {held[0]} jobs and {held[1]} events: a store "
                    "moves only into a database without jobs (nothing is merged)"
                )
            report = MoveReport(
                jobs=await _table(source, conn, "jobs", _JOB_COLUMNS, _job(node)),
                events=await _table(source, conn, "events", _EVENT_COLUMNS),
                attempts=await _table(source, conn, "attempts", _ATTEMPT_COLUMNS),
                definitions=await _table(source, conn, "definitions", _DEFINITION_COLUMNS),
                dependencies=await _table(source, conn, "dependencies", _DEPENDENCY_COLUMNS),
            )
            # New events are numbered after the moved ones (the first is 1 if none moved).
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence('events', 'seq'), "
                "GREATEST(MAX(seq), 1), MAX(seq) IS NOT NULL) FROM events"
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise errors.StoreError(f"{shown}: the copy failed, nothing was moved: {exc}") from exc
    except sqlite3.Error as exc:
        raise errors.StoreError(
            f"reading the SQLite store failed, nothing was moved: {exc}"
        ) from exc
    finally:
        await conn.close()
    return report


async def _table(
    source: sqlite3.Connection,
    conn: asyncpg.Connection[asyncpg.Record],
    table: str,
    columns: Sequence[str],
    convert: Callable[[_Row], _Row] | None = None,
) -> int:
    """Copy one table's rows, a chunk at a time; how many."""
    cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table}")
    count = 0
    while batch := await asyncio.to_thread(cursor.fetchmany, _CHUNK):
        records = batch if convert is None else [convert(row) for row in batch]
        await conn.copy_records_to_table(table, records=records, columns=list(columns))
        count += len(records)
    return count


def _job(node: str) -> Callable[[_Row], _Row]:
    """A `jobs` row as PostgreSQL stores it: JSON as text, `launching` a boolean; an unfinished
    local job owned by `node`."""
    spec, state_times, info, launching, state, backend = (
        _JOB_COLUMNS.index(c)
        for c in ("spec", "state_times", "info", "launching", "state", "backend")
    )

    def convert(row: _Row) -> _Row:
        out = list(row)
        for i in (spec, state_times, info):
            out[i] = _text(row[i])
        out[launching] = bool(row[launching])
        if row[backend] == "local" and row[state] not in _TERMINAL:
            out[info] = orjson.dumps({**orjson.loads(row[info]), "owner": node}).decode()
        return tuple(out)

    return convert


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
