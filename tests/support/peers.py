"""Clients of other uids: one connection to the daemon's socket, held by a process running as
another uid (`setpriv`), that the test drives a line at a time.

The process is the system python copying lines both ways: it needs nothing of the venv, so any
uid (one with no passwd entry too) can run it. Every read is bounded."""

from __future__ import annotations

import asyncio
import itertools
import os
from asyncio.subprocess import PIPE
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from orchestrator import protocol

SYSTEM_PYTHON = "/usr/bin/python3"
LINE_TIMEOUT_S = 15.0

_PROXY = """
import socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def up():
    for line in sys.stdin.buffer:
        s.sendall(line)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
for line in s.makefile("rb"):
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()
"""


def open_to_others(socket_path: Path) -> None:
    """Let other uids reach the socket: search permission on its directory, the socket 0666
    (the peer check is what then stands in the way, as under a shared group)."""
    os.chmod(socket_path.parent, 0o711)
    os.chmod(socket_path, 0o666)


class PeerClient:
    """A connection from `uid` (with only `groups` as supplementary groups)."""

    def __init__(self, uid: int, socket_path: Path, groups: Sequence[int] = ()) -> None:
        self.uid = uid
        self._socket_path = socket_path
        self._groups = list(groups)
        self._ids = itertools.count(1)
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> PeerClient:
        groups = (
            [f"--groups={','.join(map(str, self._groups))}"] if self._groups else ["--clear-groups"]
        )
        self._proc = await asyncio.create_subprocess_exec(
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.uid}",
            *groups,
            SYSTEM_PYTHON,
            "-I",
            "-c",
            _PROXY,
            str(self._socket_path),
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        assert proc is not None
        # Hang up whatever is still open (a watch): the daemon ends it with the connection.
        proc.kill()
        async with asyncio.timeout(LINE_TIMEOUT_S):
            await proc.communicate()

    async def send(self, op: str, **params: Any) -> int:
        """Send one request; its id."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        request_id = next(self._ids)
        self._proc.stdin.write(protocol.request(op, request_id, **params))
        await self._proc.stdin.drain()
        return request_id

    async def line(self) -> dict[str, Any]:
        """The next line from the daemon."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        async with asyncio.timeout(LINE_TIMEOUT_S):
            raw = await self._proc.stdout.readline()
        if not raw:
            assert self._proc.stderr is not None
            async with asyncio.timeout(LINE_TIMEOUT_S):
                err = await self._proc.stderr.read()
            raise AssertionError(f"uid {self.uid}: the connection ended: {err.decode()}")
        reply: dict[str, Any] = orjson.loads(raw)
        return reply

    async def request(self, op: str, **params: Any) -> list[dict[str, Any]]:
        """Every line of one request's answer: one for a unary op; for a stream, up to the one
        with `end` (or the error). Nothing else may be in flight on this connection."""
        request_id = await self.send(op, **params)
        lines = []
        while True:
            line = await self.line()
            assert line.get("id") == request_id, line
            lines.append(line)
            if op not in protocol.STREAMING or not line["ok"] or line.get("end"):
                return lines

    async def call(self, op: str, **params: Any) -> dict[str, Any]:
        """A unary request's one reply."""
        (reply,) = await self.request(op, **params)
        return reply
