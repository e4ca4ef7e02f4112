"""The SQLite store's threads: one writer with group commit, one reader.

Every write is a small function (an `Operation`) run on the writer thread. The writer takes
whatever operations are waiting and commits them as one transaction (one fsync for many
submissions or transitions), each inside its own savepoint so one failing operation cannot undo
the others. A caller's future is resolved only after the commit, and the events of a batch are
published, in commit order, right after it. Reads run on a separate connection and thread, so a
long listing never delays a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from orchestrator import errors, events, models

log = structlog.get_logger("orchestrator.store")

T = TypeVar("T")
# An operation runs on the writer thread and returns its result plus the events it caused.
Operation = Callable[[sqlite3.Connection], tuple[T, list[models.Event]]]
_Item = tuple[Operation[Any], asyncio.Future[Any]]
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


class Writer:
    """The writer thread (started on an open connection) and the reader thread (which opens
    its own, read-only, on first use). `commit_failure` says why the last commit failed, until
    a commit that writes succeeds."""

    def __init__(self, path: Path, hub: events.Hub, max_batch: int) -> None:
        self._path = path
        self._hub = hub
        self._max_batch = max_batch
        self.commit_failure: str | None = None  # read and set on the event loop only
        self._failed_commits = 0  # consecutive failed commits (the writer thread's own count)
        self._ops: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-reader")
        self._read_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, conn: sqlite3.Connection) -> None:
        """Start writing on `conn` (the writer thread owns it from now on, and closes it), and
        open the reader's connection."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._write_loop, args=(conn,), name="store-writer", daemon=True
        )
        self._thread.start()
        await self.read(lambda _: None)  # open the reader connection on its thread

    async def stop(self) -> None:
        """Commit whatever is waiting, then stop both threads."""
        if self._thread is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._read_conn is not None:
            await self.read(lambda conn: conn.close())
            self._read_conn = None
        self._reader.shutdown(wait=True)

    async def write(self, op: Operation[T]) -> T:
        if self._thread is None or self._loop is None:
            raise errors.StoreError("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put((op, future))
        # Shielded: a cancelled caller must not hide the outcome of a write that will commit.
        return await asyncio.shield(future)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                if self._read_conn is None:
                    conn = sqlite3.connect(self._path, isolation_level=None)
                    conn.execute("PRAGMA query_only=ON")
                    self._read_conn = conn
                return fn(self._read_conn)
            except sqlite3.Error as exc:  # out of descriptors, memory, an I/O error
                raise errors.StoreError(f"read failed: {exc}") from exc

        assert self._loop is not None
        return await self._loop.run_in_executor(self._reader, run)

    # -- on the writer thread --------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            first = self._ops.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(conn, batch)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        outcomes: list[_Outcome] = []
        published: list[models.Event] = []
        changes_before = conn.total_changes
        commit_error: str | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result, op_events = op(conn)
                except Exception as exc:
                    # Raises in turn if SQLite rolled the whole transaction back (a full disk
                    # does that): then the batch fails below, as one.
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    if isinstance(exc, sqlite3.Error):  # the store's failure, not the caller's
                        failed = errors.StoreError(f"write failed: {exc}")
                        failed.__cause__ = exc
                        outcomes.append((future, None, failed))
                    else:
                        outcomes.append((future, None, exc))
                    continue
                conn.execute("RELEASE op")
                outcomes.append((future, result, None))
                published.extend(op_events)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Once per outage with the traceback, not once per retry: the journal the log
            # goes to may be on the very disk that is full.
            self._failed_commits += 1
            if self._failed_commits == 1:
                log.exception("store.commit_failed", operations=len(batch))
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            commit_error = str(exc)
            failure = errors.StoreError(f"commit failed: {exc}")
            outcomes = [(future, None, failure) for _, future in batch]
            published = []
        wrote = commit_error is None and conn.total_changes > changes_before
        if wrote and self._failed_commits:
            log.info("store.commit_recovered", failed_commits=self._failed_commits)
            self._failed_commits = 0
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, outcomes, published, commit_error, wrote)

    # -- back on the event loop ------------------------------------------------------------

    def _deliver(
        self,
        outcomes: list[_Outcome],
        published: list[models.Event],
        commit_error: str | None,
        wrote: bool,
    ) -> None:
        # Health first: whoever hears of a failure below already sees the store degraded.
        if commit_error is not None:
            self.commit_failure = commit_error
        elif wrote:  # a commit that wrote nothing (a ping) proves nothing about the disk
            self.commit_failure = None
        for event in published:
            self._hub.publish(event)
        for future, result, exc in outcomes:
            if future.done():  # the caller was cancelled; the write stands regardless
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
