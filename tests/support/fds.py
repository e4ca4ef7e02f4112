"""What descriptors a job holds: a job command that lists its own, and the reading of its output."""

from __future__ import annotations

import json
import sys

_SCRIPT = """
import json, os
held = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        held[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass  # the listing's own descriptor, closed since
print(json.dumps(held))
"""

# Prints `{"FD": "what it is", ...}` for each descriptor it holds once started (stdout: its log).
LIST_FDS = [sys.executable, "-I", "-S", "-c", _SCRIPT]


def held(output: str) -> dict[int, str]:
    """The descriptors `LIST_FDS` printed, and what each was."""
    return {int(fd): target for fd, target in json.loads(output).items()}
