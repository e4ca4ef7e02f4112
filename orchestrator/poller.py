"""Tracks submitted jobs to a terminal state, for every backend alike: the async shell of
`engine.tracking`.

The engine's `Tracker` says which jobs are due and in which batches; this loop sleeps until the
earliest due time or a `poke`, describes each batch (at most `describe_concurrency` calls per
backend at once), and carries out what `tracking.judge` makes of each observation. Stops (cancel,
timeouts) are issued here too, and issued again on every round until the backend reports the job
ended. A stop the store cannot record (it cannot write: a full disk) is acted on from memory all
the same, and recorded once it can.

A backend tracked by events (`changefeed.ChangeFeed`, attached with `attach_feed`) has its
observations applied here too (`apply_event`), by the same judgement as a describe's, one at a
time per job; while its events flow, its jobs' describes come at the feed's sweep instead of
their back-off, and a change a describe finds is reported to the feed, which counts those no
event told.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from orchestrator import backoff, errors, faults, models, store
from orchestrator.backends.base import Backend, EventBackend, Observation
from orchestrator.engine import eventflow, retries, tracking
from orchestrator.health import Health
from orchestrator.settings import PollerSettings

log = structlog.get_logger("orchestrator.poller")


class Applied(enum.Enum):
    """What an event's observation came to (its message may go once it is known)."""

    APPLIED = "applied"  # judged, and what it said committed
    STALE = "stale"  # a duplicate, or older than what is known: nothing to do
    UNTRACKED = "untracked"  # no job tracked here has this external id


class Feed(Protocol):
    """What the poller needs of a backend's change feed (`changefeed.ChangeFeed`)."""

    backend: str

    def sweep_delay(self, job: models.Job, tracked: int) -> float | None:
        """The delay until this job's next describe while events flow; None: its back-off."""

    def described(self, job: models.Job, state: models.JobState) -> None:
        """A describe found this job changed (an event should tell it too)."""

    def tracked(self, job: models.Job) -> None:
        """The job is tracked from now on (events held for its external id may apply)."""


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
        crash: faults.Faults | None = None,
        health: Health | None = None,
    ) -> None:
        self._crash = crash or faults.Faults()  # unarmed unless the daemon hands its own
        self._requeue: Callable[[models.Job, float], None] = lambda job, at: None
        self._rng = rng or backoff.default_rng()
        self._health = health or Health(store)
        self._settings = settings
        self._on_detected = on_detected  # (backend, when the backend says the job ended)
        self._store = store
        self._backends = backends
        self._clock = clock
        self._wake = asyncio.Event()
        self._tracker = tracking.Tracker(
            settings.policy(),
            self._rng,
            fill_ahead_s=settings.fill_ahead_s,
            batch_size=lambda name: self._backends[name].describe_batch_size,
            wake=self._wake.set,
            sweep=self._sweep_delay,
            slim=self._slim,
        )
        # The AWS backends' jobs (up to 100,000 in flight) are kept slim while tracked; a local
        # backend's keep their whole spec.
        self._slim_specs = tracking.SlimSpecs()
        self._feeds: dict[str, Feed] = {}
        # One observation at a time per job: its lock, and how many hold or wait for it.
        self._applying: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._describe_slots = {
            name: asyncio.Semaphore(settings.describe_concurrency) for name in backends
        }
        self._unrecorded_added = asyncio.Event()

    # -- what other components call --------------------------------------------------------

    def set_requeue(self, requeue: Callable[[models.Job, float], None]) -> None:
        """Who launches a job's next attempt (job, when) once a retry is recorded: the
        dispatcher."""
        self._requeue = requeue

    def track(self, job: models.Job) -> None:
        """Follow `job` from now on (again), starting with a fresh back-off."""
        group = (job.backend, self._backends[job.backend].partition(job))
        if not self._tracker.track(job, group, self._clock()):
            self._backends[job.backend].settled(job)
        elif (feed := self._feeds.get(job.backend)) is not None and job.external_id:
            feed.tracked(job)

    def attach_feed(self, feed: Feed) -> None:
        """Track this backend by its events too (`changefeed.ChangeFeed`)."""
        self._feeds[feed.backend] = feed

    def polling_again(self, backend: str) -> int:
        """The backend's events stopped: its jobs are described at their back-off again from
        now (not at a far sweep). How many were brought forward."""
        return self._tracker.reschedule(backend, self._clock())

    async def apply_event(self, obs: Observation) -> Applied:
        """An event's observation: judged and recorded as a describe's would be, unless it is
        no news (a duplicate or a late one: the vendor's order says so). Returns once what it
        said is committed; raises `StoreError` if it could not be (the message stays)."""
        entry = self._tracker.by_external(obs.external_id)
        if entry is None:
            return Applied.UNTRACKED
        async with self._lock(entry.job.id):
            if self._tracker.get(entry.job.id) is not entry:
                return Applied.UNTRACKED  # ended (or tracked anew) while this waited
            backend = self._backends[entry.job.backend]
            if not await self._apply_newer(backend, entry, obs, by_event=True):
                return Applied.STALE
            self._tracker.changed(entry, self._clock())
        return Applied.APPLIED

    def poke(self, job_id: str) -> None:
        """Poll this job as soon as possible (a local child exited, a cancel arrived)."""
        self._tracker.poke(job_id, self._clock())

    def update(self, job: models.Job) -> None:
        """A newer copy of a tracked job (e.g. its stop was requested): use it and poll soon."""
        self._tracker.update(job, self._clock())

    def stop_unrecorded(self, job_id: str, why: models.StopReason) -> None:
        """A stop the store could not record (it cannot write). Until it is recorded, which is
        tried again and again, the job is stopped as if it were: the stop is re-issued on every
        poll, the job's end is judged by it, and the dispatcher launches the job no more."""
        self._tracker.stop_unrecorded(job_id, why, self._clock())
        self._unrecorded_added.set()

    def tracks(self, job_id: str) -> bool:
        return self._tracker.get(job_id) is not None

    def pending_stop(self, job_id: str) -> models.StopReason | None:
        """The stop asked for this job that the store has not recorded yet, if any."""
        return self._tracker.pending_stop(job_id)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._record_stops(), name="record-stops")
            while True:
                self._wake.clear()
                for (backend, partition), batch in self._tracker.take_batches(self._clock()):
                    tg.create_task(self._poll(backend, batch), name=f"poll-{backend}-{partition}")
                next_due = self._tracker.next_due()
                timeout = None if next_due is None else max(0.0, next_due - self._clock())
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _poll(self, backend_name: str, batch: list[tracking.Tracked]) -> None:
        backend = self._backends[backend_name]
        try:
            async with self._describe_slots[backend_name]:
                for entry in batch:
                    await self._enforce_deadline(backend, entry)
                jobs = [entry.job for entry in batch]
                refused = None
                try:
                    observations = await backend.describe(jobs)
                except errors.AwsCredentials as exc:  # the daemon's trouble: jobs keep state
                    refused = str(exc)
                if refused is not None:
                    if self._health.backend_refused(backend_name, "describe", refused):
                        log.error(
                            "backend.degraded",
                            backend=backend_name,
                            calls="describe",
                            reason=refused,
                        )
                    return
                if self._health.backend_ok(backend_name, "describe"):
                    log.info("backend.recovered", backend=backend_name, calls="describe")
            # All at once: the store commits the batch's changes together (group commit).
            await asyncio.gather(
                *(self._apply_one(backend, entry, observations) for entry in batch)
            )
        except Exception:
            log.exception("poll.failed", backend=backend_name, jobs=len(batch))
        finally:
            now = self._clock()
            for entry in batch:
                self._tracker.polled(entry, now)

    async def _apply_one(
        self, backend: Backend, entry: tracking.Tracked, observations: Mapping[str, Observation]
    ) -> None:
        external_id = entry.job.external_id or ""
        obs = observations.get(external_id) or Observation(external_id, None)
        try:
            async with self._lock(entry.job.id):
                if not await self._apply_newer(backend, entry, obs):
                    entry.n += 1  # an event told more already (described before it came)
        except errors.StoreError as exc:
            # The store cannot write (it said so once, loudly): observed again next round.
            log.debug("poll.apply_unrecorded", job_id=entry.job.id, error=exc.message)
        except Exception:  # one job's trouble must not hold up the rest of its batch
            log.exception("poll.apply_failed", job_id=entry.job.id, backend=backend.name)

    async def _enforce_deadline(self, backend: Backend, entry: tracking.Tracked) -> None:
        job = entry.job
        stop_reason = self._tracker.stop_reason(job)
        if stop_reason is None:
            why = tracking.overdue(job, self._clock(), stop_reason)
            if why is None:
                return
            try:
                job = await self._store.request_stop(job.id, why)
                self._tracker.hold(entry, job)
                job = entry.job
            except errors.StoreError as exc:
                log.warning("job.stop_unrecorded", job_id=job.id, kind=why, error=exc.message)
                self.stop_unrecorded(job.id, why)
            log.info("job.timeout", job_id=job.id, kind=why, vendor_status=job.vendor_status)
            entry.n = 0
        if job.stop_reason is None:  # not recorded yet: the backend still hears why
            job = dataclasses.replace(job, stop_reason=self._tracker.stop_reason(job))
        try:
            await backend.stop(job)
        except Exception:
            log.exception("job.stop_failed", job_id=job.id, backend=backend.name)

    async def _apply_newer(
        self, backend: Backend, entry: tracking.Tracked, obs: Observation, *, by_event: bool = False
    ) -> bool:
        """`_apply`, unless the vendor's order says `obs` is no news (a duplicate, or older
        than the last change applied): whether it was applied. Under the job's lock."""
        if not eventflow.newer(obs.order, entry.order):
            return False
        await self._apply(backend, entry, obs, by_event=by_event)
        if obs.order is not None:
            entry.order = obs.order
        return True

    async def _apply(
        self,
        backend: Backend,
        entry: tracking.Tracked,
        obs: Observation,
        *,
        by_event: bool = False,
    ) -> None:
        job = entry.job
        judgement = tracking.judge(job, obs, self._tracker.stop_reason(job))
        if (
            not by_event
            and judgement.verdict is tracking.Verdict.TRANSITION
            and (feed := self._feeds.get(backend.name)) is not None
        ):
            assert judgement.state is not None
            feed.described(job, judgement.state)
        if judgement.verdict is tracking.Verdict.MISSING:
            await self._missing(backend, entry)
            return
        entry.missing_since = None
        if judgement.verdict is tracking.Verdict.UNCHANGED:
            entry.n += 1
            if judgement.vendor_changed:
                observed = await self._store.observe(
                    job.id, vendor_status=obs.vendor_status, reason=obs.reason, info=dict(obs.info)
                )
                self._tracker.hold(entry, observed)
            return
        assert judgement.state is not None
        if judgement.failure is not None and await self._retried(backend, entry, judgement, obs):
            return
        self._crash.crashpoint("poller.before_transition")
        info = dict(obs.info)
        if judgement.failure is not None:
            info["failure"] = judgement.failure
        try:
            job = await self._store.transition(
                job.id,
                job.state,
                judgement.state,
                reason=judgement.reason,
                exit_code=obs.exit_code,
                vendor_status=obs.vendor_status,
                info=info,
            )
        except errors.StaleState:
            job = await self._store.get(job.id)  # changed under us; trust the store
        finished_at = obs.info.get("finished_at")
        if judgement.state.terminal and self._on_detected and isinstance(finished_at, int | float):
            self._on_detected(job.backend, float(finished_at))
        self._settle(entry, job)

    async def _retried(
        self,
        backend: Backend,
        entry: tracking.Tracked,
        judgement: tracking.Judgement,
        obs: Observation,
    ) -> bool:
        """The attempt failed: if the job's retry policy retries it (and nobody asked it to
        stop, and the backend does not retry it itself), record the retry and hand the job to
        the dispatcher for its next attempt. Whether the failure was taken care of so."""
        job = entry.job
        assert judgement.failure is not None
        if self._tracker.stop_reason(job) is not None:
            return False
        if job.info.get("vendor_attempts") or obs.info.get("vendor_attempts"):
            return False  # retried by the backend itself (Batch's retryStrategy): not twice
        if job.spec.array_size is not None:
            return False  # a Batch array: its children were retried one by one, never it all
        policy = retries.policy_of(job)
        failure, exit_code = judgement.failure, obs.exit_code
        if not retries.retried(policy, failure=failure, exit_code=exit_code, attempt=job.attempt):
            return False
        wait_s = retries.delay(policy, job.attempt, self._rng)
        due = self._clock() + wait_s
        previous = retries.Previous(job.attempt, failure, judgement.reason, exit_code)
        self._crash.crashpoint("poller.before_retry")
        try:
            requeued = await self._store.retry(
                job.id,
                job.state,
                reason=retries.reason(previous, policy.attempts, wait_s),
                outcome=f"failed ({failure}): {judgement.reason or obs.vendor_status}",
                info={"retry": {"of": policy.attempts, "at": due, "previous": previous.to_info()}},
            )
        except errors.StaleState:  # changed under us (a stop arrived): judge it again
            self.update(await self._store.get(job.id))
            return True
        log.warning(
            "job.retry",
            job_id=job.id,
            backend=backend.name,
            attempt=job.attempt,
            of=policy.attempts,
            failure=failure,
            reason=judgement.reason,
            exit_code=exit_code,
            wait_s=round(wait_s, 3),
        )
        self._tracker.untrack(job.id)
        backend.settled(job)  # the attempt's end is recorded: what told it may go
        self._requeue(requeued, due)
        return True

    async def _missing(self, backend: Backend, entry: tracking.Tracked) -> None:
        job = entry.job
        now = self._clock()
        if not tracking.look_up_missing(entry, now, self._settings.missing_grace_s):
            entry.n += 1
            return
        assert entry.missing_since is not None
        located = await backend.locate(job)
        if located.external_id is not None and located.external_id != job.external_id:
            log.warning(
                "job.relocated", job_id=job.id, old=job.external_id, new=located.external_id
            )
            self._tracker.hold(entry, await self._store.relocate(job.id, located.external_id))
            entry.missing_since = None
            return
        reason = (
            f"{backend.name} has not known {job.external_id} for "
            f"{now - entry.missing_since:.0f}s and it cannot be found again"
        )
        job = await self._store.transition(
            job.id, job.state, models.JobState.LOST, reason=reason, info={"failure": "lost"}
        )
        log.error("job.lost", job_id=job.id, backend=backend.name, reason=reason)
        self._settle(entry, job)

    async def _record_stops(self) -> None:
        """Record the stops the store could not, as soon as it can write again."""
        delay_s = self._settings.base_s
        while True:
            await self._unrecorded_added.wait()
            for job_id, why in self._tracker.unrecorded_stops().items():
                try:
                    job = await self._store.request_stop(job_id, why)
                except errors.StoreError:
                    continue  # still cannot write; try again below
                except errors.OrchestratorError as exc:  # gone (purged): nothing to record
                    self._tracker.stop_recorded(job_id)
                    log.warning("job.stop_unrecordable", job_id=job_id, error=exc.message)
                    continue
                self._tracker.stop_recorded(job_id)
                log.info("job.stop_recorded", job_id=job_id, kind=why, state=job.state.value)
                self.update(job)
            if self._tracker.unrecorded_stops():
                await asyncio.sleep(delay_s)  # a retry back-off: nothing signals "writable again"
                delay_s = min(self._settings.cap_s, delay_s * 2)
            else:
                self._unrecorded_added.clear()
                delay_s = self._settings.base_s

    def _sweep_delay(self, entry: tracking.Tracked) -> float | None:
        """While the job's backend's events flow, the delay until its next describe (the
        sweep's), unless it needs its back-off: a stop is being carried out (re-issued each
        round), or it is missing (looked for after a grace)."""
        feed = self._feeds.get(entry.group[0])
        if feed is None or entry.missing_since is not None:
            return None
        if self._tracker.stop_reason(entry.job) is not None:
            return None
        return feed.sweep_delay(entry.job, self._tracker.count(entry.group[0]))

    def _slim(self, job: models.Job) -> models.Job:
        if isinstance(self._backends.get(job.backend), EventBackend):
            return self._slim_specs(job)
        return job

    def _lock(self, job_id: str) -> _JobLock:
        return _JobLock(self._applying, job_id)

    def _settle(self, entry: tracking.Tracked, job: models.Job) -> None:
        if not self._tracker.settle(entry, job):
            self._backends[job.backend].settled(job)


class _JobLock:
    """One observation at a time per job (an event's and a describe's may cross); the lock is
    kept only while someone holds or waits for it."""

    def __init__(self, locks: dict[str, tuple[asyncio.Lock, list[int]]], job_id: str) -> None:
        self._locks = locks
        self._job_id = job_id

    async def __aenter__(self) -> None:
        lock, users = self._locks.setdefault(self._job_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._locks[self._job_id][0].release()
        self._leave()

    def _leave(self) -> None:
        users = self._locks[self._job_id][1]
        users[0] -= 1
        if not users[0]:
            del self._locks[self._job_id]
