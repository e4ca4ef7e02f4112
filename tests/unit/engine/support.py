"""Builders shared by the engine's unit tests: jobs at a chosen state and time, a wake counter."""

from __future__ import annotations

from typing import Any

from orchestrator import models

S = models.JobState

CREATED_AT = 1_000.0


def make_job(
    state: models.JobState = S.SUBMITTED,
    *,
    job_id: str = "job-1",
    created_at: float = CREATED_AT,
    running_since: float | None = None,
    timeout_s: float | None = None,
    queue_timeout_s: float | None = None,
    stop_reason: models.StopReason | None = None,
    vendor_status: str | None = None,
    reason: str | None = None,
    backend: str = "local",
) -> models.Job:
    """A job in `state`, accepted at `created_at`, RUNNING since `running_since` if given."""
    state_times = {S.QUEUED.value: created_at}
    if state is not S.QUEUED:
        state_times[S.SUBMITTED.value] = created_at + 1.0
    if running_since is not None:
        state_times[S.RUNNING.value] = running_since
    fields: dict[str, Any] = {
        "id": job_id,
        "spec": models.JobSpec(
            command=["true"], timeout_s=timeout_s, queue_timeout_s=queue_timeout_s
        ),
        "backend": backend,
        "state": state,
        "created_at": created_at,
        "updated_at": created_at,
        "state_times": state_times,
        "attempt": 0 if state is S.QUEUED else 1,
        "external_id": None if state is S.QUEUED else f"ext-{job_id}",
        "stop_reason": stop_reason,
        "vendor_status": vendor_status,
        "reason": reason,
    }
    return models.Job(**fields)


class WakeCounter:
    """A `wake` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1

    def take(self) -> int:
        """The calls so far, counting afresh from now."""
        calls, self.calls = self.calls, 0
        return calls
