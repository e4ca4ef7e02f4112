"""The daemon's job store: SQLite in WAL mode, written by one thread with group commit.

`SqliteStore` is the `Store` protocol's operations as SQL, each a small function run on the
writer thread (`writer.Writer`) or the reader's. The file, its lock and its schema are
`schema`'s; rows ↔ `models` are `rows`'. The store reports its own health: whether its last
commit failed, and whether its file system has less than `min_free_bytes` free.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from orchestrator import errors, events, models
from orchestrator.engine import tracking
from orchestrator.settings import StoreSettings
from orchestrator.store import rows, schema
from orchestrator.store.protocol import (
    ALL_JOBS,
    PURGE_SLICE,
    AcceptOutcome,
    AttemptEntry,
    HistoryEntry,
    JobQuery,
    Problem,
    Store,
)
from orchestrator.store.writer import Writer

_FREE_SPACE_TTL_S = 1.0  # free space is measured at most this often
_TERMINAL_SQL = schema.TERMINAL_SQL
_Written = tuple[models.Job, list[models.Event]]


class SqliteStore(Store):
    def __init__(
        self, settings: StoreSettings, hub: events.Hub, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._clock = clock
        self._lock_fd: int | None = None
        self._free_bytes: int | None = None
        self._free_checked_at: float | None = None
        self._io = Writer(settings.path, hub, settings.max_batch)

    @property
    def path(self) -> Path:
        return self._settings.path

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the store for this daemon, create it or check that it is one, check its
        integrity and start the writer thread."""
        path = self._settings.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Before anything that could write: a second daemon must not even recover.
        self._lock_fd = schema.lock(path)
        try:
            await asyncio.to_thread(schema.check_or_create, path)
            conn = await asyncio.to_thread(schema.connect_writer, self._settings)
        except BaseException:
            self._unlock()
            raise
        await self._io.start(conn)
        last = await self._io.read(
            lambda conn: conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        )
        self._hub.committed_up_to(last)

    async def close(self) -> None:
        """Commit whatever is waiting, then stop both threads."""
        await self._io.stop()
        self._unlock()

    def _unlock(self) -> None:
        """Let another daemon have the store (the kernel does this too, when we die)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writes ----------------------------------------------------------------------------

    async def accept_many(
        self, specs: Sequence[tuple[models.JobSpec, str]], peer: models.Peer | None
    ) -> list[AcceptOutcome]:
        now = self._clock()
        specs_json = [
            (spec, backend, spec.model_dump_json(exclude_defaults=True).encode())
            for spec, backend in specs
        ]

        def op(conn: sqlite3.Connection) -> tuple[list[AcceptOutcome], list[models.Event]]:
            outcomes: list[AcceptOutcome] = []
            new_jobs = rows.NewJobs(conn, peer, now)
            for spec, backend, spec_json in specs_json:
                try:
                    job, event = new_jobs.add(spec, backend, spec_json)
                except errors.IdempotencyConflict as exc:
                    outcomes.append(exc)
                    continue
                outcomes.append((job, event is not None))
            new_jobs.flush()
            return outcomes, new_jobs.accepted

        return await self._io.write(op)

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
        def op(conn: sqlite3.Connection) -> _Written:
            job = rows.fetch(conn, job_id)
            if job.state != expected:
                raise errors.StaleState(job_id, expected.value, job.state.value)
            return rows.apply(
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

        return await self._io.write(op)

    async def observe(
        self,
        job_id: str,
        *,
        vendor_status: str | None,
        reason: str | None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        def op(conn: sqlite3.Connection) -> _Written:
            job = rows.fetch(conn, job_id)
            merged = {**job.info, **(info or {})}
            conn.execute(
                "UPDATE jobs SET vendor_status = ?, reason = COALESCE(?, reason), info = ? "
                "WHERE id = ?",
                (vendor_status, reason, orjson.dumps(merged), job_id),
            )
            return rows.fetch(conn, job_id), []

        return await self._io.write(op)

    async def relocate(self, job_id: str, external_id: str) -> models.Job:
        def op(conn: sqlite3.Connection) -> _Written:
            job = rows.fetch(conn, job_id)
            conn.execute("UPDATE jobs SET external_id = ? WHERE id = ?", (external_id, job_id))
            conn.execute(
                "UPDATE attempts SET external_id = ? WHERE job_id = ? AND attempt = ?",
                (external_id, job_id, job.attempt),
            )
            return rows.fetch(conn, job_id), []

        return await self._io.write(op)

    async def begin_attempt(self, job_id: str) -> models.Job | None:
        def op(conn: sqlite3.Connection) -> tuple[models.Job | None, list[models.Event]]:
            job = rows.fetch(conn, job_id)
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
            return rows.fetch(conn, job_id), []

        return await self._io.write(op)

    async def record_submitted(
        self,
        job_id: str,
        *,
        external_id: str,
        state: models.JobState,
        vendor_status: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        def op(conn: sqlite3.Connection) -> _Written:
            job = _launching(conn, job_id)
            conn.execute(
                "UPDATE attempts SET external_id = ?, outcome = 'submitted' "
                "WHERE job_id = ? AND attempt = ?",
                (external_id, job_id, job.attempt),
            )
            conn.execute("UPDATE jobs SET launching = 0 WHERE id = ?", (job_id,))
            return rows.apply(
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

        return await self._io.write(op)

    async def record_start_failure(
        self, job_id: str, reason: str, *, final: bool, failure: str = "start"
    ) -> models.Job:
        def op(conn: sqlite3.Connection) -> _Written:
            job = _launching(conn, job_id)
            conn.execute(
                "UPDATE attempts SET outcome = ? WHERE job_id = ? AND attempt = ?",
                (f"start failed: {reason}", job_id, job.attempt),
            )
            conn.execute("UPDATE jobs SET launching = 0, reason = ? WHERE id = ?", (reason, job_id))
            job = rows.fetch(conn, job_id)
            if not final:
                return job, []
            return rows.apply(
                conn,
                job,
                models.JobState.FAILED,
                self._clock(),
                reason=reason,
                info={"failure": failure},
            )

        return await self._io.write(op)

    async def retry(
        self,
        job_id: str,
        expected: models.JobState,
        *,
        reason: str,
        outcome: str,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        def op(conn: sqlite3.Connection) -> _Written:
            job = rows.fetch(conn, job_id)
            if job.state != expected:
                raise errors.StaleState(job_id, expected.value, job.state.value)
            if job.stop_reason is not None:
                raise errors.StaleState(job_id, expected.value, f"{job.state.value}, stopping")
            return rows.requeue(
                conn, job, self._clock(), reason=reason, outcome=outcome, info=info or {}
            )

        return await self._io.write(op)

    async def expand(
        self, parent_id: str, children: Sequence[models.JobSpec]
    ) -> tuple[models.Job, list[models.Job]]:
        now = self._clock()
        encoded = [spec.model_dump_json(exclude_defaults=True).encode() for spec in children]

        def op(
            conn: sqlite3.Connection,
        ) -> tuple[tuple[models.Job, list[models.Job]], list[models.Event]]:
            parent = rows.fetch(conn, parent_id)
            if (
                parent.state != models.JobState.QUEUED
                or parent.launching
                or parent.stop_reason is not None
            ):
                raise errors.StaleState(parent_id, "QUEUED", parent.state.value)
            new_jobs = rows.NewJobs(conn, parent.peer, now)
            made = [
                new_jobs.add(spec, parent.backend, data, f"{parent_id}:{index}")[0]
                for index, (spec, data) in enumerate(zip(children, encoded, strict=True))
            ]
            new_jobs.flush()
            parent, moved = rows.apply(
                conn,
                parent,
                models.JobState.SUBMITTED,
                now,
                reason=f"expanded into {len(made)} child jobs",
                info={"array_status": {models.JobState.QUEUED.value: len(made)}},
            )
            return (parent, made), [*new_jobs.accepted, *moved]

        return await self._io.write(op)

    async def request_stop(self, job_id: str, why: models.StopReason) -> models.Job:
        def op(conn: sqlite3.Connection) -> _Written:
            return self._stop(conn, rows.fetch(conn, job_id), why)

        return await self._io.write(op)

    def _stop(self, conn: sqlite3.Connection, job: models.Job, why: models.StopReason) -> _Written:
        """`request_stop` of `job` (as just read), on the writer thread."""
        if job.state.terminal:
            return job, []
        if job.state == models.JobState.QUEUED and not job.launching:
            final, reason = tracking.stopped_outcome(job, why)
            conn.execute("UPDATE jobs SET stop_reason = ? WHERE id = ?", (why, job.id))
            return rows.apply(
                conn,
                rows.fetch(conn, job.id),
                final,
                self._clock(),
                reason=reason,
                info={"failure": tracking.stop_failure(why)},
            )
        if job.stop_reason is None:
            conn.execute("UPDATE jobs SET stop_reason = ? WHERE id = ?", (why, job.id))
        return rows.fetch(conn, job.id), []

    async def stop_children(self, parent_id: str, why: models.StopReason) -> list[models.Job]:
        sql = (
            f"SELECT {rows.COLUMNS} FROM jobs WHERE id > ? AND id < ? "
            f"AND state NOT IN ({_TERMINAL_SQL}) AND stop_reason IS NULL"
        )

        def op(conn: sqlite3.Connection) -> tuple[list[models.Job], list[models.Event]]:
            launched, changes = [], []
            bounds = (f"{parent_id}:", f"{parent_id};")
            for child in [rows.job_from_row(r) for r in conn.execute(sql, bounds)]:
                stopped, events = self._stop(conn, child, why)
                changes += events
                if not stopped.state.terminal:
                    launched.append(stopped)
            return launched, changes

        return await self._io.write(op)

    async def purge(self, older_than: float) -> list[str]:
        def op(conn: sqlite3.Connection) -> tuple[list[str], list[models.Event]]:
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM jobs WHERE state IN ({_TERMINAL_SQL}) AND updated_at < ? "
                    "LIMIT ?",
                    (older_than, PURGE_SLICE),
                )
            ]
            for table, column in (
                ("events", "job_id"),
                ("attempts", "job_id"),
                ("dependencies", "job_id"),
                ("dependencies", "depends_on"),
                ("jobs", "id"),
            ):
                conn.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(i,) for i in ids])
            return ids, []

        return await self._io.write(op)

    async def ping(self) -> None:
        """A round trip through the writer thread and a transaction: proof it is not wedged."""

        def op(conn: sqlite3.Connection) -> tuple[None, list[models.Event]]:
            conn.execute("SELECT 1 FROM meta LIMIT 1").fetchone()
            return None, []

        await self._io.write(op)

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
        if self._io.commit_failure is not None:
            found.append(
                Problem(
                    "store_commit_failed",
                    f"the store's last commit failed: {self._io.commit_failure}",
                )
            )
        try:
            self.check_room()
        except errors.StoreFull as exc:
            found.append(Problem("store_low_space", exc.message))
        return found

    # -- reads -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> models.Job:
        return await self._io.read(lambda conn: rows.fetch(conn, job_id))

    async def list_jobs(self, query: JobQuery = ALL_JOBS) -> list[models.Job]:
        q = query
        clauses: list[str] = [] if q.children else ["instr(id, ':') = 0"]
        args: list[object] = []
        if q.target is not None:
            clauses.append("json_extract(CAST(spec AS TEXT), '$.target') = ?")
            args.append(q.target)
        for key, value in (q.labels or {}).items():
            clauses.append("json_extract(CAST(spec AS TEXT), '$.labels.' || json_quote(?)) = ?")
            args += [key, value]
        if q.name is not None:
            # A name never holds a glob's special characters: a plain one matches itself (by
            # the index); a job with no name is named by its id.
            clauses.append("(name GLOB ? OR (name IS NULL AND id GLOB ?))")
            args += [q.name, q.name]
        if q.since is not None:
            clauses.append("created_at >= ?")
            args.append(q.since)
        if q.id_prefix is not None:
            clauses.append("id >= ? AND id < ?")  # the primary key's range
            args += [q.id_prefix, q.id_prefix + "\U0010ffff"]
        if q.before is not None:
            clauses.append("id < ?")
            args.append(q.before)
        if q.peer_uid is not None:
            clauses.append("peer_uid = ?")
            args.append(q.peer_uid)
        if q.states is not None:
            wanted = [s.value for s in q.states]
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        if q.backend is not None:
            clauses.append("backend = ?")
            args.append(q.backend)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {rows.COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?"
        return await self._io.read(
            lambda conn: [rows.job_from_row(r) for r in conn.execute(sql, (*args, q.limit))]
        )

    async def unfinished(self) -> list[models.Job]:
        sql = f"SELECT {rows.COLUMNS} FROM jobs WHERE state NOT IN ({_TERMINAL_SQL}) ORDER BY id"
        return await self._io.read(lambda conn: [rows.job_from_row(r) for r in conn.execute(sql)])

    async def history(self, job_id: str) -> list[HistoryEntry]:
        def fetch(conn: sqlite3.Connection) -> list[HistoryEntry]:
            found = conn.execute(
                "SELECT at, from_state, to_state, reason, exit_code FROM events "
                "WHERE job_id = ? ORDER BY seq",
                (job_id,),
            )
            return [
                {"at": models.iso(at), "from": f, "to": t, "reason": r, "exit_code": c}
                for at, f, t, r, c in found
            ]

        return await self._io.read(fetch)

    async def events_since(
        self,
        since: int,
        *,
        job_id: str | None = None,
        peer_uid: int | None = None,
        limit: int = 1000,
    ) -> list[models.Event]:
        clauses, args = ["e.seq > ?"], [since]
        if job_id is not None:
            clauses.append("e.job_id = ?")
            args.append(job_id)  # type: ignore[arg-type]
        if peer_uid is not None:
            clauses.append("j.peer_uid = ?")
            args.append(peer_uid)
        sql = (
            f"SELECT {rows.EVENT_COLUMNS} FROM events e JOIN jobs j ON j.id = e.job_id "
            f"WHERE {' AND '.join(clauses)} ORDER BY e.seq LIMIT ?"
        )
        return await self._io.read(
            lambda conn: [rows.event_from_row(r) for r in conn.execute(sql, (*args, limit))]
        )

    async def attempts(self, job_id: str) -> list[AttemptEntry]:
        def fetch(conn: sqlite3.Connection) -> list[AttemptEntry]:
            found = conn.execute(
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
                for a, t, e, s, o in found
            ]

        return await self._io.read(fetch)

    async def definition(self, backend: str, digest: str) -> str | None:
        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT arn FROM definitions WHERE backend = ? AND digest = ?", (backend, digest)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._io.read(read)

    async def remember_definition(self, backend: str, digest: str, arn: str) -> None:
        def op(conn: sqlite3.Connection) -> tuple[None, list[models.Event]]:
            conn.execute(
                "INSERT OR REPLACE INTO definitions (backend, digest, arn, created_at) "
                "VALUES (?, ?, ?, ?)",
                (backend, digest, arn, self._clock()),
            )
            return None, []

        await self._io.write(op)

    async def dependents(self, job_id: str) -> list[str]:
        sql = "SELECT job_id FROM dependencies WHERE depends_on = ? ORDER BY job_id"
        return await self._io.read(lambda conn: [r[0] for r in conn.execute(sql, (job_id,))])

    async def count_children(self, parent_id: str) -> dict[str, int]:
        sql = "SELECT state, count(*) FROM jobs WHERE id > ? AND id < ? GROUP BY state"
        bounds = (f"{parent_id}:", f"{parent_id};")  # the primary key's range: ';' follows ':'
        return await self._io.read(lambda conn: dict(conn.execute(sql, bounds).fetchall()))

    async def count_by_state(self, peer_uid: int | None = None) -> dict[str, int]:
        where, args = ("", ()) if peer_uid is None else ("WHERE peer_uid = ? ", (peer_uid,))
        sql = f"SELECT state, COUNT(*) FROM jobs {where}GROUP BY state"

        def fetch(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute(sql, args).fetchall())

        return await self._io.read(fetch)


def _launching(conn: sqlite3.Connection, job_id: str) -> models.Job:
    """The job, whose current attempt must be launching (QUEUED): else `StaleState`."""
    job = rows.fetch(conn, job_id)
    if job.state != models.JobState.QUEUED or not job.launching:
        raise errors.StaleState(job_id, "QUEUED (launching)", job.state.value)
    return job
