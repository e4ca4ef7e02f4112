"""Whether an attempt that failed is followed by another, when, and what the job says meanwhile.

A job's retry policy (`models.Retry`, filled in with the daemon's defaults when the job was
accepted) is applied to the failure class of its attempt's end (`failures.py`): `start` and
`infrastructure` are retried when the policy names them in `on`; `user` only for the exit codes
it lists; `rejected`, `timeout`, `cancelled` and `lost` never — AWS refused the request, the
job ran out its time, someone stopped it, or nobody can tell whether it ran. A job gets at
most `attempts` attempts in all, whatever ended each, and a job asked to stop gets none more.

A retry is a new attempt with its own token (`Store.retry` sends the job back to QUEUED,
`begin_attempt` numbers the next), so exactly-once per attempt holds as for the first.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import backoff, models


@dataclass(frozen=True, slots=True)
class Previous:
    """The attempt that failed, as the job shows it while the next one waits and runs."""

    attempt: int
    failure: str
    reason: str | None
    exit_code: int | None

    def to_info(self) -> dict[str, object]:
        return {
            "attempt": self.attempt,
            "failure": self.failure,
            "reason": self.reason,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True, slots=True)
class Policy:
    """A complete retry policy (`models.Retry` with every field given)."""

    attempts: int
    on: frozenset[str]
    exit_codes: frozenset[int]
    backoff_s: float


def policy_of(job: models.Job) -> Policy:
    """The job's policy: its own (the daemon's defaults were filled in when it was accepted),
    or the built-in one (`models.DEFAULT_RETRY`) stored as None."""
    own = job.spec.retry
    merged = models.DEFAULT_RETRY if own is None else own.over(models.DEFAULT_RETRY)
    assert merged.attempts is not None, "the daemon's defaults are complete"
    assert merged.on is not None
    assert merged.exit_codes is not None
    assert merged.backoff_s is not None
    return Policy(
        merged.attempts, frozenset(merged.on), frozenset(merged.exit_codes), merged.backoff_s
    )


def retried(policy: Policy, *, failure: str, exit_code: int | None, attempt: int) -> bool:
    """Whether attempt number `attempt`, which ended with `failure` (and `exit_code`), is
    followed by another under `policy`."""
    if attempt >= policy.attempts:
        return False
    if failure in policy.on:
        return True
    return failure == "user" and exit_code in policy.exit_codes


def delay(policy: Policy, attempt: int, rng: backoff.Uniform) -> float:
    """How long to wait before the attempt after `attempt`: `backoff_s` doubled for every
    retry before it, at most `models.MAX_BACKOFF_S`, with equal jitter (half fixed, half
    random) so that jobs failed together do not all return together."""
    if policy.backoff_s == 0:
        return 0.0
    full = min(models.MAX_BACKOFF_S, policy.backoff_s * 2.0 ** min(attempt - 1, 32))
    return full / 2 + rng.uniform(0.0, full / 2)


def reason(previous: Previous, of: int, wait_s: float) -> str:
    """What the job says while its next attempt waits: which attempt failed and how, and
    which comes next."""
    why = previous.failure if previous.reason is None else f"{previous.failure}: {previous.reason}"
    return (
        f"attempt {previous.attempt} failed ({why}); attempt {previous.attempt + 1} of {of} "
        f"in {wait_s:.0f}s"
    )
