"""Every daemon's committed changes to this daemon's hub, in commit order (issue #16).

Event numbers (`events.seq`) are handed out under a transaction-scoped advisory lock, so they
follow commit order across the daemons sharing a database. This daemon's own commits are
published at once when their first number follows the last one published, else after reading
what came between (another daemon's, or a rolled-back number). The others' come through
`follow`: a LISTEN on the channel the `events` table's trigger NOTIFYs at each commit, and a read
of everything after the last number published — again after every reconnection, since a
notification is not durable. `Hub.publish(own=)` says whose each change was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog
from asyncpg import Record

from orchestrator import backoff, errors, events, models
from orchestrator.store.pg_schema import EVENTS_CHANNEL

log = structlog.get_logger("orchestrator.store")

STOPS_CHANNEL = "orchestrator_stops"  # NOTIFY <job id>: a stop was recorded for a running job
_FEED_PAGE = 1000
_FEED_CHECK_S = 5.0  # the feed's connection is checked this often when nothing arrives
EventsSince = Callable[[int, int], Awaitable[list[models.Event]]]


class Feed:
    def __init__(self, hub: events.Hub, events_since: EventsSince) -> None:
        self._hub = hub
        self._events_since = events_since  # (after this number, at most so many)
        self.published = 0  # the last event number handed to the hub
        self._mine: set[int] = set()  # this daemon's events' numbers, not handed on yet
        self._publish_lock = asyncio.Lock()
        self._feeding = False  # `follow` runs: it hands on what a failed catch-up could not
        self._feed_wake = asyncio.Event()

    def mine(self, changes: Sequence[models.Event]) -> None:
        """These events (numbered, about to be committed) are this daemon's."""
        self._mine.update(event.seq for event in changes)

    async def publish_mine(self, changes: Sequence[models.Event]) -> None:
        """Hand this daemon's committed events to the hub, after any other daemon's numbered
        before them (read first: the hub's order is the commit order, which `watch` resumes
        by). With nobody else writing, the numbers follow on and nothing is read."""
        async with self._publish_lock:
            if changes[0].seq > self.published + 1:
                try:
                    await self._catch_up()
                except errors.StoreError:
                    if self._feeding:  # the feed hands them on, in order, once it can read
                        self._feed_wake.set()
                        return
            for event in changes:
                if event.seq > self.published:
                    self._publish(event)

    def _publish(self, event: models.Event) -> None:
        own = event.seq in self._mine
        self._mine.discard(event.seq)
        self.published = event.seq
        self._hub.publish(event, own=own)

    async def _catch_up(self) -> None:
        """Publish every event committed after the last one published (the publish lock
        held)."""
        while True:
            found = await self._events_since(self.published, _FEED_PAGE)
            for event in found:
                self._publish(event)
            if len(found) < _FEED_PAGE:
                return

    async def follow(
        self, url: str, on_stop: Callable[[str], None], on_connected: Callable[[], None]
    ) -> None:
        """The feed (several daemons on one database): LISTEN for the events others commit and
        publish them in order (`_catch_up`), and pass on the stops others record for running
        jobs (`on_stop(job id)`). A notification is not durable: after every (re)connection
        the feed reads what it missed, and `on_connected` has the caller look again at what
        it drives. Runs until cancelled, reconnecting with back-off."""
        self._feeding = True
        delays = backoff.Policy(base_s=0.2, factor=2.0, cap_s=5.0, jitter="full")
        rng, failures = backoff.default_rng(), 0
        try:
            while True:
                conn: asyncpg.Connection[Record] | None = None
                try:
                    conn = await asyncpg.connect(url, timeout=10)
                    await conn.add_listener(EVENTS_CHANNEL, lambda *_: self._feed_wake.set())
                    conn.add_termination_listener(lambda _c: self._feed_wake.set())
                    await conn.add_listener(
                        STOPS_CHANNEL, lambda _c, _p, _ch, payload: on_stop(str(payload))
                    )
                    if failures:
                        log.info("store.feed_reconnected", after_failures=failures)
                    failures = 0
                    on_connected()
                    self._feed_wake.set()
                    while True:
                        try:
                            async with asyncio.timeout(_FEED_CHECK_S):
                                await self._feed_wake.wait()
                        except TimeoutError:  # quiet: is the connection still there?
                            await conn.fetchval("SELECT 1", timeout=_FEED_CHECK_S)
                            continue
                        self._feed_wake.clear()
                        if conn.is_closed():
                            raise ConnectionResetError("the feed's connection was closed")
                        async with self._publish_lock:
                            await self._catch_up()
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    errors.StoreError,
                ) as exc:
                    failures += 1
                    if failures == 1:
                        log.warning("store.feed_lost", error=str(exc) or type(exc).__name__)
                finally:
                    if conn is not None:
                        conn.terminate()
                await asyncio.sleep(delays.delay(failures, rng))
        finally:
            self._feeding = False
