"""The socket file and the store as an operator meets them: stale sockets, a second daemon,
other users, a corrupt journal, retention."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from asyncio.subprocess import PIPE
from pathlib import Path

import orjson
import pytest

from orchestrator import errors
from orchestrator.client import Client
from orchestrator.daemon import Daemon
from orchestrator.testing import make_settings
from tests.support.daemon import running
from tests.support.waits import until

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


async def test_a_stale_socket_from_a_crash_is_replaced(short_tmp: Path) -> None:
    path = short_tmp / "o.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    async with running(make_settings(short_tmp)), Client(path) as client:
        assert (await client.ping())["pong"] is True
    assert not path.exists()  # removed on a clean stop


async def test_a_second_daemon_on_the_same_socket_refuses_to_start(short_tmp: Path) -> None:
    settings = make_settings(short_tmp)
    async with running(settings):
        other = make_settings(short_tmp, store={"path": short_tmp / "other.db"})
        with pytest.raises(errors.ConfigError, match="already listening"):
            await Daemon(other).run()
        async with Client(settings.server.socket_path) as client:
            assert (await client.ping())["pong"] is True


async def test_a_regular_file_at_the_socket_path_is_not_replaced(short_tmp: Path) -> None:
    path = short_tmp / "o.sock"
    path.write_text("precious")
    with pytest.raises(errors.ConfigError, match="not a socket"):
        await Daemon(make_settings(short_tmp)).run()
    assert path.read_text() == "precious"


async def _ask_as(
    uid: int, path: Path, request: dict[str, object], groups: tuple[int, ...] = ()
) -> dict[str, object]:
    """Send one request from a process running as `uid` (the system python: no venv needed)."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(path)!r})\n"
        "try:\n"
        f"    s.sendall({orjson.dumps(request)!r} + b'\\n')\n"
        "except BrokenPipeError:\n"
        "    pass  # refused: the answer is already on its way\n"
        "sys.stdout.buffer.write(s.makefile('rb').readline())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON,
        "-I",
        "-c",
        code,
        user=uid,
        group=uid,
        extra_groups=list(groups),
        stdout=PIPE,
        stderr=PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    if proc.returncode:
        raise PermissionError(err.decode())
    reply: dict[str, object] = orjson.loads(out)
    return reply


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
@pytest.mark.parametrize("allowed", [False, True])
async def test_peer_credentials_decide_who_may_use_the_socket(
    short_tmp: Path, allowed: bool
) -> None:
    server = {"allowed_uids": [0, NOBODY]} if allowed else {}
    # run_as: a local job of another uid than the daemon's is otherwise refused (forbidden)
    settings = make_settings(short_tmp, server=server, local={"run_as": "submitter"})
    async with running(settings) as daemon:
        # Open the file permissions on purpose, so that only the peer check stands in the way.
        os.chmod(short_tmp, 0o755)
        os.chmod(settings.server.socket_path, 0o666)
        reply = await _ask_as(
            NOBODY,
            settings.server.socket_path,
            {"id": 1, "op": "submit", "job": {"command": ["true"]}},
        )
        if not allowed:
            assert (reply["ok"], reply["code"]) == (False, "forbidden")
            assert await daemon.store.count_by_state() == {}
            return
        assert reply["ok"] is True
        job = reply["job"]
        assert isinstance(job, dict)
        assert job["peer"]["uid"] == NOBODY
        stored = await daemon.store.get(job["id"])
        assert stored.peer is not None
        assert stored.peer.uid == NOBODY


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
async def test_a_supplementary_group_in_allowed_gids_admits_the_peer(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, server={"allowed_gids": [4242]})
    async with running(settings):
        os.chmod(short_tmp, 0o755)
        os.chmod(settings.server.socket_path, 0o666)
        admitted = await _ask_as(NOBODY, settings.server.socket_path, {"op": "ping"}, (4242,))
        refused = await _ask_as(NOBODY, settings.server.socket_path, {"op": "ping"}, (4243,))
    assert admitted["ok"] is True
    assert (refused["ok"], refused["code"]) == (False, "forbidden")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
async def test_default_permissions_keep_other_users_out(short_tmp: Path) -> None:
    settings = make_settings(short_tmp)
    async with running(settings):
        with pytest.raises(PermissionError, match="Permission denied"):
            await _ask_as(NOBODY, settings.server.socket_path, {"op": "ping"})


async def test_a_corrupt_store_stops_start_up_with_a_message_naming_it(short_tmp: Path) -> None:
    settings = make_settings(short_tmp)
    async with running(settings), Client(settings.server.socket_path) as client:
        for _ in range(50):
            await client.submit({"command": ["true"]})
    db = settings.store.path
    data = bytearray(db.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # garble every page after the schema
    db.write_bytes(bytes(data))
    with pytest.raises(errors.StoreError) as info:
        await Daemon(settings).run()
    assert str(db) in info.value.message
    assert not settings.server.socket_path.exists()


async def test_retention_deletes_old_terminal_jobs_and_their_files(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, store={"retention_days": 1})
    async with running(settings), Client(settings.server.socket_path) as client:
        old = await client.wait((await client.submit({"command": ["true"]}))["id"])
        recent = await client.wait((await client.submit({"command": ["true"]}))["id"])
        waiting = await client.submit({"command": ["sleep", "30"]})
    jobs_dir = settings.local_work_dir()
    assert (jobs_dir / old["id"]).is_dir()
    with sqlite3.connect(settings.store.path) as conn:  # age one job by two days
        conn.execute(
            "UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time() - 2 * 86400, old["id"])
        )
        conn.execute(
            "UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time() - 2 * 86400, waiting["id"])
        )
    async with running(settings), Client(settings.server.socket_path) as client:
        ids = {job["id"] for job in await client.list()}
        await client.cancel(waiting["id"])
    assert ids == {recent["id"], waiting["id"]}  # old and terminal: gone; unfinished: kept
    # Its files go right after its row, on a thread the daemon's stop does not interrupt.
    await until(lambda: not (jobs_dir / old["id"]).exists(), "the purged job's files to go")
    assert (jobs_dir / recent["id"]).is_dir()
