"""A small tmpfs of the test's own, for file systems that fill up: mounted where the test says,
unmounted (lazily if still busy) afterwards; skips the test where it cannot be mounted."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "8m") at `mount_point`, created if missing."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir(exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)]
    result = subprocess.run(mount, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmount = ["umount", str(mount_point)]
        if subprocess.run(unmount, capture_output=True, timeout=30, check=False).returncode:
            subprocess.run([*unmount[:1], "-l", *unmount[1:]], capture_output=True, timeout=30)
