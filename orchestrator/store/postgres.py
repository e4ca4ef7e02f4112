"""The job store on PostgreSQL (`store.url = "postgresql://…"`, issue #16): the `Store`
protocol's operations as SQL through asyncpg, passing the conformance suite the SQLite store
passes.

About 1,000 lines: the whole protocol in SQL, one short method per operation, as `sqlite.py` is
for SQLite (the schema is `pg_schema`'s, the lease's SQL `pg_lease`'s, publication `pg_feed`'s).

Each operation is a transaction of its own that locks the rows it changes (`FOR UPDATE`), so
that writes run side by side, a daemon's own as well as several daemons' on one database; one
that loses a race (a key two submissions share, a deadlock) is done again afresh. Event numbers
(`events.seq`) come from a sequence; a transaction that writes events first takes a
transaction-scoped advisory lock, so that numbers are handed out in commit order across daemons
(a reader catching up with `events_since` never finds a lower number committed after a higher
one it has seen); `pg_feed` publishes every daemon's events in that order. Writes to a job only
its driver may make are fenced (`_fence`): an AWS job's by the lease's token, a local job's by
its owner node. Reads go through a pool.

PostgreSQL's own failures are `StoreError`s; one that says the server cannot be reached
(refused, lost, restarting) is `StoreUnavailable`, and the problem `store_unreachable` until a
read or write reaches it again (the pool reconnects by itself).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import orjson
import structlog
from asyncpg import Record

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from orchestrator import errors, events, models
from orchestrator.engine import tracking
from orchestrator.settings import without_password
from orchestrator.store import pg_feed, pg_lease, pg_schema, rows
from orchestrator.store.protocol import (
    ALL_JOBS,
    PURGE_SLICE,
    AcceptOutcome,
    AttemptEntry,
    HistoryEntry,
    JobQuery,
    Problem,
    Store,
    check_same_spec,
    job_event,
)

# What the rest of the package (and the tests) take from here.
SCHEMA, SCHEMA_VERSION, sql, glob_regex = (
    pg_schema.SCHEMA,
    pg_schema.SCHEMA_VERSION,
    pg_schema.sql,
    pg_schema.glob_regex,
)
Lease = pg_lease.Lease
T = TypeVar("T")
S = models.JobState
log = structlog.get_logger("orchestrator.store")
LOCAL = "local"  # the backend whose jobs belong to one daemon (node); every other needs the lease
_EVENTS_LOCK = 0x6F72636865657674  # pg_advisory_xact_lock key: numbering events in commit order
_TERMINAL = [s.value for s in sorted(models.TERMINAL)]
_COLUMNS = rows.COLUMNS
_EVENT_COLUMNS = (
    "e.seq, e.job_id, j.backend, COALESCE(j.name, j.id), e.from_state, e.to_state, e.at, "
    "e.reason, e.exit_code, j.created_at, j.peer_uid, e.failure"
)
_Written = tuple[models.Job, list[models.Event]]
# What a write does again (at most `_RETRIES` times), the transaction having lost a race with
# another's: two new jobs under one idempotency key (the second finds the first), a deadlock.
_RETRIES = 3
_RETRIED = (
    asyncpg.UniqueViolationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
if TYPE_CHECKING:
    _Conn = PoolConnectionProxy[Record]  # every connection comes from the pool


class PostgresStore(Store):
    def __init__(
        self,
        url: str,
        hub: events.Hub,
        clock: Callable[[], float] = time.time,
        *,
        pool_size: int = 6,
        node: str | None = None,
        idle_in_transaction_s: float = 5.0,
    ) -> None:
        self._url = url
        self._hub = hub
        self._clock = clock
        self._pool_size = pool_size
        self._idle_s = idle_in_transaction_s
        self._in_doubt_s = (
            idle_in_transaction_s + 5.0
        )  # how long an unanswered COMMIT is asked about
        self._pool: asyncpg.Pool[Record] | None = None
        # Writes run side by side, each on a connection of the pool (row locks keep them
        # apart); the connections whose transaction has checked the lease (`_fence`).
        self._lease_checked: set[int] = set()
        self._commit_failure: str | None = None
        self._unreachable: str | None = None  # why the server cannot be reached, if it cannot
        # Sharing the database with other daemons (issue #16): this daemon's node name, which
        # fences its writes (`_fence`). None: the only daemon on it (the conformance suite).
        self.node = node
        # The fencing token of the lease this daemon holds (`cluster.Cluster` sets it), which
        # every write it makes to an AWS job checks in its transaction; None: not the leader.
        self.lease_token: int | None = None
        self.on_fenced: Callable[[str], None] = lambda why: None  # a write was refused: why
        # Every daemon's committed changes to the hub, in commit order (`pg_feed`).
        self._feed = pg_feed.Feed(hub, lambda since, limit: self.events_since(since, limit=limit))

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=60,
                # A transaction whose client went silent (a stalled link) must not hold its
                # locks (a job's row, the lease's, the events' numbering) for long: the server
                # ends it. Ours never wait for anything but the server within a transaction.
                server_settings={
                    "idle_in_transaction_session_timeout": str(int(self._idle_s * 1000))
                },
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise errors.StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        assert pool is not None
        try:
            async with pool.acquire() as conn:
                await conn.execute("SELECT pg_advisory_lock($1)", pg_schema.MIGRATION_LOCK)
                try:
                    await pg_schema.check_or_create(conn, without_password(self._url))
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", pg_schema.MIGRATION_LOCK)
                last = await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events")
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._feed.published = int(last)
        self._hub.committed_up_to(int(last))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()  # the writes under way finish first

    # -- health ----------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._write(lambda conn: self._nothing(conn))

    @staticmethod
    async def _nothing(conn: _Conn) -> tuple[None, list[models.Event]]:
        await conn.fetchval("SELECT 1")
        return None, []

    def problems(self) -> list[Problem]:
        if self._unreachable is not None:
            said = f"PostgreSQL cannot be reached: {self._unreachable}"
            return [Problem("store_unreachable", said)]
        if self._commit_failure is None:
            return []
        return [
            Problem(
                "store_commit_failed", f"the store's last commit failed: {self._commit_failure}"
            )
        ]

    def free_bytes(self) -> int | None:
        return None  # the database's disk is PostgreSQL's to watch

    def check_room(self) -> None:
        return None

    # -- the two ways in -------------------------------------------------------------------

    def _pool_or_fail(self) -> asyncpg.Pool[Record]:
        if self._pool is None:
            raise errors.StoreError("the store is not open")
        return self._pool

    async def _write(self, op: Callable[[_Conn], Awaitable[tuple[T, list[models.Event]]]]) -> T:
        """Run `op` in a transaction of its own; publish its events once committed. A
        connection lost while committing leaves the outcome in doubt: the transaction's id
        says, once the server can be asked, whether it committed (`_committed`)."""
        pool = self._pool_or_fail()
        for retries_left in range(_RETRIES, -1, -1):
            txid, committing, checking = 0, False, 0
            try:
                async with pool.acquire() as conn, conn.transaction():
                    checking = id(conn)  # whose lease check holds for this transaction only
                    txid = int(await conn.fetchval("SELECT txid_current()"))
                    result, changes = await op(conn)
                    self._feed.mine(changes)  # before the feed can see them
                    committing = True
            except _RETRIED as exc:  # another transaction won a race: do it again, afresh
                if not retries_left:
                    raise errors.StoreError(f"commit failed: {exc}") from exc
                continue
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._commit_failure = str(exc)
                self._unreachable = _unreachable(exc)
                outcome = await self._committed(pool, txid) if committing else False
                if outcome is None:
                    raise errors.StoreError(
                        "the connection to PostgreSQL was lost while committing, and whether "
                        f"this was recorded cannot be known yet: {exc}"
                    ) from exc
                if not outcome:
                    if self._unreachable is not None:
                        raise errors.StoreUnavailable(
                            f"not recorded: PostgreSQL cannot be reached: {self._unreachable}"
                        ) from exc
                    raise errors.StoreError(f"commit failed: {exc}") from exc
                log.info("store.commit_confirmed", txid=txid, error=str(exc))
            finally:
                self._lease_checked.discard(checking)
            break
        self._commit_failure = self._unreachable = None
        if changes:
            await self._feed.publish_mine(changes)
        return result

    async def _committed(self, pool: asyncpg.Pool[Record], txid: int) -> bool | None:
        """Whether the transaction `txid`, whose COMMIT was sent and not answered, committed;
        None if the server cannot tell in time. A transaction cut off before its COMMIT
        reached the server is aborted once the server sees the session gone or idle for
        `idle_in_transaction_session_timeout`: asked until then."""
        deadline = time.monotonic() + self._in_doubt_s
        delay = 0.05
        while True:
            try:
                async with pool.acquire() as conn:
                    status = await conn.fetchval("SELECT txid_status($1)", txid, timeout=2.0)
                if status in ("committed", "aborted"):
                    return bool(status == "committed")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def follow(
        self, on_stop: Callable[[str], None], on_connected: Callable[[], None]
    ) -> None:
        """The feed of every daemon's changes (`pg_feed.Feed.follow`): runs until cancelled."""
        await self._feed.follow(self._url, on_stop, on_connected)

    async def _read(self, op: Callable[[_Conn], Awaitable[T]]) -> T:
        pool = self._pool_or_fail()
        try:
            async with pool.acquire() as conn:
                found = await op(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._unreachable = _unreachable(exc)
            if self._unreachable is not None:
                raise errors.StoreUnavailable(
                    f"PostgreSQL cannot be reached: {self._unreachable}"
                ) from exc
            raise errors.StoreError(f"read failed: {exc}") from exc
        self._unreachable = None
        return found

    # -- rows ------------------------------------------------------------------------------

    @staticmethod
    async def _fetch(conn: _Conn, job_id: str, *, lock: bool = False) -> models.Job:
        """The job's row; with `lock`, locked until the transaction ends (another daemon's
        write to it waits: each write reads the state it changes)."""
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM jobs WHERE id = $1{' FOR UPDATE' if lock else ''}", job_id
        )
        if row is None:
            raise errors.JobNotFound(job_id)
        return rows.job_from_row(tuple(row))

    async def _locked(self, conn: _Conn, job_id: str) -> models.Job:
        """The job's row, locked, for a write only its driver may make (`_fence`)."""
        job = await self._fetch(conn, job_id, lock=True)
        await self._fence(conn, job)
        return job

    async def _fence(self, conn: _Conn, job: models.Job) -> None:
        """Refuse (`Fenced`) a write this daemon may not make on a database it shares: to a
        local job another daemon owns, or to an AWS job unless the lease it holds is still the
        current one — checked in the write's own transaction, the lease row locked (FOR SHARE)
        so that no daemon takes the lease over until this write has committed or failed."""
        if self.node is None:
            return
        if job.backend == LOCAL:
            if job.owner in (None, self.node):
                return
            raise errors.Fenced(
                f"write refused: local job {job.id} belongs to {job.owner}, not to {self.node}"
            )
        if id(conn) in self._lease_checked:
            return
        if self.lease_token is None:
            why = f"{self.node} does not hold the lease on the AWS backends"
        elif await pg_lease.still_current(conn, self.lease_token):
            self._lease_checked.add(id(conn))
            return
        else:
            why = f"the lease with fencing token {self.lease_token} is no longer {self.node}'s"
        self.on_fenced(why)
        raise errors.Fenced(f"write refused: {why}")

    @staticmethod
    async def _insert_event(conn: _Conn, event: models.Event) -> models.Event:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _EVENTS_LOCK)
        seq = await conn.fetchval(
            "INSERT INTO events (job_id, at, from_state, to_state, reason, exit_code, failure) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
            *rows.event_row(event),
        )
        return dataclasses.replace(event, seq=int(seq))

    async def _apply(
        self,
        conn: _Conn,
        job: models.Job,
        new: models.JobState,
        *,
        reason: str | None,
        exit_code: int | None = None,
        vendor_status: str | None = None,
        external_id: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> _Written:
        """`rows.apply` on PostgreSQL: the one place a job's state changes, with its event."""
        if not models.can_transition(job.state, new):
            raise errors.IllegalTransition(job.id, job.state.value, new.value)
        now = self._clock()
        await conn.execute(
            "UPDATE jobs SET state = $1, updated_at = $2, state_times = $3, reason = $4, "
            "exit_code = COALESCE($5, exit_code), vendor_status = COALESCE($6, vendor_status), "
            "external_id = COALESCE($7, external_id), info = $8 WHERE id = $9",
            new.value,
            now,
            _json({**job.state_times, new.value: now}),
            reason,
            exit_code,
            vendor_status,
            external_id,
            _json({**job.info, **(info or {})}),
            job.id,
        )
        updated = await self._fetch(conn, job.id)
        return updated, [await self._insert_event(conn, job_event(updated, job.state))]

    # -- writes ----------------------------------------------------------------------------

    async def accept_many(
        self, specs: Sequence[tuple[models.JobSpec, str]], peer: models.Peer | None
    ) -> list[AcceptOutcome]:
        now = self._clock()
        encoded = [
            (spec, backend, spec.model_dump_json(exclude_defaults=True)) for spec, backend in specs
        ]

        async def op(conn: _Conn) -> tuple[list[AcceptOutcome], list[models.Event]]:
            outcomes: list[AcceptOutcome] = []
            new_jobs = _NewJobs(conn, peer, now, self.node)
            for spec, backend, data in encoded:
                try:
                    outcomes.append(await new_jobs.add(spec, backend, data))
                except errors.IdempotencyConflict as exc:
                    outcomes.append(exc)
            await new_jobs.flush()
            return outcomes, new_jobs.accepted

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
        async def op(conn: _Conn) -> _Written:
            job = await self._locked(conn, job_id)
            if job.state != expected:
                raise errors.StaleState(job_id, expected.value, job.state.value)
            return await self._apply(
                conn,
                job,
                new,
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
        async def op(conn: _Conn) -> _Written:
            job = await self._locked(conn, job_id)
            await conn.execute(
                "UPDATE jobs SET vendor_status = $1, reason = COALESCE($2, reason), info = $3 "
                "WHERE id = $4",
                vendor_status,
                reason,
                _json({**job.info, **(info or {})}),
                job_id,
            )
            return await self._fetch(conn, job_id), []

        return await self._write(op)

    async def relocate(self, job_id: str, external_id: str) -> models.Job:
        async def op(conn: _Conn) -> _Written:
            job = await self._locked(conn, job_id)
            await conn.execute(
                "UPDATE jobs SET external_id = $1 WHERE id = $2", external_id, job_id
            )
            await conn.execute(
                "UPDATE attempts SET external_id = $1 WHERE job_id = $2 AND attempt = $3",
                external_id,
                job_id,
                job.attempt,
            )
            return await self._fetch(conn, job_id), []

        return await self._write(op)

    async def begin_attempt(self, job_id: str) -> models.Job | None:
        async def op(conn: _Conn) -> tuple[models.Job | None, list[models.Event]]:
            job = await self._locked(conn, job_id)
            if job.state != S.QUEUED or job.launching or job.stop_reason:
                return None, []
            attempt, now = job.attempt + 1, self._clock()
            token = f"{job.id}-{attempt}"
            await conn.execute(
                "UPDATE jobs SET attempt = $1, token = $2, launching = true, updated_at = $3, "
                "info = $4 WHERE id = $5",
                attempt,
                token,
                now,
                _json({**job.info, "attempt_started_at": now}),
                job_id,
            )
            await conn.execute(
                "INSERT INTO attempts (job_id, attempt, token, started_at) VALUES ($1, $2, $3, $4)",
                job_id,
                attempt,
                token,
                now,
            )
            return await self._fetch(conn, job_id), []

        return await self._write(op)

    async def _launching(self, conn: _Conn, job_id: str) -> models.Job:
        job = await self._locked(conn, job_id)
        if job.state != S.QUEUED or not job.launching:
            raise errors.StaleState(job_id, "QUEUED (launching)", job.state.value)
        return job

    async def record_submitted(
        self,
        job_id: str,
        *,
        external_id: str,
        state: models.JobState,
        vendor_status: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        async def op(conn: _Conn) -> _Written:
            job = await self._launching(conn, job_id)
            await conn.execute(
                "UPDATE attempts SET external_id = $1, outcome = 'submitted' "
                "WHERE job_id = $2 AND attempt = $3",
                external_id,
                job_id,
                job.attempt,
            )
            await conn.execute("UPDATE jobs SET launching = false WHERE id = $1", job_id)
            return await self._apply(
                conn,
                job,
                state,
                reason=None,
                vendor_status=vendor_status,
                external_id=external_id,
                info=info,
            )

        return await self._write(op)

    async def record_start_failure(
        self, job_id: str, reason: str, *, final: bool, failure: str = "start"
    ) -> models.Job:
        async def op(conn: _Conn) -> _Written:
            job = await self._launching(conn, job_id)
            await conn.execute(
                "UPDATE attempts SET outcome = $1 WHERE job_id = $2 AND attempt = $3",
                f"start failed: {reason}",
                job_id,
                job.attempt,
            )
            await conn.execute(
                "UPDATE jobs SET launching = false, reason = $1 WHERE id = $2", reason, job_id
            )
            job = await self._fetch(conn, job_id)
            if not final:
                return job, []
            return await self._apply(conn, job, S.FAILED, reason=reason, info={"failure": failure})

        return await self._write(op)

    async def retry(
        self,
        job_id: str,
        expected: models.JobState,
        *,
        reason: str,
        outcome: str,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        async def op(conn: _Conn) -> _Written:
            job = await self._locked(conn, job_id)
            if job.state != expected:
                raise errors.StaleState(job_id, expected.value, job.state.value)
            if job.stop_reason is not None:
                raise errors.StaleState(job_id, expected.value, f"{job.state.value}, stopping")
            if job.state.terminal or job.state == S.QUEUED:
                raise errors.IllegalTransition(job.id, job.state.value, S.QUEUED.value)
            now = self._clock()
            await conn.execute(
                "UPDATE attempts SET outcome = $1 WHERE job_id = $2 AND attempt = $3",
                outcome,
                job.id,
                job.attempt,
            )
            await conn.execute(
                "UPDATE jobs SET state = $1, launching = false, updated_at = $2, "
                "state_times = $3, reason = $4, exit_code = NULL, vendor_status = NULL, "
                "external_id = NULL, info = $5 WHERE id = $6",
                S.QUEUED.value,
                now,
                _json({S.QUEUED.value: now}),
                reason,
                _json({**job.info, **(info or {})}),
                job.id,
            )
            updated = await self._fetch(conn, job.id)
            return updated, [await self._insert_event(conn, job_event(updated, job.state))]

        return await self._write(op)

    async def expand(
        self, parent_id: str, children: Sequence[models.JobSpec]
    ) -> tuple[models.Job, list[models.Job]]:
        now = self._clock()
        encoded = [spec.model_dump_json(exclude_defaults=True) for spec in children]

        async def op(
            conn: _Conn,
        ) -> tuple[tuple[models.Job, list[models.Job]], list[models.Event]]:
            parent = await self._locked(conn, parent_id)
            if parent.state != S.QUEUED or parent.launching or parent.stop_reason is not None:
                raise errors.StaleState(parent_id, "QUEUED", parent.state.value)
            new_jobs = _NewJobs(conn, parent.peer, now, parent.owner)
            made = [
                (await new_jobs.add(spec, parent.backend, data, f"{parent_id}:{index}"))[0]
                for index, (spec, data) in enumerate(zip(children, encoded, strict=True))
            ]
            await new_jobs.flush()
            changes = new_jobs.accepted
            parent, moved = await self._apply(
                conn,
                parent,
                S.SUBMITTED,
                reason=f"expanded into {len(made)} child jobs",
                info={"array_status": {S.QUEUED.value: len(made)}},
            )
            return (parent, made), [*changes, *moved]

        return await self._write(op)

    async def _stop(self, conn: _Conn, job: models.Job, why: models.StopReason) -> _Written:
        if job.state.terminal:
            return job, []
        if job.state == S.QUEUED and not job.launching:
            final, reason = tracking.stopped_outcome(job, why)
            await conn.execute("UPDATE jobs SET stop_reason = $1 WHERE id = $2", why, job.id)
            return await self._apply(
                conn,
                await self._fetch(conn, job.id),
                final,
                reason=reason,
                info={"failure": tracking.stop_failure(why)},
            )
        if job.stop_reason is None:
            await conn.execute("UPDATE jobs SET stop_reason = $1 WHERE id = $2", why, job.id)
        return await self._fetch(conn, job.id), []

    async def request_stop(self, job_id: str, why: models.StopReason) -> models.Job:
        """Anyone's to record (a user's cancel, on any daemon); a job launched is stopped by
        its driver, which a notification tells at the commit."""

        async def op(conn: _Conn) -> _Written:
            stopped, changes = await self._stop(
                conn, await self._fetch(conn, job_id, lock=True), why
            )
            if self.node is not None and not stopped.state.terminal:
                await conn.execute("SELECT pg_notify($1, $2)", pg_feed.STOPS_CHANNEL, job_id)
            return stopped, changes

        return await self._write(op)

    async def stop_children(self, parent_id: str, why: models.StopReason) -> list[models.Job]:
        async def op(conn: _Conn) -> tuple[list[models.Job], list[models.Event]]:
            found = await conn.fetch(
                f"SELECT {_COLUMNS} FROM jobs WHERE id > $1 AND id < $2 "
                "AND NOT (state = ANY($3::text[])) AND stop_reason IS NULL ORDER BY id "
                "FOR UPDATE",
                f"{parent_id}:",
                f"{parent_id};",
                _TERMINAL,
            )
            launched, changes = [], []
            for row in found:
                child = rows.job_from_row(tuple(row))
                await self._fence(conn, child)
                stopped, moved = await self._stop(conn, child, why)
                changes += moved
                if not stopped.state.terminal:
                    launched.append(stopped)
            return launched, changes

        return await self._write(op)

    async def purge(self, older_than: float) -> list[str]:
        async def op(conn: _Conn) -> tuple[list[str], list[models.Event]]:
            ids = [
                r[0]
                for r in await conn.fetch(
                    "SELECT id FROM jobs WHERE state = ANY($1::text[]) AND updated_at < $2 "
                    "LIMIT $3",
                    _TERMINAL,
                    older_than,
                    PURGE_SLICE,
                )
            ]
            for table, column in (
                ("events", "job_id"),
                ("attempts", "job_id"),
                ("dependencies", "job_id"),
                ("dependencies", "depends_on"),
                ("jobs", "id"),
            ):
                await conn.execute(f"DELETE FROM {table} WHERE {column} = ANY($1::text[])", ids)
            return ids, []

        return await self._write(op)

    async def remember_definition(self, backend: str, digest: str, arn: str) -> None:
        async def op(conn: _Conn) -> tuple[None, list[models.Event]]:
            await conn.execute(
                "INSERT INTO definitions (backend, digest, arn, created_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (backend, digest) "
                "DO UPDATE SET arn = EXCLUDED.arn, created_at = EXCLUDED.created_at",
                backend,
                digest,
                arn,
                self._clock(),
            )
            return None, []

        await self._write(op)

    # -- several daemons: the lease, the nodes, orphaned local jobs ---------------------------

    async def lease(self) -> Lease | None:
        """The lease as the database has it now (its holder may have let it lapse)."""
        return await self._read(pg_lease.read)

    async def acquire_lease(self, ttl_s: float) -> Lease | None:
        """Take the lease if nobody holds it or its holder let it lapse (on the database's
        clock), with a fencing token one higher than any before; None if another holds it."""
        assert self.node is not None
        node = self.node
        return await self._read(lambda conn: pg_lease.acquire(conn, node, ttl_s))

    async def renew_lease(self, token: int, ttl_s: float) -> Lease | None:
        """Extend the lease held with `token`; None if it lapsed or passed to another."""
        return await self._read(lambda conn: pg_lease.renew(conn, token, ttl_s))

    async def release_lease(self, token: int) -> None:
        """Let the lease held with `token` lapse now (a clean stop: no wait for the TTL)."""
        await self._read(lambda conn: pg_lease.release(conn, token))

    async def heartbeat(self, host: str, pid: int, version: str) -> None:
        """Say this node is here (its local jobs are not orphans), on the database's clock."""
        assert self.node is not None
        node = self.node
        await self._read(lambda conn: pg_lease.heartbeat(conn, node, host, pid, version))

    async def presence(self) -> pg_lease.Presence | None:
        """This node's row as the database has it (another daemon's of the same name?)."""
        assert self.node is not None
        node = self.node
        return await self._read(lambda conn: pg_lease.presence(conn, node))

    async def sweep_orphans(self, stale_s: float, timeout_s: float) -> list[models.Job]:
        """Any daemon's look at the local jobs of nodes not seen for `stale_s`: each says so
        ("owner h2 unreachable since …"), and is LOST once that is `timeout_s` ago. Each job's
        row is locked and read again, so that the same sweep made by two daemons (or an owner
        back meanwhile) changes it once. The jobs changed."""

        async def op(conn: _Conn) -> tuple[list[models.Job], list[models.Event]]:
            found = await conn.fetch(
                "SELECT j.id, j.info::jsonb ->> 'owner', extract(epoch FROM n.seen_at), "
                "extract(epoch FROM clock_timestamp()) FROM jobs j LEFT JOIN nodes n "
                "ON n.node = j.info::jsonb ->> 'owner' WHERE j.backend = $1 "
                "AND NOT (j.state = ANY($2::text[])) AND j.info::jsonb ->> 'owner' <> $3 "
                "AND (n.seen_at IS NULL "
                "OR n.seen_at < clock_timestamp() - $4 * interval '1s') ORDER BY j.id",
                LOCAL,
                _TERMINAL,
                self.node,
                stale_s,
            )
            changed, changes = [], []
            for job_id, owner, seen, now in found:
                job = await self._fetch(conn, job_id, lock=True)
                if job.state.terminal:
                    continue
                since = float(seen) if seen is not None else job.updated_at
                said = f"owner {owner} unreachable since {models.iso(since)}"
                if float(now) - since >= timeout_s:
                    job, moved = await self._apply(
                        conn,
                        job,
                        S.LOST,
                        reason=f"{said}: lost after local.orphan_timeout_s ({timeout_s:g}s)",
                        info={"failure": "infrastructure"},
                    )
                    changes += moved
                elif job.info.get("owner_unreachable_since") is None:
                    await conn.execute(
                        "UPDATE jobs SET reason = $1, info = $2 WHERE id = $3",
                        said,
                        _json({**job.info, "owner_unreachable_since": models.iso(since)}),
                        job_id,
                    )
                    job = await self._fetch(conn, job_id)
                else:
                    continue
                changed.append(job)
            return changed, changes

        return await self._write(op)

    # -- reads -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> models.Job:
        return await self._read(lambda conn: self._fetch(conn, job_id))

    async def get_many(self, job_ids: Sequence[str]) -> list[models.Job]:
        """The jobs of these ids that exist (another daemon's news, taken in one read)."""

        async def read(conn: _Conn) -> list[models.Job]:
            found = await conn.fetch(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ANY($1::text[])", list(job_ids)
            )
            return [rows.job_from_row(tuple(row)) for row in found]

        return await self._read(read)

    async def list_jobs(self, query: JobQuery = ALL_JOBS) -> list[models.Job]:
        q = query
        clauses: list[str] = [] if q.children else ["position(':' in id) = 0"]
        args: list[object] = []
        if q.target is not None:
            clauses.append("(spec::jsonb ->> 'target') = ?")
            args.append(q.target)
        for key, value in (q.labels or {}).items():
            clauses.append("(spec::jsonb -> 'labels' ->> ?) = ?")
            args += [key, value]
        if q.name is not None:
            clauses.append("(name ~ ? OR (name IS NULL AND id ~ ?))")
            args += [glob_regex(q.name)] * 2
        if q.since is not None:
            clauses.append("created_at >= ?")
            args.append(q.since)
        if q.id_prefix is not None:
            clauses.append("id >= ? AND id < ?")
            args += [q.id_prefix, q.id_prefix + "\U0010ffff"]
        if q.before is not None:
            clauses.append("id < ?")
            args.append(q.before)
        if q.peer_uid is not None:
            clauses.append("peer_uid = ?")
            args.append(q.peer_uid)
        if q.states is not None:
            clauses.append("state = ANY(?::text[])")
            args.append([s.value for s in q.states])
        if q.backend is not None:
            clauses.append("backend = ?")
            args.append(q.backend)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query_sql = sql(f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?")

        async def read(conn: _Conn) -> list[models.Job]:
            found = await conn.fetch(query_sql, *args, q.limit)
            return [rows.job_from_row(tuple(r)) for r in found]

        return await self._read(read)

    async def unfinished(self) -> list[models.Job]:
        async def read(conn: _Conn) -> list[models.Job]:
            found = await conn.fetch(
                f"SELECT {_COLUMNS} FROM jobs WHERE NOT (state = ANY($1::text[])) ORDER BY id",
                _TERMINAL,
            )
            return [rows.job_from_row(tuple(r)) for r in found]

        return await self._read(read)

    async def history(self, job_id: str) -> list[HistoryEntry]:
        async def read(conn: _Conn) -> list[HistoryEntry]:
            found = await conn.fetch(
                "SELECT at, from_state, to_state, reason, exit_code FROM events "
                "WHERE job_id = $1 ORDER BY seq",
                job_id,
            )
            return [
                {"at": models.iso(at), "from": f, "to": t, "reason": r, "exit_code": c}
                for at, f, t, r, c in found
            ]

        return await self._read(read)

    async def attempts(self, job_id: str) -> list[AttemptEntry]:
        async def read(conn: _Conn) -> list[AttemptEntry]:
            found = await conn.fetch(
                "SELECT attempt, token, external_id, started_at, outcome FROM attempts "
                "WHERE job_id = $1 ORDER BY attempt",
                job_id,
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

        return await self._read(read)

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
        query = sql(
            f"SELECT {_EVENT_COLUMNS} FROM events e JOIN jobs j ON j.id = e.job_id "
            f"WHERE {' AND '.join(clauses)} ORDER BY e.seq LIMIT ?"
        )

        async def read(conn: _Conn) -> list[models.Event]:
            return [rows.event_from_row(tuple(r)) for r in await conn.fetch(query, *args, limit)]

        return await self._read(read)

    async def count_by_state(self, peer_uid: int | None = None) -> dict[str, int]:
        async def read(conn: _Conn) -> dict[str, int]:
            if peer_uid is None:
                found = await conn.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
            else:
                found = await conn.fetch(
                    "SELECT state, count(*) FROM jobs WHERE peer_uid = $1 GROUP BY state",
                    peer_uid,
                )
            return {state: int(count) for state, count in found}

        return await self._read(read)

    async def dependents(self, job_id: str) -> list[str]:
        async def read(conn: _Conn) -> list[str]:
            found = await conn.fetch(
                "SELECT job_id FROM dependencies WHERE depends_on = $1 ORDER BY job_id", job_id
            )
            return [r[0] for r in found]

        return await self._read(read)

    async def count_children(self, parent_id: str) -> dict[str, int]:
        async def read(conn: _Conn) -> dict[str, int]:
            found = await conn.fetch(
                "SELECT state, count(*) FROM jobs WHERE id > $1 AND id < $2 GROUP BY state",
                f"{parent_id}:",
                f"{parent_id};",
            )
            return {state: int(count) for state, count in found}

        return await self._read(read)

    async def definition(self, backend: str, digest: str) -> str | None:
        async def read(conn: _Conn) -> str | None:
            found = await conn.fetchval(
                "SELECT arn FROM definitions WHERE backend = $1 AND digest = $2", backend, digest
            )
            return None if found is None else str(found)

        return await self._read(read)


class _NewJobs:
    """A run of new jobs written with one statement per table (the bulk ingest path spends
    its time per row otherwise), and their acceptance events numbered in order. A job with an
    idempotency key is looked up first, after the rows before it are written, so a key
    repeated within one run is found."""

    def __init__(
        self, conn: _Conn, peer: models.Peer | None, now: float, owner: str | None
    ) -> None:
        self._conn = conn
        # The node a new local job belongs to (the daemon that accepted it), in its `info`.
        self._owned = _json({"owner": owner}) if owner is not None else "{}"
        self._owner = owner
        self._peer = peer
        self._now = now
        self._peer_columns = (None, None, None) if peer is None else (peer.uid, peer.gid, peer.pid)
        self._state_times = _json({S.QUEUED.value: now})
        self._rows: list[tuple[Any, ...]] = []
        self._dependencies: list[tuple[str, str]] = []
        self._jobs: list[models.Job] = []
        self.accepted: list[models.Event] = []  # written so far, with their `seq`, in order

    async def add(
        self, spec: models.JobSpec, backend: str, data: str, job_id: str | None = None
    ) -> tuple[models.Job, bool]:
        """The new job (True), or the one this submitter's key already names (False); a
        different spec under that key raises `IdempotencyConflict` before anything is written."""
        key = rows.scoped_key(spec.idempotency_key, self._peer)
        if key is not None:
            await self.flush()
            row = await self._conn.fetchrow(
                f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = $1 "
                "OR (idempotency_key = $2 AND peer_uid IS NOT DISTINCT FROM $3)",
                key,
                spec.idempotency_key,
                None if self._peer is None else self._peer.uid,
            )
            if row is not None:
                existing = rows.job_from_row(tuple(row))
                check_same_spec(existing, spec, backend)
                return existing, False
        now = self._now
        job = models.Job(
            id=job_id or models.new_job_id(now),
            spec=spec,
            backend=backend,
            state=S.QUEUED,
            created_at=now,
            updated_at=now,
            state_times={S.QUEUED.value: now},
            peer=self._peer,
            info={"owner": self._owner} if backend == LOCAL and self._owner is not None else {},
        )
        self._rows.append(
            (
                job.id,
                key,
                backend,
                data,
                S.QUEUED.value,
                *self._peer_columns,
                now,
                now,
                self._state_times,
                self._owned if backend == LOCAL else "{}",
            )
        )
        self._dependencies += [(dep, job.id) for dep in spec.depends_on]
        self._jobs.append(job)
        return job, True

    async def flush(self) -> None:
        if not self._rows:
            return
        conn = self._conn
        await conn.executemany(
            "INSERT INTO jobs (id, idempotency_key, backend, spec, state, peer_uid, peer_gid, "
            "peer_pid, created_at, updated_at, state_times, info) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            self._rows,
        )
        if self._dependencies:
            await conn.executemany(
                "INSERT INTO dependencies (depends_on, job_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                self._dependencies,
            )
        events = [job_event(job, None) for job in self._jobs]
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _EVENTS_LOCK)
        # One statement: its rows take their numbers in the arrays' order, so the numbers,
        # sorted, are the events' in order (no other writer numbers meanwhile: the lock).
        found = await conn.fetch(
            "INSERT INTO events (job_id, at, from_state, to_state, reason, exit_code, failure) "
            "SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[], "
            "$5::text[], $6::int[], $7::text[]) RETURNING seq",
            [e.job_id for e in events],
            [e.at for e in events],
            [None] * len(events),
            [e.to_state.value for e in events],
            [e.reason for e in events],
            [e.exit_code for e in events],
            [e.failure for e in events],
        )
        seqs = sorted(int(r[0]) for r in found)
        self.accepted += [
            dataclasses.replace(e, seq=seq) for e, seq in zip(events, seqs, strict=True)
        ]
        self._rows.clear()
        self._dependencies.clear()
        self._jobs.clear()


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _unreachable(exc: BaseException) -> str | None:
    """Why the server cannot be reached, if that is what `exc` says (a refused or lost
    connection, a server shutting down or starting); None for any other failure."""
    if isinstance(
        exc,
        OSError
        | asyncpg.InterfaceError
        | asyncpg.ConnectionDoesNotExistError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError,
    ):
        return str(exc) or type(exc).__name__
    return None
