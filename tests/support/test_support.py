"""The moto server and the fault proxy, proved with real aioboto3 clients over HTTP."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import aioboto3
import boto3
import pytest
import pytest_asyncio
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.support import faultproxy

if TYPE_CHECKING:
    # Imported for real through pytest_plugins below, which has to come first: pytest rewrites
    # asserts only in plugin modules it imports itself (and warns, an error here, otherwise).
    from tests.support.moto import MotoServer

pytest_plugins = ["tests.support.moto"]

REGION = "us-east-1"
CLUSTER = "orchestrator-test"  # what MotoServer.setup_ecs names its cluster
AwsClient = Callable[..., AbstractAsyncContextManager[Any]]

# One cheap call per operation, answered by moto without any set-up beyond an ECS cluster.
CHEAP_CALLS: dict[str, Callable[[Any], Any]] = {
    "DescribeTasks": lambda ecs: ecs.describe_tasks(
        cluster=CLUSTER, tasks=[f"arn:aws:ecs:{REGION}:123456789012:task/{CLUSTER}/{'0' * 32}"]
    ),
    "DescribeJobs": lambda batch: batch.describe_jobs(jobs=[str(uuid.uuid4())]),
    "DescribeLogGroups": lambda logs: logs.describe_log_groups(),
    "DescribeVpcs": lambda ec2: ec2.describe_vpcs(),
    "ListRoles": lambda iam: iam.list_roles(),
}


@pytest.fixture(scope="session")
def aio_session() -> Any:
    """One aioboto3 session for every test: it caches service models (~0.3 s to load each)."""
    return aioboto3.Session(
        region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


@pytest_asyncio.fixture
async def proxy(moto: MotoServer) -> AsyncIterator[faultproxy.FaultProxy]:
    async with faultproxy.FaultProxy(moto.endpoint_url) as running:
        yield running


@pytest.fixture
def aws(aio_session: Any, proxy: faultproxy.FaultProxy) -> AwsClient:
    """``async with aws("ecs", max_attempts=5) as ecs``: a client talking through the proxy, in
    botocore's `standard` retry mode (`max_attempts` counts retries, not attempts)."""

    def client(service: str, max_attempts: int = 5) -> AbstractAsyncContextManager[Any]:
        config = Config(retries={"mode": "standard", "max_attempts": max_attempts})
        manager: AbstractAsyncContextManager[Any] = aio_session.client(
            service, endpoint_url=proxy.endpoint_url, config=config
        )
        return manager

    return client


def create_cluster(moto: MotoServer) -> None:
    with moto.client("ecs") as ecs:
        ecs.create_cluster(clusterName=CLUSTER)


# -- ECS --


@pytest.mark.asyncio
async def test_ecs_run_and_describe(
    aws: AwsClient, moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.record("ecs", "DescribeTasks")
    async with aws("ecs") as ecs:
        started = await ecs.run_task(**env.run_task_kwargs())
        arn = started["tasks"][0]["taskArn"]
        described = await ecs.describe_tasks(cluster=env.cluster, tasks=[arn])

    task = described["tasks"][0]
    assert task["taskArn"] == arn
    assert task["containers"][0]["name"] == env.container_name
    assert env.log_stream(arn) == f"ecs/main/{arn.rpartition('/')[2]}"
    assert proxy.counts[("ecs", "RunTask")] == 1
    assert proxy.counts[("ecs", "DescribeTasks")] == 1
    [request] = proxy.requests("ecs", "DescribeTasks")
    assert request.json()["tasks"] == [arn]


@pytest.mark.asyncio
async def test_task_transitions_are_set_and_undone_by_reset(
    aws: AwsClient, moto: MotoServer
) -> None:
    async def statuses(reads: int) -> list[str]:
        env = moto.setup_ecs()
        async with aws("ecs") as ecs:
            arn = (await ecs.run_task(**env.run_task_kwargs()))["tasks"][0]["taskArn"]
            return [
                (await ecs.describe_tasks(cluster=env.cluster, tasks=[arn]))["tasks"][0][
                    "lastStatus"
                ]
                for _ in range(reads)
            ]

    moto.set_transition("ecs::task", "manual", times=2)
    assert await statuses(3) == ["RUNNING", "DEACTIVATING", "DEACTIVATING"]
    moto.reset()
    assert await statuses(2) == ["DEACTIVATING", "STOPPING"]  # moto's default: a step per read


@pytest.mark.asyncio
async def test_runtask_failures_are_answered_by_the_proxy(
    aws: AwsClient, moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.runtask_failures("RESOURCE:MEMORY", times=1)
    async with aws("ecs") as ecs:
        failed = await ecs.run_task(**env.run_task_kwargs())
        started = await ecs.run_task(**env.run_task_kwargs())

    assert failed["tasks"] == []
    [failure] = failed["failures"]
    assert failure["reason"] == "RESOURCE:MEMORY"
    assert failure["arn"].startswith(f"arn:aws:ecs:{REGION}:123456789012:container-instance/")
    assert len(started["tasks"]) == 1
    assert proxy.counts[("ecs", "RunTask")] == 2
    assert proxy.forwarded[("ecs", "RunTask")] == 1


@pytest.mark.asyncio
async def test_client_token_repeat_returns_the_first_task(
    aws: AwsClient, moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.honour_client_token = True
    kwargs = {**env.run_task_kwargs(), "clientToken": "job-1-attempt-1"}
    async with aws("ecs") as ecs:
        first = await ecs.run_task(**kwargs)
        repeats = await asyncio.gather(*(ecs.run_task(**kwargs) for _ in range(3)))
        listed = await ecs.list_tasks(cluster=env.cluster)

    arn = first["tasks"][0]["taskArn"]
    assert [r["tasks"][0]["taskArn"] for r in repeats] == [arn] * 3
    assert listed["taskArns"] == [arn]
    assert proxy.counts[("ecs", "RunTask")] == 4
    assert proxy.forwarded[("ecs", "RunTask")] == 1


@pytest.mark.asyncio
async def test_concurrent_first_uses_of_a_client_token_start_one_task(
    aws: AwsClient, moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.honour_client_token = True
    kwargs = {**env.run_task_kwargs(), "clientToken": "job-2-attempt-1"}
    async with aws("ecs") as ecs:
        replies = await asyncio.gather(*(ecs.run_task(**kwargs) for _ in range(4)))
    assert len({r["tasks"][0]["taskArn"] for r in replies}) == 1
    assert proxy.forwarded[("ecs", "RunTask")] == 1


@pytest.mark.asyncio
async def test_client_token_reuse_with_other_parameters_conflicts(
    aws: AwsClient, moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.honour_client_token = True
    kwargs = {**env.run_task_kwargs(), "clientToken": "job-1-attempt-1"}
    async with aws("ecs") as ecs:
        first = await ecs.run_task(**kwargs)
        with pytest.raises(ClientError) as caught:
            await ecs.run_task(**kwargs, startedBy="someone-else")
        await ecs.create_cluster(clusterName="other")
        other_cluster = await ecs.run_task(**{**kwargs, "cluster": "other"})

    assert caught.value.response["Error"]["Code"] == "ConflictException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert caught.value.response["resourceIds"] == [first["tasks"][0]["taskArn"]]
    assert other_cluster["tasks"][0]["clusterArn"].endswith("/other")  # tokens are per cluster
    assert proxy.counts[("ecs", "RunTask")] == 3
    assert proxy.forwarded[("ecs", "RunTask")] == 2


# -- throttling and errors, through botocore's real retry logic --


@pytest.mark.asyncio
async def test_throttles_are_retried_then_raised(
    aws: AwsClient, moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    async def check(service: str, operation: str, code: str, status: int) -> None:
        rule = proxy.throttle(service, operation, times=2)
        async with aws(service, max_attempts=5) as client:
            response = await CHEAP_CALLS[operation](client)
        assert response["ResponseMetadata"]["RetryAttempts"] == 2
        assert proxy.counts[(service, operation)] == 3
        assert (rule.seen, rule.fired) == (3, 2)

        proxy.remove_rule(rule)
        proxy.throttle(service, operation, times=None)
        async with aws(service, max_attempts=1) as client:
            with pytest.raises(ClientError) as caught:
                await CHEAP_CALLS[operation](client)
        assert caught.value.response["Error"]["Code"] == code
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
        assert proxy.counts[(service, operation)] == 5  # max_attempts=1 means one retry
        assert proxy.forwarded[(service, operation)] == 1

    create_cluster(moto)
    # Concurrently, so that botocore's back-off sleeps (up to 1 s, then 2 s) overlap.
    await asyncio.gather(
        check("ecs", "DescribeTasks", "ThrottlingException", 400),
        check("batch", "DescribeJobs", "TooManyRequestsException", 429),
    )


@pytest.mark.asyncio
async def test_ec2_side_rate_exceeded_is_not_retried_by_botocore(
    aws: AwsClient, proxy: faultproxy.FaultProxy
) -> None:
    proxy.ecs_rate_exceeded("RunTask", times=1)
    async with aws("ecs") as ecs:
        with pytest.raises(ClientError) as caught:
            await ecs.run_task(cluster=CLUSTER, taskDefinition="never-forwarded")
    assert caught.value.response["Error"]["Code"] == "InvalidParameterException"
    assert "Rate exceeded" in caught.value.response["Error"]["Message"]
    assert proxy.counts[("ecs", "RunTask")] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("service", "operation", "throttle_code"),
    [
        ("ecs", "DescribeTasks", "ThrottlingException"),  # json
        ("logs", "DescribeLogGroups", "ThrottlingException"),  # json
        ("batch", "DescribeJobs", "TooManyRequestsException"),  # rest-json
        ("ec2", "DescribeVpcs", "RequestLimitExceeded"),  # ec2
        ("iam", "ListRoles", "Throttling"),  # query
    ],
)
async def test_errors_arrive_in_each_protocols_shape(
    aws: AwsClient,
    moto: MotoServer,
    proxy: faultproxy.FaultProxy,
    service: str,
    operation: str,
    throttle_code: str,
) -> None:
    create_cluster(moto)
    proxy.error(service, operation, 403, "AccessDeniedException", "not <yours>")
    proxy.http_5xx(service, operation, 503)
    proxy.throttle(service, operation)
    errors = []
    async with aws(service, max_attempts=0) as client:
        for _ in range(3):
            with pytest.raises(ClientError) as caught:
                await CHEAP_CALLS[operation](client)
            errors.append(caught.value.response["Error"])
        await CHEAP_CALLS[operation](client)
    assert [(e["Code"], e["Message"]) for e in errors[:2]] == [
        ("AccessDeniedException", "not <yours>"),
        ("ServiceUnavailable", "Service Unavailable"),
    ]
    assert errors[2]["Code"] == throttle_code
    assert proxy.counts[(service, operation)] == 4
    assert proxy.forwarded[(service, operation)] == 1


@pytest.mark.asyncio
async def test_5xx_is_retried_by_botocore(aws: AwsClient, proxy: faultproxy.FaultProxy) -> None:
    proxy.http_5xx("batch", "DescribeJobs", 502)
    async with aws("batch") as batch:
        response = await CHEAP_CALLS["DescribeJobs"](batch)
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    assert proxy.counts[("batch", "DescribeJobs")] == 2


@pytest.mark.asyncio
async def test_latency_delays_only_the_chosen_operation(
    aws: AwsClient, proxy: faultproxy.FaultProxy
) -> None:
    async def timed_list_clusters(ecs: Any) -> float:
        started = time.monotonic()
        await ecs.list_clusters()
        return time.monotonic() - started

    proxy.latency("ecs", "ListClusters", 0.3)
    async with aws("ecs") as ecs:
        slow_s = await timed_list_clusters(ecs)
        proxy.latency("ecs", "ListClusters", 0)
        fast_s = await timed_list_clusters(ecs)
    assert slow_s >= 0.3 > fast_s


# -- Batch and CloudWatch Logs --


@pytest.mark.asyncio
async def test_batch_jobs_succeed_without_docker(
    aws: AwsClient, moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_batch()
    moto.configure_batch(use_docker=False)
    async with aws("batch") as batch:
        job = await batch.submit_job(
            jobName="job-1-attempt-1", jobQueue=env.job_queue, jobDefinition=env.job_definition
        )
        described = await batch.describe_jobs(jobs=[job["jobId"]])
        listed = await batch.list_jobs(
            jobQueue=env.job_queue, filters=[{"name": "JOB_NAME", "values": ["job-1-attempt-1"]}]
        )
        await batch.terminate_job(jobId=job["jobId"], reason="test")
        await batch.list_tags_for_resource(resourceArn=job["jobArn"])

    assert described["jobs"][0]["status"] == "SUCCEEDED"
    assert [j["jobId"] for j in listed["jobSummaryList"]] == [job["jobId"]]
    operations = ["SubmitJob", "DescribeJobs", "ListJobs", "TerminateJob", "ListTagsForResource"]
    assert {op: proxy.counts[("batch", op)] for op in operations} == dict.fromkeys(operations, 1)


def test_batch_jobs_fail_with_a_server_env() -> None:
    from tests.support.moto import MotoServer  # here, not at the top: see TYPE_CHECKING there

    with MotoServer(env={"MOTO_SIMPLE_BATCH_FAIL_AFTER": "0"}) as server:
        env = server.setup_batch()
        server.configure_batch(use_docker=False)
        with server.client("batch") as batch:
            job = batch.submit_job(
                jobName="doomed", jobQueue=env.job_queue, jobDefinition=env.job_definition
            )
            described = batch.describe_jobs(jobs=[job["jobId"]])
    assert described["jobs"][0]["status"] == "FAILED"


@pytest.mark.asyncio
async def test_logs(aws: AwsClient, proxy: faultproxy.FaultProxy) -> None:
    group, stream = "/ecs/test", "ecs/main/abc"
    async with aws("logs") as logs:
        await logs.create_log_group(logGroupName=group)
        await logs.create_log_stream(logGroupName=group, logStreamName=stream)
        now_ms = int(time.time() * 1000)
        await logs.put_log_events(
            logGroupName=group,
            logStreamName=stream,
            logEvents=[{"timestamp": now_ms + i, "message": f"line {i}"} for i in range(3)],
        )
        events = await logs.get_log_events(
            logGroupName=group, logStreamName=stream, startFromHead=True
        )
    assert [e["message"] for e in events["events"]] == ["line 0", "line 1", "line 2"]
    assert proxy.counts[("logs", "PutLogEvents")] == 1
    assert proxy.counts[("logs", "GetLogEvents")] == 1


# -- the proxy from synchronous code, and rule patterns --


@pytest.mark.usefixtures("proxied_aws_env")
def test_threaded_proxy_serves_sync_clients(fault_proxy: faultproxy.FaultProxy) -> None:
    ecs = boto3.client("ecs", config=Config(retries={"mode": "standard", "max_attempts": 0}))
    try:
        ecs.list_clusters()
        assert fault_proxy.wait_for_count("ecs", "ListClusters", 1, timeout_s=5.0) == 1
        fault_proxy.throttle("ecs", "ListClusters")
        with pytest.raises(ClientError, match="ThrottlingException"):
            ecs.list_clusters()
        ecs.list_clusters()
    finally:
        ecs.close()
    assert fault_proxy.counts[("ecs", "ListClusters")] == 3
    fault_proxy.reset()
    assert fault_proxy.counts == {}
    with pytest.raises(TimeoutError):
        fault_proxy.wait_for_count("ecs", "ListClusters", 1, timeout_s=0.05)


def test_rule_patterns() -> None:
    def unused(request: faultproxy.Request) -> faultproxy.Reply:
        raise AssertionError

    rng = random.Random(0)
    rule = faultproxy.Rule("ecs", "DescribeTasks", unused, times=2, every=2, skip=1)
    assert [rule.decide(rng) for _ in range(7)] == [False, False, True, False, True, False, False]
    assert rule.matches(("ecs", "DescribeTasks"))
    assert not rule.matches(("ecs", "RunTask"))
    assert faultproxy.Rule("ecs", None, unused).matches(("ecs", "RunTask"))
    sometimes = faultproxy.Rule("ecs", None, unused, times=None, probability=0.5)
    assert 30 < sum(sometimes.decide(rng) for _ in range(100)) < 70
