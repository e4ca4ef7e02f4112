"""AWS ECS: one `RunTask` (count=1) per job attempt, tracked with batched `DescribeTasks`.

Idempotency: `clientToken` and `startedBy` are the attempt's token (`<job id>-<attempt>`), so a
repeat of the same attempt — after a crash, a timeout, a 5xx — returns the task it already
started instead of starting another (ECS keeps tokens ~24 h). After that, `ListTasks(startedBy)`
finds it. RunTask kwargs: settings < `run_task_kwargs` < the job's command and env (in the
container override of `container_name`) < the job's `overrides`, validated against botocore's
model before any call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog

from orchestrator import errors, failures, models
from orchestrator.backends import aws_kwargs, base, definitions
from orchestrator.backends.aws_api import AwsApi, client_options
from orchestrator.backends.aws_base import (
    LOG_DELIVERY_S,
    AwsBackendBase,
    log_group_found,
    pick_target,
    read_cloudwatch,
)
from orchestrator.engine import eventflow
from orchestrator.ratelimit import Priority, TokenBucket
from orchestrator.settings import EcsSettings

log = structlog.get_logger("orchestrator.backends.ecs")

S = models.JobState
# lastStatus → our state. Anything after RUNNING and before STOPPED is still running.
STATUS: Mapping[str, models.JobState] = {
    "PROVISIONING": S.RUNNABLE,  # waiting for capacity (an ENI, a Fargate slot, an instance)
    "PENDING": S.STARTING,
    "ACTIVATING": S.STARTING,
    "RUNNING": S.RUNNING,
    "DEACTIVATING": S.RUNNING,
    "STOPPING": S.RUNNING,
    "DEPROVISIONING": S.RUNNING,
    # STOPPED: SUCCEEDED only if the job's container exited 0 (see `_observe`).
}
# RunTask `failures[].reason`: worth another attempt, or not.
_RETRYABLE_FAILURE_PREFIXES = ("RESOURCE:", "AGENT", "Capacity is unavailable", "LOCATION")
# A task's times, which events give as ISO 8601 strings.
_TIMES = ("createdAt", "startedAt", "stoppingAt", "stoppedAt", "pullStartedAt", "pullStoppedAt")
TOKEN_LIFETIME_S = 23 * 3600  # ECS keeps client tokens ~24 h; stay clear of the edge


def classify_failure(reason: str) -> bool:
    """Whether a RunTask `failures[]` reason is worth retrying (capacity comes and goes)."""
    return reason.startswith(_RETRYABLE_FAILURE_PREFIXES) or "capacity" in reason.lower()


class EcsBackend(AwsBackendBase):
    name = "ecs"
    event_source = "aws.ecs"
    event_detail_type = "ECS Task State Change"
    event_silent_statuses: frozenset[str] = frozenset()

    def __init__(
        self,
        settings: EcsSettings,
        logs_bucket: TokenBucket,
        *,
        log_delivery_s: float = LOG_DELIVERY_S,
        memory: definitions.Memory | None = None,
    ) -> None:
        run = TokenBucket("ecs.RunTask", settings.run_task_rate_per_s, settings.run_task_burst)
        register = TokenBucket(
            "ecs.RegisterTaskDefinition", settings.register_rate_per_s, settings.register_burst
        )
        describe = TokenBucket(
            "ecs.DescribeTasks", settings.describe_rate_per_s, settings.describe_burst
        )
        super().__init__(
            "ecs",
            settings,
            logs_bucket,
            {
                # AWS meters RunTask with StopTask, and DescribeTasks with ListTasks.
                "RunTask": run,
                "StopTask": run,
                "DescribeTasks": describe,
                "ListTasks": describe,
                "DescribeTaskDefinition": describe,
                "DescribeClusters": describe,
                "RegisterTaskDefinition": register,
            },
            # A registration whose reply is lost is found by its name and tag (`definitions`),
            # not sent again by botocore: that would make a second revision of it.
            single_attempt=frozenset({"RegisterTaskDefinition"}),
            log_delivery_s=log_delivery_s,
        )
        self._settings = settings
        self.max_start_attempts: int | None = settings.max_run_task_attempts
        # The settings of each target (None: the section's own) and their RunTask kwargs
        # (built in start()).
        self._targets = settings.each_target()
        self._bases: dict[str | None, dict[str, Any]] = {}
        self._log_config: dict[str, tuple[str, str] | None] = {}  # task definition → group, prefix
        # The task definitions jobs' images run under (content-addressed, registered once).
        self.definitions = definitions.Registry("ecs", _Definitions(self), "family")
        self.definitions.memory = memory

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._start_clients()
        shape = self.api.operation("RunTask").input_shape
        for name, target in self._targets.items():
            where = "ecs settings" if name is None else f"ecs.targets.{name}"
            try:
                self._bases[name] = aws_kwargs.ecs_base_kwargs(target, shape)
                self.validate(models.JobSpec(command=["true"], target=name))
            except errors.InvalidJob as exc:
                raise errors.ConfigError(f"{where} / run_task_kwargs: {exc.message}") from exc
        if self._settings.check_health_on_startup:
            for cluster in dict.fromkeys(t.cluster for t in self._targets.values()):
                await self.check_health(cluster)

    async def check_health(self, cluster: str | None = None) -> None:
        """The cluster exists and is ACTIVE, and StopTask on a bogus id is refused as "not
        found" (Airflow's probe): credentials, permissions and cluster are all fine."""
        cluster = cluster or self._settings.cluster
        try:
            reply = await self.api.call("DescribeClusters", Priority.HIGH, clusters=[cluster])
        except errors.AwsThrottled as exc:
            # Throttled means authenticated and allowed: too busy to tell more, not broken.
            log.warning("ecs.health_inconclusive", error=str(exc))
            return
        except errors.AwsCredentials as exc:
            # Refused credentials (expired, rotating) are the daemon's trouble for now, not a
            # configuration to refuse: it starts, and its first calls say it is degraded.
            log.warning("ecs.health_unknown", error=str(exc), reason="credentials refused")
            return
        except errors.AwsError as exc:
            raise errors.HealthCheckFailed(
                f"ecs: cannot describe cluster {cluster!r}: {exc}"
            ) from exc
        found = [c for c in reply.get("clusters", []) if c.get("status") == "ACTIVE"]
        if not found:
            raise errors.HealthCheckFailed(f"ecs: cluster {cluster!r} is missing or not ACTIVE")
        try:
            await self.api.call(
                "StopTask", Priority.HIGH, cluster=cluster, task="0" * 32, reason="health check"
            )
        except errors.AwsRejected as exc:
            if exc.aws_code not in ("InvalidParameterException", "ClientException"):
                raise errors.HealthCheckFailed(f"ecs: StopTask probe refused: {exc}") from exc
        except (errors.AwsServerFault, errors.AwsThrottled) as exc:
            # The cluster is there; whether we may stop tasks in it, AWS could not say now.
            log.warning("ecs.health_inconclusive", cluster=cluster, error=str(exc))
            return
        except errors.AwsError as exc:
            raise errors.HealthCheckFailed(f"ecs: StopTask probe failed: {exc}") from exc
        log.info("ecs.healthy", cluster=cluster)

    async def check(self) -> list[base.Check]:
        """`orchestrator check`: the cluster ACTIVE, the task definition present with
        `container_name`, the subnets and security groups existing, the awslogs log group
        reachable."""
        ec2 = AwsApi("ec2", buckets={}, **client_options(self._settings))
        try:
            for api in (self.api, ec2, self.logs):
                await api.ensure_started()

            async def one(s: EcsSettings, prefix: str) -> list[base.Check]:
                async def cluster() -> str:
                    reply = await self.api.call(
                        "DescribeClusters", Priority.HIGH, clusters=[s.cluster]
                    )
                    found = reply.get("clusters") or []
                    if not found or found[0].get("status") != "ACTIVE":
                        status = found[0].get("status") if found else "missing"
                        raise errors.CheckFailed(f"cluster {s.cluster!r} is {status}")
                    return f"cluster {s.cluster!r} is ACTIVE"

                definition: dict[str, Any] = {}

                async def task_definition() -> str:
                    reply = await self.api.call(
                        "DescribeTaskDefinition", Priority.HIGH, taskDefinition=s.task_definition
                    )
                    definition.update(reply["taskDefinition"])
                    names = [c.get("name") for c in definition.get("containerDefinitions", [])]
                    if s.container_name not in names:
                        arn = definition["taskDefinitionArn"]
                        raise errors.CheckFailed(
                            f"{arn} has no container {s.container_name!r} "
                            f"(it has {', '.join(map(str, names))})"
                        )
                    return f"{definition['taskDefinitionArn']} has container {s.container_name!r}"

                async def network() -> str:
                    if not s.subnets and not s.security_groups:
                        return "no awsvpc subnets or security groups configured"
                    if s.subnets:
                        subnets = await ec2.call(
                            "DescribeSubnets", Priority.HIGH, SubnetIds=s.subnets
                        )
                        if len(subnets.get("Subnets", [])) != len(s.subnets):
                            raise errors.CheckFailed(
                                f"some of the subnets {s.subnets} do not exist"
                            )
                    if s.security_groups:
                        groups = await ec2.call(
                            "DescribeSecurityGroups", Priority.HIGH, GroupIds=s.security_groups
                        )
                        if len(groups.get("SecurityGroups", [])) != len(s.security_groups):
                            raise errors.CheckFailed(
                                f"some of the security groups {s.security_groups} do not exist"
                            )
                    return f"subnets {s.subnets} and security groups {s.security_groups} exist"

                async def log_group() -> str:
                    container: dict[str, Any] = next(
                        (
                            c
                            for c in definition.get("containerDefinitions", [])
                            if c.get("name") == s.container_name
                        ),
                        {},
                    )
                    options = (container.get("logConfiguration") or {}).get("options") or {}
                    group = options.get("awslogs-group")
                    if not group:
                        raise errors.CheckFailed(
                            f"container {s.container_name!r} has no awslogs log group: "
                            "`orchestrator logs` cannot work"
                        )
                    return await log_group_found(self.logs, group)

                return [
                    await base.checked(f"{prefix}cluster", cluster),
                    await base.checked(f"{prefix}task_definition", task_definition),
                    await base.checked(f"{prefix}network", network),
                    await base.checked(f"{prefix}logs", log_group),
                ]

            checks: list[base.Check] = []
            for name, target in self._targets.items():  # the section's own, then each target
                checks += await one(target, "ecs." if name is None else f"ecs.targets.{name}.")
            return checks
        finally:
            await ec2.close()

    # -- kwargs ----------------------------------------------------------------------------

    def run_task_kwargs(
        self, job: models.Job, task_definition: str | None = None
    ) -> dict[str, Any]:
        """The final RunTask kwargs for this attempt (validated); `task_definition`: the one
        the job's image runs under (`definitions`), over the target's."""
        operation = self.api.operation("RunTask")
        shape = operation.input_shape
        container: dict[str, Any] = {
            "name": self._settings.container_name,
            "command": list(job.spec.command),
        }
        if job.spec.env:
            container["environment"] = aws_kwargs.environment(job.spec.env)
        task: dict[str, Any] = {"containerOverrides": [container]}
        if (resources := job.spec.resources) is not None:  # below `overrides`: they win
            if resources.cpu is not None:
                task["cpu"] = str(round(resources.cpu * 1024))
            if resources.memory_mib is not None:
                task["memory"] = str(resources.memory_mib)
            if resources.gpus is not None:
                container["resourceRequirements"] = [{"type": "GPU", "value": str(resources.gpus)}]
        settings = self._target(job.spec.target)
        kwargs = aws_kwargs.merge_kwargs(self._bases[job.spec.target], {"overrides": task})
        if task_definition is not None:
            kwargs["taskDefinition"] = task_definition
        overrides = aws_kwargs.normalise(job.spec.overrides, shape)
        kwargs = aws_kwargs.merge_kwargs(kwargs, overrides)
        kwargs = aws_kwargs.ecs_defaults(kwargs, settings.platform_version)
        aws_kwargs.refuse_run_task_conflicts(kwargs, overrides, settings, shape)
        if job.spec.resources is not None and job.spec.resources.gpus and _on_fargate(kwargs):
            raise errors.InvalidJob(
                "GPUs need the EC2 launch type (or an EC2 capacity provider): Fargate has none",
                "job.resources.gpus",
            )
        token = job.token or f"{job.id}-{job.attempt}"
        labels = job.spec.labels
        tags = [  # the settings' and overrides' own, but where a label or the daemon says
            t
            for t in kwargs.get("tags", [])
            if not str(t.get("key", "")).startswith("orchestrator:") and t.get("key") not in labels
        ]
        kwargs.update(
            clientToken=token,
            startedBy=token,
            count=1,
            tags=[
                *tags,
                *({"key": key, "value": value} for key, value in labels.items()),
                {"key": "orchestrator:job-id", "value": job.id},
                {"key": "orchestrator:attempt", "value": str(job.attempt)},
            ],
        )
        aws_kwargs.validate(kwargs, operation)
        return kwargs

    def validate(self, spec: models.JobSpec) -> None:
        self.run_task_kwargs(aws_kwargs.probe_job(spec, self.name))

    def partition(self, job: models.Job) -> str:
        # Its cluster as launched; before that, its target's (the section's if that target is
        # no longer configured: a restart with other settings).
        target = self._targets.get(job.spec.target, self._settings)
        return str(job.info.get("cluster") or target.cluster)

    def _target(self, name: str | None) -> EcsSettings:
        return pick_target(self._targets, name, "ECS")

    # -- submit ----------------------------------------------------------------------------

    async def submit(self, job: models.Job) -> base.Submitted:
        kwargs, reply = await self.launch(job, "RunTask", self.run_task_kwargs)
        tasks = reply.get("tasks") or []
        if not tasks:
            failures = reply.get("failures") or [{"reason": "RunTask returned no task"}]
            reason = "; ".join(
                f"{f.get('reason')}" + (f" ({f['detail']})" if f.get("detail") else "")
                for f in failures
            )
            retryable = all(classify_failure(str(f.get("reason", ""))) for f in failures)
            raise errors.StartFailed(reason, retryable=retryable)
        task = tasks[0]
        return base.Submitted(
            external_id=task["taskArn"],
            state=STATUS.get(task.get("lastStatus", ""), S.SUBMITTED),
            vendor_status=task.get("lastStatus"),
            info={"cluster": kwargs["cluster"], "task_definition": task.get("taskDefinitionArn")},
        )

    def can_resubmit(self, job: models.Job) -> bool:
        started = job.info.get("attempt_started_at")
        return isinstance(started, int | float) and time.time() - started < TOKEN_LIFETIME_S

    # -- describe --------------------------------------------------------------------------

    async def describe(self, jobs: Sequence[models.Job]) -> Mapping[str, base.Observation]:
        arns = [job.external_id for job in jobs if job.external_id]
        if not arns:
            return {}
        reply = await self.api.call(
            "DescribeTasks", Priority.HIGH, cluster=self.partition(jobs[0]), tasks=arns
        )
        return {task["taskArn"]: self._observe(task) for task in reply.get("tasks", [])}

    def observe_event(self, detail: Mapping[str, Any]) -> base.Observation:
        """An ECS Task State Change event's `detail` is the task as DescribeTasks tells it,
        but for its times (ISO 8601 strings there, datetimes here)."""
        for key in ("taskArn", "lastStatus"):
            if not isinstance(detail.get(key), str):
                raise eventflow.Undecodable(f"an ECS Task State Change without a {key}")
        task = dict(detail)
        for key in _TIMES:
            if isinstance(value := task.get(key), str):
                task[key] = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return self._observe(task)

    def _observe(self, task: Mapping[str, Any]) -> base.Observation:
        arn = task["taskArn"]
        status = str(task.get("lastStatus", ""))
        info: dict[str, Any] = {"task_definition": task.get("taskDefinitionArn")}
        # `version` grows at every change of the task (events carry it; so may describes).
        order = (version,) if isinstance(version := task.get("version"), int) else None
        if status != "STOPPED":
            state = STATUS.get(status, S.SUBMITTED)
            return base.Observation(arn, state, status, info=info, order=order)
        if isinstance(stopped_at := task.get("stoppedAt"), datetime):
            info["finished_at"] = stopped_at.timestamp()
        container: Mapping[str, Any] = next(
            (
                c
                for c in task.get("containers", [])
                if c.get("name") == self._settings.container_name
            ),
            {},
        )
        exit_code = container.get("exitCode")
        parts = [task.get("stopCode"), task.get("stoppedReason"), container.get("reason")]
        reason = ": ".join(str(p) for p in parts if p) or None
        # Stopped on request (ours carry the "orchestrator:" reason): not a success, whatever
        # the container's exit code after its SIGTERM.
        stopped_on_request = task.get("stopCode") == "UserInitiated" or str(
            task.get("stoppedReason", "")
        ).startswith("orchestrator:")
        if exit_code == 0 and not stopped_on_request:
            return base.Observation(
                arn, S.SUCCEEDED, status, reason=None, exit_code=0, info=info, order=order
            )
        if exit_code is not None:
            reason = f"exit code {exit_code}" + (f" ({reason})" if reason else "")
        classified = failures.ecs_task(task, self._settings.container_name or "")
        return base.Observation(
            arn,
            S.FAILED,
            status,
            reason=reason,
            exit_code=exit_code,
            info=info,
            failure=None if classified is None else classified.failure,
            order=order,
        )

    # -- stop, locate ----------------------------------------------------------------------

    async def stop(self, job: models.Job) -> None:
        if job.external_id is None:
            return
        try:
            await self.api.call(
                "StopTask",
                Priority.HIGH,
                cluster=self.partition(job),
                task=job.external_id,
                reason=f"orchestrator: {job.stop_reason or 'stop'}",
            )
        except errors.AwsRejected as exc:
            log.info("ecs.stop_refused", job_id=job.id, error=str(exc))  # already gone

    async def locate(self, job: models.Job) -> base.Located:
        """Find the attempt's task by `startedBy` (running or stopped); never starts one."""
        token = job.token or f"{job.id}-{job.attempt}"
        for desired in ("RUNNING", "STOPPED"):
            reply = await self.api.call(
                "ListTasks",
                Priority.NORMAL,
                cluster=self.partition(job),
                startedBy=token,
                desiredStatus=desired,
            )
            arns = reply.get("taskArns") or []
            if arns:
                if len(arns) > 1:
                    log.error("ecs.duplicate_tasks", job_id=job.id, attempt=job.attempt, tasks=arns)
                return base.Located(arns[0], launched=True)
        return base.Located(None, launched=None)

    # -- logs ------------------------------------------------------------------------------

    async def read_logs(self, job: models.Job, cursor: Any) -> base.LogPage:
        if job.external_id is None:
            return base.LogPage([], cursor)
        where = await self._log_stream(job)
        if where is None:
            return base.LogPage(
                [base.LogChunk("stderr", "no awslogs configuration for this container\n")], "none"
            )
        if cursor == "none":
            return base.LogPage([], cursor)
        group, stream = where
        return await read_cloudwatch(self.logs, group, stream, cursor)

    async def _log_stream(self, job: models.Job) -> tuple[str, str] | None:
        task_definition = str(job.info.get("task_definition") or self._settings.task_definition)
        if task_definition not in self._log_config:
            reply = await self.api.call(
                "DescribeTaskDefinition", Priority.NORMAL, taskDefinition=task_definition
            )
            containers = reply["taskDefinition"].get("containerDefinitions", [])
            container: Mapping[str, Any] = next(
                (c for c in containers if c.get("name") == self._settings.container_name), {}
            )
            options = (container.get("logConfiguration") or {}).get("options") or {}
            group, prefix = options.get("awslogs-group"), options.get("awslogs-stream-prefix")
            self._log_config[task_definition] = (group, prefix) if group and prefix else None
        config = self._log_config[task_definition]
        if config is None:
            return None
        group, prefix = config
        task_id = str(job.external_id).rsplit("/", 1)[-1]
        return group, f"{prefix}/{self._settings.container_name}/{task_id}"


class _Definitions:
    """Task definitions for `definitions.Registry`: derived from a target's, with
    `container_name` running the job's image."""

    def __init__(self, backend: EcsBackend) -> None:
        self._backend = backend

    async def base_definition(self, target: str | None) -> dict[str, Any]:
        backend = self._backend
        name = backend._target(target).task_definition
        reply = await backend.api.call(
            "DescribeTaskDefinition", Priority.NORMAL, taskDefinition=name
        )
        shape = backend.api.operation("RegisterTaskDefinition").input_shape
        kwargs: dict[str, Any] = aws_kwargs.prune(reply["taskDefinition"], shape)
        kwargs.pop("tags", None)
        return kwargs

    def with_image(self, base: Mapping[str, Any], image: str) -> dict[str, Any]:
        container_name = self._backend._settings.container_name
        containers = list(base.get("containerDefinitions") or [])
        if not any(c.get("name") == container_name for c in containers):
            raise errors.StartFailed(
                f"task definition {base.get('family')!r} has no container {container_name!r} "
                "to run the job's image in",
                retryable=False,
                failure="rejected",
            )
        return {
            **base,
            "containerDefinitions": [
                {**c, "image": image} if c.get("name") == container_name else c for c in containers
            ],
        }

    async def find(self, name: str, digest: str) -> str | None:
        try:
            reply = await self._backend.api.call(
                "DescribeTaskDefinition", Priority.NORMAL, taskDefinition=name, include=["TAGS"]
            )
        except errors.AwsRejected as exc:
            if exc.aws_code in ("ClientException", "InvalidParameterException"):
                return None  # never registered (or deleted)
            raise
        found = reply["taskDefinition"]
        tags = {t.get("key"): t.get("value") for t in reply.get("tags") or []}
        if found.get("status") == "ACTIVE" and tags.get(definitions.DIGEST_TAG) == digest:
            return str(found["taskDefinitionArn"])
        return None

    async def active(self, arn: str) -> bool:
        try:
            reply = await self._backend.api.call(
                "DescribeTaskDefinition", Priority.NORMAL, taskDefinition=arn
            )
        except errors.AwsRejected as exc:
            if exc.aws_code in ("ClientException", "InvalidParameterException"):
                return False
            raise
        return bool(reply["taskDefinition"].get("status") == "ACTIVE")

    async def register(self, kwargs: Mapping[str, Any], digest: str) -> str:
        reply = await self._backend.api.call(
            "RegisterTaskDefinition",
            Priority.LOW,
            **kwargs,
            tags=[{"key": definitions.DIGEST_TAG, "value": digest}],
        )
        return str(reply["taskDefinition"]["taskDefinitionArn"])


def _on_fargate(kwargs: Mapping[str, Any]) -> bool:
    """Whether RunTask with these kwargs runs on Fargate (its launch type, or a capacity
    provider strategy of FARGATE or FARGATE_SPOT only)."""
    strategy = kwargs.get("capacityProviderStrategy") or []
    if strategy:
        return all(str(s.get("capacityProvider", "")).startswith("FARGATE") for s in strategy)
    return kwargs.get("launchType") == "FARGATE"
