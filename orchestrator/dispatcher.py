"""Hands QUEUED jobs to their backend: one lane per backend, a cap on jobs in flight, retries.

Per job: commit the attempt and its token, call `backend.submit`, store the external id, hand
the job to the poller. A start failure is classified by the backend: retryable ones are tried
again after a full-jitter back-off within `max_start_attempts` and `start_budget_s`; anything
else fails the job at once with the backend's reason. The dispatcher never learns which vendor
a lane drives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from orchestrator import backoff, errors, events, faults, models
from orchestrator.backends.base import Backend
from orchestrator.engine import arrays, dependencies, lanes, starts, tracking
from orchestrator.health import Health
from orchestrator.poller import Poller
from orchestrator.settings import DispatcherSettings
from orchestrator.store import JobQuery, Store

log = structlog.get_logger("orchestrator.dispatcher")


@dataclass(slots=True)
class _Shell:
    """What the async side holds for one lane: its backend, the engine's lane, the submits in
    flight at most (`submit_concurrency`), and the event its loop sleeps on."""

    backend: Backend
    lane: lanes.Lane
    slots: asyncio.Semaphore
    wake: asyncio.Event
    deferrals: int = 0  # starts deferred in a row (the backend's credentials refused)


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
        crash: faults.Faults | None = None,
        health: Health | None = None,
        owns: Callable[[models.Job], bool] = lambda job: True,
        may_launch: Callable[[], bool] = lambda: True,
    ) -> None:
        self._crash = crash or faults.Faults()  # unarmed unless the daemon hands its own
        # Whether a job of these backends is this daemon's to drive (on a shared PostgreSQL, a
        # local job is its node's): another's array parent is not judged here.
        self._owns = owns
        # Checked right before every launch: a leader whose lease may have passed to another
        # daemon (it was paused, or cut off) launches nothing more (`cluster`).
        self._may_launch = may_launch
        self._hub = hub
        self._health = health or Health(store)
        self._settings = settings
        self._store = store
        self._poller = poller
        self._lanes = {name: self._shell(backend) for name, backend in backends.items()}
        self._retry = backoff.Policy(
            base_s=settings.retry_base_s,
            factor=2.0,
            cap_s=settings.retry_cap_s,
            jitter="full",
            floor_s=0.05,
        )
        self._rng = rng or backoff.default_rng()
        self._clock = clock
        # Why each unsettled attempt's outcome is unknown (the last call's error): said in the
        # reason of a job that ends LOST for it.
        self._unknown: dict[str, str] = {}
        # Jobs waiting for others (`depends_on`), by the job they wait for: looked at again when
        # that one ends.
        self._waiting: dict[str, set[str]] = {}
        self._checks: set[asyncio.Task[None]] = set()
        # Array parents (ECS, local) whose children changed since their state was last judged.
        self._arrays_changed: set[str] = set()
        hub.listen(self._on_event)
        poller.set_requeue(self.requeue)

    def _shell(self, backend: Backend) -> _Shell:
        wake = asyncio.Event()
        lane = lanes.Lane(
            backend.name,
            backend.max_in_flight,
            max_attempts=backend.max_start_attempts or self._settings.max_start_attempts,
            budget_s=backend.start_budget_s or self._settings.start_budget_s,
            wake=wake.set,
            devices=getattr(backend, "gpu_devices", ()),  # the local backend's GPUs
        )
        return _Shell(backend, lane, asyncio.Semaphore(self._settings.submit_concurrency), wake)

    def enqueue(self, job: models.Job) -> None:
        """A QUEUED job is ready for its (next) attempt — at once, or when the retry it waits
        for is due (a restart finds it so), or once the jobs it depends on allow it."""
        if job.spec.depends_on and job.attempt == 0:
            self._check_later(job.id)
            return
        self._to_lane(job)

    def _to_lane(self, job: models.Job) -> None:
        if arrays.expands(job):  # its children go to the lane: it becomes them
            deadline = tracking.queue_deadline(job)
            if deadline is not None and deadline <= self._clock():  # passed while it waited
                self._later(self._expire(job.id), f"expire-{job.id}")
            else:
                self._later(self._expand(job), f"expand-{job.id}")
            return
        due = tracking.retry_due(job)
        if due is not None and due > self._clock() and job.attempt > 0:
            self.requeue(job, due)
        else:
            lane = self._lanes[job.backend].lane
            lane.enqueue(job.id, tracking.queue_deadline(job), self._key(job), _gpus(lane, job))

    def requeue(self, job: models.Job, at: float) -> None:
        """The job's attempt failed and its retry policy retries it (`Store.retry` recorded
        that): its next attempt is launched at `at`."""
        lane = self._lanes[job.backend].lane
        lane.requeue_at(job.id, at, tracking.queue_deadline(job), self._key(job), _gpus(lane, job))

    def _key(self, job: models.Job) -> float:
        """The job's place in its lane (`lanes`): since when it has waited, less what its
        priority is worth in waiting."""
        return tracking.queued_since(job) - job.spec.priority * self._settings.priority_aging_s

    def adopt(self, job: models.Job) -> None:
        """Count a job recovered at start-up, already past dispatch, against its lane's cap
        (with the devices its launch was given)."""
        devices = job.info.get("gpus")
        held = [str(d) for d in devices] if isinstance(devices, list) else []
        self._lanes[job.backend].lane.adopt(job.id, held)

    def in_flight(self, backend: str) -> int:
        return self._lanes[backend].lane.in_flight

    def queued(self, backend: str) -> int:
        return self._lanes[backend].lane.queued

    def knows(self, job_id: str) -> bool:
        """Whether the job is in a lane (queued or in flight) or waits for others here."""
        return any(
            shell.lane.is_queued(job_id) or shell.lane.is_in_flight(job_id)
            for shell in self._lanes.values()
        ) or any(job_id in waiting for waiting in self._waiting.values())

    def close(self) -> None:
        """Hear no more events (these drivers are done: another daemon leads)."""
        self._hub.unlisten(self._on_event)

    def _on_event(self, event: models.Event) -> None:
        # Every job's end wakes the jobs waiting for it, whoever drives it; the rest concerns
        # only the backends this dispatcher drives.
        if event.to_state.terminal:
            for waiting in self._waiting.pop(event.job_id, ()):
                self._check_later(waiting)
        if (shell := self._lanes.get(event.backend)) is None:
            return
        if event.to_state.terminal:
            shell.lane.ended(event.job_id)
        if event.from_state is not None and (child := arrays.split(event.job_id)) is not None:
            self.watch_array(child[0])

    # -- arrays (ECS, local: `engine.arrays`) ----------------------------------------------

    async def _expand(self, job: models.Job) -> None:
        """The array job becomes its children, which go to their lane."""
        try:
            parent, children = await self._store.expand(job.id, arrays.child_specs(job.spec))
        except errors.StaleState:
            return  # cancelled meanwhile: that ended it
        except Exception:  # the store cannot write now: try again later (it stays QUEUED)
            log.exception("dispatch.expand_failed", job_id=job.id)
            asyncio.get_running_loop().call_later(self._settings.retry_cap_s, self._to_lane, job)
            return
        log.info("job.array_expanded", job_id=parent.id, children=len(children))
        for child in children:
            self._to_lane(child)

    def watch_array(self, parent_id: str) -> None:
        """Judge the array parent's state again soon (its children changed, or a restart)."""
        if parent_id in self._arrays_changed:
            return  # a judgement is due already: it will see this change too
        self._arrays_changed.add(parent_id)
        self._later(self._judge_array(parent_id), f"array-{parent_id}")

    async def _judge_array(self, parent_id: str) -> None:
        """The parent's state from its children's (`engine.arrays.verdict`), their progress in
        its `info.array_status`. Changes that come while it runs are seen by the next."""
        await asyncio.sleep(0)  # a burst of children's events is judged once
        self._arrays_changed.discard(parent_id)
        try:
            parent = await self._store.get(parent_id)
            if parent.state.terminal or not arrays.expands(parent) or not self._owns(parent):
                return
            size, children = parent.spec.array_size or 0, f"{parent_id}:"
            if parent.stop_reason is not None:  # stopped: so is every child that has not ended
                for child in await self._store.stop_children(parent_id, parent.stop_reason):
                    self._poller.update(child)  # launched: its backend stops it
            counts = await self._store.count_children(parent_id)
            first_failed = None
            if sum(counts.get(s.value, 0) for s in models.TERMINAL) >= size:
                ended_badly = models.TERMINAL - {models.JobState.SUCCEEDED}
                found = await self._store.list_jobs(
                    JobQuery(frozenset(ended_badly), limit=size, id_prefix=children)
                )
                first_failed = min(found, key=_index, default=None)  # the lowest index
            verdict = arrays.verdict(parent, counts, first_failed)
            info: dict[str, Any] = {"array_status": counts}
            if verdict.state is None:
                if parent.info.get("array_status") != counts:
                    await self._store.observe(parent_id, vendor_status=None, reason=None, info=info)
                return
            if verdict.failure is not None:
                info["failure"] = verdict.failure
            await self._store.transition(
                parent_id, parent.state, verdict.state, reason=verdict.reason, info=info
            )
        except errors.StaleState:
            self.watch_array(parent_id)  # changed under us: judge it again
        except Exception:
            log.exception("dispatch.array_failed", job_id=parent_id)

    def _later(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    # -- dependencies ----------------------------------------------------------------------

    def _check_later(self, job_id: str) -> None:
        self._later(self._check_dependencies(job_id), f"dependencies-{job_id}")

    async def _check_dependencies(self, job_id: str) -> None:
        """Launch the job once what it depends on allows (`engine.dependencies.verdict`); end
        it, failure class `dependency`, once that can no longer be; else say what it waits for
        and wait for the next of them to end."""
        try:
            job = await self._store.get(job_id)
            if job.state != models.JobState.QUEUED or job.launching or job.stop_reason:
                return  # ended, launched or being stopped meanwhile
            for dep in job.spec.depends_on:  # before reading them: no end slips between
                self._waiting.setdefault(dep, set()).add(job_id)
            found: dict[str, models.Job | None] = {}
            for dep in job.spec.depends_on:
                try:
                    found[dep] = await self._store.get(dep)
                except errors.JobNotFound:
                    found[dep] = None  # purged after it ended: its outcome is not known
            verdict = dependencies.verdict(job, found)
            if verdict.waiting_for:
                if job.reason != verdict.reason:
                    await self._store.observe(job_id, vendor_status=None, reason=verdict.reason)
                return
            for dep in job.spec.depends_on:
                self._waiting.get(dep, set()).discard(job_id)
            if verdict.blocked_by is not None:
                await self._store.transition(
                    job_id,
                    models.JobState.QUEUED,
                    models.JobState.CANCELLED,
                    reason=verdict.reason,
                    info={"failure": "dependency"},
                )
                log.info("job.dependency_failed", job_id=job_id, dependency=verdict.blocked_by)
                return
            self._to_lane(job)  # its waiting reason goes when it is launched
        except errors.StaleState:
            pass  # it changed under us (launched, cancelled): whatever did it goes on
        except Exception:
            log.exception("dispatch.dependencies_failed", job_id=job_id)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for name, shell in self._lanes.items():
                    tg.create_task(self._run_lane(shell, tg), name=f"dispatch-{name}")
        finally:  # stopping: the looks at dependencies and arrays stop too (a restart redoes them)
            for task in list(self._checks):
                task.cancel()

    async def _run_lane(self, shell: _Shell, tg: asyncio.TaskGroup) -> None:
        lane = shell.lane
        while True:
            shell.wake.clear()
            for action in lane.due(self._clock()):
                job_id = action.job_id
                if isinstance(action, lanes.Settle):
                    tg.create_task(self._settle_later(shell, job_id), name=f"settle-{job_id}")
                elif isinstance(action, lanes.Resubmit):
                    await shell.slots.acquire()
                    tg.create_task(self._resubmit(shell, job_id), name=f"resubmit-{job_id}")
                elif isinstance(action, lanes.Expire):
                    tg.create_task(self._expire(job_id), name=f"expire-{job_id}")
                else:
                    await shell.slots.acquire()
                    tg.create_task(self._dispatch(shell, job_id), name=f"dispatch-{job_id}")
            next_timer = lane.next_timer()
            timeout = None if next_timer is None else max(0.0, next_timer - self._clock())
            try:
                async with asyncio.timeout(timeout):
                    await shell.wake.wait()
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

    async def _dispatch(self, shell: _Shell, job_id: str) -> None:
        lane = shell.lane
        try:
            self._crash.crashpoint("dispatch.before_attempt")
            if self._poller.pending_stop(job_id) is not None:
                # Stopped while the store could not record it: never launched, ended once the
                # stop is recorded.
                lane.release(job_id)
                return
            job = await self._store.begin_attempt(job_id)
            if job is None:  # cancelled or timed out while it waited
                lane.release(job_id)
                return
            self._crash.crashpoint("dispatch.after_attempt_recorded")
            await self._submit(shell, job)
        except Exception:
            # A job's failure never takes the daemon down: look at it again later (it may be
            # half-launched) with the same care as after a restart.
            log.exception("dispatch.failed", job_id=job_id, backend=shell.backend.name)
            lane.settle_at(job_id, self._clock() + self._settings.retry_cap_s)
        finally:
            shell.slots.release()
            shell.wake.set()

    async def _submit(self, shell: _Shell, job: models.Job, *, settling: bool = False) -> None:
        """Call the backend for the job's current attempt and record what came of it. While
        settling an attempt whose outcome is unknown, a refusal proves nothing about the
        earlier call: look again later rather than start a new attempt."""
        lane = shell.lane
        if devices := lane.devices_of(job.id):  # the lane's pick: the backend hands them on
            job = dataclasses.replace(job, info={**job.info, "gpus": list(devices)})
        if not self._may_launch():  # whoever leads next settles the attempt, as after a crash
            log.warning("job.launch_withheld", job_id=job.id, attempt=job.attempt)
            lane.settle_at(job.id, self._clock() + self._settings.retry_cap_s)
            return
        try:
            submitted = await shell.backend.submit(job)
        except errors.StartFailed as exc:
            if settling:
                log.info("job.settle_retry", job_id=job.id, attempt=job.attempt, reason=exc.reason)
                lane.settle_at(job.id, self._clock() + self._retry.delay(job.attempt, self._rng))
                return
            await self._start_failed(shell, job, exc)
            return
        except errors.OutcomeUnknown as exc:
            log.warning("job.start_unknown", job_id=job.id, attempt=job.attempt, error=exc.message)
            self._unknown[job.id] = exc.message
            lane.settle_at(job.id, self._clock() + self._retry.delay(0, self._rng))
            return
        except errors.StartDeferred as exc:
            self._deferred(shell, job, exc)
            return
        self._crash.crashpoint("dispatch.after_submit")
        self._started(shell)
        lane.settled(job.id)
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
            backend=shell.backend.name,
            attempt=job.attempt,
            external_id=submitted.external_id,
        )
        self._poller.track(job)

    def _deferred(self, shell: _Shell, job: models.Job, exc: errors.StartDeferred) -> None:
        """Nothing started, and not for the job's reason: the job keeps its attempt and its
        state, the lane pauses, the same attempt is tried again after a back-off (the probe:
        when it starts, launches resume)."""
        shell.deferrals += 1
        delay = self._retry.delay(shell.deferrals, self._rng)
        name = shell.backend.name
        if self._health.backend_refused(name, "launch", exc.reason):
            log.error("backend.degraded", backend=name, calls="launch", reason=exc.reason)
        log.info("job.start_deferred", job_id=job.id, attempt=job.attempt, wait_s=round(delay, 3))
        shell.lane.resubmit_at(job.id, self._clock() + delay)

    def _started(self, shell: _Shell) -> None:
        shell.deferrals = 0
        shell.lane.resume()
        if self._health.backend_ok(shell.backend.name, "launch"):
            log.info("backend.recovered", backend=shell.backend.name, calls="launch")

    async def _resubmit(self, shell: _Shell, job_id: str) -> None:
        """The deferred attempt again, under its own token: its last try started nothing."""
        try:
            job = await self._store.get(job_id)
            if job.state != models.JobState.QUEUED or not job.launching:
                shell.lane.release(job_id)  # settled otherwise meanwhile (a restart, a purge)
                return
            stop = job.stop_reason or self._poller.pending_stop(job_id)
            if stop is not None:  # stopped while deferred: nothing runs, so it ends now
                await self._store.record_start_failure(
                    job_id, "deferred, then stopped", final=False
                )
                await self._end_stopped(shell, job_id, stop)
                return
            await self._submit(shell, job)
        except Exception:
            log.exception("dispatch.failed", job_id=job_id, backend=shell.backend.name)
            shell.lane.settle_at(job_id, self._clock() + self._settings.retry_cap_s)
        finally:
            shell.slots.release()
            shell.wake.set()

    async def _end_stopped(self, shell: _Shell, job_id: str, stop: models.StopReason) -> None:
        """A job stopped while it was launching, whose attempt provably started nothing (its
        failure just recorded): out of its lane, and ended by the stop (QUEUED, no longer
        launching: the store ends it at once)."""
        shell.lane.release(job_id)
        await self._store.request_stop(job_id, stop)

    async def _start_failed(self, shell: _Shell, job: models.Job, exc: errors.StartFailed) -> None:
        lane = shell.lane
        retry = starts.retry_start(
            retryable=exc.retryable,
            attempt=job.attempt,
            max_attempts=lane.max_attempts,
            elapsed_s=self._clock() - job.created_at,
            budget_s=lane.budget_s,
        )
        job = await self._store.record_start_failure(
            job.id, exc.reason, final=not retry, failure=exc.failure
        )
        stop = job.stop_reason or self._poller.pending_stop(job.id)
        if retry and stop is not None:
            # Stopped while its start was in flight: nothing runs, so the stop ends it now
            # rather than a retry (which would find it stopped and leave it QUEUED).
            log.info("job.start_abandoned", job_id=job.id, kind=stop, reason=exc.reason)
            await self._end_stopped(shell, job.id, stop)
            return
        if not retry:
            lane.release(job.id)
            log.warning(
                "job.start_failed",
                job_id=job.id,
                backend=shell.backend.name,
                attempt=job.attempt,
                reason=exc.reason,
                retryable=exc.retryable,
            )
            return
        delay = self._retry.delay(job.attempt - 1, self._rng)
        log.info(
            "job.start_retry",
            job_id=job.id,
            backend=shell.backend.name,
            attempt=job.attempt,
            reason=exc.reason,
            wait_s=round(delay, 3),
        )
        lane.retry_at(job.id, self._clock() + delay)

    async def _settle_later(self, shell: _Shell, job_id: str) -> None:
        try:
            job = await self._store.get(job_id)
            if job.state == models.JobState.QUEUED and job.launching:
                await self.settle(job)
            elif job.state == models.JobState.QUEUED:  # the attempt was never recorded
                shell.lane.release(job_id)
                self.enqueue(job)
            elif not job.state.terminal:  # launched, though its record's answer was lost
                shell.lane.settled(job_id)
                self._poller.track(job)
        except Exception:
            log.exception("dispatch.settle_failed", job_id=job_id)
            shell.lane.settle_at(job_id, self._clock() + self._settings.retry_cap_s)

    async def settle_at_start(self, job: models.Job) -> None:
        """`settle` for the start-up reconciliation: an AWS hiccup must not keep the daemon
        from serving; the job is looked at again shortly."""
        try:
            await self.settle(job)
        except Exception:
            log.exception("dispatch.settle_failed", job_id=job.id)
            lane = self._lanes[job.backend].lane
            lane.settle_at(job.id, self._clock() + self._settings.retry_base_s)

    async def settle(self, job: models.Job) -> None:
        """Settle an attempt recorded as launching whose outcome is unknown (a crash, a timeout,
        a 5xx): carry out what `starts.settle` decides from what the backend can find."""
        shell = self._lanes[job.backend]
        lane = shell.lane
        tries = lane.begin_settle(job.id)
        located = await shell.backend.locate(job)
        settlement = starts.settle(
            located,
            can_resubmit=shell.backend.can_resubmit(job),
            tries=tries,
            max_attempts=lane.max_attempts,
            since_attempt_s=self._clock() - _attempt_started(job),
            budget_s=lane.budget_s,
        )
        looking = settlement is starts.Settlement.LOOK_AGAIN
        why = None if looking else self._unknown.pop(job.id, None)
        if settlement in (starts.Settlement.ADOPT, starts.Settlement.REQUEUE):
            lane.settled(job.id)
        if settlement is starts.Settlement.ADOPT:
            assert located.external_id is not None
            job = await self._store.record_submitted(
                job.id, external_id=located.external_id, state=models.JobState.SUBMITTED
            )
            log.info("job.reconciled", job_id=job.id, attempt=job.attempt, outcome="adopted")
            self._poller.track(job)
        elif settlement is starts.Settlement.REQUEUE:
            job = await self._store.record_start_failure(
                job.id, f"attempt {job.attempt} never launched", final=False
            )
            lane.release(job.id)
            log.info("job.reconciled", job_id=job.id, attempt=job.attempt, outcome="requeued")
            if job.stop_reason is None:
                self.enqueue(job)
            else:
                await self._store.request_stop(job.id, job.stop_reason)
        elif settlement is starts.Settlement.RESUBMIT:
            log.info("job.reconciled", job_id=job.id, attempt=job.attempt, outcome="resubmitted")
            await self._submit(shell, job, settling=True)  # same attempt, same token: idempotent
        elif settlement is starts.Settlement.LOOK_AGAIN:
            lane.settle_at(job.id, self._clock() + self._retry.delay(job.attempt, self._rng))
        else:
            lane.settled(job.id)
            reason = f"cannot establish whether attempt {job.attempt} launched"
            if why is not None:
                reason += f" (its start call ended so: {why})"
            await self._store.transition(
                job.id, job.state, models.JobState.LOST, reason=reason, info={"failure": "lost"}
            )
            log.error("job.lost", job_id=job.id, attempt=job.attempt, reason=reason)


def _index(child: models.Job) -> int:
    found = arrays.split(child.id)
    return found[1] if found is not None else 0


def _gpus(lane: lanes.Lane, job: models.Job) -> int:
    """The lane's devices the job needs: its GPUs, where the lane hands devices out."""
    resources = job.spec.resources
    return (resources.gpus or 0) if lane.devices and resources is not None else 0


def _attempt_started(job: models.Job) -> float:
    started = job.info.get("attempt_started_at")
    return float(started) if isinstance(started, int | float) else job.updated_at
