"""The retry policy as pure decisions: which failures are followed by another attempt, when,
what the job says meanwhile, and how each attempt's queue deadline is counted."""

from __future__ import annotations

import dataclasses
import random

import pytest

from orchestrator import models, settings
from orchestrator.engine import lanes, retries, tracking
from tests.unit.engine.support import CREATED_AT, S, make_job


def policy(**given: object) -> retries.Policy:
    job = dataclasses.replace(
        make_job(), spec=models.JobSpec(command=["true"], retry=models.Retry.model_validate(given))
    )
    return retries.policy_of(job)


class Fixed:
    """An rng whose draws are always the top of the range (or the bottom)."""

    def __init__(self, top: bool) -> None:
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


# -- the policy of a job -------------------------------------------------------------------------


def test_a_job_without_a_policy_has_the_built_in_one_and_a_partial_one_is_completed() -> None:
    assert settings.RetrySettings().policy() == models.DEFAULT_RETRY  # one default, one place
    assert retries.policy_of(make_job()) == retries.Policy(
        3, frozenset({"start", "infrastructure"}), frozenset(), 10.0
    )
    assert policy(attempts=5, exit_codes=[75, 3]) == retries.Policy(
        5, frozenset({"start", "infrastructure"}), frozenset({3, 75}), 10.0
    )
    assert policy(on=[]) == retries.Policy(3, frozenset(), frozenset(), 10.0)  # none by class


@pytest.mark.parametrize(
    ("failure", "exit_code", "expected"),
    [
        ("start", None, True),
        ("infrastructure", 137, True),
        ("user", 3, False),  # not listed
        ("user", 75, True),  # listed
        ("user", None, False),
        ("rejected", None, False),
        ("timeout", 75, False),  # the exit code of a stop of ours lists nothing
        ("cancelled", 75, False),
        ("lost", None, False),
    ],
)
def test_which_failures_are_retried(failure: str, exit_code: int | None, expected: bool) -> None:
    chosen = policy(exit_codes=[75])
    assert retries.retried(chosen, failure=failure, exit_code=exit_code, attempt=1) is expected


def test_a_listed_exit_code_of_another_class_is_that_classes_affair() -> None:
    # 137 of an OOM kill is `infrastructure`: listing 137 does not retry it when `on` omits it.
    chosen = policy(on=[], exit_codes=[137])
    assert not retries.retried(chosen, failure="infrastructure", exit_code=137, attempt=1)
    assert retries.retried(chosen, failure="user", exit_code=137, attempt=1)


def test_attempts_count_every_attempt_the_first_included() -> None:
    chosen = policy(attempts=3)
    outcomes = [
        retries.retried(chosen, failure="start", exit_code=None, attempt=n) for n in (1, 2, 3, 4)
    ]
    assert outcomes == [True, True, False, False]
    assert not retries.retried(policy(attempts=1), failure="start", exit_code=None, attempt=1)


def test_the_wait_doubles_is_jittered_by_half_and_capped() -> None:
    chosen = policy(backoff_s=10.0)
    highs = [retries.delay(chosen, n, Fixed(top=True)) for n in (1, 2, 3)]
    lows = [retries.delay(chosen, n, Fixed(top=False)) for n in (1, 2, 3)]
    assert highs == [10.0, 20.0, 40.0]
    assert lows == [5.0, 10.0, 20.0]
    assert retries.delay(chosen, 99, Fixed(top=True)) == models.MAX_BACKOFF_S
    assert retries.delay(policy(backoff_s=0), 5, Fixed(top=True)) == 0.0
    rng = random.Random(7)
    spread = {round(retries.delay(chosen, 1, rng), 6) for _ in range(50)}
    assert len(spread) > 40  # jobs failed together return apart
    assert all(5.0 <= d <= 10.0 for d in spread)


def test_what_the_job_says_while_it_waits() -> None:
    previous = retries.Previous(2, "infrastructure", "SpotInterruption: interrupted", 143)
    assert retries.reason(previous, 3, 12.4) == (
        "attempt 2 failed (infrastructure: SpotInterruption: interrupted); attempt 3 of 3 in 12s"
    )
    assert retries.reason(retries.Previous(1, "start", None, None), 2, 0) == (
        "attempt 1 failed (start); attempt 2 of 2 in 0s"
    )
    assert previous.to_info() == {
        "attempt": 2,
        "failure": "infrastructure",
        "reason": "SpotInterruption: interrupted",
        "exit_code": 143,
    }


# -- deadlines of a retried job ------------------------------------------------------------------


def test_each_attempt_waits_its_own_queue_time_from_when_it_is_due() -> None:
    first = make_job(S.QUEUED, queue_timeout_s=30.0)
    assert tracking.queue_deadline(first) == CREATED_AT + 30.0
    retried = dataclasses.replace(first, info={"retry": {"at": CREATED_AT + 500.0}})
    assert tracking.queue_deadline(retried) == CREATED_AT + 530.0
    assert tracking.deadline(retried) == CREATED_AT + 530.0
    assert tracking.queue_deadline(make_job(S.QUEUED)) is None  # no queue timeout


def test_run_time_is_each_attempts_own() -> None:
    job = make_job(S.RUNNING, running_since=CREATED_AT + 900.0, timeout_s=60.0)
    assert tracking.deadline(job) == CREATED_AT + 960.0


# -- the lane --------------------------------------------------------------------------------------


def test_a_requeued_job_frees_its_slot_and_launches_when_due() -> None:
    lane = lanes.Lane("local", 1, max_attempts=5, budget_s=60.0)
    lane.enqueue("a")
    lane.enqueue("b")
    assert lane.due(0.0) == [lanes.Launch("a")]
    lane.requeue_at("a", 10.0)
    assert lane.due(1.0) == [lanes.Launch("b")]  # its slot went to the next job at once
    lane.ended("b")
    assert lane.due(5.0) == []  # not before its time
    assert lane.due(10.0) == [lanes.Launch("a")]
    assert (lane.in_flight, lane.queued) == (1, 0)


def test_a_requeued_job_past_its_new_queue_deadline_is_expired_not_launched() -> None:
    lane = lanes.Lane("local", 1, max_attempts=5, budget_s=60.0)
    lane.enqueue("a")
    lane.due(0.0)
    lane.requeue_at("a", 10.0, queue_deadline=8.0)
    assert lane.due(9.0) == [lanes.Expire("a")]
    assert lane.due(10.0) == []


def test_a_requeued_job_that_ends_while_it_waits_is_never_launched() -> None:
    lane = lanes.Lane("local", 1, max_attempts=5, budget_s=60.0)
    lane.enqueue("a")
    lane.due(0.0)
    lane.requeue_at("a", 10.0)
    lane.ended("a")  # cancelled while waiting
    assert lane.due(11.0) == []
    assert (lane.in_flight, lane.queued) == (0, 0)
