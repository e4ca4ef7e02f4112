"""Failover of the lease on the AWS backends between several `orchestrator serve` processes on
one real PostgreSQL (issue #16), the AWS side a real moto server behind the fault proxy: a
leader killed at each crash point, a leader paused past its lease and then resumed, a clean
stop that hands over at once, and the fencing of writes checked against the database itself.
Every job launched once and ended once, whoever led."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time
from collections.abc import Mapping
from typing import Any

import asyncpg
import pytest

from orchestrator import errors, events, faults, models, views
from orchestrator.store.postgres import PostgresStore
from tests.integration.test_aws_crash import (
    ECS_RECONCILED,
    POINTS,
    TERMINAL,
    ecs_tasks,
    resubmit,
    submit_maybe_unanswered,
    wait_for,
)
from tests.support.cluster import TTL_S, NodeFactory, leader_of, ping, submit, wait_job
from tests.support.daemon import DaemonProcess
from tests.support.faultproxy import FaultProxy
from tests.support.moto import EcsEnv, MotoServer

pytestmark = pytest.mark.timeout(180)

S = models.JobState


# -- what the daemons said ---------------------------------------------------------------------


def logged(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    """The log events named `event` of the daemon's current run, in order."""
    return [e for e in daemon.log_events() if e.get("event") == event]


def elected_tokens(daemon: DaemonProcess) -> list[int]:
    return [int(e["token"]) for e in logged(daemon, "cluster.elected")]


def dispatched_ids(found: list[dict[str, Any]]) -> set[str]:
    return {str(e["job_id"]) for e in found if e.get("event") == "job.dispatched"}


def ended_once(final: views.Job) -> bool:
    """The job's history holds exactly one end (no second terminal transition)."""
    return sum(1 for h in final.get("history", []) if h["to"] in TERMINAL) == 1


def assert_one_task_per_job(
    moto: MotoServer, env: EcsEnv, fault_proxy: FaultProxy, finals: Mapping[str, views.Job]
) -> None:
    """One RunTask reached ECS per job, and each job's one task was started under its one
    attempt's token."""
    assert fault_proxy.forwarded[("ecs", "RunTask")] == len(finals)
    started_by = sorted(t["startedBy"] for t in ecs_tasks(moto, env.cluster))
    assert started_by == sorted(f"{job_id}-{f['attempt']}" for job_id, f in finals.items())
    for job_id, final in finals.items():
        submitted = [a for a in final.get("attempts", []) if a["outcome"] == "submitted"]
        assert [a["token"] for a in submitted] == [f"{job_id}-{final['attempt']}"], final


# -- 1. the leader killed at each crash point, with jobs in hand --------------------------------

JOBS = 10
# The point fires the third time it is reached: the leader dies with other jobs in hand (queued,
# launching or tracked), not at its first one.
CRASH_AT_NTH = 3


@pytest.mark.parametrize("point", POINTS)
def test_leader_killed_at_each_crash_point_fails_over_and_runs_every_job_once(
    point: str,
    make_node: NodeFactory,
    fault_proxy: FaultProxy,
    ecs_env: EcsEnv,
    moto: MotoServer,
) -> None:
    fault_proxy.honour_client_token = True  # as ECS does, and moto does not
    h1, h2, h3 = daemons = [make_node(f"h{i}") for i in (1, 2, 3)]
    h1.start(extra_env={faults.ENV: f"{point}:{CRASH_AT_NTH}"})
    assert leader_of([h1]) is h1
    h2.start()
    h3.start()
    assert leader_of(daemons) is h1
    (first_token,) = elected_tokens(h1)

    # Round robin over the three: the leader takes every third job until it dies; a client
    # the dead leader did not answer sends the same job again, under its key, to a follower.
    ids: list[str] = []
    for i in range(JOBS):
        spec = {"command": ["echo", str(i)], "idempotency_key": f"{point}-{i}"}
        via = daemons[i % 3]
        job_id = submit_maybe_unanswered(via, spec) if via is h1 else submit(via, spec)
        if job_id is None:
            again = resubmit(h2, spec)
            job_id = again["job"]["id"]
        ids.append(job_id)
    assert len(set(ids)) == JOBS

    assert h1.wait_exit(timeout_s=30) == 137, h1.log()
    assert f"crash point {point} reached" in h1.log()
    new = leader_of([h2, h3])
    assert max(elected_tokens(new)) > first_token
    assert ping(new)["cluster"]["leader"]["node"] == new.root.name
    (recovered,) = wait_for(lambda: logged(new, "cluster.recovered"), "the recovery")
    assert recovered["jobs"] >= 1  # the dead leader left work in hand

    finals = {job_id: wait_job(daemons[1 + i % 2], job_id) for i, job_id in enumerate(ids)}
    assert [(f["state"], f["exit_code"]) for f in finals.values()] == [("SUCCEEDED", 0)] * JOBS
    assert all(ended_once(f) for f in finals.values()), finals
    assert_one_task_per_job(moto, ecs_env, fault_proxy, finals)
    outcomes = {e["outcome"] for e in logged(new, "job.reconciled")}
    assert set(ECS_RECONCILED.get(point, [])) <= outcomes, outcomes  # the point's own attempt
    received = fault_proxy.counts[("ecs", "RunTask")]

    # The killed daemon comes back unarmed: it follows, and launches nothing again.
    h1.start()
    assert leader_of(daemons) is new
    assert ping(h1)["cluster"]["leading"] is False
    with h1.client() as client:
        listed = {j["id"] for j in client.call("list", limit=1000)["jobs"]}
    assert listed == set(ids)
    assert logged(h1, "job.dispatched") == []
    assert fault_proxy.counts[("ecs", "RunTask")] == received
    assert_one_task_per_job(moto, ecs_env, fault_proxy, finals)


# -- 2. the leader paused past its lease, then resumed -----------------------------------------

STEP_S = 1.5  # moto: each ECS task state after RUNNING lasts this long (4 steps to STOPPED)
PAUSE_S = 3.5 * TTL_S  # the leader stays stopped this long: well past its lease


def test_leader_paused_past_its_lease_steps_down_and_launches_nothing_twice(
    make_node: NodeFactory, fault_proxy: FaultProxy, ecs_env: EcsEnv, moto: MotoServer
) -> None:
    fault_proxy.honour_client_token = True
    moto.set_transition("ecs::task", "time", seconds=STEP_S)  # tasks run for a while
    daemons = [make_node(f"h{i}") for i in (1, 2, 3)]
    for daemon in daemons:
        daemon.start()
    old = leader_of(daemons)
    followers = [d for d in daemons if d is not old]
    (old_token,) = elected_tokens(old)

    before = [
        submit(followers[i % 2], {"command": ["echo", f"b{i}"], "idempotency_key": f"b{i}"})
        for i in range(4)
    ]

    def running(job_id: str) -> bool:
        with followers[0].client() as client:
            return client.get(job_id)["state"] == "RUNNING"

    wait_for(lambda: all(running(j) for j in before), "the first jobs to run")
    wait_for(lambda: dispatched_ids(old.log_events()) == set(before), "the launches logged")

    old.send_signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    new = leader_of(followers)
    assert max(elected_tokens(new)) > old_token
    # While the old leader sleeps: a cancel of a job it launched, and new jobs.
    cancelled = before[0]
    with followers[0].client() as client:
        assert client.cancel(cancelled)["stop_reason"] == "cancel"
    after = [
        submit(followers[i % 2], {"command": ["echo", f"a{i}"], "idempotency_key": f"a{i}"})
        for i in range(3)
    ]
    wait_for(lambda: dispatched_ids(new.log_events()) >= set(after), "the new leader's launches")
    # A client of the sleeping old leader: connected (the socket's backlog takes it), answered
    # only once it wakes, when the lease is another's.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        late = pool.submit(submit, old, {"command": ["echo", "late"], "idempotency_key": "late"})
        time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
        said_before = len(old.log_events())
        old.send_signal(signal.SIGCONT)
        after.append(late.result(timeout=30))

    def stepped_down() -> bool:
        seen = ping(old)["cluster"]
        return (
            bool(logged(old, "cluster.deposed"))
            and seen["leading"] is False
            and (seen["leader"] or {}).get("node") == new.root.name
        )

    wait_for(stepped_down, "the old leader to step down")
    finals = {job_id: wait_job(new, job_id) for job_id in [*before, *after]}
    for job_id, final in finals.items():
        want = ("CANCELLED", "cancel") if job_id == cancelled else ("SUCCEEDED", None)
        assert (final["state"], final["stop_reason"]) == want, final
        assert ended_once(final), final
    assert_one_task_per_job(moto, ecs_env, fault_proxy, finals)
    assert fault_proxy.counts[("ecs", "RunTask")] == len(finals)  # nobody even tried again
    (task,) = [
        t
        for t in ecs_tasks(moto, ecs_env.cluster)
        if t["taskArn"] == finals[cancelled]["external_id"]
    ]
    assert task["stoppedReason"] == "orchestrator: cancel"
    # Whatever the old leader wrote once it woke was refused or withheld: it launched nothing.
    resumed = old.log_events()[said_before:]
    assert dispatched_ids(resumed) == set(), resumed
    assert not [e for e in resumed if e.get("event") == "job.reconciled"], resumed
    (deposed,) = logged(old, "cluster.deposed")
    assert deposed["token"] == old_token
    assert dispatched_ids(new.log_events()) == set(after)  # the late job's launch too
    assert leader_of(daemons) is new


# -- 3. the fencing itself, against the database -------------------------------------------------


async def accept(store: PostgresStore, backend: str) -> models.Job:
    (outcome,) = await store.accept_many([(models.JobSpec(command=["x"]), backend)], None)
    assert not isinstance(outcome, errors.OrchestratorError), outcome
    job, created = outcome
    assert created
    return job


async def _lease_lapsed(store: PostgresStore) -> None:
    while True:
        lease = await store.lease()
        if lease is None or not lease.current:
            return
        await asyncio.sleep(0.05)


async def test_a_deposed_leaders_writes_are_fenced_and_change_nothing(database: str) -> None:
    a = PostgresStore(database, events.Hub(), node="a")
    b = PostgresStore(database, events.Hub(), node="b")
    c = PostgresStore(database, events.Hub(), node="c")
    fenced: list[str] = []
    a.on_fenced = fenced.append
    for store in (a, b, c):
        await store.open()
    try:
        taken = await a.acquire_lease(1.0)
        assert taken is not None
        assert taken.holder == "a"
        a.lease_token = taken.token
        assert await b.acquire_lease(1.0) is None  # held, and current
        job = await accept(a, "ecs")
        launching = await a.begin_attempt(job.id)
        assert launching is not None
        assert (launching.attempt, launching.launching) == (1, True)

        # A follower (no lease) may not write to an AWS job.
        with pytest.raises(errors.Fenced):
            await c.record_submitted(job.id, external_id="arn:c", state=S.SUBMITTED)
        with pytest.raises(errors.Fenced):
            await c.transition(job.id, S.QUEUED, S.LOST, reason="c")

        async with asyncio.timeout(10):
            await _lease_lapsed(a)
        again = await b.acquire_lease(1.0)
        assert again is not None
        assert (again.holder, again.token) == ("b", taken.token + 1)
        b.lease_token = again.token

        with pytest.raises(errors.Fenced):
            await a.record_submitted(job.id, external_id="arn:a", state=S.SUBMITTED)
        with pytest.raises(errors.Fenced):
            await a.transition(job.id, S.QUEUED, S.LOST, reason="a")
        with pytest.raises(errors.Fenced):
            await a.begin_attempt(job.id)
        assert fenced
        assert all(str(taken.token) in why for why in fenced), fenced
        unchanged = await b.get(job.id)
        assert (unchanged.state, unchanged.attempt, unchanged.launching) == (S.QUEUED, 1, True)
        assert unchanged.external_id is None
        assert [h["to"] for h in await b.history(job.id)] == ["QUEUED"]

        submitted = await b.record_submitted(job.id, external_id="arn:b", state=S.SUBMITTED)
        assert (submitted.state, submitted.external_id) == (S.SUBMITTED, "arn:b")
        ran = await b.transition(job.id, S.SUBMITTED, S.RUNNING)
        assert ran.state == S.RUNNING
        # The old holder cannot renew, nor take the lease back while it is current.
        assert await a.renew_lease(taken.token, 1.0) is None
        assert await a.acquire_lease(1.0) is None

        # A local job is its node's: another node may not drive it, but anyone may stop it.
        local = await accept(a, "local")
        assert local.info.get("owner") == "a"
        with pytest.raises(errors.Fenced):
            await b.begin_attempt(local.id)
        with pytest.raises(errors.Fenced):
            await b.transition(local.id, S.QUEUED, S.LOST, reason="b")
        assert (await a.get(local.id)).state == S.QUEUED
        stopped = await b.request_stop(local.id, "cancel")
        assert (stopped.state, stopped.stop_reason) == (S.CANCELLED, "cancel")
    finally:
        for store in (a, b, c):
            await store.close()


# -- 4. a clean stop hands the lease over at once --------------------------------------------------

LONG_TTL_S = 30.0  # a lease that lapses only long after the test's waits would give up


def _lease_row(url: str) -> tuple[str, int, float, float]:
    async def read() -> tuple[str, int, float, float]:
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow(
                "SELECT holder, token, extract(epoch FROM acquired_at), "
                "extract(epoch FROM expires_at) FROM leases"
            )
        finally:
            await conn.close()
        assert row is not None
        return str(row[0]), int(row[1]), float(row[2]), float(row[3])

    return asyncio.run(read())


def test_a_leader_stopped_cleanly_hands_over_at_once(
    make_node: NodeFactory,
    fault_proxy: FaultProxy,
    ecs_env: EcsEnv,
    moto: MotoServer,
    database: str,
) -> None:
    """With a lease TTL far longer than any wait here, a follower can take over only if the
    stopping leader released its lease: the database refuses to hand over one not lapsed."""
    fault_proxy.honour_client_token = True
    moto.set_transition("ecs::task", "time", seconds=0.5)  # in flight across the handover
    daemons = [
        make_node(f"h{i}", cluster={"node": f"h{i}", "lease_ttl_s": LONG_TTL_S}) for i in (1, 2, 3)
    ]
    for daemon in daemons:
        daemon.start()
    old = leader_of(daemons)
    followers = [d for d in daemons if d is not old]
    jobs = [submit(followers[0], {"command": ["echo", f"j{i}"]}) for i in range(3)]
    wait_for(lambda: dispatched_ids(old.log_events()) == set(jobs), "the launches")
    holder, token, _, expires_at = _lease_row(database)
    assert (holder, token) == (old.root.name, 1)

    assert old.stop(signal.SIGTERM) == 0, old.log()
    (deposed,) = logged(old, "cluster.deposed")
    assert (deposed["token"], deposed["why"]) == (token, "stopping")
    new = leader_of(followers)
    (elected,) = logged(new, "cluster.elected")
    assert elected["token"] == token + 1
    holder, new_token, acquired_at, _ = _lease_row(database)
    assert (holder, new_token) == (new.root.name, token + 1)
    assert acquired_at < expires_at  # taken before the old lease could have lapsed: released

    jobs.append(submit(new, {"command": ["echo", "later"]}))
    finals = {job_id: wait_job(new, job_id) for job_id in jobs}
    assert [f["state"] for f in finals.values()] == ["SUCCEEDED"] * len(jobs)
    assert all(ended_once(f) for f in finals.values()), finals
    assert_one_task_per_job(moto, ecs_env, fault_proxy, finals)


def test_the_elected_event_names_the_previous_leader(make_node: NodeFactory) -> None:
    """`cluster.elected` says whose lease was taken over (it once named the new leader)."""
    h1, h2 = make_node("h1"), make_node("h2")
    h1.start()
    assert leader_of([h1]) is h1
    h2.start()
    assert leader_of([h1, h2]) is h1
    assert h1.stop(signal.SIGTERM) == 0, h1.log()
    assert leader_of([h2]) is h2
    (elected,) = logged(h2, "cluster.elected")
    assert (elected["token"], elected["previous"]) == (2, "h1"), elected
