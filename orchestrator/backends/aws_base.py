"""What the ECS and Batch backends share on top of their clients (`aws_api`) and kwargs
(`aws_kwargs`): `AwsBackendBase` (a client of their service and one of CloudWatch Logs, the token
buckets their operations draw from, the start limits, the accounting), `start_outcome` (a failed
RunTask/SubmitJob → what the dispatcher must know), `read_cloudwatch` (one page of a job's log
stream) and `log_group_found` (`orchestrator check`'s probe of a log group).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from orchestrator import errors, failures, models
from orchestrator.backends import base, definitions
from orchestrator.backends.aws_api import AwsApi, client_options, telemetry
from orchestrator.ratelimit import Priority, TokenBucket
from orchestrator.settings import AwsBackendSettings, CloudWatchSettings

# `cloudwatch.delivery_s`'s default, for a backend built without the daemon's settings (tests).
LOG_DELIVERY_S: float = CloudWatchSettings.model_fields["delivery_s"].default


class AwsBackendBase:
    """What the ECS and Batch backends share: a client of their service and one of CloudWatch
    Logs, the token buckets their operations draw from, the start limits, the accounting."""

    describe_batch_size = 100  # DescribeTasks and DescribeJobs take at most 100 ids

    def __init__(
        self,
        service: str,
        settings: AwsBackendSettings,
        logs_bucket: TokenBucket,
        buckets: Mapping[str, TokenBucket],
        single_attempt: frozenset[str] = frozenset(),
        log_delivery_s: float = LOG_DELIVERY_S,
    ) -> None:
        self.max_in_flight = settings.max_in_flight
        self.log_delivery_s = log_delivery_s
        self.start_budget_s: float | None = settings.start_budget_s
        common = client_options(settings)
        self.api = AwsApi(service, buckets=buckets, single_attempt=single_attempt, **common)
        self.logs = AwsApi("logs", buckets={"GetLogEvents": logs_bucket}, **common)
        # The queue its state-change events arrive on (`changefeed`), if one is configured:
        # read with long polls, so the read timeout outlasts their wait.
        self.events_api: AwsApi | None = None
        if settings.events.queue_url:
            read_s = max(settings.read_timeout_s, settings.events.wait_s + 10.0)
            self.events_api = AwsApi("sqs", buckets={}, **(common | {"read_timeout_s": read_s}))
        self.buckets = list(dict.fromkeys(buckets.values()))
        self.definitions: definitions.Registry  # set by each backend (its vendor's calls)

    async def _start_clients(self) -> None:
        await self.api.start()  # the logs client starts when logs are first read

    async def close(self) -> None:
        await self.api.close()
        await self.logs.close()
        if self.events_api is not None:
            await self.events_api.close()

    def set_wake(self, wake: base.Wake) -> None:
        pass  # AWS pushes nothing to us: the poller asks

    def settled(self, job: models.Job) -> None:
        pass  # nothing is kept per job: AWS keeps the record

    def telemetry(self) -> base.Telemetry:
        apis = [self.api, self.logs] + ([self.events_api] if self.events_api else [])
        return telemetry(apis, self.buckets)

    async def launch(
        self,
        job: models.Job,
        operation: str,
        kwargs_of: Callable[[models.Job, str | None], dict[str, Any]],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One attempt's launch call (RunTask, SubmitJob) and its kwargs: the definition the
        job's image runs under found or registered first (`definitions`), the kwargs built
        with it, the call made; what fails, said as the dispatcher needs it (`start_outcome`).
        A definition a refused launch named is looked up again before the next job's."""
        arn = None
        if job.spec.image is not None:
            with definition_outcome():
                arn = await self.definitions.arn(job.spec.target, job.spec.image)
        try:
            kwargs = kwargs_of(job, arn)
        except errors.InvalidJob as exc:  # accepted, then the settings changed (a restart)
            raise errors.StartFailed(exc.message, retryable=False, failure="rejected") from exc
        try:
            with start_outcome():
                reply = await self.api.call(operation, Priority.LOW, **kwargs)
        except errors.StartFailed as exc:
            if arn is not None and not exc.retryable:  # deregistered meanwhile? look again
                self.definitions.forget(arn)
            raise
        return kwargs, reply


@contextlib.contextmanager
def start_outcome() -> Iterator[None]:
    """Translate a failed RunTask/SubmitJob into what the dispatcher needs to know: nothing
    started (retryable or not), or maybe something did."""
    try:
        yield
    except errors.AwsError as exc:
        if exc.maybe_took_effect:
            # An attempt of this call (botocore retries inside it) may have reached AWS: only
            # a lookup, or a repeat under the same token, can say whether it started something.
            raise errors.OutcomeUnknown(str(exc)) from exc
        if isinstance(exc, errors.AwsThrottled):  # refused before anything happened
            raise errors.StartFailed(f"throttled: {exc.aws_message}", retryable=True) from exc
        if isinstance(exc, errors.AwsCredentials):  # the daemon's trouble, never the job's
            raise errors.StartDeferred(f"credentials refused: {exc}") from exc
        # AWS refused the request itself (`rejected`: final), unless what it says is a passing
        # shortage (`failures.AWS_MESSAGES`: a provisioning quota) — a start worth retrying.
        classified = failures.aws_rejection(exc.aws_code, exc.aws_message)
        retryable = classified.failure == "start"
        raise errors.StartFailed(
            f"{exc.aws_code}: {exc.aws_message}", retryable=retryable, failure=classified.failure
        ) from exc


@contextlib.contextmanager
def definition_outcome() -> Iterator[None]:
    """Translate a failed call made to find or register a job's definition (before any launch:
    nothing can have started) into what the dispatcher needs to know."""
    try:
        yield
    except errors.AwsError as exc:
        what = f"the job's definition: {exc.aws_code}: {exc.aws_message}"
        if isinstance(exc, errors.AwsCredentials):
            raise errors.StartDeferred(f"credentials refused: {exc}") from exc
        if isinstance(exc, errors.AwsRejected) and not exc.maybe_took_effect:
            raise errors.StartFailed(what, retryable=False, failure="rejected") from exc
        # Throttled, a server fault, unreachable: worth another try. A registration that may
        # have happened is found by its name and tag then.
        raise errors.StartFailed(what, retryable=True) from exc


async def read_cloudwatch(api: AwsApi, group: str, stream: str, cursor: Any) -> base.LogPage:
    """One page of a CloudWatch log stream from `cursor` (a forward token) on."""
    kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
    if cursor:
        kwargs["nextToken"] = cursor
    try:
        reply = await api.call("GetLogEvents", Priority.NORMAL, **kwargs)
    except errors.AwsRejected as exc:
        if exc.aws_code == "ResourceNotFoundException":  # the stream is not created yet
            return base.LogPage([], cursor)
        raise
    chunks = [
        base.LogChunk(stream, event["message"].rstrip("\n") + "\n")
        for event in reply.get("events", [])
    ]
    token = reply.get("nextForwardToken")
    return base.LogPage(chunks, token if token else cursor)


async def log_group_found(logs: AwsApi, group: str) -> str:
    """A `base.Probe` body: the log group exists and can be described."""
    reply = await logs.call("DescribeLogGroups", Priority.HIGH, logGroupNamePrefix=group)
    if not any(g.get("logGroupName") == group for g in reply.get("logGroups", [])):
        raise errors.CheckFailed(f"log group {group!r} does not exist (or is not readable)")
    return f"log group {group!r} is reachable"


T = TypeVar("T")


def pick_target(targets: Mapping[str | None, T], name: str | None, backend: str) -> T:
    """A job's target among a backend's (None: the section's own); `InvalidJob` naming the
    ones it has for a target it does not."""
    found = targets.get(name)
    if found is None:
        known = ", ".join(sorted(n for n in targets if n)) or "none is configured"
        raise errors.InvalidJob(f"no {backend} target {name!r} (known: {known})", "job.target")
    return found
