"""What the daemon asks of a job store: the `Store` protocol, and the types of its answers.

Two implementations pass one conformance suite (`tests/store_conformance.py`): `SqliteStore`
(the daemon's) and `orchestrator.testing.InMemoryStore`. What every implementation must do:

- **Legal transitions only**, on every write path: a job's state moves as
  `models.can_transition` allows (forward, or to a terminal state, never out of one). A write
  that would break that raises `IllegalTransition`; a compare-and-set that finds another state
  than the caller expected raises `StaleState`. A refused write changes nothing.
- **Durable before answered, published after**: a write returns once it is durable (for an
  in-memory store: once it is made); the events it caused (`models.Event`, one per state
  change, the acceptance of a new job included) are published to the `events.Hub` the store
  was built with, in commit order, before the write returns to its caller.
- **Events are numbered** in commit order (`Event.seq`, growing, never reused, across
  restarts), and can be read again from any number on (`events_since`): a watcher that lost
  its connection catches up from the last one it saw.
- **Idempotency keys per submitter**: a spec's key names at most one job per submitter uid
  (and one for jobs with no recorded submitter). The same key with the same spec is the same
  job (not created again, no event); with a different spec (or backend) it is an
  `IdempotencyConflict`. Another submitter's key of the same text is another key.
- **One attempt at a time**: `begin_attempt` numbers attempts 1, 2, ... and gives each the token
  `<job id>-<attempt>`; `record_submitted` and `record_start_failure` settle the current one.
- **One way back**: `retry` is the only write that moves a job to an earlier state (a launched
  one back to QUEUED, for a new attempt); every other move is forward.
- **Stops are durable requests**: `request_stop` ends a job no backend has seen (QUEUED, not
  launching) at once, as `engine.tracking.stopped_outcome` says; any other unfinished job keeps
  its state (the first reason asked for is kept) until its backend reports it ended.
- **Refuse a newer schema**: `open` raises `StoreTooNew` for data written by a newer
  orchestrator (`schema_version` above the one the implementation knows), before it changes
  anything. Downgrading is not supported.
- **Unknown job ids** raise `JobNotFound` from `get` and from every write that names one.
- A store's own failures (it cannot write or read now) are `StoreError`s; writes before `open`
  or after `close` raise one too.

What is tied to files is the SQLite store's alone and only documented here: the lock that keeps
a second daemon off a store (`StoreLocked`), refusing a file that is not a store (`NotAStore`),
and the health of its file system (`free_bytes`, `min_free_bytes`, `StoreFull`). A store
without a file system measures no free space (None) and always has room.

Shared by the implementations, so that they agree: `job_event` (the event of a change) and
`check_same_spec` (when an idempotency key's job conflicts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict

from orchestrator import errors, models

# What `accept_many` makes of each spec: (the job, whether it was created now), or the error.
AcceptOutcome = tuple[models.Job, bool] | errors.OrchestratorError

ProblemReason = Literal[
    "store_commit_failed",
    "store_low_space",
    "store_unreachable",
    "backend_credentials",
    "events_stopped",
]
PROBLEM_REASONS: tuple[ProblemReason, ...] = (
    "store_commit_failed",
    "store_low_space",
    "store_unreachable",  # a database server that cannot be reached (PostgreSQL)
    "backend_credentials",  # not the store's: `health.Health` adds it for a backend
    "events_stopped",  # a backend's events stopped: tracked by full polling (`changefeed`)
)

# Deleted by one `purge` call at most: a purge goes in slices so that writes keep flowing.
PURGE_SLICE = 2000


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the daemon is degraded: a stable `reason` (a metric label) and a message."""

    reason: ProblemReason
    message: str


# One state change of a job as `history` reports it (`from` is None for its acceptance).
HistoryEntry = TypedDict(
    "HistoryEntry",
    {"at": str, "from": str | None, "to": str, "reason": str | None, "exit_code": int | None},
)


class AttemptEntry(TypedDict):
    """One attempt at launching a job, as `attempts` reports it."""

    attempt: int
    token: str
    external_id: str | None
    started_at: str  # RFC 3339, as `models.iso` writes it
    # None while launching; "submitted"; "start failed: <reason>"; "failed (<class>): <reason>"
    # once a retry followed it
    outcome: str | None


def job_event(job: models.Job, old: models.JobState | None) -> models.Event:
    """The event of `job` having just entered its state from `old` (None: accepted)."""
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
        failure=job.failure if old is None or job.state.terminal else _retried(job),
    )


def _retried(job: models.Job) -> str | None:
    """The failure class of the attempt a retry follows (for the event of going back to
    QUEUED; None for any other change)."""
    if job.state != models.JobState.QUEUED:
        return None
    retry = job.info.get("retry")
    previous = retry.get("previous") if isinstance(retry, dict) else None
    failure = previous.get("failure") if isinstance(previous, dict) else None
    return failure if isinstance(failure, str) else None


def check_same_spec(existing: models.Job, spec: models.JobSpec, backend: str) -> None:
    """Raise `IdempotencyConflict` unless `spec` (for `backend`) is what `existing`, the job
    its idempotency key names, was accepted with."""
    # The backend is compared as stored beside the spec; inside the spec it is optional. The
    # directory a job was submitted from is not part of what it is.
    differ = [] if existing.backend == backend else ["backend"]
    there, here = _identity(existing.spec), _identity(spec)
    differ += [field for field in there if there[field] != here[field]]
    if differ:
        verb = "differs" if len(differ) == 1 else "differ"
        raise errors.IdempotencyConflict(
            f"idempotency key {spec.idempotency_key!r} already names job {existing.id} with "
            f"a different spec: {', '.join(differ)} {verb}"
        )


def _identity(spec: models.JobSpec) -> dict[str, Any]:
    return spec.model_dump(exclude={"backend", "default_cwd"})


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which jobs `Store.list_jobs` returns: every filter given must hold. `before` (a job id:
    the cursor): only the jobs older than that one; `peer_uid`: only the jobs that uid
    submitted (a job with no recorded submitter is nobody's); `name`: only those whose name
    matches that glob (`*`, `?`, `[…]`, case-sensitive; a job with no name is named by its id);
    `since` (Unix time): only those accepted then or later; `id_prefix`: only those whose id
    starts so; `labels`: only those that have every one of them (key and value); `target`:
    only those of that target; without `children`, not the children of array jobs
    (`<parent>:<index>`)."""

    states: frozenset[models.JobState] | None = None
    backend: str | None = None
    limit: int = 100
    before: str | None = None
    peer_uid: int | None = None
    name: str | None = None
    since: float | None = None
    id_prefix: str | None = None
    labels: Mapping[str, str] | None = None
    target: str | None = None
    children: bool = True

    @classmethod
    def of(cls, states: Iterable[models.JobState] | None = None, **filters: Any) -> JobQuery:
        """A query whose states may be any iterable."""
        return cls(None if states is None else frozenset(states), **filters)


ALL_JOBS = JobQuery()  # every job, 100 at most: `list_jobs`'s default


class Store(Protocol):
    """The durable record of every job: what the engine, the API and the daemon read and write.

    Implementations may subclass this protocol explicitly (then mypy checks every signature).
    """

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Make the store usable: create it or check it (refusing a newer `schema_version`)."""
        ...

    async def close(self) -> None:
        """Finish the writes under way, then release whatever the store holds."""
        ...

    # -- health (implementation-specific: see the module's docstring) ----------------------

    async def ping(self) -> None:
        """A round trip through the store's write path: proof that it is not wedged."""
        ...

    def problems(self) -> list[Problem]:
        """Why the store is degraded now, if it is (empty when healthy)."""
        ...

    def free_bytes(self) -> int | None:
        """Free space where the store keeps its data; None when not measured."""
        ...

    def check_room(self) -> None:
        """Raise `StoreFull` when new jobs must be refused for lack of space."""
        ...

    # -- writes ----------------------------------------------------------------------------

    async def accept_many(
        self, specs: Sequence[tuple[models.JobSpec, str]], peer: models.Peer | None
    ) -> list[AcceptOutcome]:
        """Durably record new QUEUED jobs (spec, backend name) in one operation, submitted by
        `peer` (its supplementary groups are not kept). Each outcome, in order: (job, True),
        (the existing job, False) when its idempotency key already names one of this
        submitter's jobs (also one earlier in `specs`), or the error (`IdempotencyConflict`)."""
        ...

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
        """Compare-and-set the job's state from `expected` to `new`, with its event. `reason`
        replaces the job's; `exit_code`, `vendor_status` and `external_id` replace it when
        given; `info` is merged into the job's."""
        ...

    async def observe(
        self,
        job_id: str,
        *,
        vendor_status: str | None,
        reason: str | None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        """Record what the vendor says when the state itself did not change (no event):
        `vendor_status` replaces the job's, `reason` too when given, `info` is merged."""
        ...

    async def relocate(self, job_id: str, external_id: str) -> models.Job:
        """The current attempt's task was found again under another id: remember that one
        (for the job and its attempt; no event)."""
        ...

    async def begin_attempt(self, job_id: str) -> models.Job | None:
        """Commit a new attempt and its token before any backend call: the job is launching,
        `updated_at` and `info["attempt_started_at"]` are now (no event). None when the job is
        no longer dispatchable: not QUEUED, already launching, or asked to stop."""
        ...

    async def record_submitted(
        self,
        job_id: str,
        *,
        external_id: str,
        state: models.JobState,
        vendor_status: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        """The backend accepted the current attempt: store its external id and move the job
        to `state`. `StaleState` unless the job is QUEUED and launching."""
        ...

    async def record_start_failure(
        self, job_id: str, reason: str, *, final: bool, failure: str = "start"
    ) -> models.Job:
        """The current attempt launched nothing (the job keeps `reason`). Final: the job is
        FAILED, its `info.failure` set to `failure`; else it stays QUEUED, not launching, for
        another attempt (no event).
        `StaleState` unless the job is QUEUED and launching."""
        ...

    async def retry(
        self,
        job_id: str,
        expected: models.JobState,
        *,
        reason: str,
        outcome: str,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        """The current attempt ended in a failure the job's retry policy retries: compare-and-
        set the job from `expected` back to QUEUED, not launching, for its next attempt, with
        its event; `reason` replaces the job's, `info` is merged, the attempt's outcome is
        `outcome`. What belonged to the attempt goes: its external id, exit code, vendor
        status, and the times of its states (the job's start afresh at QUEUED). The attempt
        number stays (`begin_attempt` gives the next). `StaleState` if the job is not in
        `expected` or is asked to stop; `IllegalTransition` from QUEUED or a terminal state."""
        ...

    async def expand(
        self, parent_id: str, children: Sequence[models.JobSpec]
    ) -> tuple[models.Job, list[models.Job]]:
        """An array job becomes its children (`engine.arrays`), all or nothing: new QUEUED jobs
        `<parent_id>:<index>` of the parent's backend and submitter, with their events, and the
        parent moved to SUBMITTED with its event. Returns the parent and its children.
        `StaleState` unless the parent is QUEUED, not launching and not asked to stop."""
        ...

    async def request_stop(self, job_id: str, why: models.StopReason) -> models.Job:
        """Durably ask for a job to stop. A job no backend has seen yet (QUEUED, not
        launching) ends here at once; any other unfinished job keeps its state, and the
        first reason asked for, until the stop is observed. A finished job is left as it is."""
        ...

    async def stop_children(self, parent_id: str, why: models.StopReason) -> list[models.Job]:
        """`request_stop` of every unfinished child of an array job not yet asked to stop, in
        one operation; the ones launched (their backend must stop them), now asked to."""
        ...

    async def purge(self, older_than: float) -> list[str]:
        """Delete terminal jobs last changed before `older_than` (Unix time), with their
        history and attempts, at most `PURGE_SLICE` per call; return their ids. Call again
        until it returns none."""
        ...

    # -- reads -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> models.Job: ...

    async def list_jobs(self, query: JobQuery = ALL_JOBS) -> list[models.Job]:
        """The jobs `query` asks for, newest first (by id), at most its `limit`."""
        ...

    async def unfinished(self) -> list[models.Job]:
        """Every non-terminal job, oldest first: the recovery scan at start-up."""
        ...

    async def history(self, job_id: str) -> list[HistoryEntry]:
        """The job's state changes, oldest first (none for an unknown job)."""
        ...

    async def attempts(self, job_id: str) -> list[AttemptEntry]:
        """The job's attempts, oldest first (none for an unknown job)."""
        ...

    async def events_since(
        self,
        since: int,
        *,
        job_id: str | None = None,
        peer_uid: int | None = None,
        limit: int = 1000,
    ) -> list[models.Event]:
        """The events committed after the one numbered `since` (0: all), in commit order, at
        most `limit`: of one job, or of the jobs `peer_uid` submitted, if given. Each as it
        was published (its `seq` included); a purged job's are gone."""
        ...

    async def count_by_state(self, peer_uid: int | None = None) -> dict[str, int]:
        """Jobs by state (a state with no jobs is absent): all of them, or those `peer_uid`
        submitted."""
        ...

    async def dependents(self, job_id: str) -> list[str]:
        """The ids of the jobs that name this one in `depends_on`, oldest first (none once
        either is purged)."""
        ...

    async def count_children(self, parent_id: str) -> dict[str, int]:
        """An array job's children (`Store.expand`) by state (a state with none is absent)."""
        ...

    # -- what the backends remember (`backends.definitions.Memory`) ------------------------

    async def definition(self, backend: str, digest: str) -> str | None:
        """The ARN `backend` registered the definition with this content digest as, if it
        said (`remember_definition`); None otherwise."""
        ...

    async def remember_definition(self, backend: str, digest: str, arn: str) -> None:
        """Durably remember that `backend`'s definition of this digest is `arn` (the latest
        said wins). Never purged: a definition outlives the jobs that ran under it."""
        ...
