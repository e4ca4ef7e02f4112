"""Hands QUEUED jobs to their backend: one lane per backend, a cap on jobs in flight, retries.

Per job: commit the attempt and its token, call `backend.submit`, store the external id, hand
the job to the poller. A start failure is classified by the backend: retryable ones are tried
again after a full-jitter back-off within `max_start_attempts` and `start_budget_s`; anything
else fails the job at once with the backend's reason. The dispatcher never learns which vendor
a lane drives.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Literal

import structlog

from orchestrator import backoff, errors, events, faults, models
from orchestrator.backends.base import Backend
from orchestrator.poller import Poller
from orchestrator.settings import DispatcherSettings
from orchestrator.store import Store

log = structlog.get_logger("orchestrator.dispatcher")

_Timer = tuple[float, int, str, Literal["dispatch", "expire", "settle"]]


class _Lane:
    """One backend's queue: jobs ready now, jobs waiting for a retry or a deadline, and the
    jobs it has in flight (submitted, not yet terminal)."""

    def __init__(self, backend: Backend, submit_concurrency: int, settings: DispatcherSettings):
        self.backend = backend
        self.max_attempts = backend.max_start_attempts or settings.max_start_attempts
        self.budget_s = backend.start_budget_s or settings.start_budget_s
        self.ready: deque[str] = deque()
        self.queued: set[str] = set()  # in `ready` or waiting for a retry
        self.timers: list[_Timer] = []
        self.in_flight: set[str] = set()
        self.settle_tries: dict[str, int] = {}  # job → settle attempts of its current attempt
        self.slots = asyncio.Semaphore(submit_concurrency)
        self.wake = asyncio.Event()


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings,
        store: Store,
        backends: Mapping[str, Backend],
        poller: Poller,
        hub: events.Hub,
        *,
        rng: backoff.Uniform | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._poller = poller
        self._lanes = {
            name: _Lane(backend, settings.submit_concurrency, settings)
            for name, backend in backends.items()
        }
        self._retry = backoff.Policy(
            base_s=settings.retry_base_s,
            factor=2.0,
            cap_s=settings.retry_cap_s,
            jitter="full",
            floor_s=0.05,
        )
        self._rng = rng or backoff.default_rng()
        self._clock = clock
        self._seq = itertools.count()
        hub.listen(self._on_event)

    def enqueue(self, job: models.Job) -> None:
        """A QUEUED job is ready for its (next) attempt."""
        lane = self._lanes[job.backend]
        if job.id in lane.queued or job.id in lane.in_flight:
            return
        lane.queued.add(job.id)
        lane.ready.append(job.id)
        if job.spec.queue_timeout_s is not None:
            deadline = job.created_at + job.spec.queue_timeout_s
            heapq.heappush(lane.timers, (deadline, next(self._seq), job.id, "expire"))
        lane.wake.set()

    def adopt(self, job: models.Job) -> None:
        """Count a job recovered at start-up, already past dispatch, against its lane's cap."""
        self._lanes[job.backend].in_flight.add(job.id)

    def in_flight(self, backend: str) -> int:
        return len(self._lanes[backend].in_flight)

    def queued(self, backend: str) -> int:
        return len(self._lanes[backend].queued)

    def _on_event(self, event: models.Event) -> None:
        if event.to_state.terminal and (lane := self._lanes.get(event.backend)) is not None:
            lane.queued.discard(event.job_id)
            if event.job_id in lane.in_flight:
                lane.in_flight.discard(event.job_id)
                lane.wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for name, lane in self._lanes.items():
                tg.create_task(self._run_lane(lane, tg), name=f"dispatch-{name}")

    async def _run_lane(self, lane: _Lane, tg: asyncio.TaskGroup) -> None:
        cap = lane.backend.max_in_flight
        while True:
            lane.wake.clear()
            now = self._clock()
            while lane.timers and lane.timers[0][0] <= now:
                _, _, job_id, kind = heapq.heappop(lane.timers)
                if kind == "dispatch":
                    lane.ready.append(job_id)
                elif kind == "settle":
                    tg.create_task(self._settle_later(lane, job_id), name=f"settle-{job_id}")
                elif job_id in lane.queued and job_id not in lane.in_flight:
                    tg.create_task(self._expire(job_id), name=f"expire-{job_id}")
            while lane.ready and len(lane.in_flight) < cap:
                job_id = lane.ready.popleft()
                if job_id not in lane.queued:
                    continue  # ended while it waited
                lane.queued.discard(job_id)
                lane.in_flight.add(job_id)
                await lane.slots.acquire()
                tg.create_task(self._dispatch(lane, job_id), name=f"dispatch-{job_id}")
            timeout = max(0.0, lane.timers[0][0] - self._clock()) if lane.timers else None
            try:
                async with asyncio.timeout(timeout):
                    await lane.wake.wait()
            except TimeoutError:
                pass

    async def _expire(self, job_id: str) -> None:
        if self._poller.pending_stop(job_id) is not None:
            return  # stopped already (not recorded yet): that stop ends it
        try:
            job = await self._store.request_stop(job_id, "queue_timeout")
        except errors.StoreError as exc:
            log.warning(
                "job.stop_unrecorded", job_id=job_id, kind="queue_timeout", error=exc.message
            )
            self._poller.stop_unrecorded(job_id, "queue_timeout")
            return
        except Exception:
            log.exception("job.queue_timeout_failed", job_id=job_id)
            return
        log.info("job.queue_timeout", job_id=job_id, state=job.state.value)

    async def _dispatch(self, lane: _Lane, job_id: str) -> None:
        backend = lane.backend
        try:
            faults.crashpoint("dispatch.before_attempt")
            if self._poller.pending_stop(job_id) is not None:
                # Stopped while the store could not record it: never launched, ended once the
                # stop is recorded.
                lane.in_flight.discard(job_id)
                return
            job = await self._store.begin_attempt(job_id)
            if job is None:  # cancelled or timed out while it waited
                lane.in_flight.discard(job_id)
                return
            faults.crashpoint("dispatch.after_attempt_recorded")
            await self._submit(lane, job)
        except Exception:
            # A job's failure never takes the daemon down: look at it again later (it may be
            # half-launched) with the same care as after a restart.
            log.exception("dispatch.failed", job_id=job_id, backend=backend.name)
            self._settle_in(lane, job_id, self._settings.retry_cap_s)
        finally:
            lane.slots.release()
            lane.wake.set()

    async def _submit(self, lane: _Lane, job: models.Job, *, settling: bool = False) -> None:
        """Call the backend for the job's current attempt and record what came of it. While
        settling an attempt whose outcome is unknown, a refusal proves nothing about the
        earlier call: look again later rather than start a new attempt."""
        try:
            submitted = await lane.backend.submit(job)
        except errors.StartFailed as exc:
            if settling:
                log.info("job.settle_retry", job_id=job.id, attempt=job.attempt, reason=exc.reason)
                self._settle_in(lane, job.id, self._retry.delay(job.attempt, self._rng))
                return
            await self._start_failed(lane, job, exc)
            return
        except errors.OutcomeUnknown as exc:
            log.warning("job.start_unknown", job_id=job.id, attempt=job.attempt, error=exc.message)
            self._settle_in(lane, job.id, self._retry.delay(0, self._rng))
            return
        faults.crashpoint("dispatch.after_submit")
        lane.settle_tries.pop(job.id, None)
        job = await self._store.record_submitted(
            job.id,
            external_id=submitted.external_id,
            state=submitted.state,
            vendor_status=submitted.vendor_status,
            info=dict(submitted.info),
        )
        log.info(
            "job.dispatched",
            job_id=job.id,
            backend=lane.backend.name,
            attempt=job.attempt,
            external_id=submitted.external_id,
        )
        self._poller.track(job)

    async def _start_failed(self, lane: _Lane, job: models.Job, exc: errors.StartFailed) -> None:
        elapsed = self._clock() - job.created_at
        retry = exc.retryable and job.attempt < lane.max_attempts and elapsed < lane.budget_s
        await self._store.record_start_failure(job.id, exc.reason, final=not retry)
        lane.in_flight.discard(job.id)
        if not retry:
            log.warning(
                "job.start_failed",
                job_id=job.id,
                backend=lane.backend.name,
                attempt=job.attempt,
                reason=exc.reason,
                retryable=exc.retryable,
            )
            return
        delay = self._retry.delay(job.attempt - 1, self._rng)
        log.info(
            "job.start_retry",
            job_id=job.id,
            backend=lane.backend.name,
            attempt=job.attempt,
            reason=exc.reason,
            wait_s=round(delay, 3),
        )
        lane.queued.add(job.id)
        heapq.heappush(lane.timers, (self._clock() + delay, next(self._seq), job.id, "dispatch"))

    def _settle_in(self, lane: _Lane, job_id: str, delay_s: float) -> None:
        heapq.heappush(lane.timers, (self._clock() + delay_s, next(self._seq), job_id, "settle"))
        lane.wake.set()

    async def _settle_later(self, lane: _Lane, job_id: str) -> None:
        try:
            job = await self._store.get(job_id)
            if job.state == models.JobState.QUEUED and job.launching:
                await self.settle(job)
            elif job.state == models.JobState.QUEUED:  # the attempt was never recorded
                lane.in_flight.discard(job_id)
                self.enqueue(job)
        except Exception:
            log.exception("dispatch.settle_failed", job_id=job_id)
            self._settle_in(lane, job_id, self._settings.retry_cap_s)

    async def settle_at_start(self, job: models.Job) -> None:
        """`settle` for the start-up reconciliation: an AWS hiccup must not keep the daemon
        from serving; the job is looked at again shortly."""
        try:
            await self.settle(job)
        except Exception:
            log.exception("dispatch.settle_failed", job_id=job.id)
            self._settle_in(self._lanes[job.backend], job.id, self._settings.retry_base_s)

    async def settle(self, job: models.Job) -> None:
        """Settle an attempt recorded as launching whose outcome is unknown (a crash, a timeout,
        a 5xx): adopt what it launched, start it under the same token where the backend makes
        that idempotent, requeue it if it provably launched nothing, or look again later. Never
        a new attempt on a guess; LOST once the start budget is spent without an answer."""
        lane = self._lanes[job.backend]
        lane.in_flight.add(job.id)
        tries = lane.settle_tries[job.id] = lane.settle_tries.get(job.id, 0) + 1
        located = await lane.backend.locate(job)
        if located.external_id is not None or located.launched is False:
            lane.settle_tries.pop(job.id, None)
        if located.external_id is not None:
            job = await self._store.record_submitted(
                job.id, external_id=located.external_id, state=models.JobState.SUBMITTED
            )
            log.info("job.reconciled", job_id=job.id, attempt=job.attempt, outcome="adopted")
            self._poller.track(job)
        elif located.launched is False:
            job = await self._store.record_start_failure(
                job.id, f"attempt {job.attempt} never launched", final=False
            )
            lane.in_flight.discard(job.id)
            log.info("job.reconciled", job_id=job.id, attempt=job.attempt, outcome="requeued")
            if job.stop_reason is None:
                self.enqueue(job)
            else:
                await self._store.request_stop(job.id, job.stop_reason)
        elif lane.backend.can_resubmit(job) and tries <= lane.max_attempts:
            log.info("job.reconciled", job_id=job.id, attempt=job.attempt, outcome="resubmitted")
            await self._submit(lane, job, settling=True)  # same attempt, same token: idempotent
        elif not lane.backend.can_resubmit(job) and (
            self._clock() - _attempt_started(job) < lane.budget_s
        ):
            self._settle_in(lane, job.id, self._retry.delay(job.attempt, self._rng))
        else:
            lane.settle_tries.pop(job.id, None)
            reason = f"cannot establish whether attempt {job.attempt} launched"
            await self._store.transition(job.id, job.state, models.JobState.LOST, reason=reason)
            log.error("job.lost", job_id=job.id, attempt=job.attempt, reason=reason)


def _attempt_started(job: models.Job) -> float:
    started = job.info.get("attempt_started_at")
    return float(started) if isinstance(started, int | float) else job.updated_at
