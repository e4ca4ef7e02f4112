"""The unix socket listener: a safe socket file, peer credentials, limits, one handler per
connection.

Requests on one connection are handled concurrently (up to `max_requests_in_flight`), so a
client can pipeline thousands of submissions; each reply carries its request's id. Bad input
gets an error reply and the connection stays usable; a line over the limit is skipped whole.

About 520 lines: a connection's reading, backpressure, deadlines and hang-up detection share
its state and are read best together.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import stat
import struct
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path

import structlog

from orchestrator import access, errors, models, protocol, socketdir
from orchestrator.api import Api
from orchestrator.settings import ServerSettings

log = structlog.get_logger("orchestrator.server")

_PEERCRED = struct.Struct("3i")
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13; no constant in 3.11
_OUTPUT_HIGH_BYTES = 256 * 1024  # unread reply bytes per connection before it is held back
_HEAVY = frozenset({"list", "get"})  # ops whose one reply can be large
_HEAVY_PER_CONNECTION = 4
# How often a half-closed connection is checked for a full hang-up: polled (poll(2), POLLHUP),
# as a transport past EOF reads no more and asyncio tells nothing of the other half closing.
_HANGUP_CHECK_S = 0.25
_CLOSE_GRACE_S = 1.0  # to flush a closing connection's last lines before it is cut


def peer_of(sock: socket.socket) -> models.Peer:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return models.Peer(uid=uid, gid=gid, pid=pid, groups=_peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups (a user added with `usermod -aG` is in them)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
    except OSError:
        return frozenset()
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


def peer_allowed(
    peer: models.Peer, allowed_uids: Collection[int], allowed_gids: Collection[int]
) -> bool:
    """With no lists configured: the daemon's own uid and root. Otherwise either list admits,
    the gid list by the peer's primary or any supplementary group."""
    return access.admits(peer, allowed_uids, allowed_gids, os.getuid())


def bind_socket(path: Path) -> socket.socket:
    """Bind a listening socket at `path`, mode 0660, never wider even for an instant.

    The socket is bound under a private temporary name with a tight umask, chmod-ed, then
    renamed over `path`, which also replaces a stale socket from a crash atomically. A live
    daemon already answering at `path` is an error, not something to steal from. The directory
    is created 0700 if missing and must be safe (`socketdir`): one that someone else could
    write is refused, and nothing is bound there.
    """
    socketdir.ensure(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise errors.ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
        else:
            raise errors.ConfigError(f"another daemon is already listening on {path}")
        finally:
            probe.close()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(tmp))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(tmp, 0o660)
    sock.listen(1024)  # before it is visible: no client ever finds it refusing
    os.replace(tmp, path)
    sock.setblocking(False)
    return sock


async def _read_line(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """The next line (a last line without a newline counts); None at EOF. A line longer than
    `max_bytes` is read past and discarded, then reported as `LineTooLong`."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial or None
    except asyncio.LimitOverrunError as exc:
        consumed = exc.consumed
    while True:  # skip the rest of the oversized line without holding it in memory
        await reader.read(consumed)
        try:
            await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            break
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
            continue
        break
    raise errors.LineTooLong(max_bytes)


class Server:
    def __init__(self, settings: ServerSettings, api: Api) -> None:
        self._settings = settings
        self._api = api
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._unanswered = asyncio.Event()  # set when a connection gives a request a deadline
        self._per_peer: Counter[int] = Counter()
        self.rejections: Counter[str] = Counter()  # by error code, for metrics

    @property
    def path(self) -> Path:
        return self._settings.socket_path

    def prepare(self) -> None:
        """Create and check the socket's directory (`socketdir`) before the daemon opens its
        store or touches a job: a squatted directory stops it at once. `start` checks again."""
        socketdir.ensure(self.path.parent)

    async def start(self, inherited: socket.socket | None = None) -> None:
        """Listen on an inherited socket (systemd socket activation) or bind our own."""
        if inherited is not None:
            self._sock = inherited
        else:
            self._sock = bind_socket(self.path)
            self._inode = self.path.stat().st_ino
        self._server = await asyncio.start_unix_server(
            self._on_connection, sock=self._sock, limit=self._settings.max_line_bytes
        )

    async def serve(self) -> None:
        assert self._server is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._expire_requests(), name="request-deadlines")
            await self._server.serve_forever()

    async def _expire_requests(self) -> None:
        """Cancel unary requests past `request_timeout_s`: one task, not a timer per request
        (requests are many, timeouts rare), asleep until the earliest deadline (one timeout for
        all: a later request's is never earlier), or until `_unanswered` if there is none."""
        interval_s = max(0.05, min(1.0, self._settings.request_timeout_s / 4))
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            pending = [d for c in self._connections.values() if (d := c.expire(now)) is not None]
            if not pending:
                self._unanswered.clear()
                await self._unanswered.wait()
                continue
            # Sweeps at least `interval_s` apart: a deadline may fire that much late.
            await asyncio.sleep(max(interval_s, min(pending) - now))

    async def close(self, grace_s: float, force: asyncio.Event | None = None) -> None:
        """Stop accepting, give open connections `grace_s` to finish (less if `force` is set
        meanwhile), then cut them."""
        if self._server is None:
            return
        # 1. No new connections; remove our socket file (not a successor's).
        self._server.close()
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()
        # 2. Connections stop reading; streams (watch, wait, logs -f) end with a
        #    `shutting_down` error; requests already read get their replies within the grace.
        for connection in self._connections.values():
            connection.stop()
        if self._connections:
            forced = asyncio.create_task((force or asyncio.Event()).wait(), name="force-wait")
            try:
                deadline = asyncio.get_running_loop().time() + grace_s
                while self._connections and not forced.done():
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    await asyncio.wait(
                        [*self._connections, forced],
                        timeout=remaining,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
            finally:
                forced.cancel()
            pending = set(self._connections)
            # 3. What is left (watchers, followers, slow readers) is cancelled.
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._server = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = peer_of(writer.get_extra_info("socket"))
        try:
            refusal = self._refusal(peer)
            if refusal is not None:
                self.rejections[refusal.code] += 1
                log.warning(
                    "socket.rejected", peer_uid=peer.uid, peer_pid=peer.pid, reason=refusal.code
                )
                writer.write(protocol.error(None, refusal.code, refusal.message))
                await writer.drain()
                return
            connection = _Connection(
                self._settings, self._api, peer, reader, writer, self._unanswered.set
            )
            self._connections[task] = connection
            self._per_peer[peer.uid] += 1
            try:
                await connection.run()
            finally:
                del self._connections[task]
                self._per_peer[peer.uid] -= 1
        except ConnectionError:
            pass  # the client went away; nothing of ours is lost
        finally:
            await _close(writer)

    def _refusal(self, peer: models.Peer) -> errors.OrchestratorError | None:
        s = self._settings
        if not peer_allowed(peer, s.allowed_uids, s.allowed_gids):
            return errors.Forbidden(f"uid {peer.uid} is not allowed to use this socket")
        if not self._api.accepting:
            return errors.ShuttingDown()
        if len(self._connections) >= s.max_connections:
            return errors.Overloaded(f"too many connections (max {s.max_connections})")
        if self._per_peer[peer.uid] >= s.max_connections_per_peer:
            return errors.Overloaded(
                f"too many connections from uid {peer.uid} (max {s.max_connections_per_peer})"
            )
        return None


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after flushing what the client has not read yet, if it reads it within
    `_CLOSE_GRACE_S`; a client that never reads does not hold the socket open past that."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_GRACE_S):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except ConnectionError:
        pass


class _Connection:
    """One client: its requests run concurrently, its replies share one bounded output.

    Output is bounded: a line is written only while the client has less than
    `_OUTPUT_HIGH_BYTES` unread, and no new request is read while it has more, so a client
    that does not read slows itself down and, after `idle_timeout_s` without reading, is
    dropped. Every request gets exactly one final reply; a client that hangs up takes every
    request of its connection with it.
    """

    def __init__(
        self,
        settings: ServerSettings,
        api: Api,
        peer: models.Peer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_deadline: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._api = api
        self._peer = peer
        self._on_deadline = on_deadline  # wakes the server's deadline task
        self._reader = reader
        self._writer = writer
        writer.transport.set_write_buffer_limits(high=_OUTPUT_HIGH_BYTES)
        self._requests: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()  # set while fewer than max_requests_in_flight are open
        self._room.set()
        self._heavy = asyncio.Semaphore(_HEAVY_PER_CONNECTION)
        self._deadlines: dict[asyncio.Task[None], float] = {}  # unanswered unary requests
        self._expired: set[asyncio.Task[None]] = set()
        self._streams: set[asyncio.Task[None]] = set()
        self._reading: asyncio.Task[None] | None = None
        self._stopping = False
        self._poll: select.poll | None = None  # for hang-ups, made on first use
        self.dropped = False  # cut for not reading its replies

    async def send(self, line: bytes) -> None:
        """Write one line once the client has room for it (see the class docstring)."""
        if self._writer.transport.get_write_buffer_size() > _OUTPUT_HIGH_BYTES:
            await self._wait_for_room()
        self._write(line)

    def _write(self, line: bytes) -> None:
        """Write now; a connection already closing (dropped, or lost to an error) takes the
        request down as a client gone away would, never as an error of the daemon's (uvloop
        raises RuntimeError on a write to a closed transport)."""
        if self.dropped or self._writer.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self._writer.write(line)

    async def _wait_for_room(self) -> None:
        """Wait until the client has read enough of its replies; drop it if it reads nothing
        for `idle_timeout_s`."""
        try:
            async with asyncio.timeout(self._settings.idle_timeout_s):
                await self._writer.drain()
        except TimeoutError:
            self._drop()
            raise ConnectionResetError("the client stopped reading its replies") from None

    def _drop(self) -> None:
        if self.dropped:
            return
        s = self._settings
        log.warning("socket.slow_reader", peer_uid=self._peer.uid, peer_pid=self._peer.pid)
        # Last in line behind what it has not read: it sees this only if it reads after all.
        with contextlib.suppress(ConnectionError):
            self._write(
                protocol.error(
                    None,
                    "slow_reader",
                    f"the client read none of its replies for {s.idle_timeout_s}s; disconnected",
                )
            )
        self.dropped = True
        for task in (self._reading, *self._requests):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    def stop(self) -> None:
        """The daemon is shutting down: read no more, end the streams, finish the rest."""
        self._stopping = True
        if self._reading is not None:
            self._reading.cancel()
        for task in self._streams:
            task.cancel()

    async def run(self) -> None:
        self._reading = asyncio.create_task(self._read_requests(), name="connection-read")
        try:
            try:
                await self._reading
            except asyncio.CancelledError:
                if not (self._stopping or self.dropped):
                    raise
            if self._stopping:  # answer what was already asked, within the server's grace
                await asyncio.gather(*self._requests, return_exceptions=True)
            elif not self.dropped:
                await self._finish_unless_hung_up()
        finally:
            for task in self._requests:
                task.cancel()

    async def _finish_unless_hung_up(self) -> None:
        """The client closed its sending side. If it only half-closed, it still reads: answer
        what it asked. Once it has hung up entirely nobody reads, so every request and stream
        of this connection ends now and its slot is freed, whatever the jobs do."""
        while self._requests:
            await asyncio.wait(set(self._requests), timeout=_HANGUP_CHECK_S)
            if self._hung_up():
                return  # `run` cancels what is left

    def _hung_up(self) -> bool:
        """Whether the client has closed its connection entirely (not only its sending side)."""
        # A transport that met an error has closed the socket (its descriptor may be another
        # connection's by now): ask it first, and poll only a socket it still holds.
        if self._writer.transport.is_closing():
            return True
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._writer.get_extra_info("socket").fileno(), select.POLLIN)
        hung_up = select.POLLHUP | select.POLLERR | select.POLLNVAL
        return any(events & hung_up for _, events in self._poll.poll(0))

    async def _read_requests(self) -> None:
        s = self._settings
        while True:
            if self._writer.transport.get_write_buffer_size() > _OUTPUT_HIGH_BYTES:
                await self._wait_for_room()  # it is not reading: read no more from it either
            try:
                async with asyncio.timeout(s.idle_timeout_s):
                    line = await _read_line(self._reader, s.max_line_bytes)
            except TimeoutError:
                if self._requests:
                    continue  # quiet, but still answering (a watch, a wait): not idle
                await self.send(
                    protocol.error(None, "idle_timeout", f"no request for {s.idle_timeout_s}s")
                )
                return
            except errors.LineTooLong as exc:
                await self.send(protocol.error(None, exc.code, exc.message))
                continue
            if line is None:
                return
            if not line.strip():
                continue
            try:
                request = protocol.decode(line)
            except errors.BadRequest as exc:
                await self.send(protocol.error(exc.request_id, exc.error.code, exc.error.message))
                continue
            while len(self._requests) >= s.max_requests_in_flight:
                # Read no more until a request is answered, unless the client hangs up.
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_HANGUP_CHECK_S):
                        await self._room.wait()
                if self._hung_up():
                    return
            if request.op in protocol.STREAMING:
                task = asyncio.create_task(self._stream(request), name=f"request-{request.op}")
                self._streams.add(task)
                task.add_done_callback(self._streams.discard)
            else:
                task = asyncio.create_task(self._answer(request), name=f"request-{request.op}")
                self._deadlines[task] = asyncio.get_running_loop().time() + s.request_timeout_s
                self._on_deadline()
            self._requests.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        self._deadlines.pop(task, None)
        self._expired.discard(task)
        self._room.set()

    def expire(self, now: float) -> float | None:
        """Cancel the unanswered unary requests whose deadline has passed (they answer
        `timeout`); return the earliest one ahead. A request leaves `_deadlines` the moment its
        reply exists, so a reply waiting for a slow client is never followed by a second one."""
        earliest: float | None = None
        for task, deadline in self._deadlines.items():
            if task in self._expired:
                continue
            if deadline <= now:
                self._expired.add(task)
                task.cancel()
            elif earliest is None or deadline < earliest:
                earliest = deadline
        return earliest

    async def _answer(self, request: protocol.Request) -> None:
        task = asyncio.current_task()
        assert task is not None
        # Few big replies (pages of jobs) are built at a time on one connection.
        limit = self._heavy if request.op in _HEAVY else contextlib.nullcontext()
        try:
            async with limit:
                try:
                    line = await self._api.answer(request, self._peer)
                except Exception:
                    log.exception("request.failed", op=request.op, peer_pid=self._peer.pid)
                    line = protocol.error(request.id, "internal", "internal error; see the log")
                del self._deadlines[task]  # answered: from here on no deadline can touch it
                await self.send(line)
        except asyncio.CancelledError:
            if task not in self._expired or self._stopping:
                raise
            task.uncancel()
            with contextlib.suppress(ConnectionError):
                await self.send(
                    protocol.error(
                        request.id,
                        "timeout",
                        f"{request.op} took longer than {self._settings.request_timeout_s}s",
                    )
                )
        except ConnectionError:
            pass  # the client went away

    async def _stream(self, request: protocol.Request) -> None:
        try:
            await self._api.stream(request, self._peer, self.send)
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            if self._stopping and not self.dropped:
                with contextlib.suppress(ConnectionError):
                    self._write(
                        protocol.error(request.id, "shutting_down", "the daemon is shutting down")
                    )
            raise
        except Exception:
            log.exception("request.failed", op=request.op, peer_pid=self._peer.pid)
            with contextlib.suppress(ConnectionError):
                await self.send(
                    protocol.error(request.id, "internal", "internal error; see the daemon's log")
                )
