"""What a restarted daemon does with each unfinished job it finds in the store."""

from __future__ import annotations

import enum
from collections.abc import Collection

from orchestrator import models
from orchestrator.engine import arrays


class Recovery(enum.Enum):
    ORPHANED = "orphaned"  # its backend is not enabled now: left as it is, said in the log
    SETTLE = "settle"  # an attempt cut short while launching: did it launch? (before serving)
    STOP = "stop"  # queued with a stop recorded but not carried out: carry it out now
    ENQUEUE = "enqueue"  # queued: to its lane
    TRACK = "track"  # launched: counted in its lane's flight, tracked by the poller
    ARRAY = "array"  # an array parent expanded into its children: follows them


def recover(job: models.Job, backends: Collection[str]) -> Recovery:
    """The next step of an unfinished `job`, given the backends enabled now."""
    if job.backend not in backends:
        return Recovery.ORPHANED
    if job.state == models.JobState.QUEUED and job.launching:
        return Recovery.SETTLE
    if job.state == models.JobState.QUEUED:
        return Recovery.ENQUEUE if job.stop_reason is None else Recovery.STOP
    if arrays.expands(job):
        return Recovery.ARRAY
    return Recovery.TRACK
