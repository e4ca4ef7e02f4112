"""ECS and Batch logic that needs no AWS: kwargs building, precedence, normalisation and
validation against botocore's model; the failure classifier; the status maps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import botocore.exceptions
import pytest

from orchestrator import errors, models
from orchestrator.backends import aws_api, aws_kwargs
from orchestrator.backends.batch import BatchBackend
from orchestrator.backends.ecs import EcsBackend, classify_failure
from orchestrator.ratelimit import TokenBucket
from orchestrator.settings import BatchSettings, EcsSettings

S = models.JobState


def job(spec: dict[str, Any], attempt: int = 2, backend: str = "ecs") -> models.Job:
    return models.Job(
        id="01jobidjobidjobidjobidjob0",
        spec=models.JobSpec.model_validate(spec),
        backend=backend,
        state=S.QUEUED,
        created_at=0.0,
        updated_at=0.0,
        state_times={},
        attempt=attempt,
        token=f"01jobidjobidjobidjobidjob0-{attempt}",
    )


def ecs_settings(**overrides: Any) -> EcsSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "cluster": "c1",
        "container_name": "main",
        "region_name": "us-east-1",
        "task_definition": "td:3",
        "subnets": "subnet-1,subnet-2",
        "security_groups": ["sg-1"],
        "check_health_on_startup": False,
    }
    return EcsSettings(**{**values, **overrides})


@pytest.fixture
async def make_ecs() -> AsyncIterator[Any]:
    started: list[EcsBackend] = []

    async def make(**overrides: Any) -> EcsBackend:
        backend = EcsBackend(ecs_settings(**overrides), TokenBucket("logs", 10, 10))
        await backend.start()  # loads botocore's model; no request is sent
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.close()


async def test_ecs_kwargs_from_settings_run_task_kwargs_job_and_overrides(make_ecs: Any) -> None:
    backend = await make_ecs(
        run_task_kwargs={
            "propagate_tags": "TASK_DEFINITION",  # snake_case is normalised once
            "overrides": {"containerOverrides": [{"name": "main", "cpu": 256}], "memory": "1024"},
            "tags": [{"key": "team", "value": "data"}],
        }
    )
    kwargs = backend.run_task_kwargs(
        job(
            {
                "command": ["python", "x.py"],
                "env": {"A": "1"},
                "overrides": {
                    "overrides": {"container_overrides": [{"name": "main", "memory": 512}]}
                },
            }
        )
    )
    assert kwargs == {
        "cluster": "c1",
        "taskDefinition": "td:3",
        "count": 1,
        "launchType": "FARGATE",
        "platformVersion": "LATEST",
        "networkConfiguration": {
            "awsvpcConfiguration": {
                "subnets": ["subnet-1", "subnet-2"],
                "securityGroups": ["sg-1"],
                "assignPublicIp": "DISABLED",
            }
        },
        "propagateTags": "TASK_DEFINITION",
        "overrides": {
            "containerOverrides": [
                {
                    "name": "main",
                    "cpu": 256,
                    "command": ["python", "x.py"],
                    "environment": [{"name": "A", "value": "1"}],
                    "memory": 512,
                }
            ],
            "memory": "1024",
        },
        "clientToken": "01jobidjobidjobidjobidjob0-2",
        "startedBy": "01jobidjobidjobidjobidjob0-2",
        "tags": [
            {"key": "team", "value": "data"},
            {"key": "orchestrator:job-id", "value": "01jobidjobidjobidjobidjob0"},
            {"key": "orchestrator:attempt", "value": "2"},
        ],
    }


async def test_ecs_ec2_drops_platform_version_and_capacity_providers_replace_launch_type(
    make_ecs: Any,
) -> None:
    ec2 = (await make_ecs(launch_type="EC2")).run_task_kwargs(job({"command": ["x"]}))
    assert ec2["launchType"] == "EC2"
    assert "platformVersion" not in ec2
    cps = await make_ecs(
        capacity_provider_strategy=[{"capacityProvider": "FARGATE_SPOT", "weight": 1}]
    )
    kwargs = cps.run_task_kwargs(job({"command": ["x"]}))
    assert "launchType" not in kwargs
    assert kwargs["capacityProviderStrategy"] == [{"capacityProvider": "FARGATE_SPOT", "weight": 1}]


async def test_ecs_job_cannot_override_the_idempotency_token(make_ecs: Any) -> None:
    backend = await make_ecs()
    kwargs = backend.run_task_kwargs(
        job({"command": ["x"], "overrides": {"clientToken": "mine", "count": 5}})
    )
    assert (kwargs["clientToken"], kwargs["count"]) == ("01jobidjobidjobidjobidjob0-2", 1)


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (
            {"overrides": {"containerOverrides": [{"name": "main", "cpu": "lots"}]}},
            "overrides.containerOverrides[0].cpu",
        ),
        ({"launchTyp": "FARGATE"}, "launchTyp"),
        ({"overrides": {"bogus": 1}}, "overrides.bogus"),
        ({"launchType": "FARGATE", "launch_type": "EC2"}, "launchType"),
    ],
)
async def test_ecs_invalid_overrides_are_rejected_with_the_path(
    make_ecs: Any, overrides: dict[str, Any], path: str
) -> None:
    backend = await make_ecs()
    with pytest.raises(errors.InvalidJob) as info:
        backend.validate(models.JobSpec(command=["x"], overrides=overrides))
    assert info.value.path == path
    assert path in info.value.message


async def test_ecs_bad_run_task_kwargs_stop_start_up(make_ecs: Any) -> None:
    with pytest.raises(errors.ConfigError, match="placementStrategy"):
        await make_ecs(run_task_kwargs={"placementStrategy": "spread"})


async def test_batch_kwargs_and_deterministic_job_name() -> None:
    settings = BatchSettings(
        enabled=True,
        job_queue="q",
        job_definition="jd:1",
        region_name="us-east-1",
        check_health_on_startup=False,
        submit_job_kwargs={"retry_strategy": {"attempts": 2}, "tags": {"team": "data"}},
    )
    backend = BatchBackend(settings, TokenBucket("logs", 10, 10))
    await backend.start()
    try:
        kwargs = backend.submit_job_kwargs(
            job(
                {
                    "command": ["run"],
                    "env": {"K": "v"},
                    "overrides": {"timeout": {"attemptDurationSeconds": 60}},
                },
                backend="batch",
            )
        )
    finally:
        await backend.close()
    assert kwargs == {
        "jobQueue": "q",
        "jobDefinition": "jd:1",
        "retryStrategy": {"attempts": 2},
        "tags": {
            "team": "data",
            "orchestrator:job-id": "01jobidjobidjobidjobidjob0",
            "orchestrator:attempt": "2",
        },
        "containerOverrides": {"command": ["run"], "environment": [{"name": "K", "value": "v"}]},
        "timeout": {"attemptDurationSeconds": 60},
        "jobName": "orch-01jobidjobidjobidjobidjob0-2",
    }


@pytest.mark.parametrize(
    ("reason", "retryable"),
    [
        ("RESOURCE:MEMORY", True),
        ("RESOURCE:CPU", True),
        ("RESOURCE:ENI", True),
        ("AGENT", True),
        (
            "Capacity is unavailable at this time. Please try again later or in a different "
            "availability zone",
            True,
        ),
        ("LOCATION", True),
        ("ATTRIBUTE", False),
        ("MISSING", False),
    ],
)
def test_run_task_failure_classifier(reason: str, retryable: bool) -> None:
    assert classify_failure(reason) is retryable


def _client_error(status: int, code: str, message: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "RunTask",
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_client_error(400, "ThrottlingException", "Rate exceeded"), errors.AwsThrottled),
        (_client_error(429, "TooManyRequestsException", "Too many"), errors.AwsThrottled),
        (_client_error(400, "InvalidParameterException", "Rate exceeded"), errors.AwsThrottled),
        (
            _client_error(400, "InvalidParameterException", "Task definition bad"),
            errors.AwsRejected,
        ),
        (_client_error(400, "AccessDeniedException", "no"), errors.AwsRejected),
        (_client_error(400, "ClusterNotFoundException", "gone"), errors.AwsRejected),
        (_client_error(500, "ServerException", "oops"), errors.AwsServerFault),
        (_client_error(503, "", ""), errors.AwsServerFault),
        (
            botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),
            errors.AwsUnreachable,
        ),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), errors.AwsUnreachable),
        (botocore.exceptions.NoCredentialsError(), errors.AwsCredentials),
        # The credential and signature errors of AWS's common errors reference: the daemon's
        # trouble, never a job's (issue #13). AccessDeniedException above stays a rejection.
        (
            _client_error(400, "ExpiredTokenException", "The security token expired"),
            errors.AwsCredentials,
        ),
        (_client_error(403, "InvalidClientTokenId", "not valid"), errors.AwsCredentials),
        (_client_error(400, "UnrecognizedClientException", "invalid token"), errors.AwsCredentials),
        (_client_error(400, "RequestExpired", "expired"), errors.AwsCredentials),
        (
            _client_error(400, "InvalidSignatureException", "Signature expired: is now earlier"),
            errors.AwsCredentials,
        ),
    ],
)
def test_error_mapping(exc: Exception, kind: type[errors.AwsError]) -> None:
    mapped = aws_api.map_error(exc, "ecs", "RunTask")
    assert type(mapped) is kind
    assert (mapped.service, mapped.operation) == ("ecs", "RunTask")


def test_ecs_status_map() -> None:
    backend = EcsBackend(ecs_settings(), TokenBucket("logs", 10, 10))

    def observe(status: str, exit_code: int | None = None, **extra: Any) -> tuple[Any, ...]:
        task = {
            "taskArn": "arn",
            "lastStatus": status,
            "containers": [
                {"name": "main", "exitCode": exit_code},
                {"name": "sidecar", "exitCode": 1},
            ],
            **extra,
        }
        obs = backend._observe(task)
        return obs.state, obs.exit_code, obs.reason

    assert observe("PROVISIONING")[0] == S.RUNNABLE
    assert observe("PENDING")[0] == S.STARTING
    assert observe("ACTIVATING")[0] == S.STARTING
    assert observe("RUNNING")[0] == S.RUNNING
    assert observe("DEPROVISIONING")[0] == S.RUNNING
    assert observe("STOPPED", 0, stopCode="EssentialContainerExited") == (S.SUCCEEDED, 0, None)
    assert observe("STOPPED", 2, stopCode="EssentialContainerExited") == (
        S.FAILED,
        2,
        "exit code 2 (EssentialContainerExited)",
    )
    assert observe(
        "STOPPED", None, stopCode="TaskFailedToStart", stoppedReason="CannotPullContainerError"
    ) == (
        S.FAILED,
        None,
        "TaskFailedToStart: CannotPullContainerError",
    )


def test_batch_status_map() -> None:
    backend = BatchBackend(
        BatchSettings(enabled=True, job_queue="q", job_definition="d", region_name="r"),
        TokenBucket("logs", 10, 10),
    )
    for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING"):
        assert backend._observe({"jobId": "j", "status": status}).state == S(status)
    done = backend._observe(
        {
            "jobId": "j",
            "jobName": "orch-j-1",
            "jobQueue": "arn:aws:batch:r:1:job-queue/q",
            "status": "SUCCEEDED",
            "container": {"exitCode": 0, "logStreamName": "d/default/x"},
        }
    )
    assert (done.state, done.exit_code, done.info["log_stream"]) == (S.SUCCEEDED, 0, "d/default/x")
    assert (done.info["job_name"], done.info["job_queue"]) == (
        "orch-j-1",
        "arn:aws:batch:r:1:job-queue/q",
    )
    failed = backend._observe(
        {
            "jobId": "j",
            "status": "FAILED",
            "statusReason": "Essential container in task exited",
            "container": {"exitCode": 3},
        }
    )
    assert (failed.state, failed.exit_code, failed.reason) == (
        S.FAILED,
        3,
        "exit code 3 (Essential container in task exited)",
    )
    array = backend._observe(
        {
            "jobId": "j",
            "status": "RUNNING",
            "arrayProperties": {"statusSummary": {"RUNNING": 2, "SUCCEEDED": 1}, "size": 3},
        }
    )
    assert array.info["array_status"] == {"RUNNING": 2, "SUCCEEDED": 1}
    assert array.state == S.RUNNING
    # Every child has ended, one failed, and Batch still says PENDING (it flips a little
    # later): the array has failed, its children's way, and the poll goes on for the others.
    lagging = backend._observe(
        {
            "jobId": "p",
            "status": "PENDING",
            "container": {},
            "arrayProperties": {"size": 3, "statusSummary": {"SUCCEEDED": 2, "FAILED": 1}},
        }
    )
    assert (lagging.state, lagging.failure, lagging.reason) == (
        S.FAILED,
        "user",
        "1 of 3 child jobs failed",
    )
    flipped = backend._observe(
        {
            "jobId": "p",
            "status": "FAILED",
            "statusReason": "Array Child Job failed",
            "arrayProperties": {"size": 3, "statusSummary": {"SUCCEEDED": 2, "FAILED": 1}},
        }
    )
    assert (flipped.failure, flipped.reason) == (
        "user",
        "1 of 3 child jobs failed (Array Child Job failed)",
    )
    done = backend._observe(
        {
            "jobId": "p",
            "status": "PENDING",
            "arrayProperties": {"size": 3, "statusSummary": {"SUCCEEDED": 3}},
        }
    )
    assert (done.state, done.failure, done.reason) == (S.SUCCEEDED, None, None)


def test_merge_kwargs_merges_named_lists_by_name_and_replaces_others() -> None:
    base = {
        "a": {"b": 1, "c": [1, 2]},
        "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
    }
    over = {"a": {"c": [3]}, "env": [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}]}
    assert aws_kwargs.merge_kwargs(base, over) == {
        "a": {"b": 1, "c": [3]},
        "env": [
            {"name": "X", "value": "1"},
            {"name": "Y", "value": "3"},
            {"name": "Z", "value": "4"},
        ],
    }


def test_batch_says_when_it_retries_a_job_itself() -> None:
    """DescribeJobs' `retryStrategy` is the job's own or its definition's: above one attempt,
    Batch retries the job and the daemon must not (`info.vendor_attempts`)."""
    backend = BatchBackend(
        BatchSettings(enabled=True, job_queue="q", job_definition="d", region_name="r"),
        TokenBucket("logs", 10, 10),
    )
    detail = {"jobId": "j", "status": "FAILED", "statusReason": "Essential container exited"}
    for strategy, expected in [
        (
            {"attempts": 3, "evaluateOnExit": [{"onStatusReason": "Host EC2*", "action": "RETRY"}]},
            3,
        ),
        ({"attempts": 1}, None),
        (None, None),
    ]:
        observed = backend._observe({**detail, "retryStrategy": strategy} if strategy else detail)
        assert observed.info.get("vendor_attempts") == expected, strategy
