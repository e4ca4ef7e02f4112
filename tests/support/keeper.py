"""Finding the local backend's keeper process of a work directory, as an operator would (by its
command line in /proc), to kill it or look at it; reading its log; talking to it directly."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any


def keeper_pids(work_dir: Path) -> list[int]:
    """Pids of the live keepers of `work_dir` (normally one), less the keeper's own forked
    children that have not exec'd their job yet (they bear the keeper's command line until
    their exec: namespace set-up, a cgroup to join, on a busy host for a while)."""
    pids = _command_lines_of_keepers(work_dir)
    return [pid for pid in pids if _ppid(pid) not in pids]


def _command_lines_of_keepers(work_dir: Path) -> list[int]:
    wanted = str(work_dir.resolve())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        if any(arg.endswith(b"_keeper.py") for arg in argv) and argv[-2:-1] == [wanted.encode()]:
            found.append(int(name))
    return found


def log_events(work_dir: Path) -> list[dict[str, Any]]:
    """Every JSON line of the keeper's log (`keeper.log`), of every keeper the directory had."""
    path = work_dir / "keeper.log"
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            if isinstance(event := json.loads(line), dict):
                events.append(event)
    return events


class KeeperConnection:
    """A raw connection to the keeper of `work_dir`, from this process, a line at a time. The
    socket is named through a descriptor of the directory, as the daemon does: the work
    directory's path may be longer than a unix socket's may be. Every read is bounded."""

    def __init__(self, work_dir: Path, timeout_s: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            fd = os.open(work_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.sock.connect(f"/proc/self/fd/{fd}/keeper.sock")
            finally:
                os.close(fd)
        except BaseException:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any] | None:
        """The next line the keeper sends; None once it has closed the connection."""
        try:
            raw = self._file.readline()
        except ConnectionResetError:  # closed with what we sent unread
            return None
        if not raw:
            return None
        message: dict[str, Any] = json.loads(raw)
        return message

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> KeeperConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[1])
