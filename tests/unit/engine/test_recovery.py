"""What a restarted daemon does with each unfinished job: every state, launching or not, with a
stop recorded or not, its backend enabled or not."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator import models
from orchestrator.engine.recovery import Recovery, recover
from tests.unit.engine.support import make_job

S = models.JobState
UNFINISHED = [state for state in S if not state.terminal]


def queued(*, launching: bool, stop: models.StopReason | None = None) -> models.Job:
    job = make_job(S.QUEUED, stop_reason=stop)
    return dataclasses.replace(job, attempt=1 if launching else 0, launching=launching)


def test_a_job_whose_backend_is_not_enabled_now_is_left_as_it_is() -> None:
    assert recover(queued(launching=False), backends={"ecs"}) is Recovery.ORPHANED
    assert recover(make_job(S.RUNNING), backends=set()) is Recovery.ORPHANED


def test_an_attempt_cut_short_while_launching_is_settled_stop_or_not() -> None:
    assert recover(queued(launching=True), {"local"}) is Recovery.SETTLE
    assert recover(queued(launching=True, stop="cancel"), {"local"}) is Recovery.SETTLE


def test_a_queued_job_goes_back_to_its_lane_unless_a_stop_was_recorded() -> None:
    assert recover(queued(launching=False), {"local"}) is Recovery.ENQUEUE
    for why in ("cancel", "timeout", "queue_timeout"):
        assert recover(queued(launching=False, stop=why), {"local"}) is Recovery.STOP


@pytest.mark.parametrize("state", [state for state in UNFINISHED if state is not S.QUEUED])
def test_a_launched_job_is_tracked_whatever_its_state(state: models.JobState) -> None:
    assert recover(make_job(state), {"local"}) is Recovery.TRACK
    assert recover(make_job(state, stop_reason="cancel"), {"local"}) is Recovery.TRACK
