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

It runs on its own event loop in a background thread; every control is thread-safe and has
taken effect when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
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

    def stall(self) -> None:
        """No byte passes in either direction from now on; connections stay open (and new
        ones are accepted, and stall too)."""
        self._call(lambda: self._flow().clear())

    def resume(self) -> None:
        """Bytes pass again, what was held first."""
        self._call(lambda: self._flow().set())

    def cut(self) -> int:
        """Close every connection now (both ends reset); new ones are accepted. How many."""
        return self._call(self._abort_all)

    def refuse(self) -> None:
        """Close each new connection as soon as it is accepted (until `accept`)."""
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    # -- the relay -------------------------------------------------------------------------

    def _flow(self) -> asyncio.Event:
        assert self._flowing is not None
        return self._flowing

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
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flowing = self._flow()
        try:
            while True:
                await flowing.wait()  # stalled: nothing is read, so nothing is acknowledged
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await flowing.wait()  # stalled while reading: hold the chunk
                if writer.transport.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()  # one side ended: so does the other (PostgreSQL's way)
