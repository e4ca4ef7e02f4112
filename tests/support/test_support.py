"""The moto server and fault proxy, proved with real aioboto3 clients over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aioboto3  # type: ignore[import-untyped, unused-ignore]
import boto3  # type: ignore[import-untyped, unused-ignore]
import pytest
import pytest_asyncio
from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
from botocore.exceptions import ClientError  # type: ignore[import-untyped, unused-ignore]

from tests.support import faultproxy

if TYPE_CHECKING:
    # Imported for real by pytest_plugins below, which must come first: pytest rewrites
    # asserts only in plugin modules it imports itself.
    from tests.support.moto import MotoServer

pytest_plugins = ["tests.support.moto"]

REGION = "us-east-1"
FAKE_TASK_ARN = f"arn:aws:ecs:{REGION}:123456789012:task/orchestrator-test/{'0' * 32}"
_CHEAP_CALLS: dict[str, Any] = {
    "DescribeTasks": lambda c: c.describe_tasks(cluster="orchestrator-test", tasks=[FAKE_TASK_ARN]),
    "DescribeJobs": lambda c: c.describe_jobs(jobs=[str(uuid.uuid4())]),
    "DescribeLogGroups": lambda c: c.describe_log_groups(),
    "DescribeVpcs": lambda c: c.describe_vpcs(),
    "ListRoles": lambda c: c.list_roles(),
}


@pytest.fixture(scope="session")
def session() -> Any:
    """One aioboto3 session for all tests: it caches the service models (~0.3 s each)."""
    return aioboto3.Session(
        region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


@contextlib.asynccontextmanager
async def aws(
    session: Any, service: str, endpoint_url: str, max_attempts: int = 5
) -> AsyncIterator[Any]:
    """A client in botocore's `standard` retry mode; `max_attempts` counts retries."""
    config = Config(retries={"mode": "standard", "max_attempts": max_attempts})
    async with session.client(service, endpoint_url=endpoint_url, config=config) as client:
        yield client


@pytest_asyncio.fixture
async def proxy(moto: MotoServer) -> AsyncIterator[faultproxy.FaultProxy]:
    async with faultproxy.FaultProxy(moto.endpoint_url) as running:
        yield running


# -- ECS --


@pytest.mark.asyncio
async def test_ecs_run_and_describe_through_the_proxy(
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.record("ecs", "DescribeTasks")
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
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
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    moto.set_transition("ecs::task", "manual", times=2)
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
        arn = (await ecs.run_task(**env.run_task_kwargs()))["tasks"][0]["taskArn"]
        statuses = [
            (await ecs.describe_tasks(cluster=env.cluster, tasks=[arn]))["tasks"][0]["lastStatus"]
            for _ in range(2)
        ]
    assert statuses == ["RUNNING", "DEACTIVATING"]  # one step per two reads

    moto.reset()
    env = moto.setup_ecs()
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
        arn = (await ecs.run_task(**env.run_task_kwargs()))["tasks"][0]["taskArn"]
        described = await ecs.describe_tasks(cluster=env.cluster, tasks=[arn])
    assert described["tasks"][0]["lastStatus"] == "DEACTIVATING"  # moto's default: every read


@pytest.mark.asyncio
async def test_runtask_failures_are_answered_without_moto(
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.runtask_failures("RESOURCE:MEMORY", times=1)
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
        failed = await ecs.run_task(**env.run_task_kwargs())
        started = await ecs.run_task(**env.run_task_kwargs())

    assert failed["tasks"] == []
    assert [f["reason"] for f in failed["failures"]] == ["RESOURCE:MEMORY"]
    assert failed["failures"][0]["arn"].startswith("arn:aws:ecs:us-east-1:123456789012:container-")
    assert len(started["tasks"]) == 1
    assert proxy.counts[("ecs", "RunTask")] == 2
    assert proxy.forwarded[("ecs", "RunTask")] == 1


@pytest.mark.asyncio
async def test_client_token_repeat_returns_the_first_task(
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.honour_client_token = True
    kwargs = {**env.run_task_kwargs(), "clientToken": "job-1-attempt-1"}
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
        first = await ecs.run_task(**kwargs)
        again = await asyncio.gather(*(ecs.run_task(**kwargs) for _ in range(3)))
        listed = await ecs.list_tasks(cluster=env.cluster)

    arn = first["tasks"][0]["taskArn"]
    assert [r["tasks"][0]["taskArn"] for r in again] == [arn] * 3
    assert listed["taskArns"] == [arn]
    assert proxy.counts[("ecs", "RunTask")] == 4
    assert proxy.forwarded[("ecs", "RunTask")] == 1


@pytest.mark.asyncio
async def test_client_token_reuse_with_other_parameters_conflicts(
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.honour_client_token = True
    kwargs = {**env.run_task_kwargs(), "clientToken": "job-1-attempt-1"}
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
        first = await ecs.run_task(**kwargs)
        with pytest.raises(ClientError) as caught:
            await ecs.run_task(**kwargs, startedBy="someone-else")
        await ecs.create_cluster(clusterName="other")
        other_cluster = await ecs.run_task(**{**kwargs, "cluster": "other"})

    assert caught.value.response["Error"]["Code"] == "ConflictException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert caught.value.response["resourceIds"] == [first["tasks"][0]["taskArn"]]
    assert other_cluster["tasks"][0]["clusterArn"].endswith("/other")  # tokens are per cluster
    assert proxy.forwarded[("ecs", "RunTask")] == 2
    assert proxy.counts[("ecs", "RunTask")] == 3


# -- throttling and errors, through botocore's real retry logic --


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("service", "operation", "code", "status"),
    [
        ("ecs", "DescribeTasks", "ThrottlingException", 400),
        ("batch", "DescribeJobs", "TooManyRequestsException", 429),
        ("logs", "DescribeLogGroups", "ThrottlingException", 400),
    ],
)
async def test_throttles_are_retried_then_raised(
    moto: MotoServer,
    proxy: faultproxy.FaultProxy,
    service: str,
    operation: str,
    code: str,
    status: int,
) -> None:
    moto.setup_ecs()
    call = _CHEAP_CALLS[operation]
    rule = proxy.throttle(service, operation, times=2)
    async with aws(session, service, proxy.endpoint_url, max_attempts=5) as client:
        response = await call(client)
    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    assert proxy.counts[(service, operation)] == 3
    assert (rule.seen, rule.fired) == (3, 2)

    proxy.reset()
    proxy.throttle(service, operation, times=None)
    async with aws(session, service, proxy.endpoint_url, max_attempts=1) as client:
        with pytest.raises(ClientError) as caught:
            await call(client)
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert proxy.counts[(service, operation)] == 2  # max_attempts=1 is one retry
    assert proxy.forwarded[(service, operation)] == 0


@pytest.mark.asyncio
async def test_ec2_side_rate_exceeded_is_not_retried_by_botocore(
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_ecs()
    proxy.ecs_rate_exceeded("RunTask", times=1)
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
        with pytest.raises(ClientError) as caught:
            await ecs.run_task(**env.run_task_kwargs())
    assert caught.value.response["Error"]["Code"] == "InvalidParameterException"
    assert "Rate exceeded" in caught.value.response["Error"]["Message"]
    assert proxy.counts[("ecs", "RunTask")] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("service", "operation"),
    [
        ("ecs", "DescribeTasks"),  # json
        ("batch", "DescribeJobs"),  # rest-json
        ("ec2", "DescribeVpcs"),  # ec2
        ("iam", "ListRoles"),  # query
    ],
)
async def test_errors_arrive_in_each_protocols_shape(
    moto: MotoServer, proxy: faultproxy.FaultProxy, service: str, operation: str
) -> None:
    moto.setup_ecs()
    proxy.error(service, operation, 403, "AccessDeniedException", "not <yours>", times=1)
    proxy.http_5xx(service, operation, 503, times=1)
    async with aws(session, service, proxy.endpoint_url, max_attempts=0) as client:
        with pytest.raises(ClientError) as denied:
            await _CHEAP_CALLS[operation](client)
        with pytest.raises(ClientError) as unavailable:
            await _CHEAP_CALLS[operation](client)
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    assert denied.value.response["Error"]["Message"] == "not <yours>"
    assert unavailable.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503

    proxy.http_5xx(service, operation, 502, times=1)
    async with aws(session, service, proxy.endpoint_url, max_attempts=5) as client:
        response = await _CHEAP_CALLS[operation](client)
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    assert proxy.counts[(service, operation)] == 4


@pytest.mark.asyncio
async def test_latency_delays_only_the_chosen_operation(
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    proxy.latency("ecs", "ListClusters", 0.3)
    async with aws(session, "ecs", proxy.endpoint_url) as ecs:
        started = time.monotonic()
        await ecs.list_clusters()
        slow_s = time.monotonic() - started
        proxy.latency("ecs", "ListClusters", 0)
        started = time.monotonic()
        await ecs.list_clusters()
        fast_s = time.monotonic() - started
    assert slow_s >= 0.3 > fast_s


# -- Batch and CloudWatch Logs --


@pytest.mark.asyncio
async def test_batch_jobs_succeed_without_docker(
    moto: MotoServer, proxy: faultproxy.FaultProxy
) -> None:
    env = moto.setup_batch()
    moto.configure_batch(use_docker=False)
    async with aws(session, "batch", proxy.endpoint_url) as batch:
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
    from tests.support.moto import MotoServer  # noqa: PLC0415 - see the import at the top

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
async def test_logs_through_the_proxy(moto: MotoServer, proxy: faultproxy.FaultProxy) -> None:
    async with aws(session, "logs", proxy.endpoint_url) as logs:
        await logs.create_log_group(logGroupName="/ecs/test")
        await logs.create_log_stream(logGroupName="/ecs/test", logStreamName="ecs/main/abc")
        now_ms = int(time.time() * 1000)
        await logs.put_log_events(
            logGroupName="/ecs/test",
            logStreamName="ecs/main/abc",
            logEvents=[{"timestamp": now_ms + i, "message": f"line {i}"} for i in range(3)],
        )
        events = await logs.get_log_events(
            logGroupName="/ecs/test", logStreamName="ecs/main/abc", startFromHead=True
        )
    assert [e["message"] for e in events["events"]] == ["line 0", "line 1", "line 2"]
    assert proxy.counts[("logs", "GetLogEvents")] == 1
    assert proxy.counts[("logs", "PutLogEvents")] == 1


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
    def never(request: faultproxy.Request) -> faultproxy.Reply:
        raise AssertionError

    rule = faultproxy.Rule("ecs", "DescribeTasks", never, times=2, every=2, skip=1)
    rng = random.Random(0)
    assert [rule.decide(rng) for _ in range(7)] == [False, False, True, False, True, False, False]
    assert rule.matches(("ecs", "DescribeTasks"))
    assert not rule.matches(("ecs", "RunTask"))
    assert faultproxy.Rule("ecs", None, never).matches(("ecs", "RunTask"))
    sometimes = faultproxy.Rule("ecs", None, never, times=None, probability=0.5)
    assert 30 < sum(sometimes.decide(rng) for _ in range(100)) < 70

