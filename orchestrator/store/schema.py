"""The SQLite store's file: its schema (DDL, `schema_version`), how it is created whole, how it
is checked before use, and the lock that keeps a second daemon off it.

One store is served by one daemon at a time: `lock` takes an exclusive lock on `<store>.lock`
before anything else, and `check_or_create` refuses a file at the store's path that is not an
orchestrator store (a new one is only ever created whole, under another name, then renamed into
place). `connect_writer` refuses a store written by a newer version before anything writes.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from stat import S_ISREG

import structlog

from orchestrator import errors, models
from orchestrator.settings import StoreSettings

log = structlog.get_logger("orchestrator.store")

SCHEMA_VERSION = 4
_NAME_SQL = "json_extract(CAST(spec AS TEXT), '$.name')"  # a job's name (NULL: none given)
_DEFINITIONS = """CREATE TABLE IF NOT EXISTS definitions (
    backend TEXT NOT NULL,
    digest TEXT NOT NULL,
    arn TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (backend, digest)
) STRICT, WITHOUT ROWID"""
_DEPENDENCIES = """CREATE TABLE IF NOT EXISTS dependencies (
    depends_on TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (depends_on, job_id)
) STRICT, WITHOUT ROWID"""
_DEPENDENCIES_INDEX = "CREATE INDEX IF NOT EXISTS dependencies_job ON dependencies(job_id)"
# What each version added, applied in order to a store written by an older one (in one
# transaction, after the integrity check): version → its statements.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE events ADD COLUMN failure TEXT",),  # an event's failure class
    3: (  # a job's name, found by an index (`ls --name`, naming a job by its name)
        f"ALTER TABLE jobs ADD COLUMN name TEXT GENERATED ALWAYS AS ({_NAME_SQL}) VIRTUAL",
        "CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name)",
    ),
    4: (
        _DEFINITIONS,  # the definitions jobs' images run under (`backends.definitions`)
        _DEPENDENCIES,  # who waits for whom, read backwards (`status`: the jobs it is needed by)
        _DEPENDENCIES_INDEX,
        "INSERT OR IGNORE INTO dependencies (depends_on, job_id) SELECT d.value, jobs.id "
        "FROM jobs, json_each(CAST(jobs.spec AS TEXT), '$.depends_on') AS d",
    ),
}
_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(models.TERMINAL))
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    backend TEXT NOT NULL,
    spec BLOB NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    launching INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    external_id TEXT,
    exit_code INTEGER,
    reason TEXT,
    vendor_status TEXT,
    stop_reason TEXT,
    peer_uid INTEGER,
    peer_gid INTEGER,
    peer_pid INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state_times BLOB NOT NULL,
    info BLOB NOT NULL,
    name TEXT GENERATED ALWAYS AS ({_NAME_SQL}) VIRTUAL
) STRICT;
CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(state) WHERE state NOT IN ({TERMINAL_SQL});
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(updated_at) WHERE state IN ({TERMINAL_SQL});
CREATE INDEX IF NOT EXISTS jobs_peer ON jobs(peer_uid, id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    exit_code INTEGER,
    failure TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    token TEXT NOT NULL,
    external_id TEXT,
    started_at REAL NOT NULL,
    outcome TEXT,
    PRIMARY KEY (job_id, attempt)
) STRICT, WITHOUT ROWID;
{_DEFINITIONS};
{_DEPENDENCIES};
{_DEPENDENCIES_INDEX};
"""


def connect_writer(settings: StoreSettings) -> sqlite3.Connection:
    """The writer's connection to a store that `check_or_create` let through: checked to be an
    orchestrator store this version understands, in WAL mode, its integrity checked and its
    schema brought up to date."""
    path = settings.path
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        version = check_schema(conn, path)  # before anything writes: a file not ours stays
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise errors.StoreError(f"{path}: cannot enable WAL (got {mode})")
        conn.execute(f"PRAGMA synchronous={settings.synchronous}")
        pragma = "quick_check" if settings.startup_check == "quick" else "integrity_check"
        check = conn.execute(f"PRAGMA {pragma}").fetchone()[0]
        if check != "ok":
            raise errors.StoreError(f"{path}: integrity check failed: {check}")
        migrate(conn, version)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
            raise errors.NotAStore(str(path), "not an SQLite database") from exc
        raise errors.StoreError(f"{path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def lock(path: Path) -> int:
    """Hold an exclusive lock on `<store>.lock` for as long as this process serves the store,
    with our pid written in it for whoever finds it taken. The kernel releases the lock when the
    process ends, however it ends; close-on-exec keeps it out of every job we start."""
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise errors.StoreError(f"{lock_path}: cannot open the store's lock: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise errors.StoreLocked(str(path), holder) from None
    except OSError as exc:
        os.close(fd)
        raise errors.StoreError(f"{lock_path}: cannot lock the store: {exc}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # a full disk: the lock holds all the same
        log.warning("store.lock_pid_unwritten", path=str(lock_path), error=str(exc))
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None  # the holder has not written it yet, or could not


def check_or_create(path: Path) -> None:
    if os.path.lexists(path):
        _check_file(path)
    else:
        _create(path)


def _check_file(path: Path) -> None:
    """Refuse what is at the store's path when it cannot be a store. A new store is only ever
    created whole (`_create`), so an empty file is not one: something truncated it, or
    `store.path` points at the wrong file; starting afresh would hide every job it held."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise errors.StoreError(f"{path}: {exc.strerror}") from exc
    if not S_ISREG(stat.st_mode):
        raise errors.NotAStore(str(path), "not a regular file")
    if stat.st_size == 0:
        raise errors.NotAStore(str(path), "the file is empty (0 bytes)")
    try:
        with open(path, "rb") as fh:
            header = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise errors.StoreError(f"{path}: {exc.strerror}") from exc
    if header != _SQLITE_MAGIC:
        raise errors.NotAStore(str(path), "not an SQLite database")


def _create(path: Path) -> None:
    """A new store: built under a temporary name and renamed into place once its schema is
    committed, so a file at the store's path is always a whole store."""
    tmp = path.with_name(f".{path.name}.new")
    for stale in (tmp, tmp.with_name(f"{tmp.name}-journal")):  # a crash's (we hold the lock)
        stale.unlink(missing_ok=True)
    # Created 0600 before SQLite opens it: job specs may carry secrets in env.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.executescript(
            f"BEGIN; {SCHEMA} INSERT INTO meta (key, value) "
            f"VALUES ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
        )
    except sqlite3.Error as exc:
        raise errors.StoreError(f"{path}: cannot create the store: {exc}") from exc
    finally:
        conn.close()
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a store written at `version` up to `SCHEMA_VERSION`, all or nothing."""
    if version >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    log.info("store.migrated", from_version=version, to_version=SCHEMA_VERSION)


def check_schema(conn: sqlite3.Connection, path: Path) -> int:
    """Refuse an SQLite database that is not an orchestrator store, or is one written by a
    newer version; the version it was written at. Reads only."""
    tables = [
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1")
    ]
    row = None
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        shown = ", ".join(tables[:5]) + (", …" if len(tables) > 5 else "")
        raise errors.NotAStore(
            str(path),
            "an SQLite database without orchestrator's schema_version; "
            f"its tables: {shown or 'none'}",
        )
    try:
        version = int(row[0])
    except ValueError:
        raise errors.NotAStore(str(path), f"schema_version {row[0]!r} is not a number") from None
    if version > SCHEMA_VERSION:
        raise errors.StoreTooNew(str(path), version, SCHEMA_VERSION)
    return version
