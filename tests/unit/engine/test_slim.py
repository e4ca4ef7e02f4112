"""`tracking.SlimSpecs`: what of a job is kept while it is tracked (100,000 in flight must fit)."""

from __future__ import annotations

import dataclasses
import tracemalloc

from orchestrator import models
from orchestrator.engine import retries, tracking
from tests.unit.engine.support import S, make_job


def full_job(i: int, **spec: object) -> models.Job:
    job = make_job(S.RUNNING, job_id=f"job-{i}", running_since=1_010.0, backend="batch")
    fields = {
        "command": ["python", "-c", f"print({i})"],
        "env": {"RUN": str(i), "BUCKET": "s3://data"},
        "labels": {"team": "ml"},
        "overrides": {"containerOverrides": {"memory": 2048}},
        "timeout_s": 3600.0,
        "retry": models.Retry(attempts=3),
        **spec,
    }
    return dataclasses.replace(job, spec=models.JobSpec(**fields))  # type: ignore[arg-type]


def test_the_slim_job_keeps_everything_tracking_reads() -> None:
    slim = tracking.SlimSpecs()
    job = full_job(1, target="gpu", queue_timeout_s=60.0, image="repo/img:1")
    kept = slim(job)
    for field in ("timeout_s", "queue_timeout_s", "retry", "target", "image", "array_size"):
        assert getattr(kept.spec, field) == getattr(job.spec, field), field
    assert dataclasses.replace(kept, spec=job.spec) == job  # nothing else of the job differs
    assert tracking.deadline(kept) == tracking.deadline(job) == 1_010.0 + 3600.0
    assert retries.policy_of(kept) == retries.policy_of(job)
    assert kept.spec.env == {}  # what only a launch reads is not kept
    assert slim(kept) is kept


def test_jobs_that_track_alike_share_one_spec_and_others_do_not() -> None:
    slim = tracking.SlimSpecs()
    a, b = slim(full_job(1)), slim(full_job(2))
    c = slim(full_job(3, timeout_s=60.0))
    d = slim(full_job(4, retry=models.Retry(attempts=2)))
    assert a.spec is b.spec
    assert len({id(a.spec), id(c.spec), id(d.spec)}) == 3
    assert (c.spec.timeout_s, d.spec.retry) == (60.0, models.Retry(attempts=2))


def test_a_slim_tracked_job_costs_far_less_than_a_full_one() -> None:
    slim = tracking.SlimSpecs()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        jobs = [full_job(i) for i in range(2_000)]
        full = tracemalloc.get_traced_memory()[0] - start
        kept = [slim(job) for job in jobs]
        del jobs  # the full copies go: the tracker keeps only the slim ones
        slimmed = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(kept) == 2_000
    assert slimmed < full / 2, (full, slimmed)


def test_the_variety_of_specs_kept_is_bounded() -> None:
    slim = tracking.SlimSpecs(limit=8)
    for i in range(100):
        job = slim(full_job(i, timeout_s=float(i + 1)))
        assert job.spec.timeout_s == float(i + 1)
    assert len(slim._specs) <= 8
