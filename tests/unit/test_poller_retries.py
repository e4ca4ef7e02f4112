"""The poller's side of a retry, on the in-memory store and the fake backend: a stop that lands
between the verdict and the retry's commit wins, and the attempt's end is recorded once."""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator import events, models
from orchestrator.models import JobState as S
from orchestrator.poller import Poller
from orchestrator.settings import PollerSettings
from orchestrator.testing import FakeBackend, InMemoryStore, Script

POLICY = models.Retry(attempts=3, on=["start", "infrastructure"], exit_codes=[75], backoff_s=0)
FAST = PollerSettings(base_s=0.01, cap_s=0.02)


class StopsFirst(InMemoryStore):
    """A store on which a cancel is recorded just before the retry is (the race)."""

    async def retry(self, job_id: str, expected: models.JobState, **kwargs: Any) -> models.Job:
        await self.request_stop(job_id, "cancel")
        return await super().retry(job_id, expected, **kwargs)


async def launched(store: InMemoryStore, fake: FakeBackend) -> models.Job:
    spec = models.JobSpec(command=["x"], retry=POLICY)  # as the daemon stores it
    (outcome,) = await store.accept_many([(spec, "local")], None)
    assert isinstance(outcome, tuple)
    job = await store.begin_attempt(outcome[0].id)
    assert job is not None
    submitted = await fake.submit(job)
    return await store.record_submitted(job.id, external_id=submitted.external_id, state=S.RUNNING)


async def until_terminal(hub: events.Hub, store: InMemoryStore, job_id: str) -> models.Job:
    ended = asyncio.Event()
    hub.listen(lambda e: ended.set() if e.job_id == job_id and e.to_state.terminal else None)
    async with asyncio.timeout(10):
        await ended.wait()
    return await store.get(job_id)


async def test_a_stop_recorded_before_the_retry_ends_the_job_as_stopped() -> None:
    hub = events.Hub()
    store = StopsFirst(hub)
    await store.open()
    fake = FakeBackend(default_script=Script(states=(S.FAILED,), exit_code=75))
    requeued: list[tuple[str, float]] = []
    poller = Poller(FAST, store, {"local": fake})
    poller.set_requeue(lambda job, at: requeued.append((job.id, at)))
    job = await launched(store, fake)
    poller.track(job)
    running = asyncio.create_task(poller.run())
    try:
        final = await until_terminal(hub, store, job.id)
    finally:
        running.cancel()
    assert (final.state, final.failure, final.attempt) == (S.CANCELLED, "cancelled", 1)
    assert requeued == []  # never handed back for another attempt
    assert [(e["from"], e["to"]) for e in await store.history(job.id)][-1] == (
        "RUNNING",
        "CANCELLED",
    )
    assert fake.settled_ids == [job.id]  # the attempt's end was settled once


async def test_a_retried_attempt_is_handed_back_once_and_settled() -> None:
    hub = events.Hub()
    store = InMemoryStore(hub)
    await store.open()
    fake = FakeBackend(default_script=Script(states=(S.FAILED,), exit_code=75))
    requeued: list[tuple[str, float]] = []
    handed_back = asyncio.Event()

    def requeue(job: models.Job, at: float) -> None:
        requeued.append((job.id, at))
        handed_back.set()

    poller = Poller(FAST, store, {"local": fake})
    poller.set_requeue(requeue)
    job = await launched(store, fake)
    poller.track(job)
    running = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(10):
            await handed_back.wait()
        await asyncio.sleep(0.1)  # and nothing more comes of it
    finally:
        running.cancel()
    current = await store.get(job.id)
    assert (current.state, current.launching, current.attempt) == (S.QUEUED, False, 1)
    assert [job_id for job_id, _ in requeued] == [job.id]
    assert fake.settled_ids == [job.id]
    assert current.info["retry"]["previous"] == {
        "attempt": 1,
        "failure": "user",
        "reason": None,
        "exit_code": 75,
    }
