"""Tracks submitted jobs to a terminal state, for every backend alike.

Each tracked job has a due time: a jittered exponential back-off since its last state change
(reset when the state changes, capped so a job running for hours is still seen within `cap_s`),
or its timeout deadline if that is sooner. The loop sleeps until the earliest due time or a
`poke`, takes every due job, groups them by (backend, partition) and describes them in batches of
at most `describe_batch_size` per call. Stops (cancel, timeouts) are issued here too, and issued
again on every round until the backend reports the job ended. A stop the store cannot record (it
cannot write: a full disk) is acted on from memory all the same, and recorded once it can.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from orchestrator import backoff, errors, faults, models, store
from orchestrator.backends.base import Backend, Observation
from orchestrator.settings import PollerSettings

log = structlog.get_logger("orchestrator.poller")


_Group = tuple[str, str]  # (backend, partition): jobs that one describe call can cover
_Entry = tuple[float, int, str]  # (due, tie-breaker, job id)


@dataclass(slots=True)
class _Tracked:
    job: models.Job
    group: _Group
    n: int = 0  # polls since the last state change
    due: float = 0.0
    delay: float = 0.0  # the delay that set `due`
    busy: bool = False  # a describe for it is in flight
    poked: bool = False  # poked while busy: poll again at once after this round
    missing_since: float | None = None


class Poller:
    def __init__(
        self,
        settings: PollerSettings,
        store: store.Store,
        backends: Mapping[str, Backend],
        *,
        rng: backoff.Uniform | None = None,
        clock: Callable[[], float] = time.time,
        on_detected: Callable[[str, float], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_detected = on_detected  # (backend, when the backend says the job ended)
        self._store = store
        self._backends = backends
        self._policy = settings.policy()
        self._rng = rng or backoff.default_rng()
        self._clock = clock
        self._tracked: dict[str, _Tracked] = {}
        self._queues: dict[_Group, list[_Entry]] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._describe_slots = {
            name: asyncio.Semaphore(settings.describe_concurrency) for name in backends
        }
        self._unrecorded: dict[str, models.StopReason] = {}  # stops the store could not record
        self._unrecorded_added = asyncio.Event()

    # -- what other components call --------------------------------------------------------

    def track(self, job: models.Job) -> None:
        """Follow `job` from now on (again), starting with a fresh back-off."""
        if job.state.terminal:
            self._tracked.pop(job.id, None)
            self._backends[job.backend].settled(job)
            return
        entry = _Tracked(job, (job.backend, self._backends[job.backend].partition(job)))
        self._tracked[job.id] = entry
        self._schedule(entry, self._first_delay(job))

    def poke(self, job_id: str) -> None:
        """Poll this job as soon as possible (a local child exited, a cancel arrived)."""
        entry = self._tracked.get(job_id)
        if entry is not None and entry.busy:
            entry.poked = True  # what woke it may have come after the describe looked
        elif entry is not None:
            self._schedule(entry, 0.0)

    def update(self, job: models.Job) -> None:
        """A newer copy of a tracked job (e.g. its stop was requested): use it and poll soon."""
        entry = self._tracked.get(job.id)
        if entry is None:
            return
        entry.job = job
        entry.n = 0
        if not entry.busy:
            self._schedule(entry, 0.0)

    def stop_unrecorded(self, job_id: str, why: models.StopReason) -> None:
        """A stop the store could not record (it cannot write). Until it is recorded, which is
        tried again and again, the job is stopped as if it were: the stop is re-issued on every
        poll, the job's end is judged by it, and the dispatcher launches the job no more."""
        self._unrecorded.setdefault(job_id, why)
        self._unrecorded_added.set()
        entry = self._tracked.get(job_id)
        if entry is not None:
            entry.n = 0
            if not entry.busy:
                self._schedule(entry, 0.0)

    def pending_stop(self, job_id: str) -> models.StopReason | None:
        """The stop asked for this job that the store has not recorded yet, if any."""
        return self._unrecorded.get(job_id)

    def _stop_reason(self, job: models.Job) -> models.StopReason | None:
        return job.stop_reason or self._unrecorded.get(job.id)

    # -- scheduling ------------------------------------------------------------------------

    def _first_delay(self, job: models.Job) -> float:
        return 0.0 if self._stop_reason(job) else self._policy.delay(0, self._rng)

    def _schedule(self, entry: _Tracked, delay_s: float) -> None:
        now = self._clock()
        due = now + delay_s
        deadline = _deadline(entry.job)
        if deadline is not None and self._stop_reason(entry.job) is None:
            due = min(due, deadline)
        entry.due = due
        entry.delay = due - now
        queue = self._queues.setdefault(entry.group, [])
        heapq.heappush(queue, (due, next(self._seq), entry.job.id))
        if queue[0][2] == entry.job.id:
            self._wake.set()

    def _take_batches(self, now: float) -> list[tuple[_Group, list[_Tracked]]]:
        """Every group's due jobs, in batches of its describe size. A partial last batch is
        topped up with jobs due soon (one call describes 100 jobs for the price of one); a job
        is taken early by at most half its delay, so back-off still spaces its polls."""
        batches = []
        for group, queue in self._queues.items():
            size = self._backends[group[0]].describe_batch_size
            taken = self._pop_due(queue, now)
            if not taken:
                continue
            if partial := len(taken) % size:
                taken += self._pop_soon(queue, now, size - partial)
            batches += [(group, taken[i : i + size]) for i in range(0, len(taken), size)]
        return batches

    def _live(self, item: _Entry) -> _Tracked | None:
        entry = self._tracked.get(item[2])
        if entry is None or entry.busy or entry.due != item[0]:
            return None  # untracked, in flight, or rescheduled since: a stale heap entry
        return entry

    def _pop_due(self, queue: list[_Entry], now: float) -> list[_Tracked]:
        out: list[_Tracked] = []
        while queue and queue[0][0] <= now:
            if (entry := self._live(heapq.heappop(queue))) is not None:
                entry.busy = True
                out.append(entry)
        return out

    def _pop_soon(self, queue: list[_Entry], now: float, wanted: int) -> list[_Tracked]:
        out: list[_Tracked] = []
        passed_over: list[_Entry] = []
        horizon = now + self._settings.fill_ahead_s
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

    def _next_due(self) -> float | None:
        heads = [queue[0][0] for queue in self._queues.values() if queue]
        return min(heads) if heads else None

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._record_stops(), name="record-stops")
            while True:
                self._wake.clear()
                for (backend, partition), batch in self._take_batches(self._clock()):
                    tg.create_task(self._poll(backend, batch), name=f"poll-{backend}-{partition}")
                next_due = self._next_due()
                timeout = None if next_due is None else max(0.0, next_due - self._clock())
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _poll(self, backend_name: str, batch: list[_Tracked]) -> None:
        backend = self._backends[backend_name]
        try:
            async with self._describe_slots[backend_name]:
                for entry in batch:
                    await self._enforce_deadline(backend, entry)
                jobs = [entry.job for entry in batch]
                observations = await backend.describe(jobs)
            # All at once: the store commits the batch's changes together (group commit).
            await asyncio.gather(
                *(self._apply_one(backend, entry, observations) for entry in batch)
            )
        except Exception:
            log.exception("poll.failed", backend=backend_name, jobs=len(batch))
        finally:
            for entry in batch:
                entry.busy = False
                poked, entry.poked = entry.poked, False
                if entry.job.id in self._tracked and self._tracked[entry.job.id] is entry:
                    self._schedule(entry, 0.0 if poked else self._policy.delay(entry.n, self._rng))

    async def _apply_one(
        self, backend: Backend, entry: _Tracked, observations: Mapping[str, Observation]
    ) -> None:
        external_id = entry.job.external_id or ""
        try:
            await self._apply(
                backend, entry, observations.get(external_id) or Observation(external_id, None)
            )
        except errors.StoreError as exc:
            # The store cannot write (it said so once, loudly): observed again next round.
            log.debug("poll.apply_unrecorded", job_id=entry.job.id, error=exc.message)
        except Exception:  # one job's trouble must not hold up the rest of its batch
            log.exception("poll.apply_failed", job_id=entry.job.id, backend=backend.name)

    async def _enforce_deadline(self, backend: Backend, entry: _Tracked) -> None:
        job = entry.job
        if self._stop_reason(job) is None:
            deadline = _deadline(job)
            if deadline is None or self._clock() < deadline:
                return
            why: models.StopReason = (
                "timeout" if job.entered(models.JobState.RUNNING) else "queue_timeout"
            )
            try:
                job = entry.job = await self._store.request_stop(job.id, why)
            except errors.StoreError as exc:
                log.warning("job.stop_unrecorded", job_id=job.id, kind=why, error=exc.message)
                self.stop_unrecorded(job.id, why)
            log.info("job.timeout", job_id=job.id, kind=why, vendor_status=job.vendor_status)
            entry.n = 0
        if job.stop_reason is None:  # not recorded yet: the backend still hears why
            job = dataclasses.replace(job, stop_reason=self._stop_reason(job))
        try:
            await backend.stop(job)
        except Exception:
            log.exception("job.stop_failed", job_id=job.id, backend=backend.name)

    async def _apply(self, backend: Backend, entry: _Tracked, obs: Observation) -> None:
        job = entry.job
        if obs.missing:
            await self._missing(backend, entry)
            return
        entry.missing_since = None
        assert obs.state is not None
        new = obs.state
        if new == job.state or models.is_regression(job.state, new):
            entry.n += 1
            if obs.vendor_status != job.vendor_status:
                entry.job = await self._store.observe(
                    job.id, vendor_status=obs.vendor_status, reason=obs.reason, info=dict(obs.info)
                )
            return
        reason = obs.reason
        stop_reason = self._stop_reason(job)
        if (
            new.terminal
            and stop_reason
            and new != models.JobState.SUCCEEDED
            and not _started_in_time(job, stop_reason, obs)
        ):
            new, reason = store.stopped_outcome(job, stop_reason)
        faults.crashpoint("poller.before_transition")
        try:
            job = await self._store.transition(
                job.id,
                job.state,
                new,
                reason=reason,
                exit_code=obs.exit_code,
                vendor_status=obs.vendor_status,
                info=dict(obs.info),
            )
        except errors.StaleState:
            job = await self._store.get(job.id)  # changed under us; trust the store
        finished_at = obs.info.get("finished_at")
        if new.terminal and self._on_detected and isinstance(finished_at, int | float):
            self._on_detected(job.backend, float(finished_at))
        self._settle(entry, job)

    async def _missing(self, backend: Backend, entry: _Tracked) -> None:
        job = entry.job
        now = self._clock()
        if entry.missing_since is None:
            entry.missing_since = now
        if now - entry.missing_since < self._settings.missing_grace_s:
            entry.n += 1
            return
        located = await backend.locate(job)
        if located.external_id is not None and located.external_id != job.external_id:
            log.warning(
                "job.relocated", job_id=job.id, old=job.external_id, new=located.external_id
            )
            entry.job = await self._store.relocate(job.id, located.external_id)
            entry.missing_since = None
            return
        reason = (
            f"{backend.name} has not known {job.external_id} for "
            f"{now - entry.missing_since:.0f}s and it cannot be found again"
        )
        job = await self._store.transition(job.id, job.state, models.JobState.LOST, reason=reason)
        log.error("job.lost", job_id=job.id, backend=backend.name, reason=reason)
        self._settle(entry, job)

    async def _record_stops(self) -> None:
        """Record the stops the store could not, as soon as it can write again."""
        delay_s = self._settings.base_s
        while True:
            await self._unrecorded_added.wait()
            for job_id, why in list(self._unrecorded.items()):
                try:
                    job = await self._store.request_stop(job_id, why)
                except errors.StoreError:
                    continue  # still cannot write; try again below
                except errors.OrchestratorError as exc:  # gone (purged): nothing to record
                    self._unrecorded.pop(job_id, None)
                    log.warning("job.stop_unrecordable", job_id=job_id, error=exc.message)
                    continue
                self._unrecorded.pop(job_id, None)
                log.info("job.stop_recorded", job_id=job_id, kind=why, state=job.state.value)
                self.update(job)
            if self._unrecorded:
                await asyncio.sleep(delay_s)  # a retry back-off: nothing signals "writable again"
                delay_s = min(self._settings.cap_s, delay_s * 2)
            else:
                self._unrecorded_added.clear()
                delay_s = self._settings.base_s

    def _settle(self, entry: _Tracked, job: models.Job) -> None:
        entry.job = job
        entry.n = 0
        if job.state.terminal:
            self._tracked.pop(job.id, None)
            self._backends[job.backend].settled(job)


def _started_in_time(job: models.Job, why: models.StopReason, obs: Observation) -> bool:
    """A queue timeout stopped a job that, as its backend now tells, had started before the
    deadline (its start was not known here yet: an attempt settled late, a describe that
    failed): its end is its own, not "not running after queue_timeout_s"."""
    started_at = obs.info.get("started_at")
    if why != "queue_timeout" or not isinstance(started_at, int | float):
        return False
    deadline = _deadline(job)
    return deadline is not None and started_at < deadline


def _deadline(job: models.Job) -> float | None:
    """When the job's timeout expires: run time once RUNNING, queue time before."""
    running_since = job.entered(models.JobState.RUNNING)
    if running_since is not None:
        return None if job.spec.timeout_s is None else running_since + job.spec.timeout_s
    if job.spec.queue_timeout_s is None:
        return None
    return job.created_at + job.spec.queue_timeout_s
