"""Bounded waits for what a test can only look at (a file a job writes, a process, a counter):
there is nothing to wait on, so each looks again every 20 ms until its bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

_INTERVAL_S = 0.02


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    """The first true value of `predicate()`; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"waited {timeout_s}s in vain for {what}"
        time.sleep(_INTERVAL_S)
    return value


async def until(predicate: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    """`wait_for` for a test on the event loop: the loop keeps running meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout_s}s in vain for {what}"
        await asyncio.sleep(_INTERVAL_S)
