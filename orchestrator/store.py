"""The durable job store: SQLite in WAL mode with one writer thread and group commit.

Every write is a small function run on the writer thread. The writer takes whatever operations are
waiting and commits them as one transaction (one fsync for many submissions or transitions), each
inside its own savepoint so one failing operation cannot undo the others. A caller's future is
resolved only after the commit, and the events of a batch are published, in commit order, right
after it. Reads run on a separate connection and thread, so a long listing never delays a commit.

One store is served by one daemon at a time: `open` takes an exclusive lock on `<store>.lock`
before anything else, and refuses a file at the store's path that is not an orchestrator store
(a new one is only ever created whole, under another name, then renamed into place). The store
reports its own health: whether its last commit failed, and whether its file system has less
than `min_free_bytes` free.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, Literal, TypeVar

import orjson
import pydantic
import structlog

from orchestrator import errors, events, models
from orchestrator.engine import tracking
from orchestrator.settings import StoreSettings

log = structlog.get_logger("orchestrator.store")

T = TypeVar("T")
# An operation runs on the writer thread and returns its result plus the events it caused.
Operation = Callable[[sqlite3.Connection], tuple[T, list[models.Event]]]

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
_FREE_SPACE_TTL_S = 1.0  # free space is measured at most this often
_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(models.TERMINAL))
_SCHEMA = f"""
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
    info BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(state) WHERE state NOT IN ({_TERMINAL_SQL});
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(updated_at) WHERE state IN ({_TERMINAL_SQL});
CREATE INDEX IF NOT EXISTS jobs_peer ON jobs(peer_uid, id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    exit_code INTEGER
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
"""

_COLUMNS = (
    "id, backend, spec, state, attempt, launching, token, external_id, exit_code, reason, "
    "vendor_status, stop_reason, peer_uid, peer_gid, peer_pid, created_at, updated_at, "
    "state_times, info"
)


def _job_from_row(row: Sequence[Any]) -> models.Job:
    peer = None if row[12] is None else models.Peer(uid=row[12], gid=row[13], pid=row[14])
    return models.Job(
        id=row[0],
        backend=row[1],
        spec=_spec_from_json(row[2]),
        state=models.JobState(row[3]),
        attempt=row[4],
        launching=bool(row[5]),
        token=row[6],
        external_id=row[7],
        exit_code=row[8],
        reason=row[9],
        vendor_status=row[10],
        stop_reason=row[11],
        peer=peer,
        created_at=row[15],
        updated_at=row[16],
        state_times=orjson.loads(row[17]),
        info=orjson.loads(row[18]),
    )


def _spec_from_json(data: bytes) -> models.JobSpec:
    """A stored spec. Validating it again is the fast path (pydantic-core parses the JSON;
    `model_construct` spends more on defaults); a spec that a newer version's rules refuse
    was valid when accepted, so it is kept as it is."""
    try:
        return models.JobSpec.model_validate_json(data)
    except pydantic.ValidationError:
        return models.JobSpec.model_construct(**orjson.loads(data))


def _fetch(conn: sqlite3.Connection, job_id: str) -> models.Job:
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise errors.JobNotFound(job_id)
    return _job_from_row(row)


def _event(job: models.Job, old: models.JobState | None) -> models.Event:
    return models.Event(
        job_id=job.id,
        backend=job.backend,
        name=job.name,
        from_state=old,
        to_state=job.state,
        at=job.updated_at,
        reason=job.reason,
        exit_code=job.exit_code,
        created_at=job.created_at,
        peer_uid=None if job.peer is None else job.peer.uid,
    )


_INSERT_EVENT = (
    "INSERT INTO events (job_id, at, from_state, to_state, reason, exit_code) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_JOB = (
    "INSERT INTO jobs (id, idempotency_key, backend, spec, state, peer_uid, peer_gid, "
    "peer_pid, created_at, updated_at, state_times, info) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, X'7B7D')"  # info: b'{}'
)


def _event_row(event: models.Event) -> tuple[Any, ...]:
    return (
        event.job_id,
        event.at,
        None if event.from_state is None else event.from_state.value,
        event.to_state.value,
        event.reason,
        event.exit_code,
    )


def _insert_event(conn: sqlite3.Connection, event: models.Event) -> None:
    conn.execute(_INSERT_EVENT, _event_row(event))


class _NewJobs:
    """Accepts a run of new jobs with one `executemany` per table: the bulk ingest path spends
    its time per row otherwise. A job with an idempotency key is looked up first, after the
    rows before it are written, so a key repeated within one run is found."""

    def __init__(self, conn: sqlite3.Connection, peer: models.Peer | None, now: float) -> None:
        self._conn = conn
        self._peer = peer
        self._peer_columns = (None, None, None) if peer is None else (peer.uid, peer.gid, peer.pid)
        self._now = now
        self._state_times = orjson.dumps({models.JobState.QUEUED.value: now})
        self._jobs: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []

    def add(
        self, spec: models.JobSpec, backend: str, spec_json: bytes
    ) -> tuple[models.Job, models.Event | None]:
        """The new job and its acceptance event, or the existing job (and no event) that the
        spec's idempotency key already names. A conflict raises before anything is written."""
        if spec.idempotency_key is not None:
            self.flush()
            existing = _find_by_key(self._conn, spec, backend, self._peer)
            if existing is not None:
                return existing, None
        now = self._now
        job = models.Job(
            id=models.new_job_id(now),
            spec=spec,
            backend=backend,
            state=models.JobState.QUEUED,
            created_at=now,
            updated_at=now,
            state_times={models.JobState.QUEUED.value: now},
            peer=self._peer,
        )
        event = _event(job, None)
        self._jobs.append(
            (
                job.id,
                _scoped_key(spec.idempotency_key, self._peer),
                backend,
                spec_json,
                job.state.value,
                *self._peer_columns,
                now,
                now,
                self._state_times,
            )
        )
        self._events.append(_event_row(event))
        return job, event

    def flush(self) -> None:
        if self._jobs:
            self._conn.executemany(_INSERT_JOB, self._jobs)
            self._conn.executemany(_INSERT_EVENT, self._events)
            self._jobs.clear()
            self._events.clear()


def _scoped_key(key: str | None, peer: models.Peer | None) -> str | None:
    """An idempotency key as stored: `<uid> <key>`, as each submitter has keys of its own. A
    key holds no space (`models._KEY_PATTERN`), so no scoped key is ever equal to a key stored
    plain, as they were before keys were scoped."""
    if key is None:
        return None
    return f"{'-' if peer is None else peer.uid} {key}"


def _find_by_key(
    conn: sqlite3.Connection, spec: models.JobSpec, backend: str, peer: models.Peer | None
) -> models.Job | None:
    """The job this submitter's `spec.idempotency_key` already names, if any (another
    submitter's job under the same key is not found); a different spec under the same key is
    an `IdempotencyConflict`."""
    key = spec.idempotency_key
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = ? "
        "OR (idempotency_key = ? AND peer_uid IS ?)",  # a key stored plain, before scoping
        (_scoped_key(key, peer), key, None if peer is None else peer.uid),
    ).fetchone()
    if row is None:
        return None
    existing = _job_from_row(row)
    # The backend is compared as stored beside the spec; inside the spec it is optional.
    if existing.backend != backend or _without_backend(existing.spec) != _without_backend(spec):
        raise IdempotencyConflict(
            f"idempotency key {spec.idempotency_key!r} already names job "
            f"{existing.id} with a different spec"
        )
    return existing


def _without_backend(spec: models.JobSpec) -> dict[str, Any]:
    return spec.model_dump(exclude={"backend"})


class IdempotencyConflict(errors.OrchestratorError):
    """The idempotency key belongs to a job with a different spec."""

    code = "idempotency_conflict"


ProblemReason = Literal["store_commit_failed", "store_low_space"]
PROBLEM_REASONS: tuple[ProblemReason, ...] = ("store_commit_failed", "store_low_space")


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the daemon is degraded: a stable `reason` (a metric label) and a message."""

    reason: ProblemReason
    message: str


class Store:
    def __init__(
        self, settings: StoreSettings, hub: events.Hub, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._clock = clock
        self._lock_fd: int | None = None
        self._commit_failure: str | None = None  # why the last commit failed; None once one works
        self._failed_commits = 0  # consecutive failed commits (the writer thread's own count)
        self._free_bytes: int | None = None
        self._free_checked_at: float | None = None
        self._ops: queue.SimpleQueue[tuple[Operation[Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-reader")
        self._read_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def path(self) -> Path:
        return self._settings.path

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the store for this daemon, create it or check that it is one, check its
        integrity and start the writer thread."""
        self._loop = asyncio.get_running_loop()
        path = self._settings.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Before anything that could write: a second daemon must not even recover.
        self._lock_fd = _lock(path)
        try:
            await asyncio.to_thread(_check_or_create, path)
            conn = await asyncio.to_thread(self._connect_writer)
        except BaseException:
            self._unlock()
            raise
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="store-writer", daemon=True
        )
        self._writer.start()
        await self._read(lambda _: None)  # open the reader connection on its thread

    def _connect_writer(self) -> sqlite3.Connection:
        path = self._settings.path
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            _check_schema(conn, path)  # before anything writes: a file not ours stays as it was
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise errors.StoreError(f"{self._settings.path}: cannot enable WAL (got {mode})")
            conn.execute(f"PRAGMA synchronous={self._settings.synchronous}")
            pragma = "quick_check" if self._settings.startup_check == "quick" else "integrity_check"
            check = conn.execute(f"PRAGMA {pragma}").fetchone()[0]
            if check != "ok":
                raise errors.StoreError(f"{self._settings.path}: integrity check failed: {check}")
            conn.executescript(_SCHEMA)  # what an older schema lacks (nothing, at version 1)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
                raise errors.NotAStore(str(path), "not an SQLite database") from exc
            raise errors.StoreError(f"{path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Commit whatever is waiting, then stop both threads."""
        if self._writer is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._read_conn is not None:
            await self._read(lambda conn: conn.close())
            self._read_conn = None
        self._reader.shutdown(wait=True)
        self._unlock()

    def _unlock(self) -> None:
        """Let another daemon have the store (the kernel does this too, when we die)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the writer ------------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        max_batch = self._settings.max_batch
        stopping = False
        while not stopping:
            first = self._ops.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < max_batch:
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(conn, batch)
        conn.close()

    def _commit(
        self, conn: sqlite3.Connection, batch: list[tuple[Operation[Any], asyncio.Future[Any]]]
    ) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        published: list[models.Event] = []
        changes_before = conn.total_changes
        commit_error: str | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result, op_events = op(conn)
                except Exception as exc:
                    # Raises in turn if SQLite rolled the whole transaction back (a full disk
                    # does that): then the batch fails below, as one.
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    if isinstance(exc, sqlite3.Error):  # the store's failure, not the caller's
                        failed = errors.StoreError(f"write failed: {exc}")
                        failed.__cause__ = exc
                        outcomes.append((future, None, failed))
                    else:
                        outcomes.append((future, None, exc))
                    continue
                conn.execute("RELEASE op")
                outcomes.append((future, result, None))
                published.extend(op_events)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Once per outage with the traceback, not once per retry: the journal the log
            # goes to may be on the very disk that is full.
            self._failed_commits += 1
            if self._failed_commits == 1:
                log.exception("store.commit_failed", operations=len(batch))
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            commit_error = str(exc)
            failure = errors.StoreError(f"commit failed: {exc}")
            outcomes = [(future, None, failure) for _, future in batch]
            published = []
        wrote = commit_error is None and conn.total_changes > changes_before
        if wrote and self._failed_commits:
            log.info("store.commit_recovered", failed_commits=self._failed_commits)
            self._failed_commits = 0
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, outcomes, published, commit_error, wrote)

    def _deliver(
        self,
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
        published: list[models.Event],
        commit_error: str | None,
        wrote: bool,
    ) -> None:
        # Health first: whoever hears of a failure below already sees the store degraded.
        if commit_error is not None:
            self._commit_failure = commit_error
        elif wrote:  # a commit that wrote nothing (a ping) proves nothing about the disk
            self._commit_failure = None
        for event in published:
            self._hub.publish(event)
        for future, result, exc in outcomes:
            if future.done():  # the caller was cancelled; the write stands regardless
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

    async def _write(self, op: Operation[T]) -> T:
        if self._writer is None or self._loop is None:
            raise errors.StoreError("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put((op, future))
        # Shielded: a cancelled caller must not hide the outcome of a write that will commit.
        return await asyncio.shield(future)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                if self._read_conn is None:
                    conn = sqlite3.connect(self._settings.path, isolation_level=None)
                    conn.execute("PRAGMA query_only=ON")
                    self._read_conn = conn
                return fn(self._read_conn)
            except sqlite3.Error as exc:  # out of descriptors, memory, an I/O error
                raise errors.StoreError(f"read failed: {exc}") from exc

        assert self._loop is not None
        return await self._loop.run_in_executor(self._reader, run)

    # -- writes ----------------------------------------------------------------------------

    async def accept_many(
        self, specs: Sequence[tuple[models.JobSpec, str]], peer: models.Peer | None
    ) -> list[tuple[models.Job, bool] | errors.OrchestratorError]:
        """Durably record new QUEUED jobs in one operation. Each outcome, in order: (job, True),
        (the existing job, False) when its idempotency key is already known, or the error."""
        now = self._clock()
        rows = [
            (spec, backend, spec.model_dump_json(exclude_defaults=True).encode())
            for spec, backend in specs
        ]

        def op(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[models.Job, bool] | errors.OrchestratorError], list[models.Event]]:
            outcomes: list[tuple[models.Job, bool] | errors.OrchestratorError] = []
            events: list[models.Event] = []
            new_jobs = _NewJobs(conn, peer, now)
            for spec, backend, spec_json in rows:
                try:
                    job, event = new_jobs.add(spec, backend, spec_json)
                except IdempotencyConflict as exc:
                    outcomes.append(exc)
                    continue
                outcomes.append((job, event is not None))
                if event is not None:
                    events.append(event)
            new_jobs.flush()
            return outcomes, events

        return await self._write(op)

    async def transition(
        self,
        job_id: str,
        expected: models.JobState,
        new: models.JobState,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        vendor_status: str | None = None,
        external_id: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        """Compare-and-set the job's state and write its event row, in one transaction."""

        def op(conn: sqlite3.Connection) -> tuple[models.Job, list[models.Event]]:
            job = _fetch(conn, job_id)
            if job.state != expected:
                raise errors.StaleState(job_id, expected.value, job.state.value)
            if not models.can_transition(job.state, new):
                raise errors.IllegalTransition(job_id, job.state.value, new.value)
            return _apply(
                conn,
                job,
                new,
                self._clock(),
                reason=reason,
                exit_code=exit_code,
                vendor_status=vendor_status,
                external_id=external_id,
                info=info,
            )

        return await self._write(op)

    async def observe(
        self,
        job_id: str,
        *,
        vendor_status: str | None,
        reason: str | None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        """Record what the vendor says when the state itself did not change (no event row)."""

        def op(conn: sqlite3.Connection) -> tuple[models.Job, list[models.Event]]:
            job = _fetch(conn, job_id)
            merged = {**job.info, **(info or {})}
            conn.execute(
                "UPDATE jobs SET vendor_status = ?, reason = COALESCE(?, reason), info = ? "
                "WHERE id = ?",
                (vendor_status, reason, orjson.dumps(merged), job_id),
            )
            return _fetch(conn, job_id), []

        return await self._write(op)

    async def relocate(self, job_id: str, external_id: str) -> models.Job:
        """The current attempt's task was found again under another id: remember that one."""

        def op(conn: sqlite3.Connection) -> tuple[models.Job, list[models.Event]]:
            job = _fetch(conn, job_id)
            conn.execute("UPDATE jobs SET external_id = ? WHERE id = ?", (external_id, job_id))
            conn.execute(
                "UPDATE attempts SET external_id = ? WHERE job_id = ? AND attempt = ?",
                (external_id, job_id, job.attempt),
            )
            return _fetch(conn, job_id), []

        return await self._write(op)

    async def begin_attempt(self, job_id: str) -> models.Job | None:
        """Commit a new attempt and its token before any backend call. None when the job is no
        longer dispatchable (cancelled meanwhile, or already launching)."""

        def op(conn: sqlite3.Connection) -> tuple[models.Job | None, list[models.Event]]:
            job = _fetch(conn, job_id)
            if job.state != models.JobState.QUEUED or job.launching or job.stop_reason:
                return None, []
            attempt = job.attempt + 1
            token = f"{job.id}-{attempt}"
            now = self._clock()
            info = orjson.dumps({**job.info, "attempt_started_at": now})
            conn.execute(
                "UPDATE jobs SET attempt = ?, token = ?, launching = 1, updated_at = ?, info = ? "
                "WHERE id = ?",
                (attempt, token, now, info, job_id),
            )
            conn.execute(
                "INSERT INTO attempts (job_id, attempt, token, started_at) VALUES (?, ?, ?, ?)",
                (job_id, attempt, token, now),
            )
            return _fetch(conn, job_id), []

        return await self._write(op)

    async def record_submitted(
        self,
        job_id: str,
        *,
        external_id: str,
        state: models.JobState,
        vendor_status: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        """The backend accepted the current attempt: store its external id and move on."""

        def op(conn: sqlite3.Connection) -> tuple[models.Job, list[models.Event]]:
            job = _fetch(conn, job_id)
            if job.state != models.JobState.QUEUED or not job.launching:
                raise errors.StaleState(job_id, "QUEUED (launching)", job.state.value)
            conn.execute(
                "UPDATE attempts SET external_id = ?, outcome = 'submitted' "
                "WHERE job_id = ? AND attempt = ?",
                (external_id, job_id, job.attempt),
            )
            conn.execute("UPDATE jobs SET launching = 0 WHERE id = ?", (job_id,))
            return _apply(
                conn,
                job,
                state,
                self._clock(),
                reason=None,
                exit_code=None,
                vendor_status=vendor_status,
                external_id=external_id,
                info=info,
            )

        return await self._write(op)

    async def record_start_failure(self, job_id: str, reason: str, *, final: bool) -> models.Job:
        """The current attempt launched nothing. Final: the job FAILED; else it is QUEUED for
        another attempt."""

        def op(conn: sqlite3.Connection) -> tuple[models.Job, list[models.Event]]:
            job = _fetch(conn, job_id)
            conn.execute(
                "UPDATE attempts SET outcome = ? WHERE job_id = ? AND attempt = ?",
                (f"start failed: {reason}", job_id, job.attempt),
            )
            conn.execute("UPDATE jobs SET launching = 0, reason = ? WHERE id = ?", (reason, job_id))
            job = _fetch(conn, job_id)
            if not final:
                return job, []
            return _apply(conn, job, models.JobState.FAILED, self._clock(), reason=reason)

        return await self._write(op)

    async def request_stop(self, job_id: str, why: models.StopReason) -> models.Job:
        """Durably ask for a job to stop. A job no backend has seen yet ends here at once; any
        other keeps its state until the stop is observed (the poller re-issues it)."""

        def op(conn: sqlite3.Connection) -> tuple[models.Job, list[models.Event]]:
            job = _fetch(conn, job_id)
            if job.state.terminal:
                return job, []
            if job.state == models.JobState.QUEUED and not job.launching:
                final, reason = tracking.stopped_outcome(job, why)
                conn.execute("UPDATE jobs SET stop_reason = ? WHERE id = ?", (why, job_id))
                return _apply(conn, _fetch(conn, job_id), final, self._clock(), reason=reason)
            if job.stop_reason is None:
                conn.execute("UPDATE jobs SET stop_reason = ? WHERE id = ?", (why, job_id))
            return _fetch(conn, job_id), []

        return await self._write(op)

    async def purge(self, older_than: float) -> list[str]:
        """Delete terminal jobs last changed before `older_than`, with their events; return
        their ids."""

        def op(conn: sqlite3.Connection) -> tuple[list[str], list[models.Event]]:
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM jobs WHERE state IN ({_TERMINAL_SQL}) AND updated_at < ? "
                    "LIMIT 2000",
                    (older_than,),
                )
            ]
            for table, column in (("events", "job_id"), ("attempts", "job_id"), ("jobs", "id")):
                conn.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(i,) for i in ids])
            return ids, []

        return await self._write(op)

    async def ping(self) -> None:
        """A round trip through the writer thread and a transaction: proof it is not wedged."""

        def op(conn: sqlite3.Connection) -> tuple[None, list[models.Event]]:
            conn.execute("SELECT 1 FROM meta LIMIT 1").fetchone()
            return None, []

        await self._write(op)

    # -- health ----------------------------------------------------------------------------

    def free_bytes(self) -> int | None:
        """Free space on the store's file system (as an unprivileged user sees it), measured
        at most once a second; None when it cannot be measured."""
        now = time.monotonic()
        if self._free_checked_at is None or now - self._free_checked_at >= _FREE_SPACE_TTL_S:
            self._free_checked_at = now
            try:
                stat = os.statvfs(self._settings.path.parent)
            except OSError:
                self._free_bytes = None
            else:
                self._free_bytes = stat.f_bavail * stat.f_frsize
        return self._free_bytes

    def check_room(self) -> None:
        """Raise `StoreFull` while the free space is below `min_free_bytes`: what is left is
        kept for the jobs already accepted."""
        minimum = self._settings.min_free_bytes
        free = self.free_bytes() if minimum else None
        if free is not None and free < minimum:
            raise errors.StoreFull(str(self._settings.path), free, minimum)

    def problems(self) -> list[Problem]:
        """Why the store is degraded, if it is: its last commit failed (cleared by the next
        commit that writes), or its file system is short of space."""
        found = []
        if self._commit_failure is not None:
            found.append(
                Problem(
                    "store_commit_failed",
                    f"the store's last commit failed: {self._commit_failure}",
                )
            )
        try:
            self.check_room()
        except errors.StoreFull as exc:
            found.append(Problem("store_low_space", exc.message))
        return found

    # -- reads -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> models.Job:
        return await self._read(lambda conn: _fetch(conn, job_id))

    async def list_jobs(
        self,
        states: Iterable[models.JobState] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
        peer_uid: int | None = None,
    ) -> list[models.Job]:
        """Newest first; with `before` (a job id), only the jobs older than that one; with
        `peer_uid`, only the jobs that uid submitted."""
        clauses: list[str] = []
        args: list[object] = []
        if before is not None:
            clauses.append("id < ?")
            args.append(before)
        if peer_uid is not None:
            clauses.append("peer_uid = ?")
            args.append(peer_uid)
        if states is not None:
            wanted = [s.value for s in states]
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        if backend is not None:
            clauses.append("backend = ?")
            args.append(backend)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?"
        return await self._read(
            lambda conn: [_job_from_row(r) for r in conn.execute(sql, (*args, limit))]
        )

    async def unfinished(self) -> list[models.Job]:
        """Every non-terminal job, oldest first: the recovery scan."""
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN ({_TERMINAL_SQL}) ORDER BY id"
        return await self._read(lambda conn: [_job_from_row(r) for r in conn.execute(sql)])

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        def fetch(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT at, from_state, to_state, reason, exit_code FROM events "
                "WHERE job_id = ? ORDER BY seq",
                (job_id,),
            )
            return [
                {"at": models.iso(at), "from": f, "to": t, "reason": r, "exit_code": c}
                for at, f, t, r, c in rows
            ]

        return await self._read(fetch)

    async def attempts(self, job_id: str) -> list[dict[str, Any]]:
        def fetch(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT attempt, token, external_id, started_at, outcome FROM attempts "
                "WHERE job_id = ? ORDER BY attempt",
                (job_id,),
            )
            return [
                {
                    "attempt": a,
                    "token": t,
                    "external_id": e,
                    "started_at": models.iso(s),
                    "outcome": o,
                }
                for a, t, e, s, o in rows
            ]

        return await self._read(fetch)

    async def count_by_state(self, peer_uid: int | None = None) -> dict[str, int]:
        """Jobs by state: all of them, or those `peer_uid` submitted."""
        where, args = ("", ()) if peer_uid is None else ("WHERE peer_uid = ? ", (peer_uid,))
        sql = f"SELECT state, COUNT(*) FROM jobs {where}GROUP BY state"

        def fetch(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute(sql, args).fetchall())

        return await self._read(fetch)


def _lock(path: Path) -> int:
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


def _check_or_create(path: Path) -> None:
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
            f"BEGIN; {_SCHEMA} INSERT INTO meta (key, value) "
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


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse an SQLite database that is not an orchestrator store, or is one written by a
    newer version. Reads only."""
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


def _apply(
    conn: sqlite3.Connection,
    job: models.Job,
    new: models.JobState,
    now: float,
    *,
    reason: str | None,
    exit_code: int | None = None,
    vendor_status: str | None = None,
    external_id: str | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[models.Job, list[models.Event]]:
    state_times = {**job.state_times, new.value: now}
    merged_info = {**job.info, **(info or {})}
    conn.execute(
        "UPDATE jobs SET state = ?, updated_at = ?, state_times = ?, reason = ?, "
        "exit_code = COALESCE(?, exit_code), vendor_status = COALESCE(?, vendor_status), "
        "external_id = COALESCE(?, external_id), info = ? WHERE id = ?",
        (
            new.value,
            now,
            orjson.dumps(state_times),
            reason,
            exit_code,
            vendor_status,
            external_id,
            orjson.dumps(merged_info),
            job.id,
        ),
    )
    updated = _fetch(conn, job.id)
    event = _event(updated, job.state)
    _insert_event(conn, event)
    return updated, [event]
