"""`engine.arrays`: children's ids and specs, a parent's progress and its verdict."""

from __future__ import annotations

import dataclasses
from typing import Any

from orchestrator import models
from orchestrator.engine import arrays

S = models.JobState


def make_job(
    *, spec: models.JobSpec | None = None, backend: str = "local", **changes: Any
) -> models.Job:
    job = models.Job(
        id="01hx0000000000000000000001",
        spec=spec or models.JobSpec(command=["run"]),
        backend=backend,
        state=S.QUEUED,
        created_at=1.0,
        updated_at=1.0,
        state_times={},
    )
    return dataclasses.replace(job, **changes)


def _parent(**changes: Any) -> models.Job:
    job = make_job(
        spec=models.JobSpec(
            command=["run"],
            array_size=4,
            name="fan",
            idempotency_key="k",
            depends_on=["01hx0000000000000000000000"],
            env={"A": "1"},
            priority=5,
        ),
        state=S.SUBMITTED,
    )
    return dataclasses.replace(job, **changes)


def test_children_are_the_spec_per_index_without_what_belongs_to_the_parent() -> None:
    specs = arrays.child_specs(_parent().spec)
    assert len(specs) == 4
    assert [s.env for s in specs] == [
        {"A": "1", "ORCHESTRATOR_ARRAY_INDEX": str(i), "AWS_BATCH_JOB_ARRAY_INDEX": str(i)}
        for i in range(4)
    ]
    assert {(s.array_size, s.name, s.idempotency_key, tuple(s.depends_on)) for s in specs} == {
        (None, None, None, ())
    }
    assert {s.priority for s in specs} == {5}  # what it is and how it runs stays


def test_child_ids_split_back_and_nothing_else_does() -> None:
    assert arrays.split(arrays.child_id("01hx", 12)) == ("01hx", 12)
    for other in ("01hx", "01hx:", ":3", "01hx:x", "01hx:-1", "01hx:123456"):
        assert arrays.split(other) is None


def test_the_parent_runs_once_a_child_does_and_ends_when_all_have() -> None:
    parent = _parent()
    assert arrays.verdict(parent, {"QUEUED": 4}).state is None
    assert arrays.verdict(parent, {"QUEUED": 3, "RUNNING": 1}).state == S.RUNNING
    running = dataclasses.replace(parent, state=S.RUNNING)
    assert arrays.verdict(running, {"SUCCEEDED": 3, "RUNNING": 1}).state is None
    done = arrays.verdict(running, {"SUCCEEDED": 4})
    assert (done.state, done.reason, done.failure) == (S.SUCCEEDED, "4/4 succeeded", None)


def test_a_failed_child_fails_the_parent_with_its_class_and_a_stop_cancels_it() -> None:
    running = _parent(state=S.RUNNING)
    failed_child = make_job(
        id="p:2", state=S.FAILED, reason="exit code 3", info={"failure": "infrastructure"}
    )
    verdict = arrays.verdict(running, {"SUCCEEDED": 3, "FAILED": 1}, failed_child)
    assert (verdict.state, verdict.failure) == (S.FAILED, "infrastructure")
    assert verdict.reason == "3/4 succeeded, 1 failed; first: p:2 FAILED (exit code 3)"
    stopped = dataclasses.replace(running, stop_reason="cancel")
    verdict = arrays.verdict(stopped, {"SUCCEEDED": 1, "CANCELLED": 3})
    assert (verdict.state, verdict.failure) == (S.CANCELLED, "cancelled")
    assert verdict.reason == "stopped (cancel): 1/4 succeeded, 3 cancelled"


def test_progress_reads_batch_status_summaries_too() -> None:
    summary = {"SUBMITTED": 0, "RUNNING": 2, "SUCCEEDED": 37, "FAILED": 2, "RUNNABLE": 59}
    assert arrays.progress(summary, 100) == "37/100 succeeded, 2 failed, 2 running"


def test_only_ecs_and_local_arrays_are_expanded() -> None:
    assert arrays.expands(_parent(backend="local"))
    assert arrays.expands(_parent(backend="ecs"))
    assert not arrays.expands(_parent(backend="batch"))
    assert not arrays.expands(make_job())
