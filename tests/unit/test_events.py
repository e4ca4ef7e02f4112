"""`orchestrator.events.Hub`: listeners, per-job and global watchers, dropping slow watchers."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from structlog.testing import capture_logs

from orchestrator import errors, events, models

S = models.JobState


def _event(job_id: str, to_state: models.JobState = S.RUNNING, at: float = 1.0) -> models.Event:
    return models.Event(
        job_id=job_id,
        backend="local",
        name=job_id,
        from_state=S.QUEUED,
        to_state=to_state,
        at=at,
    )


def _drain(sub: events.Subscription) -> list[models.Event]:
    out = []
    while (event := sub.get_nowait()) is not None:
        out.append(event)
    return out


# --- listeners -------------------------------------------------------------------------------


def test_listeners_are_called_in_order_with_the_event() -> None:
    hub = events.Hub()
    calls: list[tuple[str, models.Event]] = []

    def recorder(tag: str) -> events.Listener:
        return lambda event: calls.append((tag, event))

    for tag in ("first", "second", "third"):
        hub.listen(recorder(tag))
    a, b = _event("a"), _event("b", S.SUCCEEDED)
    hub.publish(a)
    hub.publish(b)
    assert calls == [
        ("first", a),
        ("second", a),
        ("third", a),
        ("first", b),
        ("second", b),
        ("third", b),
    ]


def test_a_failing_listener_does_not_stop_the_others_and_is_logged() -> None:
    hub = events.Hub()
    seen: list[models.Event] = []

    def broken(event: models.Event) -> None:
        raise RuntimeError("listener bug")

    hub.listen(broken)
    hub.listen(seen.append)
    sub = hub.subscribe()
    event = _event("a")
    with capture_logs() as logs:
        hub.publish(event)
    assert seen == [event]
    assert _drain(sub) == [event]
    assert logs == [
        {"event": "events.listener_failed", "job_id": "a", "log_level": "error", "exc_info": True}
    ]


# --- subscriptions ---------------------------------------------------------------------------


async def test_job_subscribers_get_only_their_job_and_global_ones_get_all() -> None:
    hub = events.Hub()
    everything, only_a, only_b, also_a = (
        hub.subscribe(),
        hub.subscribe("a"),
        hub.subscribe("b"),
        hub.subscribe("a"),
    )
    published = [_event("a"), _event("b"), _event("c"), _event("a", S.SUCCEEDED)]
    for event in published:
        hub.publish(event)
    assert {
        "all": _drain(everything),
        "a": _drain(only_a),
        "b": _drain(only_b),
        "a again": _drain(also_a),
    } == {
        "all": published,
        "a": [published[0], published[3]],
        "b": [published[1]],
        "a again": [published[0], published[3]],
    }


async def test_a_submitters_subscription_gets_only_the_events_of_its_jobs() -> None:
    hub = events.Hub(watcher_queue_size=2)
    mine = hub.subscribe(peer_uid=1000)
    ours, theirs, nobodys = (
        dataclasses.replace(_event("a"), peer_uid=1000),
        dataclasses.replace(_event("b"), peer_uid=1001),
        _event("c"),  # no recorded submitter: nobody's
    )
    for event in (theirs, nobodys, theirs, ours):  # what it does not get never fills it up
        hub.publish(event)
    assert _drain(mine) == [ours]
    assert not mine.dropped


async def test_get_waits_for_the_next_event() -> None:
    hub = events.Hub()
    sub = hub.subscribe("a")
    waiter = asyncio.create_task(sub.get(), name="test-waiter")
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish(_event("b"))
    await asyncio.sleep(0)
    assert not waiter.done()
    event = _event("a")
    hub.publish(event)
    assert await asyncio.wait_for(waiter, timeout=1.0) == event


async def test_a_full_subscriber_is_dropped_after_draining_what_it_had() -> None:
    hub = events.Hub(watcher_queue_size=2)
    slow, fast = hub.subscribe("a"), hub.subscribe("a")
    published = [_event("a", at=float(i)) for i in range(4)]
    with capture_logs() as logs:
        hub.publish(published[0])
        assert _drain(fast) == [published[0]]
        for event in published[1:]:
            hub.publish(event)
            assert _drain(fast) == [event]
    assert logs == [
        {
            "event": "events.watcher_dropped",
            "job_id": "a",
            "reason": "queue full",
            "log_level": "warning",
        }
    ]
    assert slow.dropped
    assert not fast.dropped
    got = [await asyncio.wait_for(slow.get(), timeout=1.0) for _ in range(2)]
    assert got == published[:2]
    with pytest.raises(errors.WatcherTooSlow):
        await asyncio.wait_for(slow.get(), timeout=1.0)
    with pytest.raises(errors.WatcherTooSlow):
        slow.get_nowait()


async def test_a_dropped_subscriber_gets_nothing_more() -> None:
    hub = events.Hub(watcher_queue_size=1)
    sub = hub.subscribe()
    first = _event("a")
    with capture_logs() as logs:
        for i in range(5):
            hub.publish(_event("a", at=float(i)) if i else first)
    assert [entry["event"] for entry in logs] == ["events.watcher_dropped"]  # once, not per event
    assert sub.get_nowait() == first
    with pytest.raises(errors.WatcherTooSlow):
        sub.get_nowait()


async def test_async_iteration_ends_with_watcher_too_slow_when_dropped() -> None:
    hub = events.Hub(watcher_queue_size=3)
    published = [_event("a", at=float(i)) for i in range(4)]
    received: list[models.Event] = []

    async def collect(sub: events.Subscription) -> None:
        async with asyncio.timeout(1.0):
            async for event in sub:
                received.append(event)  # noqa: PERF401 - keeps what came before the raise

    with capture_logs():
        async with hub.subscribe() as sub:
            for event in published:
                hub.publish(event)
            with pytest.raises(errors.WatcherTooSlow):
                await collect(sub)
    assert received == published[:3]


@pytest.mark.parametrize("job_id", [None, "a"])
async def test_async_with_unsubscribes(job_id: str | None) -> None:
    hub = events.Hub(watcher_queue_size=1)
    before = _event("a", at=1.0)
    async with hub.subscribe(job_id) as sub:
        assert sub.job_id == job_id
        hub.publish(before)
        assert sub.get_nowait() == before
    with capture_logs() as logs:
        for i in range(3):  # more than its queue holds: it would be dropped if still subscribed
            hub.publish(_event("a", at=float(i + 2)))
    assert (sub.get_nowait(), sub.dropped, logs) == (None, False, [])


async def test_unsubscribe_on_error_and_others_keep_receiving() -> None:
    hub = events.Hub()
    keep = hub.subscribe("a")
    with pytest.raises(RuntimeError, match="boom"):
        async with hub.subscribe("a") as gone:
            raise RuntimeError("boom")
    event = _event("a")
    hub.publish(event)
    assert (_drain(gone), _drain(keep)) == ([], [event])
    hub.unsubscribe(gone)  # twice is harmless


def test_publish_without_anyone_listening() -> None:
    with capture_logs() as logs:
        events.Hub().publish(_event("a"))
    assert logs == []
