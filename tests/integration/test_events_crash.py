"""Tracking by events (issue #17) across a `kill -9`: `orchestrator serve` as a real process
that dies at the change feed's crash points, its queue a real (moto) SQS queue whose messages
come again after their visibility timeout. What a message said is applied once: never lost
(it is deleted only after the commit), never doubled (the store's transitions and the vendor's
order). `tests/support/eventbus.py` owns the tasks; `test_events.py` has the rest."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator import faults, views
from orchestrator.client import SyncClient
from tests.integration.test_aws_crash import DaemonFactory, ecs_settings, make_daemon
from tests.support.cluster import NodeFactory, leader_of, wait_job
from tests.support.cluster import submit as cluster_submit
from tests.support.daemon import DaemonProcess
from tests.support.eventbus import EventBus
from tests.support.faultproxy import FaultProxy, Request
from tests.support.moto import EcsEnv, MotoServer
from tests.support.waits import wait_for

pytestmark = pytest.mark.timeout(120)

__all__ = ["make_daemon"]  # the fixture, shared with test_aws_crash

WAIT_S = 30.0
VISIBILITY_S = 3  # a received message not deleted comes again this long after its receive


@pytest.fixture
def bus(moto: MotoServer, fault_proxy: FaultProxy, ecs_env: EcsEnv) -> Iterator[EventBus]:
    # No launch event: the first message the daemon receives is the one the test makes.
    made = EventBus(moto, fault_proxy, "ecs", ecs_env, publish_launch=False).start()
    yield made
    made.close()


def events_daemon(make: DaemonFactory, env: EcsEnv, bus: EventBus) -> DaemonProcess:
    events = bus.events_settings(sweep_s=60, grace_s=1, visibility_timeout_s=VISIBILITY_S)
    sections = ecs_settings(env, events=events)
    sections["metrics"] = {"listen": "127.0.0.1:0"}
    return make(sections)


def ping(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.client() as client:
        found: dict[str, Any] = client.call("ping")
    return found


def flowing(daemon: DaemonProcess) -> bool:
    said: dict[str, Any] = ping(daemon).get("events") or {}
    return "ecs" in said and said["ecs"]["tracking"] == "events"


def launched(daemon: DaemonProcess, bus: EventBus) -> tuple[str, str]:
    with daemon.client() as client:
        job_id = client.submit({"command": ["true"]})["id"]
    (task,) = bus.wait_launched(1)
    wait_for(lambda: get_job(daemon, job_id)["external_id"] == task, "the launch recorded")
    return job_id, task


def get_job(daemon: DaemonProcess, job_id: str) -> views.Job:
    with daemon.client() as client:
        return client.get(job_id, history=True)


def wait_terminal(daemon: DaemonProcess, job_id: str) -> views.Job:
    with SyncClient(daemon.socket_path, timeout_s=WAIT_S) as client:
        client.wait(job_id)
        return client.get(job_id, history=True)


def states(job: views.Job) -> list[str]:
    return [h["to"] for h in job["history"]]


def messages(daemon: DaemonProcess) -> dict[str, float]:
    """The daemon's `orchestrator_events_messages` counters by outcome (its /metrics)."""
    address = next(
        e["address"] for e in daemon.log_events() if e.get("event") == "metrics.listening"
    )
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    prefix = 'orchestrator_events_messages_total{backend="ecs",outcome="'
    found = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            found[name.removeprefix(prefix).removesuffix('"}')] = float(value)
    return found


def crash(daemon: DaemonProcess, point: str) -> None:
    assert daemon.wait_exit(timeout_s=WAIT_S) == 137, daemon.log()
    assert f"crash point {point} reached" in daemon.log()


def test_killed_between_receive_and_commit_the_event_comes_again_and_is_applied_once(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, bus: EventBus
) -> None:
    daemon = events_daemon(make_daemon, ecs_env, bus)
    daemon.start(extra_env={faults.ENV: "events.received"})
    wait_for(lambda: flowing(daemon), "events to flow")
    job_id, task = launched(daemon, bus)
    # Describes lag behind (PROVISIONING): only the event can tell the end.
    bus.advance(task, "STOPPED", exit_code=0, describe=False)
    crash(daemon, "events.received")

    daemon.start()
    final = wait_terminal(daemon, job_id)
    wait_for(lambda: bus.queue_depth() == (0, 0), "the message deleted")
    seen = messages(daemon)

    assert (final["state"], final["exit_code"]) == ("SUCCEEDED", 0), final
    assert states(final) == ["QUEUED", "RUNNABLE", "SUCCEEDED"]
    assert seen["received"] == seen["applied"] == 1, seen
    assert bus.remote(task).shown is not None  # no describe ever showed it STOPPED
    said = [e["event"] for e in daemon.log_events() if str(e.get("event")).startswith("events.")]
    assert said[:2] == ["events.started", "events.flowing"], said


@pytest.mark.parametrize(
    ("status", "outcome", "history"),
    [
        # Still tracked after the restart: stale if a describe told its version 2 first, else
        # judged again and found unchanged (which comes first depends on the host's speed).
        ("RUNNING", ("stale", "applied"), ["QUEUED", "RUNNABLE", "RUNNING", "SUCCEEDED"]),
        # Ended: no job tracked has that task any more; deleted after grace_s.
        ("STOPPED", ("untracked_deleted",), ["QUEUED", "RUNNABLE", "SUCCEEDED"]),
    ],
)
def test_killed_after_the_commit_before_the_delete_the_event_comes_again_and_changes_nothing(
    make_daemon: DaemonFactory,
    ecs_env: EcsEnv,
    bus: EventBus,
    status: str,
    outcome: tuple[str, ...],
    history: list[str],
) -> None:
    daemon = events_daemon(make_daemon, ecs_env, bus)
    daemon.start(extra_env={faults.ENV: "events.before_delete"})
    wait_for(lambda: flowing(daemon), "events to flow")
    job_id, task = launched(daemon, bus)
    bus.advance(task, status, exit_code=0)
    crash(daemon, "events.before_delete")

    daemon.start()
    wait_for(
        lambda: sum(messages(daemon).get(o, 0) for o in outcome) >= 1,
        f"the message again, {' or '.join(outcome)}",
    )
    wait_for(lambda: bus.queue_depth() == (0, 0), "the message deleted")
    if status == "RUNNING":
        bus.advance(task, "STOPPED", exit_code=0)
    final = wait_terminal(daemon, job_id)

    assert final["state"] == "SUCCEEDED", final
    assert states(final) == history
    assert messages(daemon).get("failed", 0) == 0


# -- several daemons on one PostgreSQL: the leader's drivers alone read the queue ----------------


def access_key(request: Request) -> str:
    """Which daemon made an AWS call: each signs with an access key of its own."""
    credential = request.headers.get("Authorization", "").partition("Credential=")[2]
    return credential.partition("/")[0]


def test_only_the_leader_reads_the_queue_and_its_successor_takes_over(
    make_node: NodeFactory, ecs_env: EcsEnv, bus: EventBus, fault_proxy: FaultProxy
) -> None:
    fault_proxy.record("sqs", "ReceiveMessage")
    section = ecs_settings(ecs_env, events=bus.events_settings(sweep_s=60))["ecs"]
    nodes = [make_node(name, ecs=section) for name in ("h1", "h2")]
    for node in nodes:
        node.env["AWS_ACCESS_KEY_ID"] = f"AKIDNODE{node.root.name.upper()}"
        node.start()
    leader = leader_of(nodes)
    (follower,) = [n for n in nodes if n is not leader]
    wait_for(lambda: flowing(leader), "the leader's events to flow")
    assert "events" not in ping(follower)

    job_id = cluster_submit(follower, {"command": ["true"]})
    (task,) = bus.wait_launched(1)
    bus.advance(task, "RUNNING")
    wait_for(lambda: get_job(follower, job_id)["state"] == "RUNNING", "the job to run")
    before = fault_proxy.requests("sqs", "ReceiveMessage")
    assert {access_key(r) for r in before} == {leader.env["AWS_ACCESS_KEY_ID"]}

    leader.kill()
    assert leader_of([follower]) is follower
    wait_for(lambda: flowing(follower), "the new leader's events to flow")
    bus.advance(task, "STOPPED", exit_code=0)
    final = wait_job(follower, job_id)
    after = fault_proxy.requests("sqs", "ReceiveMessage")[len(before) :]

    assert final["state"] == "SUCCEEDED"
    assert states(final) == ["QUEUED", "RUNNABLE", "RUNNING", "SUCCEEDED"]
    assert after
    assert {access_key(r) for r in after} == {follower.env["AWS_ACCESS_KEY_ID"]}
