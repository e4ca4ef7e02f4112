"""bench/fakeaws.py proved with real aioboto3 clients and the daemon's own ECS and Batch backends.

Run by hand, not part of the suite::

    /work/venv/bin/python -m pytest bench/test_fakeaws.py -q -p no:cacheprovider -s

``-s`` shows the printed throughput. For a longer throughput measurement against the CLI in its
own process (a lean pipelined HTTP client, then aioboto3)::

    /work/venv/bin/python bench/test_fakeaws.py --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3  # type: ignore[import-untyped, unused-ignore]
import aiohttp
import pytest
import pytest_asyncio
from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
from botocore.exceptions import ClientError  # type: ignore[import-untyped, unused-ignore]

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run as `python bench/test_fakeaws.py`
    sys.path.insert(0, str(_REPO))

from bench import fakeaws  # noqa: E402

REGION = "us-east-1"
CLUSTER = "jobs"
T0 = 1_800_000_000.0
SESSION = aioboto3.Session(
    region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
)
Client = Callable[..., AbstractAsyncContextManager[Any]]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def set(self, offset_s: float) -> None:
        self.now = T0 + offset_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture
async def aws(clock: Clock) -> AsyncIterator[fakeaws.FakeAws]:
    async with fakeaws.FakeAws(clock=clock, pending_s=4, run_s=10) as server:
        yield server


def client_for(server: fakeaws.FakeAws) -> Client:
    """``async with client("ecs", max_attempts=1) as ecs``, in botocore's `standard` mode;
    there `max_attempts` counts retries (`total_max_attempts` counts the first call too)."""

    def client(service: str, max_attempts: int = 3) -> AbstractAsyncContextManager[Any]:
        config = Config(retries={"mode": "standard", "max_attempts": max_attempts})
        manager: AbstractAsyncContextManager[Any] = SESSION.client(
            service, endpoint_url=server.endpoint_url, config=config
        )
        return manager

    return client


@pytest.fixture
def client(aws: fakeaws.FakeAws) -> Client:
    return client_for(aws)


def run_kwargs(token: str = "job1-1", **extra: Any) -> dict[str, Any]:
    return {
        "cluster": CLUSTER,
        "taskDefinition": "job-runner:7",
        "count": 1,
        "launchType": "FARGATE",
        "clientToken": token,
        "startedBy": token,
        "overrides": {"containerOverrides": [{"name": "main", "command": ["true"]}]},
        "tags": [{"key": "orchestrator:job-id", "value": "job1"}],
        **extra,
    }


async def describe(ecs: Any, *arns: str) -> dict[str, Any]:
    return dict(await ecs.describe_tasks(cluster=CLUSTER, tasks=list(arns)))


# -- ECS ---------------------------------------------------------------------------------------


async def test_ecs_task_walks_its_life_cycle(
    aws: fakeaws.FakeAws, client: Client, clock: Clock
) -> None:
    async with client("ecs") as ecs:
        [task] = (await ecs.run_task(**run_kwargs()))["tasks"]
        arn = task["taskArn"]
        assert re.fullmatch(
            rf"arn:aws:ecs:{REGION}:123456789012:task/{CLUSTER}/[0-9a-f]{{32}}", arn
        )
        assert task["lastStatus"] == "PROVISIONING"
        assert task["desiredStatus"] == "RUNNING"
        assert task["taskDefinitionArn"].endswith(":task-definition/job-runner:7")
        assert task["createdAt"] == datetime.fromtimestamp(T0).astimezone()
        assert task["startedBy"] == "job1-1"
        assert task["tags"] == [{"key": "orchestrator:job-id", "value": "job1"}]
        assert task["containers"][0]["name"] == "main"
        assert "exitCode" not in task["containers"][0]

        seen = []
        for offset_s in (1, 2.5, 5, 13.9, 14):
            clock.set(offset_s)
            [task] = (await describe(ecs, arn))["tasks"]
            seen.append((task["lastStatus"], task["containers"][0]["lastStatus"]))
            assert aws.terminal_at(arn) == (None if offset_s < 14 else T0 + 14)
            assert aws.reported_at(arn) == (None if offset_s < 14 else T0 + 14)

    assert seen == [
        ("PROVISIONING", "PENDING"),
        ("PENDING", "PENDING"),
        ("RUNNING", "RUNNING"),
        ("RUNNING", "RUNNING"),
        ("STOPPED", "STOPPED"),
    ]
    assert task["desiredStatus"] == "STOPPED"
    assert task["containers"][0]["exitCode"] == 0
    assert task["stopCode"] == "EssentialContainerExited"
    assert task["startedAt"].timestamp() == T0 + 4
    assert task["stoppedAt"].timestamp() == T0 + 14
    dump = aws.terminal_times()[arn]
    assert dump["terminal_at"] == T0 + 14
    assert dump["exit_code"] == 0


async def test_ecs_stopping_phases_and_time_scale() -> None:
    # 20 s pending, 60 s running, 9 s stopping, compressed 100-fold onto the real clock.
    config = fakeaws.Config(pending_s=20, run_s=60, stopping_s=9, time_scale=100)
    async with fakeaws.FakeAws(config) as server, client_for(server)("ecs") as ecs:
        [task] = (await ecs.run_task(**run_kwargs()))["tasks"]
        arn = task["taskArn"]
        statuses: list[str] = []
        deadline = time.monotonic() + 10
        while not statuses or statuses[-1] != "STOPPED":
            assert time.monotonic() < deadline, statuses
            status = (await describe(ecs, arn))["tasks"][0]["lastStatus"]
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            await asyncio.sleep(0.01)
        terminal_at = server.terminal_at(arn)
    life = [*fakeaws.ECS_LIFE, "STOPPED"]
    assert statuses == sorted(statuses, key=life.index)  # in life order, maybe with gaps
    assert "RUNNING" in statuses
    assert terminal_at == pytest.approx(task["createdAt"].timestamp() + 0.89, abs=0.002)


async def test_client_token_returns_the_same_task(aws: fakeaws.FakeAws, client: Client) -> None:
    async with client("ecs") as ecs:
        first = (await ecs.run_task(**run_kwargs("tok")))["tasks"][0]["taskArn"]
        again = (await ecs.run_task(**run_kwargs("tok")))["tasks"][0]["taskArn"]
        elsewhere = (await ecs.run_task(**run_kwargs("tok", cluster="other")))["tasks"][0]
        with pytest.raises(ClientError) as info:
            await ecs.run_task(**run_kwargs("tok", taskDefinition="job-runner:8"))
    assert again == first
    assert elsewhere["taskArn"] != first  # tokens are per cluster
    assert info.value.response["Error"]["Code"] == "ConflictException"
    assert info.value.response["resourceIds"] == [first]
    assert aws.stats()["tasks"]["ecs"] == 2


async def test_describe_limits_and_missing(aws: fakeaws.FakeAws, client: Client) -> None:
    async with client("ecs") as ecs:
        arn = (await ecs.run_task(**run_kwargs()))["tasks"][0]["taskArn"]
        missing = arn[:-32] + "f" * 32
        reply = await describe(ecs, arn, missing)
        elsewhere = await ecs.describe_tasks(cluster="other", tasks=[arn])
        await describe(ecs, *[arn] * 100)
        with pytest.raises(ClientError) as info:
            await describe(ecs, *[arn] * 101)
    assert [t["taskArn"] for t in reply["tasks"]] == [arn]
    assert reply["failures"] == [{"arn": missing, "reason": "MISSING"}]
    assert elsewhere["failures"] == [{"arn": arn, "reason": "MISSING"}]
    assert info.value.response["Error"]["Code"] == "InvalidParameterException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    sizes = aws.stats()["describe_ids"]["ecs.DescribeTasks"]
    assert sizes["calls"] == 3
    assert sizes["sizes"] == {"2": 1, "1": 1, "100": 1}
    assert sizes["round_calls"] == 3.0  # every call covered all the ids open (or asked for)


async def test_round_calls_weigh_each_call_by_the_jobs_open(
    aws: fakeaws.FakeAws, client: Client
) -> None:
    """150 open tasks make a round of ceil(150/100) = 2 calls: a call of 100 ids and one of 50
    count for exactly that; a call of 1 id counts for 1/75 of a call."""
    async with client("ecs") as ecs:
        arns = [
            (await ecs.run_task(**run_kwargs(f"t{i}")))["tasks"][0]["taskArn"] for i in range(150)
        ]
        await describe(ecs, *arns[:100])
        await describe(ecs, *arns[100:])
        first_round = aws.stats()["describe_ids"]["ecs.DescribeTasks"]["round_calls"]
        await describe(ecs, arns[0])
    stats = aws.stats()["describe_ids"]["ecs.DescribeTasks"]
    assert first_round == pytest.approx(2.0)
    assert stats["round_calls"] == pytest.approx(2.0 + 2 / 150, abs=0.001)


async def test_stop_task(aws: fakeaws.FakeAws, client: Client, clock: Clock) -> None:
    async with client("ecs") as ecs:
        running = (await ecs.run_task(**run_kwargs("a")))["tasks"][0]["taskArn"]
        clock.set(5)
        pending = (await ecs.run_task(**run_kwargs("b")))["tasks"][0]["taskArn"]
        stopped = (await ecs.stop_task(cluster=CLUSTER, task=running, reason="orchestrator: x"))[
            "task"
        ]
        await ecs.stop_task(cluster=CLUSTER, task=pending.rpartition("/")[2])
        clock.set(6)  # a stop after the end changes nothing
        await ecs.stop_task(cluster=CLUSTER, task=running)
        tasks = {t["taskArn"]: t for t in (await describe(ecs, running, pending))["tasks"]}
        with pytest.raises(ClientError) as info:
            await ecs.stop_task(cluster=CLUSTER, task="0" * 32, reason="health check")
    assert stopped["lastStatus"] == "STOPPED"
    assert stopped["stopCode"] == "UserInitiated"
    assert stopped["stoppedReason"] == "orchestrator: x"
    assert stopped["containers"][0]["exitCode"] == fakeaws.SIGTERM_EXIT
    assert tasks[running]["stoppedAt"].timestamp() == T0 + 5
    assert tasks[pending]["stopCode"] == "UserInitiated"
    assert "exitCode" not in tasks[pending]["containers"][0]  # it never started
    assert "startedAt" not in tasks[pending]
    assert aws.terminal_at(running) == T0 + 5
    assert info.value.response["Error"]["Code"] == "InvalidParameterException"


async def test_list_tasks_by_started_by(client: Client, clock: Clock) -> None:
    async with client("ecs") as ecs:
        done = (await ecs.run_task(**run_kwargs("early")))["tasks"][0]["taskArn"]
        clock.set(10)
        live = (await ecs.run_task(**run_kwargs("late")))["tasks"][0]["taskArn"]
        clock.set(15)

        async def arns(started_by: str, desired: str) -> list[str]:
            reply = await ecs.list_tasks(
                cluster=CLUSTER, startedBy=started_by, desiredStatus=desired
            )
            return list(reply["taskArns"])

        assert await arns("early", "RUNNING") == []
        assert await arns("early", "STOPPED") == [done]
        assert await arns("late", "RUNNING") == [live]
        assert await arns("nobody", "STOPPED") == []
        everything = await ecs.list_tasks(cluster=CLUSTER, maxResults=1)
    assert everything["taskArns"] == [live]
    assert "nextToken" not in everything


async def test_describe_cluster_and_task_definition(client: Client) -> None:
    async with client("ecs") as ecs:
        clusters = await ecs.describe_clusters(clusters=["anything"])
        definition = (await ecs.describe_task_definition(taskDefinition="job-runner:7"))[
            "taskDefinition"
        ]
    assert clusters["clusters"][0]["status"] == "ACTIVE"
    assert clusters["clusters"][0]["clusterName"] == "anything"
    [container] = definition["containerDefinitions"]
    assert container["name"] == "main"
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert container["logConfiguration"]["options"]["awslogs-stream-prefix"] == "ecs"
    assert definition["revision"] == 7


# -- Batch -------------------------------------------------------------------------------------


async def test_batch_job_life_cycle_and_terminate(
    aws: fakeaws.FakeAws, client: Client, clock: Clock
) -> None:
    async with client("batch") as batch:
        submitted = await batch.submit_job(
            jobName="orch-j1-1",
            jobQueue="jobs",
            jobDefinition="job-runner:3",
            containerOverrides={"command": ["true"]},
            tags={"orchestrator:job-id": "j1"},
        )
        job_id = submitted["jobId"]
        assert submitted["jobName"] == "orch-j1-1"
        assert submitted["jobArn"] == f"arn:aws:batch:{REGION}:123456789012:job/{job_id}"
        statuses = []
        for offset_s in (0, 1, 2, 3, 4, 14):
            clock.set(offset_s)
            [detail] = (await batch.describe_jobs(jobs=[job_id, "no-such-job"]))["jobs"]
            statuses.append(detail["status"])
        victim = (await batch.submit_job(jobName="v", jobQueue="jobs", jobDefinition="d"))["jobId"]
        clock.set(19)
        await batch.terminate_job(jobId=victim, reason="orchestrator: cancel")
        [killed] = (await batch.describe_jobs(jobs=[victim]))["jobs"]
        with pytest.raises(ClientError) as too_many:
            await batch.describe_jobs(jobs=[job_id] * 101)
    assert statuses == ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED"]
    assert detail["createdAt"] == int(T0 * 1000)
    assert detail["startedAt"] == int((T0 + 4) * 1000)
    assert detail["stoppedAt"] == int((T0 + 14) * 1000)
    assert detail["container"]["exitCode"] == 0
    assert detail["jobQueue"].endswith(":job-queue/jobs")
    assert detail["jobDefinition"].endswith(":job-definition/job-runner:3")
    assert detail["container"]["logStreamName"].startswith("job-runner/default/")
    assert killed["status"] == "FAILED"
    assert killed["statusReason"] == "orchestrator: cancel"
    assert killed["isTerminated"] is True
    assert killed["container"]["exitCode"] == fakeaws.SIGTERM_EXIT
    assert aws.terminal_at(victim) == T0 + 19
    assert too_many.value.response["Error"]["Code"] == "ClientException"


async def test_batch_failures_and_list_jobs(clock: Clock) -> None:
    def exit_code(launch: fakeaws.Launch) -> int:
        return 7 if launch.command == ("fail",) else 0

    config = fakeaws.Config(clock=clock, pending_s=1, run_s=1, exit_code=exit_code)
    async with fakeaws.FakeAws(config) as server, client_for(server)("batch") as batch:
        ids = []
        for i, command in enumerate((["ok"], ["fail"], ["ok"])):
            clock.set(i)
            reply = await batch.submit_job(
                jobName="orch-same-1",
                jobQueue="jobs",
                jobDefinition="d",
                containerOverrides={"command": command},
            )
            ids.append(reply["jobId"])
        clock.set(10)
        details = {d["jobId"]: d for d in (await batch.describe_jobs(jobs=ids))["jobs"]}
        listed = await batch.list_jobs(
            jobQueue="jobs", filters=[{"name": "JOB_NAME", "values": ["ORCH-SAME-1"]}]
        )
        prefixed = await batch.list_jobs(
            jobQueue="jobs", filters=[{"name": "JOB_NAME", "values": ["orch-*"]}]
        )
        running = await batch.list_jobs(jobQueue="jobs")  # no filter: RUNNING ones only
        queues = await batch.describe_job_queues(jobQueues=["jobs"])
    failed = details[ids[1]]
    assert failed["status"] == "FAILED"
    assert failed["container"]["exitCode"] == 7
    assert details[ids[0]]["status"] == "SUCCEEDED"
    assert [s["jobId"] for s in listed["jobSummaryList"]] == ids[::-1]  # newest first
    assert len(prefixed["jobSummaryList"]) == 3
    assert running["jobSummaryList"] == []
    assert queues["jobQueues"][0]["state"] == "ENABLED"
    assert queues["jobQueues"][0]["status"] == "VALID"


async def test_seeded_jitter_and_failure_ratio_are_reproducible(clock: Clock) -> None:
    async def lives(seed: int) -> list[tuple[Any, ...]]:
        config = fakeaws.Config(
            clock=clock, jitter=0.5, failure_ratio=0.3, failure_exit_code=9, seed=seed
        )
        clock.set(0)
        async with fakeaws.FakeAws(config) as server, client_for(server)("batch") as batch:
            for i in range(40):
                await batch.submit_job(jobName=f"j{i}", jobQueue="q", jobDefinition="d")
            clock.set(1000)
            return [(d["name"], d["terminal_at"], d["exit_code"]) for d in _dump(server)]

    first, again, other = await lives(1), await lives(1), await lives(2)
    assert first == again
    assert first != other
    assert {code for *_, code in first} == {0, 9}
    assert len({at for _, at, _ in first}) == 40  # jittered


def _dump(server: fakeaws.FakeAws) -> list[dict[str, Any]]:
    return sorted(server.terminal_times().values(), key=lambda d: d["name"])


# -- Batch array jobs --------------------------------------------------------------------------


async def submit_array(batch: Any, size: int, name: str = "orch-arr-1", **extra: Any) -> str:
    reply = await batch.submit_job(
        jobName=name,
        jobQueue="jobs",
        jobDefinition="job-runner:3",
        arrayProperties={"size": size},
        containerOverrides={"command": ["work"]},
        **extra,
    )
    return str(reply["jobId"])


async def describe_jobs(batch: Any, *ids: str) -> dict[str, dict[str, Any]]:
    """DescribeJobs in calls of 100 ids: id → detail."""
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 100):
        reply = await batch.describe_jobs(jobs=list(ids[start : start + 100]))
        found |= {d["jobId"]: d for d in reply["jobs"]}
    return found


async def test_batch_array_parent_and_children(
    aws: fakeaws.FakeAws, client: Client, clock: Clock
) -> None:
    """One SubmitJob makes a parent and its children; the parent is SUBMITTED until a child is
    RUNNABLE, PENDING while they run, FAILED once all have ended and one failed."""

    def exit_code(launch: fakeaws.Launch) -> int:
        return 3 if launch.index == 1 else 0

    config = fakeaws.Config(clock=clock, pending_s=4, run_s=10, exit_code=exit_code)
    async with fakeaws.FakeAws(config) as server, client_for(server)("batch") as batch:
        parent = await submit_array(batch, 3)
        children = [f"{parent}:{i}" for i in range(3)]
        seen = []
        for offset_s in (0, 1.9, 2, 4, 13.9, 14):
            clock.set(offset_s)
            details = await describe_jobs(batch, parent, *children, f"{parent}:3", f"{parent}:x")
            summary = details[parent]["arrayProperties"]["statusSummary"]
            seen.append(
                (
                    details[parent]["status"],
                    {k: v for k, v in summary.items() if v},
                    [details[c]["status"] for c in children],
                )
            )
        stats = server.stats()
        terminal = server.terminal_times()
    assert seen == [
        ("SUBMITTED", {"SUBMITTED": 3}, ["SUBMITTED"] * 3),
        ("SUBMITTED", {"PENDING": 3}, ["PENDING"] * 3),
        ("PENDING", {"RUNNABLE": 3}, ["RUNNABLE"] * 3),
        ("PENDING", {"RUNNING": 3}, ["RUNNING"] * 3),
        ("PENDING", {"RUNNING": 3}, ["RUNNING"] * 3),
        ("FAILED", {"SUCCEEDED": 2, "FAILED": 1}, ["SUCCEEDED", "FAILED", "SUCCEEDED"]),
    ]
    top = details[parent]
    assert set(details) == {parent, *children}  # index 3 and "x" are no jobs: left out
    assert top["arrayProperties"]["size"] == 3
    assert set(top["arrayProperties"]["statusSummary"]) == set(fakeaws.BATCH_STATUSES)
    assert top["statusReason"] == fakeaws.ARRAY_FAILED
    assert top["stoppedAt"] == int((T0 + 14) * 1000)
    assert "exitCode" not in top["container"]
    assert "logStreamName" not in top["container"]
    failed = details[children[1]]
    assert failed["jobArn"] == top["jobArn"] + ":1"
    assert failed["jobName"] == "orch-arr-1"
    assert failed["arrayProperties"] == {"index": 1}
    assert failed["container"]["exitCode"] == 3
    assert failed["startedAt"] == int((T0 + 4) * 1000)
    streams = {details[c]["container"]["logStreamName"] for c in children}
    assert len(streams) == 3
    assert all(s.startswith("job-runner/default/") for s in streams)
    assert stats["calls"]["batch.SubmitJob"] == 1
    assert stats["tasks"] == {"ecs": 0, "batch": 1, "batch_children": 3}
    # Every id of a call counts, a child's as a parent's (the unknown ones too).
    assert stats["describe_ids"]["batch.DescribeJobs"]["sizes"] == {"6": 6}
    assert server.terminal_at(parent) == T0 + 14
    assert server.terminal_at(children[0]) == T0 + 14
    assert server.reported_at(children[2]) == T0 + 14
    assert terminal[parent]["array_size"] == 3
    assert terminal[parent]["children_failed"] == 1
    assert terminal[parent]["exit_code"] is None
    assert children[0] not in terminal  # children are not listed


async def test_batch_array_summary_agrees_with_its_children(clock: Clock) -> None:
    """Jittered lives: at every moment the parent's statusSummary counts exactly what its
    children describe as, one by one; all succeeded makes the parent SUCCEEDED."""
    config = fakeaws.Config(clock=clock, pending_s=8, run_s=10, jitter=0.5, seed=3)
    async with fakeaws.FakeAws(config) as server, client_for(server)("batch") as batch:
        parent = await submit_array(batch, 250)
        children = [f"{parent}:{i}" for i in range(250)]
        moments = [0.5 * k for k in range(60)]  # the longest life: 8 · 1.5 + 10 · 1.5 s
        for offset_s in moments:
            clock.set(offset_s)
            details = await describe_jobs(batch, parent, *children)
            summary = details[parent]["arrayProperties"]["statusSummary"]
            counted = Counter(details[c]["status"] for c in children)
            assert {k: v for k, v in summary.items() if v} == dict(counted), offset_s
            assert sum(summary.values()) == 250
        ends = [server.terminal_at(c) for c in children]
    assert details[parent]["status"] == "SUCCEEDED"
    assert "statusReason" not in details[parent]
    assert details[parent]["stoppedAt"] == int(max(e for e in ends if e is not None) * 1000)
    assert len(set(ends)) > 200  # jittered, child by child


async def test_batch_array_terminate_a_child_then_the_parent(
    aws: fakeaws.FakeAws, client: Client, clock: Clock
) -> None:
    async with client("batch") as batch:
        parent = await submit_array(batch, 4)
        clock.set(5)
        await batch.terminate_job(jobId=f"{parent}:2", reason="orchestrator: one")
        clock.set(6)
        one = await describe_jobs(batch, parent, f"{parent}:2", f"{parent}:3")
        await batch.terminate_job(jobId=parent, reason="orchestrator: cancel")
        clock.set(7)
        after = await describe_jobs(batch, parent, f"{parent}:0", f"{parent}:2")
        with pytest.raises(ClientError) as unknown:
            await batch.terminate_job(jobId=f"{parent}:4", reason="no such child")
    summary = one[parent]["arrayProperties"]["statusSummary"]
    assert (one[parent]["status"], summary["RUNNING"], summary["FAILED"]) == ("PENDING", 3, 1)
    stopped = one[f"{parent}:2"]
    assert (stopped["status"], stopped["statusReason"]) == ("FAILED", "orchestrator: one")
    assert stopped["container"]["exitCode"] == fakeaws.SIGTERM_EXIT
    assert stopped["stoppedAt"] == int((T0 + 5) * 1000)
    assert one[f"{parent}:3"]["status"] == "RUNNING"
    assert after[parent]["status"] == "FAILED"
    assert after[parent]["arrayProperties"]["statusSummary"]["FAILED"] == 4
    assert after[parent]["isTerminated"] is True
    assert after[parent]["statusReason"] == "orchestrator: cancel"
    assert after[parent]["stoppedAt"] == int((T0 + 6) * 1000)
    assert after[f"{parent}:0"]["statusReason"] == "orchestrator: cancel"
    assert after[f"{parent}:2"]["statusReason"] == "orchestrator: one"  # stopped before
    assert aws.terminal_at(parent) == T0 + 6
    assert aws.terminal_at(f"{parent}:2") == T0 + 5
    assert unknown.value.response["Error"]["Code"] == "ClientException"


async def test_batch_array_sizes_lists_and_one_token(clock: Clock) -> None:
    """Sizes 2..10,000; 10,000 children are one call, one token and little time; ListJobs lists
    the parent, and its children with arrayJobId."""
    config = fakeaws.Config(
        clock=clock, pending_s=4, run_s=10, buckets={"batch.submit": fakeaws.Bucket(3, 0.001)}
    )
    async with fakeaws.FakeAws(config) as server, client_for(server)("batch", 0) as batch:
        for size in (1, 10_001):
            with pytest.raises(ClientError) as refused:
                await submit_array(batch, size)
            assert refused.value.response["Error"]["Code"] == "ClientException"
        started = time.monotonic()
        big = await submit_array(batch, 10_000, name="orch-big-1")
        submit_s = time.monotonic() - started
        with pytest.raises(ClientError) as throttled:  # the bucket's 3 tokens are spent
            await submit_array(batch, 2)
        clock.set(5)
        started = time.monotonic()
        [parent] = (await batch.describe_jobs(jobs=[big]))["jobs"]
        describe_s = time.monotonic() - started
        listed = await batch.list_jobs(
            jobQueue="jobs", filters=[{"name": "JOB_NAME", "values": ["orch-big-1"]}]
        )
        running = await batch.list_jobs(arrayJobId=big, maxResults=5)
        succeeded = await batch.list_jobs(arrayJobId=big, jobStatus="SUCCEEDED")
        stats = server.stats()
    assert throttled.value.response["Error"]["Code"] == "TooManyRequestsException"
    assert stats["calls"]["batch.SubmitJob"] == 4
    assert stats["tasks"]["batch_children"] == 10_000
    assert submit_s < 1.0
    assert describe_s < 0.5
    assert parent["arrayProperties"]["statusSummary"]["RUNNING"] == 10_000
    [summary] = listed["jobSummaryList"]
    assert summary["arrayProperties"] == {"size": 10_000}
    assert [s["jobId"] for s in running["jobSummaryList"]] == [f"{big}:{i}" for i in range(5)]
    assert running["jobSummaryList"][0]["arrayProperties"] == {"index": 0}
    assert running["nextToken"] == "5"
    assert succeeded["jobSummaryList"] == []


async def test_batch_array_parent_ends_a_while_after_its_last_child(clock: Clock) -> None:
    """`array_settle_s`: the statusSummary shows every child ended at once, the parent's status
    follows that much later (on the scaled clock)."""
    config = fakeaws.Config(clock=clock, pending_s=4, run_s=10, array_settle_s=6, time_scale=2)
    async with fakeaws.FakeAws(config) as server, client_for(server)("batch") as batch:
        parent = await submit_array(batch, 2)
        seen = []
        for offset_s in (6.9, 7, 9.9, 10):  # children end at 7 s, the parent at 7 + 3 s
            clock.set(offset_s)
            [detail] = (await batch.describe_jobs(jobs=[parent]))["jobs"]
            seen.append((detail["status"], detail["arrayProperties"]["statusSummary"]["SUCCEEDED"]))
        terminal_at = server.terminal_at(parent)
    assert seen == [("PENDING", 0), ("PENDING", 2), ("PENDING", 2), ("SUCCEEDED", 2)]
    assert detail["stoppedAt"] == int((T0 + 10) * 1000)
    assert terminal_at == T0 + 10


async def test_the_daemons_batch_backend_runs_an_array_against_it(
    monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    """The daemon's own Batch backend: one SubmitJob with arrayProperties, the parent's
    statusSummary in `info`, a child described on demand by `<parent>:<i>`."""
    from orchestrator import models
    from orchestrator.backends.batch import BatchBackend
    from orchestrator.ratelimit import TokenBucket
    from orchestrator.settings import BatchSettings

    def exit_code(launch: fakeaws.Launch) -> int:
        return 4 if launch.index == 2 else 0

    job = models.Job(
        id="arr1",
        spec=models.JobSpec(command=["true"], array_size=3),
        backend="batch",
        state=models.JobState.QUEUED,
        created_at=0.0,
        updated_at=0.0,
        state_times={},
        attempt=1,
        token="arr1-1",
    )
    config = fakeaws.Config(clock=clock, pending_s=4, run_s=10, exit_code=exit_code)
    async with fakeaws.FakeAws(config) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        batch = BatchBackend(
            BatchSettings(
                enabled=True, region_name=REGION, job_queue="jobs", job_definition="jd:1"
            ),
            TokenBucket("logs", 10, 10),
        )
        await batch.start()
        try:
            submitted = await batch.submit(job)
            job = dataclasses.replace(job, external_id=submitted.external_id)
            clock.set(5)
            running = (await batch.describe([job]))[submitted.external_id]
            clock.set(20)
            ended = (await batch.describe([job]))[submitted.external_id]
            child = await batch.describe_child(job, 2)
            nobody = await batch.describe_child(job, 3)
        finally:
            await batch.close()
        stats = server.stats()
    assert stats["calls"]["batch.SubmitJob"] == 1
    assert stats["tasks"]["batch_children"] == 3
    assert running.state == models.JobState.PENDING
    assert running.info["array_status"]["RUNNING"] == 3
    assert ended.state == models.JobState.FAILED
    assert ended.info["array_status"]["FAILED"] == 1
    assert ended.info["array_status"]["SUCCEEDED"] == 2
    assert child is not None
    assert (child.external_id, child.state) == (f"{submitted.external_id}:2", ended.state)
    assert child.exit_code == 4
    assert str(child.info["log_stream"]).startswith("jd/default/")
    assert nobody is None


# -- throttling --------------------------------------------------------------------------------


async def test_throttling_replies_are_the_ones_botocore_knows(clock: Clock) -> None:
    buckets = {
        "ecs.describe": fakeaws.Bucket(2, 0.001),
        "ecs.run": fakeaws.Bucket(1, 0.001),
        "batch.submit": fakeaws.Bucket(1, 0.001),
    }
    config = fakeaws.Config(clock=clock, buckets=buckets)
    async with fakeaws.FakeAws(config) as server:
        client = client_for(server)
        async with client("ecs", max_attempts=1) as ecs, client("batch", max_attempts=1) as batch:
            arn = (await ecs.run_task(**run_kwargs()))["tasks"][0]["taskArn"]
            with pytest.raises(ClientError) as stop_throttled:  # StopTask shares RunTask's bucket
                await ecs.stop_task(cluster=CLUSTER, task=arn)
            await describe(ecs, arn)
            await ecs.list_tasks(cluster=CLUSTER)  # shares DescribeTasks' bucket
            with pytest.raises(ClientError) as ecs_throttled:
                await describe(ecs, arn)
            await ecs.describe_clusters(clusters=[CLUSTER])  # never throttled
            await batch.submit_job(jobName="a", jobQueue="q", jobDefinition="d")
            with pytest.raises(ClientError) as batch_throttled:
                await batch.submit_job(jobName="b", jobQueue="q", jobDefinition="d")
        # botocore's standard mode retries throttled calls by itself (max_attempts: retries).
        async with client("batch", max_attempts=2) as batch:
            with pytest.raises(ClientError) as retried:
                await batch.submit_job(jobName="c", jobQueue="q", jobDefinition="d")
        stats = server.stats()
    for info in (stop_throttled, ecs_throttled):
        assert info.value.response["Error"]["Code"] == "ThrottlingException"
        assert info.value.response["Error"]["Message"] == "Rate exceeded"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert batch_throttled.value.response["Error"]["Code"] == "TooManyRequestsException"
    assert batch_throttled.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert batch_throttled.value.response["ResponseMetadata"]["RetryAttempts"] == 1
    assert retried.value.response["ResponseMetadata"]["RetryAttempts"] == 2
    assert stats["throttled"] == {
        "batch.SubmitJob": 2 + 3,
        "ecs.DescribeTasks": 2,
        "ecs.StopTask": 2,
    }
    assert stats["calls"]["batch.SubmitJob"] == 1 + 2 + 3
    assert stats["calls"]["ecs.DescribeClusters"] == 1


async def test_buckets_refill(clock: Clock) -> None:
    config = fakeaws.Config(clock=clock, buckets={"ecs.describe": fakeaws.Bucket(1, 2)})
    async with fakeaws.FakeAws(config) as server, client_for(server)("ecs", 0) as ecs:
        await ecs.list_tasks(cluster=CLUSTER)
        with pytest.raises(ClientError):
            await ecs.list_tasks(cluster=CLUSTER)
        await asyncio.sleep(0.6)  # 2/s: a token every 500 ms
        await ecs.list_tasks(cluster=CLUSTER)
        server.reset_counts()
        assert server.stats()["calls"] == {}


# -- the daemon's own backends -----------------------------------------------------------------


async def test_the_daemons_backends_work_against_it(
    monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    from orchestrator import models
    from orchestrator.backends.batch import BatchBackend
    from orchestrator.backends.ecs import EcsBackend
    from orchestrator.ratelimit import TokenBucket
    from orchestrator.settings import BatchSettings, EcsSettings

    def job(job_id: str, backend: str) -> models.Job:
        return models.Job(
            id=job_id,
            spec=models.JobSpec(command=["true"]),
            backend=backend,
            state=models.JobState.QUEUED,
            created_at=0.0,
            updated_at=0.0,
            state_times={},
            attempt=1,
            token=f"{job_id}-1",
        )

    common: dict[str, Any] = {
        "enabled": True,
        "region_name": REGION,
        "check_health_on_startup": True,
    }
    async with fakeaws.FakeAws(clock=clock, pending_s=4, run_s=10, exit_code=3) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        ecs = EcsBackend(
            EcsSettings(**common, cluster=CLUSTER, container_name="main", task_definition="td:1"),
            TokenBucket("logs", 10, 10),
        )
        batch = BatchBackend(
            BatchSettings(**common, job_queue="jobs", job_definition="jd:1"),
            TokenBucket("logs", 10, 10),
        )
        await ecs.start()  # health checks: DescribeClusters, StopTask probe
        await batch.start()  # DescribeJobQueues, DescribeJobs
        try:
            ecs_job, batch_job = job("e1", "ecs"), job("b1", "batch")
            task = await ecs.submit(ecs_job)
            assert (await ecs.submit(ecs_job)).external_id == task.external_id  # same token
            submitted = await batch.submit(batch_job)
            ecs_job = dataclasses.replace(ecs_job, external_id=task.external_id)
            batch_job = dataclasses.replace(batch_job, external_id=submitted.external_id)
            clock.set(5)
            assert (await ecs.describe([ecs_job]))[
                task.external_id
            ].state == models.JobState.RUNNING
            assert (await ecs.locate(ecs_job)).external_id == task.external_id
            assert (await batch.locate(batch_job)).external_id == submitted.external_id
            assert (await ecs.read_logs(ecs_job, None)).chunks == []
            clock.set(20)
            seen = (await ecs.describe([ecs_job]))[task.external_id]
            done = (await batch.describe([batch_job]))[submitted.external_id]
            await ecs.stop(ecs_job)  # already stopped: no error
            await batch.stop(batch_job)
        finally:
            await ecs.close()
            await batch.close()
    assert (seen.state, seen.exit_code) == (models.JobState.FAILED, 3)
    assert seen.info["finished_at"] == T0 + 14
    assert (done.state, done.exit_code) == (models.JobState.FAILED, 3)
    assert done.info["finished_at"] == T0 + 14


# -- EventBridge → SQS -------------------------------------------------------------------------

QUEUE = fakeaws.EVENT_QUEUE
ECS_LIFE = ["PROVISIONING", "PENDING", "RUNNING", "DEACTIVATING", "STOPPING", "DEPROVISIONING"]


def events_config(clock: Clock, **extra: Any) -> fakeaws.Config:
    settings: dict[str, Any] = {"clock": clock, "pending_s": 4, "run_s": 10, "events": True}
    return fakeaws.Config(**(settings | extra))


def at_once(clock: Clock, **extra: Any) -> fakeaws.Config:
    """Events delivered at their change, once each."""
    return events_config(
        clock, event_delay_median_s=0, event_delay_p99_s=0, event_duplicate_ratio=0, **extra
    )


async def receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every visible message, 10 a call, each batch deleted once received."""
    received: list[dict[str, Any]] = []
    while True:
        reply = await sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
        )
        if not (messages := reply.get("Messages", [])):
            return received
        received += messages
        entries = [
            {"Id": f"m{i}", "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
        ]
        deleted = await sqs.delete_message_batch(QueueUrl=url, Entries=entries)
        assert len(deleted["Successful"]) == len(messages)


def iso(offset_s: float) -> str:
    return datetime.fromtimestamp(T0 + offset_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def status(event: dict[str, Any]) -> str:
    detail = event["detail"]
    return str(detail.get("lastStatus") or detail["status"])


async def test_events_arrive_for_each_change_in_delivery_order(clock: Clock) -> None:
    """One event per phase of an ECS task (7, with stopping phases) and of a Batch job (none at
    SUBMITTED), received in the order of their drawn delivery times, as EventBridge has them."""
    config = events_config(clock, stopping_s=3, event_duplicate_ratio=0)
    async with fakeaws.FakeAws(config) as server:
        client = client_for(server)
        async with client("ecs") as ecs, client("batch") as batch, client("sqs") as sqs:
            url = (await sqs.get_queue_url(QueueName=QUEUE))["QueueUrl"]
            assert url == server.queue_url == f"{server.endpoint_url}/123456789012/{QUEUE}"
            arn = (await ecs.run_task(**run_kwargs()))["tasks"][0]["taskArn"]
            job = await batch.submit_job(jobName="j", jobQueue="jobs", jobDefinition="d:1")
            clock.set(100)
            messages = await receive_all(sqs, url)
            log = server.events()
            stats = server.stats()["events"]
    events = [json.loads(m["Body"]) for m in messages]
    assert all(m["MD5OfBody"] == hashlib.md5(m["Body"].encode()).hexdigest() for m in messages)
    assert len({m["MessageId"] for m in messages}) == len(messages) == len(log) == 12
    # Received in delivery order: the order of the schedule the server drew.
    sent = [int(m["Attributes"]["SentTimestamp"]) for m in messages]
    assert sent == sorted(sent)
    schedule = sorted(log, key=lambda e: e["deliver_at"])
    assert [e["id"] for e in events] == [e["id"] for e in schedule]
    for message, planned in zip(messages, schedule, strict=True):
        assert abs(int(message["Attributes"]["SentTimestamp"]) - planned["deliver_at"] * 1000) <= 1
        assert message["Attributes"]["ApproximateReceiveCount"] == "1"
        assert planned["received_at"] == T0 + 100
    assert {e["source"] for e in events} == {"aws.ecs", "aws.batch"}
    assert [e["status"] for e in log if e["service"] == "ecs"] == [*ECS_LIFE, "STOPPED"]
    ecs_changes = [e["change_at"] - T0 for e in log if e["service"] == "ecs"]
    assert ecs_changes == pytest.approx([0, 2, 4, 14, 15, 16, 17], abs=1e-6)
    batch_log = [e for e in log if e["service"] == "batch"]
    assert [e["status"] for e in batch_log] == [
        "PENDING",
        "RUNNABLE",
        "STARTING",
        "RUNNING",
        "SUCCEEDED",
    ]
    assert [e["change_at"] - T0 for e in batch_log] == pytest.approx([1, 2, 3, 4, 14], abs=1e-6)
    # ECS: the task as DescribeTasks has it, ISO-8601 timestamps, `version` growing by change.
    tasks = sorted(
        (e for e in events if e["source"] == "aws.ecs"), key=lambda e: e["detail"]["version"]
    )
    assert [status(e) for e in tasks] == [*ECS_LIFE, "STOPPED"]
    assert [e["detail"]["version"] for e in tasks] == list(range(1, 8))
    stopped = tasks[-1]
    assert {
        k: stopped[k] for k in ("version", "detail-type", "account", "region", "resources")
    } == {
        "version": "0",
        "detail-type": "ECS Task State Change",
        "account": "123456789012",
        "region": REGION,
        "resources": [arn],
    }
    assert stopped["time"] == "2027-01-15T08:00:17Z"
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", stopped["id"]
    )
    detail = stopped["detail"]
    assert (detail["taskArn"], detail["startedBy"], detail["desiredStatus"]) == (
        arn,
        "job1-1",
        "STOPPED",
    )
    assert (detail["createdAt"], detail["startedAt"]) == (iso(0), iso(4))
    assert (detail["stoppingAt"], detail["stoppedAt"], detail["updatedAt"]) == (
        iso(14),
        iso(17),
        iso(17),
    )
    assert detail["stopCode"] == "EssentialContainerExited"
    assert detail["containers"][0]["exitCode"] == 0
    assert "tags" not in detail
    assert "startedAt" not in tasks[1]["detail"]
    # Batch: the job as DescribeJobs has it.
    jobs = [e for e in events if e["source"] == "aws.batch"]
    [succeeded] = [e for e in jobs if status(e) == "SUCCEEDED"]
    assert succeeded["detail-type"] == "Batch Job State Change"
    assert succeeded["resources"] == [job["jobArn"]]
    assert succeeded["detail"]["jobId"] == job["jobId"]
    assert succeeded["detail"]["jobQueue"].endswith(":job-queue/jobs")
    assert succeeded["detail"]["createdAt"] == int(T0 * 1000)
    assert succeeded["detail"]["stoppedAt"] == int((T0 + 14) * 1000)
    assert succeeded["detail"]["container"]["exitCode"] == 0
    assert stats["planned"] == stats["due"] == stats["delivered"] == stats["received"] == 12
    assert stats["deleted"] == 12
    assert (stats["visible"], stats["in_flight"], stats["duplicated"]) == (0, 0, 0)


async def test_event_delays_duplicates_and_drops_follow_the_model(clock: Clock) -> None:
    """4,000 events (1,000 tasks): the drawn delays have the configured median and 99th
    percentile, 5 % of the events arrive twice (one id, two messages), 10 % never."""
    config = events_config(clock, event_duplicate_ratio=0.05, event_drop_ratio=0.1, seed=7)
    async with fakeaws.FakeAws(config) as server:
        client = client_for(server)
        async with client("ecs") as ecs, client("sqs") as sqs:
            for i in range(100):
                clock.set(i * 0.1)
                await ecs.run_task(**run_kwargs(f"t{i}", count=10))
            clock.set(1000)
            messages = await receive_all(sqs, server.queue_url)
            log = server.events()
            stats = server.stats()["events"]
    assert len(log) == 4000
    dropped = [e for e in log if e["dropped"]]
    delivered = [e for e in log if not e["dropped"]]
    doubled = [e for e in delivered if e["duplicate_at"] is not None]
    delays = sorted(
        at - e["change_at"] for e in delivered for at in (e["deliver_at"], e["duplicate_at"]) if at
    )
    median, p99 = delays[len(delays) // 2], delays[int(len(delays) * 0.99)]
    print(f"\n  delays: median {median:.3f} s, p99 {p99:.3f} s over {len(delays)}")
    assert median == pytest.approx(0.5, rel=0.1)
    assert p99 == pytest.approx(3.0, rel=0.3)
    assert len(dropped) / len(log) == pytest.approx(0.1, abs=0.02)
    assert len(doubled) / len(delivered) == pytest.approx(0.05, abs=0.015)
    copies = Counter(json.loads(m["Body"])["id"] for m in messages)
    assert {i for i, n in copies.items() if n == 2} == {e["id"] for e in doubled}
    assert set(copies) == {e["id"] for e in delivered}  # a dropped event never arrives
    assert max(copies.values()) == 2
    assert len({m["MessageId"] for m in messages}) == len(messages)  # a copy: a message
    assert stats["dropped"] == len(dropped)
    assert stats["duplicated"] == len(doubled)
    assert stats["delivered"] == stats["received"] == len(messages) == len(delays)
    assert stats["delay_s"]["median"] == pytest.approx(median, abs=0.01)


async def test_unacknowledged_messages_come_back_after_the_visibility_timeout(
    clock: Clock,
) -> None:
    config = at_once(clock, pending_s=1000, run_s=1000)  # one event for a long while
    async with fakeaws.FakeAws(config) as server:
        client = client_for(server)
        async with client("ecs") as ecs, client("sqs") as sqs:
            url = server.queue_url

            async def receive(**extra: Any) -> list[dict[str, Any]]:
                reply = await sqs.receive_message(
                    QueueUrl=url, MessageSystemAttributeNames=["ApproximateReceiveCount"], **extra
                )
                return list(reply.get("Messages", []))

            await ecs.run_task(**run_kwargs())  # PROVISIONING, delivered at once
            [first] = await receive(VisibilityTimeout=5)
            hidden = [await receive()]
            clock.set(4.9)
            hidden.append(await receive())
            clock.set(5)
            [again] = await receive()  # the queue's VisibilityTimeout from now on: 30 s
            attributes = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))[
                "Attributes"
            ]
            clock.set(34.9)
            hidden.append(await receive())
            clock.set(35)
            [third] = await receive()
            # A handle from any receive of a message deletes it (and again: no error).
            batch = await sqs.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": "old", "ReceiptHandle": first["ReceiptHandle"]},
                    {"Id": "bad", "ReceiptHandle": "nonsense"},
                ],
            )
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=third["ReceiptHandle"])
            with pytest.raises(ClientError) as invalid:
                await sqs.delete_message(QueueUrl=url, ReceiptHandle="nonsense")
            clock.set(499)  # (the task turns PENDING at 500 s)
            hidden.append(await receive())
            stats = server.stats()["events"]
    assert hidden == [[], [], [], []]
    assert again["MessageId"] == third["MessageId"] == first["MessageId"]
    assert again["Body"] == first["Body"]
    assert len({m["ReceiptHandle"] for m in (first, again, third)}) == 3
    counts = [m["Attributes"]["ApproximateReceiveCount"] for m in (first, again, third)]
    assert counts == ["1", "2", "3"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "1"
    assert attributes["VisibilityTimeout"] == "30"
    assert attributes["QueueArn"] == f"arn:aws:sqs:{REGION}:123456789012:{QUEUE}"
    assert batch["Successful"] == [{"Id": "old"}]
    [failed] = batch["Failed"]
    assert (failed["Id"], failed["Code"], failed["SenderFault"]) == (
        "bad",
        "ReceiptHandleIsInvalid",
        True,
    )
    assert invalid.value.response["Error"]["Code"] == "ReceiptHandleIsInvalid"
    assert (stats["received"], stats["redelivered"], stats["deleted"]) == (3, 2, 1)
    assert (stats["visible"], stats["in_flight"]) == (0, 0)


async def test_a_long_poll_answers_as_soon_as_an_event_comes_due(clock: Clock) -> None:
    """A long poll waits (WaitTimeSeconds 20) and answers when an event comes due: at once for
    a new task's first event, within a tick for a hand-moved clock."""
    async with fakeaws.FakeAws(at_once(clock, pending_s=1000, run_s=1000)) as server:
        client = client_for(server)
        async with client("ecs") as ecs, client("sqs") as sqs:
            url = server.queue_url
            started = time.monotonic()
            poll = asyncio.create_task(sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20))
            await asyncio.sleep(0.3)
            waiting = [not poll.done()]
            await ecs.run_task(**run_kwargs())
            [created] = (await poll)["Messages"]
            woken_s = time.monotonic() - started
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=created["ReceiptHandle"])
            poll = asyncio.create_task(sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20))
            await asyncio.sleep(0.3)
            waiting.append(not poll.done())
            clock.set(500)  # the task turns PENDING
            [pending] = (await poll)["Messages"]
            moved_s = time.monotonic() - started - woken_s
    assert waiting == [True, True]
    assert status(json.loads(created["Body"])) == "PROVISIONING"
    assert status(json.loads(pending["Body"])) == "PENDING"
    assert woken_s < 15  # long before the poll's 20 s (it takes about 0.3 s)
    assert moved_s < 15


async def test_a_long_poll_waits_for_the_drawn_delivery_time() -> None:
    """On the real clock: every delay 1 s; a long poll started at once gets the event, and no
    sooner than its delivery (the server's record); an empty one lasts its WaitTimeSeconds."""
    config = fakeaws.Config(
        events=True, pending_s=1000, run_s=1000, event_delay_median_s=1, event_delay_p99_s=1
    )
    async with fakeaws.FakeAws(config) as server:
        client = client_for(server)
        async with client("ecs") as ecs, client("sqs") as sqs:
            url = (await sqs.get_queue_url(QueueName=QUEUE))["QueueUrl"]  # a warm client
            await ecs.run_task(**run_kwargs())
            started = time.monotonic()
            reply = await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20)
            waited_s = time.monotonic() - started
            started = time.monotonic()
            empty = await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1)
            empty_s = time.monotonic() - started
            [event] = server.events()
    assert event["deliver_at"] - event["change_at"] == pytest.approx(1)
    assert len(reply["Messages"]) == 1
    assert event["received_at"] >= event["deliver_at"]
    assert waited_s < 15  # long before the poll's 20 s
    assert "Messages" not in empty
    assert empty_s >= 0.9


async def test_a_broken_queue_answers_non_existent_queue(
    clock: Clock, aws: fakeaws.FakeAws
) -> None:
    """Broken, the queue answers as a deleted one does: its messages and the events due
    meanwhile are lost; repaired (here through the control endpoint), it works again."""
    async with fakeaws.FakeAws(at_once(clock)) as server:  # PROVISIONING 0, PENDING 2, RUNNING 4
        client = client_for(server)
        async with client("ecs") as ecs, client("sqs") as sqs, aiohttp.ClientSession() as http:
            url = server.queue_url
            await ecs.run_task(**run_kwargs())
            [unacknowledged] = (await sqs.receive_message(QueueUrl=url))["Messages"]
            poll = asyncio.create_task(sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20))
            await asyncio.sleep(0.2)
            server.set_queue_broken(True)
            errors = [await raised(poll)]
            errors += [
                await raised(call)
                for call in (
                    sqs.receive_message(QueueUrl=url),
                    sqs.get_queue_url(QueueName=QUEUE),
                    sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]),
                    sqs.delete_message(QueueUrl=url, ReceiptHandle=unacknowledged["ReceiptHandle"]),
                )
            ]
            recreated = await raised(sqs.create_queue(QueueName=QUEUE))
            clock.set(3)  # PENDING comes due while broken: lost
            async with http.post(f"{server.endpoint_url}/_fakeaws/queue?broken=false") as r:
                repaired = await r.json()
            after_repair = await sqs.receive_message(QueueUrl=url)
            clock.set(4)
            [running] = (await sqs.receive_message(QueueUrl=url))["Messages"]
            created = await sqs.create_queue(QueueName=QUEUE)
            other = await raised(sqs.get_queue_url(QueueName="other"))
            stats = server.stats()["events"]
        async with client_for(aws)("sqs") as without:  # a server without events has no queue
            none = await raised(without.get_queue_url(QueueName=QUEUE))
    for error in [*errors, other, none]:
        assert error.response["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
        assert error.response["Error"]["QueryErrorCode"] == "QueueDoesNotExist"
        assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert type(error).__name__ == "QueueDoesNotExist"  # the modelled exception
    assert recreated.response["Error"]["Code"] == "AWS.SimpleQueueService.QueueDeletedRecently"
    assert repaired == {"broken": False}
    assert "Messages" not in after_repair  # the message in flight went with the queue
    assert status(json.loads(running["Body"])) == "RUNNING"
    assert created["QueueUrl"] == url
    assert (stats["lost"], stats["broken"], stats["received"]) == (2, False, 2)


async def raised(call: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        await call
    return info.value


async def test_a_stop_or_terminate_replans_the_events(clock: Clock) -> None:
    """The events planned after a StopTask or TerminateJob are superseded by the stop's own; an
    event shows the task as it was at its change."""
    async with fakeaws.FakeAws(events_config(clock, event_duplicate_ratio=0)) as server:
        client = client_for(server)
        async with client("ecs") as ecs, client("batch") as batch, client("sqs") as sqs:
            arn = (await ecs.run_task(**run_kwargs()))["tasks"][0]["taskArn"]
            job_id = (await batch.submit_job(jobName="j", jobQueue="jobs", jobDefinition="d"))[
                "jobId"
            ]
            parent = await submit_array(batch, 3)  # PENDING from 2 s
            clock.set(1.5)  # the job is PENDING
            await batch.terminate_job(jobId=job_id, reason="orchestrator: cancel")
            clock.set(5)
            await ecs.stop_task(cluster=CLUSTER, task=arn, reason="orchestrator: x")
            await batch.terminate_job(jobId=f"{parent}:1", reason="one")  # the parent goes on
            clock.set(6)
            await batch.terminate_job(jobId=parent, reason="orchestrator: stop")
            clock.set(100)
            events = [json.loads(m["Body"]) for m in await receive_all(sqs, server.queue_url)]
            stats = server.stats()["events"]
            terminal = server.terminal_times()
            log = server.events()
    change_at = {e["id"]: e["change_at"] for e in log}
    by_resource: dict[str, list[dict[str, Any]]] = {}
    for event in sorted(events, key=lambda e: change_at[e["id"]]):
        by_resource.setdefault(event["resources"][0], []).append(event)
    task = sorted(by_resource[arn], key=lambda e: e["detail"]["version"])
    assert [status(e) for e in task] == ["PROVISIONING", "PENDING", "RUNNING", "STOPPED"]
    assert task[2]["detail"]["desiredStatus"] == "RUNNING"  # as it was at 4 s
    stopped = task[3]["detail"]
    assert (stopped["stopCode"], stopped["stoppedReason"]) == ("UserInitiated", "orchestrator: x")
    assert stopped["containers"][0]["exitCode"] == fakeaws.SIGTERM_EXIT
    assert stopped["stoppedAt"] == iso(5)
    job_arn = f"arn:aws:batch:{REGION}:123456789012:job/{job_id}"
    job = [e["detail"] for e in by_resource[job_arn]]
    assert [d["status"] for d in job] == ["PENDING", "FAILED"]
    assert (job[1]["statusReason"], job[1]["isTerminated"]) == ("orchestrator: cancel", True)
    assert "isTerminated" not in job[0]  # as it was at 1 s
    array = [e["detail"] for e in by_resource[f"arn:aws:batch:{REGION}:123456789012:job/{parent}"]]
    assert [d["status"] for d in array] == ["PENDING", "FAILED"]
    assert array[0]["arrayProperties"]["statusSummary"]["RUNNABLE"] == 3
    assert array[1]["statusReason"] == "orchestrator: stop"
    assert array[1]["arrayProperties"]["statusSummary"]["FAILED"] == 3
    # Superseded: the task's natural STOPPED, the job's RUNNABLE..SUCCEEDED, the array's end.
    assert (stats["planned"], stats["superseded"]) == (8, 1 + 4 + 1)
    assert len(log) == len(events) == 8
    for key, end_s in ((arn, 5), (job_id, 1.5), (parent, 6)):
        times = terminal[key]
        assert times["terminal_at"] == T0 + end_s
        assert times["terminal_event_at"] >= times["terminal_at"]
        assert times["terminal_event_received_at"] == T0 + 100


async def test_the_planned_events_of_100000_jobs_fit_in_modest_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """tracemalloc over planning 100,000 tasks' events (4 each): about 100 bytes an event.
    (The planning is called directly: 100,000 RunTask calls over HTTP would take minutes.)"""
    config = fakeaws.Config(clock=lambda: T0, pending_s=4, run_s=10, jitter=0.2, events=True)
    tasks_only = fakeaws.FakeAws(config, events=False)  # never started: no HTTP
    tasks = [tasks_only._new_task({}, CLUSTER, "td:1", T0) for _ in range(100_000)]
    events = fakeaws._Events(config)
    tracemalloc.start()
    try:
        for task in tasks:
            events.plan(task, fakeaws._changes(task), T0)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    planned = events.counts["planned"]
    with capsys.disabled():
        print(
            f"\n  100,000 tasks' {planned} events: {used / 2**20:.1f} MiB,"
            f" {used / planned:.0f} B each"
        )
    assert planned == 400_000
    assert used / planned < 250  # measured: about 105
    assert used < 100 * 2**20


# -- the CLI, and a throughput print -----------------------------------------------------------


async def test_cli_prints_the_url_and_the_counts_on_sigterm() -> None:
    args = ["--port", "0", "--pending-s", "0", "--run-s", "0", "--exit-code", "3", "--no-uvloop"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(fakeaws.__file__)),
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        config = Config(retries={"mode": "standard", "max_attempts": 1})
        async with SESSION.client("ecs", endpoint_url=url, config=config) as ecs:
            arn = (await ecs.run_task(**run_kwargs()))["tasks"][0]["taskArn"]
            [task] = (await describe(ecs, arn))["tasks"]
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert task["lastStatus"] == "STOPPED"
    assert task["containers"][0]["exitCode"] == 3
    stats = json.loads(out)
    assert stats["calls"] == {"ecs.DescribeTasks": 1, "ecs.RunTask": 1}
    assert process.returncode == 0


async def test_cli_events_flags_and_control_endpoints(tmp_path: Path) -> None:
    dump = tmp_path / "events.json"
    args = ["--port", "0", "--pending-s", "0", "--run-s", "0", "--no-uvloop", "--events", "q-1",
            "--event-delay-median-s", "0", "--event-delay-p99-s", "0",
            "--event-duplicate-ratio", "0", "--dump-events", str(dump)]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(fakeaws.__file__)), *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        config = Config(retries={"mode": "standard", "max_attempts": 1})
        async with (
            SESSION.client("ecs", endpoint_url=url, config=config) as ecs,
            SESSION.client("sqs", endpoint_url=url, config=config) as sqs,
            aiohttp.ClientSession() as http,
        ):
            queue_url = (await sqs.get_queue_url(QueueName="q-1"))["QueueUrl"]
            arn = (await ecs.run_task(**run_kwargs()))["tasks"][0]["taskArn"]
            [message] = (await sqs.receive_message(QueueUrl=queue_url))["Messages"]
            async with http.get(f"{url}/_fakeaws/events") as reply:
                [logged] = await reply.json()
            async with http.post(f"{url}/_fakeaws/queue?broken=true") as reply:
                assert await reply.json() == {"broken": True}
            broken = await raised(sqs.receive_message(QueueUrl=queue_url))
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert queue_url == f"{url}/123456789012/q-1"
    event = json.loads(message["Body"])
    assert (status(event), event["resources"]) == ("STOPPED", [arn])  # 0 s pending and running
    assert logged["id"] == event["id"]
    assert broken.response["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
    stats = json.loads(out)
    assert stats["calls"]["sqs.ReceiveMessage"] == 2
    assert (stats["events"]["queue"], stats["events"]["planned"]) == ("q-1", 1)
    assert json.loads(dump.read_bytes()) == [logged]


async def test_print_describe_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    """Not asserted: how many DescribeTasks(100 ARNs) aioboto3 gets through in a second.
    The client (botocore parsing 100 tasks per reply) shares the process and costs the most."""
    async with fakeaws.FakeAws(throttle=False, pending_s=1, run_s=3600) as server:
        per_s = await aioboto3_describe_rate(server.endpoint_url, seconds=1.0, workers=4)
        served = server.stats()["describe_ids"]["ecs.DescribeTasks"]
    with capsys.disabled():
        print(
            f"\n  aioboto3 DescribeTasks(100 ARNs): {per_s:.0f} calls/s ({served['calls']} served)"
        )


async def aioboto3_describe_rate(url: str, *, seconds: float, workers: int) -> float:
    config = Config(retries={"mode": "standard", "max_attempts": 1}, max_pool_connections=workers)
    async with SESSION.client("ecs", endpoint_url=url, config=config) as ecs:
        arns = [
            (await ecs.run_task(**run_kwargs(f"t{i}")))["tasks"][0]["taskArn"] for i in range(100)
        ]
        calls = 0
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal calls
            while time.monotonic() < stop:
                await describe(ecs, *arns)
                calls += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return calls / (time.monotonic() - started)


# -- a longer measurement: python bench/test_fakeaws.py ----------------------------------------


def _request(target: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-amz-json-1.1\r\n"
        f"X-Amz-Target: {fakeaws.ECS_TARGET}.{target}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _exchange(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    return await reader.readexactly(length)


async def _pipelined(port: int, request: bytes, *, seconds: float, connections: int) -> int:
    """Requests answered in `seconds` by `connections` connections with 8 requests in flight."""
    answered = 0
    stop = time.monotonic() + seconds

    async def connection() -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        in_flight = 0
        try:
            while True:
                while in_flight < 8 and time.monotonic() < stop:
                    writer.write(request)
                    in_flight += 1
                if not in_flight:
                    return
                await _exchange(reader)
                in_flight -= 1
                answered += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return answered


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 10 ms


async def measure(seconds: float, connections: int) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(fakeaws.__file__)),
        *("--port", "0", "--no-throttle", "--pending-s", "1", "--run-s", "3600"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    url = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
    port = int(url.rpartition(":")[2])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    arns = []
    for i in range(100):
        writer.write(_request("RunTask", run_kwargs(f"t{i}")))
        arns.append(json.loads(await _exchange(reader))["tasks"][0]["taskArn"])
    writer.close()
    cases = {
        "DescribeTasks(100 ARNs)": _request("DescribeTasks", {"cluster": CLUSTER, "tasks": arns}),
        "DescribeTasks(1 ARN)": _request("DescribeTasks", {"cluster": CLUSTER, "tasks": arns[:1]}),
        "RunTask": _request(
            "RunTask", {k: v for k, v in run_kwargs().items() if k != "clientToken"}
        ),
    }
    load = os.getloadavg()[0]
    print(f"fakeaws at {url} (pid {process.pid}); {seconds:.0f} s per case; load {load:.1f}")
    print(f"{'raw HTTP, pipelined':<34}{'calls/s':>10}{'server CPU':>12}{'calls/CPU-s':>13}")
    for name, request in cases.items():
        cpu0, t0 = _cpu_s(process.pid), time.monotonic()
        answered = await _pipelined(port, request, seconds=seconds, connections=connections)
        elapsed, cpu = time.monotonic() - t0, _cpu_s(process.pid) - cpu0
        print(
            f"  {name:<32}{answered / elapsed:>10.0f}{cpu / elapsed:>11.0%}"
            f"{answered / max(cpu, 0.01):>13.0f}"
        )
    cpu0, t0 = _cpu_s(process.pid), time.monotonic()
    per_s = await aioboto3_describe_rate(url, seconds=seconds, workers=connections)
    cpu = _cpu_s(process.pid) - cpu0
    elapsed = time.monotonic() - t0
    print(f"{'aioboto3 (client-bound)':<34}")
    print(f"  {'DescribeTasks(100 ARNs)':<32}{per_s:>10.0f}{cpu / elapsed:>11.0%}")
    process.send_signal(signal.SIGINT)
    await process.communicate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Measure bench/fakeaws.py's throughput.")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=4)
    options = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(measure(options.seconds, options.connections))
