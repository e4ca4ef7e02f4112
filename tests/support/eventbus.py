"""EventBridge state-change events for the jobs a daemon runs on ECS or Batch, for tests of
tracking by events (issue #17).

moto routes PutEvents through rules to SQS, but its ECS and Batch emit no events. `EventBus`
owns the world instead: it answers the daemon's RunTask/SubmitJob, DescribeTasks/DescribeJobs,
StopTask/TerminateJob and ListTasks/ListJobs through the fault proxy from a table of its own,
advances each task or job through its states on the test's command, and publishes every change
as the vendor does — an "ECS Task State Change" or "Batch Job State Change" event, its fields
those of the AWS documentation's examples — through moto's PutEvents, so that the real
rule → SQS path carries it to the daemon's queue::

    bus = EventBus(moto, fault_proxy, "ecs", ecs_env).start()
    settings = ...ecs_env.settings(events=bus.events_settings(sweep_s=60))...
    (task,) = bus.wait_launched(1)
    bus.advance(task, "RUNNING")              # the table changes, its event is published
    late = bus.advance(task, "STOPPED", publish=False)   # dropped (or kept for later)
    bus.publish(late, times=2)                # duplicated; `delay_s=` delays it

Describes and events agree: a describe shows what the last change made of the task, unless
the change was made with `describe=False` (describes lag behind, as AWS's may) until
`reveal`. The bus counts the daemon's describes per task or job (`described`).

Each task's `version` (ECS) grows with each change; a Batch job's `attempts` fill as its
attempts end: the vendors' orders the daemon reads (`Observation.order`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Self

from tests.support.faultproxy import ACCOUNT_ID, FaultProxy, Reply, Request, Rule
from tests.support.moto import DEFAULT_REGION, BatchEnv, EcsEnv, MotoServer

Backend = Literal["ecs", "batch"]

ECS_SOURCE, ECS_DETAIL_TYPE = "aws.ecs", "ECS Task State Change"
BATCH_SOURCE, BATCH_DETAIL_TYPE = "aws.batch", "Batch Job State Change"
_ECS_JSON = {"Content-Type": "application/x-amz-json-1.1"}
_BATCH_JSON = {"Content-Type": "application/json"}
# The statuses a task or job goes through, in order (ECS: the task lifecycle of the developer
# guide; Batch: the job states of the user guide).
ECS_STATUSES = (
    "PROVISIONING",
    "PENDING",
    "ACTIVATING",
    "RUNNING",
    "DEACTIVATING",
    "STOPPING",
    "DEPROVISIONING",
    "STOPPED",
)
BATCH_STATUSES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED")


@dataclasses.dataclass(frozen=True)
class Event:
    """One state-change event as the vendor sends it to EventBridge (a PutEvents entry)."""

    source: str
    detail_type: str
    detail: Mapping[str, Any]
    resources: tuple[str, ...]
    at: float  # when the change happened (the envelope's `time`)

    @property
    def external_id(self) -> str:
        return str(self.detail.get("taskArn") or self.detail.get("jobId"))

    def entry(self) -> dict[str, Any]:
        return {
            "Time": datetime.datetime.fromtimestamp(self.at, datetime.UTC),
            "Source": self.source,
            "Resources": list(self.resources),
            "DetailType": self.detail_type,
            "Detail": json.dumps(self.detail),
        }


@dataclasses.dataclass
class Remote:
    """One ECS task or Batch job the bus runs: what AWS knows of it."""

    backend: Backend
    external_id: str  # the task ARN; the Batch job id
    arn: str  # the task ARN; the Batch job ARN
    token: str  # ECS startedBy (the attempt's token); the Batch job name
    request: Mapping[str, Any]  # the RunTask / SubmitJob kwargs
    status: str
    created_at: float
    version: int = 1
    desired: str = "RUNNING"
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None
    stop_code: str | None = None
    reason: str | None = None  # ECS stoppedReason; Batch statusReason
    attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # Batch
    shown: dict[str, Any] | None = None  # what describes show while they lag (None: now)
    events: list[Event] = dataclasses.field(default_factory=list)  # one per change

    @property
    def job_id(self) -> str:
        """The orchestrator's job id (tokens and names end with `-<attempt>`)."""
        token = self.token.removeprefix("orch-")
        return token.rpartition("-")[0]


class EventBus:
    """The world of one backend's tasks or jobs, behind `proxy`, its changes published on
    moto's default event bus to a queue of its own (`queue_url`)."""

    def __init__(
        self,
        moto: MotoServer,
        proxy: FaultProxy,
        backend: Backend,
        env: EcsEnv | BatchEnv,
        *,
        name: str = "orchestrator-events",
        launch_status: str | None = None,
        publish_launch: bool | None = None,
    ) -> None:
        self.moto = moto
        self.proxy = proxy
        self.backend: Backend = backend
        self.env = env
        self.name = name
        self.source = ECS_SOURCE if backend == "ecs" else BATCH_SOURCE
        self.detail_type = ECS_DETAIL_TYPE if backend == "ecs" else BATCH_DETAIL_TYPE
        # What a new task or job is: ECS tasks start PROVISIONING (and say so in an event),
        # Batch jobs SUBMITTED (and Batch sends no event for that).
        self.launch_status = launch_status or ("PROVISIONING" if backend == "ecs" else "SUBMITTED")
        self.publish_launch = (backend == "ecs") if publish_launch is None else publish_launch
        # Called (in the proxy's thread) with each new task or job, before the launch's reply.
        self.on_launch: Callable[[Remote], None] | None = None
        # A stop request ends the task or job at once (and publishes that), unless False.
        self.stops_end = True
        self.queue_url = ""
        self.queue_arn = ""
        self._lock = threading.RLock()
        self._publishing = threading.Lock()
        self._remotes: dict[str, Remote] = {}
        self._order: list[str] = []
        self._by_token: dict[str, str] = {}
        self._launched = threading.Condition(self._lock)
        self.described: Counter[str] = Counter()  # describes of each task or job
        self.describe_calls = 0
        self.stops: Counter[str] = Counter()
        self.published = 0
        self.undelivered: list[str] = []  # PutEvents that failed (the queue gone…)
        self._rules: list[Rule] = []
        self._timers: list[threading.Timer] = []
        self._rule_pattern = {"source": [self.source]}

    # -- set-up ----------------------------------------------------------------------------

    def start(self) -> Self:
        """The queue, the rule (`source` = the backend's) targeting it, the proxy's rules."""
        with self.moto.client("sqs") as sqs:
            self.queue_url = sqs.create_queue(QueueName=self.name)["QueueUrl"]
            attributes = sqs.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
            )
            self.queue_arn = attributes["Attributes"]["QueueArn"]
        self.restore_rule()
        handlers: dict[str, Callable[[Request], Reply]]
        if self.backend == "ecs":
            handlers = {
                "RunTask": self._run_task,
                "DescribeTasks": self._describe_tasks,
                "StopTask": self._stop_task,
                "ListTasks": self._list_tasks,
            }
        else:
            handlers = {
                "SubmitJob": self._submit_job,
                "DescribeJobs": self._describe_jobs,
                "TerminateJob": self._terminate_job,
                "CancelJob": self._terminate_job,
                "ListJobs": self._list_jobs,
            }
        for operation, respond in handlers.items():
            self._rules.append(
                self.proxy.add_rule(Rule(self.backend, operation, respond, times=None))
            )
        return self

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for rule in self._rules:
            self.proxy.remove_rule(rule)
        self._rules.clear()

    def events_settings(self, **extra: Any) -> dict[str, Any]:
        """The daemon's `[<backend>.events]` section for this queue: short waits, `extra`
        over."""
        return {"queue_url": self.queue_url, "wait_s": 1, **extra}

    # -- the event path: rule and queue, broken and mended ---------------------------------

    def remove_rule(self) -> None:
        """Events stop silently: nothing routes them to the queue any more."""
        with self.moto.client("events") as events:
            events.remove_targets(Rule=self.name, Ids=["queue"])
            events.delete_rule(Name=self.name)

    def restore_rule(self) -> None:
        with self.moto.client("events") as events:
            events.put_rule(Name=self.name, EventPattern=json.dumps(self._rule_pattern))
            events.put_targets(Rule=self.name, Targets=[{"Id": "queue", "Arn": self.queue_arn}])

    def delete_queue(self) -> None:
        with self.moto.client("sqs") as sqs:
            sqs.delete_queue(QueueUrl=self.queue_url)

    def recreate_queue(self) -> None:
        """The same name again: the same URL and ARN, so the rule delivers to it again."""
        with self.moto.client("sqs") as sqs:
            url = sqs.create_queue(QueueName=self.name)["QueueUrl"]
        assert url == self.queue_url, (url, self.queue_url)

    def queue_depth(self) -> tuple[int, int]:
        """Messages (visible, in flight) in the queue, as SQS counts them."""
        with self.moto.client("sqs") as sqs:
            attributes = sqs.get_queue_attributes(
                QueueUrl=self.queue_url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        )

    def send_raw(self, body: str) -> None:
        """A message put on the queue directly (not an EventBridge event: garbage, foreign)."""
        with self.moto.client("sqs") as sqs:
            sqs.send_message(QueueUrl=self.queue_url, MessageBody=body)

    def put_entries(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """PutEvents of arbitrary entries (other sources, other detail types) on the bus."""
        with self._publishing, self.moto.client("events") as events:
            reply = events.put_events(Entries=list(entries))
        assert reply.get("FailedEntryCount", 0) == 0, reply

    # -- the world -------------------------------------------------------------------------

    def launched(self) -> list[str]:
        """The external ids of every task or job launched so far, in launch order."""
        with self._lock:
            return list(self._order)

    def wait_launched(self, n: int = 1, timeout_s: float = 20.0) -> list[str]:
        """The first `n` launched (waiting for them)."""
        with self._launched:
            if not self._launched.wait_for(lambda: len(self._order) >= n, timeout_s):
                raise AssertionError(f"{len(self._order)} of {n} launches in {timeout_s}s")
            return list(self._order[:n])

    def remote(self, external_id: str) -> Remote:
        with self._lock:
            return self._remotes[external_id]

    def of_job(self, job_id: str) -> Remote:
        """The task or job of the orchestrator job's latest attempt."""
        with self._lock:
            found = [r for r in self._remotes.values() if r.job_id == job_id]
        assert found, f"no task or job launched for {job_id}"
        return found[-1]

    def advance(
        self,
        external_id: str,
        status: str,
        *,
        exit_code: int | None = 0,
        reason: str | None = None,
        stop_code: str = "EssentialContainerExited",
        publish: bool = True,
        times: int = 1,
        describe: bool = True,
    ) -> Event:
        """The task or job moves to `status` (ECS: a task status; Batch: a job status), its
        event made and, unless `publish=False` (a dropped event: keep it to publish later),
        published `times` times. `describe=False`: describes go on showing what they showed
        (lagging) until `reveal`. For an end: the container's `exit_code`, `reason`."""
        statuses = ECS_STATUSES if self.backend == "ecs" else BATCH_STATUSES
        assert status in statuses, f"{status!r} is not one of {self.backend}'s: {statuses}"
        with self._lock:
            remote = self._remotes[external_id]
            if not describe and remote.shown is None:
                remote.shown = self._described(remote)
            self._change(remote, status, exit_code, reason, stop_code)
            event = self._event(remote)
            remote.events.append(event)
        if publish:
            self.publish(event, times=times)
        return event

    def reveal(self, external_id: str) -> None:
        """Describes catch up with the task or job."""
        with self._lock:
            self._remotes[external_id].shown = None

    def event_now(self, external_id: str) -> Event:
        """The event the task or job's current state makes (the last change's, again)."""
        with self._lock:
            return self._event(self._remotes[external_id])

    def publish(self, event: Event, *, times: int = 1, delay_s: float = 0.0) -> None:
        """PutEvents of `event`, `times` times, now or after `delay_s` (in a timer thread). A
        PutEvents that fails (the target queue gone) is counted in `undelivered`."""
        if delay_s > 0:
            timer = threading.Timer(delay_s, self.publish, (event,), {"times": times})
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
            return
        for _ in range(times):
            try:
                with self._publishing, self.moto.client("events") as events:
                    reply = events.put_events(Entries=[event.entry()])
            except Exception as exc:  # what EventBridge could not deliver
                self.undelivered.append(repr(exc))
                continue
            if reply.get("FailedEntryCount", 0):
                self.undelivered.append(json.dumps(reply["Entries"]))
            else:
                with self._lock:
                    self.published += 1

    # -- changes ---------------------------------------------------------------------------

    def _change(
        self,
        remote: Remote,
        status: str,
        exit_code: int | None,
        reason: str | None,
        stop_code: str,
    ) -> None:
        now = time.time()
        remote.status = status
        remote.version += 1
        remote.times["updatedAt"] = now
        if self.backend == "ecs":
            if status in ("PENDING", "ACTIVATING"):
                remote.times.setdefault("connectivityAt", now)
                remote.times.setdefault("pullStartedAt", now)
            if status == "RUNNING":
                remote.times.setdefault("pullStoppedAt", now)
                remote.times.setdefault("startedAt", now)
            if status in ("DEACTIVATING", "STOPPING", "DEPROVISIONING", "STOPPED"):
                remote.desired = "STOPPED"
                remote.times.setdefault("stoppingAt", now)
                remote.times.setdefault("executionStoppedAt", now)
                remote.stop_code = remote.stop_code or stop_code
                remote.reason = remote.reason or reason or "Essential container in task exited"
                remote.exit_code = exit_code
            if status == "STOPPED":
                remote.times["stoppedAt"] = now
            return
        if status == "RUNNING":
            remote.times.setdefault("startedAt", now)
        if status in ("SUCCEEDED", "FAILED"):
            remote.exit_code = exit_code
            remote.reason = reason or (
                "Essential container in task exited" if status == "FAILED" else None
            )
            remote.times["stoppedAt"] = now
            started = remote.times.get("startedAt", now)
            remote.attempts.append(
                {
                    "container": {
                        "exitCode": exit_code,
                        "logStreamName": self._log_stream(remote),
                        "networkInterfaces": [],
                        **({"reason": reason} if reason else {}),
                    },
                    "startedAt": _ms(started),
                    "stoppedAt": _ms(now),
                    "statusReason": remote.reason or "Essential container in task exited",
                }
            )

    def _launch(self, remote: Remote) -> dict[str, Any]:
        """A new task or job: in the table, its launch event published (ECS), `on_launch`
        called; what the launch call answers is what it was when made (before `on_launch`)."""
        with self._lock:
            self._remotes[remote.external_id] = remote
            self._by_token[remote.token] = remote.external_id
            event = self._event(remote)
            remote.events.append(event)
            snapshot = self._described(remote)
        if self.publish_launch:
            self.publish(event)
        if self.on_launch is not None:
            self.on_launch(remote)
        with self._launched:
            self._order.append(remote.external_id)
            self._launched.notify_all()
        return snapshot

    # -- ECS -------------------------------------------------------------------------------

    def _run_task(self, request: Request) -> Reply:
        params = request.json()
        token = params.get("clientToken") or params.get("startedBy") or uuid.uuid4().hex
        with self._lock:
            known = self._by_token.get(token)
            task = None if known is None else self._ecs_task(self._remotes[known], api=True)
        if task is None:  # ECS's clientToken: the same token, the same task
            cluster = _name(params.get("cluster") or "default")
            arn = f"arn:aws:ecs:{DEFAULT_REGION}:{ACCOUNT_ID}:task/{cluster}/{uuid.uuid4().hex}"
            task = self._launch(
                Remote("ecs", arn, arn, token, params, self.launch_status, time.time())
            )
        return _reply(_ECS_JSON, {"tasks": [task], "failures": []})

    def _describe_tasks(self, request: Request) -> Reply:
        wanted = request.json().get("tasks", [])
        tasks, failures = [], []
        with self._lock:
            self.describe_calls += 1
            for arn in wanted:
                self.described[arn] += 1
                remote = self._remotes.get(arn)
                if remote is None:
                    failures.append({"arn": arn, "reason": "MISSING"})
                else:
                    tasks.append(self._described(remote))
        return _reply(_ECS_JSON, {"tasks": tasks, "failures": failures})

    def _stop_task(self, request: Request) -> Reply:
        params = request.json()
        arn = params["task"]
        with self._lock:
            remote = self._remotes.get(arn)
            self.stops[arn] += 1
            if remote is None:
                return _error_json(
                    "InvalidParameterException", "The referenced task was not found."
                )
            remote.desired = "STOPPED"
            ends = self.stops_end and remote.status != "STOPPED"
        if ends:
            reason = str(params.get("reason") or "Task stopped by user")
            self.advance(arn, "STOPPED", exit_code=143, reason=reason, stop_code="UserInitiated")
        with self._lock:
            return _reply(_ECS_JSON, {"task": self._ecs_task(remote, api=True)})

    def _list_tasks(self, request: Request) -> Reply:
        params = request.json()
        desired = params.get("desiredStatus", "RUNNING")
        with self._lock:
            arns = [
                r.arn
                for r in self._remotes.values()
                if r.token == params.get("startedBy") and r.desired == desired
            ]
        return _reply(_ECS_JSON, {"taskArns": arns})

    def _ecs_task(self, remote: Remote, *, api: bool) -> dict[str, Any]:
        """The task as DescribeTasks tells it (`api`: times as epoch seconds) or as its event's
        detail does (times as ISO 8601 strings)."""
        env = self.env
        assert isinstance(env, EcsEnv)
        params = remote.request
        cluster = _name(params.get("cluster") or "default")
        cluster_arn = f"arn:aws:ecs:{DEFAULT_REGION}:{ACCOUNT_ID}:cluster/{cluster}"
        definition = str(params.get("taskDefinition") or env.task_definition)
        definition_arn = (
            definition
            if definition.startswith("arn:")
            else f"arn:aws:ecs:{DEFAULT_REGION}:{ACCOUNT_ID}:task-definition/{definition}:1"
        )
        task_id = remote.arn.rpartition("/")[2]
        eni = f"eni-{task_id[:17]}"
        stopped = remote.status == "STOPPED"
        container: dict[str, Any] = {
            "containerArn": (
                f"arn:aws:ecs:{DEFAULT_REGION}:{ACCOUNT_ID}:container/{cluster}/{task_id}/"
                f"{uuid.uuid5(uuid.NAMESPACE_URL, remote.arn)}"
            ),
            "lastStatus": {"PROVISIONING": "PENDING", "PENDING": "PENDING"}.get(
                remote.status, "STOPPED" if stopped else "RUNNING"
            ),
            "name": env.container_name,
            "image": "public.ecr.aws/docker/library/busybox:latest",
            "imageDigest": "sha256:" + "0" * 64,
            "runtimeId": f"{task_id}-{env.container_name}",
            "taskArn": remote.arn,
            "networkInterfaces": [
                {
                    "attachmentId": str(uuid.uuid5(uuid.NAMESPACE_DNS, eni)),
                    "privateIpv4Address": "10.0.1.23",
                }
            ],
            "cpu": "0",
            "memory": "128",
        }
        if stopped and remote.exit_code is not None:
            container["exitCode"] = remote.exit_code
        overrides = params.get("overrides") or {}
        task: dict[str, Any] = {
            "attachments": [
                {
                    "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, eni)),
                    "type": "eni",
                    "status": "DELETED" if stopped else "ATTACHED",
                    "details": [
                        {"name": "subnetId", "value": env.subnet_ids[0]},
                        {"name": "networkInterfaceId", "value": eni},
                        {"name": "macAddress", "value": "0a:98:eb:a7:29:ba"},
                        {"name": "privateIPv4Address", "value": "10.0.1.23"},
                    ],
                }
            ],
            "attributes": [{"name": "ecs.cpu-architecture", "value": "x86_64"}],
            "availabilityZone": f"{DEFAULT_REGION}a",
            "clusterArn": cluster_arn,
            "connectivity": "CONNECTED" if "connectivityAt" in remote.times else "DISCONNECTED",
            "containers": [container],
            "cpu": "256",
            "createdAt": remote.created_at,
            "desiredStatus": remote.desired,
            "enableExecuteCommand": False,
            "group": f"family:{definition.rpartition('/')[2].partition(':')[0]}",
            "launchType": params.get("launchType", "FARGATE"),
            "lastStatus": remote.status,
            "memory": "512",
            "overrides": {
                "containerOverrides": overrides.get("containerOverrides", []),
                "inferenceAcceleratorOverrides": [],
            },
            "platformVersion": "1.4.0",
            "platformFamily": "Linux",
            "startedBy": remote.token,
            "taskArn": remote.arn,
            "taskDefinitionArn": definition_arn,
            "version": remote.version,
            "ephemeralStorage": {"sizeInGiB": 20},
            **dict(remote.times),
        }
        if remote.stop_code is not None:
            task["stopCode"] = remote.stop_code
            task["stoppedReason"] = remote.reason
        if api:
            task["tags"] = params.get("tags", [])
            return task
        for key, value in list(task.items()):
            if key.endswith("At") and isinstance(value, float):
                task[key] = _iso(value)
        return task

    # -- Batch -----------------------------------------------------------------------------

    def _submit_job(self, request: Request) -> Reply:
        params = request.json()
        name = str(params["jobName"])
        job_id = str(uuid.uuid4())
        arn = f"arn:aws:batch:{DEFAULT_REGION}:{ACCOUNT_ID}:job/{job_id}"
        remote = Remote("batch", job_id, arn, name, params, self.launch_status, time.time())
        self._launch(remote)
        return _reply(_BATCH_JSON, {"jobArn": arn, "jobName": name, "jobId": job_id})

    def _describe_jobs(self, request: Request) -> Reply:
        wanted = request.json().get("jobs", [])
        with self._lock:
            self.describe_calls += 1
            jobs = []
            for job_id in wanted:
                self.described[job_id] += 1
                if (remote := self._remotes.get(job_id)) is not None:
                    jobs.append(self._described(remote))
        return _reply(_BATCH_JSON, {"jobs": jobs})

    def _terminate_job(self, request: Request) -> Reply:
        params = request.json()
        job_id = params["jobId"]
        with self._lock:
            remote = self._remotes.get(job_id)
            self.stops[job_id] += 1
            ends = (
                remote is not None
                and self.stops_end
                and remote.status not in ("SUCCEEDED", "FAILED")
            )
        if ends:
            self.advance(job_id, "FAILED", exit_code=None, reason=str(params.get("reason")))
        return _reply(_BATCH_JSON, {})

    def _list_jobs(self, request: Request) -> Reply:
        params = request.json()
        names = {
            v for f in params.get("filters", []) if f.get("name") == "JOB_NAME" for v in f["values"]
        }
        with self._lock:
            found = [
                {
                    "jobArn": r.arn,
                    "jobId": r.external_id,
                    "jobName": r.token,
                    "createdAt": _ms(r.created_at),
                    "status": r.status,
                }
                for r in self._remotes.values()
                if r.token in names
            ]
        return _reply(_BATCH_JSON, {"jobSummaryList": found})

    def _batch_job(self, remote: Remote) -> dict[str, Any]:
        """The job as DescribeJobs and its events tell it (times: epoch milliseconds)."""
        env = self.env
        assert isinstance(env, BatchEnv)
        params = remote.request
        overrides = params.get("containerOverrides") or {}
        container: dict[str, Any] = {
            "image": "public.ecr.aws/docker/library/busybox:latest",
            "command": overrides.get("command", ["sh", "-c", "echo hello"]),
            "volumes": [],
            "environment": overrides.get("environment", []),
            "mountPoints": [],
            "ulimits": [],
            "networkInterfaces": [],
            "resourceRequirements": [
                {"value": "1", "type": "VCPU"},
                {"value": "128", "type": "MEMORY"},
            ],
            "secrets": [],
        }
        if remote.status in ("STARTING", "RUNNING", "SUCCEEDED", "FAILED"):
            container["logStreamName"] = self._log_stream(remote)
        if remote.status in ("SUCCEEDED", "FAILED") and remote.exit_code is not None:
            container["exitCode"] = remote.exit_code
        job: dict[str, Any] = {
            "jobArn": remote.arn,
            "jobName": remote.token,
            "jobId": remote.external_id,
            "jobQueue": env.job_queue_arn,
            "status": remote.status,
            "attempts": [dict(a) for a in remote.attempts],
            "createdAt": _ms(remote.created_at),
            "dependsOn": params.get("dependsOn", []),
            "jobDefinition": env.job_definition_arn,
            "parameters": params.get("parameters", {}),
            "container": container,
            "tags": params.get("tags", {}),
            "propagateTags": False,
            "platformCapabilities": [],
        }
        if "retryStrategy" in params:
            job["retryStrategy"] = params["retryStrategy"]
        if remote.reason is not None:
            job["statusReason"] = remote.reason
        for key in ("startedAt", "stoppedAt"):
            if key in remote.times:
                job[key] = _ms(remote.times[key])
        return job

    def _log_stream(self, remote: Remote) -> str:
        assert isinstance(self.env, BatchEnv)
        return f"{self.env.job_definition}/default/{remote.external_id}"

    # -- both ------------------------------------------------------------------------------

    def _described(self, remote: Remote) -> dict[str, Any]:
        if remote.shown is not None:
            return dict(remote.shown)
        return (
            self._ecs_task(remote, api=True) if remote.backend == "ecs" else self._batch_job(remote)
        )

    def _event(self, remote: Remote) -> Event:
        if remote.backend == "ecs":
            detail = self._ecs_task(remote, api=False)
        else:
            detail = self._batch_job(remote)
        return Event(
            self.source,
            self.detail_type,
            detail,
            (remote.arn,),
            remote.times.get("updatedAt", remote.created_at),
        )


def _reply(headers: Mapping[str, str], body: Mapping[str, Any]) -> Reply:
    return Reply(200, json.dumps(body).encode(), dict(headers))


def _error_json(code: str, message: str) -> Reply:
    body = {"__type": code, "message": message}
    return Reply(400, json.dumps(body).encode(), dict(_ECS_JSON))


def _name(cluster: str) -> str:
    return cluster.rpartition("/")[2] if cluster.startswith("arn:") else cluster


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
