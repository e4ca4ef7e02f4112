"""`engine.tracking.Tracker`: when each tracked job is due to be described (back-off, deadlines,
stops), and how due jobs are handed out in batches (grouping, batch size, fill-ahead, busy)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import pytest

from orchestrator import backoff, models
from orchestrator.engine.tracking import Group, Tracked, Tracker
from tests.unit.engine.support import WakeCounter, make_job

S = models.JobState
GROUP: Group = ("local", "default")
# No jitter: delay(n) = 4, 8, 16, 32 (the cap); the rng is never drawn from.
FIXED = backoff.Policy(base_s=4.0, factor=2.0, cap_s=32.0, jitter="none")
JITTERED = backoff.Policy(base_s=1.0, factor=2.0, cap_s=8.0, jitter="equal")
SEED = 20240607


def _tracker(
    policy: backoff.Policy = FIXED,
    *,
    rng: backoff.Uniform | None = None,
    fill_ahead_s: float = 0.0,
    sizes: Mapping[str, int] | None = None,
    wake: Callable[[], None] | None = None,
) -> Tracker:
    batch_sizes = dict(sizes or {"local": 100})
    return Tracker(
        policy,
        rng or random.Random(SEED),
        fill_ahead_s=fill_ahead_s,
        batch_size=batch_sizes.__getitem__,
        wake=wake or (lambda: None),
    )


def _entry(tracker: Tracker, job_id: str) -> Tracked:
    entry = tracker.get(job_id)
    assert entry is not None
    return entry


def _ids(batches: list[tuple[Group, list[Tracked]]]) -> list[tuple[Group, list[str]]]:
    return [(group, [entry.job.id for entry in batch]) for group, batch in batches]


# -- track ----------------------------------------------------------------------------------------


def test_a_tracked_job_is_first_due_after_the_policys_first_delay() -> None:
    tracker = _tracker(JITTERED, rng=random.Random(SEED))
    assert tracker.track(make_job(job_id="a"), GROUP, 100.0) is True
    assert tracker.track(make_job(job_id="b"), GROUP, 100.0) is True
    same = random.Random(SEED)
    first, second = JITTERED.delay(0, same), JITTERED.delay(0, same)
    assert first != second  # the draws are the rng's, in order
    assert _entry(tracker, "a").due == 100.0 + first
    assert _entry(tracker, "b").due == 100.0 + second
    assert tracker.next_due() == 100.0 + min(first, second)
    assert len(tracker) == 2


@pytest.mark.parametrize("why", ["cancel", "timeout", "queue_timeout"])
def test_a_job_being_stopped_is_due_at_once_when_tracked(why: models.StopReason) -> None:
    tracker = _tracker()
    tracker.track(make_job(stop_reason=why), GROUP, 100.0)
    assert _entry(tracker, "job-1").due == 100.0
    assert [batch for _, batch in tracker.take_batches(100.0)] == [[_entry(tracker, "job-1")]]


def test_a_job_whose_stop_is_unrecorded_is_due_at_once_when_tracked() -> None:
    tracker = _tracker()
    tracker.stop_unrecorded("job-1", "cancel", 50.0)
    tracker.track(make_job(), GROUP, 100.0)
    assert _entry(tracker, "job-1").due == 100.0


@pytest.mark.parametrize("state", sorted(models.TERMINAL))
def test_a_terminal_job_is_not_tracked(state: models.JobState) -> None:
    tracker = _tracker()
    assert tracker.track(make_job(state), GROUP, 0.0) is False
    assert tracker.get("job-1") is None
    assert len(tracker) == 0
    assert tracker.take_batches(1_000.0) == []


def test_tracking_a_terminal_copy_of_a_tracked_job_untracks_it() -> None:
    tracker = _tracker()
    tracker.track(make_job(S.RUNNING), GROUP, 0.0)
    assert tracker.track(make_job(S.SUCCEEDED), GROUP, 1.0) is False
    assert tracker.get("job-1") is None
    assert tracker.take_batches(1_000.0) == []


# -- batches --------------------------------------------------------------------------------------


def test_due_jobs_are_grouped_by_backend_and_partition_and_split_by_batch_size() -> None:
    tracker = _tracker(sizes={"local": 2, "ecs": 3})
    local_a, local_b, ecs_a = ("local", "a"), ("local", "b"), ("ecs", "a")
    for i in range(5):
        tracker.track(make_job(job_id=f"la{i}"), local_a, 0.0)
    tracker.track(make_job(job_id="lb0"), local_b, 0.0)
    for i in range(4):
        tracker.track(make_job(job_id=f"ea{i}", backend="ecs"), ecs_a, 0.0)
    assert tracker.take_batches(3.999) == []
    assert sorted(_ids(tracker.take_batches(4.0))) == [
        (ecs_a, ["ea0", "ea1", "ea2"]),
        (ecs_a, ["ea3"]),
        (local_a, ["la0", "la1"]),
        (local_a, ["la2", "la3"]),
        (local_a, ["la4"]),
        (local_b, ["lb0"]),
    ]


def _fill_ahead_case(fill_ahead_s: float) -> Tracker:
    """a due at 10; b due at 11 and c at 13, each with a delay of 4: at 10, b is 1 s early (at
    most half its delay), c would be 3 s early (more than half)."""
    tracker = _tracker(fill_ahead_s=fill_ahead_s, sizes={"local": 3})
    for job_id, at in (("a", 6.0), ("b", 7.0), ("c", 9.0)):
        tracker.track(make_job(job_id=job_id), GROUP, at)
    assert [_entry(tracker, i).due for i in "abc"] == [10.0, 11.0, 13.0]
    return tracker


def test_a_partial_batch_is_topped_up_only_with_jobs_due_within_half_their_delay() -> None:
    tracker = _fill_ahead_case(fill_ahead_s=5.0)
    assert _ids(tracker.take_batches(10.0)) == [(GROUP, ["a", "b"])]
    c = _entry(tracker, "c")
    assert not c.busy
    assert c.due == 13.0
    assert tracker.next_due() == 13.0
    assert _ids(tracker.take_batches(13.0)) == [(GROUP, ["c"])]


def test_a_partial_batch_is_topped_up_only_within_fill_ahead() -> None:
    tracker = _fill_ahead_case(fill_ahead_s=0.5)
    assert _ids(tracker.take_batches(10.0)) == [(GROUP, ["a"])]
    assert _ids(tracker.take_batches(11.0)) == [(GROUP, ["b"])]


def test_jobs_due_soon_are_not_taken_when_nothing_is_due() -> None:
    tracker = _fill_ahead_case(fill_ahead_s=5.0)
    assert tracker.take_batches(9.9) == []


def test_a_full_batch_is_not_topped_up() -> None:
    tracker = _tracker(fill_ahead_s=5.0, sizes={"local": 1})
    tracker.track(make_job(job_id="a"), GROUP, 6.0)
    tracker.track(make_job(job_id="b"), GROUP, 7.0)
    assert _ids(tracker.take_batches(10.0)) == [(GROUP, ["a"])]
    assert not _entry(tracker, "b").busy


def test_a_job_being_described_is_not_handed_out_again() -> None:
    tracker = _tracker()
    tracker.track(make_job(), GROUP, 0.0)
    [(_, [entry])] = tracker.take_batches(4.0)
    assert entry.busy
    assert tracker.take_batches(1_000.0) == []
    tracker.poke("job-1", 5.0)
    assert tracker.take_batches(1_000.0) == []
    tracker.polled(entry, 6.0)
    assert not entry.busy
    assert tracker.take_batches(1_000.0) == [(GROUP, [entry])]


# -- poke, polled ---------------------------------------------------------------------------------


def test_a_poke_while_idle_makes_the_job_due_now_and_wakes() -> None:
    wake = WakeCounter()
    tracker = _tracker(wake=wake)
    tracker.track(make_job(), GROUP, 0.0)
    assert _entry(tracker, "job-1").due == 4.0
    wake.take()
    tracker.poke("job-1", 1.0)
    assert wake.calls == 1
    assert _entry(tracker, "job-1").due == 1.0
    assert tracker.next_due() == 1.0
    assert _ids(tracker.take_batches(1.0)) == [(GROUP, ["job-1"])]


def test_a_poke_while_busy_makes_the_job_due_at_once_after_polled() -> None:
    tracker = _tracker()
    tracker.track(make_job(), GROUP, 0.0)
    [(_, [entry])] = tracker.take_batches(4.0)
    entry.n = 3  # the describe found nothing new, thrice: would be 32 s
    tracker.poke("job-1", 5.0)
    tracker.polled(entry, 6.0)
    assert entry.due == 6.0
    assert not entry.poked  # once
    [(_, [again])] = tracker.take_batches(6.0)
    tracker.polled(again, 7.0)
    assert again.due == 7.0 + 32.0


def test_a_poke_of_an_untracked_job_is_ignored() -> None:
    tracker = _tracker()
    tracker.poke("nobody", 0.0)
    assert tracker.next_due() is None
    assert len(tracker) == 0


@pytest.mark.parametrize(("n", "delay"), [(0, 4.0), (1, 8.0), (2, 16.0), (3, 32.0), (9, 32.0)])
def test_polled_reschedules_after_the_back_off_for_the_entrys_count(n: int, delay: float) -> None:
    tracker = _tracker()
    tracker.track(make_job(), GROUP, 0.0)
    [(_, [entry])] = tracker.take_batches(4.0)
    entry.n = n
    tracker.polled(entry, 10.0)
    assert entry.due == 10.0 + delay
    assert entry.delay == delay
    assert tracker.next_due() == 10.0 + delay


def test_polled_draws_its_jitter_from_the_injected_rng() -> None:
    tracker = _tracker(JITTERED, rng=random.Random(SEED))
    tracker.track(make_job(), GROUP, 0.0)
    [(_, [entry])] = tracker.take_batches(1_000.0)
    entry.n = 2
    tracker.polled(entry, 1_000.0)
    same = random.Random(SEED)
    JITTERED.delay(0, same)  # track's draw
    assert entry.due == 1_000.0 + JITTERED.delay(2, same)


def test_polled_does_not_reschedule_a_job_untracked_meanwhile() -> None:
    tracker = _tracker()
    tracker.track(make_job(), GROUP, 0.0)
    [(_, [entry])] = tracker.take_batches(4.0)
    tracker.untrack("job-1")
    tracker.polled(entry, 5.0)
    assert tracker.next_due() is None
    assert tracker.take_batches(1_000.0) == []


def test_an_update_replaces_the_job_resets_its_count_and_makes_it_due_now() -> None:
    tracker = _tracker()
    tracker.track(make_job(), GROUP, 0.0)
    entry = _entry(tracker, "job-1")
    entry.n = 3
    newer = make_job(stop_reason="cancel")
    tracker.update(newer, 2.0)
    assert entry.job is newer
    assert entry.n == 0
    assert entry.due == 2.0


# -- deadlines ------------------------------------------------------------------------------------


def test_a_run_deadline_sooner_than_the_back_off_sets_the_due_time() -> None:
    tracker = _tracker()
    tracker.track(make_job(S.RUNNING, running_since=0.0, timeout_s=2.0), GROUP, 1.0)
    entry = _entry(tracker, "job-1")
    assert entry.due == 2.0  # not 1 + 4
    assert entry.delay == 1.0


def test_a_queue_deadline_sooner_than_the_back_off_sets_the_due_time() -> None:
    tracker = _tracker()
    job = make_job(S.RUNNABLE, created_at=1_000.0, queue_timeout_s=3.0)
    tracker.track(job, GROUP, 1_001.0)
    assert _entry(tracker, "job-1").due == 1_003.0


def test_a_deadline_later_than_the_back_off_changes_nothing() -> None:
    tracker = _tracker()
    tracker.track(make_job(S.RUNNING, running_since=0.0, timeout_s=100.0), GROUP, 1.0)
    assert _entry(tracker, "job-1").due == 5.0


def test_a_job_past_its_deadline_is_due_at_once_after_each_poll_until_stopped() -> None:
    tracker = _tracker()
    tracker.track(make_job(S.RUNNING, running_since=0.0, timeout_s=2.0), GROUP, 1.0)
    [(_, [entry])] = tracker.take_batches(2.0)
    tracker.polled(entry, 3.0)
    assert entry.due <= 3.0


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "unrecorded"])
def test_a_deadline_does_not_cap_the_due_time_of_a_job_being_stopped(recorded: bool) -> None:
    tracker = _tracker()
    job = make_job(
        S.RUNNING, running_since=0.0, timeout_s=2.0, stop_reason="timeout" if recorded else None
    )
    tracker.track(job, GROUP, 3.0)
    if not recorded:
        tracker.stop_unrecorded("job-1", "timeout", 3.0)
    entry = _entry(tracker, "job-1")
    assert entry.due == 3.0  # the stop: at once
    tracker.take_batches(3.0)
    tracker.polled(entry, 3.0)
    assert entry.due == 3.0 + 4.0  # the back-off, not the deadline long passed


# -- stops the store could not record -------------------------------------------------------------


def test_an_unrecorded_stop_is_answered_as_the_jobs_stop_and_polls_it_at_once() -> None:
    tracker = _tracker()
    job = make_job()
    tracker.track(job, GROUP, 0.0)
    entry = _entry(tracker, "job-1")
    entry.n = 3
    tracker.stop_unrecorded("job-1", "cancel", 1.0)
    assert tracker.stop_reason(job) == "cancel"
    assert tracker.pending_stop("job-1") == "cancel"
    assert tracker.unrecorded_stops() == {"job-1": "cancel"}
    assert entry.due == 1.0
    assert entry.n == 0
    tracker.stop_recorded("job-1")
    assert tracker.pending_stop("job-1") is None
    assert tracker.stop_reason(job) is None
    assert tracker.unrecorded_stops() == {}


def test_the_first_unrecorded_stop_of_a_job_is_kept() -> None:
    tracker = _tracker()
    tracker.stop_unrecorded("job-1", "queue_timeout", 0.0)
    tracker.stop_unrecorded("job-1", "cancel", 1.0)
    assert tracker.pending_stop("job-1") == "queue_timeout"


def test_an_unrecorded_stop_of_a_job_not_tracked_is_still_answered() -> None:
    tracker = _tracker()
    tracker.stop_unrecorded("queued-job", "cancel", 0.0)  # the dispatcher asks before launching
    assert tracker.pending_stop("queued-job") == "cancel"
    assert tracker.next_due() is None


def test_a_recorded_stop_is_the_jobs_stop() -> None:
    tracker = _tracker()
    tracker.stop_unrecorded("job-1", "cancel", 0.0)
    assert tracker.stop_reason(make_job(stop_reason="timeout")) == "timeout"
    assert tracker.pending_stop("job-1") == "cancel"


# -- settle ---------------------------------------------------------------------------------------


def test_settle_with_a_new_state_keeps_the_job_tracked_with_a_fresh_back_off() -> None:
    tracker = _tracker()
    tracker.track(make_job(S.SUBMITTED), GROUP, 0.0)
    [(_, [entry])] = tracker.take_batches(4.0)
    entry.n = 3
    running = make_job(S.RUNNING, running_since=4.0)
    assert tracker.settle(entry, running) is True
    assert entry.job is running
    assert entry.n == 0
    tracker.polled(entry, 5.0)
    assert entry.due == 5.0 + 4.0


@pytest.mark.parametrize("state", sorted(models.TERMINAL))
def test_settle_with_a_terminal_job_untracks_it(state: models.JobState) -> None:
    tracker = _tracker()
    tracker.track(make_job(S.RUNNING), GROUP, 0.0)
    [(_, [entry])] = tracker.take_batches(4.0)
    assert tracker.settle(entry, make_job(state)) is False
    assert tracker.get("job-1") is None
    assert len(tracker) == 0
    tracker.polled(entry, 5.0)
    assert tracker.take_batches(1_000.0) == []


# -- stale heap entries, next_due -----------------------------------------------------------------


def test_a_rescheduled_jobs_old_due_time_is_skipped() -> None:
    tracker = _tracker()
    tracker.track(make_job(), GROUP, 0.0)  # due at 4
    tracker.poke("job-1", 1.0)  # due at 1
    [(_, [entry])] = tracker.take_batches(1.0)
    tracker.polled(entry, 1.0)  # due at 5
    assert tracker.take_batches(4.0) == []  # the entry for 4 is stale
    assert _ids(tracker.take_batches(5.0)) == [(GROUP, ["job-1"])]


def test_an_untracked_jobs_due_time_is_skipped() -> None:
    tracker = _tracker()
    tracker.track(make_job(job_id="a"), GROUP, 0.0)
    tracker.track(make_job(job_id="b"), GROUP, 0.0)
    tracker.untrack("a")
    assert _ids(tracker.take_batches(4.0)) == [(GROUP, ["b"])]


def test_a_retracked_job_is_handed_out_once() -> None:
    tracker = _tracker()
    tracker.track(make_job(), GROUP, 0.0)
    tracker.track(make_job(), GROUP, 0.0)  # e.g. adopted again: both heap entries due at 4
    assert _ids(tracker.take_batches(4.0)) == [(GROUP, ["job-1"])]


def test_next_due_is_the_earliest_due_time_of_any_group() -> None:
    tracker = _tracker(sizes={"local": 10, "ecs": 10})
    assert tracker.next_due() is None
    tracker.track(make_job(job_id="a"), ("local", "p"), 10.0)  # due 14
    tracker.track(make_job(job_id="b", backend="ecs"), ("ecs", "p"), 5.0)  # due 9
    tracker.track(make_job(job_id="c"), ("local", "q"), 7.0)  # due 11
    assert tracker.next_due() == 9.0
    tracker.take_batches(9.0)
    assert tracker.next_due() == 11.0


@pytest.mark.parametrize("change", ["update", "stop_unrecorded"])
def test_a_change_while_the_job_is_being_described_has_it_polled_again_at_once(
    change: str,
) -> None:
    """The describe in flight may have looked before the change (a cancel): the job is due
    again as soon as that describe is over, not after a full back-off."""
    tracker = _tracker()
    job = make_job()
    tracker.track(job, GROUP, 0.0)
    ((_, [entry]),) = tracker.take_batches(4.0)
    if change == "update":
        tracker.update(job, 4.5)
    else:
        tracker.stop_unrecorded(job.id, "cancel", 4.5)
    tracker.polled(entry, 6.0)
    assert entry.due == 6.0
