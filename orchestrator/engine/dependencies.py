"""Whether a job that depends on others may start, must wait, or can never start.

`after = "success"`: every job it depends on must have SUCCEEDED; one that ended otherwise
(FAILED, CANCELLED, LOST, or purged so that its end is no longer known) means it never will,
and it ends CANCELLED with failure class `dependency` — and so, in turn, do the jobs that depend
on it. `after = "finished"`: every one must have ended, however.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator import models


@dataclass(frozen=True, slots=True)
class Verdict:
    waiting_for: int = 0  # jobs not yet ended: wait
    blocked_by: str | None = None  # the job whose end means this one never starts
    reason: str | None = None  # what the job says meanwhile, or why it ended


def verdict(job: models.Job, found: Mapping[str, models.Job | None]) -> Verdict:
    """`found`: each job `job` depends on, as read now (None: no longer in the store)."""
    wanted = job.spec.depends_on
    for dep in wanted:
        other = found.get(dep)
        if job.spec.after == "success" and other is None:
            return Verdict(blocked_by=dep, reason=f"dependency {dep} is no longer known")
        if (
            job.spec.after == "success"
            and other is not None
            and other.state.terminal
            and other.state != models.JobState.SUCCEEDED
        ):
            why = f": {other.reason}" if other.reason else ""
            return Verdict(
                blocked_by=dep, reason=f"dependency {dep} ended {other.state.value}{why}"
            )
    open_ = [
        dep for dep in wanted if (other := found.get(dep)) is not None and not other.state.terminal
    ]
    if open_:
        return Verdict(
            waiting_for=len(open_),
            reason=f"waiting for {len(open_)} of {len(wanted)} dependencies ({', '.join(open_[:3])}"
            + (", …)" if len(open_) > 3 else ")"),
        )
    return Verdict()
