"""`orchestrator.backoff`: clamped, overflow-safe exponential delays with injected jitter."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import backoff

bases = st.floats(min_value=1e-3, max_value=1e3)
factors = st.floats(min_value=1.0, max_value=10.0)
caps = st.floats(min_value=1e-3, max_value=1e6)
steps = st.integers(min_value=0, max_value=10**9)
delays = st.floats(min_value=0.0, max_value=1e6)
seeds = st.integers(min_value=0, max_value=2**32)
jitters = st.sampled_from(["full", "equal", "none"])


@dataclass
class ExtremeRng:
    """A `Uniform` that always answers the low (or high) end of the range it is asked for."""

    high: bool
    calls: list[tuple[float, float]] = field(default_factory=list)

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b if self.high else a


# --- exponential -----------------------------------------------------------------------------


@given(base=bases, factor=factors, cap=caps, n1=steps, n2=steps)
def test_exponential_is_monotone_in_n(
    base: float, factor: float, cap: float, n1: int, n2: int
) -> None:
    lo, hi = sorted((n1, n2))
    assert backoff.exponential(lo, base_s=base, factor=factor, cap_s=cap) <= backoff.exponential(
        hi, base_s=base, factor=factor, cap_s=cap
    )


@given(base=bases, factor=factors, cap=caps, n=steps)
def test_exponential_stays_within_base_and_cap(
    base: float, factor: float, cap: float, n: int
) -> None:
    delay = backoff.exponential(n, base_s=base, factor=factor, cap_s=cap)
    assert math.isfinite(delay)
    assert min(base, cap) <= delay <= cap


@given(base=bases, factor=factors, cap=caps)
def test_exponential_starts_at_base(base: float, factor: float, cap: float) -> None:
    assert backoff.exponential(0, base_s=base, factor=factor, cap_s=cap) == min(base, cap)


@given(base=bases, factor=st.floats(min_value=1.01, max_value=10.0), cap=caps)
def test_exponential_reaches_the_cap_without_overflowing(
    base: float, factor: float, cap: float
) -> None:
    for n in (5_000, 10**6, 10**9):  # 1.01^5000 > 1e9, the widest cap/base ratio here
        assert backoff.exponential(n, base_s=base, factor=factor, cap_s=cap) == cap


def test_exponential_grows_by_factor_until_the_cap() -> None:
    got = [backoff.exponential(n, base_s=0.5, factor=3.0, cap_s=20.0) for n in range(6)]
    assert got == [0.5, 1.5, 4.5, 13.5, 20.0, 20.0]


def test_exponential_with_factor_one_is_constant() -> None:
    got = {backoff.exponential(n, base_s=2.0, factor=1.0, cap_s=10.0) for n in (0, 1, 50, 10**9)}
    assert got == {2.0}


@pytest.mark.parametrize(
    ("base", "cap", "expected"),
    [(1.0, 0.0, 0.0), (1e308, 1e-20, 1e-20), (1.0, math.inf, math.inf)],
    ids=["zero-cap", "cap-ratio-underflows", "infinite-cap"],
)
def test_exponential_never_raises_for_any_cap(base: float, cap: float, expected: float) -> None:
    assert backoff.exponential(10**9, base_s=base, factor=2.0, cap_s=cap) == expected


# --- jitter ----------------------------------------------------------------------------------


@given(delay=delays, seed=seeds)
def test_full_jitter_is_within_zero_and_delay(delay: float, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        assert 0.0 <= backoff.jitter(delay, "full", rng) <= delay


@given(delay=delays, seed=seeds)
def test_equal_jitter_is_within_half_and_delay(delay: float, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        assert delay / 2 <= backoff.jitter(delay, "equal", rng) <= delay


@given(delay=delays)
def test_no_jitter_keeps_the_delay_and_draws_nothing(delay: float) -> None:
    rng = ExtremeRng(high=True)
    assert backoff.jitter(delay, "none", rng) == delay
    assert rng.calls == []


@pytest.mark.parametrize(
    ("kind", "high", "expected"),
    [
        ("full", False, 0.0),
        ("full", True, 8.0),
        ("equal", False, 4.0),
        ("equal", True, 8.0),
        ("none", False, 8.0),
        ("none", True, 8.0),
    ],
)
def test_jitter_extremes(kind: backoff.Jitter, high: bool, expected: float) -> None:
    assert backoff.jitter(8.0, kind, ExtremeRng(high=high)) == expected


# --- Policy ----------------------------------------------------------------------------------


def test_policy_delay_is_jittered_exponential() -> None:
    policy = backoff.Policy(base_s=1.0, factor=2.0, cap_s=10.0, jitter="full")
    highs = [policy.delay(n, ExtremeRng(high=True)) for n in range(6)]
    lows = [policy.delay(n, ExtremeRng(high=False)) for n in range(6)]
    assert (highs, lows) == ([1.0, 2.0, 4.0, 8.0, 10.0, 10.0], [0.0] * 6)


def test_policy_default_jitter_is_equal() -> None:
    policy = backoff.Policy(base_s=1.0, factor=2.0, cap_s=10.0)
    assert [policy.delay(3, ExtremeRng(high=h)) for h in (False, True)] == [4.0, 8.0]


def test_policy_respects_floor() -> None:
    policy = backoff.Policy(base_s=0.1, factor=2.0, cap_s=1.0, jitter="full", floor_s=0.5)
    low, high = ExtremeRng(high=False), ExtremeRng(high=True)
    got = [(policy.delay(n, low), policy.delay(n, high)) for n in (0, 2, 10)]
    assert got == [(0.5, 0.5), (0.5, 0.5), (0.5, 1.0)]


@given(base=bases, factor=factors, cap=caps, floor=delays, n=steps, kind=jitters, seed=seeds)
def test_policy_delay_is_between_floor_and_cap(
    base: float, factor: float, cap: float, floor: float, n: int, kind: backoff.Jitter, seed: int
) -> None:
    policy = backoff.Policy(base_s=base, factor=factor, cap_s=cap, jitter=kind, floor_s=floor)
    delay = policy.delay(n, random.Random(seed))
    assert floor <= delay <= max(floor, cap)


@pytest.mark.parametrize("kind", ["full", "equal"])
def test_same_seed_same_delays(kind: backoff.Jitter) -> None:
    policy = backoff.Policy(base_s=0.5, factor=1.5, cap_s=30.0, jitter=kind)

    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [policy.delay(n, rng) for n in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_default_rng_is_a_fresh_random() -> None:
    a, b = backoff.default_rng(), backoff.default_rng()
    assert isinstance(a, random.Random)
    assert a is not b
