"""The conformance suite of the `Store` protocol: what every store must do, whatever it keeps its
data in. Each case is a plain async function of a `Harness`; `run(case, backing)` runs one on a
fresh store of one implementation. `tests/unit/test_store_conformance.py` runs every case on
every implementation (adding one is a line there).

Only the shared semantics are here. What is tied to files (the SQLite store's lock, refusing a
file that is not a store, free space and a full disk) is tested where those live
(`tests/integration/test_store_lock.py`, `test_disk_full.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import pytest

from orchestrator import errors, events, models
from orchestrator.engine import tracking
from orchestrator.models import JobState as S
from orchestrator.store import PURGE_SLICE, JobQuery, Store

PEER_A = models.Peer(uid=1001, gid=1001, pid=11)
PEER_B = models.Peer(uid=1002, gid=1002, pid=12)
START = 1_700_000_000.0
ACTIVE_BUT_QUEUED = [S.SUBMITTED, S.PENDING, S.RUNNABLE, S.STARTING, S.RUNNING]


class Backing(Protocol):
    """Where one implementation keeps its data for one test. Each `store` is a new store on the
    same data, as a restarted daemon's is."""

    def store(self, hub: events.Hub, clock: Callable[[], float]) -> Store: ...

    def write_newer_schema(self) -> None:
        """Make the data look written by a newer orchestrator (its `schema_version` + 1)."""


class Clock:
    """A manual clock: Unix time that moves only when told."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 0.01) -> float:
        self.now += seconds
        return self.now


class Harness:
    """A store on a backing, a manual clock, and every event the store published."""

    def __init__(self, backing: Backing) -> None:
        self.backing = backing
        self.clock = Clock()
        self.hub = events.Hub()
        self.published: list[models.Event] = []
        self.hub.listen(self.published.append)
        self.store = backing.store(self.hub, self.clock)

    async def restart(self) -> Store:
        """Close the store and open a new one on the same data."""
        await self.store.close()
        self.store = self.backing.store(self.hub, self.clock)
        await self.store.open()
        return self.store

    def events_of(self, job_id: str) -> list[models.Event]:
        return [e for e in self.published if e.job_id == job_id]

    async def accept(
        self,
        spec: models.JobSpec | None = None,
        *,
        peer: models.Peer | None = PEER_A,
        backend: str = "local",
    ) -> models.Job:
        """A new job (the clock moves on first, so jobs accepted one by one sort in order)."""
        self.clock.advance()
        (outcome,) = await self.store.accept_many([(spec or _spec(), backend)], peer)
        assert not isinstance(outcome, errors.OrchestratorError), outcome
        job, created = outcome
        assert created
        return job

    async def launched(self, job: models.Job, external_id: str | None = None) -> models.Job:
        """`job` (QUEUED) with an attempt begun and submitted: SUBMITTED."""
        started = await self.store.begin_attempt(job.id)
        assert started is not None
        return await self.store.record_submitted(
            job.id, external_id=external_id or f"x-{job.id}", state=S.SUBMITTED
        )

    async def job_in(
        self, state: models.JobState, *, peer: models.Peer | None = PEER_A, backend: str = "local"
    ) -> models.Job:
        """A job brought to `state` through the write paths (QUEUED: just accepted)."""
        job = await self.accept(peer=peer, backend=backend)
        if state == S.QUEUED:
            return job
        job = await self.launched(job)
        if state != S.SUBMITTED:
            job = await self.store.transition(job.id, S.SUBMITTED, state, reason=f"to {state}")
        assert job.state == state
        return job


Case = Callable[[Harness], Awaitable[None]]
CASES: list[Case] = []


def case(fn: Case) -> Case:
    CASES.append(fn)
    return fn


async def run(fn: Case, backing: Backing) -> None:
    harness = Harness(backing)
    await harness.store.open()
    try:
        await fn(harness)
    finally:
        await harness.store.close()


def _spec(**fields: Any) -> models.JobSpec:
    return models.JobSpec(**{"command": ["true"], **fields})


def _accepted(outcome: object) -> tuple[models.Job, bool]:
    assert isinstance(outcome, tuple), outcome
    job, created = outcome
    assert isinstance(job, models.Job)
    assert isinstance(created, bool)
    return job, created


async def _gather(*writes: Awaitable[Any]) -> list[Any]:
    """Writes in flight together (one group commit, where a store has them)."""
    return list(await asyncio.gather(*writes))


# -- accepting jobs --------------------------------------------------------------------------


@case
async def accepted_jobs_are_queued_durable_and_announced(h: Harness) -> None:
    spec = _spec(name="first", env={"A": "1"}, timeout_s=5.0, overrides={"k": [1, 2]})
    job = await h.accept(spec, backend="ecs")
    now = h.clock.now
    assert (job.state, job.backend, job.spec, job.peer) == (S.QUEUED, "ecs", spec, PEER_A)
    assert (job.created_at, job.updated_at, dict(job.state_times)) == (now, now, {"QUEUED": now})
    assert (job.attempt, job.launching, job.token, job.external_id) == (0, False, None, None)
    assert (job.exit_code, job.reason, job.vendor_status, job.stop_reason) == (None,) * 4
    assert dict(job.info) == {}
    # Published before the write returned.
    assert h.published == [
        models.Event(
            job_id=job.id,
            backend="ecs",
            name="first",
            from_state=None,
            to_state=S.QUEUED,
            at=now,
            created_at=now,
            peer_uid=PEER_A.uid,
            seq=h.published[0].seq,
        )
    ]
    assert h.published[0].seq > 0
    assert await h.store.get(job.id) == job
    assert await h.store.history(job.id) == [
        {"at": models.iso(now), "from": None, "to": "QUEUED", "reason": None, "exit_code": None}
    ]
    assert await h.store.attempts(job.id) == []
    await h.restart()
    assert await h.store.get(job.id) == job


@case
async def a_submitters_groups_are_not_kept(h: Harness) -> None:
    peer = models.Peer(uid=5, gid=6, pid=7, groups=frozenset({8, 9}))
    job = await h.accept(peer=peer)
    assert (await h.store.get(job.id)).peer == models.Peer(uid=5, gid=6, pid=7)


@case
async def a_batch_is_answered_in_order_and_a_conflict_fails_alone(h: Harness) -> None:
    first = await h.accept(_spec(idempotency_key="k1"))
    h.published.clear()
    outcomes = await h.store.accept_many(
        [
            (_spec(name="a"), "local"),
            (_spec(command=["other"], idempotency_key="k1"), "local"),  # a conflict
            (_spec(idempotency_key="k1"), "local"),  # the same job again
            (_spec(name="b"), "batch"),
        ],
        PEER_A,
    )
    a, created_a = _accepted(outcomes[0])
    assert isinstance(outcomes[1], errors.IdempotencyConflict)
    assert outcomes[1].code == "idempotency_conflict"
    again, created_again = _accepted(outcomes[2])
    b, created_b = _accepted(outcomes[3])
    assert (created_a, created_again, created_b) == (True, False, True)
    assert (a.spec.name, again.id, b.spec.name, b.backend) == ("a", first.id, "b", "batch")
    assert len({a.id, b.id, first.id}) == 3
    # One acceptance event per created job, none for the others.
    assert [(e.job_id, e.from_state, e.to_state) for e in h.published] == [
        (a.id, None, S.QUEUED),
        (b.id, None, S.QUEUED),
    ]
    assert (a.created_at, b.created_at) == (h.clock.now, h.clock.now)  # one instant per batch
    assert await h.store.count_by_state() == {"QUEUED": 3}


@case
async def the_same_key_and_spec_is_the_same_job(h: Harness) -> None:
    spec = _spec(idempotency_key="once", name="n")
    job = await h.accept(spec)
    h.published.clear()
    # Again, in one batch twice, after it moved on, and after a restart: always the same job.
    outcomes = await h.store.accept_many([(spec, "local"), (spec, "local")], PEER_A)
    assert [_accepted(o) for o in outcomes] == [(job, False), (job, False)]
    await h.launched(job)
    h.published.clear()
    await h.restart()
    (outcome,) = await h.store.accept_many([(spec, "local")], PEER_A)
    again, created = _accepted(outcome)
    assert (again.id, again.state, created) == (job.id, S.SUBMITTED, False)
    assert h.published == []
    # Keyed jobs new in one batch: the second of two equal specs is the first's job.
    fresh = _spec(idempotency_key="fresh")
    outcomes = await h.store.accept_many([(fresh, "local"), (fresh, "local")], PEER_A)
    (one, created_one), (two, created_two) = (_accepted(o) for o in outcomes)
    assert (created_one, created_two, two.id) == (True, False, one.id)
    assert len(h.published) == 1


@case
async def the_same_key_with_another_spec_or_backend_is_a_conflict(h: Harness) -> None:
    job = await h.accept(_spec(idempotency_key="k", backend="local"))
    for spec, backend in [
        (_spec(idempotency_key="k", command=["false"]), "local"),
        (_spec(idempotency_key="k", env={"X": "1"}), "local"),
        (_spec(idempotency_key="k"), "ecs"),
    ]:
        (outcome,) = await h.store.accept_many([(spec, backend)], PEER_A)
        assert isinstance(outcome, errors.IdempotencyConflict), outcome
        assert "'k'" in outcome.message
        assert job.id in outcome.message
    # The backend is compared as stored beside the spec; inside the spec it is optional.
    (outcome,) = await h.store.accept_many([(_spec(idempotency_key="k"), "local")], PEER_A)
    assert _accepted(outcome) == (job, False)
    assert await h.store.count_by_state() == {"QUEUED": 1}


@case
async def idempotency_keys_are_per_submitter(h: Harness) -> None:
    spec = _spec(idempotency_key="shared")
    a = await h.accept(spec, peer=PEER_A)
    b = await h.accept(spec, peer=PEER_B)
    nobody = await h.accept(spec, peer=None)
    assert len({a.id, b.id, nobody.id}) == 3
    # Another submitter may use the key for another spec.
    other = await h.accept(
        _spec(idempotency_key="shared", command=["x"]), peer=models.Peer(3, 3, 3)
    )
    assert other.id not in {a.id, b.id, nobody.id}
    # A peer with another pid (or gid) is the same submitter: the uid is who submits.
    (outcome,) = await h.store.accept_many([(spec, "local")], models.Peer(PEER_A.uid, 0, 99))
    assert _accepted(outcome) == (a, False)
    (outcome,) = await h.store.accept_many([(spec, "local")], None)
    assert _accepted(outcome)[0].id == nobody.id


# -- reading ---------------------------------------------------------------------------------


@case
async def unknown_job_ids_are_not_found(h: Harness) -> None:
    await h.accept()
    missing = models.new_job_id(h.clock.now)
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: h.store.get(missing),
        lambda: h.store.transition(missing, S.QUEUED, S.FAILED),
        lambda: h.store.observe(missing, vendor_status="x", reason=None),
        lambda: h.store.relocate(missing, "elsewhere"),
        lambda: h.store.begin_attempt(missing),
        lambda: h.store.record_submitted(missing, external_id="e", state=S.SUBMITTED),
        lambda: h.store.record_start_failure(missing, "why", final=True),
        lambda: h.store.request_stop(missing, "cancel"),
    ]
    for call in writes:
        with pytest.raises(errors.JobNotFound) as info:
            await call()
        assert (info.value.job_id, info.value.code) == (missing, "not_found")
    assert await h.store.history(missing) == []
    assert await h.store.attempts(missing) == []
    assert h.events_of(missing) == []


@case
async def jobs_are_listed_newest_first_and_filtered(h: Harness) -> None:
    queued = await h.job_in(S.QUEUED)
    running = await h.job_in(S.RUNNING, peer=PEER_B)
    done = await h.job_in(S.SUCCEEDED, backend="ecs")
    orphan = await h.job_in(S.QUEUED, peer=None)

    async def ids(**filters: Any) -> list[str]:
        return [job.id for job in await h.store.list_jobs(JobQuery.of(**filters))]

    assert await ids() == [orphan.id, done.id, running.id, queued.id]
    assert await ids(limit=2) == [orphan.id, done.id]
    assert await ids(states=[S.QUEUED]) == [orphan.id, queued.id]
    assert await ids(states=[S.RUNNING, S.SUCCEEDED]) == [done.id, running.id]
    assert await ids(states=[]) == []
    assert await ids(backend="ecs") == [done.id]
    assert await ids(peer_uid=PEER_A.uid) == [done.id, queued.id]  # nobody's job is not A's
    assert await ids(peer_uid=PEER_B.uid, states=[S.QUEUED]) == []
    assert await ids(before=done.id) == [running.id, queued.id]
    assert await ids(before=queued.id) == []
    assert await h.store.list_jobs() == [
        await h.store.get(i) for i in (orphan.id, done.id, running.id, queued.id)
    ]


@case
async def jobs_are_found_by_name_glob_acceptance_time_and_id_prefix(h: Harness) -> None:
    nightly = await h.accept(_spec(name="nightly-report"))
    h.clock.advance(100)
    cutoff = h.clock.now
    weekly = await h.accept(_spec(name="weekly-report"))
    unnamed = await h.accept()

    async def ids(**filters: Any) -> list[str]:
        return [job.id for job in await h.store.list_jobs(JobQuery.of(**filters))]

    assert await ids(name="nightly-report") == [nightly.id]
    assert await ids(name="*-report") == [weekly.id, nightly.id]
    assert await ids(name="?eekly-*") == [weekly.id]
    assert await ids(name="[nw]*") == [weekly.id, nightly.id]
    assert await ids(name="Nightly-report") == []  # case-sensitive
    assert await ids(name=unnamed.id) == [unnamed.id]  # a job with no name: its id
    assert await ids(name="*") == [unnamed.id, weekly.id, nightly.id]
    assert await ids(since=cutoff) == [unnamed.id, weekly.id]
    assert await ids(since=h.clock.now + 1) == []
    assert await ids(id_prefix=nightly.id[:20]) == [nightly.id]
    assert await ids(id_prefix=nightly.id) == [nightly.id]
    assert await ids(id_prefix=nightly.id + "0") == []
    assert await ids(id_prefix="") == [unnamed.id, weekly.id, nightly.id]
    assert await ids(name="*-report", since=cutoff, peer_uid=PEER_A.uid) == [weekly.id]
    ml = await h.accept(_spec(labels={"team": "ml", "cost center": "a.b"}))
    await h.accept(_spec(labels={"team": "web"}))
    assert await ids(labels={"team": "ml"}) == [ml.id]
    assert await ids(labels={"team": "ml", "cost center": "a.b"}) == [ml.id]
    assert await ids(labels={"team": "ml", "cost center": "x"}) == []
    assert await ids(labels={"nobody": "has it"}) == []
    assert len(await ids(labels={})) == 5
    assert await ids(name="*-report", peer_uid=PEER_B.uid) == []
    await h.restart()
    assert await ids(name="*-report") == [weekly.id, nightly.id]
    assert await ids(labels={"team": "ml"}) == [ml.id]


@case
async def cursor_pages_cover_every_job_once(h: Harness) -> None:
    # Batches share an instant: their ids sort by their random part, not their order.
    for round_ in range(4):
        h.clock.advance()
        await h.store.accept_many([(_spec(), "local")] * 9, PEER_A)
        await h.store.accept_many([(_spec(), "ecs")] * 4, PEER_B if round_ % 2 else None)
    all_jobs = await h.store.list_jobs(JobQuery(limit=1000))
    assert len(all_jobs) == 52
    assert [j.id for j in all_jobs] == sorted((j.id for j in all_jobs), reverse=True)
    for filters in ({}, {"backend": "local"}, {"peer_uid": PEER_B.uid}, {"states": [S.QUEUED]}):
        for size in (1, 7, 13, 52, 53):
            seen: list[str] = []
            cursor = None
            while True:
                page = await h.store.list_jobs(JobQuery.of(limit=size, before=cursor, **filters))
                assert len(page) <= size
                seen += [job.id for job in page]
                if len(page) < size:
                    break
                cursor = page[-1].id
            wanted = [
                j.id
                for j in all_jobs
                if filters.get("backend", j.backend) == j.backend
                and ("peer_uid" not in filters or (j.peer and j.peer.uid == filters["peer_uid"]))
            ]
            assert seen == wanted, (filters, size)


@case
async def jobs_are_counted_by_state(h: Harness) -> None:
    assert await h.store.count_by_state() == {}
    await h.job_in(S.QUEUED)
    await h.job_in(S.QUEUED, peer=PEER_B)
    await h.job_in(S.RUNNING)
    await h.job_in(S.FAILED, peer=None)
    assert await h.store.count_by_state() == {"QUEUED": 2, "RUNNING": 1, "FAILED": 1}
    assert await h.store.count_by_state(PEER_A.uid) == {"QUEUED": 1, "RUNNING": 1}
    assert await h.store.count_by_state(PEER_B.uid) == {"QUEUED": 1}
    assert await h.store.count_by_state(4242) == {}


@case
async def a_restart_finds_every_unfinished_job_as_it_was(h: Harness) -> None:
    jobs = {state: await h.job_in(state) for state in models.JobState}
    launching = await h.accept()
    begun = await h.store.begin_attempt(launching.id)
    assert begun is not None
    launching = begun
    assert launching is not None
    stopping = await h.store.request_stop(jobs[S.RUNNING].id, "timeout")
    retried = await h.accept()
    await h.store.begin_attempt(retried.id)
    retried = await h.store.record_start_failure(retried.id, "throttled", final=False)
    unfinished = [*(jobs[s] for s in models.ACTIVE if s != S.RUNNING), stopping, launching]
    unfinished = sorted([*unfinished, retried], key=lambda job: job.id)
    before = {job.id: job for job in await h.store.list_jobs(JobQuery(limit=100))}

    await h.restart()
    assert await h.store.unfinished() == unfinished
    assert {job.id: job for job in await h.store.list_jobs(JobQuery(limit=100))} == before
    recovered = {job.id: job for job in await h.store.unfinished()}
    assert recovered[launching.id].launching
    assert recovered[stopping.id].stop_reason == "timeout"
    assert (recovered[retried.id].attempt, recovered[retried.id].launching) == (1, False)


# -- attempts --------------------------------------------------------------------------------


@case
async def attempts_are_numbered_and_given_tokens(h: Harness) -> None:
    job = await h.accept()
    h.published.clear()
    times = []
    for attempt in (1, 2, 3):
        now = h.clock.advance()
        times.append(now)
        started = await h.store.begin_attempt(job.id)
        assert started is not None
        assert (started.attempt, started.token, started.launching) == (
            attempt,
            f"{job.id}-{attempt}",
            True,
        )
        assert (started.state, started.updated_at) == (S.QUEUED, now)
        assert started.created_at == job.created_at
        assert started.info["attempt_started_at"] == now
        assert await h.store.get(job.id) == started
        assert await h.store.begin_attempt(job.id) is None  # launching already
        await h.store.record_start_failure(job.id, f"no {attempt}", final=False)
    assert h.published == []  # attempts change no state
    assert await h.store.attempts(job.id) == [
        {
            "attempt": n,
            "token": f"{job.id}-{n}",
            "external_id": None,
            "started_at": models.iso(times[n - 1]),
            "outcome": f"start failed: no {n}",
        }
        for n in (1, 2, 3)
    ]


@case
async def only_a_queued_job_not_launching_nor_stopping_gets_an_attempt(h: Harness) -> None:
    for state in models.JobState:
        if state != S.QUEUED:
            job = await h.job_in(state)
            assert await h.store.begin_attempt(job.id) is None, state
            assert await h.store.get(job.id) == job
    stopping = await h.accept()
    await h.store.begin_attempt(stopping.id)
    await h.store.request_stop(stopping.id, "cancel")  # launching: it keeps its state
    await h.store.record_start_failure(stopping.id, "refused", final=False)
    assert await h.store.begin_attempt(stopping.id) is None  # QUEUED, but asked to stop
    assert (await h.store.get(stopping.id)).attempt == 1


@case
async def a_submitted_attempt_moves_the_job_on(h: Harness) -> None:
    job = await h.accept()
    await h.store.begin_attempt(job.id)
    h.published.clear()
    now = h.clock.advance()
    submitted = await h.store.record_submitted(
        job.id, external_id="task-1", state=S.RUNNING, vendor_status="running", info={"pid": 7}
    )
    assert (submitted.state, submitted.external_id, submitted.vendor_status) == (
        S.RUNNING,
        "task-1",
        "running",
    )
    assert (submitted.launching, submitted.reason, submitted.updated_at) == (False, None, now)
    assert submitted.info == {"attempt_started_at": job.created_at, "pid": 7}
    assert submitted.state_times == {"QUEUED": job.created_at, "RUNNING": now}
    assert [(e.from_state, e.to_state, e.at) for e in h.published] == [(S.QUEUED, S.RUNNING, now)]
    assert await h.store.get(job.id) == submitted
    (attempt,) = await h.store.attempts(job.id)
    assert (attempt["external_id"], attempt["outcome"]) == ("task-1", "submitted")


@case
async def only_a_launching_attempt_is_submitted_or_failed(h: Harness) -> None:
    queued = await h.accept()
    submitted = await h.job_in(S.SUBMITTED)
    failed = await h.job_in(S.FAILED)
    h.published.clear()
    for job in (queued, submitted, failed):
        with pytest.raises(errors.StaleState) as info:
            await h.store.record_submitted(job.id, external_id="e", state=S.SUBMITTED)
        assert (info.value.job_id, info.value.actual) == (job.id, job.state.value)
        for final in (False, True):
            with pytest.raises(errors.StaleState):
                await h.store.record_start_failure(job.id, "why", final=final)
        assert await h.store.get(job.id) == job
    # A launching job moves to a later state only.
    launching = await h.store.begin_attempt(queued.id)
    with pytest.raises(errors.IllegalTransition):
        await h.store.record_submitted(queued.id, external_id="e", state=S.QUEUED)
    assert await h.store.get(queued.id) == launching
    assert (await h.store.attempts(queued.id))[0]["outcome"] is None
    assert h.published == []


@case
async def a_failed_start_requeues_the_job_or_fails_it(h: Harness) -> None:
    job = await h.accept()
    await h.store.begin_attempt(job.id)
    h.published.clear()
    requeued = await h.store.record_start_failure(job.id, "throttled", final=False)
    assert (requeued.state, requeued.launching, requeued.reason) == (S.QUEUED, False, "throttled")
    assert requeued.updated_at == job.created_at  # begin_attempt's time: nothing else changed
    assert h.published == []
    await h.store.begin_attempt(job.id)
    now = h.clock.advance()
    failed = await h.store.record_start_failure(job.id, "no such image", final=True)
    assert (failed.state, failed.launching, failed.reason, failed.attempt) == (
        S.FAILED,
        False,
        "no such image",
        2,
    )
    assert failed.updated_at == now
    assert [(e.from_state, e.to_state, e.reason) for e in h.published] == [
        (S.QUEUED, S.FAILED, "no such image")
    ]
    assert [a["outcome"] for a in await h.store.attempts(job.id)] == [
        "start failed: throttled",
        "start failed: no such image",
    ]


# -- transitions -----------------------------------------------------------------------------


@case
async def transitions_follow_the_table(h: Harness) -> None:
    pairs = [(old, new) for old in models.JobState for new in models.JobState]
    jobs = await _gather(*(h.job_in(old) for old, _ in pairs))
    h.published.clear()

    async def attempt(job: models.Job, new: models.JobState) -> None:
        if models.can_transition(job.state, new):
            moved = await h.store.transition(job.id, job.state, new, reason="moved")
            assert (moved.state, moved.reason) == (new, "moved")
            return
        with pytest.raises(errors.IllegalTransition) as info:
            await h.store.transition(job.id, job.state, new, reason="moved")
        refused = info.value
        assert (refused.job_id, refused.old, refused.new, refused.code) == (
            job.id,
            job.state.value,
            new.value,
            "conflict",
        )
        assert await h.store.get(job.id) == job  # nothing changed

    await _gather(*(attempt(job, new) for job, (_, new) in zip(jobs, pairs, strict=True)))
    legal_pairs = {
        (j.id, new)
        for j, (old, new) in zip(jobs, pairs, strict=True)
        if models.can_transition(old, new)
    }
    assert {(e.job_id, e.to_state) for e in h.published} == legal_pairs
    assert len(h.published) == len(legal_pairs)


@case
async def a_stale_expected_state_is_refused(h: Harness) -> None:
    job = await h.job_in(S.RUNNING)
    h.published.clear()
    with pytest.raises(errors.StaleState) as info:
        await h.store.transition(job.id, S.SUBMITTED, S.SUCCEEDED)
    assert (info.value.expected, info.value.actual, info.value.code) == (
        "SUBMITTED",
        "RUNNING",
        "conflict",
    )
    # Stale first: an expected state that is wrong is stale even where the move is illegal.
    with pytest.raises(errors.StaleState):
        await h.store.transition(job.id, S.SUCCEEDED, S.QUEUED)
    assert await h.store.get(job.id) == job
    assert h.published == []


@case
async def a_transition_records_what_it_is_given(h: Harness) -> None:
    job = await h.job_in(S.SUBMITTED)
    job = await h.store.observe(job.id, vendor_status="PENDING", reason="queued", info={"a": 1})
    t1 = h.clock.advance()
    running = await h.store.transition(
        job.id, S.SUBMITTED, S.RUNNING, vendor_status="RUNNING", info={"b": (1, 2)}
    )
    # reason replaced (here: cleared); vendor status replaced; info merged, as JSON keeps it.
    assert (running.reason, running.vendor_status, running.exit_code) == (None, "RUNNING", None)
    assert running.info == {"attempt_started_at": job.created_at, "a": 1, "b": [1, 2]}
    assert (running.updated_at, running.state_times["RUNNING"]) == (t1, t1)
    t2 = h.clock.advance()
    done = await h.store.transition(
        job.id, S.RUNNING, S.FAILED, reason="exit 3", exit_code=3, external_id="moved-task"
    )
    # What is not given is kept.
    assert (done.vendor_status, done.exit_code, done.external_id) == ("RUNNING", 3, "moved-task")
    assert done.state_times == {
        "QUEUED": job.created_at,
        "SUBMITTED": job.created_at,
        "RUNNING": t1,
        "FAILED": t2,
    }
    assert (done.created_at, done.attempt, done.token) == (job.created_at, 1, f"{job.id}-1")
    assert await h.store.get(job.id) == done
    last = h.published[-1]
    assert (last.from_state, last.to_state, last.reason, last.exit_code, last.at) == (
        S.RUNNING,
        S.FAILED,
        "exit 3",
        3,
        t2,
    )


# -- stops -----------------------------------------------------------------------------------


@case
async def a_stop_ends_a_job_no_backend_has_seen_at_once(h: Harness) -> None:
    whys: Sequence[models.StopReason] = ("cancel", "timeout", "queue_timeout")
    for why in whys:
        job = await h.accept(_spec(timeout_s=3.0, queue_timeout_s=2.0))
        if why == "queue_timeout":  # a job waiting for a retry has a reason and an attempt
            await h.store.begin_attempt(job.id)
            job = await h.store.record_start_failure(job.id, "throttled", final=False)
        now = h.clock.advance()
        stopped = await h.store.request_stop(job.id, why)
        state, reason = tracking.stopped_outcome(job, why)
        assert (stopped.state, stopped.reason, stopped.stop_reason) == (state, reason, why)
        assert (stopped.updated_at, stopped.state_times[state.value]) == (now, now)
        assert await h.store.get(job.id) == stopped
        event = h.published[-1]
        assert (event.job_id, event.from_state, event.to_state, event.reason) == (
            job.id,
            S.QUEUED,
            state,
            reason,
        )
        assert await h.store.request_stop(job.id, "cancel") == stopped  # over: nothing more


@case
async def a_stop_of_a_job_a_backend_has_keeps_its_state_and_first_reason(h: Harness) -> None:
    launching = await h.accept()
    begun = await h.store.begin_attempt(launching.id)
    assert begun is not None
    launching = begun
    assert launching is not None
    jobs = [launching, *[await h.job_in(state) for state in ACTIVE_BUT_QUEUED]]
    h.published.clear()
    for job in jobs:
        stopping = await h.store.request_stop(job.id, "timeout")
        assert stopping == _replace(job, stop_reason="timeout")
        assert await h.store.request_stop(job.id, "cancel") == stopping
        assert await h.store.get(job.id) == stopping
    assert h.published == []


@case
async def a_stop_of_a_finished_job_changes_nothing(h: Harness) -> None:
    for state in models.TERMINAL:
        job = await h.job_in(state)
        assert await h.store.request_stop(job.id, "cancel") == job
        assert await h.store.get(job.id) == job


@case
async def a_stopped_attempt_that_never_launched_ends_when_asked_again(h: Harness) -> None:
    """The dispatcher's way: a stop asked while launching; the attempt proves to have launched
    nothing; the stop asked again ends the job, now QUEUED and not launching."""
    job = await h.accept()
    await h.store.begin_attempt(job.id)
    await h.store.request_stop(job.id, "cancel")
    requeued = await h.store.record_start_failure(job.id, "never launched", final=False)
    assert (requeued.state, requeued.stop_reason) == (S.QUEUED, "cancel")
    ended = await h.store.request_stop(job.id, "cancel")
    assert (ended.state, ended.reason) == (S.CANCELLED, "cancelled by request")


# -- retries ---------------------------------------------------------------------------------

_PREVIOUS = {"retry": {"of": 3, "previous": {"attempt": 1, "failure": "infrastructure"}}}


@case
async def a_retry_sends_a_launched_job_back_to_queued_for_a_new_attempt(h: Harness) -> None:
    job = await h.job_in(S.RUNNING)
    job = await h.store.observe(job.id, vendor_status="RUNNING", reason="up", info={"k": 1})
    h.published.clear()
    now = h.clock.advance()
    requeued = await h.store.retry(
        job.id, S.RUNNING, reason="attempt 1 failed", outcome="failed (x): y", info=_PREVIOUS
    )
    assert (requeued.state, requeued.launching, requeued.attempt, requeued.token) == (
        S.QUEUED,
        False,
        1,
        f"{job.id}-1",
    )
    assert (requeued.external_id, requeued.exit_code, requeued.vendor_status) == (None,) * 3
    assert (requeued.reason, requeued.updated_at, dict(requeued.state_times)) == (
        "attempt 1 failed",
        now,
        {"QUEUED": now},
    )
    assert requeued.created_at == job.created_at
    assert dict(requeued.info) == {**job.info, **_PREVIOUS}
    assert await h.store.get(job.id) == requeued
    # One event, carrying the failure class of the attempt that failed.
    assert [(e.from_state, e.to_state, e.reason, e.failure) for e in h.published] == [
        (S.RUNNING, S.QUEUED, "attempt 1 failed", "infrastructure")
    ]
    assert (await h.store.history(job.id))[-1] == {
        "at": models.iso(now),
        "from": "RUNNING",
        "to": "QUEUED",
        "reason": "attempt 1 failed",
        "exit_code": None,
    }
    # The next attempt has the next number and token; the first keeps its outcome.
    again = await h.store.begin_attempt(job.id)
    assert again is not None
    assert (again.attempt, again.token) == (2, f"{job.id}-2")
    done = await h.store.record_submitted(job.id, external_id="x-2", state=S.SUBMITTED)
    attempts = await h.store.attempts(job.id)
    assert [(a["attempt"], a["external_id"], a["outcome"]) for a in attempts] == [
        (1, f"x-{job.id}", "failed (x): y"),
        (2, "x-2", "submitted"),
    ]
    await h.restart()
    assert await h.store.get(job.id) == done


@case
async def a_retry_comes_from_any_launched_unfinished_state_only(h: Harness) -> None:
    for state in ACTIVE_BUT_QUEUED:
        job = await h.job_in(state)
        requeued = await h.store.retry(job.id, state, reason="again", outcome="failed")
        assert requeued.state == S.QUEUED, state
    for state in [S.QUEUED, *models.TERMINAL]:
        job = await h.job_in(state)
        with pytest.raises(errors.IllegalTransition):
            await h.store.retry(job.id, state, reason="again", outcome="failed")
        assert await h.store.get(job.id) == job
    launching = await h.accept()
    begun = await h.store.begin_attempt(launching.id)
    assert begun is not None
    launching = begun
    assert launching is not None
    with pytest.raises(errors.IllegalTransition):
        await h.store.retry(launching.id, S.QUEUED, reason="again", outcome="failed")
    assert await h.store.get(launching.id) == launching


@case
async def a_retry_is_refused_when_stale_or_stopping(h: Harness) -> None:
    job = await h.job_in(S.RUNNING)
    with pytest.raises(errors.StaleState):
        await h.store.retry(job.id, S.STARTING, reason="again", outcome="failed")
    stopping = await h.store.request_stop(job.id, "cancel")
    h.published.clear()
    with pytest.raises(errors.StaleState):
        await h.store.retry(job.id, S.RUNNING, reason="again", outcome="failed")
    assert await h.store.get(job.id) == stopping
    assert h.published == []
    with pytest.raises(errors.JobNotFound):
        await h.store.retry("nope", S.RUNNING, reason="again", outcome="failed")


# -- event numbers ---------------------------------------------------------------------------


@case
async def events_are_numbered_in_commit_order_and_read_again_from_any_number(h: Harness) -> None:
    a = await h.job_in(S.RUNNING)
    b = await h.job_in(S.SUCCEEDED, peer=PEER_B)
    outcomes = await h.store.accept_many([(_spec(name="x"), "local"), (_spec(), "ecs")], PEER_A)
    await h.store.transition(a.id, S.RUNNING, S.FAILED, reason="no", info={"failure": "user"})
    published = list(h.published)
    seqs = [e.seq for e in published]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs[0] > 0
    # Read again: the same events, as published, from any number on.
    assert await h.store.events_since(0) == published
    assert await h.store.events_since(seqs[3]) == published[4:]
    assert await h.store.events_since(seqs[-1]) == []
    assert await h.store.events_since(0, limit=2) == published[:2]
    assert await h.store.events_since(0, job_id=a.id) == [e for e in published if e.job_id == a.id]
    assert await h.store.events_since(0, peer_uid=PEER_B.uid) == [
        e for e in published if e.job_id == b.id
    ]
    assert (await h.store.events_since(0, job_id=a.id))[-1].failure == "user"
    new_ids = {_accepted(o)[0].id for o in outcomes}
    assert {e.job_id for e in published if e.from_state is None} >= new_ids
    # A restart keeps them, and numbers on from where it was.
    await h.restart()
    assert await h.store.events_since(0) == published
    c = await h.accept()
    assert h.published[-1].job_id == c.id
    assert h.published[-1].seq > seqs[-1]


@case
async def a_purged_jobs_events_are_gone(h: Harness) -> None:
    old = await h.job_in(S.SUCCEEDED)
    h.clock.advance(100)
    kept = await h.job_in(S.SUCCEEDED)
    assert await h.store.purge(h.clock.now - 50) == [old.id]
    assert {e.job_id for e in await h.store.events_since(0)} == {kept.id}


# -- observations ----------------------------------------------------------------------------


@case
async def an_observation_changes_no_state(h: Harness) -> None:
    job = await h.job_in(S.RUNNING)
    h.published.clear()
    h.clock.advance()
    seen = await h.store.observe(job.id, vendor_status="DEACTIVATING", reason="why", info={"x": 1})
    assert seen == _replace(
        job, vendor_status="DEACTIVATING", reason="why", info={**job.info, "x": 1}
    )
    # vendor_status is replaced even by None; reason only when given; info merged.
    seen = await h.store.observe(job.id, vendor_status=None, reason=None, info={"y": (2,)})
    assert (seen.vendor_status, seen.reason) == (None, "why")
    assert seen.info == {**job.info, "x": 1, "y": [2]}
    assert seen.updated_at == job.updated_at
    assert await h.store.get(job.id) == seen
    assert h.published == []
    assert len(await h.store.history(job.id)) == 3


@case
async def a_relocated_attempt_keeps_its_new_id(h: Harness) -> None:
    job = await h.job_in(S.RUNNING)
    h.published.clear()
    moved = await h.store.relocate(job.id, "found-again")
    assert moved == _replace(job, external_id="found-again")
    assert await h.store.get(job.id) == moved
    (attempt,) = await h.store.attempts(job.id)
    assert attempt["external_id"] == "found-again"
    assert h.published == []


# -- history and events ----------------------------------------------------------------------


@case
async def history_and_events_agree_in_commit_order(h: Harness) -> None:
    jobs = [await h.accept(peer=PEER_B if i % 2 else None) for i in range(20)]
    jobs = await _gather(*(h.launched(job) for job in jobs))
    for new in (S.RUNNABLE, S.RUNNING):
        await _gather(
            *(h.store.transition(job.id, job.state, new) for job in jobs),
        )
        jobs = [await h.store.get(job.id) for job in jobs]
    await _gather(*(h.store.request_stop(job.id, "cancel") for job in jobs[:5]))
    await _gather(
        *(h.store.transition(j.id, S.RUNNING, S.SUCCEEDED, exit_code=0) for j in jobs[5:])
    )
    path = [S.QUEUED, S.SUBMITTED, S.RUNNABLE, S.RUNNING]
    for i, job in enumerate(jobs):
        published = h.events_of(job.id)
        # The stopped ones are still RUNNING (their backend has them) until it says they ended.
        assert [e.to_state for e in published] == (path if i < 5 else [*path, S.SUCCEEDED])
        assert [e.from_state for e in published] == [None, *(e.to_state for e in published[:-1])]
        assert [e.at for e in published] == sorted(e.at for e in published)
        for e in published:
            assert (e.backend, e.name, e.created_at) == (job.backend, job.name, job.created_at)
            assert e.peer_uid == (None if job.peer is None else job.peer.uid)
        assert await h.store.history(job.id) == [
            {
                "at": models.iso(e.at),
                "from": None if e.from_state is None else e.from_state.value,
                "to": e.to_state.value,
                "reason": e.reason,
                "exit_code": e.exit_code,
            }
            for e in published
        ]
    assert {(await h.store.get(j.id)).state for j in jobs[:5]} == {S.RUNNING}
    assert {(await h.store.get(j.id)).state for j in jobs[5:]} == {S.SUCCEEDED}


@case
async def a_refused_write_publishes_nothing(h: Harness) -> None:
    job = await h.job_in(S.SUCCEEDED)
    h.published.clear()
    history = await h.store.history(job.id)
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: h.store.transition(job.id, S.SUCCEEDED, S.FAILED),
        lambda: h.store.transition(job.id, S.RUNNING, S.FAILED),
        lambda: h.store.record_submitted(job.id, external_id="e", state=S.RUNNING),
        lambda: h.store.record_start_failure(job.id, "late", final=True),
    ]
    for write in writes:
        with pytest.raises((errors.IllegalTransition, errors.StaleState)):
            await write()
    assert h.published == []
    assert await h.store.history(job.id) == history


# -- retention -------------------------------------------------------------------------------


@case
async def purge_deletes_old_finished_jobs_only(h: Harness) -> None:
    old_done = await h.job_in(S.SUCCEEDED)
    old_lost = await h.job_in(S.LOST)
    old_running = await h.job_in(S.RUNNING)
    old_queued = await h.accept(_spec(idempotency_key="kept"))
    cutoff = h.clock.advance(100)
    recent_done = await h.job_in(S.FAILED)
    keyed = await h.accept(_spec(idempotency_key="again"))
    await h.store.request_stop(keyed.id, "cancel")
    h.clock.advance(100)
    purged = await h.store.purge(cutoff)
    assert sorted(purged) == sorted([old_done.id, old_lost.id])
    assert await h.store.purge(cutoff) == []
    for job in (old_done, old_lost):
        with pytest.raises(errors.JobNotFound):
            await h.store.get(job.id)
        assert await h.store.history(job.id) == []
        assert await h.store.attempts(job.id) == []
    remaining = {job.id for job in await h.store.list_jobs()}
    assert remaining == {old_running.id, old_queued.id, recent_done.id, keyed.id}
    assert await h.store.count_by_state() == {
        "RUNNING": 1,
        "QUEUED": 1,
        "FAILED": 1,
        "CANCELLED": 1,
    }
    # A purged job's idempotency key names nothing any more; a kept one's still does.
    assert sorted(await h.store.purge(h.clock.now)) == sorted([recent_done.id, keyed.id])
    (outcome,) = await h.store.accept_many([(_spec(idempotency_key="again"), "local")], PEER_A)
    fresh, created = _accepted(outcome)
    assert (created, fresh.id != keyed.id) == (True, True)
    (outcome,) = await h.store.accept_many([(_spec(idempotency_key="kept"), "local")], PEER_A)
    assert _accepted(outcome) == (old_queued, False)


@case
async def purge_goes_in_slices(h: Harness) -> None:
    outcomes = await h.store.accept_many([(_spec(), "local")] * (PURGE_SLICE + 3), None)
    jobs = [_accepted(o)[0] for o in outcomes]
    await _gather(*(h.store.request_stop(job.id, "cancel") for job in jobs))
    h.clock.advance()
    first = await h.store.purge(h.clock.now)
    second = await h.store.purge(h.clock.now)
    assert (len(first), len(second)) == (PURGE_SLICE, 3)
    assert sorted(first + second) == sorted(job.id for job in jobs)
    assert await h.store.purge(h.clock.now) == []
    assert await h.store.count_by_state() == {}


@case
async def an_array_expands_into_its_children_all_at_once_with_their_events(h: Harness) -> None:
    parent = await h.accept(_spec(array_size=3))
    other = await h.accept()
    children_specs = [_spec(env={"I": str(i)}) for i in range(3)]
    before = len(h.published)
    moved, children = await h.store.expand(parent.id, children_specs)
    assert (moved.state, moved.info["array_status"]) == (S.SUBMITTED, {"QUEUED": 3})
    assert [c.id for c in children] == [f"{parent.id}:{i}" for i in range(3)]
    assert {(c.state, c.backend, c.peer) for c in children} == {(S.QUEUED, "local", PEER_A)}
    assert [c.spec for c in children] == children_specs
    published = h.published[before:]
    assert [(e.job_id, e.from_state, e.to_state) for e in published] == [
        *((c.id, None, S.QUEUED) for c in children),
        (parent.id, S.QUEUED, S.SUBMITTED),
    ]
    assert [e.seq for e in published] == sorted(e.seq for e in published)
    with pytest.raises(errors.StaleState):  # once only
        await h.store.expand(parent.id, children_specs)
    stopped = await h.accept(_spec(array_size=2))
    await h.store.request_stop(stopped.id, "cancel")
    with pytest.raises(errors.StaleState):  # not once stopped
        await h.store.expand(stopped.id, children_specs[:2])
    assert await h.store.count_children(stopped.id) == {}

    await h.store.begin_attempt(children[0].id)
    await h.store.record_submitted(children[0].id, external_id="t0", state=S.RUNNING)
    await h.store.request_stop(children[1].id, "cancel")
    assert await h.store.count_children(parent.id) == {"RUNNING": 1, "CANCELLED": 1, "QUEUED": 1}
    assert await h.store.count_children(other.id) == {}
    listed = [j.id for j in await h.store.list_jobs(JobQuery(children=False))]
    assert listed == [stopped.id, other.id, parent.id]  # children left out
    mine = await h.store.list_jobs(JobQuery(id_prefix=f"{parent.id}:"))
    assert sorted(j.id for j in mine) == [c.id for c in children]
    assert (await h.restart()) is h.store
    assert await h.store.get(children[2].id) == children[2]


@case
async def an_arrays_children_are_stopped_in_one_operation(h: Harness) -> None:
    parent = await h.accept(_spec(array_size=4))
    _, children = await h.store.expand(parent.id, [_spec()] * 4)
    running = await h.launched(children[0])
    done = await h.launched(children[1])
    done = await h.store.transition(done.id, S.SUBMITTED, S.SUCCEEDED)
    before = len(h.published)
    launched = await h.store.stop_children(parent.id, "cancel")
    assert [(j.id, j.state, j.stop_reason) for j in launched] == [
        (running.id, S.SUBMITTED, "cancel")
    ]
    assert [(e.job_id, e.to_state) for e in h.published[before:]] == [
        (children[2].id, S.CANCELLED),
        (children[3].id, S.CANCELLED),
    ]
    assert (await h.store.get(done.id)).state == S.SUCCEEDED  # an ended child stays as it was
    assert await h.store.stop_children(parent.id, "timeout") == []  # asked once only
    assert (await h.store.get(running.id)).stop_reason == "cancel"


@case
async def dependents_are_found_backwards_until_purged(h: Harness) -> None:
    first, other = await h.accept(), await h.accept()
    (a, _), (b, _) = (
        _accepted(o)
        for o in await h.store.accept_many(
            [
                (_spec(depends_on=[first.id]), "local"),
                (_spec(depends_on=[first.id, other.id]), "local"),
            ],
            PEER_A,
        )
    )
    assert await h.store.dependents(first.id) == sorted([a.id, b.id])
    assert await h.store.dependents(other.id) == [b.id]
    assert await h.store.dependents(a.id) == []
    await h.restart()
    assert await h.store.dependents(first.id) == sorted([a.id, b.id])
    await h.store.request_stop(a.id, "cancel")
    h.clock.advance()
    assert await h.store.purge(h.clock.now) == [a.id]
    assert await h.store.dependents(first.id) == [b.id]
    await h.store.request_stop(other.id, "cancel")
    h.clock.advance()
    assert await h.store.purge(h.clock.now) == [other.id]
    assert await h.store.dependents(other.id) == []


@case
async def definitions_are_remembered_per_backend_across_restarts_and_purges(h: Harness) -> None:
    digest = "ab" * 32
    assert await h.store.definition("ecs", digest) is None
    await h.store.remember_definition("ecs", digest, "arn:aws:ecs:td/app-orch-abab:1")
    await h.store.remember_definition("batch", digest, "arn:aws:batch:jd/app-orch-abab:1")
    await h.store.remember_definition("ecs", digest, "arn:aws:ecs:td/app-orch-abab:2")  # latest
    job = await h.accept()
    await h.store.request_stop(job.id, "cancel")
    h.clock.advance()
    assert await h.store.purge(h.clock.now) == [job.id]  # jobs go, definitions stay
    await h.restart()
    assert await h.store.definition("ecs", digest) == "arn:aws:ecs:td/app-orch-abab:2"
    assert await h.store.definition("batch", digest) == "arn:aws:batch:jd/app-orch-abab:1"
    assert await h.store.definition("local", digest) is None
    assert h.published[-1].job_id == job.id  # remembering publishes nothing


# -- lifecycle and health --------------------------------------------------------------------


@case
async def a_newer_schema_is_refused(h: Harness) -> None:
    await h.accept()
    await h.store.close()
    h.backing.write_newer_schema()
    newer = h.backing.store(h.hub, h.clock)
    with pytest.raises(errors.StoreTooNew) as info:
        await newer.open()
    assert isinstance(info.value, errors.StoreUnusable)  # the daemon exits 2, not restarted
    assert (info.value.version, info.value.supported) == (
        info.value.supported + 1,
        info.value.supported,
    )
    assert "schema_version" in info.value.message


@case
async def writes_need_an_open_store(h: Harness) -> None:
    job = await h.accept()
    await h.store.close()
    writes: list[Callable[[Store], Awaitable[object]]] = [
        lambda store: store.accept_many([(_spec(), "local")], None),
        lambda store: store.request_stop(job.id, "cancel"),
        lambda store: store.transition(job.id, S.QUEUED, S.FAILED),
        lambda store: store.begin_attempt(job.id),
        lambda store: store.ping(),
        lambda store: store.remember_definition("ecs", "d" * 64, "arn"),
    ]
    unopened = h.backing.store(h.hub, h.clock)
    for write in writes:
        for store in (h.store, unopened):  # closed, never opened
            with pytest.raises(errors.StoreError):
                await write(store)
    h.store = h.backing.store(h.hub, h.clock)
    await h.store.open()
    assert await h.store.get(job.id) == job  # nothing was written


@case
async def a_healthy_store_answers_its_health_checks(h: Harness) -> None:
    await h.store.ping()
    assert h.store.problems() == []
    h.store.check_room()
    free = h.store.free_bytes()
    assert free is None or free > 0


def _replace(job: models.Job, **changes: Any) -> models.Job:
    return dataclasses.replace(job, **changes)
