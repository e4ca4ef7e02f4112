"""Several `orchestrator serve` processes on one real PostgreSQL (issue #16) when the database
goes away or the network to it misbehaves: the server restarted under load, the leader's
connections stalled (it is deposed), one daemon's connections cut again and again, a follower's
feed cut under a watcher. Whatever happens, every acknowledged job runs exactly once (the fault
proxy counts ECS launches; it answers a repeated RunTask token as ECS does), the daemons recover
by themselves, and watchers see every change in order.

Between one daemon and PostgreSQL, a TCP proxy of the test's (`tests/support/tcpproxy.py`)
relays to the server's unix socket. Besides stalls and cuts at any moment, it holds or cuts a
connection at the two points of a transaction that matter, each tested on its own: stalled
before its COMMIT (its locks held: the lease's row, the events' numbering), and cut between a
COMMIT that reached the server and its answer (committed, and the daemon not told).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, views
from orchestrator.client import Client, StoreUnavailable, SyncClient
from tests.integration.test_aws_crash import WAIT_S, ecs_tasks, wait_for
from tests.support.cluster import TTL_S, NodeFactory, leader_of, ping, submit, wait_job
from tests.support.daemon import DaemonProcess
from tests.support.faultproxy import FaultProxy
from tests.support.moto import EcsEnv, MotoServer
from tests.support.postgres import PostgresServer
from tests.support.tcpproxy import TcpProxy
from tests.support.waits import until

pytestmark = pytest.mark.timeout(120)

SUCCEEDED = ("SUCCEEDED", 0)


@pytest.fixture(scope="module")
def own_server(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A server of this module's alone, durable: the session's does not flush its commits
    (`synchronous_commit=off`), so that stopping it at once, as a crash would, loses some it
    acknowledged — not what these tests are about. Restarting this one touches no other test."""
    root = Path(tempfile.mkdtemp(prefix="orc-pg-outages-", dir="/tmp"))
    root.chmod(0o755)
    server = PostgresServer(root, postgres_server.bin)
    server.start(durable=True)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database(own_server: PostgresServer) -> str:
    """A fresh database on this module's server (`make_node`'s daemons share it)."""
    return asyncio.run(own_server.new_database())


@pytest.fixture
def tcp_proxy(own_server: PostgresServer) -> Iterator[TcpProxy]:
    """A TCP proxy on 127.0.0.1 to the server's unix socket."""
    with TcpProxy(own_server.socket_dir / ".s.PGSQL.5432") as proxy:
        yield proxy


def through(proxy: TcpProxy, database: str) -> str:
    """`database`'s URL (unix socket) as one through `proxy` (TCP)."""
    parsed = urllib.parse.urlsplit(database)
    return f"postgresql://{parsed.username}@127.0.0.1:{proxy.port}{parsed.path}"


# -- submitting under fire ---------------------------------------------------------------------


@dataclasses.dataclass
class Submission:
    key: str
    spec: dict[str, Any]
    daemon: DaemonProcess
    job_id: str | None = None  # once acknowledged
    refusals: list[errors.RemoteError] = dataclasses.field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.spec.get("backend") == "local"


class Submitter:
    """A stream of submissions (every third a local job, the others ECS), each with an
    idempotency key, through `daemons` in turn, from a thread of its own; a refused one is
    tried again (same key, same daemon) by `finish`, as a careful client does."""

    def __init__(
        self,
        daemons: Sequence[DaemonProcess],
        prefix: str,
        interval_s: float = 0.05,
        on_acknowledged: Callable[[Submission], object] = lambda submission: None,
    ):
        self._daemons = list(daemons)
        self._on_acknowledged = on_acknowledged
        self._prefix = prefix
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"submit-{prefix}", daemon=True)
        self.all: list[Submission] = []
        self.unexpected: list[BaseException] = []

    def start(self) -> Submitter:
        self._thread.start()
        return self

    def acknowledged(self) -> int:
        with self._lock:
            return sum(1 for s in self.all if s.job_id is not None)

    def refused(self) -> list[Submission]:
        with self._lock:
            return [s for s in self.all if s.refusals]

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            key = f"{self._prefix}{index}"
            spec: dict[str, Any] = {"command": ["echo", key], "idempotency_key": key}
            if index % 3 == 2:
                spec = {"command": ["true"], "backend": "local", "idempotency_key": key}
            submission = Submission(key, spec, self._daemons[index % len(self._daemons)])
            with self._lock:
                self.all.append(submission)
            self._try(submission)
            index += 1
            self._stop.wait(self._interval_s)

    def _try(self, submission: Submission) -> bool:
        try:
            with SyncClient(submission.daemon.socket_path, timeout_s=30) as client:
                job_id = client.submit(submission.spec)["id"]
        except errors.RemoteError as exc:
            submission.refusals.append(exc)
            return False
        except Exception as exc:  # not an answer at all: what these tests must never see
            self.unexpected.append(exc)
            return False
        submission.job_id = job_id
        self._on_acknowledged(submission)
        return True

    def finish(self, timeout_s: float = 30.0) -> list[Submission]:
        """Stop; try every refused submission again until it is acknowledged; all of them."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout_s)
            assert not self._thread.is_alive()
        deadline = time.monotonic() + timeout_s
        for submission in self.all:
            while submission.job_id is None:
                assert time.monotonic() < deadline, f"{submission.key}: {submission.refusals}"
                if not self._try(submission):
                    time.sleep(0.1)
        assert not self.unexpected, self.unexpected
        return self.all


def wait_end(daemon: DaemonProcess, job_id: str) -> views.Job:
    """`wait_job` as a careful client does it: a `store_unavailable` answer (the daemon's
    connection to PostgreSQL was cut under the request) is asked again."""
    deadline = time.monotonic() + WAIT_S * 2
    while True:
        try:
            return wait_job(daemon, job_id)
        except StoreUnavailable as exc:
            if exc.code != "store_unavailable" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def check_every_job_ran_once(
    submissions: Sequence[Submission],
    waiters: Sequence[DaemonProcess],
    fault_proxy: FaultProxy,
    moto: MotoServer,
    ecs_env: EcsEnv,
) -> None:
    """Each acknowledged job (one per key) ended SUCCEEDED, once: one launched attempt, one end
    in its history, one RunTask reaching ECS per ECS job, one task per ECS job."""
    ids = [s.job_id for s in submissions]
    assert len(set(ids)) == len(ids), "two keys named one job"
    attempt: dict[str, int] = {}
    for index, submission in enumerate(submissions):
        assert submission.job_id is not None
        final = wait_end(waiters[index % len(waiters)], submission.job_id)
        attempt[submission.job_id] = final["attempt"]
        ends = [h for h in final["history"] if h["to"] == "SUCCEEDED"]
        assert (final["state"], final["exit_code"]) == SUCCEEDED, final
        assert len(ends) == 1, final["history"]
        # An attempt before the last one is there only if it provably never launched (its
        # begin was recorded, the answer lost, and the settling found nothing).
        attempts = final["attempts"]
        assert [a["attempt"] for a in attempts] == list(range(1, final["attempt"] + 1))
        for earlier in attempts[:-1]:
            assert earlier["external_id"] is None, attempts
            assert (earlier["outcome"] or "").endswith("never launched"), attempts
        assert final["idempotency_key"] == submission.key
    ecs_ids = sorted(s.job_id for s in submissions if not s.local and s.job_id is not None)
    assert fault_proxy.forwarded[("ecs", "RunTask")] == len(ecs_ids)
    tasks = ecs_tasks(moto, ecs_env.cluster)
    assert sorted(t["startedBy"] for t in tasks) == sorted(f"{j}-{attempt[j]}" for j in ecs_ids)


def logged(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == event]


def healthy(daemon: DaemonProcess) -> bool:
    found = ping(daemon)
    return found["status"] == "ok" and found["jobs"] is not None


# -- 1. the server restarted under load --------------------------------------------------------


def test_postgresql_restarted_under_load_loses_and_repeats_nothing(
    make_node: NodeFactory,
    own_server: PostgresServer,
    fault_proxy: FaultProxy,
    ecs_env: EcsEnv,
    moto: MotoServer,
) -> None:
    fault_proxy.honour_client_token = True
    daemons = [make_node(f"h{i}") for i in (1, 2, 3)]
    for daemon in daemons:
        daemon.start()
    leader_of(daemons)
    submitter = Submitter(daemons, "r").start()
    wait_for(lambda: submitter.acknowledged() >= 9, "submissions before the outage")
    pings: list[dict[str, Any]] = []
    try:
        own_server.stop()
        down = time.monotonic()
        wait_for(lambda: len(submitter.refused()) >= 3, "submissions refused in the outage")
        pings = [ping(d) for d in daemons]
        while time.monotonic() - down < 3.0:  # longer than the lease's TTL
            time.sleep(0.05)
    finally:
        own_server.start(durable=True)
    acknowledged = submitter.acknowledged()
    wait_for(lambda: submitter.acknowledged() >= acknowledged + 9, "submissions after it")
    submissions = submitter.finish()
    refusals = [exc for s in submissions for exc in s.refusals]
    # Refused saying why: PostgreSQL cannot be reached (nothing recorded), or — a COMMIT in
    # flight as it stopped — whether it was recorded cannot be known yet.
    assert any("PostgreSQL cannot be reached" in str(exc) for exc in refusals), refusals
    for exc in refusals:
        assert exc.code in ("store_unavailable", "store_error"), exc
        assert "PostgreSQL" in str(exc), exc
    for found in pings:
        assert found["status"] == "degraded", found
        assert "store_unreachable" in {p["reason"] for p in found["problems"]}, found
        assert found["jobs"] is None
    check_every_job_ran_once(submissions, daemons, fault_proxy, moto, ecs_env)
    # Nobody was restarted: each recovered by itself, and one leads again.
    assert all(d.proc is not None and d.proc.poll() is None for d in daemons)
    assert [d.starts for d in daemons] == [1, 1, 1]
    wait_for(lambda: all(healthy(d) for d in daemons), "every daemon healthy again")
    leader_of(daemons)


# -- 2. the leader cut off from PostgreSQL (its connections stall) -----------------------------


def test_a_leader_cut_off_is_deposed_and_launches_nothing_twice(
    make_node: NodeFactory,
    database: str,
    tcp_proxy: TcpProxy,
    fault_proxy: FaultProxy,
    ecs_env: EcsEnv,
    moto: MotoServer,
) -> None:
    fault_proxy.honour_client_token = True
    cut_off = make_node("h1", store={"url": through(tcp_proxy, database)})
    cut_off.start()
    assert leader_of([cut_off]) is cut_off
    others = [make_node(f"h{i}") for i in (2, 3)]
    for daemon in others:
        daemon.start()
    daemons = [cut_off, *others]
    assert leader_of(daemons) is cut_off
    before = Submitter(daemons, "b").start()
    wait_for(lambda: before.acknowledged() >= 9, "jobs under way")
    submissions = before.finish()

    tcp_proxy.stall()  # at any moment (the next test: in the middle of a write)
    began = time.monotonic()
    try:
        during = Submitter(others, "d").start()  # the one cut off could not answer
        successor = wait_for(
            lambda: next((d for d in others if ping(d)["cluster"]["leading"]), None),
            "a follower to take the lease over",
            timeout_s=3 * TTL_S + 5,
        )
        wait_for(lambda: during.acknowledged() >= 6, "jobs accepted by the others meanwhile")
        while time.monotonic() - began <= 3 * TTL_S + 0.5:
            time.sleep(0.05)
        submissions += during.finish()
    finally:
        tcp_proxy.resume()

    deposed = wait_for(lambda: logged(cut_off, "cluster.deposed"), "the cut-off one to step down")
    assert [e["token"] for e in deposed] == [1]
    assert leader_of(daemons) is successor
    assert ping(successor)["cluster"]["leader"]["token"] == 2
    after = Submitter(daemons, "a").start()  # the one cut off serves again, as a follower
    wait_for(lambda: after.acknowledged() >= 6, "jobs accepted once it is back")
    submissions += after.finish()
    check_every_job_ran_once(submissions, [*others, cut_off], fault_proxy, moto, ecs_env)
    assert cut_off.proc is not None
    assert cut_off.proc.poll() is None
    wait_for(lambda: healthy(cut_off), "the cut-off daemon healthy again")
    assert [e["token"] for e in logged(cut_off, "cluster.elected")] == [1]


def test_a_leader_cut_off_in_the_middle_of_a_write_is_taken_over_all_the_same(
    make_node: NodeFactory, database: str, tcp_proxy: TcpProxy, fault_proxy: FaultProxy
) -> None:
    """Its transaction holds the lease's row (FOR SHARE: no takeover commits meanwhile) when
    its link stalls: the server must end that transaction for a follower to take over."""
    fault_proxy.honour_client_token = True
    cut_off = make_node("h1", store={"url": through(tcp_proxy, database)})
    cut_off.start()
    assert leader_of([cut_off]) is cut_off
    follower = make_node("h2")
    follower.start()
    assert leader_of([cut_off, follower]) is cut_off
    job_id = submit(follower, {"command": ["echo", "held"]})
    # The leader's next write to the job (fenced: the lease row locked) is held at its COMMIT.
    tcp_proxy.hold_commit(job_id.encode())
    try:
        assert tcp_proxy.wait_held(WAIT_S), "the leader wrote nothing more to the job"
        wait_for(
            lambda: ping(follower)["cluster"]["leading"],
            "the follower to take the lease over",
            timeout_s=3 * TTL_S + 3,
        )
    finally:
        tcp_proxy.resume()
    wait_for(lambda: logged(cut_off, "cluster.deposed"), "the cut-off one to step down")
    assert leader_of([cut_off, follower]) is follower
    assert wait_job(follower, job_id)["state"] == "SUCCEEDED"
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 1


def test_a_daemon_cut_off_in_the_middle_of_a_write_holds_up_no_other(
    make_node: NodeFactory, database: str, tcp_proxy: TcpProxy
) -> None:
    """Its transaction holds the events' numbering (an advisory lock every write that records
    a change takes) when its link stalls: the others' writes must not wait for long."""
    healthy_one = make_node("h1")
    healthy_one.start()
    assert leader_of([healthy_one]) is healthy_one
    cut_off = make_node("h2", store={"url": through(tcp_proxy, database)})
    cut_off.start()
    leader_of([healthy_one, cut_off])
    held = Submitter([cut_off], "held")
    spec = {"command": ["echo", "held-1f3a"], "backend": "local", "idempotency_key": "held"}
    submission = Submission("held", spec, cut_off)
    held.all.append(submission)
    tcp_proxy.hold_commit(b"held-1f3a")  # its acceptance, the change numbered, not committed
    thread = threading.Thread(target=held._try, args=(submission,), daemon=True)
    thread.start()
    try:
        assert tcp_proxy.wait_held(WAIT_S)
        began = time.monotonic()
        try:
            with SyncClient(healthy_one.socket_path, timeout_s=5) as client:
                job_id = client.submit({"command": ["true"], "backend": "local"})["id"]
        except TimeoutError:
            raise AssertionError("a submission to the other daemon unanswered in 5 s") from None
        answered_s = time.monotonic() - began
    finally:
        tcp_proxy.resume()
        thread.join(WAIT_S)
    assert answered_s < 3 * TTL_S, answered_s
    assert wait_job(healthy_one, job_id)["state"] == "SUCCEEDED"
    # The held one: refused (its transaction ended by the server) or acknowledged; asked
    # again under its key if refused, it runs once.
    (finished,) = held.finish()
    assert all(exc.code.startswith("store_") for exc in finished.refusals), finished.refusals
    assert finished.job_id is not None
    final = wait_end(cut_off, finished.job_id)
    assert (final["state"], final["attempt"]) == ("SUCCEEDED", 1)


# -- 3. one daemon's connections cut again and again -------------------------------------------


def test_connections_cut_again_and_again_lose_and_repeat_nothing(
    make_node: NodeFactory,
    database: str,
    tcp_proxy: TcpProxy,
    fault_proxy: FaultProxy,
    ecs_env: EcsEnv,
    moto: MotoServer,
) -> None:
    fault_proxy.honour_client_token = True
    proxied = make_node("h1", store={"url": through(tcp_proxy, database)})
    proxied.start()
    assert leader_of([proxied]) is proxied
    other = make_node("h2")
    other.start()
    leader_of([proxied, other])
    waits: dict[str, Future[views.Job]] = {}
    with ThreadPoolExecutor(max_workers=64) as pool:

        def wait_for_end(submission: Submission) -> None:  # as soon as it is acknowledged
            assert submission.job_id is not None
            waits[submission.key] = pool.submit(wait_end, proxied, submission.job_id)

        submitter = Submitter([proxied], "c", on_acknowledged=wait_for_end).start()
        wait_for(lambda: submitter.acknowledged() >= 3, "the first submissions")
        cuts = 0
        began = time.monotonic()
        while time.monotonic() - began < 4.0:
            cuts += tcp_proxy.cut()
            time.sleep(0.5)
        so_far = submitter.acknowledged()
        wait_for(lambda: submitter.acknowledged() >= so_far + 3, "submissions after the cuts")
        submissions = submitter.finish()
        ends = {key: future.result(timeout=WAIT_S * 2) for key, future in waits.items()}

    assert cuts >= 8, cuts  # each cut closed the connections open then
    assert logged(proxied, "store.feed_reconnected")
    assert sorted(ends) == sorted(s.key for s in submissions)
    assert {(e["state"], e["exit_code"]) for e in ends.values()} == {SUCCEEDED}
    refusals = [exc for s in submissions for exc in s.refusals]
    assert all(exc.code in ("store_unavailable", "store_error") for exc in refusals), refusals
    check_every_job_ran_once(submissions, [proxied, other], fault_proxy, moto, ecs_env)
    assert proxied.starts == 1
    assert proxied.proc is not None
    assert proxied.proc.poll() is None
    wait_for(lambda: healthy(proxied), "the daemon healthy again")


# A COMMIT that reaches the server, and a connection cut before its answer comes back: the
# daemon cannot tell from the connection whether its transaction committed.


def test_a_submission_whose_commit_answer_is_lost_is_answered_truthfully(
    make_node: NodeFactory, database: str, tcp_proxy: TcpProxy
) -> None:
    daemon = make_node("h1", store={"url": through(tcp_proxy, database)})
    daemon.start()
    leader_of([daemon])
    tcp_proxy.cut_at_commit(b"answer-lost-7d2")
    try:
        job_id: str | None = submit(
            daemon, {"command": ["echo", "answer-lost-7d2"], "backend": "local"}
        )
    except errors.RemoteError as exc:
        job_id, refused = None, exc
    assert tcp_proxy.wait_held(0)  # cut once the server had answered the COMMIT
    with daemon.client() as client:
        recorded = [j["id"] for j in client.call("list", limit=10)["jobs"]]
    if job_id is not None:
        assert recorded == [job_id]
        assert wait_job(daemon, job_id)["state"] == "SUCCEEDED"
    else:  # refused: then it must not say it was not recorded
        assert not recorded or "not recorded" not in str(refused), (refused, recorded)


def test_a_submission_whose_commit_answer_is_lost_runs_once(
    make_node: NodeFactory, database: str, tcp_proxy: TcpProxy
) -> None:
    daemon = make_node("h1", store={"url": through(tcp_proxy, database)})
    daemon.start()
    leader_of([daemon])
    spec = {"command": ["echo", "answer-lost-4be"], "backend": "local", "idempotency_key": "l"}
    tcp_proxy.cut_at_commit(b"answer-lost-4be")
    submitter = Submitter([daemon], "l")
    submission = Submission("l", spec, daemon)
    submitter.all.append(submission)
    submitter._try(submission)  # acknowledged, or refused and asked again by `finish`
    assert tcp_proxy.wait_held(0)
    submitter.finish()
    assert submission.job_id is not None
    try:
        with SyncClient(daemon.socket_path, timeout_s=10) as client:
            final = client.wait(submission.job_id)
    except TimeoutError:
        with daemon.client() as client:
            state = client.get(submission.job_id)["state"]
        raise AssertionError(f"acknowledged, yet still {state} after 10 s") from None
    assert (final["state"], final["attempt"]) == ("SUCCEEDED", 1)


def test_a_launch_whose_commit_answer_is_lost_is_followed_to_its_end(
    make_node: NodeFactory, database: str, tcp_proxy: TcpProxy, fault_proxy: FaultProxy
) -> None:
    fault_proxy.honour_client_token = True
    daemon = make_node("h1", store={"url": through(tcp_proxy, database)})
    daemon.start()
    leader_of([daemon])
    tcp_proxy.cut_at_commit(b":task/")  # the first write of the task's ARN: record_submitted
    job_id = submit(daemon, {"command": ["echo", "launched"]})
    assert tcp_proxy.wait_held(WAIT_S)
    try:
        with SyncClient(daemon.socket_path, timeout_s=15) as client:
            final = client.wait(job_id)
    except TimeoutError:
        with daemon.client() as client:
            state = client.get(job_id)["state"]
        raise AssertionError(f"launched, yet still {state} after 15 s") from None
    assert (final["state"], final["attempt"]) == ("SUCCEEDED", 1)
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 1


# -- 4. a follower's watchers ------------------------------------------------------------------


async def test_watchers_on_a_follower_see_every_change_in_order_across_a_cut(
    make_node: NodeFactory, database: str, tcp_proxy: TcpProxy
) -> None:
    leader = make_node("h1")
    leader.start()
    follower = make_node("h2", store={"url": through(tcp_proxy, database)})
    follower.start()
    assert await asyncio.to_thread(leader_of, [leader, follower]) is leader
    seen: list[dict[str, Any]] = []

    async def watch() -> None:
        async with Client(follower.socket_path) as client:
            async for reply in client.watch():  # until cancelled
                seen.append(reply)  # noqa: PERF401 (each as it comes)

    watcher = asyncio.create_task(watch())
    await until(lambda: bool(seen), "the watch to begin")
    submitter = Submitter([leader, follower], "w").start()
    await until(lambda: submitter.acknowledged() >= 6, "changes before the cut", WAIT_S)
    for _ in range(3):  # the follower's feed (and pool) cut: it reconnects and catches up
        await asyncio.to_thread(tcp_proxy.cut)
        await asyncio.sleep(0.3)
    await until(lambda: submitter.acknowledged() >= 18, "changes after the cuts", WAIT_S)
    submissions = await asyncio.to_thread(submitter.finish)
    for submission in submissions:
        assert submission.job_id is not None
        await asyncio.to_thread(wait_job, leader, submission.job_id)
    everything = await all_events(leader)  # the store's, from the start
    last = everything[-1]["seq"]
    await until(lambda: any(r.get("event", {}).get("seq", 0) >= last for r in seen), "", WAIT_S)
    watcher.cancel()

    assert seen[0]["watching"], seen[0]
    start = seen[0]["seq"]
    live = [r["event"] for r in seen[1:]]
    assert [e["seq"] for e in live] == [e["seq"] for e in everything if e["seq"] > start]
    assert live == [e for e in everything if e["seq"] > start]
    assert await all_events(follower) == everything  # the follower's own catch-up
    assert logged(follower, "store.feed_lost")  # the cuts reached its feed, which came back
    assert logged(follower, "store.feed_reconnected")
    # Every job's history is whole: each change starts where the one before ended.
    by_job: dict[str, list[dict[str, Any]]] = {}
    for event in everything:
        by_job.setdefault(event["job_id"], []).append(event)
    assert set(by_job) == {s.job_id for s in submissions}
    for events in by_job.values():
        assert [e["from"] for e in events] == [None, *(e["to"] for e in events[:-1])]
        assert events[-1]["to"] == "SUCCEEDED"


async def all_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """Every event in the store, as a `watch` since 0 through `daemon` has them (up to the
    last one the daemon had published when it began)."""
    found: list[dict[str, Any]] = []
    async with Client(daemon.socket_path) as client:
        replies = client.watch(since=0)
        last = (await anext(replies))["seq"]
        while last and (not found or found[-1]["seq"] < last):
            found.append((await anext(replies))["event"])
        await replies.aclose()
    return found
