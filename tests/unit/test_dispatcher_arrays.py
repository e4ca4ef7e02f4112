"""The dispatcher's side of an array job, on the in-memory store and the fake backend: an
expansion the store could not write is tried again (nothing lost, the parent stays QUEUED
meanwhile), children that end together are judged into one end of the parent, and a child that
fails fails the parent once all have ended."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from orchestrator import events, models
from orchestrator.dispatcher import Dispatcher
from orchestrator.models import JobState as S
from orchestrator.poller import Poller
from orchestrator.settings import DispatcherSettings, PollerSettings
from orchestrator.testing import FakeBackend, InMemoryStore, Script

FAST_POLL = PollerSettings(base_s=0.01, cap_s=0.02)
FAST_RETRY = DispatcherSettings(retry_base_s=0.01, retry_cap_s=0.05)


async def _run_array(
    store: InMemoryStore, hub: events.Hub, fake: FakeBackend, spec: models.JobSpec
) -> tuple[models.Job, list[models.Event]]:
    seen: list[models.Event] = []
    hub.listen(seen.append)
    poller = Poller(FAST_POLL, store, {"local": fake})
    dispatcher = Dispatcher(FAST_RETRY, store, {"local": fake}, poller, hub)
    (outcome,) = await store.accept_many([(spec, "local")], None)
    assert isinstance(outcome, tuple)
    parent = outcome[0]
    ended = asyncio.Event()
    hub.listen(lambda e: ended.set() if e.job_id == parent.id and e.to_state.terminal else None)
    tasks = [asyncio.create_task(poller.run()), asyncio.create_task(dispatcher.run())]
    try:
        dispatcher.enqueue(parent)
        async with asyncio.timeout(10):
            await ended.wait()
    finally:
        for task in tasks:
            task.cancel()
    return await store.get(parent.id), seen


class FailsOneExpansion(InMemoryStore):
    """A store whose first expansion fails as a full disk's write does."""

    failed = 0

    async def expand(
        self, parent_id: str, children: Sequence[models.JobSpec]
    ) -> tuple[models.Job, list[models.Job]]:
        if not self.failed:
            self.failed += 1
            self.fail_writes("disk full")
            try:
                return await super().expand(parent_id, children)
            finally:
                self.fail_writes(None)
        return await super().expand(parent_id, children)


async def test_an_expansion_the_store_could_not_write_is_tried_again() -> None:
    hub = events.Hub()
    store = FailsOneExpansion(hub)
    await store.open()
    fake = FakeBackend()
    final, seen = await _run_array(store, hub, fake, models.JobSpec(command=["x"], array_size=3))
    assert store.failed == 1
    assert final.state == S.SUCCEEDED
    assert sorted(job_id for job_id, _ in fake.submits) == [f"{final.id}:{i}" for i in range(3)]
    parent_changes = [(e.from_state, e.to_state) for e in seen if e.job_id == final.id]
    assert parent_changes == [
        (None, S.QUEUED),
        (S.QUEUED, S.SUBMITTED),
        (S.SUBMITTED, S.RUNNING),
        (S.RUNNING, S.SUCCEEDED),
    ]


async def test_children_ending_together_end_the_parent_once() -> None:
    hub = events.Hub()
    store = InMemoryStore(hub)
    await store.open()
    fake = FakeBackend(default_script=Script(states=(S.SUCCEEDED,)))
    final, seen = await _run_array(store, hub, fake, models.JobSpec(command=["x"], array_size=200))
    assert final.state == S.SUCCEEDED
    assert final.info["array_status"] == {"SUCCEEDED": 200}
    ends = [e for e in seen if e.job_id == final.id and e.to_state.terminal]
    assert len(ends) == 1
    assert len(fake.submits) == 200


async def test_a_failed_child_fails_the_parent_once_all_have_ended() -> None:
    hub = events.Hub()
    store = InMemoryStore(hub)
    await store.open()
    fake = FakeBackend(default_script=Script(states=(S.SUCCEEDED,)))
    original = fake.script_for

    def script_for(job: models.Job) -> Script:
        if job.id.endswith(":1"):
            return Script(states=(S.FAILED,), exit_code=2)
        return original(job)

    fake.script_for = script_for  # type: ignore[method-assign]
    spec = models.JobSpec(command=["x"], array_size=3, retry=models.Retry(attempts=1))
    final, _ = await _run_array(store, hub, fake, spec)
    assert (final.state, final.failure) == (S.FAILED, "user")
    assert final.info["array_status"] == {"SUCCEEDED": 2, "FAILED": 1}
    assert f"first: {final.id}:1 FAILED" in str(final.reason)
