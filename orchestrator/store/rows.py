"""Rows of the SQLite store and `models` values: a `jobs` row ↔ `models.Job`, an event row, the
bulk insert of new jobs, the idempotency-key lookup and the one function that changes a job's
state (`apply`, which writes its event row). All of it runs on the writer's or the reader's
connection, on their threads."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson
import pydantic

from orchestrator import errors, models
from orchestrator.store import protocol

COLUMNS = (
    "id, backend, spec, state, attempt, launching, token, external_id, exit_code, reason, "
    "vendor_status, stop_reason, peer_uid, peer_gid, peer_pid, created_at, updated_at, "
    "state_times, info"
)
_INSERT_EVENT = (
    "INSERT INTO events (job_id, at, from_state, to_state, reason, exit_code, failure) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DEPENDENCY = "INSERT OR IGNORE INTO dependencies (depends_on, job_id) VALUES (?, ?)"
_INSERT_JOB = (
    "INSERT INTO jobs (id, idempotency_key, backend, spec, state, peer_uid, peer_gid, "
    "peer_pid, created_at, updated_at, state_times, info) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, X'7B7D')"  # info: b'{}'
)


def job_from_row(row: Sequence[Any]) -> models.Job:
    peer = None if row[12] is None else models.Peer(uid=row[12], gid=row[13], pid=row[14])
    return models.Job(
        id=row[0],
        backend=row[1],
        spec=spec_from_json(row[2]),
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


def spec_from_json(data: bytes) -> models.JobSpec:
    """A stored spec. Validating it again is the fast path (pydantic-core parses the JSON;
    `model_construct` spends more on defaults); a spec that a newer version's rules refuse
    was valid when accepted, so it is kept as it is."""
    try:
        return models.JobSpec.model_validate_json(data)
    except pydantic.ValidationError:
        return models.JobSpec.model_construct(**orjson.loads(data))


def fetch(conn: sqlite3.Connection, job_id: str) -> models.Job:
    row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise errors.JobNotFound(job_id)
    return job_from_row(row)


def event_row(event: models.Event) -> tuple[Any, ...]:
    return (
        event.job_id,
        event.at,
        None if event.from_state is None else event.from_state.value,
        event.to_state.value,
        event.reason,
        event.exit_code,
        event.failure,
    )


def insert_event(conn: sqlite3.Connection, event: models.Event) -> models.Event:
    """Write `event`'s row: the event with its `seq` (the row's key: it grows with each)."""
    seq = conn.execute(_INSERT_EVENT, event_row(event)).lastrowid
    assert seq is not None
    return dataclasses.replace(event, seq=seq)


class NewJobs:
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
        self._events: list[models.Event] = []
        self._dependencies: list[tuple[str, str]] = []  # (the job waited for, the job waiting)
        self.accepted: list[models.Event] = []  # written so far, with their `seq`, in order

    def add(
        self, spec: models.JobSpec, backend: str, spec_json: bytes, job_id: str | None = None
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
            id=job_id or models.new_job_id(now),
            spec=spec,
            backend=backend,
            state=models.JobState.QUEUED,
            created_at=now,
            updated_at=now,
            state_times={models.JobState.QUEUED.value: now},
            peer=self._peer,
        )
        accepted = protocol.job_event(job, None)
        self._jobs.append(
            (
                job.id,
                scoped_key(spec.idempotency_key, self._peer),
                backend,
                spec_json,
                job.state.value,
                *self._peer_columns,
                now,
                now,
                self._state_times,
            )
        )
        self._events.append(accepted)
        self._dependencies += [(dep, job.id) for dep in spec.depends_on]
        return job, accepted

    def flush(self) -> None:
        if self._jobs:
            self._conn.executemany(_INSERT_JOB, self._jobs)
            self._conn.executemany(_INSERT_EVENT, [event_row(e) for e in self._events])
            if self._dependencies:
                self._conn.executemany(_INSERT_DEPENDENCY, self._dependencies)
                self._dependencies.clear()
            # One writer, one transaction: the rows just written took the keys right below
            # the last one, in order.
            (last,) = self._conn.execute("SELECT last_insert_rowid()").fetchone()
            first = last - len(self._events) + 1
            self.accepted += [
                dataclasses.replace(event, seq=first + i) for i, event in enumerate(self._events)
            ]
            self._jobs.clear()
            self._events.clear()


def scoped_key(key: str | None, peer: models.Peer | None) -> str | None:
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
        f"SELECT {COLUMNS} FROM jobs WHERE idempotency_key = ? "
        "OR (idempotency_key = ? AND peer_uid IS ?)",  # a key stored plain, before scoping
        (scoped_key(key, peer), key, None if peer is None else peer.uid),
    ).fetchone()
    if row is None:
        return None
    existing = job_from_row(row)
    protocol.check_same_spec(existing, spec, backend)
    return existing


def apply(
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
    """Move `job` (as just read) to `new` and write the event row: the one place a job's state
    changes. `IllegalTransition` if `models.can_transition` does not allow it."""
    if not models.can_transition(job.state, new):
        raise errors.IllegalTransition(job.id, job.state.value, new.value)
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
    updated = fetch(conn, job.id)
    return updated, [insert_event(conn, protocol.job_event(updated, job.state))]


def requeue(
    conn: sqlite3.Connection,
    job: models.Job,
    now: float,
    *,
    reason: str,
    outcome: str,
    info: dict[str, Any],
) -> tuple[models.Job, list[models.Event]]:
    """Send `job` (as just read), whose current attempt ended in a failure its retry policy
    retries, back to QUEUED for a new attempt, and write the event row: the one move back
    the store makes (`Store.retry`). The attempt keeps `outcome`; what belonged to it (its
    external id, exit code, vendor status, the times of its states) goes."""
    if job.state.terminal or job.state == models.JobState.QUEUED:
        raise errors.IllegalTransition(job.id, job.state.value, models.JobState.QUEUED.value)
    conn.execute(
        "UPDATE attempts SET outcome = ? WHERE job_id = ? AND attempt = ?",
        (outcome, job.id, job.attempt),
    )
    conn.execute(
        "UPDATE jobs SET state = ?, launching = 0, updated_at = ?, state_times = ?, reason = ?, "
        "exit_code = NULL, vendor_status = NULL, external_id = NULL, info = ? WHERE id = ?",
        (
            models.JobState.QUEUED.value,
            now,
            orjson.dumps({models.JobState.QUEUED.value: now}),
            reason,
            orjson.dumps({**job.info, **info}),
            job.id,
        ),
    )
    updated = fetch(conn, job.id)
    return updated, [insert_event(conn, protocol.job_event(updated, job.state))]


EVENT_COLUMNS = (
    "e.seq, e.job_id, j.backend, COALESCE(json_extract(CAST(j.spec AS TEXT), '$.name'), j.id), "
    "e.from_state, e.to_state, e.at, e.reason, e.exit_code, j.created_at, j.peer_uid, e.failure"
)


def event_from_row(row: Sequence[Any]) -> models.Event:
    """An `events` row joined with its job's (`EVENT_COLUMNS`)."""
    return models.Event(
        seq=row[0],
        job_id=row[1],
        backend=row[2],
        name=row[3],
        from_state=None if row[4] is None else models.JobState(row[4]),
        to_state=models.JobState(row[5]),
        at=row[6],
        reason=row[7],
        exit_code=row[8],
        created_at=row[9],
        peer_uid=row[10],
        failure=row[11],
    )
