"""Clients that leave mid-stream, never read, or read late, on the real socket: their slots are
freed, what the daemon holds for them is bounded, and every request gets exactly one final reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator import errors, models, protocol, views
from orchestrator.client import Client, SyncClient
from orchestrator.daemon import Daemon
from orchestrator.testing import FakeBackend, Script, make_settings
from tests.support.daemon import DaemonProcess, accepted, running

pytestmark = pytest.mark.timeout(120)

RUNNING_FOREVER = Script(states=(models.JobState.RUNNING,))


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path), limit=64 * 1024 * 1024)


async def _ping_until_admitted(path: Path, within_s: float = 10.0) -> views.Ping:
    """Ping on a new connection until it is admitted (not `overloaded`), within a bound."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            async with Client(path) as client:
                return await client.ping()
        except errors.RemoteError as exc:
            if exc.remote_code != "overloaded" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture
async def forever(short_tmp: Path) -> AsyncIterator[tuple[Daemon, str]]:
    """A daemon that admits 4 connections per peer, and a job that runs until cancelled."""
    settings = make_settings(short_tmp, server={"max_connections_per_peer": 4})
    async with running(
        settings, backends={"local": FakeBackend(default_script=RUNNING_FOREVER)}
    ) as d:
        async with Client(settings.server.socket_path) as client:
            job = await client.submit({"command": ["sleep", "1000"]})
        yield d, job["id"]


@pytest.mark.parametrize(
    "request_",
    [
        {"op": "wait"},
        {"op": "watch"},
        {"op": "watch", "all": True},
        {"op": "logs", "follow": True},
    ],
    ids=["wait", "watch-job", "watch-all", "logs-follow"],
)
async def test_a_client_that_hangs_up_mid_stream_frees_its_slot(
    forever: tuple[Daemon, str], request_: dict[str, Any]
) -> None:
    daemon, job_id = forever
    path = daemon.settings.server.socket_path
    request = {"v": 1, "id": 1, **request_}
    if not request.pop("all", False):
        request["job_id"] = job_id
    await _until(lambda: _open_connections(daemon) == 0)  # the fixture's client left
    for _ in range(3):  # three times the per-peer cap, in waves
        streams = [await _open(path) for _ in range(4)]
        for _, writer in streams:
            writer.write(_line(request))
            await writer.drain()
        await _until(lambda: _open_connections(daemon) == 4)  # all admitted, streaming
        for _, writer in streams:
            writer.close()  # and the client is gone, without reading a byte
        # Every slot comes back although the job is still running.
        await _ping_until_admitted(path)
        await _until(lambda: _open_connections(daemon) == 0)
    pong = await _ping_until_admitted(path)
    assert pong["jobs"] == {"RUNNING": 1}


async def test_a_client_that_hangs_up_past_its_in_flight_cap_frees_its_slot(
    short_tmp: Path,
) -> None:
    """The daemon stops reading a connection at `max_requests_in_flight`; a hang-up then
    still ends every stream."""
    settings = make_settings(
        short_tmp, server={"max_connections_per_peer": 2, "max_requests_in_flight": 4}
    )
    fake = FakeBackend(default_script=RUNNING_FOREVER)
    async with running(settings, backends={"local": fake}) as daemon:
        path = settings.server.socket_path
        async with Client(path) as client:
            job = await client.submit({"command": ["sleep", "1000"]})
        await _until(lambda: _open_connections(daemon) == 0)
        for _ in range(3):
            _, writer = await _open(path)
            writer.write(
                b"".join(
                    _line({"v": 1, "id": i, "op": "wait", "job_id": job["id"]}) for i in range(20)
                )
            )
            await writer.drain()
            writer.close()
        await _ping_until_admitted(path)
        await _until(lambda: _open_connections(daemon) == 0)


def _open_connections(daemon: Daemon) -> int:
    return len(daemon.server._connections)


async def _until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - watching another component's counter
            await asyncio.sleep(0.02)


async def test_a_client_that_half_closes_still_gets_its_answer(short_tmp: Path) -> None:
    """`echo '{"op": "wait", …}' | socat …` shuts its sending side and keeps reading."""
    settings = make_settings(short_tmp)
    quick = Script(states=(models.JobState.RUNNING,) * 5 + (models.JobState.SUCCEEDED,))
    async with running(settings, backends={"local": FakeBackend(default_script=quick)}):
        async with Client(settings.server.socket_path) as client:
            job = await client.submit({"command": ["true"]})
        reader, writer = await _open(settings.server.socket_path)
        writer.write(_line({"v": 1, "id": "w", "op": "wait", "job_id": job["id"]}))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(20):
            reply = orjson.loads(await reader.readline())
        assert (reply["id"], reply["end"], reply["job"]["state"]) == ("w", True, "SUCCEEDED")
        writer.close()


async def test_every_request_gets_exactly_one_final_reply_when_read_late(
    short_tmp: Path,
) -> None:
    """Thousands of pipelined submits read long after their deadline: one reply each."""
    settings = make_settings(short_tmp, server={"request_timeout_s": 0.3, "idle_timeout_s": 60})
    fake = FakeBackend(default_script=RUNNING_FOREVER)
    async with running(settings, backends={"local": fake}) as daemon:
        reader, writer = await _open(settings.server.socket_path)
        try:
            count = 3000
            writer.write(
                b"".join(
                    _line({"v": 1, "id": i, "op": "submit", "job": {"command": ["true"]}})
                    for i in range(count)
                )
            )
            await writer.drain()
            await asyncio.sleep(3)  # ten deadlines go by while nothing is read
            replies: Counter[int] = Counter()
            oks = 0
            async with asyncio.timeout(60):
                while sum(replies.values()) < count:
                    reply = orjson.loads(await reader.readline())
                    replies[reply["id"]] += 1
                    oks += reply["ok"]
                # Nothing more arrives for any of them.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        extra = await reader.readline()
                        pytest.fail(f"a second reply: {extra!r}")
        finally:
            writer.close()
        assert set(replies) == set(range(count))
        assert set(replies.values()) == {1}
        # Every `ok` names a stored job (a `timeout` may have been stored too).
        assert sum((await daemon.store.count_by_state()).values()) >= oks > 0


async def test_list_pages_with_a_cursor_and_the_client_follows_them(short_tmp: Path) -> None:
    settings = make_settings(short_tmp)
    fake = FakeBackend(default_script=RUNNING_FOREVER)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as client,
    ):
        ids = [
            accepted(r)["id"]
            async for r in client.submit_many({"command": ["true"]} for _ in range(2500))
        ]
        first = await client.call("list", limit=100_000)
        assert len(first["jobs"]) == protocol.MAX_PAGE
        assert first["next_cursor"] == first["jobs"][-1]["id"]
        second = await client.call("list", limit=100_000, cursor=first["next_cursor"])
        third = await client.call("list", limit=100_000, cursor=second["next_cursor"])
        assert len(third["jobs"]) == 500
        assert third["next_cursor"] is None
        paged = [j["id"] for page in (first, second, third) for j in page["jobs"]]
        assert paged == sorted(ids, reverse=True)
        assert [j["id"] for j in await client.list(limit=2200)] == paged[:2200]
        exact = await client.call("list", limit=500, cursor=paged[1999])
        assert (len(exact["jobs"]), exact["next_cursor"]) == (500, None)


async def test_a_stray_reply_line_fails_nothing_but_its_own_request(short_tmp: Path) -> None:
    """A server that answers one request twice: the client ignores the second line."""
    path = short_tmp / "s.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = orjson.loads(line)
                writer.write(protocol.reply(request["id"], pong=True))
                writer.write(protocol.error(request["id"], "timeout", "late"))  # a stray line
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    async with server:
        async with Client(path) as client:
            for _ in range(3):
                assert (await client.ping())["pong"] is True

        def sync_pings() -> list[object]:
            with SyncClient(path, timeout_s=5) as sync:
                return [sync.call("ping")["pong"] for _ in range(3)]

        assert await asyncio.to_thread(sync_pings) == [True, True, True]


# -- a client that never reads, against a daemon in its own process ---------------------------


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def daemon_proc(short_tmp: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(
        short_tmp,
        env={
            "ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": "1",
            "ORCHESTRATOR__SERVER__IDLE_TIMEOUT_S": "5",
        },
    )
    proc.start()
    yield proc
    proc.close()


def test_a_client_that_never_reads_is_held_back_then_dropped(daemon_proc: DaemonProcess) -> None:
    """100 pipelined `list`s of everything on 10,000 jobs, never read: the daemon's memory
    stays within 50 MB of idle, others are served, and the reader is cut after the idle
    timeout."""
    with daemon_proc.client() as client:
        blocker = client.submit({"command": ["sleep", "1000"]})  # holds the only slot
        for start in range(0, 10_000, 2000):
            reply = client.call(
                "submit_many",
                jobs=[{"command": ["true"], "name": f"j{i}"} for i in range(start, start + 2000)],
            )
            assert all(r["ok"] for r in reply["results"])
        for _ in range(3):  # warm up: the listing path is loaded and its caches full
            client.call("list", limit=1000)
    assert daemon_proc.proc is not None
    pid = daemon_proc.proc.pid
    idle_kb = _rss_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS starts again from here

    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(str(daemon_proc.socket_path))
    hog.sendall(
        b"".join(_line({"v": 1, "id": i, "op": "list", "limit": 100_000}) for i in range(100))
    )
    try:
        deadline = time.monotonic() + 4  # within the idle timeout: held back, not yet cut
        with daemon_proc.client() as other:
            while time.monotonic() < deadline:
                assert other.call("ping")["pong"] is True
                time.sleep(0.1)
        peak_kb = _rss_kb(pid, "VmHWM")
        assert peak_kb - idle_kb < 50 * 1024, f"RSS grew {peak_kb - idle_kb} kB"
        # Past the idle timeout without reading, the hog is cut: reading now ends in EOF.
        time.sleep(3)
        hog.settimeout(20)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := hog.recv(1 << 20):
                received += len(chunk)
        assert received < 100 * protocol.MAX_PAGE * 400  # far from every page it asked for
    finally:
        hog.close()
        with daemon_proc.client() as client:
            pid_of_job = client.get(blocker["id"])["info"].get("pid")
        if pid_of_job:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid_of_job, signal.SIGKILL)
    assert daemon_proc.stop() == 0
    log = daemon_proc.log()
    assert '"socket.slow_reader"' in log
