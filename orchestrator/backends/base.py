"""The seam between the daemon and the places jobs run.

The dispatcher and the poller drive every backend through this protocol and never learn which
vendor is behind it. Each backend maps its vendor's status vocabulary to `JobState` in one table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from orchestrator import errors, models


@dataclass(frozen=True, slots=True)
class Submitted:
    """What a successful `submit` returns."""

    external_id: str
    state: models.JobState = models.JobState.SUBMITTED
    vendor_status: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Observation:
    """What the backend says about one external id. `state` None: the backend does not know it
    (missing); the poller decides what that means after a grace period."""

    external_id: str
    state: models.JobState | None
    vendor_status: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    # Why a terminal state other than SUCCEEDED came about, by class (`failures.py`): start,
    # infrastructure, user, rejected; None: let the engine tell (a non-zero exit: user).
    failure: str | None = None
    # The vendor's order of this job's changes, where it has one (ECS: the task's `version`;
    # Batch: attempts made, then status rank): an event older than the last applied is no news.
    order: tuple[int, ...] | None = None

    @property
    def missing(self) -> bool:
        return self.state is None


@dataclass(frozen=True, slots=True)
class Located:
    """The answer to "did this attempt launch anything?" after a crash or a lost id."""

    external_id: str | None  # the task/job/process found, if any
    launched: bool | None  # False: provably nothing launched; None: cannot tell


@dataclass(frozen=True, slots=True)
class LogChunk:
    stream: str  # "stdout" / "stderr" (local) or the log stream name (CloudWatch)
    data: str


@dataclass(frozen=True, slots=True)
class LogPage:
    chunks: Sequence[LogChunk]
    cursor: Any  # opaque: pass it back to read on from here


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What a backend reports to the metrics endpoint at scrape time."""

    calls: Sequence[tuple[str, str, int, int]] = ()  # (service, operation, calls, throttles)
    buckets: Sequence[tuple[str, float, float]] = ()  # (bucket, current rate, configured rate)
    # (errno name, count): reads about jobs that failed without proving anything (local backend)
    read_errors: Sequence[tuple[str, int]] = ()


Wake = Callable[[str], None]  # a backend may call this with a job id to have it polled now


@dataclass(frozen=True, slots=True)
class Check:
    """One line of `orchestrator check`: what was checked, whether it is fine, what was found."""

    name: str  # "<backend>.<what>", e.g. "ecs.cluster"
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Probe = Callable[[], Awaitable[str]]  # returns what it found; raises `CheckFailed` (or AwsError)


async def checked(name: str, probe: Probe) -> Check:
    """Run one probe: what it found, or what it found wrong (a typed error's message)."""
    try:
        return Check(name, True, await probe())
    except errors.CheckFailed as exc:
        return Check(name, False, str(exc))
    except errors.OrchestratorError as exc:
        return Check(name, False, exc.message)


class Backend(Protocol):
    name: str
    max_in_flight: int  # jobs submitted and not yet terminal, at most
    describe_batch_size: int  # external ids per describe call, at most
    max_start_attempts: int | None  # attempts at starting a job (None: the dispatcher's default)
    start_budget_s: float | None  # wall-clock budget for them (None: the dispatcher's default)
    log_delivery_s: float  # a job's logs may still grow this long after it ends (follow on)

    async def start(self) -> None:
        """Acquire clients and resources; check health if configured."""

    async def close(self) -> None:
        """Release them. Running jobs are left running: a restarted daemon adopts them."""

    def set_wake(self, wake: Wake) -> None:
        """Give the backend a way to have a job polled early (e.g. a local child exited)."""

    def validate(self, spec: models.JobSpec) -> None:
        """Raise `InvalidJob` naming the bad field if this backend cannot run `spec`."""

    def partition(self, job: models.Job) -> str:
        """Jobs with equal partitions can be described in one call (e.g. the ECS cluster)."""

    async def submit(self, job: models.Job) -> Submitted:
        """Start `job.attempt` using `job.token`. Idempotent per token where the vendor allows.
        Raise `StartFailed` (retryable or not) when nothing was started, `OutcomeUnknown`
        when something may have been."""

    async def describe(self, jobs: Sequence[models.Job]) -> Mapping[str, Observation]:
        """Observations keyed by external id, for up to `describe_batch_size` jobs."""

    async def stop(self, job: models.Job) -> None:
        """Ask the running job to stop. Idempotent; called again until the stop is observed."""

    async def locate(self, job: models.Job) -> Located:
        """Find what the current attempt launched, when its external id is unknown or missing.
        Never starts anything."""

    def can_resubmit(self, job: models.Job) -> bool:
        """Whether submitting the current attempt again (same token) is idempotent now."""

    async def read_logs(self, job: models.Job, cursor: Any) -> LogPage:
        """The job's own output from `cursor` on (None: from the start)."""

    def settled(self, job: models.Job) -> None:
        """The job's terminal state is recorded in the store: what the backend kept to tell it
        may go."""

    def telemetry(self) -> Telemetry:
        """Counters and rates for the metrics endpoint."""

    async def check(self) -> Sequence[Check]:
        """Whether this configuration can run jobs (`orchestrator check`), one `Check` per thing
        that must hold, each named `<backend>.<what>`. Finds and changes nothing a job would
        notice; needs no `start()` (clients it needs are started here, released by `close()`)."""


@runtime_checkable
class ArrayBackend(Protocol):
    """A backend that runs array jobs itself (Batch): its children are described on demand."""

    async def describe_child(self, parent: models.Job, index: int) -> Observation | None: ...


@runtime_checkable
class EventBackend(Protocol):
    """A backend whose vendor publishes each job's state changes as EventBridge events (ECS
    Task State Change, Batch Job State Change): tracked by them where a queue is configured
    (`changefeed.py`), its describes then only a sweep behind them."""

    event_source: str  # the events' `source`, e.g. "aws.ecs"
    event_detail_type: str  # their `detail-type`, e.g. "ECS Task State Change"
    event_silent_statuses: frozenset[str]  # vendor statuses no event tells (polled as ever)

    def observe_event(self, detail: Mapping[str, Any]) -> Observation:
        """What an event's `detail` says, exactly as a describe of that moment would have
        (with the vendor's `order`); raise `eventflow.Undecodable` if it cannot be read."""
        ...
