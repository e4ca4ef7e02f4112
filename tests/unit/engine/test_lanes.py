"""`engine.lanes.Lane`: one backend's queue of jobs to launch, its cap on jobs in flight, its
timers (start retries, queue deadlines, looks again at unsettled attempts), and the wake-ups
the shell's loop relies on."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.engine import lanes
from orchestrator.engine.lanes import Expire, Lane, Launch, Resubmit, Settle
from tests.unit.engine.support import WakeCounter


def _lane(cap: int = 2, wake: Callable[[], None] | None = None) -> Lane:
    if wake is None:
        return Lane("local", cap, max_attempts=3, budget_s=60.0)
    return Lane("local", cap, max_attempts=3, budget_s=60.0, wake=wake)


def _launched(lane: Lane, *job_ids: str, now: float = 0.0) -> None:
    """Enqueue the jobs and launch them all (the lane's cap must allow it)."""
    for job_id in job_ids:
        lane.enqueue(job_id)
    assert lane.due(now) == [Launch(job_id) for job_id in job_ids]


# -- enqueue, launch, the cap ---------------------------------------------------------------------


def test_an_enqueued_job_is_due_as_a_launch_and_then_holds_a_slot() -> None:
    wake = WakeCounter()
    lane = _lane(wake=wake)
    lane.enqueue("a")
    assert wake.calls == 1  # work was added: the loop must look
    assert (lane.queued, lane.in_flight) == (1, 0)
    assert lane.due(0.0) == [Launch("a")]
    assert (lane.queued, lane.in_flight) == (0, 1)
    assert lane.is_in_flight("a")
    assert not lane.is_queued("a")
    assert lane.due(100.0) == []  # launched once


def test_the_cap_holds_and_a_release_lets_exactly_one_more_launch() -> None:
    wake = WakeCounter()
    lane = _lane(cap=2, wake=wake)
    for job_id in "abcde":
        lane.enqueue(job_id)
    assert lane.due(0.0) == [Launch("a"), Launch("b")]  # in order, up to the cap
    assert lane.due(1.0) == []
    assert (lane.queued, lane.in_flight) == (3, 2)
    wake.take()
    lane.release("a")
    assert wake.calls == 1
    assert lane.due(2.0) == [Launch("c")]
    assert lane.due(3.0) == []
    assert (lane.queued, lane.in_flight) == (2, 2)


def test_enqueueing_a_job_already_queued_is_a_no_op() -> None:
    wake = WakeCounter()
    lane = _lane(cap=5, wake=wake)
    lane.enqueue("a")
    lane.enqueue("a")
    assert lane.queued == 1
    assert wake.calls == 1
    assert lane.due(0.0) == [Launch("a")]
    assert lane.in_flight == 1


def test_enqueueing_a_job_in_flight_is_a_no_op() -> None:
    lane = _lane(cap=5)
    _launched(lane, "a")
    lane.enqueue("a")
    assert (lane.queued, lane.in_flight) == (0, 1)
    assert lane.due(0.0) == []
    lane.release("a")
    assert lane.due(1.0) == []  # the no-op left nothing behind to launch it again


def test_an_adopted_job_counts_against_the_cap() -> None:
    lane = _lane(cap=2)
    lane.adopt("x")
    lane.adopt("y")
    lane.enqueue("a")
    assert lane.in_flight == 2
    assert lane.due(0.0) == []
    lane.release("x")
    assert lane.due(1.0) == [Launch("a")]


# -- queue deadlines ------------------------------------------------------------------------------


def test_a_queue_deadline_expires_a_job_still_waiting_for_a_slot() -> None:
    lane = _lane(cap=1)
    _launched(lane, "busy")
    lane.enqueue("a", queue_deadline=5.0)
    assert lane.due(4.999) == []
    assert lane.due(5.0) == [Expire("a")]
    assert lane.due(6.0) == []  # once


def test_a_queue_deadline_expires_a_job_waiting_for_a_start_retry() -> None:
    lane = _lane(cap=1)
    lane.enqueue("a", queue_deadline=5.0)
    assert lane.due(0.0) == [Launch("a")]
    lane.retry_at("a", 10.0)  # its start failed before the deadline
    assert lane.due(5.0) == [Expire("a")]


def test_a_queue_deadline_does_not_expire_a_job_in_flight() -> None:
    lane = _lane(cap=1)
    lane.enqueue("a", queue_deadline=5.0)
    assert lane.due(0.0) == [Launch("a")]
    assert lane.due(5.0) == []
    assert lane.next_timer() is None  # the deadline's timer is spent


def test_a_queue_deadline_does_not_expire_a_queued_job_holding_a_slot() -> None:
    # Unusual (the shells settle only jobs in flight), but Expire must still never stop a job
    # whose attempt may have launched: a look at it holds a slot.
    lane = _lane(cap=1)
    _launched(lane, "busy")
    lane.enqueue("a", queue_deadline=5.0)
    lane.begin_settle("a")
    assert lane.due(5.0) == []


def test_a_queue_deadline_does_not_expire_a_job_that_ended() -> None:
    lane = _lane(cap=1)
    _launched(lane, "busy")
    lane.enqueue("a", queue_deadline=5.0)
    lane.ended("a")
    assert lane.due(5.0) == []


# -- start retries --------------------------------------------------------------------------------


def test_retry_at_frees_the_slot_and_wakes() -> None:
    wake = WakeCounter()
    lane = _lane(cap=1, wake=wake)
    _launched(lane, "a")
    lane.enqueue("b")
    assert lane.due(0.0) == []  # the cap is full
    wake.take()
    lane.retry_at("a", 10.0)
    assert wake.calls == 1
    assert (lane.in_flight, lane.queued) == (0, 2)
    assert lane.is_queued("a")
    assert lane.due(1.0) == [Launch("b")]  # the freed slot goes to the job ready now


def test_a_retried_job_is_launched_once_its_time_has_come_and_not_before() -> None:
    lane = _lane(cap=1)
    _launched(lane, "a")
    lane.retry_at("a", 10.0)
    assert lane.next_timer() == 10.0
    assert lane.due(9.999) == []
    assert lane.due(10.0) == [Launch("a")]
    assert lane.is_in_flight("a")
    assert lane.due(20.0) == []  # once


def test_a_retried_job_waits_for_a_slot_once_its_time_has_come() -> None:
    lane = _lane(cap=1)
    _launched(lane, "a")
    lane.retry_at("a", 10.0)
    _launched(lane, "b", now=1.0)
    assert lane.due(10.0) == []  # due, but b holds the only slot
    lane.release("b")
    assert lane.due(11.0) == [Launch("a")]


# -- settling an attempt whose outcome is unknown -------------------------------------------------


def test_settle_at_yields_a_settle_at_its_time_and_the_job_keeps_its_slot() -> None:
    wake = WakeCounter()
    lane = _lane(cap=1, wake=wake)
    _launched(lane, "a")
    lane.enqueue("b")
    wake.take()
    lane.settle_at("a", 5.0)
    assert wake.calls == 1  # a new timer: the loop must look at when to wake
    assert lane.due(4.999) == []
    assert lane.due(5.0) == [Settle("a")]
    assert lane.is_in_flight("a")
    assert lane.in_flight == 1
    assert lane.due(6.0) == []  # b still waits for a's slot


def test_begin_settle_counts_the_looks_at_an_attempt_and_settled_counts_afresh() -> None:
    lane = _lane()
    assert [lane.begin_settle("a") for _ in range(3)] == [1, 2, 3]
    assert lane.begin_settle("b") == 1  # per job
    lane.settled("a")
    assert lane.begin_settle("a") == 1
    assert lane.begin_settle("b") == 2


def test_begin_settle_holds_a_slot_and_settled_keeps_it() -> None:
    lane = _lane(cap=1)
    lane.begin_settle("a")  # recovered at start-up, launching
    lane.enqueue("b")
    assert lane.is_in_flight("a")
    assert lane.due(0.0) == []
    lane.settled("a")
    assert lane.due(1.0) == []  # settled says nothing of the slot: release does
    lane.release("a")
    assert lane.due(2.0) == [Launch("b")]


def test_ended_forgets_the_looks_at_an_attempt() -> None:
    lane = _lane()
    lane.begin_settle("a")
    lane.begin_settle("a")
    lane.ended("a")
    assert lane.begin_settle("a") == 1


# -- ended ----------------------------------------------------------------------------------------


def test_ended_removes_a_queued_job_which_is_never_launched() -> None:
    lane = _lane(cap=1)
    _launched(lane, "busy")
    lane.enqueue("a")
    lane.enqueue("b")
    lane.ended("a")
    assert lane.queued == 1
    assert not lane.is_queued("a")
    lane.release("busy")
    assert lane.due(1.0) == [Launch("b")]
    lane.release("b")
    assert lane.due(2.0) == []


def test_ended_removes_a_job_waiting_for_a_retry_which_is_never_launched() -> None:
    lane = _lane(cap=1)
    _launched(lane, "a")
    lane.retry_at("a", 10.0)
    lane.ended("a")
    assert lane.queued == 0
    assert lane.due(10.0) == []


def test_ended_frees_the_slot_of_a_job_in_flight_and_wakes() -> None:
    wake = WakeCounter()
    lane = _lane(cap=1, wake=wake)
    _launched(lane, "a")
    lane.enqueue("b")
    wake.take()
    lane.ended("a")
    assert wake.calls == 1
    assert lane.in_flight == 0
    assert lane.due(1.0) == [Launch("b")]


@pytest.mark.parametrize(
    "free",
    [
        pytest.param(lambda lane: lane.release("a"), id="release"),
        pytest.param(lambda lane: lane.ended("a"), id="ended"),
        pytest.param(lambda lane: lane.retry_at("a", 50.0), id="retry_at"),
    ],
)
def test_every_path_that_frees_a_slot_wakes_the_lane(free: Callable[[Lane], None]) -> None:
    wake = WakeCounter()
    lane = _lane(cap=1, wake=wake)
    _launched(lane, "a")
    wake.take()
    free(lane)
    assert lane.in_flight == 0
    assert wake.calls >= 1


def test_releasing_a_job_not_in_flight_frees_nothing() -> None:
    wake = WakeCounter()
    lane = _lane(cap=1, wake=wake)
    _launched(lane, "a")
    wake.take()
    lane.release("b")
    assert lane.in_flight == 1
    assert wake.calls == 0


# -- timers ---------------------------------------------------------------------------------------


def test_next_timer_is_the_earliest_timer_of_any_kind() -> None:
    lane = _lane(cap=3)
    assert lane.next_timer() is None
    lane.enqueue("a", queue_deadline=4.0)
    lane.settle_at("b", 5.0)
    assert lane.next_timer() == 4.0
    lane.adopt("c")
    lane.retry_at("c", 3.0)
    assert lane.next_timer() == 3.0
    lane.due(3.0)
    assert lane.next_timer() == 4.0
    lane.due(4.0)
    assert lane.next_timer() == 5.0
    lane.due(5.0)
    assert lane.next_timer() is None


def test_timers_due_together_come_out_in_time_order() -> None:
    lane = _lane(cap=2)
    _launched(lane, "a", "b")
    lane.settle_at("b", 7.0)
    lane.settle_at("a", 6.0)
    assert lane.due(10.0) == [Settle("a"), Settle("b")]


# -- queue deadlines against launches (fixed after the first review of the engine) ---------------


def test_a_job_whose_queue_deadline_passes_while_it_waits_for_a_retry_is_expired_not_launched() -> (
    None
):
    lane = _lane()
    lane.enqueue("a", queue_deadline=10.0)
    assert lane.due(0.0) == [Launch("a")]
    assert lane.due(10.0) == []  # in flight at its deadline: the launch goes on
    lane.retry_at("a", 15.0)  # ...and fails: the retry comes after the deadline
    assert lane.due(15.0) == [Expire("a")]
    assert not lane.is_queued("a")
    assert lane.due(100.0) == []


def test_a_job_is_never_both_expired_and_launched_in_one_round() -> None:
    lane = _lane()
    lane.enqueue("a", queue_deadline=5.0)
    assert lane.due(10.0) == [Expire("a")]  # a restart, or a slot freed past the deadline
    assert lane.in_flight == 0
    assert lane.queued == 0


def test_a_job_waiting_for_a_slot_past_its_deadline_is_expired_when_its_turn_comes() -> None:
    lane = _lane(cap=1)
    _launched(lane, "a")
    lane.enqueue("b", queue_deadline=5.0)
    assert lane.due(1.0) == []  # the cap is full
    assert lane.due(6.0) == [Expire("b")]  # its timer fired while it waited
    lane.release("a")
    assert lane.due(7.0) == []


def test_retry_at_wakes_the_lane_even_for_a_job_not_in_flight() -> None:
    wake = WakeCounter()
    lane = _lane(wake=wake)
    lane.retry_at("a", 3.0)
    assert wake.calls == 1
    assert lane.due(3.0) == [Launch("a")]


# -- a backend that cannot start anything now (its credentials refused) ---------------------------


def test_a_deferred_start_pauses_launches_and_resubmits_the_same_job_at_its_time() -> None:
    wake = WakeCounter()
    lane = _lane(cap=3, wake=wake)
    _launched(lane, "a")
    lane.enqueue("b")
    wake.take()
    lane.resubmit_at("a", 5.0)
    assert wake.calls == 1
    assert lane.paused
    assert lane.due(1.0) == []  # "b" waits: the backend would refuse it too
    assert lane.is_in_flight("a")  # "a" keeps its slot and its attempt
    assert lane.due(5.0) == [Resubmit("a")]
    lane.resume()  # its resubmission started it
    assert not lane.paused
    assert lane.due(5.0) == [Launch("b")]


def test_queue_deadlines_still_expire_jobs_while_launches_are_paused() -> None:
    lane = _lane()
    _launched(lane, "a")
    lane.enqueue("b", queue_deadline=3.0)
    lane.resubmit_at("a", 10.0)
    assert lane.due(3.0) == [Expire("b")]


# -- priority ------------------------------------------------------------------------------------


def _launch_order(lane: lanes.Lane, now: float = 0.0) -> list[str]:
    order = []
    while launched := [a.job_id for a in lane.due(now) if isinstance(a, lanes.Launch)]:
        order += launched
        for job_id in launched:
            lane.ended(job_id)
    return order


def test_a_lower_key_goes_first_and_equal_keys_go_in_order() -> None:
    lane = lanes.Lane("local", 1, max_attempts=5, budget_s=60.0)
    # keys as the dispatcher makes them: queued_at - priority * aging_s (aging 60 s)
    lane.enqueue("low-1", key=100.0)
    lane.enqueue("low-2", key=100.0)
    lane.enqueue("high", key=101.0 - 5 * 60.0)
    lane.enqueue("low-3", key=100.0)
    assert _launch_order(lane) == ["high", "low-1", "low-2", "low-3"]


def test_waiting_long_enough_beats_any_priority() -> None:
    lane = lanes.Lane("local", 1, max_attempts=5, budget_s=60.0)
    lane.enqueue("old", key=0.0)  # priority 0, queued at 0
    lane.enqueue("urgent", key=700.0 - 10 * 60.0)  # priority 10, queued 700 s later
    assert _launch_order(lane) == ["old", "urgent"]


def test_a_start_retried_later_keeps_its_place_by_key() -> None:
    lane = lanes.Lane("local", 1, max_attempts=5, budget_s=60.0)
    lane.enqueue("first", key=-100.0)
    assert [a.job_id for a in lane.due(0.0)] == ["first"]
    lane.retry_at("first", 5.0)  # its start failed: back in the queue at 5
    lane.enqueue("second", key=0.0)
    assert [a.job_id for a in lane.due(1.0)] == ["second"]
    lane.ended("second")
    assert [a.job_id for a in lane.due(5.0)] == ["first"]


# -- devices (the local backend's GPUs) -------------------------------------------------------


def _gpu_lane(cap: int = 10) -> lanes.Lane:
    return lanes.Lane("local", cap, max_attempts=3, budget_s=60, devices=["0", "1", "2"])


def _launches(actions: list[lanes.Action]) -> list[str]:
    return [a.job_id for a in actions if isinstance(a, lanes.Launch)]


def test_a_job_waits_for_its_devices_and_those_behind_it_that_fit_go_first() -> None:
    lane = _gpu_lane()
    lane.enqueue("two", gpus=2)
    lane.enqueue("big", gpus=2)  # only one left after "two"
    lane.enqueue("cpu")
    lane.enqueue("one", gpus=1)
    assert _launches(lane.due(0.0)) == ["two", "cpu", "one"]
    assert (lane.devices_of("two"), lane.devices_of("one")) == (("0", "1"), ("2",))
    assert lane.devices_of("cpu") == ()
    assert _launches(lane.due(0.0)) == []  # "big" still waits
    lane.ended("one")  # one device back: not enough
    assert _launches(lane.due(0.0)) == []
    lane.ended("two")
    assert _launches(lane.due(0.0)) == ["big"]
    assert lane.devices_of("big") == ("0", "1")  # in their configured order


def test_devices_come_back_on_every_way_out_of_flight() -> None:
    lane = _gpu_lane()
    lane.enqueue("a", gpus=3)
    assert _launches(lane.due(0.0)) == ["a"]
    lane.retry_at("a", 5.0)  # a start failed: devices freed while it waits
    lane.enqueue("b", gpus=3)
    assert _launches(lane.due(1.0)) == ["b"]
    lane.release("b")  # a final start failure
    assert _launches(lane.due(6.0)) == ["a"]
    lane.requeue_at("a", 10.0, gpus=3)  # its attempt failed and is retried
    lane.enqueue("c", gpus=3)
    assert _launches(lane.due(7.0)) == ["c"]
    lane.ended("c")
    assert _launches(lane.due(10.0)) == ["a"]
    assert lane.devices_of("a") == ("0", "1", "2")


def test_an_adopted_job_holds_the_devices_its_launch_recorded() -> None:
    lane = _gpu_lane()
    lane.adopt("old", ["1", "7"])  # "7" is not this lane's any more: ignored
    assert lane.devices_of("old") == ("1",)
    lane.enqueue("new", gpus=2)
    assert _launches(lane.due(0.0)) == ["new"]
    assert lane.devices_of("new") == ("0", "2")
    lane.enqueue("more", gpus=1)
    assert _launches(lane.due(0.0)) == []
    lane.ended("old")
    assert _launches(lane.due(0.0)) == ["more"]
    assert lane.devices_of("more") == ("1",)


def test_a_waiting_job_still_expires_at_its_deadline() -> None:
    lane = _gpu_lane()
    lane.enqueue("hog", gpus=3)
    lane.enqueue("late", queue_deadline=5.0, gpus=1)
    assert _launches(lane.due(0.0)) == ["hog"]
    assert [type(a).__name__ for a in lane.due(5.0)] == ["Expire"]
    lane.ended("hog")
    assert lane.due(6.0) == []
