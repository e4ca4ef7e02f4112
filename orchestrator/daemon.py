"""The composition root and the daemon's lifecycle.

`Daemon.run()`: capture signals → start-up (open the store, start backends, reconcile every
unfinished job, bind the socket, report ready) → run every component in one TaskGroup →
ordered shutdown. Everything is built here, once, from settings; nothing else reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from orchestrator import access, errors, events, faults, logs, metrics, models, notify
from orchestrator.api import Api
from orchestrator.backends.base import Backend
from orchestrator.backends.local import LocalBackend
from orchestrator.drivers import Drivers, Router
from orchestrator.engine import recovery
from orchestrator.health import Health
from orchestrator.ratelimit import TokenBucket
from orchestrator.server import Server
from orchestrator.settings import Settings
from orchestrator.store import PROBLEM_REASONS, SqliteStore, Store

if TYPE_CHECKING:
    from orchestrator.cluster import Cluster

log = structlog.get_logger("orchestrator.daemon")

_RETENTION_INTERVAL_S = 3600.0
_SPARE_DESCRIPTORS = 64  # the store, the log, the metrics endpoint, AWS clients, ...


def open_store(settings: Settings, hub: events.Hub) -> Store:
    """The store the settings name: PostgreSQL (`store.url`), else the SQLite file."""
    if settings.store.url:
        from orchestrator.store.postgres import PostgresStore  # imports asyncpg: only when used

        return PostgresStore(
            settings.store.url,
            hub,
            node=settings.cluster.node,
            # A leader's transaction cut off mid-way holds the lease's row: ended well within
            # the TTL, so that a follower can take over in time.
            idle_in_transaction_s=max(1.0, settings.cluster.lease_ttl_s / 4),
        )
    return SqliteStore(settings.store, hub)


def build_backends(settings: Settings, store: Store | None = None) -> dict[str, Backend]:
    """The backends the settings enable; `store` remembers the definitions jobs' images run
    under (`backends.definitions`) across restarts."""
    backends: dict[str, Backend] = {}
    if settings.local.enabled:
        backends["local"] = LocalBackend(
            settings.local, settings.local_work_dir(), hidden_from_jobs=[settings.store.path.parent]
        )
    # One CloudWatch Logs bucket: both backends read logs from the same account and Region.
    logs_bucket = TokenBucket("logs", settings.cloudwatch.rate_per_s, settings.cloudwatch.burst)
    if settings.ecs.enabled:
        from orchestrator.backends.ecs import EcsBackend  # imports aioboto3: only when used

        backends["ecs"] = EcsBackend(
            settings.ecs, logs_bucket, log_delivery_s=settings.cloudwatch.delivery_s, memory=store
        )
    if settings.batch.enabled:
        from orchestrator.backends.batch import BatchBackend

        backends["batch"] = BatchBackend(
            settings.batch, logs_bucket, log_delivery_s=settings.cloudwatch.delivery_s, memory=store
        )
    return backends


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        backends: dict[str, Backend] | None = None,
        inherited_socket: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.faults = faults.Faults()  # armed at start-up, from the environment
        self.hub = events.Hub()
        self.store: Store = open_store(settings, self.hub)
        self.backends = build_backends(settings, self.store) if backends is None else backends
        self.metrics = metrics.Metrics()
        self.health = Health(self.store)
        self.router = Router()
        # The drivers this daemon runs for as long as it runs: on SQLite, every backend's; on
        # a shared PostgreSQL, the local backend's (its own local jobs), while the AWS
        # backends' run only while it leads (`cluster`).
        self.drivers: list[Drivers] = []
        self.cluster: Cluster | None = None
        if settings.store.url:  # several daemons may share it (imports asyncpg: only then)
            from orchestrator.cluster import Cluster, owns_local
            from orchestrator.store.postgres import PostgresStore

            assert isinstance(self.store, PostgresStore)
            node = settings.cluster.node
            local = {name: b for name, b in self.backends.items() if name == "local"}
            aws = {name: b for name, b in self.backends.items() if name != "local"}
            if local:
                self.drivers.append(self._drivers(local, owns_local(node)))
            self.cluster = Cluster(
                self.store,
                self.hub,
                self.router,
                node=node,
                lease_ttl_s=settings.cluster.lease_ttl_s,
                orphan_timeout_s=settings.local.orphan_timeout_s,
                make_drivers=(lambda: self._drivers(aws, may_launch=self._may_launch))
                if aws
                else None,
            )
        else:
            self.drivers.append(self._drivers(self.backends))
        for drivers in self.drivers:
            self.router.attach(drivers)
        self.api = Api(
            settings.jobs,
            self.store,
            self.router,
            self.backends,
            self.hub,
            policy=access.Policy(
                admin_uids=frozenset(settings.server.admin_uids),
                admin_gids=frozenset(settings.server.admin_gids),
                run_as=settings.local.run_as,
            ),
            crash=self.faults,
            health=self.health,
            cluster=None if self.cluster is None else self.cluster.describe,
        )
        self.api.on_shutdown = self.request_stop
        self.server = Server(settings.server, self.api)
        self.metrics.add_collector(
            metrics.Sampled(
                aws_calls=lambda: [c for b in self.backends.values() for c in b.telemetry().calls],
                buckets=lambda: [r for b in self.backends.values() for r in b.telemetry().buckets],
                rejections=lambda: self.server.rejections.items(),
                log_drops=logs.dropped,
                local_read_errors=lambda: [
                    e for b in self.backends.values() for e in b.telemetry().read_errors
                ],
                events=lambda: [
                    (name, feed.flowing, feed.counts, feed.describe()["receivers"])
                    for name, feed in self.router.feeds().items()
                ],
            )
        )
        self.hub.listen(self.metrics.on_event, "own")
        self._endpoint = (
            metrics.Endpoint(self.metrics, settings.metrics.listen, self._refresh_metrics)
            if settings.metrics.listen
            else None
        )
        self._inherited_socket = inherited_socket
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals: list[str] = []  # names of the signals received, in order
        self._signals_logged = 0
        self.hub.listen(logs.log_transition, "own")
        for name, backend in self.backends.items():
            backend.set_wake(functools.partial(self.router.poke, name))

    def _drivers(
        self,
        backends: dict[str, Backend],
        owns: Callable[[models.Job], bool] = lambda job: True,
        may_launch: Callable[[], bool] = lambda: True,
    ) -> Drivers:
        return Drivers(
            self.settings,
            self.store,
            backends,
            self.hub,
            on_detected=self.metrics.detected,
            crash=self.faults,
            health=self.health,
            owns=owns,
            may_launch=may_launch,
        )

    def _may_launch(self) -> bool:
        return self.cluster is not None and self.cluster.may_launch()

    @property
    def metrics_address(self) -> str | None:
        return None if self._endpoint is None else self._endpoint.address

    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        # Handlers only set flags (the normal flow logs them: `_log_signals`). A second signal
        # skips the grace periods.
        self._signals.append(signal.Signals(signum).name)
        self._stop.set()
        if len(self._signals) > 1:
            self._force.set()

    def _log_signals(self) -> None:
        """One `daemon.signal` line per signal received since the last call."""
        while self._signals_logged < len(self._signals):
            self._signals_logged += 1
            name = self._signals[self._signals_logged - 1]
            log.info("daemon.signal", signal=name, count=self._signals_logged)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            await self._serve()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def _serve(self) -> None:
        started = time.monotonic()
        phases: dict[str, float] = {}  # seconds each start-up step took, for the ready line

        def lap(phase: str) -> None:
            phases[phase] = round(time.monotonic() - started - sum(phases.values()), 3)

        self.faults.arm(os.environ.get(faults.ENV))
        _check_descriptor_limit(self.settings)
        if self._inherited_socket is None:  # else systemd bound it: there is no directory to check
            self.server.prepare()  # a squatted socket directory stops us before a job is touched
        await self.store.open()
        lap("store_s")
        try:
            for backend in self.backends.values():
                await backend.start()
            lap("backends_s")
            if self.cluster is not None:
                await self.cluster.announce()
            recovered = await self._recover()
            lap("recover_s")
            await self.server.start(self._inherited_socket)
            if self._endpoint is not None:
                await self._endpoint.start()
            log.info(
                "daemon.ready",
                socket=str(self.server.path),
                store=self.settings.store.url_shown or str(self.settings.store.path),
                backends=sorted(self.backends),
                recovered=recovered,
                startup_s=round(time.monotonic() - started, 3),
                **phases,
            )
            notify.send("READY=1", f"STATUS={self.status_line()} ({recovered} recovered)")
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.server.serve(), name="server"),
                    *(tg.create_task(d.run(), name="drivers") for d in self.drivers),
                    tg.create_task(self._retention(), name="retention"),
                    tg.create_task(self._watchdog(), name="watchdog"),
                ]
                if self.cluster is not None:
                    tasks.append(tg.create_task(self.cluster.run(), name="cluster"))
                await self._stop.wait()
                self._log_signals()
                await self._shutdown(tasks)
        finally:
            if self._endpoint is not None:
                await self._endpoint.close()
            for backend in self.backends.values():
                await backend.close()
            await self.store.close()
            self._log_signals()  # one that came during start-up or the shutdown
            log.info("daemon.stopped")

    async def _recover(self) -> int:
        """Hand every unfinished job this daemon drives to the drivers of its backend (on a
        shared PostgreSQL, the AWS jobs wait for whoever leads: `cluster`)."""
        jobs = await self.store.unfinished()
        if self.cluster is None:
            for job in jobs:
                if recovery.recover(job, self.backends) is recovery.Recovery.ORPHANED:
                    log.warning("job.backend_disabled", job_id=job.id, backend=job.backend)
        else:
            await self.cluster.back_again(jobs)
        counts = await asyncio.gather(*(drivers.recover(jobs) for drivers in self.drivers))
        return sum(counts)

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        grace_s = self.settings.server.shutdown_grace_s
        log.info("daemon.stopping", grace_s=grace_s)
        notify.send("STOPPING=1")
        # 1. Stop taking work; answer what was already asked within the grace period.
        self.api.accepting = False
        await self.server.close(grace_s, self._force)
        self._log_signals()  # a second one, which cut the grace period short
        # 2. Stop dispatching and polling. Submissions cut off mid-call stay recorded as
        #    launching; the next start-up asks the backend whether they launched.
        for task in tasks:
            task.cancel()

    async def _refresh_metrics(self) -> None:
        with contextlib.suppress(errors.StoreError):  # counts stay as last read; degraded says
            counts = await self.store.count_by_state()
            for state in models.JobState:
                self.metrics.jobs.labels(state.value).set(counts.get(state.value, 0))
        degraded = {problem.reason for problem in self.health.problems()}
        for reason in PROBLEM_REASONS:
            self.metrics.degraded.labels(reason).set(1 if reason in degraded else 0)
        free = self.store.free_bytes()
        self.metrics.store_free_bytes.set(-1 if free is None else free)
        if self.cluster is not None:
            self.cluster.export(self.metrics)

    async def _watchdog(self) -> None:
        """systemd's watchdog: WATCHDOG=1 (with a STATUS= line) at half of WATCHDOG_USEC, each
        only after a round trip through the event loop and the store's writer, so a wedged
        loop or writer stops the pings and systemd restarts us."""
        interval_s = notify.watchdog_interval_s()
        while interval_s is None:
            await asyncio.Event().wait()  # no watchdog asked for; idle until cancelled
        while True:
            await self.store.ping()
            notify.send("WATCHDOG=1", f"STATUS={self.status_line()}")
            await asyncio.sleep(interval_s)  # a timer, not a poll: systemd wants a beat each one

    def status_line(self) -> str:
        """One line for `systemctl status`: degraded or not (and why), what is in flight where."""
        parts = [
            f"{name}: {self.router.in_flight(name)} in flight, {self.router.queued(name)} queued"
            if self.router.drives_backend(name)
            else f"{name}: led by {self._leader()}"
            for name in sorted(self.backends)
        ]
        problems = self.health.problems()
        head = "degraded (" + "; ".join(p.message for p in problems) + ")" if problems else "ready"
        return f"{head}; " + "; ".join(parts)

    def _leader(self) -> str:
        described = {} if self.cluster is None else self.cluster.describe()
        leader = described.get("leader")
        return "nobody yet" if not leader else str(leader["node"])

    async def _retention(self) -> None:
        """Delete terminal jobs older than `store.retention_days`, with their local files."""
        days = self.settings.store.retention_days
        if days <= 0:
            await asyncio.Event().wait()  # keep everything; idle until cancelled
        work_dir = self.settings.local_work_dir()
        while True:
            cutoff = time.time() - days * 86400
            while purged := await self.store.purge(cutoff):  # in slices: writes keep flowing
                await asyncio.to_thread(_remove_dirs, work_dir, purged)
                log.info("store.purged", jobs=len(purged), retention_days=days)
            # A timer, not a poll: jobs age past retention by time alone, which nothing signals.
            await asyncio.sleep(_RETENTION_INTERVAL_S)


def _check_descriptor_limit(settings: Settings) -> None:
    """Say at start-up when the descriptor limit cannot hold what the settings allow: at the
    limit, new connections are closed unanswered and job files cannot be read (jobs are not
    harmed, but nobody is served). Each connection and each running local job holds one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    local_jobs = settings.local.max_concurrency if settings.local.enabled else 0
    wanted = settings.server.max_connections + 2 * local_jobs + _SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "daemon.fd_limit_low",
            limit=soft,
            wanted=wanted,
            hint="raise LimitNOFILE= (systemd) or `ulimit -n`, or lower server.max_connections",
        )


def _remove_dirs(work_dir: Path, job_ids: list[str]) -> None:
    for job_id in job_ids:
        shutil.rmtree(work_dir / job_id, ignore_errors=True)
