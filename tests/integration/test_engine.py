"""The dispatcher and the poller driving a scripted fake backend, through the real daemon, socket
and SQLite store: batching, back-off, retries, missing jobs, stops. The same code drives ECS and
Batch; only the backend differs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, models
from orchestrator.backends import base
from orchestrator.backends.base import Observation
from orchestrator.client import Client
from orchestrator.models import JobState as S
from orchestrator.testing import FakeBackend, Script, make_settings
from tests.support.daemon import accepted, running, until_state

pytestmark = pytest.mark.timeout(60)


async def test_many_jobs_are_described_in_batches_of_at_most_100(short_tmp: Path) -> None:
    fake = FakeBackend(
        default_script=Script(states=(S.RUNNABLE, S.RUNNING, S.RUNNING, S.SUCCEEDED))
    )
    settings = make_settings(short_tmp, poller={"base_s": 0.2, "cap_s": 0.4})
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        ids = [
            accepted(job)["id"]
            async for job in c.submit_many({"command": ["x"]} for _ in range(350))
        ]
        finals = await asyncio.gather(*(c.wait(i) for i in ids))
        history = (await c.get(ids[0], history=True))["history"]
    assert {job["state"] for job in finals} == {"SUCCEEDED"}
    sizes = [len(batch) for batch in fake.describe_batches]
    assert max(sizes) <= 100
    # 350 jobs x 4 observations each = 1,400 job-describes; batched, that is a few dozen calls.
    assert sum(sizes) >= 350 * 4
    assert len(sizes) <= 350 * 4 / 25, sizes
    assert [h["to"] for h in history] == ["QUEUED", "SUBMITTED", "RUNNABLE", "RUNNING", "SUCCEEDED"]


async def test_jobs_in_different_partitions_are_never_described_together(short_tmp: Path) -> None:
    fake = FakeBackend()
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        specs: list[dict[str, Any]] = [
            {"command": ["x"], "overrides": {"partition": p}} for p in "abababab"
        ]
        jobs = [await c.submit(spec) for spec in specs]
        finals = await asyncio.gather(*(c.wait(job["id"]) for job in jobs))
    partition_of = {
        job["external_id"]: spec["overrides"]["partition"]
        for job, spec in zip(finals, specs, strict=True)
    }
    assert sorted(partition_of.values()) == sorted("abababab")
    for batch in fake.describe_batches:
        assert len({partition_of[external_id] for external_id in batch}) == 1


async def test_retryable_start_failure_is_retried_then_succeeds(short_tmp: Path) -> None:
    flaky = Script(
        submit_errors=[errors.StartFailed("RESOURCE:MEMORY", retryable=True)] * 2,
    )
    fake = FakeBackend(scripts={"flaky": flaky})
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"], "name": "flaky"})
        final = await c.wait(job["id"])
        full = await c.get(job["id"], history=True)
    assert final["state"] == "SUCCEEDED"
    assert [a["outcome"] for a in full["attempts"]] == [
        "start failed: RESOURCE:MEMORY",
        "start failed: RESOURCE:MEMORY",
        "submitted",
    ]
    assert fake.submits == [(job["id"], 1), (job["id"], 2), (job["id"], 3)]


async def test_terminal_start_failure_fails_at_once_with_the_reason(short_tmp: Path) -> None:
    bad = Script(submit_errors=[errors.StartFailed("task definition not found", retryable=False)])
    fake = FakeBackend(scripts={"bad": bad})
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"], "name": "bad"})
        final = await c.wait(job["id"])
    assert (final["state"], final["reason"]) == ("FAILED", "task definition not found")
    assert len(fake.submits) == 1


async def test_retries_stop_at_max_start_attempts(short_tmp: Path) -> None:
    always = Script(
        submit_errors=[errors.StartFailed("Capacity is unavailable", retryable=True)] * 10
    )
    fake = FakeBackend(scripts={"starved": always})
    settings = make_settings(short_tmp, dispatcher={"max_start_attempts": 3})
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"], "name": "starved"})
        final = await c.wait(job["id"])
    assert (final["state"], final["reason"]) == ("FAILED", "Capacity is unavailable")
    assert len(fake.submits) == 3


async def test_a_job_the_backend_forgets_becomes_lost_after_the_grace_period(
    short_tmp: Path,
) -> None:
    fake = FakeBackend(default_script=Script(states=(S.RUNNING,)))
    settings = make_settings(short_tmp, poller={"missing_grace_s": 0.3})
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"]})
        await until_state(c, job["id"], "RUNNING")
        running_job = await c.get(job["id"])
        assert running_job["external_id"] is not None
        fake.forget(running_job["external_id"])
        final = await c.wait(job["id"])
    assert final["state"] == "LOST"
    assert final["reason"] is not None
    assert "cannot be found again" in final["reason"]


async def test_cancel_is_reissued_until_the_backend_reports_the_end(short_tmp: Path) -> None:
    fake = FakeBackend(default_script=Script(states=(S.RUNNING,)))
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"]})
        await until_state(c, job["id"], "RUNNING")
        await c.cancel(job["id"])
        final = await c.wait(job["id"])
    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel")
    assert fake.stops.count(job["id"]) >= 1


async def test_a_job_that_succeeds_despite_a_cancel_keeps_its_true_outcome(short_tmp: Path) -> None:
    fake = FakeBackend(default_script=Script(states=(S.RUNNING,), stop_ends_in=S.SUCCEEDED))
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"]})
        await until_state(c, job["id"], "RUNNING")
        await c.cancel(job["id"])
        final = await c.wait(job["id"])
    assert final["state"] == "SUCCEEDED"


async def test_polling_backs_off_while_nothing_changes_and_stays_capped(short_tmp: Path) -> None:
    fake = FakeBackend(default_script=Script(states=(S.RUNNING,)))
    settings = make_settings(
        short_tmp, poller={"base_s": 0.02, "factor": 2.0, "cap_s": 0.16, "jitter": "none"}
    )
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"]})
        await asyncio.sleep(1.5)
        await c.cancel(job["id"])
        await c.wait(job["id"])
    # Delays 0.02, 0.04, 0.08 then 0.16 s forever: about 3 + (1.5 - 0.14) / 0.16 ≈ 11 polls.
    # Without the cap it would be ~6; without back-off ~75.
    assert 7 <= len(fake.describe_batches) <= 16, len(fake.describe_batches)


async def test_a_wake_while_the_job_is_being_described_is_not_lost(short_tmp: Path) -> None:
    # The local backend wakes a job when its runner exits or its cgroup empties; that can come
    # while a describe of the job is in flight (the end came just after the describe looked).
    class WokenMidDescribe(FakeBackend):
        describes = 0

        async def describe(self, jobs: Sequence[models.Job]) -> Mapping[str, Observation]:
            observations = await super().describe(jobs)
            self.describes += 1
            if self.describes == 2 and self._wake is not None:
                self._wake(jobs[0].id)
            return observations

    fake = WokenMidDescribe(default_script=Script(states=(S.RUNNING, S.RUNNING, S.SUCCEEDED)))
    # The second describe (RUNNING again) would put the next one 60 s away, past the test.
    poller = {"base_s": 0.02, "factor": 3000.0, "cap_s": 60.0, "jitter": "none"}
    settings = make_settings(short_tmp, poller=poller)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"]})
        async with asyncio.timeout(20):
            final = await c.wait(job["id"])
    assert final["state"] == "SUCCEEDED"
    assert fake.describes == 3


@pytest.mark.parametrize("delivery_s", [0.0, 1.5])
async def test_following_logs_waits_for_lines_delivered_after_the_end(
    short_tmp: Path, delivery_s: float
) -> None:
    """CloudWatch delivers a job's last lines late: `logs -f` reads on for the backend's
    delivery delay after the job has ended (and without one, stops at the end)."""
    fake = FakeBackend(log_delivery_s=delivery_s, late_output_s=0.5)
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"]})
        await c.wait(job["id"])
        lines = [m["data"] async for m in c.logs(job["id"], follow=True) if "data" in m]
    expected = [f"output of {job['id']}\n"]
    if delivery_s:
        expected.append(f"late output of {job['id']}\n")
    assert lines == expected


@pytest.mark.parametrize(
    ("started_at_submit", "reason_starts"),
    [(True, "stopped"), (False, "queue_timeout: not running")],
    ids=["started-in-time", "never-started"],
)
async def test_a_queue_timeout_names_only_jobs_that_had_not_started(
    short_tmp: Path, started_at_submit: bool, reason_starts: str
) -> None:
    """The daemon thought the job not yet running (it shows STARTING past the queue deadline)
    and stopped it. If the backend then tells that the job's process had started before the
    deadline, the job's end is its own; only a job that had not started is a queue timeout."""
    script = Script(states=(S.STARTING,), started_at_submit=started_at_submit)
    fake = FakeBackend(default_script=script)
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"], "queue_timeout_s": 0.5})
        async with asyncio.timeout(30):
            final = await c.wait(job["id"])
    assert final["state"] == "FAILED"
    assert final["reason"] is not None
    assert final["reason"].startswith(reason_starts), final["reason"]
    assert fake.stops == [job["id"]]


class _HeldSubmit(FakeBackend):
    """A backend whose first submit waits for `go`, then fails retryably."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def submit(self, job: models.Job) -> base.Submitted:
        if not self.submits:
            self.submits.append((job.id, job.attempt))
            self.entered.set()
            await self.go.wait()
            raise errors.StartFailed("RESOURCE:MEMORY", retryable=True)
        return await super().submit(job)


async def test_a_job_cancelled_while_its_start_is_in_flight_ends_cancelled_when_the_start_fails(
    short_tmp: Path,
) -> None:
    """The cancel finds the attempt launching, so it can only be recorded; the start then fails
    in a way worth a retry. The job must end CANCELLED, not wait QUEUED for a retry that its
    stop forbids (it did, until the dispatcher ended it on such a failure)."""
    fake = _HeldSubmit()
    settings = make_settings(short_tmp)
    async with (
        running(settings, backends={"local": fake}),
        Client(settings.server.socket_path) as c,
    ):
        job = await c.submit({"command": ["x"]})
        await asyncio.wait_for(fake.entered.wait(), 10)
        assert (await c.cancel(job["id"]))["state"] == "QUEUED"
        fake.go.set()
        final = await asyncio.wait_for(c.wait(job["id"]), 20)
    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel")
    assert fake.submits == [(job["id"], 1)]  # never started again
