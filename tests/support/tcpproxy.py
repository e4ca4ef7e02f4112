"""A TCP proxy in front of a unix socket (PostgreSQL's), for tests that break the network
between one daemon and its database: it listens on 127.0.0.1 and relays every connection to
the socket, byte for byte, until told otherwise::

    with TcpProxy(server.socket_dir / ".s.PGSQL.5432") as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/dbname"
        proxy.stall()   # no byte passes either way; the connections stay open
        proxy.resume()
        proxy.cut()     # every connection is closed now (reset); new ones are accepted
        proxy.refuse()  # new connections are closed at once …
        proxy.accept()  # … until this

What a client sends is looked at for BEGIN and COMMIT (the daemon's statements are short: each
comes in one chunk), to pick the moment: `stall(between_transactions=True)` when the server
holds no lock for a stalled client, `cut(sparing_commits=True)` when no COMMIT awaits its
answer; `hold_commit(marker)` stalls just before the COMMIT of the transaction whose statements
carried `marker` (its locks kept), `cut_at_commit(marker)` lets it commit and cuts the
connection before its client hears so.

It runs on its own event loop in a background thread; every control is thread-safe and has
taken effect when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")
_CHUNK = 64 * 1024


class _Link:
    """One relayed connection: the client's side and the server's."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.in_transaction = False  # the client sent BEGIN, and not yet COMMIT or ROLLBACK
        self.committing = False  # a COMMIT was relayed, and its answer not yet
        self.marked = False  # its transaction under way carries the `hold_commit` marker
        self.answer_cuts = False  # the server's next answer (to a COMMIT) is dropped, and cut

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class TcpProxy:
    """127.0.0.1:`port` relayed to the unix socket `target`; see the module's docstring."""

    def __init__(self, target: Path | str, *, timeout_s: float = 10.0) -> None:
        self.target = str(target)
        self._timeout_s = timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._done: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._links: set[_Link] = set()
        self._relays: set[asyncio.Task[Any]] = set()
        self._flowing: asyncio.Event | None = None
        self._refusing = False
        self._hold_marker: bytes | None = None
        self._hold_cuts = False  # `cut_at_commit` rather than `hold_commit`
        self._held = threading.Event()
        self._lock = threading.Lock()
        self._accepted = 0
        self._cuts = 0
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.name = "tcp-proxy"
        self._thread.start()
        if not self._ready.wait(self._timeout_s):
            raise TimeoutError(f"TCP proxy not ready within {self._timeout_s} s")
        if self._error is not None:
            raise RuntimeError("TCP proxy failed to start") from self._error
        return self

    def close(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._done is not None:
            with contextlib.suppress(RuntimeError):  # its loop ended already
                self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(self._timeout_s)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        try:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._done.wait()
        finally:
            self._server.close()
            self._abort_all()
            self._flowing.set()  # the pumps see their connections closed, and end
            await asyncio.gather(*self._relays, return_exceptions=True)
            await self._server.wait_closed()

    # -- observation -----------------------------------------------------------------------

    @property
    def accepted(self) -> int:
        """Connections accepted (and relayed, unless refused) so far."""
        with self._lock:
            return self._accepted

    @property
    def open_connections(self) -> int:
        return self._call(lambda: len(self._links))

    @property
    def cuts(self) -> int:
        """Connections closed by `cut`."""
        with self._lock:
            return self._cuts

    # -- controls --------------------------------------------------------------------------

    def stall(self, *, between_transactions: bool = False) -> None:
        """No byte passes in either direction from now on; connections stay open (and new
        ones are accepted, and stall too). `between_transactions`: at a moment when no client
        is inside a transaction (each BEGIN it sent followed by its COMMIT or ROLLBACK), so
        that the server holds no lock for a stalled client."""
        if not between_transactions:
            self._call(lambda: self._flow().clear())
            return
        deadline = time.monotonic() + self._timeout_s
        while not self._call(self._stall_if_quiet):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no moment without a transaction in {self._timeout_s} s")
            time.sleep(0.001)

    def resume(self) -> None:
        """Bytes pass again, what was held first."""
        self._call(lambda: self._flow().set())

    def cut(self, *, sparing_commits: bool = False) -> int:
        """Close every connection now (both ends reset); new ones are accepted. How many.
        `sparing_commits`: at a moment when no COMMIT awaits its answer, so that no client is
        left not knowing whether its transaction committed (one cut in the middle of a
        transaction is rolled back, and its client told so)."""
        if not sparing_commits:
            return self._call(self._abort_all)
        deadline = time.monotonic() + self._timeout_s
        while (cut := self._call(self._cut_if_no_commit)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no moment without a COMMIT in {self._timeout_s} s")
            time.sleep(0.001)
        return cut

    def hold_commit(self, marker: bytes) -> None:
        """Stall (as `stall`) just before relaying the COMMIT of the next transaction, on any
        connection, one of whose statements carried `marker` (a parameter's bytes): that
        transaction stays open on the server, holding its locks, until `resume`. Once only;
        `wait_held` waits for it."""
        self._held.clear()
        self._hold_marker, self._hold_cuts = marker, False

    def cut_at_commit(self, marker: bytes) -> None:
        """As `hold_commit`, but that COMMIT is relayed, and its connection cut as the
        server's answer comes back: the transaction committed, and its client never hears
        so. `wait_held` waits for the cut."""
        self._held.clear()
        self._hold_marker, self._hold_cuts = marker, True

    def wait_held(self, timeout_s: float) -> bool:
        """Whether a `hold_commit` held a COMMIT within `timeout_s`."""
        return self._held.wait(timeout_s)

    def refuse(self) -> None:
        """Close each new connection as soon as it is accepted (until `accept`)."""
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    # -- the relay -------------------------------------------------------------------------

    def _flow(self) -> asyncio.Event:
        assert self._flowing is not None
        return self._flowing

    def _cut_if_no_commit(self) -> int | None:
        if any(link.committing for link in self._links):
            return None
        return self._abort_all()

    def _stall_if_quiet(self) -> bool:
        if any(link.in_transaction for link in self._links):
            return False
        self._flow().clear()
        return True

    def _look(self, link: _Link, data: bytes) -> None:
        """What a client sends, for `stall(between_transactions=True)` and `hold_commit`
        (statements of the daemon's are short: BEGIN and COMMIT each come in one chunk)."""
        if b"BEGIN" in data:
            link.in_transaction, link.marked = True, False
        if self._hold_marker is not None and self._hold_marker in data:
            link.marked = True
        if link.marked and b"COMMIT" in data:
            self._hold_marker, link.marked = None, False
            if self._hold_cuts:
                link.answer_cuts = True
            else:  # held: the transaction stays open
                self._flow().clear()
                self._held.set()

    @staticmethod
    def _relayed(link: _Link, data: bytes, *, from_client: bool) -> None:
        """What a client sent reached the server (a transaction it ended is over), or what the
        server answered reached the client (a COMMIT's answer among it)."""
        if not from_client:
            link.committing = False
        elif b"COMMIT" in data or b"ROLLBACK" in data:
            link.in_transaction = False
            link.committing = b"COMMIT" in data

    def _abort_all(self) -> int:
        links, self._links = self._links, set()
        for link in links:
            link.abort()
        with self._lock:
            self._cuts += len(links)
        return len(links)

    def _call(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the proxy's loop (between two relayed chunks); its result."""
        assert self._loop is not None, "the TCP proxy is not started"

        async def run() -> T:
            return fn()

        return self._submit(run())

    def _submit(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout_s)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._accepted += 1
        if (task := asyncio.current_task()) is not None:
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()  # the server is not there: as if it refused
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, link, from_client=True),
                self._pump(up_reader, writer, link, from_client=False),
            )
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        from_client: bool,
    ) -> None:
        """Relay one direction of `link`: what its client sends, or what the server answers."""
        flowing = self._flow()
        try:
            while True:
                await flowing.wait()  # stalled: nothing is read, so nothing is acknowledged
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if from_client:
                    self._look(link, data)
                await flowing.wait()  # stalled while reading: hold the chunk
                if writer.transport.is_closing():
                    break
                if not from_client and link.answer_cuts:  # the COMMIT is answered: committed
                    link.abort()  # and its client never hears so
                    self._held.set()
                    break
                writer.write(data)
                self._relayed(link, data, from_client=from_client)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()  # one side ended: so does the other (PostgreSQL's way)
