"""`engine.dependencies.verdict`: start, wait, or never."""

from __future__ import annotations

import dataclasses

from orchestrator import models
from orchestrator.engine import dependencies
from tests.unit.engine.support import S, make_job


def job_after(*deps: str, after: str = "success") -> models.Job:
    spec = models.JobSpec(command=["x"], depends_on=list(deps), after=after)  # type: ignore[arg-type]
    return dataclasses.replace(make_job(S.QUEUED), spec=spec)


def ended(job_id: str, state: models.JobState, reason: str | None = None) -> models.Job:
    return dataclasses.replace(make_job(state, job_id=job_id), reason=reason)


def test_all_succeeded_starts() -> None:
    job = job_after("a", "b")
    found = {"a": ended("a", S.SUCCEEDED), "b": ended("b", S.SUCCEEDED)}
    assert dependencies.verdict(job, found) == dependencies.Verdict()


def test_one_still_running_waits_and_says_for_what() -> None:
    job = job_after("a", "b", "c")
    found = {"a": ended("a", S.SUCCEEDED), "b": ended("b", S.RUNNING), "c": ended("c", S.QUEUED)}
    got = dependencies.verdict(job, found)
    assert (got.waiting_for, got.blocked_by) == (2, None)
    assert got.reason == "waiting for 2 of 3 dependencies (b, c)"


def test_one_that_failed_means_never_even_while_others_run() -> None:
    job = job_after("a", "b")
    found = {"a": ended("a", S.RUNNING), "b": ended("b", S.FAILED, "exit code 3")}
    got = dependencies.verdict(job, found)
    assert got.blocked_by == "b"
    assert got.reason == "dependency b ended FAILED: exit code 3"
    for state in (S.CANCELLED, S.LOST):
        assert dependencies.verdict(job_after("b"), {"b": ended("b", state)}).blocked_by == "b"


def test_a_purged_dependency_is_no_longer_known() -> None:
    got = dependencies.verdict(job_after("gone"), {"gone": None})
    assert (got.blocked_by, got.reason) == ("gone", "dependency gone is no longer known")


def test_after_finished_takes_any_end() -> None:
    job = job_after("a", "b", after="finished")
    found = {"a": ended("a", S.FAILED), "b": ended("b", S.CANCELLED)}
    assert dependencies.verdict(job, found) == dependencies.Verdict()
    assert dependencies.verdict(job, {**found, "b": ended("b", S.RUNNING)}).waiting_for == 1
