"""Tracks submitted jobs to a terminal state, for every backend alike.

Each tracked job has a due time: a jittered exponential back-off since its last state change
(reset when the state changes, capped so a job running for hours is still seen within `cap_s`),
or its timeout deadline if that is sooner. The loop sleeps until the earliest due time or a
`poke`, takes every due job, groups them by (backend, partition) and describes them in batches of
at most `describe_batch_size` per call. Stops (cancel, timeouts) are issued here too, and issued
again on every round until the backend reports the job ended.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from orchestrator import backoff, errors, faults, models, store
from orchestrator.backends.base import Backend, Observation
from orchestrator.settings import PollerSettings

log = structlog.get_logger("orchestrator.poller")


@dataclass(slots=True)
class _Tracked:
    job: models.Job
    n: int = 0  # polls since the last state change
    due: float = 0.0
    busy: bool = False  # a describe for it is in flight
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
    ) -> None:
        self._settings = settings
        self._store = store
        self._backends = backends
        self._policy = settings.policy()
        self._rng = rng or backoff.default_rng()
        self._clock = clock
        self._tracked: dict[str, _Tracked] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._describe_slots = {
            name: asyncio.Semaphore(settings.describe_concurrency) for name in backends
        }
        self.describe_calls = 0  # for the benchmarks and metrics

    # -- what other components call --------------------------------------------------------

    def track(self, job: models.Job) -> None:
        """Follow `job` from now on (again), starting with a fresh back-off."""
        if job.state.terminal:
            self._tracked.pop(job.id, None)
            return
        entry = _Tracked(job)
        self._tracked[job.id] = entry
        self._schedule(entry, self._first_delay(job))

    def poke(self, job_id: str) -> None:
        """Poll this job as soon as possible (a local child exited, a cancel arrived)."""
        entry = self._tracked.get(job_id)
        if entry is not None and not entry.busy:
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

    def tracked(self) -> int:
        return len(self._tracked)

    # -- scheduling ------------------------------------------------------------------------

    def _first_delay(self, job: models.Job) -> float:
        return 0.0 if job.stop_reason else self._policy.delay(0, self._rng)

    def _schedule(self, entry: _Tracked, delay_s: float) -> None:
        now = self._clock()
        due = now + delay_s
        deadline = _deadline(entry.job)
        if deadline is not None and entry.job.stop_reason is None:
            due = min(due, deadline)
        entry.due = due
        heapq.heappush(self._heap, (due, next(self._seq), entry.job.id))
        if self._heap[0][2] == entry.job.id:
            self._wake.set()

    def _take_due(self, now: float) -> list[_Tracked]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            at, _, job_id = heapq.heappop(self._heap)
            entry = self._tracked.get(job_id)
            if entry is None or entry.busy or entry.due != at:
                continue  # untracked, in flight, or rescheduled since: a stale heap entry
            entry.busy = True
            due.append(entry)
        return due

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                self._wake.clear()
                due = self._take_due(self._clock())
                groups: dict[tuple[str, str], list[_Tracked]] = defaultdict(list)
                for entry in due:
                    backend = self._backends[entry.job.backend]
                    groups[(backend.name, backend.partition(entry.job))].append(entry)
                for (name, partition), entries in groups.items():
                    size = self._backends[name].describe_batch_size
                    for i in range(0, len(entries), size):
                        batch = entries[i : i + size]
                        tg.create_task(self._poll(name, batch), name=f"poll-{name}-{partition}")
                timeout = max(0.0, self._heap[0][0] - self._clock()) if self._heap else None
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
                self.describe_calls += 1
                observations = await backend.describe(jobs)
            for entry in batch:
                obs = observations.get(entry.job.external_id or "")
                await self._apply(
                    backend, entry, obs or Observation(entry.job.external_id or "", None)
                )
        except Exception:
            log.exception("poll.failed", backend=backend_name, jobs=len(batch))
        finally:
            for entry in batch:
                entry.busy = False
                if entry.job.id in self._tracked and self._tracked[entry.job.id] is entry:
                    self._schedule(entry, self._policy.delay(entry.n, self._rng))

    async def _enforce_deadline(self, backend: Backend, entry: _Tracked) -> None:
        job = entry.job
        if job.stop_reason is None:
            deadline = _deadline(job)
            if deadline is None or self._clock() < deadline:
                return
            why: models.StopReason = (
                "timeout" if job.entered(models.JobState.RUNNING) else "queue_timeout"
            )
            job = entry.job = await self._store.request_stop(job.id, why)
            log.info("job.timeout", job_id=job.id, kind=why, vendor_status=job.vendor_status)
            entry.n = 0
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
        if new.terminal and job.stop_reason and new != models.JobState.SUCCEEDED:
            new, stop_reason = store.stopped_outcome(job, job.stop_reason)
            reason = f"{stop_reason} (last status: {obs.reason})" if obs.reason else stop_reason
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

    def _settle(self, entry: _Tracked, job: models.Job) -> None:
        entry.job = job
        entry.n = 0
        if job.state.terminal:
            self._tracked.pop(job.id, None)


def _deadline(job: models.Job) -> float | None:
    """When the job's timeout expires: run time once RUNNING, queue time before."""
    running_since = job.entered(models.JobState.RUNNING)
    if running_since is not None:
        return None if job.spec.timeout_s is None else running_since + job.spec.timeout_s
    if job.spec.queue_timeout_s is None:
        return None
    return job.created_at + job.spec.queue_timeout_s
