"""AWS Batch: one `SubmitJob` per job attempt, tracked with batched `DescribeJobs`.

Batch has no idempotency token. Each attempt gets a deterministic `jobName`
(`orch-<job id>-<attempt>`) and tags, and before an attempt whose outcome is unknown is tried
again, `ListJobs` (JOB_NAME filter, every status) is asked whether it exists — "not found" is
only believed after `lookup_grace_s`, as the listing may lag. Should two jobs ever carry one
attempt's name, the oldest is kept and the rest terminated, loudly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from orchestrator import errors, failures, models
from orchestrator.backends import aws_kwargs, base, definitions
from orchestrator.backends.aws_base import (
    LOG_DELIVERY_S,
    AwsBackendBase,
    log_group_found,
    pick_target,
    read_cloudwatch,
)
from orchestrator.engine import eventflow, retries
from orchestrator.ratelimit import Priority, TokenBucket
from orchestrator.settings import BatchSettings

log = structlog.get_logger("orchestrator.backends.batch")

S = models.JobState
STATUS: Mapping[str, models.JobState] = {
    "SUBMITTED": S.SUBMITTED,
    "PENDING": S.PENDING,
    "RUNNABLE": S.RUNNABLE,
    "STARTING": S.STARTING,
    "RUNNING": S.RUNNING,
    "SUCCEEDED": S.SUCCEEDED,
    "FAILED": S.FAILED,
}
_RANK = {status: rank for rank, status in enumerate(STATUS)}  # SUCCEEDED, FAILED: both last
_RANK["FAILED"] = _RANK["SUCCEEDED"]
DEFAULT_LOG_GROUP = "/aws/batch/job"


def job_name(job: models.Job) -> str:
    return f"orch-{job.id}-{job.attempt}"


_NAMES = {"job_name": "jobName", "job_queue": "jobQueue"}  # job.info key → DescribeJobs field


class BatchBackend(AwsBackendBase):
    name = "batch"
    event_source = "aws.batch"
    event_detail_type = "Batch Job State Change"
    event_silent_statuses = frozenset({"SUBMITTED"})  # Batch sends no event for it

    def __init__(
        self,
        settings: BatchSettings,
        logs_bucket: TokenBucket,
        *,
        log_delivery_s: float = LOG_DELIVERY_S,
        memory: definitions.Memory | None = None,
    ) -> None:
        submit = TokenBucket("batch.SubmitJob", settings.submit_rate_per_s, settings.submit_burst)
        register = TokenBucket(
            "batch.RegisterJobDefinition", settings.register_rate_per_s, settings.register_burst
        )
        describe = TokenBucket(
            "batch.DescribeJobs", settings.describe_rate_per_s, settings.describe_burst
        )
        super().__init__(
            "batch",
            settings,
            logs_bucket,
            {
                "SubmitJob": submit,
                "TerminateJob": submit,
                "DescribeJobs": describe,
                "ListJobs": describe,
                "DescribeJobQueues": describe,
                "DescribeJobDefinitions": describe,
                "RegisterJobDefinition": register,
            },
            # No idempotency token: a botocore retry after a timeout could create a second
            # job. One attempt per call; an unanswered one is settled by a ListJobs lookup.
            # Nor a registration (found by its name and tag instead: `definitions`).
            single_attempt=frozenset({"SubmitJob", "RegisterJobDefinition"}),
            log_delivery_s=log_delivery_s,
        )
        self._settings = settings
        self.max_start_attempts: int | None = settings.max_submit_attempts
        # The settings of each target (None: the section's own), and their SubmitJob kwargs.
        self._targets = settings.each_target()
        self._bases: dict[str | None, dict[str, Any]] = {}
        # The job definitions jobs' images run under (content-addressed, registered once).
        self.definitions = definitions.Registry("batch", _Definitions(self), "jobDefinitionName")
        self.definitions.memory = memory

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._start_clients()
        shape = self.api.operation("SubmitJob").input_shape
        for name, target in self._targets.items():
            where = "batch settings" if name is None else f"batch.targets.{name}"
            base_kwargs = {"jobQueue": target.job_queue, "jobDefinition": target.job_definition}
            try:
                self._bases[name] = aws_kwargs.merge_kwargs(
                    base_kwargs, aws_kwargs.normalise(target.submit_job_kwargs, shape)
                )
                self.validate(models.JobSpec(command=["true"], target=name))
            except errors.InvalidJob as exc:
                raise errors.ConfigError(f"{where} / submit_job_kwargs: {exc.message}") from exc
        if self._settings.check_health_on_startup:
            for queue in dict.fromkeys(t.job_queue for t in self._targets.values()):
                await self.check_health(queue)

    async def check_health(self, queue: str | None = None) -> None:
        """The queue exists and is ENABLED/VALID, and DescribeJobs answers a bogus id."""
        queue = queue or self._settings.job_queue
        try:
            reply = await self.api.call("DescribeJobQueues", Priority.HIGH, jobQueues=[queue])
            await self.api.call("DescribeJobs", Priority.HIGH, jobs=["0" * 32])
        except errors.AwsThrottled as exc:
            # Throttled means authenticated and allowed: too busy to tell more, not broken.
            log.warning("batch.health_inconclusive", error=str(exc))
            return
        except errors.AwsCredentials as exc:
            # Refused credentials (expired, rotating) are the daemon's trouble for now, not a
            # configuration to refuse: it starts, and its first calls say it is degraded.
            log.warning("batch.health_unknown", error=str(exc), reason="credentials refused")
            return
        except errors.AwsError as exc:
            raise errors.HealthCheckFailed(f"batch: {exc}") from exc
        queues = reply.get("jobQueues") or []
        if not queues:
            raise errors.HealthCheckFailed(f"batch: job queue {queue!r} does not exist")
        state, status = queues[0].get("state"), queues[0].get("status")
        if state != "ENABLED" or status not in (None, "VALID", "UPDATING", "CREATING"):
            raise errors.HealthCheckFailed(f"batch: job queue {queue!r} is {state}/{status}")
        log.info("batch.healthy", job_queue=queue)

    async def check(self) -> list[base.Check]:
        """`orchestrator check`: the queue ENABLED and VALID with an ENABLED compute environment
        that can scale, the job definition ACTIVE, the default log group reachable."""
        for api in (self.api, self.logs):
            await api.ensure_started()

        async def one(s: BatchSettings, prefix: str) -> list[base.Check]:
            async def queue() -> str:
                reply = await self.api.call(
                    "DescribeJobQueues", Priority.HIGH, jobQueues=[s.job_queue]
                )
                queues = reply.get("jobQueues") or []
                if not queues:
                    raise errors.CheckFailed(f"job queue {s.job_queue!r} does not exist")
                q = queues[0]
                if q.get("state") != "ENABLED" or q.get("status") != "VALID":
                    raise errors.CheckFailed(
                        f"job queue {s.job_queue!r} is {q.get('state')}/{q.get('status')}"
                    )
                environments = [
                    o["computeEnvironment"] for o in q.get("computeEnvironmentOrder", [])
                ]
                if not environments:
                    raise errors.CheckFailed(
                        f"job queue {s.job_queue!r} has no compute environment"
                    )
                described = await self.api.call(
                    "DescribeComputeEnvironments", Priority.HIGH, computeEnvironments=environments
                )
                usable = [
                    env["computeEnvironmentName"]
                    for env in described.get("computeEnvironments", [])
                    if env.get("state") == "ENABLED"
                    and env.get("status") == "VALID"
                    and (
                        env.get("type") == "UNMANAGED"
                        or (env.get("computeResources") or {}).get("maxvCpus", 0) > 0
                    )
                ]
                if not usable:
                    raise errors.CheckFailed(
                        f"no compute environment of {s.job_queue!r} is ENABLED, VALID and "
                        "able to scale"
                    )
                return f"job queue {s.job_queue!r} is ENABLED/VALID; compute: {', '.join(usable)}"

            async def definition() -> str:
                name = str(s.job_definition)
                # "name:revision" and ARNs are looked up as such, a bare name by its ACTIVE
                # revisions
                by = {"jobDefinitions": [name]} if ":" in name else {"jobDefinitionName": name}
                reply = await self.api.call(
                    "DescribeJobDefinitions", Priority.HIGH, status="ACTIVE", **by
                )
                if not reply.get("jobDefinitions"):
                    raise errors.CheckFailed(
                        f"job definition {name!r} is not ACTIVE (or does not exist)"
                    )
                return f"job definition {name!r} is ACTIVE"

            return [
                await base.checked(f"{prefix}queue", queue),
                await base.checked(f"{prefix}job_definition", definition),
            ]

        async def log_group() -> str:
            return await log_group_found(self.logs, DEFAULT_LOG_GROUP)

        checks: list[base.Check] = []
        for name, target in self._targets.items():  # the section's own, then each target
            checks += await one(target, "batch." if name is None else f"batch.targets.{name}.")
        return [*checks, await base.checked("batch.logs", log_group)]

    # -- kwargs ----------------------------------------------------------------------------

    def submit_job_kwargs(
        self, job: models.Job, job_definition: str | None = None
    ) -> dict[str, Any]:
        """The final SubmitJob kwargs for this attempt (validated); `job_definition`: the one
        the job's image runs under (`definitions`), over the target's."""
        operation = self.api.operation("SubmitJob")
        container: dict[str, Any] = {"command": list(job.spec.command)}
        if job.spec.env:
            container["environment"] = aws_kwargs.environment(job.spec.env)
        if (resources := job.spec.resources) is not None:  # below `overrides`: they win
            wanted = [
                ("VCPU", None if resources.cpu is None else f"{resources.cpu:g}"),
                ("MEMORY", None if resources.memory_mib is None else str(resources.memory_mib)),
                ("GPU", None if resources.gpus is None else str(resources.gpus)),
            ]
            container["resourceRequirements"] = [
                {"type": kind, "value": value} for kind, value in wanted if value is not None
            ]
        pick_target(self._targets, job.spec.target, "Batch")
        base_kwargs = self._bases[job.spec.target]
        kwargs = aws_kwargs.merge_kwargs(base_kwargs, {"containerOverrides": container})
        if job_definition is not None:
            kwargs["jobDefinition"] = job_definition
        kwargs = aws_kwargs.merge_kwargs(
            kwargs, aws_kwargs.normalise(job.spec.overrides, operation.input_shape)
        )
        if job.spec.array_size is not None:
            kwargs["arrayProperties"] = {"size": job.spec.array_size}
            if "retryStrategy" not in kwargs:  # retries per child are Batch's: the policy's
                kwargs["retryStrategy"] = array_retry_strategy(retries.policy_of(job))
        settings = pick_target(self._targets, job.spec.target, "Batch")
        if settings.share_identifier is not None:  # a fair-share queue
            kwargs.setdefault("shareIdentifier", settings.share_identifier)
            kwargs.setdefault("schedulingPriorityOverride", job.spec.priority - models.MIN_PRIORITY)
        tags = {
            k: v for k, v in (kwargs.get("tags") or {}).items() if not k.startswith("orchestrator:")
        }
        tags.update(job.spec.labels)
        tags.update({"orchestrator:job-id": job.id, "orchestrator:attempt": str(job.attempt)})
        kwargs.update(jobName=job_name(job), tags=tags)
        aws_kwargs.validate(kwargs, operation)
        return kwargs

    def validate(self, spec: models.JobSpec) -> None:
        self.submit_job_kwargs(aws_kwargs.probe_job(spec, self.name))

    def partition(self, job: models.Job) -> str:
        return self.name  # DescribeJobs takes ids from any queue

    # -- submit ----------------------------------------------------------------------------

    async def submit(self, job: models.Job) -> base.Submitted:
        kwargs, reply = await self.launch(job, "SubmitJob", self.submit_job_kwargs)
        return base.Submitted(
            external_id=reply["jobId"],
            state=S.SUBMITTED,
            vendor_status="SUBMITTED",
            info={
                "job_name": kwargs["jobName"],
                "job_queue": kwargs["jobQueue"],
                # Batch retries this job itself (retryStrategy): the daemon's policy does not.
                **({"vendor_attempts": attempts} if (attempts := _own_attempts(kwargs)) else {}),
            },
        )

    def can_resubmit(self, job: models.Job) -> bool:
        return False  # no idempotency token: only a lookup can settle an unknown outcome

    # -- describe --------------------------------------------------------------------------

    async def describe(self, jobs: Sequence[models.Job]) -> Mapping[str, base.Observation]:
        ids = [job.external_id for job in jobs if job.external_id]
        if not ids:
            return {}
        reply = await self.api.call("DescribeJobs", Priority.HIGH, jobs=ids)
        return {detail["jobId"]: self._observe(detail) for detail in reply.get("jobs", [])}

    def observe_event(self, detail: Mapping[str, Any]) -> base.Observation:
        """A Batch Job State Change event's `detail` is the job as DescribeJobs tells it."""
        for key in ("jobId", "status"):
            if not isinstance(detail.get(key), str):
                raise eventflow.Undecodable(f"a Batch Job State Change without a {key}")
        return self._observe(detail)

    def _observe(self, detail: Mapping[str, Any]) -> base.Observation:
        status = str(detail.get("status", ""))
        state = STATUS.get(status, S.SUBMITTED)
        container = detail.get("container") or {}
        exit_code = container.get("exitCode")
        # Name and queue too: a job adopted after a crash (found by `locate`) has them from here.
        info: dict[str, Any] = {
            key: detail[field] for key, field in _NAMES.items() if detail.get(field)
        }
        if stream := container.get("logStreamName"):
            info["log_stream"] = stream
        if group := ((container.get("logConfiguration") or {}).get("options") or {}).get(
            "awslogs-group"
        ):
            info["log_group"] = group
        if isinstance(stopped_at := detail.get("stoppedAt"), int):
            info["finished_at"] = stopped_at / 1000  # Batch: epoch milliseconds
        array = detail.get("arrayProperties") or {}
        if summary := array.get("statusSummary"):
            info["array_status"] = summary
            size = array.get("size")
            ended = summary.get("SUCCEEDED", 0) + summary.get("FAILED", 0)
            if not state.terminal and isinstance(size, int) and size and ended >= size:
                # Every child has ended: so has the parent (Batch says so too, a little later).
                state = S.SUCCEEDED if summary.get("SUCCEEDED", 0) == size else S.FAILED
        if attempts := _own_attempts(detail):  # the job's strategy, or its definition's
            info["vendor_attempts"] = attempts
        reason = (
            "; ".join(str(p) for p in (detail.get("statusReason"), container.get("reason")) if p)
            or None
        )
        if state == S.FAILED and exit_code not in (None, 0):
            reason = f"exit code {exit_code}" + (f" ({reason})" if reason else "")
        if state == S.SUCCEEDED:
            reason = None
        failure = None
        if summary and state == S.FAILED:
            # An array failed because children did (each ran, and was retried by Batch's
            # strategy): theirs are the failures, `user` unless a child says otherwise.
            failed = f"{summary.get('FAILED', 0)} of {array.get('size')} child jobs failed"
            reason, failure = (f"{failed} ({reason})" if reason else failed), "user"
        elif state == S.FAILED and (classified := failures.batch_job(detail)) is not None:
            failure = classified.failure
        return base.Observation(
            detail["jobId"],
            state,
            status,
            reason=reason,
            exit_code=exit_code,
            info=info,
            failure=failure,
            # Attempts made, then how far this one got: a retried job's RUNNABLE comes after
            # its failed attempt's RUNNING.
            order=(len(detail.get("attempts") or []), _RANK.get(status, 0)),
        )

    async def describe_child(self, parent: models.Job, index: int) -> base.Observation | None:
        """Child `index` of an array job as Batch tells it now (None: not submitted yet, or
        Batch does not know it)."""
        if parent.external_id is None:
            return None
        child = f"{parent.external_id}:{index}"
        reply = await self.api.call("DescribeJobs", Priority.NORMAL, jobs=[child])
        found = [d for d in reply.get("jobs", []) if d.get("jobId") == child]
        return self._observe(found[0]) if found else None

    # -- stop, locate ----------------------------------------------------------------------

    async def stop(self, job: models.Job) -> None:
        """TerminateJob works in every state (CancelJob silently ignores running jobs)."""
        if job.external_id is None:
            return
        await self.api.call(
            "TerminateJob",
            Priority.HIGH,
            jobId=job.external_id,
            reason=f"orchestrator: {job.stop_reason or 'stop'}",
        )

    async def locate(self, job: models.Job) -> base.Located:
        name = job_name(job)
        summaries: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "jobQueue": job.info.get("job_queue")
            or self._targets.get(job.spec.target, self._settings).job_queue,
            "filters": [{"name": "JOB_NAME", "values": [name]}],
        }
        while True:
            reply = await self.api.call("ListJobs", Priority.NORMAL, **kwargs)
            summaries += [  # an array's children carry its name: they are not other attempts
                s
                for s in reply.get("jobSummaryList", [])
                if s.get("jobName") == name and ":" not in str(s.get("jobId", ""))
            ]
            if not (token := reply.get("nextToken")):
                break
            kwargs["nextToken"] = token
        if summaries:
            summaries.sort(key=lambda s: (s.get("createdAt", 0), s["jobId"]))
            keep, *duplicates = summaries
            for duplicate in duplicates:
                log.error(
                    "batch.duplicate_job",
                    job_id=job.id,
                    attempt=job.attempt,
                    kept=keep["jobId"],
                    terminated=duplicate["jobId"],
                )
                await self.api.call(
                    "TerminateJob",
                    Priority.HIGH,
                    jobId=duplicate["jobId"],
                    reason="orchestrator: duplicate of this attempt",
                )
            return base.Located(keep["jobId"], launched=True)
        started = job.info.get("attempt_started_at")
        unsure = (
            isinstance(started, int | float)
            and time.time() - started < self._settings.lookup_grace_s
        )
        return base.Located(None, launched=None if unsure else False)

    # -- logs ------------------------------------------------------------------------------

    async def read_logs(self, job: models.Job, cursor: Any) -> base.LogPage:
        stream = job.info.get("log_stream")
        if not stream:
            return base.LogPage([], cursor)  # not started yet; a follower asks again
        group = str(job.info.get("log_group") or DEFAULT_LOG_GROUP)
        return await read_cloudwatch(self.logs, group, str(stream), cursor)


def array_retry_strategy(policy: retries.Policy) -> dict[str, Any]:
    """The daemon's retry policy as Batch's own `retryStrategy`, for an array job, whose
    children Batch retries one by one: the listed exit codes and, when `infrastructure` is
    retried, a lost host (AWS's "Host EC2*" status reason: Spot reclaimed, instance gone); any
    other end is final. `start` failures are the daemon's (before Batch has the job)."""
    conditions: list[dict[str, str]] = [
        {"onExitCode": str(code), "action": "RETRY"} for code in sorted(policy.exit_codes)
    ]
    if "infrastructure" in policy.on:
        conditions.append({"onStatusReason": "Host EC2*", "action": "RETRY"})
    conditions.append({"onReason": "*", "action": "EXIT"})
    if len(conditions) > _MAX_EVALUATE_ON_EXIT:
        most = _MAX_EVALUATE_ON_EXIT - (len(conditions) - len(policy.exit_codes))
        raise errors.InvalidJob(
            f"an array job's retry policy becomes Batch's retryStrategy, which takes at most "
            f"{_MAX_EVALUATE_ON_EXIT} conditions: list at most {most} exit codes (or give a "
            "retryStrategy in overrides)",
            "job.retry.exit_codes",
        )
    return {"attempts": min(policy.attempts, 10), "evaluateOnExit": conditions}


_MAX_EVALUATE_ON_EXIT = 5  # AWS Batch: evaluateOnExit takes up to 5 conditions


def _own_attempts(job: Mapping[str, Any]) -> int | None:
    """The attempts Batch's own `retryStrategy` gives the job (SubmitJob's kwargs, or the job
    as DescribeJobs tells it), when more than one."""
    strategy = job.get("retryStrategy")
    attempts = strategy.get("attempts") if isinstance(strategy, dict) else None
    return attempts if isinstance(attempts, int) and attempts > 1 else None


class _Definitions:
    """Job definitions for `definitions.Registry`: derived from a target's, its container
    running the job's image."""

    def __init__(self, backend: BatchBackend) -> None:
        self._backend = backend

    async def base_definition(self, target: str | None) -> dict[str, Any]:
        backend = self._backend
        name = str(pick_target(backend._targets, target, "Batch").job_definition)
        # "name:revision" and ARNs are looked up as such, a bare name as its newest ACTIVE one
        by = {"jobDefinitions": [name]} if ":" in name else {"jobDefinitionName": name}
        reply = await backend.api.call(
            "DescribeJobDefinitions", Priority.NORMAL, status="ACTIVE", **by
        )
        found = sorted(reply.get("jobDefinitions") or [], key=lambda d: d.get("revision", 0))
        if not found:
            raise errors.StartFailed(
                f"job definition {name!r} is not ACTIVE (or does not exist)",
                retryable=False,
                failure="rejected",
            )
        shape = backend.api.operation("RegisterJobDefinition").input_shape
        kwargs: dict[str, Any] = aws_kwargs.prune(found[-1], shape)
        kwargs.pop("tags", None)
        return kwargs

    def with_image(self, base: Mapping[str, Any], image: str) -> dict[str, Any]:
        container = base.get("containerProperties")
        if not isinstance(container, Mapping):
            raise errors.StartFailed(
                f"job definition {base.get('jobDefinitionName')!r} has no container "
                "properties to run the job's image with (multi-node, EKS)",
                retryable=False,
                failure="rejected",
            )
        return {**base, "containerProperties": {**container, "image": image}}

    async def find(self, name: str, digest: str) -> str | None:
        reply = await self._backend.api.call(
            "DescribeJobDefinitions", Priority.NORMAL, status="ACTIVE", jobDefinitionName=name
        )
        tagged = [
            d
            for d in reply.get("jobDefinitions") or []
            if (d.get("tags") or {}).get(definitions.DIGEST_TAG) == digest
        ]
        if not tagged:
            return None
        return str(max(tagged, key=lambda d: d.get("revision", 0))["jobDefinitionArn"])

    async def active(self, arn: str) -> bool:
        reply = await self._backend.api.call(
            "DescribeJobDefinitions", Priority.NORMAL, jobDefinitions=[arn]
        )
        return any(d.get("status") == "ACTIVE" for d in reply.get("jobDefinitions") or [])

    async def register(self, kwargs: Mapping[str, Any], digest: str) -> str:
        reply = await self._backend.api.call(
            "RegisterJobDefinition",
            Priority.LOW,
            **kwargs,
            tags={definitions.DIGEST_TAG: digest},
        )
        return str(reply["jobDefinitionArn"])
