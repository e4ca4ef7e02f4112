"""What drives jobs: a dispatcher and its poller for a set of backends (`Drivers`), and the
router that hands each job to the drivers of its backend (`Router`).

On SQLite the daemon runs one `Drivers` for every backend, for as long as it runs. On a
PostgreSQL shared by several daemons (issue #16) it runs one for the local backend (the local
jobs it accepted, which stay on its host) and, only while it holds the lease
(`cluster.Cluster`), one for the AWS backends: made anew at each election, recovering every
unfinished AWS job exactly as a restart does, and cancelled when the lease is lost (what it
had under way is settled by the next leader, as after a crash).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import structlog

from orchestrator import errors, events, faults, models
from orchestrator.backends.base import Backend, EventBackend
from orchestrator.changefeed import ChangeFeed
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine import arrays, recovery
from orchestrator.health import Health
from orchestrator.poller import Poller
from orchestrator.settings import AwsBackendSettings, Settings
from orchestrator.store import Store

log = structlog.get_logger("orchestrator.drivers")


class Drivers:
    """One dispatcher and its poller for `backends`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        backends: Mapping[str, Backend],
        hub: events.Hub,
        *,
        on_detected: Callable[[str, float], None] | None = None,
        crash: faults.Faults | None = None,
        health: Health | None = None,
        owns: Callable[[models.Job], bool] = lambda job: True,
        may_launch: Callable[[], bool] = lambda: True,
    ) -> None:
        self.backends = backends
        self._store = store
        self._hub = hub
        self._owns = owns
        self.poller = Poller(
            settings.poller, store, backends, on_detected=on_detected, crash=crash, health=health
        )
        # The backends tracked by their events too (`[ecs.events] queue_url`…).
        self.feeds: dict[str, ChangeFeed] = {}
        for name, backend in backends.items():
            aws = getattr(settings, name, None)
            api = getattr(backend, "events_api", None)
            if isinstance(backend, EventBackend) and isinstance(aws, AwsBackendSettings) and api:
                feed = ChangeFeed(
                    backend,
                    aws.events,
                    api,
                    self.poller,
                    describe_rate_per_s=aws.describe_rate_per_s,
                    health=health,
                    crash=crash,
                )
                self.feeds[name] = feed
                self.poller.attach_feed(feed)
        self.dispatcher = Dispatcher(
            settings.dispatcher,
            store,
            backends,
            self.poller,
            hub,
            crash=crash,
            health=health,
            owns=owns,
            may_launch=may_launch,
        )

    def drives(self, job: models.Job) -> bool:
        """Whether this job is these drivers' to launch and track."""
        return job.backend in self.backends and self._owns(job)

    def knows(self, job_id: str) -> bool:
        """Whether the job is in hand already (queued, waiting, in flight or tracked)."""
        return self.dispatcher.knows(job_id) or self.poller.tracks(job_id)

    async def recover(self, jobs: Iterable[models.Job]) -> int:
        """Hand every unfinished job these drivers drive to the part that owns its next step,
        as after a restart; attempts cut short are settled (did they launch?) before this
        returns. How many there were."""
        launching: list[models.Job] = []
        count = 0
        for job in jobs:
            if not self.drives(job):
                continue
            count += 1
            step = recovery.recover(job, self.backends)
            if step is recovery.Recovery.SETTLE:
                launching.append(job)
            elif step is recovery.Recovery.STOP:
                assert job.stop_reason is not None
                try:
                    await self._store.request_stop(job.id, job.stop_reason)
                except errors.StoreError:  # a full disk must not keep us from serving
                    self.poller.stop_unrecorded(job.id, job.stop_reason)
            elif step is recovery.Recovery.ENQUEUE:
                self.dispatcher.enqueue(job)
            elif step is recovery.Recovery.ARRAY:
                self.dispatcher.watch_array(job.id)
            else:  # ORPHANED is never here: `drives` holds only enabled backends
                self.dispatcher.adopt(job)
                self.poller.track(job)
        await asyncio.gather(*(self.dispatcher.settle_at_start(job) for job in launching))
        return count

    def take(self, job: models.Job) -> None:
        """A job these drivers drive, committed or changed elsewhere (another daemon
        accepted it, or recorded its stop): take it in hand if new, else look at it again."""
        if job.state.terminal:
            return
        if job.state == models.JobState.QUEUED and not job.launching:
            if not self.knows(job.id) and job.stop_reason is None:
                self.dispatcher.enqueue(job)
        elif job.stop_reason is None:
            return  # in hand already: nothing another daemon may change but a stop
        elif arrays.expands(job):
            self.dispatcher.watch_array(job.id)
        else:
            self.poller.update(job)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.dispatcher.run(), name="dispatcher")
            tg.create_task(self.poller.run(), name="poller")
            for name, feed in self.feeds.items():
                tg.create_task(feed.run(), name=f"events-{name}")

    def close(self) -> None:
        """These drivers stop for good (their tasks are cancelled): they hear no more events."""
        self.dispatcher.close()
        for feed in self.feeds.values():
            feed.close()


class Router:
    """The drivers of each backend, as the API and the status line need them. A backend
    whose drivers are elsewhere (another daemon leads) has none here: its jobs are committed
    and the leader takes them from the store's notifications."""

    def __init__(self) -> None:
        self._by_backend: dict[str, Drivers] = {}

    def attach(self, drivers: Drivers) -> None:
        for name in drivers.backends:
            self._by_backend[name] = drivers

    def detach(self, drivers: Drivers) -> None:
        for name in drivers.backends:
            if self._by_backend.get(name) is drivers:
                del self._by_backend[name]

    def drives_backend(self, backend: str) -> bool:
        return backend in self._by_backend

    def drivers_of(self, job: models.Job) -> Drivers | None:
        drivers = self._by_backend.get(job.backend)
        return drivers if drivers is not None and drivers.drives(job) else None

    def enqueue(self, job: models.Job) -> None:
        if (drivers := self.drivers_of(job)) is not None:
            drivers.dispatcher.enqueue(job)

    def watch_array(self, job: models.Job) -> None:
        if (drivers := self.drivers_of(job)) is not None:
            drivers.dispatcher.watch_array(job.id)

    def update(self, job: models.Job) -> None:
        if (drivers := self.drivers_of(job)) is not None:
            drivers.poller.update(job)

    def stop_unrecorded(self, job: models.Job, why: models.StopReason) -> None:
        if (drivers := self.drivers_of(job)) is not None:
            drivers.poller.stop_unrecorded(job.id, why)

    def take(self, job: models.Job) -> None:
        if (drivers := self.drivers_of(job)) is not None:
            drivers.take(job)

    def poke(self, backend: str, job_id: str) -> None:
        if (drivers := self._by_backend.get(backend)) is not None:
            drivers.poller.poke(job_id)

    def in_flight(self, backend: str) -> int | None:
        """Jobs in flight on this backend as this daemon drives them (None: it does not)."""
        drivers = self._by_backend.get(backend)
        return None if drivers is None else drivers.dispatcher.in_flight(backend)

    def feeds(self) -> dict[str, ChangeFeed]:
        """The change feeds of the backends driven here, by backend."""
        return {
            name: drivers.feeds[name]
            for name, drivers in self._by_backend.items()
            if name in drivers.feeds
        }

    def queued(self, backend: str) -> int | None:
        drivers = self._by_backend.get(backend)
        return None if drivers is None else drivers.dispatcher.queued(backend)
