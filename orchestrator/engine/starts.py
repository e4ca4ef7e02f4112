"""What follows a launch: a start that failed is retried or final; an attempt whose outcome is
unknown (a crash, a timeout, a 5xx) is settled by what the backend can find, never by a guess."""

from __future__ import annotations

import enum

from orchestrator.backends.base import Located


def retry_start(
    *, retryable: bool, attempt: int, max_attempts: int, elapsed_s: float, budget_s: float
) -> bool:
    """Whether a start that failed is tried again: the backend says it may be, and neither the
    attempts nor the wall-clock budget (since the job was accepted) are spent."""
    return retryable and attempt < max_attempts and elapsed_s < budget_s


class Settlement(enum.Enum):
    ADOPT = "adopted"  # it launched this: track it
    REQUEUE = "requeued"  # provably launched nothing: a new attempt (or the stop asked for)
    RESUBMIT = "resubmitted"  # the same attempt again, under the same token: idempotent
    LOOK_AGAIN = "look_again"  # cannot tell yet: look again after a back-off
    # Cannot tell, and no way left to find out: the looks at a resubmittable attempt are spent
    # (each resubmission is a look), or the start budget of one that is not.
    LOST = "lost"


def settle(
    located: Located,
    *,
    can_resubmit: bool,
    tries: int,
    max_attempts: int,
    since_attempt_s: float,
    budget_s: float,
) -> Settlement:
    """How to settle an attempt recorded as launching whose outcome is unknown, from what the
    backend found (`located`), whether submitting again is idempotent now, how many looks at
    this attempt were made (this one included) and how long ago the attempt began."""
    if located.external_id is not None:
        return Settlement.ADOPT
    if located.launched is False:
        return Settlement.REQUEUE
    if can_resubmit and tries <= max_attempts:
        return Settlement.RESUBMIT
    if not can_resubmit and since_attempt_s < budget_s:
        return Settlement.LOOK_AGAIN
    return Settlement.LOST
