"""The baseline: how Airflow's Amazon provider tracks AWS Batch (and ECS) jobs, one task instance
per job, re-implemented on asyncio so that N of them can poll the same stand-in at once.

    python bench/airflow_baseline.py --endpoint http://127.0.0.1:PORT --jobs 1000 \\
        --time-scale 10 --out baseline.json

Batch (`BatchOperator` with its defaults: no waiters, not deferrable, awslogs off), after
`airflow/providers/amazon/aws/hooks/batch_client.py` (`BatchClientHook`):

- `submit_job` once per job;
- `wait_for_job`: `delay()`, then `poll_for_job_running` (`delay()`, `poll_job_status` until
  RUNNING|SUCCEEDED|FAILED), then `poll_for_job_complete` (`delay()`, `poll_job_status` until
  SUCCEEDED|FAILED); `delay()` with no argument sleeps `uniform(1, 10)` (DEFAULT_DELAY_MIN/MAX);
- `poll_job_status`: try 0 describes at once, try k ≥ 1 first sleeps
  `delay(exponential_delay(k))`, where `exponential_delay(k) = uniform(d/3, d)`,
  `d = min(600, 1 + (0.6·k)²)` and `delay(x)` adds Airflow's ±1 s jitter
  (`add_jitter(x, width=1, minima=0)` = `uniform(max(0, x-1), x+1)`); up to 4200 tries;
- every describe is `get_job_description`: `DescribeJobs(jobs=[job_id])`, a job id per call,
  up to `status_retries` = 10 tries; a `TooManyRequestsException` that botocore's own retries
  did not absorb is ignored and retried after `delay(exponential_delay(k))`; after 10 the task
  fails ("exceeded status_retries");
- after `wait_for_job`, `BatchOperator.monitor_job` describes twice more
  (`get_job_all_awslogs_info`, `check_job_success`).

ECS (`EcsRunTaskOperator` defaults): `RunTask`, then botocore's `tasks_stopped` waiter with
Airflow's `waiter_delay=6` (`DescribeTasks(tasks=[arn])` at once, then every 6 s; an error
reply that botocore's retries did not absorb ends the waiter and fails the task), then one more
`DescribeTasks` (`_check_success_task`).

botocore retries as Airflow leaves them (no retry config in the connection): `legacy` mode,
5 attempts, a throttled (HTTP 429 / ThrottlingException …) or 5xx attempt retried after
`rand() · 2^(attempt-1)` s. That loop is replayed here (botocore's own is off) so that its
sleeps shrink by the same time scale as everything else; otherwise it is botocore's
`_retry.json` `__default__` policy.

Every sleep above is divided by `--time-scale`, the factor the stand-in divides job durations
by. Prints nothing but errors; writes a JSON report to `--out`: per job the first time a
describe showed it terminal, the calls and throttled replies it saw, failures, and this
process's CPU seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aioboto3  # type: ignore[import-untyped, unused-ignore]
import aiohttp
import botocore.config  # type: ignore[import-untyped, unused-ignore]
import botocore.exceptions  # type: ignore[import-untyped, unused-ignore]
import orjson

REGION = "us-east-1"
TERMINAL_BATCH = ("SUCCEEDED", "FAILED")
# botocore `_retry.json` `__default__`: what the legacy mode retries
LEGACY_MAX_ATTEMPTS = 5
THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "ProvisionedThroughputExceededException",
    }
)
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 509})
# Airflow BatchClientHook
MAX_RETRIES = 4200
STATUS_RETRIES = 10
DEFAULT_DELAY_MIN, DEFAULT_DELAY_MAX = 1.0, 10.0
# Airflow EcsRunTaskOperator
ECS_WAITER_DELAY_S = 6.0
ECS_WAITER_MAX_ATTEMPTS = 1_000_000


class AirflowException(Exception):
    pass


class Baseline:
    """N Airflow task instances against one endpoint, sharing one client (and its pool)."""

    def __init__(self, client: Any, time_scale: float, rng: random.Random) -> None:
        self.client = client
        self.scale = time_scale
        self.rng = rng
        self.calls: Counter[str] = Counter()  # attempts per operation, retries included
        self.throttled: Counter[str] = Counter()  # throttled replies per operation
        self.airflow_retries = 0  # get_job_description tries after a TooManyRequestsException
        self.jobs: dict[str, dict[str, Any]] = {}

    # -- sleeping, scaled --------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds / self.scale)

    async def delay(self, delay: float | None = None) -> None:
        """`BatchClientHook.delay`."""
        if delay is None:
            pause = self.rng.uniform(DEFAULT_DELAY_MIN, DEFAULT_DELAY_MAX)
        else:  # add_jitter(delay, width=1, minima=0)
            pause = self.rng.uniform(max(0.0, abs(delay) - 1), abs(delay) + 1)
        await self.sleep(pause)

    def exponential_delay(self, tries: int) -> float:
        """`BatchClientHook.exponential_delay`."""
        delay = min(600.0, 1 + pow(tries * 0.6, 2))
        return self.rng.uniform(delay / 3, delay)

    # -- botocore legacy retries -------------------------------------------------------------

    async def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        method: Callable[..., Awaitable[dict[str, Any]]] = getattr(self.client, operation)
        for attempt in range(1, LEGACY_MAX_ATTEMPTS + 1):
            self.calls[operation] += 1
            try:
                return await method(**kwargs)
            except botocore.exceptions.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = exc.response.get("Error", {}).get("Code")
                throttled = code in THROTTLE_CODES or status == 429
                if throttled:
                    self.throttled[operation] += 1
                if attempt == LEGACY_MAX_ATTEMPTS or not (throttled or status in RETRY_STATUSES):
                    raise
            except (aiohttp.ClientConnectionError, botocore.exceptions.ConnectionError):
                if attempt == LEGACY_MAX_ATTEMPTS:
                    raise
            await self.sleep(self.rng.random() * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    # -- AWS Batch ---------------------------------------------------------------------------

    async def get_job_description(self, job_id: str) -> dict[str, Any]:
        for retries in range(STATUS_RETRIES):
            if retries:
                await self.delay(self.exponential_delay(retries))
            try:
                response = await self.call("describe_jobs", jobs=[job_id])
            except botocore.exceptions.ClientError as err:
                if err.response.get("Error", {}).get("Code") != "TooManyRequestsException":
                    raise
                self.airflow_retries += 1
                continue
            matching = [j for j in response.get("jobs", []) if j.get("jobId") == job_id]
            if len(matching) != 1:
                continue  # AirflowException, logged and retried
            job: dict[str, Any] = matching[0]
            self._saw(job_id, str(job.get("status")), job.get("status") in TERMINAL_BATCH)
            return job
        raise AirflowException(
            f"AWS Batch job ({job_id}) description error: exceeded status_retries "
            f"({STATUS_RETRIES})"
        )

    def _saw(self, job_id: str, status: str, terminal: bool) -> None:
        record = self.jobs[job_id]
        record["status"] = status
        if terminal and record["terminal_seen_at"] is None:
            record["terminal_seen_at"] = time.time()

    async def poll_job_status(self, job_id: str, match_status: tuple[str, ...]) -> bool:
        for retries in range(1 + MAX_RETRIES):
            if retries:
                await self.delay(self.exponential_delay(retries))
            job = await self.get_job_description(job_id)
            if job.get("status") in match_status:
                return True
        raise AirflowException(f"AWS Batch job ({job_id}) status checks exceed max_retries")

    async def batch_task(self, index: int, submit_slots: asyncio.Semaphore) -> None:
        """One `BatchOperator` task instance, from submit to `check_job_success`."""
        async with submit_slots:
            try:
                reply = await self.call(
                    "submit_job",
                    jobName=f"airflow-bench-{index}",
                    jobQueue="bench",
                    jobDefinition="bench-job:1",
                    containerOverrides={"command": ["bench", str(index)]},
                )
            except Exception as exc:
                self.jobs[f"unsubmitted-{index}"] = _record(error=f"submit: {exc}")
                return
        job_id = reply["jobId"]
        self.jobs[job_id] = _record()
        try:
            await self.delay()  # wait_for_job
            await self.delay()  # poll_for_job_running
            await self.poll_job_status(job_id, ("RUNNING", *TERMINAL_BATCH))
            await self.delay()  # poll_for_job_complete
            await self.poll_job_status(job_id, TERMINAL_BATCH)
            self.jobs[job_id]["completed_at"] = time.time()
            await self.get_job_description(job_id)  # get_job_all_awslogs_info
            await self.get_job_description(job_id)  # check_job_success
        except Exception as exc:
            self.jobs[job_id]["error"] = f"{type(exc).__name__}: {exc}"

    # -- AWS ECS -----------------------------------------------------------------------------

    async def ecs_task(self, index: int, submit_slots: asyncio.Semaphore) -> None:
        """One `EcsRunTaskOperator` task instance: RunTask, the tasks_stopped waiter, a check."""
        async with submit_slots:
            try:
                reply = await self.call(
                    "run_task",
                    cluster="bench",
                    taskDefinition="bench-job:1",
                    launchType="FARGATE",
                    startedBy=f"airflow-bench-{index}",
                    overrides={
                        "containerOverrides": [{"name": "main", "command": ["bench", str(index)]}]
                    },
                    networkConfiguration={"awsvpcConfiguration": {"subnets": ["subnet-0"]}},
                )
            except Exception as exc:
                self.jobs[f"unsubmitted-{index}"] = _record(error=f"run_task: {exc}")
                return
        arn = reply["tasks"][0]["taskArn"]
        self.jobs[arn] = _record()
        try:
            for attempt in range(ECS_WAITER_MAX_ATTEMPTS):
                if attempt:
                    await self.sleep(ECS_WAITER_DELAY_S)
                if await self._describe_task(arn):
                    break
            else:
                raise AirflowException("waiter max attempts exceeded")
            self.jobs[arn]["completed_at"] = time.time()
            await self._describe_task(arn)  # _check_success_task
        except Exception as exc:
            self.jobs[arn]["error"] = f"{type(exc).__name__}: {exc}"

    async def _describe_task(self, arn: str) -> bool:
        """One waiter attempt: STOPPED → True; a MISSING failure or an error reply ends it."""
        response = await self.call("describe_tasks", cluster="bench", tasks=[arn])
        if response.get("failures"):
            raise AirflowException(f"waiter failure: {response['failures']}")
        statuses = [t.get("lastStatus") for t in response.get("tasks", [])]
        stopped = bool(statuses) and all(s == "STOPPED" for s in statuses)
        self._saw(arn, str(statuses[0] if statuses else None), stopped)
        return stopped


def _record(error: str | None = None) -> dict[str, Any]:
    return {
        "submitted_at": time.time(),
        "terminal_seen_at": None,
        "completed_at": None,
        "status": None,
        "error": error,
    }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    service = "batch" if args.backend == "batch" else "ecs"
    config = botocore.config.Config(
        retries={"mode": "legacy", "total_max_attempts": 1},  # legacy retries replayed above
        max_pool_connections=args.pool,
        connect_timeout=10,
        read_timeout=30,
    )
    session = aioboto3.Session(
        region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    async with session.client(service, endpoint_url=args.endpoint, config=config) as client:
        baseline = Baseline(client, args.time_scale, random.Random(args.seed))
        slots = asyncio.Semaphore(args.submit_concurrency)
        task = baseline.batch_task if service == "batch" else baseline.ecs_task
        cpu0, t0 = _cpu_s(), time.monotonic()
        await asyncio.gather(*(task(i, slots) for i in range(args.jobs)))
        cpu_s, elapsed_s = _cpu_s() - cpu0, time.monotonic() - t0
    return {
        "backend": service,
        "jobs": baseline.jobs,
        "calls": dict(baseline.calls),
        "throttled": dict(baseline.throttled),
        "airflow_retries": baseline.airflow_retries,
        "failed": sum(1 for j in baseline.jobs.values() if j["error"]),
        "cpu_s": cpu_s,
        "elapsed_s": elapsed_s,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=" ".join((__doc__ or "").split("\n\n")[0].split()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    p.add_argument("--endpoint", required=True, help="the stand-in's URL")
    p.add_argument("--backend", choices=("batch", "ecs"), default="batch")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--time-scale", type=float, default=1.0, help="every sleep is divided by it")
    p.add_argument("--submit-concurrency", type=int, default=16, help="submits in flight")
    p.add_argument("--pool", type=int, default=100, help="HTTP connections at most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--out", type=Path, required=True, help="the JSON report")
    args = p.parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        report = runner.run(run(args))
    args.out.write_bytes(orjson.dumps(report))
    if report["failed"]:
        sys.stderr.write(f"airflow_baseline: {report['failed']} of {args.jobs} tasks failed\n")


if __name__ == "__main__":
    main()
