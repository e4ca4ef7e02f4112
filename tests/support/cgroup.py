"""Real cgroups for tests: whether this process may make them, a bounded wait, and a scratch
cgroup (standing for a service's own) that is emptied and removed after the test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from orchestrator.backends import cgroups
from tests.support.waits import wait_for

FOUND = cgroups.probe(enabled=True, root=None, create=False)


@contextlib.contextmanager
def scratch(name: str, owner: int | None = None) -> Iterator[Path]:
    """A cgroup `name` beside the jobs' root; with `owner`, delegated to that uid as systemd's
    Delegate=yes does (the directory and its cgroup.procs, cgroup.threads and
    cgroup.subtree_control chowned to it)."""
    assert FOUND.root is not None
    unit = FOUND.root.parent / name
    unit.mkdir(parents=True)
    if owner is not None:
        delegated = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control")
        for path in (unit, *(unit / file for file in delegated)):
            os.chown(path, owner, owner)
    try:
        yield unit
    finally:
        with contextlib.suppress(OSError):
            cgroups.kill(unit)
            wait_for(lambda: not cgroups.populated(unit), f"{unit} to empty", timeout_s=10)
            cgroups.remove(unit)
