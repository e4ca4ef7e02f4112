"""`orchestrator.failures`: the taxonomy table against reply shapes from the AWS references.

Every string below is quoted from the page named in the comment above it. Where a string is not
on an AWS page but only observed in public code, the comment says so. Shapes (field names) come
from the API references: ECS `Task`, `Container` and `Failure`
(https://docs.aws.amazon.com/AmazonECS/latest/APIReference/API_Task.html,
.../API_Container.html, .../API_Failure.html) and Batch `JobDetail`, `AttemptDetail`,
`AttemptContainerDetail`, `ContainerDetail`
(https://docs.aws.amazon.com/batch/latest/APIReference/API_JobDetail.html, ...), as botocore's
service models carry them.
"""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from typing import Any, get_args

import pytest

from orchestrator import failures, models, settings
from orchestrator.failures import Classified

NAME = "job"
STARTED = datetime(2024, 1, 1, tzinfo=UTC)


def task(
    stop_code: str | None,
    stopped_reason: str | None = None,
    exit_code: int | None = None,
    container_reason: str | None = None,
    *,
    started: bool = True,
    sidecar_exit: int | None = None,
) -> dict[str, Any]:
    """A STOPPED DescribeTasks `tasks[]` element with our container (and maybe a sidecar)."""
    ours: dict[str, Any] = {"name": NAME, "lastStatus": "STOPPED"}
    if exit_code is not None:
        ours["exitCode"] = exit_code
    if container_reason is not None:
        ours["reason"] = container_reason
    containers = [ours]
    if sidecar_exit is not None:
        containers.append({"name": "sidecar", "lastStatus": "STOPPED", "exitCode": sidecar_exit})
    reply: dict[str, Any] = {
        "taskArn": "arn:aws:ecs:us-east-1:111122223333:task/default/0123456789abcdef",
        "lastStatus": "STOPPED",
        "desiredStatus": "STOPPED",
        "containers": containers,
    }
    if stop_code is not None:
        reply["stopCode"] = stop_code
    if stopped_reason is not None:
        reply["stoppedReason"] = stopped_reason
    if started:
        reply["startedAt"] = STARTED
    return reply


def job(
    status: str,
    status_reason: str | None = None,
    *attempts: dict[str, Any],
    container: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A DescribeJobs `jobs[]` element."""
    reply: dict[str, Any] = {
        "jobId": "24fa2d7a-64c4-49d2-8b47-f8da4fbde8e9",
        "jobName": "example",
        "status": status,
        "attempts": list(attempts),
        "container": container or {},
    }
    if status_reason is not None:
        reply["statusReason"] = status_reason
    return reply


def attempt(
    status_reason: str | None, exit_code: int | None = None, reason: str | None = None
) -> dict[str, Any]:
    """A Batch `AttemptDetail` that started."""
    container: dict[str, Any] = {}
    if exit_code is not None:
        container["exitCode"] = exit_code
    if reason is not None:
        container["reason"] = reason
    detail: dict[str, Any] = {"container": container, "startedAt": 1480460816500}
    if status_reason is not None:
        detail["statusReason"] = status_reason
    return detail


def cls(result: Classified | None) -> str | None:
    return None if result is None else result.failure


# -- The table itself -------------------------------------------------------------------------


def test_every_table_entry_names_a_known_class() -> None:
    known = set(get_args(failures.FailureClass))
    assert set(failures.FAILURE_CLASSES) == known
    for table in (
        failures.STOP_CODES,
        failures.REASONS,
        failures.RUN_TASK_FAILURES,
        failures.AWS_ERRORS,
        failures.AWS_MESSAGES,
    ):
        assert set(table.values()) <= known


def test_only_start_and_infrastructure_are_retried_by_default() -> None:
    assert settings.RetrySettings().on == ["start", "infrastructure"]
    assert settings.RetrySettings().exit_codes == []  # `user`: only for listed exit codes
    # Every class is retryable by class, by exit code (user) or never: one of the three.
    by_class, never = set(models.RETRIED_CLASSES), set(models.NEVER_RETRIED)
    assert (by_class | never | {"user"}, len(by_class) + len(never) + 1) == (
        set(failures.FAILURE_CLASSES),
        len(failures.FAILURE_CLASSES),
    )


def test_every_documented_stop_code_is_mapped_or_left_to_the_exit_code() -> None:
    # The TaskStopCode enum of the ECS API reference (botocore's ecs service model, 1.40):
    # TaskFailedToStart | EssentialContainerExited | UserInitiated | ServiceSchedulerInitiated |
    # SpotInterruption | TerminationNotice. EssentialContainerExited: the exit code decides.
    documented = {
        "TaskFailedToStart",
        "UserInitiated",
        "ServiceSchedulerInitiated",
        "SpotInterruption",
        "TerminationNotice",
    }
    assert documented <= set(failures.STOP_CODES)
    assert "EssentialContainerExited" not in failures.STOP_CODES


# -- ECS: a stopped task -----------------------------------------------------------------------

# "Essential container in task exited": the stopped reason of an essential container's exit.
# Amazon ECS Developer Guide, "Checking stopped tasks for errors"
# https://docs.aws.amazon.com/AmazonECS/latest/developerguide/stopped-task-errors.html
# (github.com/awsdocs/amazon-ecs-developer-guide, doc_source/stopped-task-errors.md, 2022)
ESSENTIAL = "Essential container in task exited"


def test_essential_container_exit_0_is_success() -> None:
    assert failures.ecs_task(task("EssentialContainerExited", ESSENTIAL, 0), NAME) is None


def test_essential_container_nonzero_exit_is_user() -> None:
    result = failures.ecs_task(task("EssentialContainerExited", ESSENTIAL, 1), NAME)
    assert result == Classified("user", f"EssentialContainerExited: {ESSENTIAL}; exit code 1")


def test_our_container_decides_not_a_sidecar() -> None:
    reply = task("EssentialContainerExited", ESSENTIAL, 0, sidecar_exit=1)
    assert failures.ecs_task(reply, NAME) is None
    reply = task("EssentialContainerExited", ESSENTIAL, 2, sidecar_exit=0)
    assert cls(failures.ecs_task(reply, NAME)) == "user"


@pytest.mark.parametrize(
    "stopped_reason",
    [
        # Amazon ECS Developer Guide, "CannotPullContainer task errors"
        # https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task_cannot_pull_image.html
        "CannotPullContainerError: API error (500): Get https://111122223333.dkr.ecr.us-east-1"
        ".amazonaws.com/v2/: net/http: request canceled while waiting for connection",
        "CannotPullContainerError: API error (404): repository "
        "111122223333.dkr.ecr.us-east-1.amazonaws.com/<repo>/<image> not found",
        "CannotPullContainerError: write /var/lib/docker/tmp/GetImageBlob111111111: "
        "no space left on device",
        # Amazon ECS User Guide for Fargate, "Stopped tasks error codes"
        # https://docs.aws.amazon.com/AmazonECS/latest/userguide/stopped-task-error-codes.html
        "ResourceInitializationError: failed to initialize logging driver: <reason>",
        "ContainerRuntimeTimeoutError: Could not transition to running; timed out after "
        "waiting 1m: <reason>",
        "CannotStartContainerError: failed to get container status: <reason>",
        # AWS re:Post Knowledge Center, "How do I troubleshoot the "unable to pull secrets or
        # registry auth" error in Amazon ECS?"
        # https://repost.aws/knowledge-center/ecs-unable-to-pull-secrets
        "ResourceInitializationError: unable to pull secrets or registry auth: pull command "
        "failed: : signal: killed",
        "ResourceInitializationError: unable to pull secrets or registry auth: execution "
        "resource retrieval failed: unable to retrieve secret from asm: service call has been "
        "retried",
        # Amazon ECS Developer Guide, "Amazon ECS task definitions for video transcoding
        # workloads" (ecs-vt1): the stoppedReason of a task whose device is missing
        # https://docs.aws.amazon.com/AmazonECS/latest/developerguide/ecs-vt1.html
        "CannotStartContainerError: Error response from daemon: error gathering device "
        'information while adding custom device "/dev/dri/renderD130": no such file or '
        "directory",
        # Amazon ECS Developer Guide, "Amazon ECS API failure reasons": DescribeTasks
        # "TaskFailedToStart: RESOURCE:*", "TaskFailedToStart: AGENT"
        # https://docs.aws.amazon.com/AmazonECS/latest/developerguide/api_failures_messages.html
        "TaskFailedToStart: RESOURCE:MEMORY",
        "TaskFailedToStart: AGENT",
        # NOT on an AWS page: observed, and tested by Airflow's ECS executor
        # (apache/airflow, providers/amazon tests of EcsExecutorTask) and Dagster's ECS launcher.
        "Timeout waiting for network interface provisioning to complete.",
    ],
)
def test_task_failed_to_start_without_exit_code_is_start(stopped_reason: str) -> None:
    result = failures.ecs_task(task("TaskFailedToStart", stopped_reason, started=False), NAME)
    assert result == Classified("start", f"TaskFailedToStart: {stopped_reason}")


def test_task_failed_to_start_is_start_whatever_its_reason_says() -> None:
    reply = task("TaskFailedToStart", "SomeError: the application failed", started=False)
    assert cls(failures.ecs_task(reply, NAME)) == "start"
    # The reason alone (no stop code) also says it never ran.
    reply = task(None, "CannotPullContainerError: API error", started=False)
    assert cls(failures.ecs_task(reply, NAME)) == "start"


def test_a_start_reason_with_an_exit_code_ran_and_the_exit_code_decides() -> None:
    reply = task("TaskFailedToStart", "CannotStartContainerError: <reason>", 1)
    assert cls(failures.ecs_task(reply, NAME)) == "user"


# Amazon ECS Developer Guide, "Amazon ECS clusters for Fargate" / Fargate capacity providers:
# the task state change event of a Fargate Spot interruption.
# https://docs.aws.amazon.com/AmazonECS/latest/developerguide/fargate-capacity-providers.html
# The stop code is "SpotInterruption" on the current page and was "TerminationNotice" on the
# 2023 archive (github.com/awsdocs/amazon-ecs-developer-guide,
# doc_source/fargate-capacity-providers.md): both are mapped.
SPOT = "Your Spot Task was interrupted."


@pytest.mark.parametrize("stop_code", ["SpotInterruption", "TerminationNotice"])
@pytest.mark.parametrize("exit_code", [None, 0, 137, 143])
def test_spot_interruption_is_infrastructure_whatever_the_exit_code(
    stop_code: str, exit_code: int | None
) -> None:
    result = failures.ecs_task(task(stop_code, SPOT, exit_code), NAME)
    assert cls(result) == "infrastructure"
    assert result is not None
    assert result.reason.startswith(f"{stop_code}: {SPOT}")


@pytest.mark.parametrize(
    "stopped_reason",
    [
        # Amazon ECS Developer Guide, "Checking stopped tasks for errors" (classic console):
        # "Host EC2 (instance id) stopped/terminated" (the page's own pattern), "Container
        # instance deregistration forced by user" https://docs.aws.amazon.com/AmazonECS/latest/
        # developerguide/stopped-task-errors.html (doc_source/stopped-task-errors.md, 2022)
        "Host EC2 (instance i-0123456789abcdef0) stopped/terminated",
        "Container instance deregistration forced by user",
        # The pattern filled in: NOT verbatim on an AWS page; Airflow's EcsRunTaskOperator
        # tests and incident notes quote it.
        "Host EC2 (instance i-0123456789abcdef0) terminated.",
    ],
)
@pytest.mark.parametrize("exit_code", [None, 143])
def test_host_gone_is_infrastructure(stopped_reason: str, exit_code: int | None) -> None:
    reply = task("EssentialContainerExited", stopped_reason, exit_code)
    assert cls(failures.ecs_task(reply, NAME)) == "infrastructure"


# AWS re:Post Knowledge Center, "How do I troubleshoot OutOfMemory errors in Amazon ECS?"
# https://repost.aws/knowledge-center/ecs-resolve-outofmemory-errors
OOM = "OutOfMemoryError: Container killed due to memory usage"


def test_oom_kill_with_exit_137_is_infrastructure() -> None:
    reply = task("EssentialContainerExited", ESSENTIAL, 137, OOM)
    assert failures.ecs_task(reply, NAME) == Classified(
        "infrastructure", f"EssentialContainerExited: {ESSENTIAL}; {OOM}; exit code 137"
    )


def test_exit_137_without_the_oom_reason_is_user() -> None:
    reply = task("EssentialContainerExited", ESSENTIAL, 137)
    assert cls(failures.ecs_task(reply, NAME)) == "user"


def test_service_scheduler_stop_is_infrastructure() -> None:
    # TaskStopCode ServiceSchedulerInitiated (ECS API reference, `Task.stopCode`): never ours
    # (the daemon runs standalone tasks), so the platform ended it. The reason is NOT on an AWS
    # page: it is the one a public test suite pairs with this stop code.
    maintenance = "ECS is performing maintenance on the underlying infrastructure hosting the task"
    reply = task("ServiceSchedulerInitiated", maintenance, 143)
    assert cls(failures.ecs_task(reply, NAME)) == "infrastructure"


def test_user_initiated_stop_is_cancelled_even_with_exit_0() -> None:
    assert cls(failures.ecs_task(task("UserInitiated", None, 0), NAME)) == "cancelled"
    # The daemon's own StopTask reason, whatever the stop code says.
    reply = task("EssentialContainerExited", "orchestrator: cancelled", 143)
    assert cls(failures.ecs_task(reply, NAME)) == "cancelled"


def test_no_exit_code_and_no_known_reason() -> None:
    reply = task("EssentialContainerExited", ESSENTIAL, started=False)
    assert cls(failures.ecs_task(reply, NAME)) == "start"
    reply = task("EssentialContainerExited", ESSENTIAL, started=True)
    assert cls(failures.ecs_task(reply, NAME)) == "infrastructure"


def test_unknown_stop_code_leaves_it_to_the_exit_code() -> None:
    assert failures.ecs_task(task("SomethingNew", None, 0), NAME) is None
    assert cls(failures.ecs_task(task("SomethingNew", None, 3), NAME)) == "user"


@pytest.mark.parametrize("status", ["PROVISIONING", "PENDING", "RUNNING", "DEPROVISIONING"])
def test_a_task_not_stopped_is_refused(status: str) -> None:
    reply = task(None) | {"lastStatus": status}
    with pytest.raises(ValueError, match="not STOPPED"):
        failures.ecs_task(reply, NAME)


# -- ECS: a RunTask failures[] entry -----------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    [
        # Amazon ECS Developer Guide, "API failure reasons" (RunTask or StartTask)
        # https://docs.aws.amazon.com/AmazonECS/latest/developerguide/api_failures_messages.html
        # (github.com/awsdocs/amazon-ecs-developer-guide, doc_source/api_failures_messages.md)
        "RESOURCE:CPU",
        "RESOURCE:MEMORY",
        "RESOURCE:ENI",
        "RESOURCE:GPU",
        "AGENT",
        "LOCATION",
        "ATTRIBUTE",
        # AWS re:Post Knowledge Center, "How do I resolve capacity unavailable errors when I
        # run Fargate tasks with the RunTask API?"
        # https://repost.aws/knowledge-center/ecs-fargate-runtask-capacity
        "Capacity is unavailable at this time. Please try again later or in a different "
        "availability zone",
        # Amazon ECS Developer Guide, "Amazon ECS service event messages" (as a placement
        # Reason; seen in RunTask failures[] by public code, not on an AWS page as such)
        # https://docs.aws.amazon.com/AmazonECS/latest/developerguide/service-event-messages.html
        "You've reached the limit on the number of tasks you can run concurrently",
        "Something AWS adds later",
    ],
)
def test_run_task_failure_is_start(reason: str) -> None:
    arn = "arn:aws:ecs:us-east-1:111122223333:container-instance/default/abc"
    result = failures.ecs_run_task_failure({"arn": arn, "reason": reason})
    assert result == Classified("start", f"RunTask failure: {reason} on {arn}")


def test_run_task_failure_keeps_its_detail() -> None:
    result = failures.ecs_run_task_failure({"reason": "RESOURCE:MEMORY", "detail": "d"})
    assert result == Classified("start", "RunTask failure: RESOURCE:MEMORY (d)")


# -- AWS refused the request -------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        # The "Errors" of the ECS RunTask API reference (botocore's ecs model, 1.40)
        # https://docs.aws.amazon.com/AmazonECS/latest/APIReference/API_RunTask.html
        "ClientException",
        "InvalidParameterException",
        "AccessDeniedException",
        "ClusterNotFoundException",
        "PlatformUnknownException",
        "PlatformTaskDefinitionIncompatibilityException",
        "UnsupportedFeatureException",
        "BlockedException",
        "ConflictException",
        # Not listed: refused all the same.
        "ValidationException",
    ],
)
def test_refused_requests_are_rejected_with_the_message(code: str) -> None:
    assert failures.aws_rejection(code, "the message") == Classified(
        "rejected", f"{code}: the message"
    )


def test_batch_submit_job_client_exception_is_rejected() -> None:
    # The "Errors" of the Batch SubmitJob API reference: ClientException, ServerException.
    # https://docs.aws.amazon.com/batch/latest/APIReference/API_SubmitJob.html
    assert cls(failures.aws_rejection("ClientException", "")) == "rejected"


def test_provisioning_quota_client_exception_is_start() -> None:
    # ECS RunTask API reference: "If you get a ClientException error, the RunTask could not be
    # processed because you use managed scaling and there is a capacity error because the quota
    # of tasks in the PROVISIONING per cluster has been reached." The message itself is NOT on
    # an AWS page: it is the one public code matches.
    result = failures.aws_rejection(
        "ClientException", "Tasks provisioning capacity limit exceeded."
    )
    assert cls(result) == "start"


# -- Batch -------------------------------------------------------------------------------------


def test_batch_succeeded_is_success() -> None:
    # The DescribeJobs example of the Batch API reference (botocore's batch examples-1.json).
    assert failures.batch_job(job("SUCCEEDED", None, container={"exitCode": 0})) is None


def test_batch_nonzero_exit_is_user() -> None:
    reply = job("FAILED", ESSENTIAL, attempt(ESSENTIAL, 1))
    assert failures.batch_job(reply) == Classified("user", f"{ESSENTIAL}; exit code 1")


# "Host EC2*" as the StatusReason to retry on: AWS Batch User Guide, "Best practices" (Spot)
# https://docs.aws.amazon.com/batch/latest/userguide/best-practices.html
# The full string "Host EC2 (instance i-…) terminated." is NOT quoted on an AWS page: it is the
# one Seqera's and others' Spot troubleshooting notes quote.
HOST = "Host EC2 (instance i-0123456789abcdef0) terminated."


@pytest.mark.parametrize("exit_code", [None, 143])
def test_batch_host_terminated_is_infrastructure(exit_code: int | None) -> None:
    assert cls(failures.batch_job(job("FAILED", HOST, attempt(HOST, exit_code)))) == (
        "infrastructure"
    )


def test_batch_last_attempt_decides() -> None:
    reply = job("FAILED", ESSENTIAL, attempt(HOST), attempt(ESSENTIAL, 2))
    assert cls(failures.batch_job(reply)) == "user"


def test_batch_oom_kill() -> None:
    reply = job("FAILED", ESSENTIAL, attempt(ESSENTIAL, 137, OOM))
    assert cls(failures.batch_job(reply)) == "infrastructure"
    reply = job("FAILED", ESSENTIAL, attempt(ESSENTIAL, 137))
    assert cls(failures.batch_job(reply)) == "user"


def test_batch_attempt_timeout_is_timeout() -> None:
    # NOT on an AWS page verbatim: the statusReason Batch gives an attempt that outran
    # attemptDurationSeconds, as public code matches it. AWS Batch User Guide, "Job timeouts"
    # https://docs.aws.amazon.com/batch/latest/userguide/job_timeouts.html says such a job is
    # terminated and not retried.
    timeout = "Job attempt duration exceeded timeout"
    assert cls(failures.batch_job(job("FAILED", timeout, attempt(timeout, 137)))) == "timeout"


@pytest.mark.parametrize(
    "reason",
    [
        # AWS Batch User Guide, "Automated job retries": evaluateOnExit onReason examples
        # https://docs.aws.amazon.com/batch/latest/userguide/job_retries.html
        "Task failed to start",
        "AGENT",
        # Amazon ECS Developer Guide, "CannotPullContainer task errors" (Batch runs on ECS)
        "CannotPullContainerError: API error (404): repository "
        "111122223333.dkr.ecr.us-east-1.amazonaws.com/<repo>/<image> not found",
    ],
)
def test_batch_attempt_that_never_started_is_start(reason: str) -> None:
    assert cls(failures.batch_job(job("FAILED", reason, attempt(None, None, reason)))) == "start"


@pytest.mark.parametrize(
    "reason",
    [
        # Batch API reference, `JobDetail.statusReason` (botocore's batch model, 1.40)
        # https://docs.aws.amazon.com/batch/latest/APIReference/API_JobDetail.html
        "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY",
        "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT",
        "Something AWS adds later",
    ],
)
def test_batch_job_without_attempts_never_ran(reason: str) -> None:
    assert failures.batch_job(job("FAILED", reason)) == Classified("start", reason)


def test_batch_terminated_by_the_daemon_is_cancelled() -> None:
    reply = job("FAILED", "orchestrator: cancelled", attempt(ESSENTIAL, 143))
    assert cls(failures.batch_job(reply)) == "cancelled"


def test_batch_failed_with_exit_0_is_still_a_failure() -> None:
    assert cls(failures.batch_job(job("FAILED", ESSENTIAL, attempt(ESSENTIAL, 0)))) == "user"


@pytest.mark.parametrize("status", ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING"])
def test_a_batch_job_not_finished_is_refused(status: str) -> None:
    with pytest.raises(ValueError, match="not SUCCEEDED or FAILED"):
        failures.batch_job(job(status))


# -- Local -------------------------------------------------------------------------------------


def test_local_success() -> None:
    assert failures.local_exit(0, None, None, oom_killed=False) is None
    # A process of the job was OOM-killed, but the job recovered and exited 0.
    assert failures.local_exit(0, None, None, oom_killed=True) is None


def test_local_command_that_cannot_run_is_rejected_and_the_hosts_trouble_is_start() -> None:
    # The runner's words (`_runner.Unstarted.outcome`): the command itself cannot be run.
    for error in (
        "cannot run 'nope': No such file or directory",
        "cannot run './x': Permission denied",
        "cannot enter working directory '/gone': No such file or directory",
    ):
        assert failures.local_exit(127, None, error, oom_killed=False) == Classified(
            "rejected", error
        )
    # What kept it from starting was the host's.
    for error in (
        "cannot join the job's cgroup /sys/fs/cgroup/jobs/x-1: No space left on device; not run",
        "cannot hide the daemon's state from the job: Operation not permitted; not run",
        "cannot run as alice (uid 1001): Operation not permitted",
    ):
        assert failures.local_exit(126, None, error, oom_killed=False) == Classified("start", error)


def test_local_oom_kill_is_infrastructure() -> None:
    result = failures.local_exit(137, signal.SIGKILL, None, oom_killed=True)
    assert cls(result) == "infrastructure"
    assert result is not None
    assert result.reason.startswith("killed by SIGKILL")
    # The job's main process exited on its own after a child of it was OOM-killed.
    assert cls(failures.local_exit(2, None, None, oom_killed=True)) == "infrastructure"


def test_local_kill_without_oom_and_own_exit_are_user() -> None:
    assert failures.local_exit(137, signal.SIGKILL, None, oom_killed=False) == Classified(
        "user", "killed by SIGKILL"
    )
    assert cls(failures.local_exit(143, signal.SIGTERM, None, oom_killed=False)) == "user"
    assert failures.local_exit(3, None, None, oom_killed=False) == Classified("user", "exit code 3")
    assert failures.local_exit(128 + 99, 99, None, oom_killed=False) == Classified(
        "user", "killed by signal 99"
    )
