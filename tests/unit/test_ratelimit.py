"""`orchestrator.ratelimit`: token buckets with AIMD, served by priority, timers instead of polls.

Two kinds of tests. With a `ManualClock` the bucket's arithmetic is exact: no token accrues until
the test advances the clock (the loop timer still fires on real time and finds nothing, so those
buckets use high rates to keep that re-check at ~1 ms). With the real clock, assertions are lower
bounds on elapsed time and counts, which a loaded machine can only make easier to satisfy.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import ratelimit
from orchestrator.ratelimit import Priority, TokenBucket

pytestmark = pytest.mark.timeout(10)

BOUND_S = 3.0  # every wait in this file; generous for a loaded 2-core machine


@dataclass
class ManualClock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def settle() -> None:
    """Let every ready task run one step (enqueue, or return from a granted wait)."""
    for _ in range(3):
        await asyncio.sleep(0)


# --- pure functions --------------------------------------------------------------------------


def test_refilled_accrues_at_rate_and_caps_at_burst() -> None:
    assert ratelimit.refilled(0.0, 0.25, 8.0, 10.0) == 2.0
    assert ratelimit.refilled(9.0, 5.0, 8.0, 10.0) == 10.0
    assert ratelimit.refilled(3.0, -1.0, 8.0, 10.0) == 3.0  # a clock running back adds nothing


def test_time_until_token() -> None:
    assert ratelimit.time_until_token(0.0, 4.0) == 0.25
    assert ratelimit.time_until_token(0.5, 4.0) == 0.125
    assert ratelimit.time_until_token(1.0, 4.0) == 0.0
    assert ratelimit.time_until_token(7.0, 4.0) == 0.0
    assert ratelimit.time_until_token(1.0 - 1e-12, 4.0) == 0.0  # float rounding is forgiven


def test_aimd_steps() -> None:
    assert ratelimit.decreased(40.0, 2.0) == 20.0
    assert ratelimit.decreased(3.0, 2.0) == 2.0
    assert ratelimit.increased(30.0, 2.0, 40.0) == 32.0
    assert ratelimit.increased(39.0, 2.0, 40.0) == 40.0


# --- construction ----------------------------------------------------------------------------


def test_defaults() -> None:
    bucket = TokenBucket("ecs-run-stop", 40.0, 100.0, clock=ManualClock())
    assert (bucket.name, bucket.rate_per_s, bucket.configured_rate_per_s, bucket.burst) == (
        "ecs-run-stop",
        40.0,
        40.0,
        100.0,
    )
    assert bucket.min_rate_per_s == pytest.approx(2.0)
    assert bucket.snapshot() == {
        "name": "ecs-run-stop",
        "rate_per_s": 40.0,
        "configured_rate_per_s": 40.0,
        "tokens": 100.0,
        "waiters": 0,
        "throttles": 0,
        "granted": 0,
    }


@pytest.mark.parametrize(
    ("rate", "burst", "min_rate"),
    [
        (0.0, 10.0, None),
        (-1.0, 10.0, None),
        (math.inf, 10.0, None),
        (math.nan, 10.0, None),
        (10.0, 0.5, None),
        (10.0, math.inf, None),
        (10.0, 10.0, 0.0),
        (10.0, 10.0, 11.0),
    ],
)
def test_rejects_bad_parameters(rate: float, burst: float, min_rate: float | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket("x", rate, burst, min_rate_per_s=min_rate)


# --- burst, then the rate --------------------------------------------------------------------


async def test_burst_is_available_at_once_then_the_rate_limits() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 5.0, clock=clock)
    async with asyncio.timeout(BOUND_S):
        for _ in range(5):
            await bucket.acquire()  # the fast path: no waiting at all
        assert bucket.snapshot()["tokens"] == 0.0
        assert bucket._time_until_token() == pytest.approx(0.001)

        waiters = [asyncio.create_task(bucket.acquire()) for _ in range(3)]
        await asyncio.sleep(0.02)  # the timer fires ~20 times and finds the clock stopped
        assert not any(w.done() for w in waiters)
        assert bucket.snapshot()["waiters"] == 3

        clock.advance(0.0015)  # 1.5 tokens: exactly one waiter
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.01)  # time for a wrong second grant to show
        assert [w.done() for w in waiters] == [True, False, False]
        assert bucket.snapshot()["tokens"] == pytest.approx(0.5)

        clock.advance(0.0015)  # 2 tokens, for the two left
        await asyncio.gather(*waiters)
    snap = bucket.snapshot()
    assert (snap["granted"], snap["waiters"]) == (8, 0)
    assert snap["tokens"] == pytest.approx(0.0, abs=1e-6)


async def test_refill_never_exceeds_burst() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 3.0, clock=clock)
    async with asyncio.timeout(BOUND_S):
        for _ in range(3):
            await bucket.acquire()
        clock.advance(3_600.0)
        assert bucket.snapshot()["tokens"] == 3.0
        for _ in range(3):
            await bucket.acquire()
        fourth = asyncio.create_task(bucket.acquire())
        await settle()
        assert not fourth.done()
        clock.advance(0.001)
        await fourth


async def test_real_time_burst_at_once_then_the_rate() -> None:
    rate, burst, n = 1_000.0, 50.0, 250
    bucket = TokenBucket("b", rate, burst)
    granted = 0

    async def one() -> None:
        nonlocal granted
        await bucket.acquire()
        granted += 1

    start = time.monotonic()
    async with asyncio.timeout(BOUND_S):
        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await settle()
        elapsed_s = time.monotonic() - start
        # the burst went out at once; beyond it, only what the rate allowed in the time measured
        # (which a slow machine can only overstate)
        assert burst <= granted <= burst + rate * elapsed_s + 1
        await asyncio.gather(*tasks)
    # the other 200 tokens need 0.2 s at 1,000/s; 5 ms for the granularity of the start mark
    assert time.monotonic() - start >= (n - burst) / rate - 0.005
    assert granted == n


# --- priority --------------------------------------------------------------------------------


async def test_high_arriving_after_low_is_served_first() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 10.0, clock=clock)
    order: list[str] = []

    async def one(label: str, priority: Priority) -> None:
        await bucket.acquire(priority)
        order.append(label)

    async with asyncio.timeout(BOUND_S):
        for _ in range(10):
            await bucket.acquire()
        tasks = [asyncio.create_task(one(f"low{i}", Priority.LOW)) for i in range(3)]
        await settle()
        tasks.append(asyncio.create_task(one("normal", Priority.NORMAL)))
        await settle()
        tasks += [asyncio.create_task(one(f"high{i}", Priority.HIGH)) for i in range(2)]
        await settle()
        assert order == []
        assert bucket.snapshot()["waiters"] == 6

        clock.advance(0.006)
        await asyncio.gather(*tasks)
    assert order == ["high0", "high1", "normal", "low0", "low1", "low2"]


async def test_tokens_trickle_to_the_best_waiter_one_at_a_time() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 1.0, clock=clock)
    await bucket.acquire()
    low = asyncio.create_task(bucket.acquire(Priority.LOW))
    await settle()
    high = asyncio.create_task(bucket.acquire(Priority.HIGH))
    await settle()
    async with asyncio.timeout(BOUND_S):
        clock.advance(0.001)
        await high
        await asyncio.sleep(0.01)
        assert not low.done()
        clock.advance(0.001)
        await low


async def test_a_newcomer_queues_behind_waiters_even_if_tokens_accrued() -> None:
    """Once someone waits, tokens go out by priority, not to whoever happens to call next."""
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 1.0, clock=clock)
    await bucket.acquire()
    high = asyncio.create_task(bucket.acquire(Priority.HIGH))
    await settle()
    clock.advance(0.001)  # a token accrues; the timer has not fired yet
    late_low = asyncio.create_task(bucket.acquire(Priority.LOW))
    await settle()
    assert high.done()
    assert not late_low.done()
    async with asyncio.timeout(BOUND_S):
        clock.advance(0.001)
        await late_low
    assert bucket.snapshot()["granted"] == 3


# --- AIMD ------------------------------------------------------------------------------------


def test_throttled_halves_the_rate_floors_at_min_and_zeroes_tokens() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 100.0, 10.0, clock=clock)
    assert bucket._time_until_token() == 0.0
    bucket.throttled()
    assert bucket.rate_per_s == 50.0
    assert bucket.snapshot()["tokens"] == 0.0
    assert bucket._time_until_token() == pytest.approx(1 / 50)
    rates = []
    for _ in range(6):
        bucket.throttled()
        rates.append(bucket.rate_per_s)
    assert rates == [25.0, 12.5, 6.25, 5.0, 5.0, 5.0]  # floor: 5% of 100
    assert bucket.snapshot()["throttles"] == 7
    assert bucket.configured_rate_per_s == 100.0


def test_throttled_accrues_at_the_old_rate_before_the_change() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 100.0, 10.0, min_rate_per_s=1.0, clock=clock)
    bucket.throttled()  # 50/s, 0 tokens
    clock.advance(0.01)  # 0.5 tokens at 50/s
    bucket.succeeded()  # 55/s from here on
    assert bucket.snapshot()["tokens"] == pytest.approx(0.5)
    assert bucket._time_until_token() == pytest.approx(0.5 / 55)


def test_explicit_min_rate() -> None:
    bucket = TokenBucket("b", 100.0, 10.0, min_rate_per_s=30.0, clock=ManualClock())
    bucket.throttled()
    bucket.throttled()
    assert bucket.rate_per_s == 30.0


def test_succeeded_grows_back_to_configured_and_never_beyond() -> None:
    bucket = TokenBucket("b", 100.0, 10.0, clock=ManualClock())
    bucket.succeeded()
    assert bucket.rate_per_s == 100.0
    for _ in range(10):
        bucket.throttled()
    assert bucket.rate_per_s == 5.0
    rates = []
    for _ in range(21):
        bucket.succeeded()
        rates.append(bucket.rate_per_s)
    assert rates[:3] == [10.0, 15.0, 20.0]  # + 5% of the configured 100 each
    assert rates[18:] == [100.0, 100.0, 100.0]
    assert all(a <= b for a, b in itertools.pairwise(rates))


async def test_throttled_rearms_the_timer_slower_and_succeeded_faster() -> None:
    bucket = TokenBucket("b", 1_000.0, 1.0, min_rate_per_s=0.1)
    await bucket.acquire()
    waiter = asyncio.create_task(bucket.acquire())
    await settle()  # queued, timer armed for ~1 ms from now
    for _ in range(14):  # 1000 / 2^14 < 0.1: floored at 0.1/s, the next token is ~10 s away
        bucket.throttled()
    assert bucket.rate_per_s == 0.1
    await asyncio.sleep(0.05)  # the old 1 ms timer would have granted it by now
    assert not waiter.done()
    for _ in range(20):  # back to 1,000/s: the timer is re-armed for about a millisecond
        bucket.succeeded()
    assert bucket.rate_per_s == 1_000.0
    async with asyncio.timeout(BOUND_S):  # well short of the 10 s the slow schedule said
        await waiter


async def test_a_throttle_takes_away_the_burst() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 50.0, clock=clock)
    bucket.throttled()
    waiter = asyncio.create_task(bucket.acquire(Priority.HIGH))
    await settle()
    assert not waiter.done()
    clock.advance(1 / 500)
    async with asyncio.timeout(BOUND_S):
        await waiter


@settings(deadline=None)  # pure arithmetic; a loaded CI machine must not fail it on time
@given(
    rate=st.floats(min_value=0.01, max_value=1e6),
    min_fraction=st.floats(min_value=1e-6, max_value=1.0),
    outcomes=st.lists(st.booleans(), max_size=200),
)
def test_rate_stays_within_min_and_configured(
    rate: float, min_fraction: float, outcomes: list[bool]
) -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", rate, 10.0, min_rate_per_s=rate * min_fraction, clock=clock)
    for ok in outcomes:
        clock.advance(0.01)
        if ok:
            bucket.succeeded()
        else:
            bucket.throttled()
        assert bucket.min_rate_per_s <= bucket.rate_per_s <= bucket.configured_rate_per_s
        assert 0.0 <= bucket.snapshot()["tokens"] <= bucket.burst
    for _ in range(21):  # 20 steps of 5% climb from anywhere, one more for float rounding
        bucket.succeeded()
    assert bucket.rate_per_s == bucket.configured_rate_per_s


# --- cancellation ----------------------------------------------------------------------------


async def test_cancelled_waiter_takes_no_token_and_blocks_nobody() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 1.0, clock=clock)
    await bucket.acquire()
    first = asyncio.create_task(bucket.acquire(Priority.HIGH))
    second = asyncio.create_task(bucket.acquire(Priority.LOW))
    await settle()
    first.cancel()
    await settle()
    assert first.cancelled()
    assert bucket.snapshot()["waiters"] == 1
    async with asyncio.timeout(BOUND_S):
        clock.advance(0.001)
        await second
    snap = bucket.snapshot()
    assert (snap["granted"], snap["waiters"]) == (2, 0)
    assert snap["tokens"] == pytest.approx(0.0, abs=1e-6)


async def test_timeout_while_waiting_raises_and_leaves_the_bucket_clean() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 1.0, clock=clock)
    await bucket.acquire()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await bucket.acquire()
    assert bucket.snapshot()["waiters"] == 0
    assert bucket._timer is None  # nothing left armed for nobody
    clock.advance(0.001)
    async with asyncio.timeout(BOUND_S):
        await bucket.acquire()  # the token the timed-out caller never took
    assert bucket.snapshot()["granted"] == 2


async def test_cancelled_in_the_tick_it_was_granted_gives_the_token_back() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 1.0, min_rate_per_s=1.0, clock=clock)
    await bucket.acquire()
    bucket.throttled()  # 500/s
    first = asyncio.create_task(bucket.acquire())
    second = asyncio.create_task(bucket.acquire())
    await settle()
    clock.advance(1 / 500)
    bucket.succeeded()  # re-arms, so dispatches now: `first` is granted but has not resumed
    assert bucket.snapshot()["granted"] == 2
    first.cancel()  # ...and is cancelled before it can
    async with asyncio.timeout(BOUND_S):
        await second
    assert first.cancelled()
    snap = bucket.snapshot()
    assert (snap["granted"], snap["waiters"]) == (2, 0)


async def test_many_cancelled_waiters_are_compacted_away() -> None:
    clock = ManualClock()
    bucket = TokenBucket("b", 1_000.0, 1.0, clock=clock)
    await bucket.acquire()
    keeper = asyncio.create_task(bucket.acquire(Priority.LOW))
    doomed = [asyncio.create_task(bucket.acquire(Priority.HIGH)) for _ in range(500)]
    await settle()
    for task in doomed:
        task.cancel()
    await settle()
    assert all(t.cancelled() for t in doomed)
    assert bucket.snapshot()["waiters"] == 1
    assert len(bucket._heap) < 100
    clock.advance(0.001)
    async with asyncio.timeout(BOUND_S):
        await keeper


# --- load ------------------------------------------------------------------------------------


async def test_a_thousand_concurrent_acquirers_all_get_through() -> None:
    bucket = TokenBucket("b", 5_000.0, 100.0)
    priorities = list(Priority)
    start = time.monotonic()
    async with asyncio.timeout(BOUND_S):
        await asyncio.gather(
            *(bucket.acquire(priorities[i % len(priorities)]) for i in range(1_000))
        )
    assert time.monotonic() - start >= 900 / 5_000 - 0.005
    snap = bucket.snapshot()
    assert (snap["granted"], snap["waiters"]) == (1_000, 0)
    assert bucket._timer is None
