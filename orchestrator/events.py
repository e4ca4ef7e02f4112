"""In-process fan-out of committed state changes.

Listeners are plain callbacks run in the event loop right after a commit (the log line, the
dispatcher's slot accounting, metrics); they must not block. On a PostgreSQL shared by several
daemons, the changes other daemons commit are published here too, in the same order (the
store's feed), marked as not this daemon's own. Watchers get a bounded queue each: a
watcher that falls behind is dropped with a reason, never allowed to slow the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Literal

import structlog

from orchestrator import errors, models

log = structlog.get_logger("orchestrator.events")

Listener = Callable[[models.Event], None]
Whose = Literal["all", "own", "others"]


class Subscription:
    """A bounded stream of events, optionally for one job, or for the jobs of one submitter
    (`peer_uid`: jobs with no recorded submitter are nobody's). Use as an async context
    manager."""

    def __init__(
        self, hub: Hub, job_id: str | None, maxsize: int, peer_uid: int | None = None
    ) -> None:
        self._hub = hub
        self.job_id = job_id
        self.peer_uid = peer_uid
        self._queue: asyncio.Queue[models.Event] = asyncio.Queue(maxsize)
        self.dropped = False

    def wants(self, event: models.Event) -> bool:
        return self.peer_uid is None or event.peer_uid == self.peer_uid

    def _offer(self, event: models.Event) -> bool:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            return False
        return True

    async def get(self) -> models.Event:
        if self.dropped and self._queue.empty():
            raise errors.WatcherTooSlow
        return await self._queue.get()

    def get_nowait(self) -> models.Event | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if self.dropped:
                raise errors.WatcherTooSlow from None
            return None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hub.unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[models.Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[models.Event]:
        while True:
            yield await self.get()


class Hub:
    def __init__(self, watcher_queue_size: int = 10_000) -> None:
        self._listeners: list[tuple[Listener, Whose]] = []
        self._all: set[Subscription] = set()
        self._by_job: dict[str, set[Subscription]] = {}
        self._queue_size = watcher_queue_size
        # The number of the last event committed (`Event.seq`): a new watcher's starting point.
        self.last_seq = 0

    def listen(self, listener: Listener, whose: Whose = "all") -> None:
        """Call `listener` with every change; or only with those this daemon committed
        ("own": its log lines and counters, as other daemons on a shared PostgreSQL log and
        count theirs), or only with those of the others ("others")."""
        self._listeners.append((listener, whose))

    def unlisten(self, listener: Listener) -> None:
        self._listeners = [(known, own) for known, own in self._listeners if known != listener]

    def subscribe(self, job_id: str | None = None, *, peer_uid: int | None = None) -> Subscription:
        """Events of one job (or all), only of the jobs `peer_uid` submitted if given."""
        sub = Subscription(self, job_id, self._queue_size, peer_uid)
        if job_id is None:
            self._all.add(sub)
        else:
            self._by_job.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.job_id is None:
            self._all.discard(sub)
            return
        subs = self._by_job.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_job[sub.job_id]

    def committed_up_to(self, seq: int) -> None:
        """The store holds events up to `seq` (it says so when it opens)."""
        self.last_seq = max(self.last_seq, seq)

    def publish(self, event: models.Event, *, own: bool = True) -> None:
        """Hand on a committed change: `own` when this daemon committed it, else another
        daemon sharing the store did (PostgreSQL: `store.postgres`' feed)."""
        self.last_seq = max(self.last_seq, event.seq)
        for listener, whose in self._listeners:
            if whose != "all" and (whose == "own") != own:
                continue
            try:
                listener(event)
            except Exception:
                log.exception("events.listener_failed", job_id=event.job_id)
        for sub in (*self._all, *self._by_job.get(event.job_id, ())):
            if sub.wants(event) and not sub._offer(event):
                log.warning("events.watcher_dropped", job_id=sub.job_id, reason="queue full")
                self.unsubscribe(sub)
