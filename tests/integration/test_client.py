"""The client against a socket that hangs up on it: the caller is told the daemon is
unreachable (exit 3 from the CLI), never handed a raw connection error."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import errors
from orchestrator.client import Client, SyncClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def rude_socket(short_tmp: Path) -> Iterator[Path]:
    """Accepts each connection and resets it without reading (a daemon dying under us)."""
    path = short_tmp / "rude.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(5)
    server.close()


def test_sync_client_reports_unreachable(rude_socket: Path) -> None:
    with (
        pytest.raises(errors.DaemonUnreachable, match=str(rude_socket)),
        SyncClient(rude_socket) as client,
    ):
        client.call("ping")


async def test_async_client_reports_unreachable(rude_socket: Path) -> None:
    with pytest.raises(errors.DaemonUnreachable, match=str(rude_socket)):
        async with Client(rude_socket) as client:
            await client.ping()


def test_cli_exits_3_naming_the_socket(rude_socket: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "ping",
            "--socket",
            str(rude_socket),
            "--wait-s",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert str(rude_socket) in result.stderr
    assert "Traceback" not in result.stderr
