"""`engine.tracking`: what an observation means for a job (`judge`), when its timeout expires
(`deadline`, `overdue`), and when a job its backend does not know is looked for
(`look_up_missing`)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import models
from orchestrator.backends.base import Observation
from orchestrator.engine.tracking import (
    Judgement,
    Tracked,
    Verdict,
    deadline,
    judge,
    look_up_missing,
    overdue,
)
from tests.unit.engine.support import CREATED_AT, make_job

S = models.JobState
ACTIVE = sorted(models.ACTIVE, key=list(S).index)
TERMINAL = sorted(models.TERMINAL, key=list(S).index)
STOPS: list[models.StopReason] = ["cancel", "timeout", "queue_timeout"]


def _obs(state: models.JobState | None, **fields: Any) -> Observation:
    return Observation("ext-job-1", state, **fields)


# -- judge: what is new ---------------------------------------------------------------------------


def test_a_job_the_backend_does_not_know_is_missing() -> None:
    assert judge(make_job(S.RUNNING), _obs(None), None) == Judgement(Verdict.MISSING)
    assert judge(make_job(S.RUNNING), _obs(None), "cancel").verdict is Verdict.MISSING


@pytest.mark.parametrize("state", ACTIVE)
def test_the_same_state_is_unchanged(state: models.JobState) -> None:
    job = make_job(state, vendor_status="same")
    assert judge(job, _obs(state, vendor_status="same"), None) == Judgement(Verdict.UNCHANGED)


def test_the_same_state_with_a_new_vendor_status_is_unchanged_but_says_so() -> None:
    job = make_job(S.RUNNING, vendor_status="RUNNING")
    judgement = judge(job, _obs(S.RUNNING, vendor_status="RUNNING (healthy)"), None)
    assert judgement == Judgement(Verdict.UNCHANGED, vendor_changed=True)


@pytest.mark.parametrize(
    ("recorded", "seen"),
    [(old, new) for old in ACTIVE for new in ACTIVE if ACTIVE.index(new) < ACTIVE.index(old)],
)
def test_an_earlier_state_is_unchanged_never_a_step_back(
    recorded: models.JobState, seen: models.JobState
) -> None:
    job = make_job(recorded, vendor_status=recorded.value)
    judgement = judge(job, _obs(seen, vendor_status=recorded.value), None)
    assert judgement == Judgement(Verdict.UNCHANGED, vendor_changed=False)
    moved = judge(job, _obs(seen, vendor_status=seen.value), None)
    assert moved == Judgement(Verdict.UNCHANGED, vendor_changed=True)


@pytest.mark.parametrize(
    ("recorded", "seen"),
    [(S.SUBMITTED, S.RUNNABLE), (S.RUNNABLE, S.RUNNING), (S.SUBMITTED, S.RUNNING)]
    + [(S.RUNNING, end) for end in TERMINAL]
    + [(S.SUBMITTED, end) for end in TERMINAL],
)
def test_a_new_state_is_a_transition_with_the_observations_reason(
    recorded: models.JobState, seen: models.JobState
) -> None:
    job = make_job(recorded, reason="old reason")
    judgement = judge(job, _obs(seen, reason="what the vendor says"), None)
    failure = "lost" if seen is S.LOST else None  # no exit code, no class from the backend
    assert judgement == Judgement(Verdict.TRANSITION, seen, "what the vendor says", failure=failure)


# -- judge: the failure class of an end ------------------------------------------------------------


@pytest.mark.parametrize(
    ("seen", "exit_code", "said", "failure"),
    [
        (S.SUCCEEDED, 0, None, None),  # a success has none
        (S.FAILED, 3, None, "user"),  # the job's own non-zero exit
        (S.FAILED, None, None, None),  # nothing tells: unclassified
        (S.FAILED, 137, "infrastructure", "infrastructure"),  # the backend's class wins
        (S.FAILED, None, "start", "start"),
        (S.LOST, None, None, "lost"),
    ],
)
def test_an_end_carries_the_failure_class_the_backend_or_the_exit_code_tells(
    seen: models.JobState, exit_code: int | None, said: str | None, failure: str | None
) -> None:
    obs = Observation("x", seen, exit_code=exit_code, failure=said)
    assert judge(make_job(S.RUNNING), obs, None).failure == failure


@pytest.mark.parametrize(
    ("why", "failure"),
    [("cancel", "cancelled"), ("timeout", "timeout"), ("queue_timeout", "timeout")],
)
def test_a_job_we_stopped_fails_with_the_class_of_the_stop(
    why: models.StopReason, failure: str
) -> None:
    obs = Observation("x", S.FAILED, exit_code=143, failure="user")
    assert judge(make_job(S.RUNNING, stop_reason=why), obs, why).failure == failure


# -- judge: the end of a job we stopped -----------------------------------------------------------


@pytest.mark.parametrize("recorded", ACTIVE)
@pytest.mark.parametrize("seen", [S.FAILED, S.CANCELLED, S.LOST])
def test_a_cancelled_job_that_ends_otherwise_than_succeeded_is_cancelled_by_request(
    recorded: models.JobState, seen: models.JobState
) -> None:
    job = make_job(recorded, vendor_status="X", reason="y")
    judgement = judge(job, _obs(seen, reason="Task stopped by user"), "cancel")
    assert judgement == Judgement(
        Verdict.TRANSITION, S.CANCELLED, "cancelled by request", failure="cancelled"
    )


def test_the_stop_judged_by_is_the_one_passed_not_only_the_recorded_one() -> None:
    job = make_job(S.RUNNING)  # the store could not record the cancel
    judgement = judge(job, _obs(S.FAILED), "cancel")
    assert judgement == Judgement(
        Verdict.TRANSITION, S.CANCELLED, "cancelled by request", failure="cancelled"
    )


def test_a_job_stopped_by_timeout_fails_with_its_timeout_and_last_vendor_status() -> None:
    job = make_job(
        S.RUNNING,
        running_since=2_000.0,
        timeout_s=30,
        vendor_status="RUNNING",
        reason="Task started",
        stop_reason="timeout",
    )
    judgement = judge(job, _obs(S.FAILED, reason="Essential container exited"), "timeout")
    assert judgement == Judgement(
        Verdict.TRANSITION,
        S.FAILED,
        "timeout: ran longer than timeout_s=30.0 (last status: RUNNING: Task started)",
        failure="timeout",
    )


def test_a_timeout_with_no_vendor_status_has_no_last_status() -> None:
    job = make_job(S.RUNNING, running_since=2_000.0, timeout_s=30)
    judgement = judge(job, _obs(S.CANCELLED), "timeout")
    assert judgement == Judgement(
        Verdict.TRANSITION, S.FAILED, "timeout: ran longer than timeout_s=30.0", failure="timeout"
    )


def test_a_job_stopped_by_queue_timeout_fails_with_its_queue_timeout() -> None:
    job = make_job(S.RUNNABLE, queue_timeout_s=5, vendor_status="RUNNABLE")
    judgement = judge(job, _obs(S.FAILED), "queue_timeout")
    assert judgement == Judgement(
        Verdict.TRANSITION,
        S.FAILED,
        "queue_timeout: not running after queue_timeout_s=5.0 (last status: RUNNABLE)",
        failure="timeout",
    )


@pytest.mark.parametrize("why", STOPS)
def test_a_stopped_job_that_succeeded_anyway_succeeded(why: models.StopReason) -> None:
    job = make_job(S.RUNNING, running_since=2_000.0, timeout_s=30, queue_timeout_s=5)
    judgement = judge(job, _obs(S.SUCCEEDED, reason="exited 0"), why)
    assert judgement == Judgement(Verdict.TRANSITION, S.SUCCEEDED, "exited 0")


@pytest.mark.parametrize("why", STOPS)
def test_a_stopped_job_moving_on_without_ending_is_a_plain_transition(
    why: models.StopReason,
) -> None:
    judgement = judge(make_job(S.RUNNABLE), _obs(S.RUNNING, reason="started"), why)
    assert judgement == Judgement(Verdict.TRANSITION, S.RUNNING, "started")


# A job accepted at CREATED_AT with queue_timeout_s=5: its queue deadline is CREATED_AT + 5.
QUEUE_DEADLINE = CREATED_AT + 5.0


def _queue_timed_out() -> models.Job:
    return make_job(S.RUNNABLE, queue_timeout_s=5, stop_reason="queue_timeout")


@pytest.mark.parametrize("started_at", [CREATED_AT, QUEUE_DEADLINE - 0.001, int(CREATED_AT) + 1])
def test_a_queue_timeout_of_a_job_that_had_started_in_time_keeps_its_own_end(
    started_at: float,
) -> None:
    obs = _obs(S.FAILED, reason="exited 3", info={"started_at": started_at})
    judgement = judge(_queue_timed_out(), obs, "queue_timeout")
    assert judgement == Judgement(Verdict.TRANSITION, S.FAILED, "exited 3")


@pytest.mark.parametrize("started_at", [QUEUE_DEADLINE, QUEUE_DEADLINE + 10.0])
def test_a_queue_timeout_of_a_job_that_started_late_ends_as_the_queue_timeout(
    started_at: float,
) -> None:
    obs = _obs(S.FAILED, reason="exited 3", info={"started_at": started_at})
    judgement = judge(_queue_timed_out(), obs, "queue_timeout")
    assert judgement.state is S.FAILED
    assert judgement.reason == "queue_timeout: not running after queue_timeout_s=5.0"


@pytest.mark.parametrize("info", [{}, {"started_at": "yesterday"}, {"started_at": None}])
def test_a_queue_timeout_without_a_start_time_ends_as_the_queue_timeout(
    info: dict[str, Any],
) -> None:
    judgement = judge(_queue_timed_out(), _obs(S.FAILED, info=info), "queue_timeout")
    assert judgement.reason == "queue_timeout: not running after queue_timeout_s=5.0"


@pytest.mark.parametrize("why", ["cancel", "timeout"])
def test_a_start_time_only_excuses_a_queue_timeout(why: models.StopReason) -> None:
    job = make_job(S.RUNNABLE, queue_timeout_s=5, timeout_s=30)
    obs = _obs(S.FAILED, reason="exited 3", info={"started_at": CREATED_AT})
    assert judge(job, obs, why).reason != "exited 3"


# -- deadline, overdue ----------------------------------------------------------------------------


def test_a_running_jobs_deadline_is_its_timeout_from_entering_running() -> None:
    job = make_job(S.RUNNING, running_since=2_000.0, timeout_s=30, queue_timeout_s=5)
    assert deadline(job) == 2_030.0


def test_a_running_job_without_a_timeout_has_no_deadline_whatever_its_queue_timeout() -> None:
    assert deadline(make_job(S.RUNNING, running_since=2_000.0, queue_timeout_s=5)) is None


@pytest.mark.parametrize("state", [S.QUEUED, S.SUBMITTED, S.PENDING, S.RUNNABLE, S.STARTING])
def test_a_job_not_yet_running_has_its_queue_timeout_from_acceptance(
    state: models.JobState,
) -> None:
    job = make_job(state, created_at=1_000.0, queue_timeout_s=5, timeout_s=30)
    assert deadline(job) == 1_005.0


def test_a_job_not_yet_running_without_a_queue_timeout_has_no_deadline() -> None:
    assert deadline(make_job(S.RUNNABLE, timeout_s=30)) is None


def test_a_job_with_no_timeouts_has_no_deadline_and_is_never_overdue() -> None:
    assert deadline(make_job(S.RUNNABLE)) is None
    assert deadline(make_job(S.RUNNING, running_since=2_000.0)) is None
    assert overdue(make_job(S.RUNNING, running_since=2_000.0), 1e12, None) is None


def test_a_running_job_is_overdue_for_a_timeout_from_its_deadline_on() -> None:
    job = make_job(S.RUNNING, running_since=2_000.0, timeout_s=30, queue_timeout_s=5)
    assert overdue(job, 2_029.999, None) is None
    assert overdue(job, 2_030.0, None) == "timeout"
    assert overdue(job, 9_999.0, None) == "timeout"


def test_a_job_not_yet_running_is_overdue_for_a_queue_timeout_from_its_deadline_on() -> None:
    job = make_job(S.RUNNABLE, created_at=1_000.0, queue_timeout_s=5, timeout_s=30)
    assert overdue(job, 1_004.999, None) is None
    assert overdue(job, 1_005.0, None) == "queue_timeout"


@pytest.mark.parametrize("why", STOPS)
def test_a_job_already_being_stopped_is_never_overdue(why: models.StopReason) -> None:
    running = make_job(S.RUNNING, running_since=2_000.0, timeout_s=30)
    queued = make_job(S.RUNNABLE, queue_timeout_s=5)
    assert overdue(running, 9_999.0, why) is None
    assert overdue(queued, 9_999.0, why) is None


# -- look_up_missing ------------------------------------------------------------------------------


def _tracked() -> Tracked:
    return Tracked(make_job(S.RUNNING), ("local", "default"))


def test_a_job_first_found_missing_starts_the_clock_and_is_not_looked_for_yet() -> None:
    entry = _tracked()
    assert look_up_missing(entry, 100.0, 60.0) is False
    assert entry.missing_since == 100.0
    assert look_up_missing(entry, 159.999, 60.0) is False
    assert entry.missing_since == 100.0  # counted from the first time


def test_a_job_missing_for_its_grace_is_looked_for() -> None:
    entry = _tracked()
    look_up_missing(entry, 100.0, 60.0)
    assert look_up_missing(entry, 160.0, 60.0) is True
    assert look_up_missing(entry, 500.0, 60.0) is True


def test_with_no_grace_a_missing_job_is_looked_for_at_once() -> None:
    entry = _tracked()
    assert look_up_missing(entry, 100.0, 0.0) is True
    assert entry.missing_since == 100.0


def test_a_queue_timeout_is_judged_against_the_queue_deadline_even_once_running() -> None:
    """The stop was issued before the job was seen running; by the time it ends it has a run
    deadline too, which must not be the one its start is compared with."""
    before = make_job(
        S.RUNNING,
        queue_timeout_s=10,
        running_since=CREATED_AT + 11,
        stop_reason="queue_timeout",
    )
    started_early = Observation("x", S.FAILED, reason="exited 3", info={"started_at": 1009.0})
    assert judge(before, started_early, "queue_timeout").reason == "exited 3"
    after = make_job(
        S.RUNNING,
        queue_timeout_s=10,
        timeout_s=100,
        running_since=CREATED_AT + 50,
        stop_reason="queue_timeout",
    )
    started_late = Observation("x", S.FAILED, reason="exited 3", info={"started_at": 1050.0})
    judged = judge(after, started_late, "queue_timeout")
    assert judged.reason is not None
    assert judged.reason.startswith("queue_timeout:")
