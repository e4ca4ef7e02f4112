"""Finding the local backend's keeper process of a work directory, as an operator would (by its
command line in /proc), to kill it or look at it."""

from __future__ import annotations

import os
from pathlib import Path


def keeper_pids(work_dir: Path) -> list[int]:
    """Pids of the live keepers of `work_dir` (normally one)."""
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
