"""Several `orchestrator serve` processes on one real PostgreSQL (issue #16), the AWS side a
real moto server behind the fault-injecting proxy (which counts every launch): any daemon
accepts and answers, one leader launches and tracks the AWS jobs, every job exactly once."""

from __future__ import annotations

import pytest

from tests.integration.test_aws_crash import ecs_tasks
from tests.support.cluster import NodeFactory, leader_of, ping, submit, wait_job
from tests.support.faultproxy import FaultProxy
from tests.support.moto import EcsEnv, MotoServer

pytestmark = pytest.mark.timeout(180)


def test_three_daemons_accept_answer_and_run_every_job_once(
    make_node: NodeFactory, fault_proxy: FaultProxy, ecs_env: EcsEnv, moto: MotoServer
) -> None:
    daemons = [make_node(f"h{i}") for i in (1, 2, 3)]
    for daemon in daemons:
        daemon.start()
    leader = leader_of(daemons)
    assert ping(leader)["cluster"]["leader"]["token"] >= 1

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
