"""Array jobs (`array_size`): a parent and its children, and how the parent's state follows
theirs. Pure: no I/O.

- **Batch** runs an array itself: one `SubmitJob` with `arrayProperties`, tracked through the
  parent, whose `statusSummary` the backend keeps in `info["array_status"]`; child `i` is Batch's
  `<job id>:<i>`, described on demand.
- **ECS and local** have no arrays: once the parent may start (its dependencies allow it), the
  store expands it (`Store.expand`) into children `<parent id>:<i>` — each a job of its own,
  dispatched, retried and tracked like any other — and the parent, SUBMITTED, follows them:
  RUNNING once one runs, and when all have ended SUCCEEDED if all succeeded, CANCELLED if it
  was cancelled, else FAILED with the first failed child's class (`verdict`).

Every child is told its index in `ORCHESTRATOR_ARRAY_INDEX` and `AWS_BATCH_JOB_ARRAY_INDEX`
(Batch sets the latter itself, on Batch only that one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator import models

S = models.JobState
INDEX_VARIABLES = ("ORCHESTRATOR_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX")
NATIVE = frozenset({"batch"})  # backends that run an array themselves
SEPARATOR = ":"


def expands(job: models.Job) -> bool:
    """Whether the daemon expands this job into children (an array on ECS or local)."""
    return job.spec.array_size is not None and job.backend not in NATIVE


def child_id(parent_id: str, index: int) -> str:
    return f"{parent_id}{SEPARATOR}{index}"


def split(job_id: str) -> tuple[str, int] | None:
    """(parent id, index) of a child's id (`<parent>:<index>`, the index in ASCII digits as
    written for it: `P:00003` and `P:٣` are not child 3); None for any other id."""
    parent, sep, index = job_id.partition(SEPARATOR)
    if not sep or not parent or not (index.isascii() and index.isdigit()) or len(index) > 5:
        return None
    if index != str(int(index)):
        return None
    return parent, int(index)


def child_specs(spec: models.JobSpec) -> list[models.JobSpec]:
    """The children of an array job: its spec once per index, with the index in the
    environment; not an array, no dependencies (the parent waited for them), no name or key
    (their ids name them)."""
    assert spec.array_size is not None
    base = spec.model_dump(exclude_defaults=True)
    for key in ("array_size", "depends_on", "after", "name", "idempotency_key"):
        base.pop(key, None)
    return [
        models.JobSpec.model_validate(
            {**base, "env": {**spec.env, **dict.fromkeys(INDEX_VARIABLES, str(index))}}
        )
        for index in range(spec.array_size)
    ]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the parent's state becomes now (None: stays as it is)."""

    state: models.JobState | None
    reason: str | None = None
    failure: str | None = None


def progress(counts: Mapping[str, int], size: int) -> str:
    """A parent's progress from its children's counts by state: `37/100 succeeded, 2 failed`
    (Batch's statusSummary has the same keys)."""
    parts = [f"{counts.get(S.SUCCEEDED.value, 0)}/{size} succeeded"]
    parts += [
        f"{counts[s.value]} {s.value.lower()}"
        for s in (S.FAILED, S.CANCELLED, S.LOST)
        if counts.get(s.value, 0)
    ]
    if running := counts.get(S.RUNNING.value, 0):
        parts.append(f"{running} running")
    return ", ".join(parts)


def verdict(
    parent: models.Job, counts: Mapping[str, int], first_failed: models.Job | None = None
) -> Verdict:
    """The parent's next state from its children's counts by state, and the first child that
    ended otherwise than SUCCEEDED (if one did)."""
    size = parent.spec.array_size or 0
    ended = sum(counts.get(state.value, 0) for state in models.TERMINAL)
    if ended < size:
        if parent.state == S.SUBMITTED and any(
            counts.get(s.value, 0) for s in (S.STARTING, S.RUNNING, *models.TERMINAL)
        ):
            return Verdict(S.RUNNING)
        return Verdict(None)
    summary = progress(counts, size)
    if counts.get(S.SUCCEEDED.value, 0) == size:
        return Verdict(S.SUCCEEDED, summary)
    if parent.stop_reason is not None:
        return Verdict(S.CANCELLED, f"stopped ({parent.stop_reason}): {summary}", "cancelled")
    failure = None if first_failed is None else first_failed.failure
    reason = summary
    if first_failed is not None:
        reason += f"; first: {first_failed.id} {first_failed.state.value}"
        if first_failed.reason:
            reason += f" ({first_failed.reason})"
    return Verdict(S.FAILED, reason, failure or "user")
