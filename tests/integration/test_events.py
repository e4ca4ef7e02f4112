"""Tracking by EventBridge state-change events (issue #17), through the real daemon and socket,
a real moto server over HTTP carrying each event the real way (PutEvents → rule → SQS) and a
real SQLite store. `tests/support/eventbus.py` owns the tasks and jobs: it answers the daemon's
launches and describes through the fault proxy and publishes each change as ECS or Batch does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, views
from orchestrator.client import Client
from orchestrator.daemon import Daemon
from orchestrator.testing import make_settings
from tests.support.daemon import running, until_state
from tests.support.eventbus import EventBus, Remote
from tests.support.faultproxy import FaultProxy
from tests.support.moto import BatchEnv, EcsEnv, MotoServer
from tests.support.waits import until

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("proxied_aws_env")]

WAIT_S = 20.0


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def ecs_bus(moto: MotoServer, fault_proxy: FaultProxy, ecs_env: EcsEnv) -> Iterator[EventBus]:
    bus = EventBus(moto, fault_proxy, "ecs", ecs_env).start()
    yield bus
    bus.close()


@pytest.fixture
def batch_bus(moto: MotoServer, fault_proxy: FaultProxy, batch_env: BatchEnv) -> Iterator[EventBus]:
    bus = EventBus(moto, fault_proxy, "batch", batch_env).start()
    yield bus
    bus.close()


@contextlib.asynccontextmanager
async def daemon_for(
    root: Path, bus: EventBus, env: EcsEnv | BatchEnv, **events: Any
) -> AsyncIterator[Daemon]:
    """An in-process daemon whose only AWS backend (the bus's) is tracked by the bus's queue
    (`events` over the defaults: wait_s 1), its events flowing before it is handed over."""
    section = env.settings(
        max_attempts=2, check_health_on_startup=False, events=bus.events_settings(**events)
    )
    settings = make_settings(
        root,
        **{bus.backend: section},
        jobs={"backend": bus.backend},
        metrics={"listen": "127.0.0.1:0"},
    )
    async with running(settings) as daemon:
        await until(lambda: tracking(daemon, bus.backend) == "events", "events to flow")
        yield daemon


def client_of(daemon: Daemon) -> Client:
    return Client(daemon.settings.server.socket_path)


def tracking(daemon: Daemon, backend: str) -> str:
    return str(daemon.router.feeds()[backend].describe()["tracking"])


def counts(daemon: Daemon, backend: str) -> Mapping[str, int]:
    return dict(daemon.router.feeds()[backend].counts)


async def state_of(client: Client, job_id: str) -> str:
    return str((await client.get(job_id))["state"])


async def until_job(client: Client, job_id: str, state: str, timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        await until_state(client, job_id, state)


async def history(client: Client, job_id: str) -> list[str]:
    got = await client.get(job_id, history=True)
    return [h["to"] for h in got["history"]]


async def launched(client: Client, spec: Mapping[str, Any]) -> tuple[str, str]:
    """Submit `spec`; (job id, external id) once its launch is recorded (the job tracked)."""
    job_id = (await client.submit(dict(spec)))["id"]
    async with asyncio.timeout(WAIT_S):
        while True:
            if (external_id := (await client.get(job_id))["external_id"]) is not None:
                return job_id, external_id
            await asyncio.sleep(0.02)


async def exported(daemon: Daemon) -> str:
    """What the daemon's /metrics says now (scraped over HTTP, as Prometheus does)."""

    def scrape() -> str:
        url = f"http://{daemon.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    return await asyncio.to_thread(scrape)


def messages_metric(backend: str, outcome: str) -> str:
    return f'orchestrator_events_messages_total{{backend="{backend}",outcome="{outcome}"}}'


# -- 1. jobs detected by their events, described only at the sweep ------------------------------


async def test_ecs_jobs_end_by_their_events_without_describes(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv, fault_proxy: FaultProxy
) -> None:
    fault_proxy.record("sqs", "ReceiveMessage")
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        jobs = [await launched(client, {"command": ["true"]}) for _ in range(3)]
        for status in ("PENDING", "RUNNING"):
            for _, task in jobs:
                ecs_bus.advance(task, status)
        for job_id, _ in jobs:
            await until_job(client, job_id, "RUNNING")
        await asyncio.sleep(1.5)  # running a while: polling would describe it again and again
        for i, (_, task) in enumerate(jobs):
            ecs_bus.advance(task, "STOPPED", exit_code=i)
        finals = [await client.wait(job_id) for job_id, _ in jobs]
        ping = await client.ping()
        feed = counts(daemon, "ecs")
        text = await exported(daemon)

    assert [(f["state"], f["exit_code"]) for f in finals] == [
        ("SUCCEEDED", 0),
        ("FAILED", 1),
        ("FAILED", 2),
    ]
    assert finals[1]["failure"] == "user"
    assert finals[1]["reason"] is not None
    assert "EssentialContainerExited" in finals[1]["reason"]
    # Every job's changes came by events: with sweep_s=60 none was due to be described.
    assert {task: ecs_bus.described[task] for _, task in jobs} == {task: 0 for _, task in jobs}
    assert feed["applied"] + feed.get("held_applied", 0) >= 9
    said = ping["events"]["ecs"]
    assert (said["tracking"], said["why"], said["held"]) == ("events", None, 0)
    assert said["receivers"] >= 1
    assert ping["status"] == "ok"
    # The first receive does not wait (it says at once whether the queue can be read); the
    # next ones long-poll for `wait_s`, asking for 10 messages and the visibility timeout.
    receives = [r.json() for r in fault_proxy.requests("sqs", "ReceiveMessage")]
    assert receives[0]["WaitTimeSeconds"] == 0
    assert {r["WaitTimeSeconds"] for r in receives[1:]} == {1}
    assert {(r["MaxNumberOfMessages"], r["VisibilityTimeout"]) for r in receives} == {(10, 60)}
    assert 'orchestrator_events_flowing{backend="ecs"} 1.0' in text
    assert 'orchestrator_aws_calls_total{operation="ReceiveMessage",service="sqs"}' in text
    assert 'orchestrator_aws_calls_total{operation="DeleteMessageBatch",service="sqs"}' in text


async def test_batch_jobs_end_by_their_events_with_at_most_one_describe_after_submitted(
    short_tmp: Path, batch_bus: EventBus, batch_env: BatchEnv
) -> None:
    async with (
        daemon_for(short_tmp, batch_bus, batch_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        jobs = [await launched(client, {"command": ["true"]}) for _ in range(2)]
        for _, job in jobs:
            batch_bus.advance(job, "PENDING")
            batch_bus.advance(job, "RUNNABLE")
        for job_id, _ in jobs:
            await until_job(client, job_id, "RUNNABLE")
        after_submitted = {job: batch_bus.described[job] for _, job in jobs}
        for status in ("STARTING", "RUNNING"):
            for _, job in jobs:
                batch_bus.advance(job, status)
        for job_id, _ in jobs:
            await until_job(client, job_id, "RUNNING")
        await asyncio.sleep(1.5)
        batch_bus.advance(jobs[0][1], "SUCCEEDED", exit_code=0)
        batch_bus.advance(jobs[1][1], "FAILED", exit_code=3)
        finals = [await client.wait(job_id) for job_id, _ in jobs]
        infos = [(await client.get(job_id))["info"] for job_id, _ in jobs]

    assert [(f["state"], f["exit_code"]) for f in finals] == [("SUCCEEDED", 0), ("FAILED", 3)]
    assert finals[1]["failure"] == "user"
    assert infos[0]["log_stream"].endswith(jobs[0][1])  # what the event told was recorded
    for _, job in jobs:
        # Once out of SUBMITTED (which no event tells), at most one describe: the one that
        # was already due at its back-off.
        assert batch_bus.described[job] - after_submitted[job] <= 1, batch_bus.described


# -- 2. duplicates, reordering and late events are harmless ------------------------------------


async def test_duplicated_reordered_and_late_events_change_nothing_twice(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60, grace_s=2) as daemon,
        client_of(daemon) as client,
    ):
        # Job a: RUNNING before PENDING, RUNNING twice, STOPPED twice, PENDING after the end.
        a, task_a = await launched(client, {"command": ["true"]})
        pending = ecs_bus.advance(task_a, "PENDING", publish=False)
        running_ = ecs_bus.advance(task_a, "RUNNING", publish=False)
        ecs_bus.publish(running_)
        ecs_bus.publish(pending)
        ecs_bus.publish(running_)
        await until_job(client, a, "RUNNING")
        await until(lambda: counts(daemon, "ecs").get("stale", 0) >= 2, "two stale events")
        stopped = ecs_bus.advance(task_a, "STOPPED", publish=False)
        ecs_bus.publish(stopped, times=2)
        await until_job(client, a, "SUCCEEDED")
        ecs_bus.publish(pending)
        ecs_bus.publish(running_)
        # Job b: its end told before its start.
        b, task_b = await launched(client, {"command": ["false"]})
        started = ecs_bus.advance(task_b, "RUNNING", publish=False)
        ended = ecs_bus.advance(task_b, "STOPPED", exit_code=7, publish=False)
        ecs_bus.publish(ended)
        ecs_bus.publish(started)
        final_b = await client.wait(b)
        final_a = await client.get(a)
        # Every message goes in the end: the late ones once held past grace_s.
        await until(lambda: ecs_bus.queue_depth() == (0, 0), "the queue to empty", WAIT_S)
        history_a, history_b = await history(client, a), await history(client, b)
        feed = counts(daemon, "ecs")
        text = await exported(daemon)

    assert (final_a["state"], final_a["exit_code"]) == ("SUCCEEDED", 0)
    assert (final_b["state"], final_b["exit_code"]) == ("FAILED", 7)
    assert history_a == ["QUEUED", "RUNNABLE", "RUNNING", "SUCCEEDED"]
    assert history_b == ["QUEUED", "RUNNABLE", "FAILED"]
    # RUNNING again and PENDING after RUNNING: stale; STOPPED again and anything after the
    # end: the job is no longer tracked (held a while, then deleted).
    assert feed["stale"] >= 2
    assert feed["untracked"] >= 4
    assert feed["untracked_deleted"] >= 4
    assert feed.get("unrecorded", 0) == feed.get("failed", 0) == 0
    assert f"{messages_metric('ecs', 'stale')} {float(feed['stale'])}" in text
    assert ecs_bus.described[task_a] == ecs_bus.described[task_b] == 0


# -- 3. an event lost on the way: the sweep finds the change -------------------------------------


async def test_a_dropped_event_is_caught_by_the_sweep_without_falling_back(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=1, grace_s=1, miss_limit=3) as daemon,
        client_of(daemon) as client,
    ):
        job_id, task = await launched(client, {"command": ["true"]})
        ecs_bus.advance(task, "RUNNING")
        await until_job(client, job_id, "RUNNING")
        ecs_bus.advance(task, "STOPPED", exit_code=0, publish=False)  # never delivered
        final = await client.wait(job_id)
        feed = daemon.router.feeds()["ecs"]
        # The change no event told is a miss once grace_s has passed: one, not miss_limit.
        await until(lambda: feed.flow.misses == 1, "the miss to be counted", WAIT_S)
        await asyncio.sleep(1.1)  # a tick later
        ping = await client.ping()
        history_ = await history(client, job_id)

    assert (final["state"], final["exit_code"]) == ("SUCCEEDED", 0)
    assert history_ == ["QUEUED", "RUNNABLE", "RUNNING", "SUCCEEDED"]
    assert ecs_bus.described[task] >= 1
    assert ping["events"]["ecs"]["tracking"] == "events"
    assert (ping["status"], ping["problems"]) == ("ok", [])


# -- 4. the way events come broken, and mended --------------------------------------------------


def problem_reasons(ping: Mapping[str, Any]) -> set[str]:
    return {p["reason"] for p in ping["problems"]}


async def until_ping(
    client: Client, backend: str, mode: str, timeout_s: float = WAIT_S
) -> views.Ping:
    async with asyncio.timeout(timeout_s):
        while True:
            ping = await client.ping()
            said = ping.get("events") or {}
            if backend in said and said[backend]["tracking"] == mode:
                return ping
            await asyncio.sleep(0.05)


async def test_a_deleted_queue_falls_back_to_polling_and_a_recreated_one_is_used_again(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        first, task_1 = await launched(client, {"command": ["true"]})
        ecs_bus.delete_queue()
        stopped = await until_ping(client, "ecs", "polling")
        stopped_text = await exported(daemon)
        # Its events go nowhere now; polling finds its end.
        ecs_bus.advance(task_1, "RUNNING")
        ecs_bus.advance(task_1, "STOPPED", exit_code=0)
        final_1 = await client.wait(first)
        second, task_2 = await launched(client, {"command": ["true"]})
        ecs_bus.recreate_queue()
        await asyncio.sleep(1.0)
        ecs_bus.advance(task_2, "RUNNING")  # delivered again: events flow again
        back = await until_ping(client, "ecs", "events")
        polled = ecs_bus.described[task_2]
        ecs_bus.advance(task_2, "STOPPED", exit_code=0)
        final_2 = await client.wait(second)
        feed = counts(daemon, "ecs")

    assert final_1["state"] == final_2["state"] == "SUCCEEDED"
    assert ecs_bus.undelivered  # events for task 1 were lost with the queue
    assert ecs_bus.described[task_1] >= 1
    # Back on events: at most the describe already due at its back-off, then the sweep's.
    assert ecs_bus.described[task_2] <= polled + 1
    assert stopped["status"] == "degraded"
    assert "events_stopped" in problem_reasons(stopped)
    why = stopped["events"]["ecs"]["why"]
    assert why is not None
    assert "NonExistentQueue" in why or "QueueDoesNotExist" in why, why
    assert feed["receive_errors"] >= 1
    assert 'orchestrator_events_flowing{backend="ecs"} 0.0' in stopped_text
    assert 'orchestrator_degraded{reason="events_stopped"} 1.0' in stopped_text
    assert back["status"] == "ok"
    assert "events_stopped" not in problem_reasons(back)


async def test_a_removed_rule_falls_back_after_miss_limit_and_a_restored_one_returns(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=1, grace_s=1, miss_limit=2) as daemon,
        client_of(daemon) as client,
    ):
        jobs = [await launched(client, {"command": ["true"]}) for _ in range(3)]
        ecs_bus.remove_rule()  # events stop silently: the queue is read as ever
        for _, task in jobs[:2]:
            ecs_bus.advance(task, "RUNNING")
        stopped = await until_ping(client, "ecs", "polling")
        for job_id, _ in jobs[:2]:
            await until_job(client, job_id, "RUNNING")
        ecs_bus.restore_rule()
        job_id, task = jobs[2]
        ecs_bus.advance(task, "RUNNING")  # told by an event again
        back = await until_ping(client, "ecs", "events")
        for _, task in jobs:
            ecs_bus.advance(task, "STOPPED", exit_code=0)
        finals = [await client.wait(job_id) for job_id, _ in jobs]
        feed = counts(daemon, "ecs")

    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 3
    why = stopped["events"]["ecs"]["why"]
    assert why is not None
    assert why.startswith("2 changes found by describes were not told by any event"), why
    assert "events_stopped" in problem_reasons(stopped)
    assert feed.get("receive_errors", 0) == 0
    assert back["status"] == "ok"


# -- 5. messages that are not ours, or not events at all ---------------------------------------

ECS_EVENT = {"source": "aws.ecs", "detail-type": "ECS Task State Change"}
ANOTHER_TASK = "arn:aws:ecs:us-east-1:123456789012:task/other/0123456789abcdef0123456789abcdef"


def envelope(detail: Any, **fields: Any) -> str:
    """An EventBridge envelope as SQS delivers it, around `detail`."""
    return json.dumps({"version": "0", "id": "x", **ECS_EVENT, "detail": detail, **fields})


GARBAGE: dict[str, str] = {
    "not JSON": "this is not json {",
    "a JSON array": "[1, 2, 3]",
    "a JSON string": '"ECS Task State Change"',
    "JSON null": "null",
    "a NUL byte": "{\x00}",
    "no detail": json.dumps({"version": "0", **ECS_EVENT}),
    "detail not an object": envelope(["taskArn"]),
    "detail without taskArn": envelope({"lastStatus": "STOPPED"}),
    "taskArn not a string": envelope({"taskArn": 12, "lastStatus": "STOPPED"}),
    "a time that is not one": envelope(
        {"taskArn": ANOTHER_TASK, "lastStatus": "STOPPED", "stoppedAt": "yesterday"}
    ),
    "source not a string": json.dumps({"source": 1, "detail-type": "x", "detail": {}}),
}
FOREIGN: dict[str, str] = {
    "another source": json.dumps(
        {"source": "aws.batch", "detail-type": "Batch Job State Change", "detail": {"jobId": "j"}}
    ),
    "another detail type": envelope(
        {"taskArn": ANOTHER_TASK}, **{"detail-type": "ECS Container Instance State Change"}
    ),
}
UNTRACKED: dict[str, str] = {
    "another task": envelope({"taskArn": ANOTHER_TASK, "lastStatus": "RUNNING", "version": 2}),
    "a NUL in the ARN": envelope({"taskArn": ANOTHER_TASK + "\x00", "lastStatus": "RUNNING"}),
    "a huge body": envelope(
        {"taskArn": ANOTHER_TASK, "lastStatus": "RUNNING", "padding": "A" * 250_000}
    ),
}


async def test_garbage_and_foreign_messages_are_deleted_and_counted_and_tracking_goes_on(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv, moto: MotoServer
) -> None:
    # Another rule routes another application's events to the same queue.
    with moto.client("events") as events:
        events.put_rule(Name="someone-else", EventPattern=json.dumps({"source": ["my.app"]}))
        events.put_targets(Rule="someone-else", Targets=[{"Id": "q", "Arn": ecs_bus.queue_arn}])
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60, grace_s=1) as daemon,
        client_of(daemon) as client,
    ):
        job_id, task = await launched(client, {"command": ["true"]})
        for body in (*GARBAGE.values(), *FOREIGN.values(), *UNTRACKED.values()):
            ecs_bus.send_raw(body)
        ecs_bus.put_entries(
            [{"Source": "my.app", "DetailType": "Order Placed", "Detail": json.dumps({"n": 1})}]
        )
        ecs_bus.advance(task, "RUNNING")
        await until_job(client, job_id, "RUNNING")
        await until(lambda: ecs_bus.queue_depth() == (0, 0), "every message deleted", WAIT_S)
        ecs_bus.advance(task, "STOPPED", exit_code=0)
        final = await client.wait(job_id)
        ping = await client.ping()
        feed = counts(daemon, "ecs")
        text = await exported(daemon)

    assert final["state"] == "SUCCEEDED"
    assert ecs_bus.described[task] == 0  # told by its events among the garbage
    assert feed["undecodable"] == len(GARBAGE)
    assert feed["foreign"] == len(FOREIGN) + 1
    assert feed["untracked"] >= len(UNTRACKED)
    assert feed["untracked_deleted"] >= len(UNTRACKED)
    assert feed.get("failed", 0) == feed.get("delete_errors", 0) == 0
    assert ping["events"]["ecs"]["tracking"] == "events"
    assert ping["status"] == "ok"
    assert f"{messages_metric('ecs', 'undecodable')} {float(len(GARBAGE))}" in text


async def test_a_detail_of_the_wrong_shape_is_undecodable_and_the_daemon_goes_on(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60, grace_s=1) as daemon,
        client_of(daemon) as client,
    ):
        job_id, task = await launched(client, {"command": ["true"]})
        detail = {"taskArn": ANOTHER_TASK, "lastStatus": "STOPPED", "containers": ["oops"]}
        ecs_bus.send_raw(envelope(detail))
        await until(lambda: counts(daemon, "ecs").get("undecodable") == 1, "the count", 2.0)
        ecs_bus.advance(task, "RUNNING")
        await until_job(client, job_id, "RUNNING", timeout_s=2.0)
        assert (await client.ping())["events"]["ecs"]["tracking"] == "events"


async def test_an_event_of_ours_without_a_status_is_undecodable_and_changes_nothing(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60, grace_s=1) as daemon,
        client_of(daemon) as client,
    ):
        job_id, task = await launched(client, {"command": ["true"]})
        ecs_bus.advance(task, "RUNNING")
        await until_job(client, job_id, "RUNNING")
        before = await client.get(job_id)
        ecs_bus.send_raw(envelope({"taskArn": task}))
        await until(lambda: ecs_bus.queue_depth() == (0, 0), "the message deleted", WAIT_S)
        after = await client.get(job_id)
        feed = counts(daemon, "ecs")

    assert feed.get("undecodable") == 1
    assert after["vendor_status"] == before["vendor_status"] == "RUNNING"
    assert after["info"] == before["info"]


# -- 6. an event before its launch is recorded; Batch's silent SUBMITTED; a store that fails ----


async def test_an_event_before_the_launch_is_recorded_is_held_and_applied_once_tracked(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The task runs at once: its RUNNING event is published before RunTask's reply.
    def runs_at_once(remote: Remote) -> None:
        ecs_bus.advance(remote.external_id, "RUNNING")

    ecs_bus.on_launch = runs_at_once
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        feed = daemon.router.feeds()["ecs"]
        record = daemon.store.record_submitted
        recording = asyncio.Event()

        async def slow_record(job_id: str, **kwargs: Any) -> Any:
            recording.set()
            await until(lambda: feed.describe()["held"] >= 2, "the events held", WAIT_S)
            return await record(job_id, **kwargs)

        monkeypatch.setattr(daemon.store, "record_submitted", slow_record)
        job_id = (await client.submit({"command": ["true"]}))["id"]
        await recording.wait()
        await until_job(client, job_id, "RUNNING")
        (task,) = ecs_bus.launched()
        ecs_bus.advance(task, "STOPPED", exit_code=0)
        final = await client.wait(job_id)
        history_ = await history(client, job_id)
        ping = await client.ping()
        feed_counts = counts(daemon, "ecs")

    assert final["state"] == "SUCCEEDED"
    assert history_ == ["QUEUED", "RUNNABLE", "RUNNING", "SUCCEEDED"]
    assert ecs_bus.described[task] == 0  # RUNNING came from the held event, not a describe
    # PROVISIONING (v1), then RUNNING (v2): held, then applied in the vendor's order.
    assert feed_counts["untracked"] == 2
    assert feed_counts["held_applied"] == 2
    assert feed_counts.get("untracked_deleted", 0) == 0
    assert ping["events"]["ecs"]["held"] == 0


async def test_a_batch_job_in_submitted_is_polled_at_its_back_off_then_swept(
    short_tmp: Path, batch_bus: EventBus, batch_env: BatchEnv
) -> None:
    async with (
        daemon_for(short_tmp, batch_bus, batch_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        job_id, job = await launched(client, {"command": ["true"]})
        # No event tells SUBMITTED: it is described at the poller's back-off (0.05 s to 0.5 s).
        await asyncio.sleep(1.5)
        while_submitted = batch_bus.described[job]
        batch_bus.advance(job, "RUNNABLE")
        await until_job(client, job_id, "RUNNABLE")
        leaving = batch_bus.described[job]
        await asyncio.sleep(1.5)
        after = batch_bus.described[job]
        batch_bus.advance(job, "RUNNING")
        batch_bus.advance(job, "SUCCEEDED", exit_code=0)
        final = await client.wait(job_id)
        ping = await client.ping()

    assert final["state"] == "SUCCEEDED"
    assert while_submitted >= 4, while_submitted
    assert after - leaving <= 1, (leaving, after)  # at most the describe already due
    assert ping["events"]["batch"]["tracking"] == "events"


async def test_an_event_the_store_cannot_commit_stays_in_the_queue_until_it_can(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60, visibility_timeout_s=2) as daemon,
        client_of(daemon) as client,
    ):
        job_id, task = await launched(client, {"command": ["true"]})
        transition = daemon.store.transition

        async def full(*args: Any, **kwargs: Any) -> Any:
            raise errors.StoreFull(str(daemon.settings.store.path), 0, 2**20)

        monkeypatch.setattr(daemon.store, "transition", full)
        ecs_bus.advance(task, "STOPPED", exit_code=0)
        # Received, not committed, so not deleted: SQS delivers it again after its visibility
        # timeout (2 s), and again, until it is.
        await until(lambda: counts(daemon, "ecs").get("unrecorded", 0) >= 1, "a delivery")
        assert await state_of(client, job_id) == "RUNNABLE"
        assert sum(ecs_bus.queue_depth()) == 1
        monkeypatch.setattr(daemon.store, "transition", transition)
        final = await client.wait(job_id)
        await until(lambda: ecs_bus.queue_depth() == (0, 0), "the message deleted", WAIT_S)
        history_ = await history(client, job_id)
        feed = counts(daemon, "ecs")

    assert final["state"] == "SUCCEEDED"
    assert history_ == ["QUEUED", "RUNNABLE", "SUCCEEDED"]
    assert ecs_bus.described[task] == 0  # its end came by the event, delivered again
    assert feed["applied"] >= 1


# -- 7. stops, timeouts and retries while events flow -------------------------------------------


async def test_a_job_being_stopped_is_polled_and_stopped_again_until_it_ends(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    ecs_bus.stops_end = False  # StopTask is taken, the task takes its time to stop
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        job_id, task = await launched(client, {"command": ["sleep", "1h"]})
        ecs_bus.advance(task, "RUNNING")
        await until_job(client, job_id, "RUNNING")
        await client.cancel(job_id)
        # Not at the sweep: at the back-off, each round issuing the stop again.
        await until(lambda: ecs_bus.stops[task] >= 3, "the stop issued again", WAIT_S)
        described = ecs_bus.described[task]
        ecs_bus.advance(task, "STOPPED", exit_code=143, stop_code="UserInitiated")
        final = await client.wait(job_id)

    assert (final["state"], final["stop_reason"], final["failure"]) == (
        "CANCELLED",
        "cancel",
        "cancelled",
    )
    assert described >= 2  # polled at its back-off, not at the sweep (45 s away)


async def test_a_timeout_is_enforced_on_time_while_events_flow(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        job_id, task = await launched(client, {"command": ["sleep", "1h"], "timeout_s": 1})
        ecs_bus.advance(task, "RUNNING")  # its run time starts now, told by the event
        await until_job(client, job_id, "RUNNING")
        # The sweep is 45 s to 75 s away: the deadline must not wait for it.
        await until(lambda: ecs_bus.stops[task] >= 1, "the timeout's StopTask", 3.0)
        final = await client.wait(job_id)

    assert (final["state"], final["stop_reason"], final["failure"]) == (
        "FAILED",
        "timeout",
        "timeout",
    )


async def test_a_retried_job_is_tracked_by_the_events_of_its_new_task(
    short_tmp: Path, ecs_bus: EventBus, ecs_env: EcsEnv
) -> None:
    spec = {"command": ["true"], "retry": {"attempts": 2, "backoff_s": 0}}
    async with (
        daemon_for(short_tmp, ecs_bus, ecs_env, sweep_s=60) as daemon,
        client_of(daemon) as client,
    ):
        job_id, first = await launched(client, spec)
        ecs_bus.advance(first, "RUNNING", times=1)
        await until_job(client, job_id, "RUNNING")
        # Fargate Spot took it back: infrastructure, retried by the job's policy.
        interrupted = ecs_bus.advance(
            first, "STOPPED", exit_code=143, stop_code="SpotInterruption", reason="Spot"
        )
        (_, second) = await asyncio.to_thread(ecs_bus.wait_launched, 2)
        ecs_bus.publish(interrupted)  # the old task's end again: not the new attempt's
        for status in ("PENDING", "RUNNING"):
            ecs_bus.advance(second, status)
        ecs_bus.advance(second, "STOPPED", exit_code=0)
        final = await client.wait(job_id)
        attempts = (await client.get(job_id, history=True))["attempts"]

    assert (final["state"], final["attempt"], final["external_id"]) == ("SUCCEEDED", 2, second)
    assert [a["external_id"] for a in attempts] == [first, second]
    assert ecs_bus.described[first] == ecs_bus.described[second] == 0
