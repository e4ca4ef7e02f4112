"""Tracking by EventBridge state-change events read from SQS: the async shell of
`engine.eventflow` (issue #17).

One `ChangeFeed` per AWS backend with `events.queue_url`. Receivers long-poll the queue
(`ReceiveMessage`, 10 messages, `events.wait_s`): one to start with, another while every
receive comes back full, up to `events.max_receivers`; a receive that is not full retires all
but one. Each message is decoded (`eventflow.decode`, then the backend's `observe_event`:
the same `Observation` a describe gives) and applied by the poller (`Poller.apply_event`) as a
describe's observation is. **A message is deleted only once the store has committed what it
said** (or it said nothing new: a duplicate, a late one, not ours, not readable), in one
`DeleteMessageBatch` per receive; one whose write failed stays, and SQS delivers it again after
its visibility timeout. An event for an external id not tracked (yet: its launch is being
recorded) is held up to `grace_s` (within the visibility timeout) for the job to be tracked,
then deleted as untracked.

While events flow, each job is still described at the sweep (`sweep_delay`); when the queue
cannot be read, or describes find changes no event told (`eventflow.Flow`), the backend goes
back to full polling by itself (`Poller.polling_again`), says so (log `events.stopped`, `ping`'s
problems, `/metrics`), and comes back when events of its jobs arrive again (`events.flowing`).
On a shared PostgreSQL a feed runs in the leader's drivers only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from orchestrator import backoff, errors, faults, models
from orchestrator.backends.base import Backend, EventBackend, Observation
from orchestrator.engine import eventflow
from orchestrator.health import Health
from orchestrator.poller import Applied
from orchestrator.settings import EventsSettings

log = structlog.get_logger("orchestrator.changefeed")

_BATCH = 10  # ReceiveMessage and DeleteMessageBatch take at most 10
_MAX_HELD = 10_000  # events held for jobs not tracked yet, at most; more are deleted at once
_TICK_S = 1.0


class Sqs(Protocol):
    """The calls a feed makes (`aws_api.AwsApi` for the service "sqs")."""

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]: ...


class Applier(Protocol):
    """What the feed needs of the poller."""

    async def apply_event(self, obs: Observation) -> Applied: ...

    def polling_again(self, backend: str) -> int: ...


@dataclass(slots=True)
class _Held:
    until: float
    obs: Observation
    handle: str


class ChangeFeed:
    def __init__(
        self,
        backend: Backend,
        settings: EventsSettings,
        sqs: Sqs,
        poller: Applier,
        *,
        describe_rate_per_s: float,
        health: Health | None = None,
        rng: backoff.Uniform | None = None,
        clock: Callable[[], float] = time.monotonic,
        crash: faults.Faults | None = None,
    ) -> None:
        self._crash = crash or faults.Faults()
        assert isinstance(backend, EventBackend)
        assert settings.queue_url
        self.backend = backend.name
        self._vendor: EventBackend = backend
        self._batch_size = backend.describe_batch_size
        self._silent = backend.event_silent_statuses
        self._settings = settings
        self._queue_url = settings.queue_url
        self._sqs = sqs
        self._poller = poller
        self._describe_rate_per_s = describe_rate_per_s
        self._health = health
        self._rng = rng or backoff.default_rng()
        self._clock = clock
        self.flow = eventflow.Flow(grace_s=settings.grace_s, miss_limit=settings.miss_limit)
        self.counts: Counter[str] = Counter()
        self._hold_s = min(settings.grace_s, settings.visibility_timeout_s / 2)
        self._held: dict[str, list[_Held]] = {}
        self._n_held = 0
        self._receivers = 0
        self._group: asyncio.TaskGroup | None = None

    # -- what the poller asks ----------------------------------------------------------------

    @property
    def flowing(self) -> bool:
        return self.flow.flowing

    def sweep_delay(self, job: models.Job, tracked: int) -> float | None:
        """While events flow, the job's next describe is the sweep's: `sweep_s`, stretched to
        keep within `sweep_share` of the describe budget, jittered ±25 %. A status the vendor
        sends no event for (Batch's SUBMITTED) is polled at its back-off."""
        if not self.flow.flowing or job.vendor_status in self._silent:
            return None
        period = eventflow.sweep_period(
            self._settings.sweep_s,
            tracked,
            batch=self._batch_size,
            describe_rate_per_s=self._describe_rate_per_s,
            share=self._settings.sweep_share,
        )
        return period * self._rng.uniform(0.75, 1.25)

    def described(self, job: models.Job, state: models.JobState) -> None:
        if job.external_id:
            self.flow.described(job.external_id, state, self._clock())

    def tracked(self, job: models.Job) -> None:
        """Events held for this job's external id are applied now (in the vendor's order)."""
        held = self._held.pop(job.external_id or "", None)
        if held and self._group is not None:
            self._n_held -= len(held)
            self._group.create_task(self._apply_held(held), name=f"events-held-{job.id}")

    # -- the loops -------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("events.started", backend=self.backend, queue=self._queue_url)
        try:
            async with asyncio.TaskGroup() as tg:
                self._group = tg
                tg.create_task(self._tick(), name=f"events-tick-{self.backend}")
                self._add_receiver()
        finally:
            self._group = None

    def _add_receiver(self) -> None:
        assert self._group is not None
        self._receivers += 1
        self._group.create_task(self._receive(), name=f"events-receive-{self.backend}")

    async def _receive(self) -> None:
        delay = backoff.Policy(base_s=1.0, factor=2.0, cap_s=30.0, jitter="equal")
        failures = 0
        try:
            while True:
                # The very first receive does not wait: it says at once whether the queue
                # can be read, and tracking by events starts.
                wait_s = self._settings.wait_s if self.counts["receives"] else 0
                self.counts["receives"] += 1
                try:
                    reply = await self._sqs.call(
                        "ReceiveMessage",
                        QueueUrl=self._queue_url,
                        MaxNumberOfMessages=_BATCH,
                        WaitTimeSeconds=wait_s,
                        VisibilityTimeout=self._settings.visibility_timeout_s,
                    )
                except errors.AwsError as exc:
                    self.counts["receive_errors"] += 1
                    self._switch(self.flow.receive_failed(f"{exc.aws_code}: {exc.aws_message}"))
                    await asyncio.sleep(delay.delay(failures, self._rng))
                    failures += 1
                    continue
                failures = 0
                messages = reply.get("Messages") or []
                await self._handle(messages)
                if len(messages) == _BATCH and self._receivers < self._settings.max_receivers:
                    self._add_receiver()  # a backlog: read it wider
                elif len(messages) < _BATCH and self._receivers > 1:
                    return  # caught up: one receiver is enough
        finally:
            self._receivers -= 1

    async def _handle(self, messages: Sequence[dict[str, Any]]) -> None:
        self.counts["received"] += len(messages)
        if messages:
            self._crash.crashpoint("events.received")
        outcomes = await asyncio.gather(*(self._one(m) for m in messages))
        self._switch(self.flow.received(sum(ours for ours, _ in outcomes)))
        if messages:
            self._crash.crashpoint("events.before_delete")
        await self._delete([handle for _, handle in outcomes if handle is not None])

    async def _one(self, message: dict[str, Any]) -> tuple[int, str | None]:
        """One message: (1 if it was about a job tracked here, the handle to delete now)."""
        handle = str(message.get("ReceiptHandle", ""))
        try:
            envelope = eventflow.decode(message.get("Body") or "")
            if (envelope.source, envelope.detail_type) != (
                self._vendor.event_source,
                self._vendor.event_detail_type,
            ):
                self.counts["foreign"] += 1
                return 0, handle
            obs = self._vendor.observe_event(envelope.detail)
        except Exception as exc:  # whatever shape it has, one message must not stop the feed
            self.counts["undecodable"] += 1
            log.warning(
                "events.undecodable",
                backend=self.backend,
                message_id=message.get("MessageId"),
                error=f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, eventflow.Undecodable)
                else str(exc),
            )
            return 0, handle
        applied = await self._apply(obs)
        if applied is None:
            return 0, None  # not committed: SQS delivers it again later
        if applied is Applied.UNTRACKED:
            if self._n_held < _MAX_HELD:
                self._held.setdefault(obs.external_id, []).append(
                    _Held(self._clock() + self._hold_s, obs, handle)
                )
                self._n_held += 1
                return 0, None
            return 0, handle
        return 1, handle

    async def _apply_held(self, held: list[_Held]) -> None:
        held.sort(key=lambda h: h.obs.order or ())
        done = [h.handle for h in held if await self._apply(h.obs, "held_") is not None]
        await self._delete(done)

    async def _apply(self, obs: Observation, counted_as: str = "") -> Applied | None:
        """One observation through the poller, counted (`counted_as` prefixes the outcome),
        told to the flow; None if nothing was committed (its message must stay)."""
        try:
            applied = await self._poller.apply_event(obs)
        except errors.StoreError as exc:
            self.counts[f"{counted_as}unrecorded"] += 1
            log.debug("events.unrecorded", backend=self.backend, error=exc.message)
            return None
        except Exception:
            self.counts[f"{counted_as}failed"] += 1
            log.exception("events.apply_failed", backend=self.backend, id=obs.external_id)
            return None
        self.counts[f"{counted_as}{applied.value}"] += 1
        # An event told this change; one for a job no longer tracked still answers a change a
        # describe found first (it ended before its event came).
        if obs.state is not None and (
            applied is not Applied.UNTRACKED or self.flow.expects(obs.external_id)
        ):
            self.flow.told(obs.external_id, obs.state, self._clock())
        return applied

    async def _delete(self, handles: Sequence[str]) -> None:
        for start in range(0, len(handles), _BATCH):
            chunk = handles[start : start + _BATCH]
            entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)]
            try:
                reply = await self._sqs.call(
                    "DeleteMessageBatch", QueueUrl=self._queue_url, Entries=entries
                )
            except errors.AwsError as exc:  # delivered again: applied again, harmlessly
                self.counts["delete_errors"] += len(chunk)
                log.warning("events.delete_failed", backend=self.backend, error=str(exc))
                continue
            failed = reply.get("Failed") or []
            self.counts["deleted"] += len(chunk) - len(failed)
            self.counts["delete_errors"] += len(failed)

    async def _tick(self) -> None:
        """Once a second: changes no event told in time (`Flow.tick`), held events expired."""
        while True:
            await asyncio.sleep(_TICK_S)
            now = self._clock()
            self._switch(self.flow.tick(now))
            self.counts["caught_by_sweep"] = self.flow.dropped  # changes whose event was lost
            expired = [h for items in self._held.values() for h in items if h.until <= now]
            if expired:
                self._held = {
                    k: kept
                    for k, v in self._held.items()
                    if (kept := [h for h in v if h.until > now])
                }
                self._n_held -= len(expired)
                self.counts["untracked_deleted"] += len(expired)
                await self._delete([h.handle for h in expired])

    def _switch(self, switch: eventflow.Switch | None) -> None:
        if switch is None:
            return
        if switch.flowing:
            log.info("events.flowing", backend=self.backend, why=switch.why)
            if self._health is not None:
                self._health.events_flowing(self.backend)
            return
        moved = self._poller.polling_again(self.backend)
        log.warning("events.stopped", backend=self.backend, why=switch.why, polled_now=moved)
        if self._health is not None:
            self._health.events_stopped(self.backend, switch.why)

    def close(self) -> None:
        """The feed stops for good (its drivers are gone: another daemon leads): what it
        reported of its events is no longer this daemon's to say."""
        if self._health is not None:
            self._health.events_flowing(self.backend)

    # -- what ping and /metrics show -------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "tracking": "events" if self.flow.flowing else "polling",
            "why": self.flow.why or None,
            "receivers": self._receivers,
            "held": self._n_held,
        }
