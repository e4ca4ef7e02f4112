"""The socket protocol's client, async and sync.

The CLI uses it; import it to submit from your own Python code:

    from orchestrator.client import SyncClient
    with SyncClient() as client:
        job = client.submit({"command": ["echo", "hi"]})
        print(client.wait(job["id"])["state"])
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import os
import socket
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from orchestrator import errors, protocol, settings, socketdir, views

T = TypeVar("T")
_Route = asyncio.Queue[dict[str, Any] | BaseException]

# How long `wait`, `watch` and `logs` try to reach a daemon that went away (stopped, restarted,
# upgraded) before they give up, by default; 0: not at all.
RECONNECT_S = 120.0


def _resumable(exc: BaseException) -> bool:
    """A connection lost to the daemon going away, which a new one can take up where it was;
    or a daemon whose PostgreSQL is away (`store_unavailable`: it reconnects by itself)."""
    if isinstance(exc, errors.DaemonUnreachable):
        return True
    return isinstance(exc, errors.RemoteError) and exc.remote_code in (
        "shutting_down",
        "store_unavailable",
    )


class _Reconnect:
    """When to try again after losing the daemon: after 0.1 s, doubling to 2 s, for at most
    `within_s` from the first loss (counted afresh once a reply comes through again)."""

    def __init__(self, within_s: float) -> None:
        self.within_s = within_s
        self._since: float | None = None
        self._delay_s = 0.1

    def ok(self) -> None:
        self._since, self._delay_s = None, 0.1

    @property
    def lost(self) -> bool:
        """Whether the daemon is being waited for now."""
        return self._since is not None

    def delay(self, exc: BaseException) -> float | None:
        """How long to wait before trying again, or None: give up (raise `exc`)."""
        if self.within_s <= 0 or not _resumable(exc):
            return None
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since >= self.within_s:
            return None
        delay_s, self._delay_s = self._delay_s, min(2.0, self._delay_s * 2)
        return min(delay_s, self._since + self.within_s - now)


def default_socket_path() -> Path:
    """The socket a client talks to: ORCHESTRATOR__SERVER__SOCKET_PATH, else the default."""
    configured = os.environ.get(f"{settings.ENV_PREFIX}SERVER__SOCKET_PATH")
    if configured:
        return Path(configured)
    return settings.default_socket_path()


def _uses_per_user_default(socket_path: Path | str | None) -> bool:
    return not socket_path and not os.environ.get(f"{settings.ENV_PREFIX}SERVER__SOCKET_PATH")


def _check_default_directory(socket_path: Path) -> None:
    """The per-user default lives in a directory anyone may have made first (`/tmp/orchestrator-
    <uid>`): before connecting, and so before sending anything, it must be safe (`socketdir`:
    ours or root's, writable by no one else, not a symlink). A path given explicitly (`--socket`,
    the environment) is the caller's choice and is not checked."""
    try:
        socketdir.check(socket_path.parent)
    except FileNotFoundError as exc:  # no daemon made it: none is listening there
        raise errors.DaemonUnreachable(str(socket_path), "no such directory") from exc


# -- what an error reply raises: one class per code --------------------------------------------


class NotFound(errors.RemoteError):
    """`not_found`: no such job, or one this peer may not see."""


class InvalidRequest(errors.RemoteError):
    """`invalid_request`, `invalid_json`, `line_too_long`, `unknown_op`,
    `unsupported_version`: the request itself was wrong (the message names what)."""


class InvalidJob(errors.RemoteError):
    """`invalid_job`: the backend cannot run this spec (the message names the field)."""


class AmbiguousJob(errors.RemoteError):
    """`ambiguous_job`: an id prefix or a name that several jobs have (the message lists
    some)."""


class IdempotencyConflict(errors.RemoteError):
    """`idempotency_conflict`: the key names another job with a different spec."""


class Forbidden(errors.RemoteError):
    """`forbidden`: this peer may not do that."""


class BackendUnavailable(errors.RemoteError):
    """`backend_unavailable`: the daemon does not run that backend."""


class Overloaded(errors.RemoteError):
    """`overloaded`, `slow_reader`, `idle_timeout`, `timeout`: the daemon shed this
    connection or request; try again."""


class ShuttingDown(errors.RemoteError):
    """`shutting_down`: the daemon is stopping (`wait`, `watch` and `logs` wait for it)."""


class StoreUnavailable(errors.RemoteError):
    """`store_error`, `store_unavailable`, `store_full`: the daemon could not record the
    request (its PostgreSQL cannot be reached, its disk is full); nothing of it
    was."""


class LogsUnavailable(errors.RemoteError):
    """`logs_unavailable`: the job's output cannot be read right now; ask again."""


REMOTE_ERRORS: dict[str, type[errors.RemoteError]] = {
    "not_found": NotFound,
    "invalid_request": InvalidRequest,
    "invalid_json": InvalidRequest,
    "line_too_long": InvalidRequest,
    "unknown_op": InvalidRequest,
    "unsupported_version": InvalidRequest,
    "invalid_job": InvalidJob,
    "idempotency_conflict": IdempotencyConflict,
    "ambiguous_job": AmbiguousJob,
    "forbidden": Forbidden,
    "backend_unavailable": BackendUnavailable,
    "overloaded": Overloaded,
    "slow_reader": Overloaded,
    "idle_timeout": Overloaded,
    "timeout": Overloaded,
    "shutting_down": ShuttingDown,
    "store_error": StoreUnavailable,
    "store_unavailable": StoreUnavailable,
    "store_full": StoreUnavailable,
    "logs_unavailable": LogsUnavailable,
}


def remote_error(code: str, message: str) -> errors.RemoteError:
    """The exception of an error reply: the class of its code (`RemoteError` for others)."""
    return REMOTE_ERRORS.get(code, errors.RemoteError)(code, message)


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise remote_error(str(reply.get("code")), str(reply.get("message")))
    return reply


def _top_params(
    state: Sequence[str] | None, backend: str | None, limit: int, failures: int
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, "failures": failures}
    if state:
        params["state"] = list(state)
    if backend:
        params["backend"] = backend
    return params


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`itertools.batched` (Python 3.12) for 3.11."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class Client:
    """An asyncio client. Requests may be issued concurrently; replies are matched by id."""

    def __init__(self, socket_path: Path | str | None = None, *, limit: int = 64 * 1024 * 1024):
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self._check_directory = _uses_per_user_default(socket_path)
        self._limit = limit
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._routes: dict[int, _Route] = {}
        self._ids = itertools.count(1)
        self._pump: asyncio.Task[None] | None = None
        # Called once each time `wait`, `watch` or `logs` lose the daemon and wait for it
        # (the error, how long they will wait at most): the CLI says so on stderr.
        self.on_lost: Callable[[BaseException, float], None] | None = None

    async def connect(self) -> Self:
        if self._check_directory:
            _check_default_directory(self.socket_path)
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.socket_path), limit=self._limit
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise errors.DaemonUnreachable(str(self.socket_path), exc.strerror or str(exc)) from exc
        except PermissionError as exc:
            raise errors.DaemonUnreachable(str(self.socket_path), "permission denied") from exc
        self._pump = asyncio.create_task(self._read_replies(), name="client-replies")
        return self

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
            self._writer = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _read_replies(self) -> None:
        assert self._reader is not None
        failure: BaseException = errors.DaemonUnreachable(
            str(self.socket_path), "the daemon closed the connection"
        )
        try:
            while line := await self._reader.readline():
                reply = protocol.parse_reply(line)
                request_id = reply.get("id")
                route = self._routes.get(request_id)  # type: ignore[arg-type]
                if route is not None:
                    route.put_nowait(reply)
                elif request_id is None and not reply.get("ok"):
                    # An error not tied to a request (forbidden, idle_timeout): it ends the
                    # connection, and every request still waiting on it.
                    failure = remote_error(str(reply.get("code")), str(reply.get("message")))
                    break
                # Else a line for a request that is already answered: a protocol error of
                # that request alone, which has its outcome; the other requests go on.
        except ConnectionError as exc:  # reset by the peer: a daemon dying or not yet up
            failure = errors.DaemonUnreachable(str(self.socket_path), str(exc))
        except errors.ProtocolError as exc:
            failure = exc
        for route in self._routes.values():
            route.put_nowait(failure)

    async def _send(self, op: str, params: Mapping[str, Any]) -> tuple[int, _Route]:
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        request_id = next(self._ids)
        route: _Route = asyncio.Queue()
        self._routes[request_id] = route
        self._writer.write(protocol.request(op, request_id, **params))
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            del self._routes[request_id]
            raise errors.DaemonUnreachable(str(self.socket_path), str(exc)) from exc
        return request_id, route

    async def _next(self, route: _Route) -> dict[str, Any]:
        item = await route.get()
        if isinstance(item, BaseException):
            raise item
        return _check(item)

    async def call(self, op: str, **params: Any) -> dict[str, Any]:
        """One request, one reply (raises `RemoteError` for an error reply)."""
        request_id, route = await self._send(op, params)
        try:
            return await self._next(route)
        finally:
            self._routes.pop(request_id, None)

    async def stream(self, op: str, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """A streaming request: every reply line up to and including the one with `end`."""
        request_id, route = await self._send(op, params)
        try:
            while True:
                reply = await self._next(route)
                yield reply
                if reply.get("end"):
                    return
        finally:
            self._routes.pop(request_id, None)

    # -- conveniences ----------------------------------------------------------------------

    async def ping(self) -> views.Ping:
        return cast(views.Ping, await self.call("ping"))

    async def submit(self, job: Mapping[str, Any]) -> views.Job:
        return cast(views.Job, (await self.call("submit", job=job))["job"])

    async def submit_many(
        self, jobs: Iterable[Mapping[str, Any]], batch: int = 500, window: int = 4
    ) -> AsyncIterator[views.Submitted | errors.RemoteError]:
        """Submit many jobs: `batch` per `submit_many` request, `window` requests in flight.
        Yields each job's result in input order: a compact job (`id`, `name`, `state`,
        `created`) or the `RemoteError` that names what was wrong with that one spec. A
        caller that stops early stops the sending: no more batches go out (those already
        sent are accepted)."""
        pending: asyncio.Queue[tuple[asyncio.Task[dict[str, Any]], int] | None] = asyncio.Queue(
            window
        )

        async def feed() -> None:
            for chunk in _chunks(jobs, batch):
                task = asyncio.create_task(self.call("submit_many", jobs=list(chunk)))
                await pending.put((task, len(chunk)))
            await pending.put(None)

        feeder = asyncio.create_task(feed(), name="client-feed")
        try:
            while (item := await pending.get()) is not None:
                task, count = item
                try:
                    reply = await task
                except errors.RemoteError as exc:
                    for _ in range(count):
                        yield exc
                    continue
                for result in reply["results"]:
                    if result["ok"]:
                        yield cast(views.Submitted, result)
                    else:
                        yield remote_error(result["code"], result["message"])
            await feeder
        finally:
            # The caller stopped early (or failed): no more batches go out, and the requests
            # in flight are let go (what the daemon got of them it has accepted).
            feeder.cancel()
            unanswered: list[asyncio.Task[Any]] = [feeder]
            while not pending.empty():
                if (left := pending.get_nowait()) is not None:
                    left[0].cancel()
                    unanswered.append(left[0])
            await asyncio.gather(*unanswered, return_exceptions=True)

    async def get(self, job_id: str, *, history: bool = False) -> views.Job:
        """The job; with `history`, its `history` and `attempts` too."""
        return cast(views.Job, (await self.call("get", job_id=job_id, history=history))["job"])

    async def list(
        self, state: list[str] | None = None, backend: str | None = None, limit: int = 100
    ) -> list[views.Job]:
        """Up to `limit` jobs, newest first (fetched a page at a time)."""
        return [job async for job in self.iter_jobs(state, backend, limit)]

    async def list_page(
        self,
        state: Sequence[str] | None = None,
        backend: str | None = None,
        limit: int = protocol.MAX_PAGE,
        *,
        cursor: str | None = None,
        name: str | None = None,
        since: float | None = None,
        labels: Mapping[str, str] | None = None,
        target: str | None = None,
        parent: str | None = None,
    ) -> tuple[builtins.list[views.Job], str | None]:
        """One page of jobs, newest first (at most `protocol.MAX_PAGE`), after `cursor` (a
        job id), by state, backend, name glob and acceptance time (Unix); and the cursor of
        the next page (None: this is the last)."""
        given: dict[str, object] = {"state": [*(state or ())], "backend": backend}
        given |= {"cursor": cursor, "name": name, "since": since}
        given |= {"labels": dict(labels) if labels else None, "target": target, "parent": parent}
        params = {key: value for key, value in given.items() if value not in (None, [])}
        reply = await self.call("list", limit=min(limit, protocol.MAX_PAGE), **params)
        return cast(builtins.list[views.Job], reply["jobs"]), reply.get("next_cursor")

    async def iter_jobs(
        self,
        state: Sequence[str] | None = None,
        backend: str | None = None,
        limit: int | None = None,
        *,
        cursor: str | None = None,
        name: str | None = None,
        since: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> AsyncIterator[views.Job]:
        """Jobs, newest first, a page at a time (all of them with `limit=None`)."""
        left = limit
        while left is None or left > 0:
            size = protocol.MAX_PAGE if left is None else left
            jobs, cursor = await self.list_page(
                state, backend, size, cursor=cursor, name=name, since=since, labels=labels
            )
            for job in jobs:
                yield job
            if left is not None:
                left -= len(jobs)
            if cursor is None:
                return

    async def cancel(self, job_id: str) -> views.Job:
        return cast(views.Job, (await self.call("cancel", job_id=job_id))["job"])

    async def top(
        self,
        state: Sequence[str] | None = None,
        backend: str | None = None,
        *,
        limit: int = 50,
        failures: int = 10,
    ) -> dict[str, Any]:
        """A snapshot of the daemon, as `orchestrator top` shows it: `jobs_by_state`, the jobs
        in `state` (default: the unfinished ones), the last `failures`, `lanes`, `aws`, health."""
        return await self.call("top", **_top_params(state, backend, limit, failures))

    async def _lost(self, reconnect: _Reconnect, exc: BaseException) -> None:
        """The daemon went away under a request: drop the connection and wait before the next
        try, or raise `exc` once `reconnect` gives up."""
        first = not reconnect.lost
        delay_s = reconnect.delay(exc)
        if delay_s is None:
            raise exc
        if first and self.on_lost is not None:
            self.on_lost(exc, reconnect.within_s)
        await self.close()
        await asyncio.sleep(delay_s)

    async def wait(self, job_id: str, *, reconnect_s: float = RECONNECT_S) -> views.Job:
        """The job once it has ended. A daemon that goes away meanwhile (a restart) is waited
        for, up to `reconnect_s` (0: not at all)."""
        reconnect = _Reconnect(reconnect_s)
        while True:
            try:
                async for reply in self.stream("wait", job_id=job_id):
                    if "job" in reply:
                        return cast(views.Job, reply["job"])
                raise errors.ProtocolError("wait ended without the job")
            except errors.OrchestratorError as exc:
                await self._lost(reconnect, exc)

    async def watch(
        self,
        job_id: str | None = None,
        *,
        since: int | None = None,
        reconnect_s: float = RECONNECT_S,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The replies of a `watch`: `watching` (with the job, for one job), then each event.
        With `since` (an event's `seq`), the events committed after it first. A daemon that
        goes away meanwhile is waited for, up to `reconnect_s`, and the watch resumes after
        the last event seen: none is missed, none is repeated, `watching` comes once."""
        reconnect = _Reconnect(reconnect_s)
        last, said = since, False
        while True:
            params: dict[str, Any] = {} if job_id is None else {"job_id": job_id}
            if last is not None:
                params["since"] = last
            try:
                async for reply in self.stream("watch", **params):
                    reconnect.ok()
                    if reply.get("watching"):
                        if last is None:  # resume from where the daemon was when we began
                            last = reply.get("seq")
                        if said:
                            continue
                        said = True
                    if isinstance(event := reply.get("event"), dict):
                        last = event.get("seq", last)
                    yield reply
                return
            except errors.OrchestratorError as exc:
                await self._lost(reconnect, exc)

    async def logs(
        self, job_id: str, *, follow: bool = False, reconnect_s: float = RECONNECT_S
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The job's output (`stream`, `data`), then `end`. Lines come a page at a time: a page
        is handed on once whole, so that a daemon that goes away meanwhile (waited for, up to
        `reconnect_s`) is asked to go on after the last whole page: nothing is repeated."""
        reconnect = _Reconnect(reconnect_s)
        where: dict[str, Any] = {}  # cursor and attempt of the last whole page
        while True:
            page: list[dict[str, Any]] = []
            try:
                async for reply in self.stream("logs", job_id=job_id, follow=follow, **where):
                    reconnect.ok()
                    if reply.get("end"):
                        for line in page:
                            yield line
                        yield reply
                        return
                    page.append(reply)
                    if "cursor" in reply:
                        where = {"cursor": reply["cursor"], "attempt": reply["attempt"]}
                        for line in page:
                            yield line
                        page = []
                return
            except errors.OrchestratorError as exc:
                await self._lost(reconnect, exc)


class SyncClient:
    """A blocking client over a plain socket, one request at a time."""

    def __init__(self, socket_path: Path | str | None = None, *, timeout_s: float | None = None):
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self._check_directory = _uses_per_user_default(socket_path)
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._ids = itertools.count(1)

    def connect(self) -> Self:
        if self._check_directory:
            _check_default_directory(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout_s)
        try:
            sock.connect(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            sock.close()
            raise errors.DaemonUnreachable(str(self.socket_path), exc.strerror or str(exc)) from exc
        self._sock, self._file = sock, sock.makefile("rb")
        return self

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stream(self, op: str, **params: Any) -> Iterator[dict[str, Any]]:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request_id = next(self._ids)
        try:
            self._sock.sendall(protocol.request(op, request_id, **params))
        except ConnectionError as exc:
            raise errors.DaemonUnreachable(str(self.socket_path), str(exc)) from exc
        while True:
            try:
                line = self._file.readline()
            except ConnectionError as exc:
                raise errors.DaemonUnreachable(str(self.socket_path), str(exc)) from exc
            if not line:
                raise errors.DaemonUnreachable(
                    str(self.socket_path), "the daemon closed the connection"
                )
            reply = protocol.parse_reply(line)
            if reply.get("id") != request_id and reply.get("id") is not None:
                continue  # a late line of an earlier, answered request: not this one's
            reply = _check(reply)
            yield reply
            if op not in protocol.STREAMING or reply.get("end"):
                return

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        return next(iter(self.stream(op, **params)))

    def ping(self) -> views.Ping:
        return cast(views.Ping, self.call("ping"))

    def submit(self, job: Mapping[str, Any]) -> views.Job:
        return cast(views.Job, self.call("submit", job=job)["job"])

    def get(self, job_id: str, *, history: bool = False) -> views.Job:
        return cast(views.Job, self.call("get", job_id=job_id, history=history)["job"])

    def cancel(self, job_id: str) -> views.Job:
        return cast(views.Job, self.call("cancel", job_id=job_id)["job"])

    def top(
        self,
        state: Sequence[str] | None = None,
        backend: str | None = None,
        *,
        limit: int = 50,
        failures: int = 10,
    ) -> dict[str, Any]:
        """A snapshot of the daemon, as `orchestrator top` shows it (see `Client.top`)."""
        return self.call("top", **_top_params(state, backend, limit, failures))

    def wait(self, job_id: str, *, reconnect_s: float = RECONNECT_S) -> views.Job:
        """The job once it has ended; a daemon that goes away meanwhile is waited for, up to
        `reconnect_s` (0: not at all)."""
        reconnect = _Reconnect(reconnect_s)
        while True:
            try:
                for reply in self.stream("wait", job_id=job_id):
                    if "job" in reply:
                        return cast(views.Job, reply["job"])
                raise errors.ProtocolError("wait ended without the job")
            except errors.OrchestratorError as exc:
                delay_s = reconnect.delay(exc)
                if delay_s is None:
                    raise
                self.close()
                time.sleep(delay_s)
