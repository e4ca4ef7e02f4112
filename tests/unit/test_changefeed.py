"""`changefeed.ChangeFeed` (issue #17) on fakes: an SQS that answers from a list (`FakeSqs`, no
I/O), a backend whose event detail is `{"id", "state", "v"}`, and either a fake poller or the real
one over the in-memory store. A message goes only once what it said is committed (or it said
nothing new); receivers widen for a backlog and narrow again; events for a job not tracked yet
wait for it, and go once they have waited too long."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, cast

import pytest

from orchestrator import changefeed, errors, events, models
from orchestrator.backends.base import Backend, Observation
from orchestrator.changefeed import ChangeFeed
from orchestrator.engine import eventflow
from orchestrator.health import Health
from orchestrator.poller import Applied, Poller
from orchestrator.settings import EventsSettings, PollerSettings
from orchestrator.testing import FakeBackend, InMemoryStore

S = models.JobState
SOURCE, DETAIL_TYPE = "aws.fake", "Fake Job State Change"
URL = "https://sqs.us-east-1.amazonaws.com/123456789012/events"
WAIT_S = 5.0


class FakeEventBackend(FakeBackend):
    """The fake backend, telling its jobs' changes as events too."""

    event_source: ClassVar[str] = SOURCE
    event_detail_type: ClassVar[str] = DETAIL_TYPE
    event_silent_statuses: ClassVar[frozenset[str]] = frozenset({"SUBMITTED"})

    def observe_event(self, detail: Any) -> Observation:
        if not isinstance(detail.get("id"), str):
            raise eventflow.Undecodable("no id")
        state = S(detail["state"])
        return Observation(detail["id"], state, state.value, order=(int(detail["v"]),))


def body(external_id: str, state: str = "RUNNING", v: int = 1, **envelope: Any) -> str:
    event = {"source": SOURCE, "detail-type": DETAIL_TYPE, **envelope}
    return json.dumps({**event, "detail": {"id": external_id, "state": state, "v": v}})


class FakeSqs:
    """An SQS queue in memory: `put` messages, `redeliver` the ones received and not deleted
    (their visibility timeout passed); `fail` makes ReceiveMessage raise."""

    def __init__(self) -> None:
        self.queue: list[dict[str, str]] = []
        self.in_flight: dict[str, dict[str, str]] = {}
        self.deleted: list[str] = []
        self.receives: list[dict[str, Any]] = []
        self.fail: errors.AwsError | None = None
        self.on_receive: Callable[[], None] = lambda: None
        self._added = asyncio.Event()
        self._n = 0

    def put(self, *bodies: str) -> list[str]:
        handles = []
        for text in bodies:
            self._n += 1
            handle = f"handle-{self._n}"
            self.queue.append({"MessageId": f"m{self._n}", "ReceiptHandle": handle, "Body": text})
            handles.append(handle)
        self._added.set()
        return handles

    def redeliver(self) -> None:
        self.queue += self.in_flight.values()
        self.in_flight.clear()
        self._added.set()

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["QueueUrl"] == URL
        if operation == "ReceiveMessage":
            self.receives.append(kwargs)
            self.on_receive()
            if self.fail is not None:
                raise self.fail
            if not self.queue and kwargs["WaitTimeSeconds"]:
                self._added.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.02):  # a long poll, short
                        await self._added.wait()
            wanted = kwargs["MaxNumberOfMessages"]
            taken, self.queue = self.queue[:wanted], self.queue[wanted:]
            self.in_flight.update((m["ReceiptHandle"], m) for m in taken)
            await asyncio.sleep(0)
            return {"Messages": taken} if taken else {}
        assert operation == "DeleteMessageBatch", operation
        entries = kwargs["Entries"]
        assert 1 <= len(entries) <= 10
        for entry in entries:
            self.deleted.append(entry["ReceiptHandle"])
            self.in_flight.pop(entry["ReceiptHandle"], None)
        return {"Successful": [{"Id": e["Id"]} for e in entries], "Failed": []}


class FakePoller:
    """What the feed needs of the poller: jobs tracked by external id, the orders applied."""

    def __init__(self) -> None:
        self.tracked: set[str] = set()
        self.last: dict[str, eventflow.Order] = {}
        self.applied: list[tuple[str, eventflow.Order | None]] = []
        self.gate: asyncio.Event | None = None
        self.failing: Exception | None = None
        self.entered = asyncio.Event()
        self.polled_again: list[str] = []

    async def apply_event(self, obs: Observation) -> Applied:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failing is not None:
            raise self.failing
        if obs.external_id not in self.tracked:
            return Applied.UNTRACKED
        if not eventflow.newer(obs.order, self.last.get(obs.external_id)):
            return Applied.STALE
        if obs.order is not None:
            self.last[obs.external_id] = obs.order
        self.applied.append((obs.external_id, obs.order))
        return Applied.APPLIED

    def polling_again(self, backend: str) -> int:
        self.polled_again.append(backend)
        return 0


class Lowest:
    """An rng that always draws the lowest value: jitter 0.75 of the mean, back-off at its floor."""

    def uniform(self, a: float, b: float) -> float:
        return a


def make_feed(
    sqs: FakeSqs,
    poller: Any,
    *,
    health: Health | None = None,
    clock: Callable[[], float] | None = None,
    **settings: Any,
) -> ChangeFeed:
    return ChangeFeed(
        cast(Backend, FakeEventBackend(name="fake")),
        EventsSettings(queue_url=URL, wait_s=1, **settings),
        sqs,
        poller,
        describe_rate_per_s=20.0,
        health=health,
        rng=Lowest(),
        clock=clock or time.monotonic,
    )


@contextlib.asynccontextmanager
async def running(feed: ChangeFeed) -> AsyncIterator[ChangeFeed]:
    task = asyncio.create_task(feed.run())
    try:
        await until(lambda: feed.flowing or feed.counts["receive_errors"], "a first receive")
        yield feed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Return once `predicate()` holds, looking every millisecond; fail naming `what`."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if predicate():
                    return
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"waited {timeout_s}s in vain for {what}") from None


def job(
    external_id: str, state: models.JobState = S.RUNNING, vendor: str = "RUNNING"
) -> models.Job:
    return models.Job(
        id=f"job-{external_id}",
        spec=models.JobSpec(command=["true"]),
        backend="fake",
        state=state,
        created_at=0.0,
        updated_at=0.0,
        state_times={},
        attempt=1,
        external_id=external_id,
        vendor_status=vendor,
    )


# -- deleting: only once what a message said is committed ---------------------------------------


async def test_the_first_receive_does_not_wait_and_the_next_ones_long_poll() -> None:
    sqs = FakeSqs()
    async with running(make_feed(sqs, FakePoller(), visibility_timeout_s=45)) as feed:
        await until(lambda: len(sqs.receives) >= 3, "three receives")
        assert feed.describe() == {"tracking": "events", "why": None, "receivers": 1, "held": 0}
    assert [r["WaitTimeSeconds"] for r in sqs.receives[:3]] == [0, 1, 1]
    assert {(r["MaxNumberOfMessages"], r["VisibilityTimeout"]) for r in sqs.receives} == {(10, 45)}


async def test_a_message_is_deleted_only_after_what_it_said_is_applied() -> None:
    sqs, poller = FakeSqs(), FakePoller()
    poller.tracked.add("t1")
    poller.gate = asyncio.Event()
    async with running(make_feed(sqs, poller)) as feed:
        (handle,) = sqs.put(body("t1", v=2))
        await asyncio.wait_for(poller.entered.wait(), WAIT_S)
        for _ in range(20):  # the apply is held up: nothing may go meanwhile
            await asyncio.sleep(0.001)
            assert sqs.deleted == []
        poller.gate.set()
        await until(lambda: sqs.deleted == [handle], "the delete")
        assert (feed.counts["applied"], feed.counts["deleted"]) == (1, 1)
    assert poller.applied == [("t1", (2,))]


async def test_a_message_whose_write_failed_stays_and_is_applied_when_it_comes_again() -> None:
    sqs, poller = FakeSqs(), FakePoller()
    poller.tracked.add("t1")
    poller.failing = errors.StoreError("commit failed: disk full")
    async with running(make_feed(sqs, poller)) as feed:
        (handle,) = sqs.put(body("t1", "SUCCEEDED", v=3))
        await until(lambda: feed.counts["unrecorded"] == 1, "the failed write")
        await asyncio.sleep(0.01)
        assert sqs.deleted == []
        assert list(sqs.in_flight) == [handle]
        poller.failing = None
        sqs.redeliver()  # its visibility timeout passed
        await until(lambda: sqs.deleted == [handle], "the delete")
        assert feed.counts["applied"] == 1
        assert feed.flowing  # a store's trouble is not the events'


async def test_a_message_whose_apply_raised_stays_and_the_feed_goes_on() -> None:
    sqs, poller = FakeSqs(), FakePoller()
    poller.tracked.update({"t1", "t2"})
    poller.failing = RuntimeError("a bug")
    async with running(make_feed(sqs, poller)) as feed:
        sqs.put(body("t1"))
        await until(lambda: feed.counts["failed"] == 1, "the failure")
        poller.failing = None
        (handle,) = sqs.put(body("t2"))
        await until(lambda: sqs.deleted == [handle], "the next message deleted")


async def test_duplicates_and_late_events_are_deleted_as_stale() -> None:
    sqs, poller = FakeSqs(), FakePoller()
    poller.tracked.add("t1")
    async with running(make_feed(sqs, poller)) as feed:
        handles = sqs.put(body("t1", v=3), body("t1", v=3), body("t1", v=2))
        await until(lambda: sorted(sqs.deleted) == sorted(handles), "all three deleted")
        assert (feed.counts["applied"], feed.counts["stale"]) == (1, 2)


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ("garbage", "undecodable"),
        ("[]", "undecodable"),
        (json.dumps({"source": SOURCE, "detail-type": DETAIL_TYPE, "detail": {}}), "undecodable"),
        (body("t1", state="NOT-A-STATE"), "undecodable"),  # ValueError from the backend
        (body("t1", source="aws.other"), "foreign"),
        (body("t1", "RUNNING", 1, **{"detail-type": "Other Change"}), "foreign"),
    ],
)
async def test_what_cannot_be_ours_is_deleted_at_once_and_counted(text: str, outcome: str) -> None:
    sqs, poller = FakeSqs(), FakePoller()
    poller.tracked.add("t1")
    async with running(make_feed(sqs, poller)) as feed:
        (handle,) = sqs.put(text)
        await until(lambda: sqs.deleted == [handle], "the delete")
        assert feed.counts[outcome] == 1
        assert poller.applied == []


# -- receivers: wider for a backlog, back to one ------------------------------------------------


async def test_receivers_widen_while_receives_come_back_full_and_narrow_when_caught_up() -> None:
    sqs, poller = FakeSqs(), FakePoller()
    poller.tracked.update(f"t{i}" for i in range(250))
    feed = make_feed(sqs, poller, max_receivers=3)
    widths: list[int] = []
    sqs.on_receive = lambda: widths.append(feed.describe()["receivers"])
    async with running(feed):
        handles = sqs.put(*(body(f"t{i}") for i in range(250)))
        await until(lambda: len(sqs.deleted) == len(handles), "the backlog deleted")
        await until(lambda: feed.describe()["receivers"] == 1, "one receiver again")
        caught_up = len(sqs.receives)
        await until(lambda: len(sqs.receives) >= caught_up + 2, "more receives")
    assert max(widths) == 3  # never more than max_receivers
    assert widths[-1] == 1
    assert sorted(sqs.deleted) == sorted(handles)
    assert feed.counts["applied"] == 250


# -- events of jobs not tracked (yet) ------------------------------------------------------------


async def test_events_held_for_a_job_not_tracked_yet_are_applied_in_order_once_it_is() -> None:
    sqs, poller = FakeSqs(), FakePoller()
    async with running(make_feed(sqs, poller)) as feed:
        later = sqs.put(body("t1", "SUCCEEDED", v=3))
        await until(lambda: feed.describe()["held"] == 1, "the first held")
        earlier = sqs.put(body("t1", "RUNNING", v=2))
        await until(lambda: feed.describe()["held"] == 2, "both held")
        assert sqs.deleted == []
        poller.tracked.add("t1")  # its launch recorded
        feed.tracked(job("t1", S.RUNNABLE, "PROVISIONING"))
        await until(lambda: sorted(sqs.deleted) == sorted(later + earlier), "both deleted")
        assert feed.describe()["held"] == 0
        assert feed.counts["held_applied"] == 2
        assert feed.counts["untracked"] == 2
    assert poller.applied == [("t1", (2,)), ("t1", (3,))]  # the vendor's order, not arrival's


async def test_events_held_too_long_are_deleted_as_untracked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(changefeed, "_TICK_S", 0.001)
    now = [1_000.0]
    sqs, poller = FakeSqs(), FakePoller()
    # Held for min(grace_s, visibility_timeout_s / 2) = 5 s.
    feed = make_feed(sqs, poller, clock=lambda: now[0], grace_s=30, visibility_timeout_s=10)
    async with running(feed):
        (handle,) = sqs.put(body("nobody"))
        await until(lambda: feed.describe()["held"] == 1, "held")
        now[0] += 4.9
        await asyncio.sleep(0.02)
        assert sqs.deleted == []
        now[0] += 0.2
        await until(lambda: sqs.deleted == [handle], "the delete")
        assert feed.counts["untracked_deleted"] == 1
        assert feed.describe()["held"] == 0
        feed.tracked(job("nobody"))  # too late: nothing left to apply
        await asyncio.sleep(0.01)
    assert poller.applied == []


async def test_past_the_most_held_an_untracked_event_is_deleted_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(changefeed, "_MAX_HELD", 2)
    sqs, poller = FakeSqs(), FakePoller()
    async with running(make_feed(sqs, poller)) as feed:
        handles = sqs.put(body("a"), body("b"), body("c"))
        await until(lambda: feed.counts["untracked"] == 3, "all three read")
        await until(lambda: sqs.deleted == handles[2:], "the third deleted")
        assert feed.describe()["held"] == 2


async def test_an_untracked_event_of_a_change_a_describe_found_first_is_no_miss() -> None:
    sqs, poller = FakeSqs(), FakePoller()
    async with running(make_feed(sqs, poller)) as feed:
        ended = job("t1", S.SUCCEEDED, "STOPPED")
        feed.described(ended, S.SUCCEEDED)  # a describe found the end; the job is untracked
        assert feed.flow.expects("t1")
        sqs.put(body("t1", "SUCCEEDED", v=4))
        await until(lambda: feed.counts["untracked"] == 1, "the event")
        assert not feed.flow.expects("t1")


# -- flowing, or not ---------------------------------------------------------------------------


async def test_a_queue_that_cannot_be_read_falls_back_to_polling_and_says_why() -> None:
    hub = events.Hub()
    store = InMemoryStore(hub)
    await store.open()
    health = Health(store)
    sqs, poller = FakeSqs(), FakePoller()
    poller.tracked.add("t1")
    async with running(make_feed(sqs, poller, health=health)) as feed:
        sqs.fail = errors.AwsRejected(
            "sqs", "ReceiveMessage", "QueueDoesNotExist", "The queue does not exist.", 400
        )
        await until(lambda: not feed.flowing, "the fall-back")
        said = feed.describe()
        assert (said["tracking"], said["why"]) == (
            "polling",
            "QueueDoesNotExist: The queue does not exist.",
        )
        assert poller.polled_again == ["fake"]
        assert [p.reason for p in health.problems()] == ["events_stopped"]
        sqs.fail = None
        sqs.put(body("t1", v=1))  # events of ours again (after a back-off of ~0.5 s)
        await until(lambda: feed.flowing, "events flowing again")
        assert health.problems() == []
        assert feed.counts["receive_errors"] >= 1


def test_the_sweep_is_jittered_while_flowing_and_none_otherwise() -> None:
    feed = make_feed(FakeSqs(), FakePoller(), sweep_s=60)
    running_job = job("t1")
    assert feed.sweep_delay(running_job, 10) is None  # not flowing yet: its back-off
    feed.flow.received(0)
    assert feed.sweep_delay(running_job, 10) == 45.0  # 60 s by 0.75, the lowest draw
    assert feed.sweep_delay(job("t2", S.SUBMITTED, "SUBMITTED"), 10) is None  # no event for it
    # 100,000 jobs in batches of 100 at 10 % of 20 calls/s: a 500 s round.
    assert feed.sweep_delay(running_job, 100_000) == 375.0


# -- with the real poller: committed, then deleted -----------------------------------------------


async def test_with_the_real_poller_a_message_goes_only_after_the_store_committed() -> None:
    hub = events.Hub()
    store = InMemoryStore(hub)
    await store.open()
    backend = FakeEventBackend(name="local")
    poller = Poller(PollerSettings(base_s=60, cap_s=60), store, {"local": backend})
    (outcome,) = await store.accept_many([(models.JobSpec(command=["x"]), "local")], None)
    assert isinstance(outcome, tuple)
    begun = await store.begin_attempt(outcome[0].id)
    assert begun is not None
    launched = await store.record_submitted(begun.id, external_id="ext-1", state=S.RUNNING)
    sqs = FakeSqs()
    feed = ChangeFeed(
        cast(Backend, backend),
        EventsSettings(queue_url=URL, wait_s=1),
        sqs,
        poller,
        describe_rate_per_s=20.0,
        rng=Lowest(),
    )
    poller.attach_feed(feed)
    poller.track(launched)
    async with running(feed):
        store.fail_writes("disk full")
        (handle,) = sqs.put(body("ext-1", "SUCCEEDED", v=5))
        await until(lambda: feed.counts["unrecorded"] == 1, "the failed write")
        assert (await store.get(launched.id)).state == S.RUNNING
        assert sqs.deleted == []
        store.fail_writes(None)
        sqs.redeliver()
        await until(lambda: sqs.deleted == [handle], "the delete")
        assert (await store.get(launched.id)).state == S.SUCCEEDED
        again = sqs.put(body("ext-1", "SUCCEEDED", v=5))  # a duplicate: not tracked any more
        await until(lambda: feed.counts["untracked"] == 1, "the duplicate read")
        del again
    history = [e["to"] for e in await store.history(launched.id)]
    assert history.count("SUCCEEDED") == 1
