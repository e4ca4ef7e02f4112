"""Several daemons on one PostgreSQL (issue #16): this daemon's part.

- **Presence.** Every daemon says it is here (`nodes.seen_at`, on the database's clock) at every
  renewal; the local jobs of a node that stopped saying so are marked "owner h2 unreachable
  since …" and LOST after `local.orphan_timeout_s` (`Store.sweep_orphans`, by every daemon: the
  writes lock the job's row and are the same whoever makes them).
- **The lease.** Daemons with an AWS backend stand for the one lease: a row whose expiry is on
  the database's clock, taken only once lapsed, with a fencing token one higher at every
  acquisition. The holder renews it every third of `cluster.lease_ttl_s`, and every write it
  makes to an AWS job checks, in its own transaction, that its token is still the current one
  (`PostgresStore._fence`). While it holds the lease it runs the AWS backends' drivers, made
  anew at each election and recovering every unfinished AWS job as a restart does; once the
  lease is lost (a renewal refused, a write fenced, or no renewal for longer than the TTL on
  its own clock) the drivers are cancelled and it follows again.
- **The feed.** `PostgresStore.follow` publishes every daemon's events in order; a stop
  recorded elsewhere, or a job committed elsewhere, reaches the drivers here (`Router.take`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from orchestrator import __version__, errors, events, models
from orchestrator.drivers import Drivers, Router
from orchestrator.metrics import Metrics
from orchestrator.store import pg_lease
from orchestrator.store.postgres import LOCAL, Lease, PostgresStore

log = structlog.get_logger("orchestrator.cluster")

_FOLLOWER_LOOK_S = 1.0  # a follower looks at the lease this often (takes over within it)
_MARGIN = 0.2  # of the TTL: the leader stops launching this long before its lease may lapse
_NEWS_PAGE = 1000  # jobs read at once for the news of other daemons
_HOST = socket.gethostname()


class Cluster:
    def __init__(
        self,
        store: PostgresStore,
        hub: events.Hub,
        router: Router,
        *,
        node: str,
        lease_ttl_s: float,
        orphan_timeout_s: float,
        make_drivers: Callable[[], Drivers] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self._store = store
        self._router = router
        self._ttl = lease_ttl_s
        self._orphan_timeout = orphan_timeout_s
        self._make = make_drivers  # None: no AWS backend here, so not a candidate
        self._clock = clock
        self.lease: Lease | None = None  # as last read or written
        self._token: int | None = None  # the lease's fencing token while this daemon holds it
        self._valid_until = 0.0  # our clock: the lease cannot have lapsed before this
        self._lead_task: asyncio.Task[None] | None = None
        self._seen: float | None = None  # when this node last said it was here (our clock)
        self._news: set[str] = set()  # jobs another daemon accepted or asked to stop
        self._reading_news = False
        self._tg: asyncio.TaskGroup | None = None
        store.on_fenced = self._fenced
        hub.listen(self._on_event, "others")

    # -- what others ask -------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self._token is not None

    def may_launch(self) -> bool:
        """Whether this daemon's lease is surely still its own for a while (its own clock,
        counted from before the last renewal was sent): a leader that was paused launches
        nothing after the lease may have passed on."""
        return self.leading and self._surely_ours()

    def describe(self) -> dict[str, Any]:
        """`ping`'s `cluster`: this node, and who leads since when (as last seen)."""
        lease = self.lease
        leader = None
        if lease is not None and lease.current:
            leader = {
                "node": lease.holder,
                "since": models.iso(lease.acquired_at),
                "token": lease.token,
                "expires_in_s": round(lease.expires_at - lease.now, 3),
            }
        return {
            "node": self.node,
            "candidate": self._make is not None,
            "leading": self.leading,
            "leader": leader,
        }

    def export(self, metrics: Metrics) -> None:
        """Who leads, for `/metrics`."""
        metrics.leading.set(1 if self.leading else 0)
        metrics.leader.clear()
        lease = self.lease
        if lease is not None and lease.current:
            metrics.leader.labels(lease.holder).set(1)
            metrics.leader_since.set(lease.acquired_at)
            metrics.lease_token.set(lease.token)

    # -- the loop --------------------------------------------------------------------------

    async def announce(self) -> None:
        """Say this node is here before it recovers its jobs (another daemon's sweep must not
        take a returning node's jobs for orphans meanwhile) — unless another live daemon goes
        by the same name (`NodeInUse`: two daemons would drive the same local jobs)."""
        try:
            seen = await self._store.presence()
        except errors.StoreError:
            return  # said once the database is back (the lease loop)
        if seen is not None and seen.seen_s_ago < 2 * self._ttl and not _ours(seen):
            raise errors.NodeInUse(
                f"cluster.node {self.node!r} is taken: a daemon of that name on host "
                f"{seen.host} (pid {seen.pid}) said it was here {seen.seen_s_ago:.1f} s ago; "
                "give each daemon a name of its own (ORCHESTRATOR__CLUSTER__NODE)"
            )
        with contextlib.suppress(errors.StoreError):
            await self._heartbeat()

    async def back_again(self, jobs: list[models.Job]) -> None:
        """This node's local jobs that others took for orphans while it was away (stopped, or
        cut off from the database): it is back, and says so."""
        for job in jobs:
            if job.owner == self.node and job.info.get("owner_unreachable_since"):
                with contextlib.suppress(errors.StoreError):
                    await self._store.observe(
                        job.id,
                        vendor_status=job.vendor_status,
                        reason=f"owner {self.node} is back",
                        info={"owner_unreachable_since": None},
                    )

    async def _heartbeat(self) -> None:
        """Say this node is here; back after long enough for others to have taken its jobs for
        orphans (twice the TTL), look at them again."""
        await self._store.heartbeat(_HOST, os.getpid(), __version__)
        now, seen, self._seen = self._clock(), self._seen, self._clock()
        if seen is not None and now - seen >= 2 * self._ttl:
            log.info("cluster.back", node=self.node, away_s=round(now - seen, 3))
            if self._tg is not None:
                self._tg.create_task(self._back_again_now(), name="back-again")

    async def _back_again_now(self) -> None:
        with contextlib.suppress(errors.StoreError):
            await self.back_again(await self._store.unfinished())

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._store.follow(self._on_stop, self._look_again), name="feed")
            tg.create_task(self._sweep(), name="orphans")
            try:
                await self._lease_loop()
            finally:
                await self._step_down("stopping", release=True)

    async def _lease_loop(self) -> None:
        # Each call is given a third of the TTL: a database that stalls (a cut link) must not
        # keep a leader from noticing that its lease may have lapsed.
        bound_s = self._ttl / 3
        while True:
            with contextlib.suppress(errors.StoreError, TimeoutError):  # the store says so
                async with asyncio.timeout(bound_s):
                    await self._heartbeat()
            if self._make is None:
                with contextlib.suppress(errors.StoreError, TimeoutError):
                    async with asyncio.timeout(bound_s):
                        self.lease = await self._store.lease()
            else:
                failed = None
                try:
                    async with asyncio.timeout(bound_s):
                        await self._look_at_lease()
                except (errors.StoreError, TimeoutError) as exc:
                    failed = str(exc) or "no answer in time"
                if self.leading and not self._surely_ours():
                    await self._step_down(f"the lease could not be renewed: {failed}")
            await asyncio.sleep(bound_s if self.leading else _FOLLOWER_LOOK_S)

    def _surely_ours(self) -> bool:
        return self._clock() < self._valid_until - _MARGIN * self._ttl

    async def _look_at_lease(self) -> None:
        sent = self._clock()  # before the call: the lease runs from no earlier than this
        if self._token is not None:
            renewed = await self._store.renew_lease(self._token, self._ttl)
            if renewed is None:
                await self._step_down("the lease was lost (it lapsed, or another took it)")
                self.lease = await self._store.lease()
            else:
                self.lease, self._valid_until = renewed, sent + self._ttl
            return
        seen = await self._store.lease()
        self.lease = seen
        if seen is not None and seen.current:
            return
        sent = self._clock()
        taken = await self._store.acquire_lease(self._ttl)
        if taken is not None:
            self._elect(taken, sent, previous=None if seen is None else seen.holder)
            self.lease = taken

    def _elect(self, lease: Lease, sent: float, *, previous: str | None) -> None:
        assert self._make is not None
        assert self._tg is not None
        self._token = self._store.lease_token = lease.token
        self._valid_until = sent + self._ttl
        log.info(
            "cluster.elected",
            node=self.node,
            token=lease.token,
            since=models.iso(lease.acquired_at),
            lease_ttl_s=self._ttl,
            previous=previous,
        )
        drivers = self._make()
        self._router.attach(drivers)
        self._lead_task = self._tg.create_task(self._lead(drivers), name="lead")

    async def _lead(self, drivers: Drivers) -> None:
        try:
            jobs = await self._store.unfinished()
            recovered = await drivers.recover(jobs)
            log.info("cluster.recovered", node=self.node, jobs=recovered)
            await drivers.run()
        except errors.StoreError as exc:
            # Cannot read what to drive (the database went away): give the lease up; whoever
            # takes it next, this daemon included, recovers from the start.
            log.warning("cluster.lead_failed", node=self.node, error=exc.message)
            asyncio.get_running_loop().call_soon(self._fenced, f"cannot lead: {exc.message}")
        finally:
            self._router.detach(drivers)
            drivers.close()

    def _fenced(self, why: str) -> None:
        """A write of ours was refused by the lease's fencing: we do not lead any more."""
        if self.leading and self._tg is not None:
            self._tg.create_task(self._step_down(why), name="step-down")

    async def _step_down(self, why: str, *, release: bool = False) -> None:
        token, self._token = self._token, None
        self._store.lease_token = None
        task, self._lead_task = self._lead_task, None
        if token is None:
            return
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        log.warning("cluster.deposed", node=self.node, token=token, why=why)
        if release:  # a clean stop: the next leader need not wait for the TTL
            with contextlib.suppress(errors.StoreError):
                await self._store.release_lease(token)

    # -- changes made elsewhere ------------------------------------------------------------

    def _on_event(self, event: models.Event) -> None:
        # A job another daemon accepted: the drivers of its backend here (if any) take it. A
        # local job is its accepting daemon's: never another's to take.
        if (
            event.from_state is None
            and event.backend != LOCAL
            and self._router.drives_backend(event.backend)
        ):
            self._later(event.job_id)

    def _on_stop(self, job_id: str) -> None:
        self._later(job_id)

    def _later(self, job_id: str) -> None:
        """Look at this job soon: news of many jobs (a bulk submit elsewhere) is read in few
        queries, by one task."""
        self._news.add(job_id)
        if self._tg is not None and not self._reading_news:
            self._reading_news = True
            self._tg.create_task(self._read_news(), name="news")

    async def _read_news(self) -> None:
        try:
            while self._news:
                await asyncio.sleep(0)  # the rest of a burst of notifications first
                waiting = sorted(self._news)
                ids, self._news = waiting[:_NEWS_PAGE], set(waiting[_NEWS_PAGE:])
                try:
                    found = await self._store.get_many(ids)
                except errors.StoreError:
                    return  # the feed's next connection looks at everything again
                for job in found:
                    self._router.take(job)
        finally:
            self._reading_news = False

    def _look_again(self) -> None:
        """The feed (re)connected: notifications may have been missed while it was down."""
        if self._tg is not None:
            self._tg.create_task(self._take_all(), name="take-all")

    async def _take_all(self) -> None:
        with contextlib.suppress(errors.StoreError):
            for job in await self._store.unfinished():
                self._router.take(job)

    async def _sweep(self) -> None:
        """Local jobs whose daemon went away: say so, then LOST after the orphan timeout."""
        while True:
            await asyncio.sleep(self._ttl)
            try:
                changed = await self._store.sweep_orphans(self._ttl * 2, self._orphan_timeout)
            except errors.StoreError:
                continue
            for job in changed:
                log.warning(
                    "job.owner_unreachable",
                    job_id=job.id,
                    owner=job.owner,
                    state=job.state.value,
                    reason=job.reason,
                )


def _ours(seen: pg_lease.Presence) -> bool:
    """Whether a node's fresh row is this daemon's or its dead predecessor's on this host (a
    restart after a crash), rather than another live daemon's of the same name."""
    if seen.host != _HOST or seen.pid is None:
        return False
    if seen.pid == os.getpid():
        return True
    try:
        cmdline = Path(f"/proc/{seen.pid}/cmdline").read_bytes()
    except OSError:
        return True  # no such process here: the one that wrote it is gone
    return b"orchestrator" not in cmdline  # its pid taken since by something else


def owns_local(node: str) -> Callable[[models.Job], bool]:
    """The local drivers' share on a shared database: the local jobs this node accepted."""

    def owns(job: models.Job) -> bool:
        return job.owner in (None, node)  # only local jobs have an owner

    return owns
