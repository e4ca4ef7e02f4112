"""`engine.starts`: whether a start that failed is retried, and how an attempt whose outcome is
unknown is settled."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.backends.base import Located
from orchestrator.engine.starts import Settlement, retry_start, settle

MAX_ATTEMPTS = 3
BUDGET_S = 60.0


def _retry(**changes: Any) -> bool:
    fields: dict[str, Any] = {
        "retryable": True,
        "attempt": 1,
        "max_attempts": MAX_ATTEMPTS,
        "elapsed_s": 0.0,
        "budget_s": BUDGET_S,
    }
    fields.update(changes)
    return retry_start(**fields)


# -- retry_start ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "elapsed_s"), [(1, 0.0), (MAX_ATTEMPTS - 1, 0.0), (1, BUDGET_S - 0.001)]
)
def test_a_retryable_start_failure_within_attempts_and_budget_is_retried(
    attempt: int, elapsed_s: float
) -> None:
    assert _retry(attempt=attempt, elapsed_s=elapsed_s) is True


def test_a_start_failure_the_backend_calls_final_is_never_retried() -> None:
    assert _retry(retryable=False) is False


@pytest.mark.parametrize("attempt", [MAX_ATTEMPTS, MAX_ATTEMPTS + 1])
def test_a_start_failure_with_the_attempts_spent_is_final(attempt: int) -> None:
    assert _retry(attempt=attempt) is False


@pytest.mark.parametrize("elapsed_s", [BUDGET_S, BUDGET_S + 1.0])
def test_a_start_failure_with_the_budget_spent_is_final(elapsed_s: float) -> None:
    assert _retry(elapsed_s=elapsed_s) is False


# -- settle ---------------------------------------------------------------------------------------

UNKNOWN = Located(external_id=None, launched=None)
LAUNCHED_UNFOUND = Located(external_id=None, launched=True)


def _settle(located: Located, **changes: Any) -> Settlement:
    fields: dict[str, Any] = {
        "can_resubmit": False,
        "tries": 1,
        "max_attempts": MAX_ATTEMPTS,
        "since_attempt_s": 0.0,
        "budget_s": BUDGET_S,
    }
    fields.update(changes)
    return settle(located, **fields)


@pytest.mark.parametrize("launched", [True, None, False])
@pytest.mark.parametrize("can_resubmit", [True, False])
def test_an_attempt_whose_task_is_found_is_adopted_whatever_else_holds(
    launched: bool | None, can_resubmit: bool
) -> None:
    found = Located(external_id="task-1", launched=launched)
    spent = {"tries": MAX_ATTEMPTS + 5, "since_attempt_s": BUDGET_S * 10}
    assert _settle(found, can_resubmit=can_resubmit, **spent) is Settlement.ADOPT


@pytest.mark.parametrize("can_resubmit", [True, False])
def test_an_attempt_that_provably_launched_nothing_is_requeued_even_past_the_limits(
    can_resubmit: bool,
) -> None:
    nothing = Located(external_id=None, launched=False)
    spent = {"tries": MAX_ATTEMPTS + 5, "since_attempt_s": BUDGET_S * 10}
    assert _settle(nothing, can_resubmit=can_resubmit, **spent) is Settlement.REQUEUE


@pytest.mark.parametrize("located", [UNKNOWN, LAUNCHED_UNFOUND], ids=["unknown", "launched"])
@pytest.mark.parametrize("tries", [1, MAX_ATTEMPTS])
def test_an_unknown_outcome_is_resubmitted_while_idempotent_and_tries_last(
    located: Located, tries: int
) -> None:
    assert _settle(located, can_resubmit=True, tries=tries) is Settlement.RESUBMIT


def test_resubmission_is_bounded_by_tries_not_by_the_time_since_the_attempt() -> None:
    late = {"tries": MAX_ATTEMPTS, "since_attempt_s": BUDGET_S * 10}
    assert _settle(UNKNOWN, can_resubmit=True, **late) is Settlement.RESUBMIT


@pytest.mark.parametrize("since_attempt_s", [0.0, BUDGET_S - 0.001])
def test_an_unknown_outcome_not_resubmittable_is_looked_at_again_within_the_budget(
    since_attempt_s: float,
) -> None:
    many_tries = MAX_ATTEMPTS + 5  # looks are bounded by time, not by count
    settlement = _settle(UNKNOWN, since_attempt_s=since_attempt_s, tries=many_tries)
    assert settlement is Settlement.LOOK_AGAIN


@pytest.mark.parametrize("since_attempt_s", [BUDGET_S, BUDGET_S + 1.0])
def test_an_unknown_outcome_not_resubmittable_is_lost_once_the_budget_is_spent(
    since_attempt_s: float,
) -> None:
    assert _settle(UNKNOWN, since_attempt_s=since_attempt_s) is Settlement.LOST
    assert _settle(LAUNCHED_UNFOUND, since_attempt_s=since_attempt_s) is Settlement.LOST


@pytest.mark.parametrize("since_attempt_s", [0.0, BUDGET_S + 1.0])
def test_a_resubmittable_unknown_outcome_past_its_tries_is_lost_whatever_the_time(
    since_attempt_s: float,
) -> None:
    # Past max tries a resubmittable job is not looked at again, even within the budget.
    past = {"tries": MAX_ATTEMPTS + 1, "since_attempt_s": since_attempt_s}
    assert _settle(UNKNOWN, can_resubmit=True, **past) is Settlement.LOST
