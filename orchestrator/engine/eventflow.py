"""Tracking by EventBridge state-change events, the decisions (issue #17): what a message says,
whether it is news, whether events are flowing, and how often the sweep describes a job.

- `decode`: an SQS message body (EventBridge's envelope) → `Envelope`, or `Undecodable`
  naming what was wrong.
- `newer`: whether an observation's vendor order (ECS `version`; Batch attempts and status
  rank) is news against the last one applied: duplicates and late deliveries change nothing.
- `Flow`: whether a backend's events are flowing (track by them, describe at the sweep) or not
  (full polling). A queue that cannot be read, or changes that describes find and no event
  told within `grace_s` while no event came at all (`miss_limit` of them in a row), switch to
  polling; events of ours arriving again switch back. A dropped event amid others that do
  come is only counted: the sweep covers it.
- `sweep_period`: how often the sweep describes each job, stretched so it takes at most its
  share of the describe budget.

Pure: the shells (`changefeed.py`, `poller.py`) pass `now` and carry out what comes back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from orchestrator import models

Order = tuple[int, ...]  # a vendor's order of one job's changes: larger is later


class Undecodable(ValueError):
    """A message that is not an EventBridge event this daemon can read (it is deleted, and
    counted)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    source: str  # "aws.ecs", "aws.batch"
    detail_type: str  # "ECS Task State Change", "Batch Job State Change"
    detail: Mapping[str, Any]
    event_id: str
    time: str  # when the change happened, as EventBridge says (ISO 8601)


def decode(body: str | bytes) -> Envelope:
    """An SQS message body as EventBridge delivers it (the whole event, JSON)."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Undecodable(f"not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise Undecodable(f"not a JSON object but {type(event).__name__}")
    missing = [k for k in ("source", "detail-type", "detail") if k not in event]
    if missing:
        raise Undecodable(f"not an EventBridge event: no {', '.join(missing)}")
    source, detail_type, detail = event["source"], event["detail-type"], event["detail"]
    if not isinstance(source, str) or not isinstance(detail_type, str):
        raise Undecodable("source and detail-type must be strings")
    if not isinstance(detail, dict):
        raise Undecodable(f"detail must be an object, not {type(detail).__name__}")
    return Envelope(
        source, detail_type, detail, str(event.get("id", "")), str(event.get("time", ""))
    )


def newer(order: Order | None, last: Order | None) -> bool:
    """Whether a change of this order is news after the last one applied (unknown orders are
    always news: the store's legal transitions keep a job from going back)."""
    return order is None or last is None or order > last


# -- is it flowing? ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Switch:
    flowing: bool  # True: back to events; False: to full polling
    why: str


@dataclass(slots=True)
class _Candidate:
    state: models.JobState
    seen_at: float


@dataclass(slots=True)
class Flow:
    """One backend's events: flowing or not, and why. Starts not flowing: the first receive
    that works says they may flow."""

    grace_s: float
    miss_limit: int
    flowing: bool = False
    why: str = "not read yet"
    misses: int = 0  # in a row, with no event-told change between them
    dropped: int = 0  # changes no event told while others' events came: drops the sweep caught
    _candidates: dict[str, _Candidate] = field(default_factory=dict)
    _last_told: float = -math.inf  # when an event last told a change
    _started: bool = False  # a receive has worked once

    def receive_failed(self, why: str) -> Switch | None:
        """A ReceiveMessage failed (the queue is missing, access denied, throttled…)."""
        self._candidates.clear()
        self.misses = 0
        if self.flowing or self.why != why:
            self.flowing, self.why = False, why
            return Switch(False, why)
        return None

    def received(self, ours: int) -> Switch | None:
        """A ReceiveMessage worked, with `ours` events about jobs tracked here. The first
        working receive starts tracking by events; after a fall-back only events of ours
        arriving again do (the queue being readable does not prove the rule delivers)."""
        if self.flowing:
            return None
        if not self._started or ours:
            self._started = True
            self.flowing, self.why, self.misses = True, "", 0
            return Switch(True, "events arriving" if ours else "queue readable")
        return None

    def told(self, key: str, state: models.JobState, now: float) -> None:
        """An event told this job's change (applied, or already known by a describe). Jobs
        are named by their external id."""
        self._last_told = max(self._last_told, now)
        candidate = self._candidates.get(key)
        if candidate is not None and (
            state == candidate.state
            or state.terminal
            or not (candidate.state.terminal or models.is_regression(candidate.state, state))
        ):
            del self._candidates[key]  # late, but it came
        self.misses = 0

    def expects(self, key: str) -> bool:
        """Whether a change a describe found for this job waits for its event."""
        return key in self._candidates

    def described(self, key: str, state: models.JobState, now: float) -> None:
        """A describe found this job changed: an event should tell it within `grace_s`."""
        if self.flowing:
            self._candidates[key] = _Candidate(state, now)

    def tick(self, now: float) -> Switch | None:
        """Changes no event told within `grace_s`: misses if no event came at all since they
        were found (`miss_limit` in a row: polling), else drops."""
        late = [k for k, c in self._candidates.items() if now - c.seen_at >= self.grace_s]
        for key in sorted(late, key=lambda k: self._candidates[k].seen_at):
            if self._last_told >= self._candidates.pop(key).seen_at:
                self.dropped += 1  # events came meanwhile: this one alone was lost
                self.misses = 0
            else:
                self.misses += 1
        if self.flowing and self.misses >= self.miss_limit:
            why = (
                f"{self.misses} changes found by describes were not told by any event within "
                f"{self.grace_s:g}s"
            )
            self.flowing, self.why, self.misses = False, why, 0
            self._candidates.clear()
            return Switch(False, why)
        return None


def sweep_period(
    sweep_s: float, tracked: int, *, batch: int, describe_rate_per_s: float, share: float
) -> float:
    """How often each tracked job is described while events flow: `sweep_s`, or longer when
    that would take more than `share` of the describe budget (`tracked` jobs in batches of
    `batch`, `describe_rate_per_s` calls a second)."""
    calls_per_s = describe_rate_per_s * share
    return max(sweep_s, math.ceil(tracked / batch) / calls_per_s if calls_per_s > 0 else sweep_s)
