"""Crash points: named places where a test can make the daemon die as if by `kill -9`.

`ORCHESTRATOR_CRASH_AT=dispatch.after_submit` (or `NAME:N` for the Nth time the point is reached)
is read once by the daemon at start-up through `arm`. Unarmed, a crash point is one comparison.
"""

from __future__ import annotations

import os
import sys

ENV = "ORCHESTRATOR_CRASH_AT"
POINTS = frozenset(
    {
        "dispatch.before_attempt",  # a queued job taken for dispatch, its attempt not recorded
        "dispatch.after_attempt_recorded",  # attempt and token committed, backend not called
        "dispatch.after_submit",  # backend accepted the job, external id not yet stored
        "poller.before_transition",  # an observed state change not yet committed
        "server.after_accept",  # job committed, reply not yet sent
    }
)

_armed: str | None = None
_remaining = 0


def arm(spec: str | None) -> None:
    """Arm one crash point from `NAME` or `NAME:N`; None or "" disarms."""
    global _armed, _remaining
    if not spec:
        _armed, _remaining = None, 0
        return
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise ValueError(
            f"{ENV}: unknown crash point {name!r} (known: {', '.join(sorted(POINTS))})"
        )
    _armed, _remaining = name, int(count or 1)


def crashpoint(name: str) -> None:
    global _remaining
    if _armed != name:
        return
    _remaining -= 1
    if _remaining <= 0:
        sys.stderr.write(f"orchestrator: crash point {name} reached, exiting\n")
        sys.stderr.flush()
        os._exit(137)
