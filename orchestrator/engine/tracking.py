"""When to describe which job, and what an observation means.

`Tracker` holds every tracked job with a due time: a jittered exponential back-off since its last
state change (reset when the state changes, capped so a job running for hours is still seen
within the cap), or its timeout deadline if that is sooner. `take_batches(now)` hands out every
due job grouped by (backend, partition) in batches of the backend's describe size; a partial
last batch is topped up with jobs due soon. Stops the store could not record are held here too,
and acted on as if recorded.

`judge` says what an observation means for a job; `stopped_outcome` what a stop of ours ends it
as; `overdue` whether a timeout has passed.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import backoff, models
from orchestrator.backends.base import Observation

Group = tuple[str, str]  # (backend, partition): jobs that one describe call can cover
_Entry = tuple[float, int, str]  # (due, tie-breaker, job id)


@dataclass(slots=True)
class Tracked:
    job: models.Job
    group: Group
    n: int = 0  # polls since the last state change
    due: float = 0.0
    delay: float = 0.0  # the delay that set `due`
    busy: bool = False  # a describe for it is in flight
    poked: bool = False  # poked while busy: poll again at once after this round
    missing_since: float | None = None
    order: tuple[int, ...] | None = None  # the vendor's order of the last change applied


class Tracker:
    def __init__(
        self,
        policy: backoff.Policy,
        rng: backoff.Uniform,
        *,
        fill_ahead_s: float,
        batch_size: Callable[[str], int],
        wake: Callable[[], None] = lambda: None,
        sweep: Callable[[Tracked], float | None] = lambda entry: None,
        slim: Callable[[models.Job], models.Job] = lambda job: job,
    ) -> None:
        self._policy = policy
        self._rng = rng
        self._fill_ahead_s = fill_ahead_s
        self._batch_size = batch_size  # describe size, by backend
        self._wake = wake  # the earliest due time moved earlier
        # While a backend's events flow, the delay until a job's next describe (the sweep's),
        # instead of its back-off; None: its back-off (polling, or a job events do not cover).
        self._sweep = sweep
        # What of a job is kept while it is tracked (`SlimSpecs`: its spec as tracking needs
        # it, shared by jobs that track alike), so that 100,000 jobs in flight fit.
        self._slim = slim
        self._by_external: dict[str, str] = {}  # external id → job id (checked on use)
        self._per_backend: dict[str, int] = {}
        self._tracked: dict[str, Tracked] = {}
        self._queues: dict[Group, list[_Entry]] = {}
        self._seq = itertools.count()
        self._unrecorded: dict[str, models.StopReason] = {}  # stops the store could not record

    # -- what it holds ---------------------------------------------------------------------

    def get(self, job_id: str) -> Tracked | None:
        return self._tracked.get(job_id)

    def __len__(self) -> int:
        return len(self._tracked)

    def by_external(self, external_id: str) -> Tracked | None:
        """The tracked job with this external id (a task ARN, a Batch job id), if any."""
        entry = self._tracked.get(self._by_external.get(external_id, ""))
        return entry if entry is not None and entry.job.external_id == external_id else None

    def count(self, backend: str) -> int:
        """How many jobs of this backend are tracked."""
        return self._per_backend.get(backend, 0)

    def stop_reason(self, job: models.Job) -> models.StopReason | None:
        """Why the job is being stopped, recorded or not."""
        return job.stop_reason or self._unrecorded.get(job.id)

    def pending_stop(self, job_id: str) -> models.StopReason | None:
        """The stop asked for this job that the store has not recorded yet, if any."""
        return self._unrecorded.get(job_id)

    def unrecorded_stops(self) -> dict[str, models.StopReason]:
        return dict(self._unrecorded)

    def next_due(self) -> float | None:
        heads = [queue[0][0] for queue in self._queues.values() if queue]
        return min(heads) if heads else None

    # -- inputs ----------------------------------------------------------------------------

    def track(self, job: models.Job, group: Group, now: float) -> bool:
        """Follow `job` from now on (again), with a fresh back-off; False (and untracked) if it
        is terminal."""
        if job.state.terminal:
            self.untrack(job.id)
            return False
        entry = Tracked(self._slim(job), group)
        if (old := self._tracked.get(job.id)) is not None:
            if old.job.external_id == job.external_id:
                entry.order = old.order  # the same task or job: its changes go on numbering
        else:
            self._per_backend[group[0]] = self.count(group[0]) + 1
        self._tracked[job.id] = entry
        self._index(entry)
        self._schedule(entry, now, 0.0 if self.stop_reason(job) else self._next_delay(entry))
        return True

    def poke(self, job_id: str, now: float) -> None:
        """Poll this job as soon as possible."""
        entry = self._tracked.get(job_id)
        if entry is not None and entry.busy:
            entry.poked = True  # what woke it may have come after the describe looked
        elif entry is not None:
            self._schedule(entry, now, 0.0)

    def update(self, job: models.Job, now: float) -> None:
        """A newer copy of a tracked job (e.g. its stop was requested): use it, poll soon."""
        entry = self._tracked.get(job.id)
        if entry is None:
            return
        self.hold(entry, job)
        entry.n = 0
        if entry.busy:
            entry.poked = True  # the describe in flight may have looked before the change
        else:
            self._schedule(entry, now, 0.0)

    def stop_unrecorded(self, job_id: str, why: models.StopReason, now: float) -> None:
        """A stop the store could not record: acted on as if it were, polled at once."""
        self._unrecorded.setdefault(job_id, why)
        entry = self._tracked.get(job_id)
        if entry is not None:
            entry.n = 0
            if entry.busy:
                entry.poked = True
            else:
                self._schedule(entry, now, 0.0)

    def stop_recorded(self, job_id: str) -> None:
        self._unrecorded.pop(job_id, None)

    def settle(self, entry: Tracked, job: models.Job) -> bool:
        """The job changed (a transition recorded): a fresh back-off; False (and untracked) once
        it is terminal."""
        self.hold(entry, job)
        entry.n = 0
        if job.state.terminal:
            self.untrack(job.id)
            return False
        return True

    def hold(self, entry: Tracked, job: models.Job) -> None:
        """A newer copy of the entry's job (from the store), kept as tracking needs it. Under
        another external id (relocated) it is found by the new one, whose changes are
        numbered afresh."""
        if job.external_id != entry.job.external_id:
            entry.order = None
        entry.job = self._slim(job)
        self._index(entry)

    def changed(self, entry: Tracked, now: float) -> None:
        """Its job changed outside a describe (an event told it): a deadline that change
        started (RUNNING starts the run-time one) is kept, even when the next describe is a
        far sweep away."""
        end = deadline(entry.job)
        if self._tracked.get(entry.job.id) is not entry or end is None or entry.busy:
            return
        if self.stop_reason(entry.job) is None and end < entry.due:
            self._schedule(entry, now, max(0.0, end - now))

    def untrack(self, job_id: str) -> None:
        entry = self._tracked.pop(job_id, None)
        if entry is None:
            return
        self._per_backend[entry.group[0]] -= 1
        if entry.job.external_id is not None:
            self._by_external.pop(entry.job.external_id, None)

    def reschedule(self, backend: str, now: float) -> int:
        """This backend's jobs are polled again (its events stopped): each due within its
        back-off from now, not at a far sweep. How many were brought forward."""
        moved = 0
        for entry in self._tracked.values():
            if entry.group[0] != backend or entry.busy:
                continue
            delay = self._next_delay(entry)
            if entry.due > now + delay:
                self._schedule(entry, now, delay)
                moved += 1
        return moved

    # -- batches ---------------------------------------------------------------------------

    def take_batches(self, now: float) -> list[tuple[Group, list[Tracked]]]:
        """Every group's due jobs, in batches of its describe size, each marked busy. A partial
        last batch is topped up with jobs due soon (one call describes 100 jobs for the price
        of one); a job is taken early by at most half its delay, so back-off still spaces its
        polls."""
        batches = []
        for group, queue in self._queues.items():
            size = self._batch_size(group[0])
            taken = self._pop_due(queue, now)
            if not taken:
                continue
            if partial := len(taken) % size:
                taken += self._pop_soon(queue, now, size - partial)
            batches += [(group, taken[i : i + size]) for i in range(0, len(taken), size)]
        return batches

    def polled(self, entry: Tracked, now: float) -> None:
        """Its describe is over: due again after its back-off (at once if poked meanwhile)."""
        entry.busy = False
        poked, entry.poked = entry.poked, False
        if self._tracked.get(entry.job.id) is entry:
            self._schedule(entry, now, 0.0 if poked else self._next_delay(entry))

    # -- inside ----------------------------------------------------------------------------

    def _delay(self, n: int) -> float:
        return self._policy.delay(n, self._rng)

    def _next_delay(self, entry: Tracked) -> float:
        sweep = self._sweep(entry)
        return self._delay(entry.n) if sweep is None else sweep

    def _index(self, entry: Tracked) -> None:
        if entry.job.external_id is not None:
            self._by_external[entry.job.external_id] = entry.job.id

    def _schedule(self, entry: Tracked, now: float, delay_s: float) -> None:
        due = now + delay_s
        end = deadline(entry.job)
        if end is not None and self.stop_reason(entry.job) is None:
            due = min(due, end)
        entry.due = due
        entry.delay = due - now
        queue = self._queues.setdefault(entry.group, [])
        heapq.heappush(queue, (due, next(self._seq), entry.job.id))
        if queue[0][2] == entry.job.id:
            self._wake()

    def _live(self, item: _Entry) -> Tracked | None:
        entry = self._tracked.get(item[2])
        if entry is None or entry.busy or entry.due != item[0]:
            return None  # untracked, in flight, or rescheduled since: a stale heap entry
        return entry

    def _pop_due(self, queue: list[_Entry], now: float) -> list[Tracked]:
        out: list[Tracked] = []
        while queue and queue[0][0] <= now:
            if (entry := self._live(heapq.heappop(queue))) is not None:
                entry.busy = True
                out.append(entry)
        return out

    def _pop_soon(self, queue: list[_Entry], now: float, wanted: int) -> list[Tracked]:
        out: list[Tracked] = []
        passed_over: list[_Entry] = []
        horizon = now + self._fill_ahead_s
        # Look at a bounded number of candidates: this runs on every wake-up.
        while queue and queue[0][0] <= horizon and len(out) < wanted and len(passed_over) < wanted:
            item = heapq.heappop(queue)
            if (entry := self._live(item)) is None:
                continue
            if item[0] - now <= entry.delay / 2:
                entry.busy = True
                out.append(entry)
            else:
                passed_over.append(item)
        for item in passed_over:
            heapq.heappush(queue, item)
        return out


class SlimSpecs:
    """Jobs as tracking needs them: the spec keeps only what tracking reads (timeouts, the
    retry policy, target, image, array size, backend) and is shared by every job whose
    tracking fields are alike. A decoded spec costs ~1.6 KB; 100,000 tracked jobs would spend
    160 MB on what only a launch reads (command, env, overrides, labels). Launches read the job
    from the store, never from here."""

    def __init__(self, limit: int = 4096) -> None:
        self._specs: dict[tuple[object, ...], models.JobSpec] = {}
        self._limit = limit

    def __call__(self, job: models.Job) -> models.Job:
        spec = job.spec
        if spec.command is _NOT_KEPT:
            return job  # slim already
        retry = None if spec.retry is None else spec.retry.model_dump_json()
        key = (
            spec.backend,
            spec.timeout_s,
            spec.queue_timeout_s,
            retry,
            spec.target,
            spec.image,
            spec.array_size,
        )
        slim = self._specs.get(key)
        if slim is None:
            if len(self._specs) >= self._limit:
                self._specs.clear()  # unusual variety: start again rather than grow
            slim = self._specs[key] = models.JobSpec.model_construct(
                command=_NOT_KEPT,
                backend=spec.backend,
                timeout_s=spec.timeout_s,
                queue_timeout_s=spec.queue_timeout_s,
                retry=spec.retry,
                target=spec.target,
                image=spec.image,
                array_size=spec.array_size,
            )
        return dataclasses.replace(job, spec=slim)


_NOT_KEPT = ["(not kept while tracked)"]


# -- what an observation means ------------------------------------------------------------------


class Verdict(enum.Enum):
    MISSING = "missing"  # the backend does not know the job (now)
    UNCHANGED = "unchanged"  # the same state (or an older one: never go back)
    TRANSITION = "transition"  # a new state to record


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    state: models.JobState | None = None  # the state to record (TRANSITION)
    reason: str | None = None
    vendor_changed: bool = False  # UNCHANGED, but the vendor's own status moved
    failure: str | None = None  # the failure class of a terminal state other than SUCCEEDED


def judge(job: models.Job, obs: Observation, stop_reason: models.StopReason | None) -> Judgement:
    """What `obs` means for `job`. A job we stopped that ends otherwise than SUCCEEDED ends as
    the stop says (cancelled, timed out) — unless the stop was a queue timeout and the backend
    now tells it had started before the deadline: then its end is its own."""
    if obs.missing:
        return Judgement(Verdict.MISSING)
    assert obs.state is not None
    new = obs.state
    if new == job.state or models.is_regression(job.state, new):
        return Judgement(Verdict.UNCHANGED, vendor_changed=obs.vendor_status != job.vendor_status)
    reason = obs.reason
    failure = None
    if new.terminal and new != models.JobState.SUCCEEDED:
        lost = new == models.JobState.LOST
        failure = obs.failure or ("lost" if lost else "user" if obs.exit_code else None)
    if (
        new.terminal
        and stop_reason
        and new != models.JobState.SUCCEEDED
        and not started_in_time(job, stop_reason, obs)
    ):
        new, reason = stopped_outcome(job, stop_reason)
        failure = stop_failure(stop_reason)
    return Judgement(Verdict.TRANSITION, new, reason, failure=failure)


def stop_failure(why: models.StopReason) -> str:
    """The failure class of a job that ended because we stopped it."""
    return "cancelled" if why == "cancel" else "timeout"


def stopped_outcome(job: models.Job, why: models.StopReason) -> tuple[models.JobState, str]:
    """The terminal state and reason of a job stopped by us; a timeout's reason says which
    timeout and what the vendor last said of the job."""
    if why == "cancel":
        return models.JobState.CANCELLED, "cancelled by request"
    if why == "timeout":
        reason = f"timeout: ran longer than timeout_s={job.spec.timeout_s}"
    else:
        reason = f"queue_timeout: not running after queue_timeout_s={job.spec.queue_timeout_s}"
    last = ": ".join(part for part in (job.vendor_status, job.reason) if part)
    return models.JobState.FAILED, f"{reason} (last status: {last})" if last else reason


def started_in_time(job: models.Job, why: models.StopReason, obs: Observation) -> bool:
    """A queue timeout stopped a job that, as its backend now tells, had started before the
    deadline (its start was not known here yet: an attempt settled late, a describe that
    failed): its end is its own, not "not running after queue_timeout_s"."""
    started_at = obs.info.get("started_at")
    if why != "queue_timeout" or not isinstance(started_at, int | float):
        return False
    end = queue_deadline(job)
    return end is not None and started_at < end


def retry_due(job: models.Job) -> float | None:
    """When the job's current attempt was (or is) due, if it is a retry (`info.retry.at`)."""
    retry = job.info.get("retry")
    due = retry.get("at") if isinstance(retry, dict) else None
    return float(due) if isinstance(due, int | float) else None


def queued_since(job: models.Job) -> float:
    """Since when the job has waited for its current attempt: its acceptance, or, for a
    retry, when that attempt was due (each attempt waits its own time)."""
    due = retry_due(job)
    return job.created_at if due is None else due


def queue_deadline(job: models.Job) -> float | None:
    """When the job's wait to run ends (`queue_timeout_s`, from `queued_since`)."""
    if job.spec.queue_timeout_s is None:
        return None
    return queued_since(job) + job.spec.queue_timeout_s


def deadline(job: models.Job) -> float | None:
    """When the job's timeout expires: run time once RUNNING (each attempt's own), queue time
    before."""
    running_since = job.entered(models.JobState.RUNNING)
    if running_since is not None:
        return None if job.spec.timeout_s is None else running_since + job.spec.timeout_s
    return queue_deadline(job)


def overdue(
    job: models.Job, now: float, stop_reason: models.StopReason | None
) -> models.StopReason | None:
    """The stop a job not already being stopped needs now that a timeout has passed: `timeout`
    once it has run, `queue_timeout` before; None while in time."""
    if stop_reason is not None:
        return None
    end = deadline(job)
    if end is None or now < end:
        return None
    return "timeout" if job.entered(models.JobState.RUNNING) else "queue_timeout"


def look_up_missing(entry: Tracked, now: float, grace_s: float) -> bool:
    """A job its backend does not know: True once it has been missing for `grace_s` (look for
    it), counting from now if it was not missing before."""
    if entry.missing_since is None:
        entry.missing_since = now
    return now - entry.missing_since >= grace_s
