"""ECS and Batch through the real daemon and socket, against a real moto server over HTTP, with
a fault-injecting proxy in front of it exercising botocore's real retry path."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, models
from orchestrator.backends.ecs import EcsBackend
from orchestrator.client import Client
from orchestrator.daemon import Daemon
from orchestrator.ratelimit import TokenBucket
from orchestrator.settings import EcsSettings
from orchestrator.testing import make_settings
from tests.support.daemon import accepted, running, until_state
from tests.support.faultproxy import Reply, Request, Rule
from tests.support.moto import BatchEnv, EcsEnv, MotoServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("proxied_aws_env")]


def ecs_section(env: EcsEnv, **extra: Any) -> dict[str, Any]:
    # moto answers the StopTask probe with a 500 (retried with back-off): checked in one test
    # of its own instead of slowing every start-up.
    return env.settings(**{"max_attempts": 4, "check_health_on_startup": False, **extra})


def batch_section(env: BatchEnv, **extra: Any) -> dict[str, Any]:
    return env.settings(**{"max_attempts": 4, **extra})


@pytest.fixture
async def ecs_daemon(short_tmp: Path, ecs_env: EcsEnv) -> AsyncIterator[Daemon]:
    settings = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(settings) as daemon:
        yield daemon


@pytest.fixture
async def batch_daemon(short_tmp: Path, batch_env: BatchEnv) -> AsyncIterator[Daemon]:
    settings = make_settings(short_tmp, batch=batch_section(batch_env), jobs={"backend": "batch"})
    async with running(settings) as daemon:
        yield daemon


# These tests look at how one attempt ends: `infrastructure` and `start` are retried by default.
ONE_ATTEMPT: dict[str, Any] = {"retry": {"attempts": 1}}


def client_of(daemon: Daemon) -> Client:
    return Client(daemon.settings.server.socket_path)


def _now_ms() -> int:
    return int(time.time() * 1000)  # CloudWatch drops events older than 14 days


def stopped_with(
    exit_code: int | None,
    stop_code: str = "EssentialContainerExited",
    stopped_reason: str = "Essential container in task exited",
    container_reason: str | None = None,
) -> Any:
    """A DescribeTasks responder: every asked-for task STOPPED, its container exited so (the
    shapes of the ECS API reference's `Task` and `Container`)."""

    def respond(request: Request) -> Reply:
        container: dict[str, Any] = {"name": "main"}
        if exit_code is not None:
            container["exitCode"] = exit_code
        if container_reason is not None:
            container["reason"] = container_reason
        tasks = [
            {
                "taskArn": arn,
                "lastStatus": "STOPPED",
                "stopCode": stop_code,
                "stoppedReason": stopped_reason,
                "containers": [container],
            }
            for arn in request.json()["tasks"]
        ]
        body = json.dumps({"tasks": tasks, "failures": []}).encode()
        return Reply(200, body, {"Content-Type": "application/x-amz-json-1.1"})

    return respond


# -- ECS ---------------------------------------------------------------------------------------


async def test_ecs_job_runs_to_success_with_the_task_identity(
    ecs_daemon: Daemon, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    async with client_of(ecs_daemon) as client:
        job = await client.submit({"command": ["echo", "hi"], "env": {"A": "1"}})
        final = await client.wait(job["id"])
        history = [h["to"] for h in (await client.get(job["id"], history=True))["history"]]
    assert (final["state"], final["exit_code"], final["backend"]) == ("SUCCEEDED", 0, "ecs")
    assert final["external_id"] is not None
    assert final["external_id"].startswith("arn:aws:ecs:")
    assert (history[0], history[-1]) == ("QUEUED", "SUCCEEDED")
    (run_task,) = fault_proxy.requests("ecs", "RunTask")
    body = run_task.json()
    token = f"{job['id']}-1"
    assert (body["clientToken"], body["startedBy"], body["count"]) == (token, token, 1)
    assert {"key": "orchestrator:job-id", "value": job["id"]} in body["tags"]
    assert body["overrides"]["containerOverrides"] == [
        {"name": "main", "command": ["echo", "hi"], "environment": [{"name": "A", "value": "1"}]}
    ]
    assert body["networkConfiguration"]["awsvpcConfiguration"]["subnets"] == list(
        ecs_env.subnet_ids
    )


async def test_ecs_nonzero_container_exit_fails_the_job_with_that_code(
    ecs_daemon: Daemon, fault_proxy: Any
) -> None:
    fault_proxy.add_rule(Rule("ecs", "DescribeTasks", stopped_with(3), times=None))
    async with client_of(ecs_daemon) as client:
        final = await client.wait((await client.submit({"command": ["false"]}))["id"])
    assert (final["state"], final["exit_code"]) == ("FAILED", 3)
    assert final["reason"] is not None
    assert "EssentialContainerExited" in final["reason"]
    assert final["failure"] == "user"


@pytest.mark.parametrize(
    ("exit_code", "stop_code", "stopped_reason", "container_reason", "failure"),
    [
        # Fargate Spot: SIGTERM, then the task is gone (ECS developer guide, Fargate Spot).
        (143, "SpotInterruption", "Your Spot Task was interrupted.", None, "infrastructure"),
        # "Stopped tasks error codes": the image could not be pulled, nothing ran.
        (
            None,
            "TaskFailedToStart",
            "CannotPullContainerError: pull image manifest has been retried 5 time(s)",
            None,
            "start",
        ),
        # The container was OOM-killed (re:Post, troubleshooting OutOfMemory errors).
        (
            137,
            "EssentialContainerExited",
            "Essential container in task exited",
            "OutOfMemoryError: Container killed due to memory usage",
            "infrastructure",
        ),
    ],
    ids=["spot", "pull", "oom"],
)
async def test_ecs_a_task_the_platform_ended_fails_with_its_class(
    ecs_daemon: Daemon,
    fault_proxy: Any,
    exit_code: int | None,
    stop_code: str,
    stopped_reason: str,
    container_reason: str | None,
    failure: str,
) -> None:
    respond = stopped_with(exit_code, stop_code, stopped_reason, container_reason)
    fault_proxy.add_rule(Rule("ecs", "DescribeTasks", respond, times=None))
    async with client_of(ecs_daemon) as client:
        final = await client.wait((await client.submit(ONE_ATTEMPT | {"command": ["true"]}))["id"])
    assert (final["state"], final["failure"]) == ("FAILED", failure), final


async def test_ecs_cancel_stops_the_task(
    ecs_daemon: Daemon, moto: MotoServer, fault_proxy: Any
) -> None:
    moto.set_transition("ecs::task", "manual", times=10_000)  # stays RUNNING until stopped
    async with client_of(ecs_daemon) as client:
        job = await client.submit({"command": ["sleep", "3600"]})
        await until_state(client, job["id"], "RUNNING")
        await client.cancel(job["id"])
        final = await client.wait(job["id"])
    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel")
    assert fault_proxy.counts[("ecs", "StopTask")] >= 1


async def test_ecs_logs_come_from_cloudwatch(
    ecs_daemon: Daemon, ecs_env: EcsEnv, moto: MotoServer
) -> None:
    async with client_of(ecs_daemon) as client:
        job = await client.submit({"command": ["echo", "hi"]})
        done = await client.wait(job["id"])
        assert done["external_id"] is not None
        stream = ecs_env.log_stream(done["external_id"])
        with moto.client("logs") as logs:
            logs.create_log_stream(logGroupName=ecs_env.log_group, logStreamName=stream)
            logs.put_log_events(
                logGroupName=ecs_env.log_group,
                logStreamName=stream,
                logEvents=[{"timestamp": _now_ms() + i, "message": f"line {i}"} for i in range(3)],
            )
        replies = [r async for r in client.logs(job["id"])]
    assert "".join(r.get("data", "") for r in replies) == "line 0\nline 1\nline 2\n"
    assert replies[-1]["end"] is True


async def test_ecs_300_concurrent_jobs_are_described_in_batches(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "DescribeTasks")
    settings = make_settings(
        short_tmp,
        ecs=ecs_section(ecs_env, run_task_rate_per_s=200.0, run_task_burst=200.0),
        jobs={"backend": "ecs"},
        poller={"base_s": 0.5, "cap_s": 1.0},
    )
    async with running(settings) as daemon, client_of(daemon) as client:
        ids = [
            accepted(j)["id"]
            async for j in client.submit_many({"command": ["true"]} for _ in range(320))
        ]
        finals = await asyncio.gather(*(client.wait(i) for i in ids))
    assert [j["state"] for j in finals].count("SUCCEEDED") == 320
    describes = fault_proxy.requests("ecs", "DescribeTasks")
    sizes = [len(r.json()["tasks"]) for r in describes]
    assert max(sizes) <= 100
    # Each task needs ~4 describes to reach STOPPED in moto: 1,280 task-describes. One call per
    # job per poll would be 1,280 calls; batched it is a small fraction of that.
    assert sum(sizes) >= 320 * 3
    assert len(describes) <= 1280 / 8, f"{len(describes)} DescribeTasks calls, sizes {sizes}"


async def test_ecs_throttling_bursts_on_every_api_fail_no_job(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    for operation in ("RunTask", "DescribeTasks"):
        fault_proxy.throttle("ecs", operation, times=None, every=4)
    fault_proxy.ecs_rate_exceeded("RunTask", times=3)
    settings = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(settings) as daemon, client_of(daemon) as client:
        ids = [
            accepted(j)["id"]
            async for j in client.submit_many({"command": ["true"]} for _ in range(12))
        ]
        finals = await asyncio.gather(*(client.wait(i) for i in ids))
        throttles = daemon.backends["ecs"].api.throttles  # type: ignore[attr-defined]
        exported = daemon.metrics.render().decode()
    assert [j["state"] for j in finals] == ["SUCCEEDED"] * 12
    assert throttles["RunTask"] >= 3
    assert throttles["DescribeTasks"] >= 1
    series = 'orchestrator_aws_throttles_total{operation="RunTask",service="ecs"}'
    assert f"{series} {float(throttles['RunTask'])}" in exported
    assert 'orchestrator_ratelimit_configured_rate_per_s{bucket="ecs.RunTask"} 20.0' in exported


async def test_ecs_placement_failures_retry_when_retryable_and_fail_when_not(
    ecs_daemon: Daemon, fault_proxy: Any
) -> None:
    fault_proxy.runtask_failures("RESOURCE:MEMORY", times=2)
    async with client_of(ecs_daemon) as client:
        retried = await client.wait((await client.submit({"command": ["true"]}))["id"])
        attempts = (await client.get(retried["id"], history=True))["attempts"]
        fault_proxy.runtask_failures("ATTRIBUTE", times=1)
        failed = await client.wait((await client.submit({"command": ["true"]}))["id"])
    assert retried["state"] == "SUCCEEDED"
    assert [a["outcome"] for a in attempts] == [
        "start failed: RESOURCE:MEMORY",
        "start failed: RESOURCE:MEMORY",
        "submitted",
    ]
    assert (failed["state"], failed["reason"]) == ("FAILED", "ATTRIBUTE")
    assert failed["failure"] == "start"  # no task: nothing ran


async def test_ecs_invalid_job_is_rejected_at_submit_with_the_path(ecs_daemon: Daemon) -> None:
    async with client_of(ecs_daemon) as client:
        with pytest.raises(errors.RemoteError) as info:
            await client.submit(
                {
                    "command": ["x"],
                    "overrides": {
                        "overrides": {"containerOverrides": [{"name": "main", "cpu": "many"}]}
                    },
                }
            )
        assert info.value.remote_code == "invalid_job"
        assert "overrides.containerOverrides[0].cpu" in str(info.value)
        assert await client.list() == []


async def test_ecs_same_token_returns_the_same_task_and_different_params_conflict(
    ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.honour_client_token = True
    settings = EcsSettings(**ecs_section(ecs_env, check_health_on_startup=False))
    backend = EcsBackend(settings, TokenBucket("logs", 10, 10))
    await backend.start()
    try:
        job = models.Job(
            id="01sametokensametokensame00",
            spec=models.JobSpec(command=["true"]),
            backend="ecs",
            state=models.JobState.QUEUED,
            created_at=0.0,
            updated_at=0.0,
            state_times={},
            attempt=1,
            token="01sametokensametokensame00-1",
        )
        first = await backend.submit(job)
        again = await backend.submit(job)
        other = dataclasses.replace(job, spec=models.JobSpec(command=["false"]))
        with pytest.raises(errors.StartFailed) as info:
            await backend.submit(other)
    finally:
        await backend.close()
    assert first.external_id == again.external_id
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 1
    assert "ConflictException" in info.value.reason
    assert info.value.retryable is False


async def test_ecs_health_check_fails_start_up_for_a_missing_cluster(
    short_tmp: Path, ecs_env: EcsEnv
) -> None:
    settings = make_settings(
        short_tmp, ecs=ecs_section(ecs_env, cluster="no-such-cluster", check_health_on_startup=True)
    )
    daemon = Daemon(settings)
    with pytest.raises(errors.HealthCheckFailed, match="no-such-cluster"):
        await daemon.run()
    assert not settings.server.socket_path.exists()


# -- Batch -------------------------------------------------------------------------------------


async def test_batch_job_succeeds_with_a_deterministic_name(
    batch_daemon: Daemon, fault_proxy: Any
) -> None:
    fault_proxy.record("batch", "SubmitJob")
    async with client_of(batch_daemon) as client:
        job = await client.submit({"command": ["echo", "hi"], "env": {"K": "v"}})
        final = await client.wait(job["id"])
    assert (final["state"], final["backend"]) == ("SUCCEEDED", "batch")
    (submit,) = fault_proxy.requests("batch", "SubmitJob")
    body = submit.json()
    assert body["jobName"] == f"orch-{job['id']}-1"
    assert body["containerOverrides"] == {
        "command": ["echo", "hi"],
        "environment": [{"name": "K", "value": "v"}],
    }
    assert body["tags"]["orchestrator:job-id"] == job["id"]


async def test_batch_failed_job_is_failed(short_tmp: Path) -> None:
    with MotoServer(env={"MOTO_SIMPLE_BATCH_FAIL_AFTER": "0"}) as server:
        server.configure_batch(use_docker=False)
        env = server.setup_batch()
        settings = make_settings(short_tmp, batch=batch_section(env), jobs={"backend": "batch"})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
            async with running(settings) as daemon, client_of(daemon) as client:
                final = await client.wait(
                    (await client.submit(ONE_ATTEMPT | {"command": ["false"]}))["id"]
                )
    assert final["state"] == "FAILED"


async def test_batch_throttled_submits_are_retried_and_no_job_fails(
    short_tmp: Path, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.throttle("batch", "SubmitJob", times=None, every=3)
    fault_proxy.throttle("batch", "DescribeJobs", times=5)
    settings = make_settings(short_tmp, batch=batch_section(batch_env), jobs={"backend": "batch"})
    async with running(settings) as daemon, client_of(daemon) as client:
        ids = [
            accepted(j)["id"]
            async for j in client.submit_many({"command": ["true"]} for _ in range(12))
        ]
        finals = await asyncio.gather(*(client.wait(i) for i in ids))
    assert [j["state"] for j in finals] == ["SUCCEEDED"] * 12
    assert fault_proxy.forwarded[("batch", "SubmitJob")] == 12  # no duplicate submissions


async def test_batch_logs_come_from_the_job_log_stream(
    batch_daemon: Daemon, moto: MotoServer
) -> None:
    async with client_of(batch_daemon) as client:
        job = await client.submit({"command": ["echo", "hi"]})
        final = await client.wait(job["id"])
        stream = final["info"]["log_stream"]
        with moto.client("logs") as logs:
            logs.create_log_group(logGroupName="/aws/batch/job")
            logs.create_log_stream(logGroupName="/aws/batch/job", logStreamName=stream)
            logs.put_log_events(
                logGroupName="/aws/batch/job",
                logStreamName=stream,
                logEvents=[{"timestamp": _now_ms(), "message": "from batch"}],
            )
        replies = [r async for r in client.logs(job["id"])]
    assert "".join(r.get("data", "") for r in replies) == "from batch\n"
