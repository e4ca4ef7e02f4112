"""ECS and Batch through `orchestrator serve` as a real process that crashes and restarts, against
a real moto server behind the fault-injecting proxy: every crash point leaves exactly one remote
task or job per job, a cancel survives a kill, timeouts stop what they time out, and a RunTask
whose outcome is unknown is settled under its own token."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, faults, models, views
from orchestrator.backends import aws_kwargs
from orchestrator.backends.ecs import EcsBackend
from orchestrator.client import SyncClient
from orchestrator.ratelimit import TokenBucket
from orchestrator.settings import EcsSettings
from tests.support.daemon import DaemonProcess, settings_env
from tests.support.faultproxy import ACCOUNT_ID, FaultProxy, Reply, Request, Rule
from tests.support.moto import DEFAULT_REGION, DUMMY_CREDENTIALS, BatchEnv, EcsEnv, MotoServer

pytestmark = pytest.mark.timeout(120)

WAIT_S = 30.0  # upper bound of any single wait in these tests
# `max_attempts` of the daemon's AWS clients: few and quick (botocore makes one more than this,
# see test_ecs_max_attempts_bounds_the_attempts_of_one_call).
BOTOCORE_ATTEMPTS = 2
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "LOST"}
ECS_JSON = {"Content-Type": "application/x-amz-json-1.1"}
BATCH_JSON = {"Content-Type": "application/json"}

DaemonFactory = Callable[..., DaemonProcess]


# -- the daemon process ------------------------------------------------------------------------


def aws_process_env(endpoint_url: str) -> dict[str, str]:
    """What `aws_env` puts in this process's environment, for a child process instead."""
    return {
        **DUMMY_CREDENTIALS,
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint_url,
    }


def ecs_settings(env: EcsEnv, **extra: Any) -> dict[str, dict[str, Any]]:
    return {
        "jobs": {"backend": "ecs"},
        "ecs": env.settings(
            **{
                "max_attempts": BOTOCORE_ATTEMPTS,
                # moto answers the StopTask probe with HTTP 500, which botocore retries slowly.
                "check_health_on_startup": False,
                **extra,
            }
        ),
    }


def batch_settings(env: BatchEnv, **extra: Any) -> dict[str, dict[str, Any]]:
    return {
        "jobs": {"backend": "batch"},
        "batch": env.settings(
            **{
                "max_attempts": BOTOCORE_ATTEMPTS,
                "check_health_on_startup": False,
                # moto's ListJobs never lags SubmitJob: "not found" can be believed after a
                # second (the default, 60 s, would make the never-launched case wait a minute).
                "lookup_grace_s": 1.0,
                **extra,
            }
        ),
    }


@pytest.fixture
def make_daemon(short_tmp: Path, fault_proxy: FaultProxy) -> Iterator[DaemonFactory]:
    """`make_daemon(settings)`: an unstarted `orchestrator serve` talking AWS to the proxy."""
    made: list[DaemonProcess] = []

    def make(sections: Mapping[str, Mapping[str, Any]]) -> DaemonProcess:
        base: dict[str, dict[str, Any]] = {
            "poller": {"base_s": 0.05, "cap_s": 0.5},
            "dispatcher": {"retry_base_s": 0.1, "retry_cap_s": 1.0},
        }
        proc = DaemonProcess(short_tmp, env=settings_env({**base, **sections}))
        # The host's own AWS settings (a profile, a per-service endpoint) must not leak in.
        proc.env = {
            **{k: v for k, v in proc.env.items() if not k.startswith("AWS_")},
            **aws_process_env(fault_proxy.endpoint_url),
        }
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.close()


# -- waiting and asking ------------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def submit_maybe_unanswered(daemon: DaemonProcess, spec: Mapping[str, Any]) -> str | None:
    """Submit to a daemon that may die before it answers: the job id, or None if no reply."""
    try:
        with SyncClient(daemon.socket_path, timeout_s=WAIT_S) as client:
            return client.submit(spec)["id"]
    except (errors.DaemonUnreachable, ConnectionError):
        return None


def resubmit(daemon: DaemonProcess, spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a client that got no answer does: the same spec under the same idempotency key."""
    with daemon.client() as client:
        return client.call("submit", job=spec)


def wait_terminal(daemon: DaemonProcess, job_id: str) -> views.Job:
    with SyncClient(daemon.socket_path, timeout_s=WAIT_S) as client:
        client.wait(job_id)
        return client.get(job_id, history=True)


def get_job(daemon: DaemonProcess, job_id: str) -> views.Job:
    with daemon.client() as client:
        return client.get(job_id, history=True)


def reconciled(daemon: DaemonProcess, job_id: str) -> list[str]:
    """The `job.reconciled` outcomes the current run of the daemon logged for the job."""
    return [
        e["outcome"]
        for e in daemon.log_events()
        if e.get("event") == "job.reconciled" and e.get("job_id") == job_id
    ]


def ecs_tasks(moto: MotoServer, cluster: str) -> list[dict[str, Any]]:
    """Every task of the cluster, whatever its desired status, asked of moto directly."""
    with moto.client("ecs") as ecs:
        arns = [
            arn
            for desired in ("RUNNING", "STOPPED")
            for arn in ecs.list_tasks(cluster=cluster, desiredStatus=desired)["taskArns"]
        ]
        if not arns:
            return []
        tasks: list[dict[str, Any]] = ecs.describe_tasks(
            cluster=cluster, tasks=sorted(set(arns)), include=["TAGS"]
        )["tasks"]
    return tasks


def batch_jobs_named(moto: MotoServer, queue: str, name: str) -> list[dict[str, Any]]:
    """ListJobs with a JOB_NAME filter (every status; a trailing * matches a prefix)."""
    with moto.client("batch") as batch:
        summaries: list[dict[str, Any]] = batch.list_jobs(
            jobQueue=queue, filters=[{"name": "JOB_NAME", "values": [name]}]
        )["jobSummaryList"]
    return summaries


# -- crafted AWS replies -----------------------------------------------------------------------


def ecs_reply(body: Mapping[str, Any]) -> Reply:
    return Reply(200, json.dumps(body).encode(), ECS_JSON)


def task_arn(cluster: str) -> str:
    return f"arn:aws:ecs:{DEFAULT_REGION}:{ACCOUNT_ID}:task/{cluster}/{uuid.uuid4().hex}"


# -- 1. every crash point, on each backend -----------------------------------------------------

# Every point a job that succeeds passes when tracked by polling (a retry's point is passed
# only by a failed attempt: tests/integration/test_restart.py crashes there; the events' own,
# with a queue to read, in test_events_crash.py).
POINTS = sorted(p for p in faults.POINTS - {"poller.before_retry"} if not p.startswith("events."))
# What the restarted daemon's settling of a half-launched attempt must conclude, per point.
ECS_RECONCILED = {
    "dispatch.after_attempt_recorded": ["resubmitted"],  # same token: ECS returns the same task
    "dispatch.after_submit": ["adopted"],  # ListTasks(startedBy) finds the task
}
BATCH_RECONCILED = {
    "dispatch.after_attempt_recorded": ["requeued"],  # ListJobs: provably never launched
    "dispatch.after_submit": ["adopted"],  # ListJobs by name finds it: never submitted again
}


def crash_and_restart(
    daemon: DaemonProcess, point: str, spec: Mapping[str, Any]
) -> tuple[str, views.Job]:
    """Start with the crash point armed, submit, see the daemon die at it, restart unarmed and
    submit again as a client with no answer would. Returns (job id, final job)."""
    daemon.start(extra_env={faults.ENV: point})
    first_id = submit_maybe_unanswered(daemon, spec)
    assert daemon.wait_exit(timeout_s=WAIT_S) == 137, daemon.log()
    assert f"crash point {point} reached" in daemon.log()
    daemon.start()
    again = resubmit(daemon, spec)
    job_id = again["job"]["id"]
    assert again["created"] is False  # accepted before the crash, and only once
    assert first_id in (None, job_id)
    with daemon.client() as client:
        assert [j["id"] for j in client.call("list")["jobs"]] == [job_id]
    return job_id, wait_terminal(daemon, job_id)


@pytest.mark.parametrize("point", POINTS)
def test_ecs_crash_at_each_point_leaves_exactly_one_task(
    point: str,
    make_daemon: DaemonFactory,
    ecs_env: EcsEnv,
    moto: MotoServer,
    fault_proxy: FaultProxy,
) -> None:
    fault_proxy.honour_client_token = True  # as ECS does, and moto does not
    daemon = make_daemon(ecs_settings(ecs_env))
    spec = {"command": ["echo", "once"], "idempotency_key": f"crash-{point}"}

    job_id, final = crash_and_restart(daemon, point, spec)

    assert (final["state"], final["exit_code"]) == ("SUCCEEDED", 0), final
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 1
    token = f"{job_id}-1"
    (task,) = ecs_tasks(moto, ecs_env.cluster)
    assert (task["taskArn"], task["startedBy"]) == (final["external_id"], token)
    assert {"key": "orchestrator:job-id", "value": job_id} in task["tags"]
    assert [(a["attempt"], a["token"], a["outcome"]) for a in final["attempts"]] == [
        (1, token, "submitted")
    ]
    assert reconciled(daemon, job_id) == ECS_RECONCILED.get(point, [])


@pytest.mark.parametrize("point", POINTS)
def test_batch_crash_at_each_point_leaves_exactly_one_job(
    point: str,
    make_daemon: DaemonFactory,
    batch_env: BatchEnv,
    moto: MotoServer,
    fault_proxy: FaultProxy,
) -> None:
    daemon = make_daemon(batch_settings(batch_env))
    spec = {"command": ["echo", "once"], "idempotency_key": f"crash-{point}"}

    job_id, final = crash_and_restart(daemon, point, spec)

    assert final["state"] == "SUCCEEDED", final
    assert fault_proxy.forwarded[("batch", "SubmitJob")] == 1
    attempt = final["attempt"]
    (named,) = batch_jobs_named(moto, batch_env.job_queue, f"orch-{job_id}-{attempt}")
    assert named["jobId"] == final["external_id"]
    assert len(batch_jobs_named(moto, batch_env.job_queue, f"orch-{job_id}-*")) == 1
    outcomes = [a["outcome"] for a in final["attempts"]]
    if point == "dispatch.after_attempt_recorded":
        # Attempt 1 was recorded and never sent: found to be absent, so attempt 2 is the run.
        assert outcomes == ["start failed: attempt 1 never launched", "submitted"]
    else:
        assert outcomes == ["submitted"]
    assert reconciled(daemon, job_id) == BATCH_RECONCILED.get(point, [])


# -- 2. a cancel is durable across a kill ------------------------------------------------------


def test_ecs_cancel_whose_stop_failed_is_reissued_after_a_kill(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, moto: MotoServer, fault_proxy: FaultProxy
) -> None:
    moto.set_transition("ecs::task", "manual", times=10_000)  # RUNNING until stopped
    daemon = make_daemon(ecs_settings(ecs_env))
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["sleep", "3600"]})["id"]
    wait_for(lambda: get_job(daemon, job_id)["state"] == "RUNNING", "the task to run")

    refuse = fault_proxy.http_5xx("ecs", "StopTask", times=None)
    with daemon.client() as client:
        asked = client.cancel(job_id)
    assert (asked["state"], asked["stop_reason"]) == ("RUNNING", "cancel")
    fault_proxy.wait_for_count("ecs", "StopTask", 1, timeout_s=WAIT_S)  # tried, and refused
    assert get_job(daemon, job_id)["state"] == "RUNNING"
    daemon.kill()
    assert fault_proxy.forwarded[("ecs", "StopTask")] == 0

    fault_proxy.remove_rule(refuse)
    daemon.start()
    final = wait_terminal(daemon, job_id)

    assert (final["state"], final["stop_reason"]) == ("CANCELLED", "cancel"), final
    assert final["reason"] == "cancelled by request"
    assert fault_proxy.forwarded[("ecs", "StopTask")] >= 1
    (task,) = ecs_tasks(moto, ecs_env.cluster)
    assert (task["lastStatus"], task["stoppedReason"]) == ("STOPPED", "orchestrator: cancel")


# -- 3. timeouts stop what they time out -------------------------------------------------------


def test_ecs_queue_timeout_stops_a_task_stuck_provisioning(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, fault_proxy: FaultProxy
) -> None:
    """A Fargate task waiting for capacity: PROVISIONING until our StopTask, then STOPPED."""
    stopped: dict[str, str] = {}  # task ARN → the StopTask reason
    cluster = ecs_env.cluster

    def run_task(request: Request) -> Reply:
        task = {
            "taskArn": task_arn(cluster),
            "clusterArn": f"arn:aws:ecs:{DEFAULT_REGION}:{ACCOUNT_ID}:cluster/{cluster}",
            "taskDefinitionArn": ecs_env.task_definition_arn,
            "lastStatus": "PROVISIONING",
            "desiredStatus": "RUNNING",
            "startedBy": request.json()["startedBy"],
            "containers": [{"name": ecs_env.container_name, "lastStatus": "PENDING"}],
        }
        return ecs_reply({"tasks": [task], "failures": []})

    def stop_task(request: Request) -> Reply:
        body = request.json()
        stopped[body["task"]] = body["reason"]
        task = {"taskArn": body["task"], "lastStatus": "PROVISIONING", "desiredStatus": "STOPPED"}
        return ecs_reply({"task": task})

    def describe_tasks(request: Request) -> Reply:
        tasks = []
        for arn in request.json()["tasks"]:
            if arn in stopped:
                tasks.append(
                    {
                        "taskArn": arn,
                        "lastStatus": "STOPPED",
                        "desiredStatus": "STOPPED",
                        "stopCode": "UserInitiated",
                        "stoppedReason": stopped[arn],
                        "containers": [{"name": ecs_env.container_name, "lastStatus": "STOPPED"}],
                    }
                )
            else:
                tasks.append({"taskArn": arn, "lastStatus": "PROVISIONING"})
        return ecs_reply({"tasks": tasks, "failures": []})

    for operation, respond in (
        ("RunTask", run_task),
        ("StopTask", stop_task),
        ("DescribeTasks", describe_tasks),
    ):
        fault_proxy.add_rule(Rule("ecs", operation, respond, times=None))
    daemon = make_daemon(ecs_settings(ecs_env))
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["true"], "queue_timeout_s": 3.0})["id"]
    final = wait_terminal(daemon, job_id)

    assert (final["state"], final["stop_reason"]) == ("FAILED", "queue_timeout"), final
    assert final["reason"] is not None
    assert final["reason"].startswith("queue_timeout"), final["reason"]
    assert "PROVISIONING" in final["reason"]
    assert "RUNNING" not in final["state_times"]
    assert stopped == {final["external_id"]: "orchestrator: queue_timeout"}


def test_ecs_timeout_stops_a_task_that_runs_too_long_even_across_a_kill(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, moto: MotoServer, fault_proxy: FaultProxy
) -> None:
    """The run-time deadline is durable: the daemon is killed while the task runs, and the
    restarted one enforces it (at once if it passed while the daemon was down)."""
    moto.set_transition("ecs::task", "manual", times=10_000)  # RUNNING until stopped
    fault_proxy.record("ecs", "StopTask")
    daemon = make_daemon(ecs_settings(ecs_env))
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["sleep", "3600"], "timeout_s": 2.0})["id"]
    wait_for(lambda: get_job(daemon, job_id)["state"] == "RUNNING", "the task to run")
    daemon.kill()
    daemon.start()
    final = wait_terminal(daemon, job_id)

    assert (final["state"], final["stop_reason"]) == ("FAILED", "timeout"), final
    assert final["reason"] is not None
    assert final["reason"].startswith("timeout"), final["reason"]
    assert "RUNNING" in final["reason"]
    stops = [r.json() for r in fault_proxy.requests("ecs", "StopTask")]
    assert stops
    assert {s["task"] for s in stops} == {final["external_id"]}
    assert fault_proxy.forwarded[("ecs", "StopTask")] >= 1
    (task,) = ecs_tasks(moto, ecs_env.cluster)
    assert (task["lastStatus"], task["stoppedReason"]) == ("STOPPED", "orchestrator: timeout")


def test_batch_timeout_terminates_a_job_that_runs_too_long(
    make_daemon: DaemonFactory, batch_env: BatchEnv, fault_proxy: FaultProxy
) -> None:
    """moto finishes Batch jobs at once: DescribeJobs says RUNNING until TerminateJob, then
    FAILED as Batch reports a terminated job."""
    fault_proxy.record("batch", "SubmitJob")
    fault_proxy.record("batch", "TerminateJob")
    started_ms = int(time.time() * 1000)

    def describe_jobs(request: Request) -> Reply:
        names = [r.json()["jobName"] for r in fault_proxy.requests("batch", "SubmitJob")]
        terminated = {
            r.json()["jobId"]: r.json()["reason"]
            for r in fault_proxy.requests("batch", "TerminateJob")
        }
        jobs = []
        for job_id in request.json()["jobs"]:
            detail: dict[str, Any] = {
                "jobId": job_id,
                "jobName": names[-1] if names else "unknown",
                "jobQueue": batch_env.job_queue_arn,
                "jobDefinition": batch_env.job_definition_arn,
                "status": "RUNNING",
                "createdAt": started_ms,
                "startedAt": started_ms,
                "container": {"logStreamName": f"{batch_env.job_definition}/default/{job_id}"},
            }
            if job_id in terminated:
                detail.update(status="FAILED", statusReason=terminated[job_id])
                detail["stoppedAt"] = int(time.time() * 1000)
            jobs.append(detail)
        return Reply(200, json.dumps({"jobs": jobs}).encode(), BATCH_JSON)

    fault_proxy.add_rule(Rule("batch", "DescribeJobs", describe_jobs, times=None))
    daemon = make_daemon(batch_settings(batch_env))
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["sleep", "3600"], "timeout_s": 1.0})["id"]
    final = wait_terminal(daemon, job_id)

    assert (final["state"], final["stop_reason"]) == ("FAILED", "timeout"), final
    assert final["reason"] is not None
    assert final["reason"].startswith("timeout"), final["reason"]
    assert "RUNNING" in final["reason"]
    terminations = [r.json() for r in fault_proxy.requests("batch", "TerminateJob")]
    assert terminations
    assert all(t["jobId"] == final["external_id"] for t in terminations)
    assert terminations[0]["reason"] == "orchestrator: timeout"


# -- 4. a RunTask whose outcome is unknown -----------------------------------------------------


def test_ecs_run_task_5xx_is_settled_under_the_same_token(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, moto: MotoServer, fault_proxy: FaultProxy
) -> None:
    """The first RunTask fails with 503 on every botocore attempt, so the daemon cannot know
    whether it started a task; the same attempt is then sent again under its token, once."""
    fault_proxy.honour_client_token = True
    fault_proxy.record("ecs", "RunTask")
    outage = fault_proxy.http_5xx("ecs", "RunTask", times=None)

    def end_outage(request: Request) -> Reply:
        # The settling's first lookup comes after the failed call and before its repeat: ECS is
        # back from here on. Nothing reached moto, so no task is the true answer.
        fault_proxy.remove_rule(outage)
        return ecs_reply({"taskArns": []})

    fault_proxy.add_rule(Rule("ecs", "ListTasks", end_outage, times=1))
    daemon = make_daemon(ecs_settings(ecs_env))
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["echo", "once"]})["id"]
    final = wait_terminal(daemon, job_id)

    assert (final["state"], final["exit_code"]) == ("SUCCEEDED", 0), final
    token = f"{job_id}-1"
    assert [(a["attempt"], a["token"], a["outcome"]) for a in final["attempts"]] == [
        (1, token, "submitted")
    ]
    sent = [r.json() for r in fault_proxy.requests("ecs", "RunTask")]
    assert len(sent) >= 2
    assert {s["clientToken"] for s in sent} == {token}
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 1
    (task,) = ecs_tasks(moto, ecs_env.cluster)
    assert (task["taskArn"], task["startedBy"]) == (final["external_id"], token)
    events = [
        (e["event"], e.get("outcome"))
        for e in daemon.log_events()
        if e.get("job_id") == job_id and e.get("event") in ("job.start_unknown", "job.reconciled")
    ]
    assert events == [("job.start_unknown", None), ("job.reconciled", "resubmitted")]


def test_ecs_run_task_5xx_that_never_ends_makes_the_job_lost_saying_why(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, fault_proxy: FaultProxy
) -> None:
    """RunTask answers 503 to every try, and ListTasks finds nothing: the daemon cannot tell
    whether a task started, so after its looks the job is LOST — and its reason says what the
    start call got, so that a user can see the cause."""
    fault_proxy.honour_client_token = True
    fault_proxy.http_5xx("ecs", "RunTask", times=None)
    daemon = make_daemon(ecs_settings(ecs_env, max_run_task_attempts=2))
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["echo", "once"]})["id"]
    final = wait_terminal(daemon, job_id)
    assert (final["state"], final["failure"]) == ("LOST", "lost"), final
    assert final["reason"] is not None
    assert final["reason"].startswith("cannot establish whether attempt 1 launched (")
    assert "503" in final["reason"] or "ServiceUnavailable" in final["reason"], final["reason"]
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 0  # nothing reached ECS


@pytest.mark.usefixtures("proxied_aws_env")
async def test_ecs_max_attempts_bounds_the_attempts_of_one_call(
    ecs_env: EcsEnv, fault_proxy: FaultProxy
) -> None:
    """`ecs.max_attempts` is documented as "attempts per API call" (settings.py,
    config.example.toml): a RunTask that always fails with 503 is sent that many times before
    the call fails. (The backend alone, in this process: no crash is involved.)"""
    fault_proxy.http_5xx("ecs", "RunTask", times=None)
    backend = EcsBackend(EcsSettings(**ecs_settings(ecs_env)["ecs"]), TokenBucket("logs", 10, 10))
    await backend.start()
    try:
        with pytest.raises(errors.OutcomeUnknown):
            await backend.submit(aws_kwargs.probe_job(models.JobSpec(command=["true"]), "ecs"))
    finally:
        await backend.close()
    assert fault_proxy.counts[("ecs", "RunTask")] == BOTOCORE_ATTEMPTS


# -- a call that reached AWS after the daemon gave up on it ------------------------------------
#
# The proxy holds the first request longer than the daemon's read timeout, then relays it: AWS
# acts on a call whose caller saw only a timeout. Every later request goes through at once.

SLOW_S = 2.5  # how long the proxy holds the first request
READ_TIMEOUT_S = 1.0  # the daemon's read timeout: it gives up on that request well before


def test_ecs_run_task_that_timed_out_then_was_throttled_is_not_retried_under_a_new_token(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, moto: MotoServer, fault_proxy: FaultProxy
) -> None:
    fault_proxy.honour_client_token = True
    fault_proxy.record("ecs", "RunTask")
    fault_proxy.latency("ecs", "RunTask", SLOW_S)
    fault_proxy.throttle("ecs", "RunTask", skip=1, times=None)  # every RunTask but the first
    daemon = make_daemon(ecs_settings(ecs_env, read_timeout_s=READ_TIMEOUT_S))
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["echo", "once"]})["id"]
    fault_proxy.wait_for_count("ecs", "RunTask", 1, timeout_s=WAIT_S)
    fault_proxy.latency("ecs", "RunTask", 0)
    token = f"{job_id}-1"

    def tokens() -> set[str]:
        return {r.json()["clientToken"] for r in fault_proxy.requests("ecs", "RunTask")}

    wait_for(
        lambda: tokens() != {token} or get_job(daemon, job_id)["state"] in TERMINAL,
        "the job to end or a RunTask under another token",
    )
    wait_for(
        lambda: any(t["startedBy"] == token for t in ecs_tasks(moto, ecs_env.cluster)),
        "the held RunTask to reach ECS",
    )
    assert tokens() == {token}  # attempt 1's fate was never established: no attempt 2
    assert len(ecs_tasks(moto, ecs_env.cluster)) == 1


def test_batch_submit_that_timed_out_after_reaching_batch_is_not_submitted_twice(
    make_daemon: DaemonFactory, batch_env: BatchEnv, moto: MotoServer, fault_proxy: FaultProxy
) -> None:
    fault_proxy.latency("batch", "SubmitJob", SLOW_S)
    # "Not found" must not be believed while the held SubmitJob may still land.
    daemon = make_daemon(
        batch_settings(batch_env, read_timeout_s=READ_TIMEOUT_S, lookup_grace_s=4 * SLOW_S)
    )
    daemon.start()
    with daemon.client() as client:
        job_id = client.submit({"command": ["echo", "once"]})["id"]
    fault_proxy.wait_for_count("batch", "SubmitJob", 1, timeout_s=WAIT_S)
    fault_proxy.latency("batch", "SubmitJob", 0)
    final = wait_terminal(daemon, job_id)

    def all_landed() -> bool:
        sent = fault_proxy.forwarded[("batch", "SubmitJob")]
        received = fault_proxy.counts[("batch", "SubmitJob")]
        landed = batch_jobs_named(moto, batch_env.job_queue, f"orch-{job_id}-*")
        return sent == received and len(landed) >= sent

    wait_for(all_landed, "every SubmitJob the proxy received to reach Batch")
    assert final["state"] == "SUCCEEDED", final
    assert len(batch_jobs_named(moto, batch_env.job_queue, f"orch-{job_id}-*")) == 1
    assert fault_proxy.forwarded[("batch", "SubmitJob")] == 1


# -- start-up must survive AWS being unavailable -----------------------------------------------


def test_restart_with_a_half_launched_attempt_while_ecs_lookups_fail_still_serves(
    make_daemon: DaemonFactory, ecs_env: EcsEnv, moto: MotoServer, fault_proxy: FaultProxy
) -> None:
    """The settling of an attempt cut short by a crash asks ECS (ListTasks). While ECS answers
    5xx the daemon must still start and serve, and settle the attempt once ECS is back."""
    fault_proxy.honour_client_token = True
    daemon = make_daemon(ecs_settings(ecs_env))
    spec = {"command": ["echo", "once"], "idempotency_key": "startup-outage"}
    daemon.start(extra_env={faults.ENV: "dispatch.after_submit"})
    submit_maybe_unanswered(daemon, spec)
    assert daemon.wait_exit(timeout_s=WAIT_S) == 137

    outage = fault_proxy.http_5xx("ecs", "ListTasks", times=None)
    daemon.start(wait=False)
    try:
        daemon.wait_ready()
    finally:
        fault_proxy.remove_rule(outage)
    job_id = resubmit(daemon, spec)["job"]["id"]
    final = wait_terminal(daemon, job_id)

    assert (final["state"], final["exit_code"]) == ("SUCCEEDED", 0), final
    assert fault_proxy.forwarded[("ecs", "RunTask")] == 1
    assert len(ecs_tasks(moto, ecs_env.cluster)) == 1
