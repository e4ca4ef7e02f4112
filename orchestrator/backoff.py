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
    """A back-off schedule: `delay(n) = max(floor, jitter(min(cap, base · factor^n)))`."""

    base_s: float
    factor: float
    cap_s: float
    jitter: Jitter = "equal"
    floor_s: float = 0.0

    def delay(self, n: int, rng: Uniform) -> float:
        raw = exponential(n, base_s=self.base_s, factor=self.factor, cap_s=self.cap_s)
        return max(self.floor_s, jitter(raw, self.jitter, rng))


def default_rng() -> random.Random:
    return random.Random()
