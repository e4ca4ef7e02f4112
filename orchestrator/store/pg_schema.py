"""The PostgreSQL store's schema: its DDL at version 4 (as the SQLite store's) and the
migrations after it, applied whole at start-up under an advisory lock (`check_or_create`); and
the SQL helpers the store's queries share."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import structlog
from asyncpg import Record

from orchestrator import errors

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Conn = PoolConnectionProxy[Record]

log = structlog.get_logger("orchestrator.store")

# 4 as the SQLite store's; 5 adds what several daemons share (the lease, the nodes, the events'
# notification).
SCHEMA_VERSION = 5
MIGRATION_LOCK = 0x6F72636865737472  # pg_advisory_lock key: creating or migrating the schema
EVENTS_CHANNEL = "orchestrator_events"  # NOTIFY: events were committed (the feed reads them)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT COLLATE "C" PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    backend TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    launching BOOLEAN NOT NULL DEFAULT false,
    token TEXT,
    external_id TEXT,
    exit_code INTEGER,
    reason TEXT,
    vendor_status TEXT,
    stop_reason TEXT,
    peer_uid BIGINT,
    peer_gid BIGINT,
    peer_pid BIGINT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    state_times TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    name TEXT COLLATE "C" GENERATED ALWAYS AS (spec::jsonb ->> 'name') STORED
);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(state)
    WHERE state NOT IN ('CANCELLED', 'FAILED', 'LOST', 'SUCCEEDED');
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(updated_at)
    WHERE state IN ('CANCELLED', 'FAILED', 'LOST', 'SUCCEEDED');
CREATE INDEX IF NOT EXISTS jobs_peer ON jobs(peer_uid, id);
CREATE TABLE IF NOT EXISTS events (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT COLLATE "C" NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    exit_code INTEGER,
    failure TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT COLLATE "C" NOT NULL,
    attempt INTEGER NOT NULL,
    token TEXT NOT NULL,
    external_id TEXT,
    started_at DOUBLE PRECISION NOT NULL,
    outcome TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS definitions (
    backend TEXT NOT NULL,
    digest TEXT NOT NULL,
    arn TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (backend, digest)
);
CREATE TABLE IF NOT EXISTS dependencies (
    depends_on TEXT COLLATE "C" NOT NULL,
    job_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (depends_on, job_id)
);
CREATE INDEX IF NOT EXISTS dependencies_job ON dependencies(job_id);
"""
_CLUSTER = f"""
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT COLLATE "C" PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL,
    pid BIGINT,
    version TEXT,
    host TEXT
);
CREATE OR REPLACE FUNCTION orchestrator_events_committed() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('{EVENTS_CHANNEL}', ''); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS events_notify ON events;
CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION orchestrator_events_committed();
"""
# What each version added, applied in order (in one transaction, under the advisory lock) to a
# database written by an older one: version → its statements.
MIGRATIONS: dict[int, str] = {5: _CLUSTER}


async def check_or_create(conn: _Conn, shown: str) -> None:
    """Create the schema whole, or bring an older one up to date; refuse a newer one."""
    version = 0
    if await conn.fetchval("SELECT to_regclass('meta') IS NOT NULL"):
        found = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
        version = int(found) if found is not None else 0
        if version > SCHEMA_VERSION:
            raise errors.StoreTooNew(shown, version, SCHEMA_VERSION)
        if version == SCHEMA_VERSION:
            return
    async with conn.transaction():
        if version < 4:  # new (or never finished): the whole DDL is version 4's
            await conn.execute(SCHEMA)
            version = 4
        for step in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[step])
            log.info("store.migrated", version=step)
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            str(SCHEMA_VERSION),
        )


def sql(text: str) -> str:
    """`?` placeholders (as the SQLite store writes them) as asyncpg's `$1, $2, …`."""
    count = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(count)}", text)


def glob_regex(pattern: str) -> str:
    """A `list_jobs` name glob (`*`, `?`, `[…]`, `[!…]`) as an anchored POSIX regex."""
    out, i = ["^"], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[" and (end := pattern.find("]", i + 2)) != -1:
            inner = pattern[i + 1 : end]
            negate = inner.startswith("!")
            inner = inner[1:] if negate else inner
            out.append("[" + ("^" if negate else "") + inner.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out) + "$"
