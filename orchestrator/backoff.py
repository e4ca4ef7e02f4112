"""Jittered exponential delays: small pure functions, clamped, overflow-safe, rng injected."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Protocol

Jitter = Literal["full", "equal", "none"]


class Uniform(Protocol):
    """The one method of `random.Random` these functions use; tests pass a seeded one."""

    def uniform(self, a: float, b: float) -> float: ...


def exponential(n: int, *, base_s: float, factor: float, cap_s: float) -> float:
    """`min(cap, base · factor^n)` without ever overflowing, for any n ≥ 0."""
    if n <= 0 or factor <= 1.0 or base_s <= 0.0 or cap_s <= base_s:
        return min(cap_s, base_s)
    # base · factor^n ≥ cap  ⇔  n ≥ log(cap / base) / log(factor): no need to compute it
    if math.isfinite(cap_s) and n >= math.log(cap_s / base_s) / math.log(factor):
        return cap_s
    try:
        return min(cap_s, base_s * factor**n)
    except OverflowError:
        return cap_s


def jitter(delay_s: float, kind: Jitter, rng: Uniform) -> float:
    """Full jitter spreads over [0, d]; equal jitter over [d/2, d]; none keeps d."""
    if kind == "full":
        return rng.uniform(0.0, delay_s)
    if kind == "equal":
        return delay_s / 2 + rng.uniform(0.0, delay_s / 2)
    return delay_s


@dataclass(frozen=True, slots=True)
class Policy:
    """A back-off schedule: `delay(n) = max(floor, jitter(min(cap, base · factor^n)))`.

    With `cap_band` set, a delay that reached the cap is drawn from [cap·(1 - band), cap]
    instead: a job polled at the cap for hours needs no wide spread (its polls are batched
    anyway), and a narrow one keeps the detection lag near the cap and the call count down.
    """

    base_s: float
    factor: float
    cap_s: float
    jitter: Jitter = "equal"
    floor_s: float = 0.0
    cap_band: float | None = None

    def delay(self, n: int, rng: Uniform) -> float:
        raw = exponential(n, base_s=self.base_s, factor=self.factor, cap_s=self.cap_s)
        if self.cap_band is not None and raw >= self.cap_s and self.jitter != "none":
            return max(self.floor_s, raw - rng.uniform(0.0, raw * self.cap_band))
        return max(self.floor_s, jitter(raw, self.jitter, rng))


def default_rng() -> random.Random:
    return random.Random()
