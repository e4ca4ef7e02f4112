"""`engine.eventflow` (issue #17): what a message body says (`decode`), whether a change is news
(`newer`), whether a backend's events flow (`Flow`), how often the sweep describes a job
(`sweep_period`); and the tracker's side of tracking by events (`Tracker.by_external`, `count`,
`reschedule`, the sweep's delay)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from orchestrator import backoff, models
from orchestrator.engine import eventflow
from orchestrator.engine.eventflow import Flow, Switch, Undecodable, decode, newer, sweep_period
from orchestrator.engine.tracking import Group, Tracked, Tracker
from tests.unit.engine.support import make_job

S = models.JobState
GRACE_S = 30.0

# -- decode ------------------------------------------------------------------------------------

ECS_EVENT = {
    "version": "0",
    "id": "3317b2af-7005-947d-b652-f55e762e571a",
    "detail-type": "ECS Task State Change",
    "source": "aws.ecs",
    "account": "111122223333",
    "time": "2020-01-23T17:57:58Z",
    "region": "us-west-2",
    "resources": ["arn:aws:ecs:us-west-2:111122223333:task/FargateCluster/c13b4cb4"],
    "detail": {"taskArn": "arn:aws:ecs:us-west-2:111122223333:task/c13b4cb4", "version": 4},
}


def test_an_eventbridge_event_is_decoded_from_str_or_bytes() -> None:
    for body in (json.dumps(ECS_EVENT), json.dumps(ECS_EVENT).encode()):
        envelope = decode(body)
        assert (envelope.source, envelope.detail_type) == ("aws.ecs", "ECS Task State Change")
        assert envelope.detail == ECS_EVENT["detail"]
        assert (envelope.event_id, envelope.time) == (ECS_EVENT["id"], "2020-01-23T17:57:58Z")


def test_an_event_without_id_or_time_is_still_read() -> None:
    body = {"source": "aws.batch", "detail-type": "Batch Job State Change", "detail": {}}
    envelope = decode(json.dumps(body))
    assert (envelope.event_id, envelope.time, envelope.detail) == ("", "", {})


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        ("{\x00}", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[1, 2]", "not a JSON object but list"),
        ('"text"', "not a JSON object but str"),
        ("null", "not a JSON object but NoneType"),
        ("3", "not a JSON object but int"),
        ("{}", "not an EventBridge event: no source, detail-type, detail"),
        ('{"source": "aws.ecs", "detail": {}}', "no detail-type"),
        ('{"source": "aws.ecs", "detail-type": "x"}', "no detail"),
        ('{"source": 1, "detail-type": "x", "detail": {}}', "source and detail-type must be"),
        ('{"source": "s", "detail-type": ["x"], "detail": {}}', "source and detail-type must"),
        ('{"source": "s", "detail-type": "x", "detail": []}', "detail must be an object, not list"),
        (
            '{"source": "s", "detail-type": "x", "detail": "{}"}',
            "detail must be an object, not str",
        ),
    ],
)
def test_what_is_not_an_event_is_undecodable_saying_what_was_wrong(
    body: str | bytes, said: str
) -> None:
    with pytest.raises(Undecodable) as caught:
        decode(body)
    assert said in str(caught.value)
    assert isinstance(caught.value, ValueError)  # the feed catches it as one


# -- newer -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "last", "news"),
    [
        (None, None, True),
        (None, (5,), True),  # no order: the store's legal transitions keep a job from going back
        ((5,), None, True),  # nothing applied yet
        ((5,), (4,), True),
        ((5,), (5,), False),  # a duplicate
        ((4,), (5,), False),  # a late one
        ((1, 2), (0, 5), True),  # Batch: a retry's RUNNABLE after the failed attempt's RUNNING
        ((0, 5), (1, 2), False),
        ((1, 5), (1, 4), True),
    ],
)
def test_a_change_is_news_only_after_the_last_one_applied(
    order: eventflow.Order | None, last: eventflow.Order | None, news: bool
) -> None:
    assert newer(order, last) is news


# -- Flow --------------------------------------------------------------------------------------


def flowing(grace_s: float = GRACE_S, miss_limit: int = 3) -> Flow:
    flow = Flow(grace_s=grace_s, miss_limit=miss_limit)
    assert flow.received(0) == Switch(True, "queue readable")
    return flow


def test_a_flow_starts_not_flowing_and_the_first_working_receive_starts_it() -> None:
    flow = Flow(grace_s=GRACE_S, miss_limit=3)
    assert (flow.flowing, flow.why) == (False, "not read yet")
    assert flow.received(0) == Switch(True, "queue readable")
    assert (flow.flowing, flow.why) == (True, "")
    assert flow.received(0) is None
    assert flow.received(3) is None  # flowing already: nothing to say


def test_a_first_receive_with_events_of_ours_says_so() -> None:
    flow = Flow(grace_s=GRACE_S, miss_limit=3)
    assert flow.received(2) == Switch(True, "events arriving")


def test_a_failed_receive_stops_the_flow_once_per_reason() -> None:
    flow = flowing()
    assert flow.receive_failed("QueueDoesNotExist: gone") == Switch(
        False, "QueueDoesNotExist: gone"
    )
    assert (flow.flowing, flow.why) == (False, "QueueDoesNotExist: gone")
    assert flow.receive_failed("QueueDoesNotExist: gone") is None  # said already
    assert flow.receive_failed("AccessDenied: no") == Switch(False, "AccessDenied: no")


def test_a_queue_unreadable_from_the_start_is_said_and_its_first_good_receive_starts() -> None:
    flow = Flow(grace_s=GRACE_S, miss_limit=3)
    assert flow.receive_failed("AccessDenied: no") == Switch(False, "AccessDenied: no")
    assert flow.received(0) == Switch(True, "queue readable")


def test_after_a_fall_back_only_events_of_ours_bring_the_flow_back() -> None:
    flow = flowing()
    flow.receive_failed("Throttling: slow down")
    # A readable queue does not prove the rule delivers: foreign and empty receives do not.
    assert flow.received(0) is None
    assert flow.received(0) is None
    assert not flow.flowing
    assert flow.received(1) == Switch(True, "events arriving")
    assert (flow.flowing, flow.why, flow.misses) == (True, "", 0)


def test_a_change_no_event_told_within_grace_is_a_miss() -> None:
    flow = flowing()
    flow.described("t1", S.RUNNING, 100.0)
    assert flow.expects("t1")
    assert flow.tick(100.0 + GRACE_S - 0.1) is None
    assert (flow.misses, flow.expects("t1")) == (0, True)
    assert flow.tick(100.0 + GRACE_S) is None
    assert (flow.misses, flow.expects("t1")) == (1, False)
    assert flow.flowing


def test_miss_limit_misses_in_a_row_fall_back_to_polling() -> None:
    flow = flowing(miss_limit=3)
    for i, at in enumerate((100.0, 140.0)):
        flow.described(f"t{i}", S.RUNNING, at)
        assert flow.tick(at + GRACE_S) is None
    flow.described("t2", S.SUCCEEDED, 200.0)
    flow.described("t3", S.RUNNING, 200.0)  # waits still when the switch comes
    switch = flow.tick(200.0 + GRACE_S)
    assert switch == Switch(
        False, "4 changes found by describes were not told by any event within 30s"
    )
    assert (flow.flowing, flow.why, flow.misses) == (False, switch.why, 0)
    assert not flow.expects("t3")  # forgotten: polling now
    assert flow.tick(1_000.0) is None


def test_misses_at_once_count_each() -> None:
    flow = flowing(miss_limit=3)
    for key in ("a", "b", "c"):
        flow.described(key, S.RUNNING, 10.0)
    switch = flow.tick(10.0 + GRACE_S)
    assert switch is not None
    assert switch.why.startswith("3 changes")


def test_changes_lost_while_other_events_come_are_drops_not_misses() -> None:
    # 5 % of events dropped in a burst of launches: three changes found by the sweep at once,
    # but events of other jobs kept coming: the queue works, the sweep caught the drops.
    flow = flowing(miss_limit=3)
    for key in ("a", "b", "c"):
        flow.described(key, S.RUNNING, 10.0)
    flow.told("other", S.RUNNING, 20.0)
    assert flow.tick(10.0 + GRACE_S) is None
    assert (flow.flowing, flow.misses, flow.dropped) == (True, 0, 3)
    # then the events stop: changes found after the last event are misses, and fall back
    for key in ("d", "e", "f"):
        flow.described(key, S.RUNNING, 50.0)
    switch = flow.tick(50.0 + GRACE_S)
    assert switch is not None
    assert not switch.flowing


def test_an_event_told_resets_the_misses_in_a_row() -> None:
    flow = flowing(miss_limit=3)
    for key, at in (("a", 0.0), ("b", 40.0)):
        flow.described(key, S.RUNNING, at)
        flow.tick(at + GRACE_S)
    assert flow.misses == 2
    flow.told("other", S.RUNNING, 70.0)  # an event told a change of another job: they come
    assert flow.misses == 0
    for key, at in (("c", 100.0), ("d", 140.0)):
        flow.described(key, S.RUNNING, at)
        assert flow.tick(at + GRACE_S) is None  # two in a row, not three
    assert flow.flowing


@pytest.mark.parametrize(
    ("found", "told", "cleared"),
    [
        (S.RUNNING, S.RUNNING, True),  # the event of that change, late
        (S.RUNNING, S.SUCCEEDED, True),  # a later end: the event path works
        (S.STARTING, S.RUNNING, True),  # a later state
        (S.RUNNING, S.STARTING, False),  # an older event: not the one found
        (S.SUCCEEDED, S.RUNNING, False),  # the end is still untold
        (S.FAILED, S.FAILED, True),
    ],
)
def test_a_late_event_of_the_change_clears_it(
    found: models.JobState, told: models.JobState, cleared: bool
) -> None:
    flow = flowing()
    flow.described("t1", found, 100.0)
    flow.told("t1", told, 99.0)  # the clock as the feed read it, a moment before
    assert flow.expects("t1") is not cleared
    flow.tick(100.0 + GRACE_S)
    assert flow.misses == (0 if cleared else 1)


def test_changes_described_while_polling_wait_for_no_event() -> None:
    flow = Flow(grace_s=GRACE_S, miss_limit=1)
    flow.described("t1", S.RUNNING, 0.0)  # not flowing yet
    assert not flow.expects("t1")
    assert flow.tick(GRACE_S) is None


def test_a_failed_receive_forgets_the_changes_waiting_and_the_misses() -> None:
    flow = flowing(miss_limit=3)
    flow.described("a", S.RUNNING, 0.0)
    flow.tick(GRACE_S)
    flow.described("b", S.RUNNING, 50.0)
    flow.receive_failed("Throttling: slow down")
    assert (flow.misses, flow.expects("b")) == (0, False)


def test_the_flow_comes_back_after_misses_when_events_of_ours_arrive() -> None:
    flow = flowing(miss_limit=1)
    flow.described("a", S.RUNNING, 0.0)
    assert flow.tick(GRACE_S) is not None
    assert flow.received(0) is None
    assert flow.received(1) == Switch(True, "events arriving")
    flow.described("b", S.RUNNING, 100.0)  # watched again
    assert flow.expects("b")


# -- sweep_period ------------------------------------------------------------------------------


def test_the_sweep_is_sweep_s_while_it_takes_little_of_the_describe_budget() -> None:
    assert sweep_period(60.0, 10, batch=100, describe_rate_per_s=20.0, share=0.1) == 60.0
    assert sweep_period(60.0, 0, batch=100, describe_rate_per_s=20.0, share=0.1) == 60.0


def test_the_sweep_of_many_jobs_stretches_to_its_share_of_the_budget() -> None:
    # 100,000 jobs: 1,000 calls of 100; at 10 % of 20 calls/s, 2 calls/s: 500 s round.
    assert sweep_period(60.0, 100_000, batch=100, describe_rate_per_s=20.0, share=0.1) == 500.0
    # A partial batch is a call all the same.
    assert sweep_period(1.0, 101, batch=100, describe_rate_per_s=1.0, share=0.5) == 4.0
    assert sweep_period(1.0, 100, batch=100, describe_rate_per_s=1.0, share=0.5) == 2.0


def test_no_describe_budget_leaves_the_sweep_as_set() -> None:
    assert sweep_period(60.0, 10**6, batch=100, describe_rate_per_s=0.0, share=0.1) == 60.0


# -- the tracker's side ------------------------------------------------------------------------

ECS: Group = ("ecs", "cluster")
BATCH: Group = ("batch", "batch")
FIXED = backoff.Policy(base_s=4.0, factor=2.0, cap_s=32.0, jitter="none")


def tracker(sweep: dict[str, float] | None = None) -> Tracker:
    """A tracker whose sweep, by backend, is `sweep` (absent: polled at back-off, 4, 8…)."""
    delays = sweep or {}
    return Tracker(
        FIXED,
        random.Random(1),
        fill_ahead_s=0.0,
        batch_size=lambda name: 100,
        sweep=lambda entry: delays.get(entry.group[0]),
    )


def entry_of(t: Tracker, job_id: str) -> Tracked:
    entry = t.get(job_id)
    assert entry is not None
    return entry


def test_a_tracked_job_is_found_by_its_external_id() -> None:
    t = tracker()
    t.track(make_job(job_id="a", backend="ecs"), ECS, 0.0)
    assert t.by_external("ext-a") is entry_of(t, "a")
    assert t.by_external("ext-b") is None
    assert t.by_external("") is None
    t.untrack("a")
    assert t.by_external("ext-a") is None


def test_a_relocated_job_is_found_by_its_new_external_id_only() -> None:
    t = tracker()
    t.track(make_job(job_id="a", backend="ecs"), ECS, 0.0)
    entry = entry_of(t, "a")
    entry.order = (7,)
    t.hold(entry, dataclasses.replace(entry.job, external_id="ext-new"))
    assert t.by_external("ext-new") is entry
    assert t.by_external("ext-a") is None  # the old id names nothing any more
    assert entry.order is None  # the new task's changes are numbered afresh


def test_a_terminal_job_is_not_found_by_its_external_id() -> None:
    t = tracker()
    t.track(make_job(job_id="a", backend="ecs"), ECS, 0.0)
    t.settle(entry_of(t, "a"), make_job(S.SUCCEEDED, job_id="a", backend="ecs"))
    assert t.by_external("ext-a") is None


def test_tracked_jobs_are_counted_per_backend() -> None:
    t = tracker()
    for job_id in ("a", "b"):
        t.track(make_job(job_id=job_id, backend="ecs"), ECS, 0.0)
    t.track(make_job(job_id="c", backend="batch"), BATCH, 0.0)
    t.track(make_job(job_id="a", backend="ecs"), ECS, 1.0)  # again: counted once
    assert (t.count("ecs"), t.count("batch"), t.count("local")) == (2, 1, 0)
    t.untrack("a")
    t.untrack("a")  # twice: no harm
    t.settle(entry_of(t, "c"), make_job(S.FAILED, job_id="c", backend="batch"))
    assert (t.count("ecs"), t.count("batch")) == (1, 0)


def test_while_events_flow_a_job_is_next_described_at_the_sweep() -> None:
    t = tracker({"ecs": 60.0})
    t.track(make_job(job_id="a", backend="ecs"), ECS, 100.0)
    t.track(make_job(job_id="b", backend="batch"), BATCH, 100.0)
    assert entry_of(t, "a").due == 160.0
    assert entry_of(t, "b").due == 104.0  # no sweep for its backend: its back-off
    (batch,) = [b for g, b in t.take_batches(104.0) if g == BATCH]
    t.polled(batch[0], 104.0)
    assert entry_of(t, "b").due == 108.0  # (the poller counts its back-off steps, `n`)
    (swept,) = [b for g, b in t.take_batches(160.0) if g == ECS]
    t.polled(swept[0], 160.0)
    assert entry_of(t, "a").due == 220.0


def test_a_deadline_comes_before_the_sweep() -> None:
    t = tracker({"ecs": 60.0})
    job = make_job(S.RUNNING, job_id="a", backend="ecs", running_since=90.0, timeout_s=20.0)
    t.track(job, ECS, 100.0)
    assert entry_of(t, "a").due == 110.0


def test_a_job_being_stopped_is_described_at_once_whatever_the_sweep() -> None:
    t = tracker({"ecs": 60.0})
    t.track(make_job(job_id="a", backend="ecs", stop_reason="cancel"), ECS, 100.0)
    assert entry_of(t, "a").due == 100.0


def test_falling_back_brings_the_backends_swept_jobs_forward_to_their_back_off() -> None:
    sweep = {"ecs": 60.0, "batch": 60.0}
    t = tracker(sweep)
    for job_id in ("a", "b", "c"):
        t.track(make_job(job_id=job_id, backend="ecs"), ECS, 100.0)
    t.track(make_job(job_id="z", backend="batch"), BATCH, 100.0)
    (taken,) = [b for g, b in t.take_batches(160.0) if g == ECS]  # all three due: busy now
    for entry in taken[1:]:
        t.polled(entry, 160.0)  # two are back, due at 220; one is still being described
    del sweep["ecs"]  # the ecs feed stopped: back-off from now on
    assert t.reschedule("ecs", 170.0) == 2
    assert sorted(entry_of(t, j).due for j in ("b", "c")) == [174.0, 174.0]
    assert entry_of(t, "a").busy  # left alone: it is rescheduled when its describe ends
    assert entry_of(t, "z").due == 160.0  # another backend: untouched
    assert t.reschedule("ecs", 170.0) == 0  # nothing later than its back-off any more


def test_rescheduling_leaves_a_job_due_sooner_than_its_back_off() -> None:
    t = tracker()
    t.track(make_job(job_id="a", backend="ecs", stop_reason="cancel"), ECS, 100.0)
    assert t.reschedule("ecs", 100.0) == 0
    assert entry_of(t, "a").due == 100.0


def test_tracking_a_job_again_keeps_the_order_of_what_was_applied() -> None:
    t = tracker()
    t.track(make_job(job_id="a", backend="ecs"), ECS, 0.0)
    entry_of(t, "a").order = (7,)
    t.track(make_job(S.RUNNING, job_id="a", backend="ecs"), ECS, 1.0)
    assert entry_of(t, "a").order == (7,)  # an old event is still no news after that
