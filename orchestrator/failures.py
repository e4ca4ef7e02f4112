"""Why a job failed, as one of a few classes: pure functions over the platforms' own replies.

class           retried   examples
                by default
                (models)
--------------  --------  ------------------------------------------------------------------
start           yes       never ran: a RunTask `failures[]` entry (RESOURCE:MEMORY, AGENT,
                          ATTRIBUTE, no capacity); stopCode TaskFailedToStart with no exit
                          code; CannotPullContainerError, ResourceInitializationError, an ENI
                          provisioning timeout; a local job's cgroup, hiding or user switch
                          that failed
infrastructure  yes       ran, and the platform ended it: stopCode SpotInterruption,
                          TerminationNotice, ServiceSchedulerInitiated; "Host EC2 (instance
                          i-…) terminated."; an OOM kill (OutOfMemoryError; a local cgroup
                          oom_kill)
user            no [1]    the job's own non-zero exit, or a signal the platform did not send
timeout         no        the daemon's deadline; Batch "Job attempt duration exceeded timeout"
cancelled       no        the daemon's own stop ("orchestrator: …"); stopCode UserInitiated
lost            no        the daemon lost track of the job: its own verdict, never derived here
dependency      no        a job it depends on ended otherwise than SUCCEEDED (the dispatcher's
                          verdict, `engine.dependencies`)
rejected        no        AWS refused RunTask/SubmitJob itself: ClientException,
                          InvalidParameterException, AccessDeniedException,
                          ClusterNotFoundException, a missing task definition; a local
                          command not found or not executable, its cwd missing

[1] unless the retry policy lists its exit code.

Precedence, where one reply says several things: `cancelled` > `timeout` > `infrastructure` >
`start`, then the exit code (0: success, else `user`). A `start` reason counts only while the
job's container has no exit code: a container that exited has run. No exit code and nothing the
table knows: `start` if it never started, else `infrastructure`. The daemon's own verdicts
(`timeout`, `cancelled`, `lost`) are the caller's and win over these. Credential, signing and
throttling errors are not job failures and never reach `aws_rejection`. Where each string comes
from: tests/unit/test_failures.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from signal import Signals
from typing import Any, Final, Literal, NamedTuple, get_args

FailureClass = Literal[
    "start", "infrastructure", "user", "timeout", "cancelled", "lost", "rejected", "dependency"
]
FAILURE_CLASSES: Final[tuple[FailureClass, ...]] = get_args(FailureClass)


class Classified(NamedTuple):
    failure: FailureClass
    reason: str


# -- The table: every code and reason string mapped, and nowhere else --------------------------

# ECS `Task.stopCode`. `EssentialContainerExited` is absent on purpose: the exit code decides.
STOP_CODES: Final[Mapping[str, FailureClass]] = {
    "TaskFailedToStart": "start",
    "SpotInterruption": "infrastructure",
    "TerminationNotice": "infrastructure",
    "ServiceSchedulerInitiated": "infrastructure",
    "InfrastructureHealth": "infrastructure",
    "UserInitiated": "cancelled",
}

# Prefixes of ECS `stoppedReason` and `containers[].reason`, and of Batch `statusReason`,
# `attempts[].statusReason` and `container.reason`.
REASONS: Final[Mapping[str, FailureClass]] = {
    "orchestrator:": "cancelled",  # the daemon's own StopTask / TerminateJob reason
    "Job attempt duration exceeded timeout": "timeout",
    "Host EC2 (instance ": "infrastructure",
    "Container instance deregistration forced by user": "infrastructure",
    "Your Spot Task was interrupted": "infrastructure",
    "OutOfMemoryError": "infrastructure",
    "CannotPullContainerError": "start",
    "ResourceInitializationError": "start",
    "CannotCreateVolumeError": "start",
    "CannotStartContainerError": "start",
    "ContainerRuntimeTimeoutError: Could not transition to running": "start",
    "DockerTimeoutError: Could not transition to running": "start",
    "Timeout waiting for network interface provisioning": "start",
    "Task failed to start": "start",
    "TaskFailedToStart": "start",
    "AGENT": "start",
    "CAPACITY:": "start",
    "MISCONFIGURATION:": "start",
}

# RunTask `failures[].reason`: no task was created, so whatever the reason nothing ran.
RUN_TASK_FAILURES: Final[Mapping[str, FailureClass]] = {
    "RESOURCE:": "start",
    "AGENT": "start",
    "ATTRIBUTE": "start",
    "LOCATION": "start",
    "Capacity is unavailable at this time": "start",
    "You've reached the limit on the number of tasks you can run concurrently": "start",
}

# Error codes of an `AwsRejected` from RunTask / SubmitJob (the API references' "Errors").
AWS_ERRORS: Final[Mapping[str, FailureClass]] = {
    "ClientException": "rejected",
    "InvalidParameterException": "rejected",
    "AccessDeniedException": "rejected",
    "ClusterNotFoundException": "rejected",
    "PlatformUnknownException": "rejected",
    "PlatformTaskDefinitionIncompatibilityException": "rejected",
    "UnsupportedFeatureException": "rejected",
    "BlockedException": "rejected",
    "ConflictException": "rejected",
}
# Prefixes of such an error's message that say "not now" rather than "never".
AWS_MESSAGES: Final[Mapping[str, FailureClass]] = {
    "Tasks provisioning capacity limit exceeded": "start",
}

_PRECEDENCE: Final[tuple[FailureClass, ...]] = ("cancelled", "timeout", "infrastructure", "start")


# -- Classifiers -----------------------------------------------------------------------------


def _prefixed(table: Mapping[str, FailureClass], text: str) -> FailureClass | None:
    return next((cls for prefix, cls in table.items() if text.startswith(prefix)), None)


def _describe(*parts: object) -> str:
    return "; ".join(dict.fromkeys(str(p) for p in parts if p not in (None, "")))


def _decide(
    found: Iterable[FailureClass | None], exit_code: int | None, ran: bool, reason: str
) -> Classified | None:
    """The table's verdicts first, by precedence; then the exit code."""
    classes = {cls for cls in found if cls is not None}
    if exit_code is not None:
        classes.discard("start")  # it exited, so it ran
    for cls in _PRECEDENCE:
        if cls in classes:
            return Classified(cls, reason)
    if exit_code is None:  # it ended without an exit code, for no reason the table knows
        return Classified("infrastructure" if ran else "start", reason or "no exit code")
    if exit_code == 0:
        return None
    return Classified("user", reason)


def ecs_task(task: Mapping[str, Any], container_name: str) -> Classified | None:
    """A STOPPED DescribeTasks `tasks[]` element: its failure, or None if the job succeeded."""
    if task.get("lastStatus") != "STOPPED":
        raise ValueError(f"task is {task.get('lastStatus')!r}, not STOPPED: nothing to classify")
    container: Mapping[str, Any] = next(
        (c for c in task.get("containers") or () if c.get("name") == container_name), {}
    )
    exit_code = container.get("exitCode")
    stop_code = str(task.get("stopCode") or "")
    texts = [str(t) for t in (task.get("stoppedReason"), container.get("reason")) if t]
    reason = _describe(
        ": ".join(p for p in (stop_code, *texts[:1]) if p),
        *texts[1:],
        None if exit_code is None else f"exit code {exit_code}",
    )
    found = [STOP_CODES.get(stop_code), *(_prefixed(REASONS, t) for t in texts)]
    return _decide(found, exit_code, task.get("startedAt") is not None, reason)


def ecs_run_task_failure(failure: Mapping[str, Any]) -> Classified:
    """A RunTask `failures[]` element (`arn`, `reason`, `detail`): no task, so `start`."""
    text = str(failure.get("reason") or "unknown")
    cls = _prefixed(RUN_TASK_FAILURES, text) or "start"
    detail = f" ({failure['detail']})" if failure.get("detail") else ""
    where = f" on {failure['arn']}" if failure.get("arn") else ""
    return Classified(cls, f"RunTask failure: {text}{detail}{where}")


def batch_job(job: Mapping[str, Any]) -> Classified | None:
    """A SUCCEEDED or FAILED DescribeJobs `jobs[]` element: its last attempt decides."""
    status = job.get("status")
    if status == "SUCCEEDED":
        return None
    if status != "FAILED":
        raise ValueError(f"job is {status!r}, not SUCCEEDED or FAILED: nothing to classify")
    attempts = job.get("attempts") or []
    attempt: Mapping[str, Any] = attempts[-1] if attempts else {}
    container = {**(job.get("container") or {}), **(attempt.get("container") or {})}
    exit_code = container.get("exitCode")
    texts = [
        str(t)
        for t in (job.get("statusReason"), attempt.get("statusReason"), container.get("reason"))
        if t
    ]
    reason = _describe(*texts, None if exit_code is None else f"exit code {exit_code}")
    ran = attempt.get("startedAt") is not None or exit_code is not None
    found = _decide((_prefixed(REASONS, t) for t in texts), exit_code, ran, reason)
    # Batch says FAILED although the container exited 0: nothing the table knows, the job's own.
    return found or Classified("user", reason or "FAILED")


def aws_rejection(code: str, message: str) -> Classified:
    """An `AwsRejected` from RunTask or SubmitJob: `rejected`, unless the message says "later"."""
    cls = _prefixed(AWS_MESSAGES, message) or AWS_ERRORS.get(code, "rejected")
    return Classified(cls, f"{code}: {message}" if message else code)


# How the local runner words an exec that failed because of the command itself
# (`_runner.Unstarted.outcome`: stages `exec` and `cwd`).
LOCAL_REFUSALS: Final[tuple[str, ...]] = (
    "cannot run '",
    'cannot run "',  # repr() of a name holding a quote
    "cannot enter working directory ",
)


def local_exit(
    exit_code: int, signal: int | None, error: str | None, oom_killed: bool
) -> Classified | None:
    """A local job's end as the keeper records it (`exit_code` is 128 + the signal if killed;
    `error` says why it never started); `oom_killed`: the cgroup's memory.events `oom_kill` grew."""
    if error:
        # The command itself cannot be run here (not found, not executable, its working
        # directory missing): no attempt would fare better, so the request is refused as a
        # rejected one is. Anything else that kept it from starting (its cgroup, hiding the
        # daemon's state, the user switch) is the host's: `start`.
        refused = error.startswith(LOCAL_REFUSALS)
        return Classified("rejected" if refused else "start", error)
    if exit_code == 0 and not signal:
        return None
    if signal:
        try:
            how = f"killed by {Signals(signal).name}"
        except ValueError:
            how = f"killed by signal {signal}"
    else:
        how = f"exit code {exit_code}"
    if oom_killed:
        return Classified("infrastructure", f"{how}; the kernel OOM-killed a process of the job")
    return Classified("user", how)
