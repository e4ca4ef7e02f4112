"""Client-side token buckets, one per AWS API family, with AIMD rate control.

AWS meters each API family with a token bucket per account and Region (ECS: RunTask and StopTask
share one, DescribeTasks and ListTasks another; Batch SubmitJob has a fixed 50/s). Keeping our
own bucket in front of each family spends our share evenly instead of bursting into
`ThrottlingException`s and retrying.

The rate is steered by AIMD (additive increase, multiplicative decrease), the scheme TCP uses for
congestion: every throttled answer halves the current rate (never below a floor) and drops the
tokens on hand, every successful call adds a fixed 5% of the configured rate back (never above
it). Halving backs off fast when other clients in the account share the AWS bucket; the slow,
linear climb probes for the spare capacity without oscillating.

Waiters are served by priority, then in arrival order. Describes and stops come first: describes
keep the jobs that are already running observed (a stale view delays every completion), and
because ECS RunTask and StopTask draw from one AWS bucket, a stop (a cancel, a timeout, a
shutdown) must not queue behind a flood of new submissions. New submissions can always wait.

There is no background task and no polling: while anyone waits, one `loop.call_later` timer is
armed for the moment the next token will be whole, and it is re-armed whenever the rate changes.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import TypedDict

# Float rounding in `tokens + elapsed · rate` must not make a timer that fires on time miss its
# token by 1e-16 and re-arm for nothing.
_EPSILON = 1e-9
_INCREASE_FRACTION = 0.05  # succeeded(): + 5% of the configured rate
_DEFAULT_MIN_FRACTION = 0.05  # throttled() never goes below 5% of the configured rate


class Priority(enum.IntEnum):
    """Lower is served first."""

    HIGH = 0  # describe, stop: keep running jobs observed, let stops through
    NORMAL = 1  # list, locate
    LOW = 2  # new submissions


class Snapshot(TypedDict):
    """A bucket's state for metrics and logs."""

    name: str
    rate_per_s: float
    configured_rate_per_s: float
    tokens: float
    waiters: int
    throttles: int
    granted: int


def refilled(tokens: float, elapsed_s: float, rate_per_s: float, burst: float) -> float:
    """Tokens on hand after `elapsed_s` at `rate_per_s`, capped at `burst`; time never runs back."""
    return min(burst, tokens + max(0.0, elapsed_s) * rate_per_s)


def time_until_token(tokens: float, rate_per_s: float) -> float:
    """Seconds until one whole token is on hand at `rate_per_s`; 0 if one already is."""
    missing = 1.0 - tokens
    return 0.0 if missing <= _EPSILON else missing / rate_per_s


def decreased(rate_per_s: float, min_rate_per_s: float) -> float:
    """Multiplicative decrease: half the rate, never below the floor."""
    return max(min_rate_per_s, rate_per_s / 2)


def increased(rate_per_s: float, step_per_s: float, max_rate_per_s: float) -> float:
    """Additive increase: one step more, never above the ceiling."""
    return min(max_rate_per_s, rate_per_s + step_per_s)


# (priority, arrival number, future): the arrival number is unique, so futures never get compared
_Entry = tuple[int, int, "asyncio.Future[None]"]


class TokenBucket:
    """A token bucket whose refill rate follows AIMD; `acquire()` waits for one token."""

    def __init__(
        self,
        name: str,
        rate_per_s: float,
        burst: float,
        *,
        min_rate_per_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_rate_per_s is None:
            min_rate_per_s = rate_per_s * _DEFAULT_MIN_FRACTION
        if not (math.isfinite(rate_per_s) and rate_per_s > 0.0):
            raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s!r}")
        if not (math.isfinite(burst) and burst >= 1.0):
            raise ValueError(f"burst must be finite and >= 1, got {burst!r}")
        if not 0.0 < min_rate_per_s <= rate_per_s:
            raise ValueError(f"min_rate_per_s must be in (0, rate_per_s], got {min_rate_per_s!r}")
        self._name = name
        self._configured = rate_per_s
        self._min = min_rate_per_s
        self._burst = burst
        self._clock = clock
        self._rate = rate_per_s
        self._tokens = burst  # starts full
        self._stamp = clock()
        self._heap: list[_Entry] = []  # may hold cancelled entries, skipped when popped
        self._live = 0  # waiters in the heap that are not cancelled
        self._arrivals = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._throttles = 0
        self._granted = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def rate_per_s(self) -> float:
        """The current rate, after AIMD."""
        return self._rate

    @property
    def configured_rate_per_s(self) -> float:
        return self._configured

    @property
    def min_rate_per_s(self) -> float:
        return self._min

    @property
    def burst(self) -> float:
        return self._burst

    async def acquire(self, priority: int = Priority.NORMAL) -> None:
        """Wait for one token; waiters are served by (priority, arrival order)."""
        if self._live == 0:
            self._refill()
            if time_until_token(self._tokens, self._rate) == 0.0:
                self._take()
                return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._arrivals), fut))
        self._live += 1
        self._dispatch()  # tokens may have accrued since the timer was armed: serve by priority
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # granted in the same loop tick as the cancellation: the token goes back
                self._refill()
                self._tokens = min(self._burst, self._tokens + 1.0)
                self._granted -= 1
                self._dispatch()
            else:
                fut.cancel()
                self._forget_cancelled()
            raise

    def throttled(self) -> None:
        """The service answered "throttled": halve the rate and drop the tokens on hand."""
        self._refill()
        self._rate = decreased(self._rate, self._min)
        self._tokens = 0.0
        self._throttles += 1
        self._rearm()

    def succeeded(self) -> None:
        """A call went through: grow the rate by 5% of the configured one, up to it."""
        self._refill()
        rate = increased(self._rate, self._configured * _INCREASE_FRACTION, self._configured)
        if rate != self._rate:
            self._rate = rate
            self._rearm()

    def snapshot(self) -> Snapshot:
        elapsed_s = self._clock() - self._stamp
        return Snapshot(
            name=self._name,
            rate_per_s=self._rate,
            configured_rate_per_s=self._configured,
            tokens=refilled(self._tokens, elapsed_s, self._rate, self._burst),
            waiters=self._live,
            throttles=self._throttles,
            granted=self._granted,
        )

    def _time_until_token(self) -> float:
        """Seconds until the next token, by the injected clock (what the timer is armed for)."""
        self._refill()
        return time_until_token(self._tokens, self._rate)

    # --- internals -----------------------------------------------------------------------------

    def _refill(self) -> None:
        """Accrue tokens at the current rate up to now; call before every rate or token change."""
        now = self._clock()
        self._tokens = refilled(self._tokens, now - self._stamp, self._rate, self._burst)
        self._stamp = now

    def _take(self) -> None:
        self._tokens = max(0.0, self._tokens - 1.0)
        self._granted += 1

    def _dispatch(self) -> None:
        """Grant every whole token to the first live waiters, then arm the timer for the next."""
        self._refill()
        heap = self._heap
        while heap and time_until_token(self._tokens, self._rate) == 0.0:
            _, _, fut = heapq.heappop(heap)
            if fut.done():  # cancelled; its owner already counted it out of `_live`
                continue
            self._take()
            self._live -= 1
            fut.set_result(None)
        if self._live == 0:
            self._cancel_timer()
            heap.clear()
        elif self._timer is None:
            delay_s = time_until_token(self._tokens, self._rate)
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _rearm(self) -> None:
        """The schedule changed (rate or tokens): the armed timer is wrong either way."""
        self._cancel_timer()
        if self._live:
            self._dispatch()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _forget_cancelled(self) -> None:
        """One queued waiter was cancelled: drop it from the count; compact if mostly dead."""
        self._live -= 1
        if self._live == 0:
            self._cancel_timer()
            self._heap.clear()
        elif len(self._heap) > 2 * self._live + 64:
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
