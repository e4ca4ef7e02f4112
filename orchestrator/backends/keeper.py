"""The daemon's side of the keeper (`_keeper.py`): start it if it is not running, talk to it.

One keeper per work directory starts, reaps and remembers every local job and outlives the
daemon. This client connects to it (starting one if none answers), reads what it holds (`hello`:
every job it runs or has an unforgotten outcome for), sends launches, signals and forgets, and
keeps `records` up to date from its `exited` events. When the connection drops it reconnects in
the background, starting a new keeper if the old one has gone; until then nothing about a job
can be told (`connected` is False), and callers treat that as "cannot tell now", never as an
outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from orchestrator import errors
from orchestrator.backends import _keeper

log = structlog.get_logger("orchestrator.backends.keeper")

KEEPER = Path(_keeper.__file__)
_CONNECT_WAIT_S = 10.0  # a keeper just started has this long to listen
_LAUNCH_WAIT_S = 30.0  # a launch unanswered past this: the outcome is unknown
_RECONNECT_CAP_S = 5.0
_LINE_LIMIT = 256 << 20  # `hello` lists every job the keeper holds on one line


@dataclass(slots=True)
class Record:
    """What the keeper holds of one launch (key `JOB_ID/ATTEMPT`)."""

    pid: int
    start: int
    result: dict[str, Any] | None = None  # the outcome, once the job's own process has ended


async def _open(work_dir: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the keeper's socket, named through a descriptor of the work directory:
    a unix socket's path may not exceed 107 bytes, a work directory's may."""
    fd = os.open(work_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        path = f"/proc/self/fd/{fd}/{_keeper.SOCKET}"
        return await asyncio.open_unix_connection(path, limit=_LINE_LIMIT)
    finally:
        os.close(fd)


class KeeperClient:
    def __init__(self, work_dir: Path, on_exit: Callable[[str], None]) -> None:
        self._work_dir = work_dir
        self._on_exit = on_exit  # called with a key whose job has ended (or whose keeper went)
        self.records: dict[str, Record] = {}
        self.keeper_pid: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._lock = asyncio.Lock()
        self._spawned: list[int] = []  # keepers we started (our children until reaped)
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Connected to the keeper (started if none answers) and its `hello` read; raises
        errors.KeeperUnavailable saying why not."""
        async with self._lock:
            if self.connected:
                return
            await self._connect()

    async def _connect(self) -> None:
        path = self._work_dir / _keeper.SOCKET
        deadline = asyncio.get_running_loop().time() + _CONNECT_WAIT_S
        delay_s = 0.01
        started = False
        while True:
            try:
                reader, writer = await _open(self._work_dir)
                hello = orjson.loads(await asyncio.wait_for(reader.readline(), _CONNECT_WAIT_S))
                if hello.get("op") != "hello":
                    raise ConnectionError(f"the keeper said {hello!r} first")
                if hello.get("version") != _keeper.VERSION:
                    writer.close()
                    raise errors.KeeperUnavailable(
                        f"the job keeper at {path} (pid {hello.get('pid')}) speaks version "
                        f"{hello.get('version')} of its protocol, this daemon {_keeper.VERSION}: "
                        "stop it once its jobs have ended (a newer daemon's keeper)"
                    )
                break
            except (OSError, ValueError, TimeoutError, EOFError) as exc:
                if not started and isinstance(exc, FileNotFoundError | ConnectionRefusedError):
                    self._spawn()
                    started = True
                if asyncio.get_running_loop().time() > deadline:
                    raise errors.KeeperUnavailable(
                        f"cannot reach the job keeper at {path}: {exc}"
                    ) from exc
                await asyncio.sleep(delay_s)
                delay_s = min(0.25, delay_s * 2)
        previous = self.keeper_pid
        self.keeper_pid = int(hello["pid"])
        self.records = {
            str(job["key"]): Record(int(job["pid"]), int(job["start"]), job.get("result"))
            for job in hello["jobs"]
        }
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader), name="keeper-reader")
        log.info(
            "local.keeper_connected",
            keeper_pid=self.keeper_pid,
            jobs=len(self.records),
            new=previous is not None and previous != self.keeper_pid,
        )

    def _spawn(self) -> None:
        """Start a keeper in a session of its own, its stderr on `keeper.log`."""
        self._reap_spawned()
        logfile = self._work_dir / _keeper.LOG
        write = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", str(KEEPER), str(self._work_dir)],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, str(logfile), write, 0o600),
                ],
                setsid=True,
            )
        except OSError as exc:
            raise errors.KeeperUnavailable(f"cannot start the job keeper: {exc}") from exc
        self._spawned.append(pid)
        log.info("local.keeper_started", keeper_pid=pid)
        try:  # reaped the moment it exits (one that lost the race for the lock exits at once)
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # reaped at the next spawn or close instead
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._reap_spawned()

        loop.add_reader(pidfd, exited)

    def _reap_spawned(self) -> None:
        for pid in list(self._spawned):
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped = pid
            if reaped:
                self._spawned.remove(pid)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._handle(orjson.loads(line))
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            log.warning("local.keeper_read_failed", error=repr(exc))
        finally:
            self._lost()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        key = str(message.get("key"))
        if op == "exited":
            record = self.records.get(key)
            if record is not None:
                record.result = message["result"]
            self._on_exit(key)
        elif op in ("launched", "failed"):
            if op == "launched":
                self.records[key] = Record(int(message["pid"]), int(message["start"]))
            future = self._pending.pop(key, None)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            log.warning("local.keeper_said", message=message)

    def _lost(self) -> None:
        """The connection has gone: launches in flight have an unknown outcome; reconnect."""
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the connection to the keeper was lost"))
        self._pending.clear()
        self._reap_spawned()
        if self._closing:
            return
        log.warning("local.keeper_disconnected", keeper_pid=self.keeper_pid)
        self.reconnect_soon()

    def reconnect_soon(self) -> None:
        """Have a connection made in the background if none is being made (the first connect
        at start-up failed, or the keeper went)."""
        if self._closing or self.connected:
            return
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect(), name="keeper-connect")

    async def _reconnect(self) -> None:
        before = set(self.records)
        delay_s = 0.1
        while not self._closing:
            try:
                await self.connect()
            except errors.KeeperUnavailable as exc:
                log.warning("local.keeper_unavailable", error=str(exc))
                await asyncio.sleep(delay_s)
                delay_s = min(_RECONNECT_CAP_S, delay_s * 2)
                continue
            for key in before | set(self.records):
                self._on_exit(key)  # have every job looked at again against what it says now
            return

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise errors.KeeperUnavailable("not connected to the job keeper")
        self._writer.write(orjson.dumps(message) + b"\n")

    async def launch(self, key: str, request: dict[str, Any]) -> Record:
        """Launch through the keeper. `KeeperUnavailable`: nothing was sent. `LaunchFailed`:
        nothing ran. ConnectionError or TimeoutError: it may have run."""
        await self.connect()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        self._send({"op": "launch", "key": key, **request})
        try:
            answer = await asyncio.wait_for(future, _LAUNCH_WAIT_S)
        finally:
            self._pending.pop(key, None)
        if answer["op"] == "failed":
            raise errors.LaunchFailed(int(answer["errno"]), str(answer["error"]))
        return self.records[key]

    def signal(self, key: str, signum: int) -> None:
        with contextlib.suppress(errors.KeeperUnavailable):
            self._send({"op": "signal", "key": key, "signal": signum})

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self.records.pop(key, None)
        with contextlib.suppress(errors.KeeperUnavailable):
            self._send({"op": "forget", "keys": keys})

    async def close(self) -> None:
        self._closing = True
        for task in (self._reconnect_task, self._reader_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._writer = None
        self._reap_spawned()
