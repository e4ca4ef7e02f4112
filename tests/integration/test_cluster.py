"""Several `orchestrator serve` processes on one real PostgreSQL (issue #16), the AWS side a
real moto server behind the fault-injecting proxy (which counts every launch): any daemon
accepts and answers, one leader launches and tracks the AWS jobs, every job exactly once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator import views
from orchestrator.client import Client
from tests.integration.test_aws_crash import TERMINAL, WAIT_S, ecs_tasks, wait_for
from tests.integration.test_metrics import scrape
from tests.support.cluster import NodeFactory, leader_of, ping, submit, wait_job
from tests.support.daemon import DaemonProcess
from tests.support.faultproxy import FaultProxy
from tests.support.moto import EcsEnv, MotoServer

pytestmark = pytest.mark.timeout(180)


def test_three_daemons_accept_answer_and_run_every_job_once(
    make_node: NodeFactory, fault_proxy: FaultProxy, ecs_env: EcsEnv, moto: MotoServer
) -> None:
    daemons = [make_node(f"h{i}", metrics={"listen": "127.0.0.1:0"}) for i in (1, 2, 3)]
    for daemon in daemons:
        daemon.start()
    leader = leader_of(daemons)
    said = ping(leader)["cluster"]
    assert said["leader"]["token"] >= 1
    assert said["node"] == leader.root.name
    for daemon in daemons:  # `ping` and /metrics say who leads, on every daemon
        line = daemon.cli("ping").stdout
        if daemon is leader:
            assert f"; node {leader.root.name}, leading since " in line, line
        else:
            assert f"; node {daemon.root.name}, leader {leader.root.name} since " in line, line
        (address,) = [
            e["address"] for e in daemon.log_events() if e.get("event") == "metrics.listening"
        ]
        text = scrape(address)
        assert f'orchestrator_cluster_leader{{node="{leader.root.name}"}} 1.0' in text
        leading = "1.0" if daemon is leader else "0.0"
        assert f"orchestrator_cluster_leading {leading}" in text

    ecs_ids = [
        submit(daemons[i % 3], {"command": ["echo", str(i)], "idempotency_key": f"e{i}"})
        for i in range(24)
    ]
    local_ids = {
        d: submit(d, {"command": ["sh", "-c", "echo on $0"], "backend": "local"}) for d in daemons
    }
    # Each job waited for through another daemon than the one that accepted it.
    finals = [wait_job(daemons[(i + 1) % 3], job_id) for i, job_id in enumerate(ecs_ids)]
    assert [(f["state"], f["exit_code"]) for f in finals] == [("SUCCEEDED", 0)] * 24
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 24
    tasks = ecs_tasks(moto, ecs_env.cluster)
    assert sorted(t["startedBy"] for t in tasks) == sorted(f"{j}-1" for j in ecs_ids)
    for daemon, job_id in local_ids.items():
        other = daemons[(daemons.index(daemon) + 1) % 3]
        final = wait_job(other, job_id)
        assert (final["state"], final["info"]["owner"]) == ("SUCCEEDED", daemon.root.name)
        assert daemon.cli("logs", job_id).stdout == "on sh\n"  # on the host that ran it
        elsewhere = other.cli("logs", job_id)
        assert elsewhere.returncode != 0
        assert f"runs on the daemon of node {daemon.root.name}" in elsewhere.stderr
    # Every daemon lists every job.
    for daemon in daemons:
        with daemon.client() as client:
            listed = {j["id"] for j in client.call("list", limit=1000)["jobs"]}
        assert listed == {*ecs_ids, *local_ids.values()}
    # One leader wrote every launch: the others logged no dispatch.
    dispatched = {
        d.root.name: sum(1 for e in d.log_events() if e.get("event") == "job.dispatched")
        for d in daemons
    }
    assert dispatched[leader.root.name] == 24 + 1, dispatched
    assert all(dispatched[d.root.name] == 1 for d in daemons if d is not leader), dispatched


def get(daemon: DaemonProcess, job_id: str) -> views.Job:
    with daemon.client() as client:
        return client.get(job_id)


def test_a_cancel_through_a_follower_is_carried_out_by_the_leader(
    make_node: NodeFactory, fault_proxy: FaultProxy, ecs_env: EcsEnv, moto: MotoServer
) -> None:
    moto.set_transition("ecs::task", "manual", times=10_000)  # RUNNING until stopped
    daemons = [make_node(f"h{i}") for i in (1, 2)]
    for daemon in daemons:
        daemon.start()
    leader = leader_of(daemons)
    (follower,) = [d for d in daemons if d is not leader]
    job_id = submit(follower, {"command": ["sleep", "3600"]})
    wait_for(lambda: get(follower, job_id)["state"] == "RUNNING", "the task to run")
    with follower.client() as client:
        asked = client.cancel(job_id)
    assert (asked["state"], asked["stop_reason"]) == ("RUNNING", "cancel")
    final = wait_job(follower, job_id)  # the follower's watchers hear the leader's change
    assert (final["state"], final["reason"]) == ("CANCELLED", "cancelled by request")
    (task,) = ecs_tasks(moto, ecs_env.cluster)
    assert (task["lastStatus"], task["stoppedReason"]) == ("STOPPED", "orchestrator: cancel")
    assert fault_proxy.forwarded[("ecs", "StopTask")] >= 1


def test_a_watch_on_a_follower_gets_every_change_in_commit_order(
    make_node: NodeFactory, fault_proxy: FaultProxy
) -> None:
    daemons = [make_node(f"h{i}") for i in (1, 2, 3)]
    for daemon in daemons:
        daemon.start()
    leader = leader_of(daemons)
    follower = next(d for d in daemons if d is not leader)
    seen: list[dict[str, Any]] = []
    started = threading.Event()

    async def watch(daemon: DaemonProcess, since: int | None, into: list[dict[str, Any]]) -> None:
        async with Client(daemon.socket_path) as client:
            async for reply in client.watch(since=since):
                if reply.get("watching"):
                    started.set()
                    continue
                into.append(reply["event"])
                if sum(e["to"] in TERMINAL for e in into) == 12:
                    return

    watcher = threading.Thread(target=lambda: asyncio.run(watch(follower, None, seen)))
    watcher.start()
    assert started.wait(WAIT_S)
    ids = [submit(daemons[i % 3], {"command": ["echo", str(i)]}) for i in range(12)]
    watcher.join(WAIT_S * 2)
    assert not watcher.is_alive()
    stored: list[dict[str, Any]] = []  # the same, read back from the store by another daemon
    asyncio.run(watch(leader, seen[0]["seq"] - 1, stored))
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)  # in order
    assert [(e["seq"], e["job_id"], e["to"]) for e in seen] == [
        (e["seq"], e["job_id"], e["to"]) for e in stored
    ]  # none missed, none made up: as the store has them
    assert {e["job_id"] for e in seen} == set(ids)


def test_a_local_job_waits_for_its_node_then_is_lost(
    make_node: NodeFactory, short_tmp: Path
) -> None:
    """A local job stays on the node that accepted it: while that daemon is away the job says
    so, the daemon takes it back when it returns, and it is LOST once away too long."""
    orphans = {"local": {"orphan_timeout_s": 15.0}}
    h1, h2 = make_node("h1", **orphans), make_node("h2", **orphans)
    h1.start()
    h2.start()
    marker = short_tmp / "go"
    # (bounded: a run that fails half-way leaves no process behind for long)
    waits = ["timeout", "120", "sh", "-c", f"while [ ! -e {marker} ]; do sleep 0.05; done"]
    job_id = submit(h2, {"command": waits, "backend": "local"})
    wait_for(lambda: get(h1, job_id)["state"] == "RUNNING", "the job to run on h2")

    h2.kill()  # its keeper keeps the job running
    said = wait_for(
        lambda: (get(h1, job_id)["reason"] or "").startswith("owner h2 unreachable since"),
        "h1 to say h2 is unreachable",
    )
    assert said
    job = get(h1, job_id)
    assert (job["state"], job["info"]["owner"]) == ("RUNNING", "h2")
    h2.start()  # back in time: it takes its job back, and sees it end
    assert get(h2, job_id)["reason"] == "owner h2 is back"
    marker.touch()
    assert wait_job(h1, job_id)["state"] == "SUCCEEDED"

    marker.unlink()
    second = submit(h2, {"command": waits, "backend": "local"})
    wait_for(lambda: get(h1, second)["state"] == "RUNNING", "the second job to run")
    h2.kill()
    final = wait_job(h1, second)
    assert final["state"] == "LOST"
    assert (final["reason"] or "").startswith("owner h2 unreachable since")
    assert "local.orphan_timeout_s (15s)" in (final["reason"] or "")
    assert final["failure"] == "infrastructure"
    marker.touch()  # the job's process, still there under the keeper, ends


def test_a_second_daemon_of_the_same_node_name_is_refused_but_a_restart_is_not(
    make_node: NodeFactory,
) -> None:
    """Two live daemons of one `cluster.node` would both drive its local jobs: the second is
    refused at start-up (exit 2, naming the first). A daemon restarted after a crash, whose
    row is still fresh, is its own predecessor and starts."""
    first, twin = make_node("h1"), make_node("h1-twin")
    twin.env["ORCHESTRATOR__CLUSTER__NODE"] = "h1"
    first.start()
    twin.start(wait=False)
    assert twin.wait_exit() == 2, twin.log()
    assert "cluster.node 'h1' is taken: a daemon of that name on host" in twin.log()
    assert f"(pid {first.proc.pid if first.proc else '?'})" in twin.log()
    first.kill()  # its row stays fresh for twice the TTL: a restart now finds it
    first.start()
    assert ping(first)["cluster"]["node"] == "h1"
