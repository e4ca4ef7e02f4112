"""Crash points: named places where a test can make the daemon die as if by `kill -9`.

`ORCHESTRATOR_CRASH_AT=dispatch.after_submit` (or `NAME:N` for the Nth time the point is reached)
is read once by the daemon at start-up: the composition root (`daemon.py`) builds one `Faults`,
arms it from the environment and installs it. Unarmed, a crash point is one comparison.

The dispatcher, the poller and the API are handed it (`crash=`); built without one, they get
an unarmed `Faults` of their own.
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
        "poller.before_retry",  # a failed attempt to retry, the retry not yet committed
        "server.after_accept",  # job committed, reply not yet sent
        "events.received",  # event messages received, nothing they said applied yet
        "events.before_delete",  # what event messages said committed, the messages not deleted
    }
)


class Faults:
    """The crash points of one daemon, at most one of them armed."""

    def __init__(self) -> None:
        self._armed: str | None = None
        self._remaining = 0

    def arm(self, spec: str | None) -> None:
        """Arm one crash point from `NAME` or `NAME:N`; None or "" disarms."""
        if not spec:
            self._armed, self._remaining = None, 0
            return
        name, _, count = spec.partition(":")
        if name not in POINTS:
            raise ValueError(
                f"{ENV}: unknown crash point {name!r} (known: {', '.join(sorted(POINTS))})"
            )
        self._armed, self._remaining = name, int(count or 1)

    def crashpoint(self, name: str) -> None:
        if self._armed != name:
            return
        self._remaining -= 1
        if self._remaining <= 0:
            sys.stderr.write(f"orchestrator: crash point {name} reached, exiting\n")
            sys.stderr.flush()
            os._exit(137)
