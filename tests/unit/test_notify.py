"""systemd's notify protocol: a manager that does not read never stalls the daemon."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator import notify

pytestmark = pytest.mark.timeout(20)


def test_a_notify_socket_nobody_reads_costs_the_notification_not_a_stall(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = short_tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.send("READY=1") is True
        assert manager.recv(100) == b"READY=1"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as filler:
            assert _fill(filler, path) > 0  # the manager's queue is full to the brim
        # A blocking send would wait here until the manager reads, i.e. forever.
        assert notify.send("STATUS=busy", "WATCHDOG=1") is False


def _fill(sender: socket.socket, path: Path) -> int:
    for sent in range(100_000):
        try:
            sender.sendto(b"x" * 512, str(path))
        except BlockingIOError:
            return sent
    raise AssertionError("the queue never filled")
