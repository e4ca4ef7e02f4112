"""A fast in-memory stand-in for the parts of AWS ECS and Batch the daemon calls, for benchmarks.

moto answers about 20 DescribeTasks(100 ARNs) calls a second, too few to load the daemon with
10,000 jobs. This server answers thousands: it keeps tasks and jobs in dicts, works out each
one's state lazily from its creation time (no timers, so 100,000 jobs cost a few dicts), and
caches each task's JSON per life-cycle phase. It speaks the wire protocols botocore uses (ECS
and CloudWatch Logs: JSON 1.1 over ``POST /`` with ``X-Amz-Target``; SQS: JSON 1.0 likewise;
Batch: REST-JSON on ``/v1/<operation>``), accepts any signature, and enforces AWS-like token
buckets with the real throttling replies, so botocore's retry modes behave as they do against
AWS::

    async with FakeAws(Config(pending_s=5, run_s=60, time_scale=60)) as aws:
        ...  # aioboto3 clients with endpoint_url=aws.endpoint_url, any credentials
        aws.stats()             # calls, throttled calls and describe batch sizes
        aws.terminal_times()    # when each job became terminal, and when a describe said so
        aws.events()            # with events=True: each event's change, delivery and receive

    python bench/fakeaws.py --port 0 --pending-s 5 --run-s 60 --exit-code 0 --time-scale 10

The CLI prints the URL on its first line and the stats as JSON when SIGINT/SIGTERM stops it;
``GET /_fakeaws/stats``, ``GET /_fakeaws/terminal`` and ``POST /_fakeaws/reset`` work too.

Operations: ECS RunTask, DescribeTasks, StopTask, ListTasks, DescribeClusters,
DescribeTaskDefinition; Batch SubmitJob, DescribeJobs, TerminateJob, ListJobs,
DescribeJobQueues; Logs GetLogEvents (always empty); with events (below) SQS ReceiveMessage,
DeleteMessage, DeleteMessageBatch, GetQueueAttributes, GetQueueUrl, CreateQueue. Anything else
gets a 400.

EventBridge → SQS, off unless ``Config(events=True)`` (a queue named "orchestrator-events") or
``events="<queue name>"`` (CLI ``--events [QUEUE]``): every state change of a task or job is an
EventBridge event in one SQS queue, ``aws.queue_url`` = ``<endpoint>/<account id>/<queue>``.
ECS: "ECS Task State Change" from aws.ecs, its detail the task as DescribeTasks has it (its
``version`` growing at each change) but for ISO-8601 timestamps ("2016-12-06T16:41:06.595Z"),
an ``updatedAt`` and no tags; Batch: "Batch Job State Change" from aws.batch, the job as
DescribeJobs has it. ``resources`` holds the ARN, ``time`` the change (whole seconds). Lives
being known at creation, a new task's or job's events are planned at once (a Fargate task 4:
PROVISIONING, PENDING, RUNNING, STOPPED; 7 with ``stopping_s``; a Batch job 5: none at
SUBMITTED, as on AWS), about 100 bytes each, rendered only when received. A StopTask or
TerminateJob re-plans: the events planned after it are superseded, its own added; an event
shows the task as it was at its change. An array job's events are its parent's (PENDING, then
SUCCEEDED/FAILED), none for its children. Each event is delivered at its change plus a delay
drawn from a lognormal of median ``event_delay_median_s`` (0.5 s) and 99th percentile
``event_delay_p99_s`` (3 s; AWS: "best effort", typically sub-second); 0 and 0: at once. The
delays are seconds of the injected clock, NOT divided by ``time_scale`` (nor is the visibility
timeout): they stand for AWS's latency, not for the jobs' lives. Each event independently is
dropped with ``event_drop_ratio`` (0), else delivered twice with ``event_duplicate_ratio``
(0.01: both copies share the event's id, each has its own delay). Delays cross, so a task's
events come out of order as on AWS (ECS's ``detail.version`` orders them; Batch has none).

SQS: ReceiveMessage returns up to MaxNumberOfMessages (1..10) visible messages, or waits for
one up to WaitTimeSeconds (0..20; it answers as soon as one comes due); a received message is
invisible for its VisibilityTimeout (else ``queue_visibility_timeout_s``, 30 s), then received
again unless deleted. MessageSystemAttributeNames: SentTimestamp (its delivery),
ApproximateReceiveCount, ApproximateFirstReceiveTimestamp, SenderId, All. A receipt handle
from any receive of a message deletes it. GetQueueAttributes: QueueArn,
ApproximateNumberOfMessages(NotVisible) and fixed ones; CreateQueue of that queue: its URL.
``aws.set_queue_broken()`` (``POST /_fakeaws/queue?broken=true``; ``false`` repairs) makes every
SQS call on the queue answer AWS.SimpleQueueService.NonExistentQueue (botocore's
QueueDoesNotExist), as if deleted: its messages are lost, and the events due until it is
repaired. ``stats()["events"]`` counts events (planned, superseded, due, dropped, lost) and
messages (delivered, duplicated, received, redelivered, deleted, visible, in flight), and sums
up the delays drawn and the receive lags; ``aws.events()`` (``GET /_fakeaws/events``, CLI
``--dump-events PATH``) lists each event published with its change, delivery and first
receive times; ``terminal_times()`` gains ``terminal_event_at`` (its first copy's delivery)
and ``terminal_event_received_at``. Events come due lazily, when an SQS call (or ``stats()``)
looks; a long poll looks at a hand-moved clock at least every 50 ms.

Batch array jobs: a SubmitJob with ``arrayProperties: {"size": N}`` (2..10,000) makes a parent
and N children ``<parent id>:<index>``, one SubmitJob call (one token) for all. Each child has
its own life drawn as a single job's is (jitter, exit code, failure ratio; an exit-code function
sees `Launch.index`), kept in flat arrays of floats and counted by bisection: no child objects,
no timers, a parent describe costs O(log N). The parent describes with ``arrayProperties:
{"size": N, "statusSummary": {status: children}}``; it is SUBMITTED until a child is RUNNABLE,
then PENDING until every child has ended (and ``array_settle_s`` more: AWS says so a little
later; the statusSummary shows them all ended meanwhile), then SUCCEEDED if all succeeded, else
FAILED (``statusReason`` "Array Child Job failed", or TerminateJob's reason); it has no exit
code and no log stream. A child describes by its ``<parent>:<i>`` id with
``arrayProperties: {"index": i}``, its own status, exit code and log stream. TerminateJob on
the parent ends every child still going, on a child that child. ListJobs lists parents
(``arrayProperties: {"size": N}``), and a parent's children when given ``arrayJobId``.
``terminal_times()`` lists parents (with ``array_size`` and ``children_failed``), not
children; ``terminal_at``/``reported_at`` take child ids too.

Life of a task or job, in seconds of the injected clock divided by ``time_scale``: ``pending_s``
(ECS PROVISIONING then PENDING; Batch SUBMITTED, PENDING, RUNNABLE, STARTING, in equal parts),
then ``run_s`` RUNNING, then (ECS only) ``stopping_s`` DEACTIVATING/STOPPING/DEPROVISIONING,
then STOPPED or SUCCEEDED/FAILED. Timestamps in replies are on the injected clock, unscaled.

Throttle families (``Config.buckets``; AWS's documented defaults unless noted): ``ecs.run``
RunTask+StopTask, burst 100, 40/s (Fargate RunTask: 20/s); ``ecs.describe``
DescribeTasks+ListTasks, burst 100, 20/s; ``batch.submit`` SubmitJob, 50/s; ``batch.describe``
DescribeJobs+ListJobs, burst 100, 20/s — AWS documents no limit for it, this is a guess;
``logs.get`` GetLogEvents, 25/s. Other operations are never throttled.

Known simplifications: tags are always returned (ECS wants ``include=["TAGS"]``); stopped tasks
and finished jobs are kept forever; every cluster and job queue exists; Batch ``startedAt`` appears
only once a job has started, as on AWS (botocore's model calls it required). SQS: one queue,
standard, no retention limit, no SendMessage, ChangeMessageVisibility or PurgeQueue; a
redelivered message is first in line; planned events are kept for the server's life.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
import uuid
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import orjson
from aiohttp import web

Service = Literal["ecs", "batch"]

ECS_TARGET = "AmazonEC2ContainerServiceV20141113"
LOGS_TARGET = "Logs_20140328"
SQS_TARGET = "AmazonSQS"  # JSON 1.0
TARGETS: Mapping[str, str] = {ECS_TARGET: "ecs", LOGS_TARGET: "logs", SQS_TARGET: "sqs"}
BATCH_PATHS: Mapping[str, str] = {
    "/v1/submitjob": "SubmitJob",
    "/v1/describejobs": "DescribeJobs",
    "/v1/terminatejob": "TerminateJob",
    "/v1/listjobs": "ListJobs",
    "/v1/describejobqueues": "DescribeJobQueues",
}
MAX_DESCRIBE = 100  # ids per DescribeTasks / DescribeJobs call
MAX_ARRAY = 10_000  # children of one Batch array job (2 at least)
SIGTERM_EXIT = 143  # a container stopped on request exits on SIGTERM

# Life-cycle phases; a task's phase indexes these. ECS splits pending into 2 and stopping into 3.
ECS_LIFE = ("PROVISIONING", "PENDING", "RUNNING", "DEACTIVATING", "STOPPING", "DEPROVISIONING")
ECS_STOPPED = len(ECS_LIFE)
BATCH_LIFE = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")
BATCH_DONE = len(BATCH_LIFE)
BATCH_STATUSES = (*BATCH_LIFE, "SUCCEEDED", "FAILED")  # an array's statusSummary keys
ARRAY_FAILED = "Array Child Job failed"

EVENT_QUEUE = "orchestrator-events"  # the queue's name for Config(events=True)
Z99 = 2.3263478740408408  # the standard normal distribution's 99th percentile
POLL_TICK_S = 0.05  # a long poll looks at the (maybe hand-moved) clock at least this often
MAX_VISIBILITY_S = 43_200  # SQS: 12 hours
NO_EVENTS = range(0)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A token bucket: `burst` calls at once, refilled at `rate_per_s`."""

    burst: float
    rate_per_s: float


DEFAULT_BUCKETS: Mapping[str, Bucket] = {
    "ecs.run": Bucket(100, 40),
    "ecs.describe": Bucket(100, 20),
    "batch.submit": Bucket(50, 50),
    "batch.describe": Bucket(100, 20),  # undocumented by AWS: a guess
    "logs.get": Bucket(25, 25),
}
# "service.Operation" → throttle family. Operations not listed are never throttled.
FAMILIES: Mapping[str, str] = {
    "ecs.RunTask": "ecs.run",
    "ecs.StopTask": "ecs.run",
    "ecs.DescribeTasks": "ecs.describe",
    "ecs.ListTasks": "ecs.describe",
    "batch.SubmitJob": "batch.submit",
    "batch.DescribeJobs": "batch.describe",
    "batch.ListJobs": "batch.describe",
    "logs.GetLogEvents": "logs.get",
}
DESCRIBES = ("ecs.DescribeTasks", "batch.DescribeJobs")


@dataclasses.dataclass(frozen=True)
class Launch:
    """What an exit-code function is told about a new task or job."""

    service: Service
    name: str  # ECS startedBy (else the task id); Batch jobName
    command: tuple[str, ...]
    rng: random.Random  # the server's seeded RNG
    index: int | None = None  # a Batch array child's index (AWS_BATCH_JOB_ARRAY_INDEX)


ExitCode = int | Callable[[Launch], int]


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks; see FakeAws.endpoint_url
    region: str = "us-east-1"
    account_id: str = "123456789012"
    pending_s: float = 5.0  # creation → RUNNING
    run_s: float = 60.0  # RUNNING → the container exits
    stopping_s: float = 0.0  # ECS only: the container exited → STOPPED
    array_settle_s: float = 0.0  # Batch arrays: the last child's end → the parent's end
    jitter: float = 0.0  # each duration times uniform(1 - jitter, 1 + jitter)
    exit_code: ExitCode = 0
    failure_ratio: float = 0.0  # this share of jobs exits with failure_exit_code instead
    failure_exit_code: int = 1
    seed: int = 0
    time_scale: float = 1.0  # durations are divided by it: 60 turns a minute into a second
    clock: Callable[[], float] = time.time  # epoch seconds
    container_name: str = "main"
    log_group: str = "/ecs/jobs"
    log_stream_prefix: str = "ecs"
    throttle: bool = True
    buckets: Mapping[str, Bucket] = dataclasses.field(default_factory=lambda: dict(DEFAULT_BUCKETS))
    # EventBridge → SQS (see the module's docstring). Delays are clock seconds, never scaled.
    events: bool | str = False  # True: a queue named EVENT_QUEUE; a str: that queue's name
    event_delay_median_s: float = 0.5  # lognormal; 0: every event at once
    event_delay_p99_s: float = 3.0
    event_duplicate_ratio: float = 0.01  # this share of events is delivered twice
    event_drop_ratio: float = 0.0  # this share of events is never delivered
    queue_visibility_timeout_s: float = 30.0  # the queue's VisibilityTimeout attribute

    @property
    def queue_name(self) -> str | None:
        """The events' queue, None without events."""
        if self.events is True:
            return EVENT_QUEUE
        return self.events or None

    def __post_init__(self) -> None:
        if self.time_scale <= 0 or not 0 <= self.jitter < 1 or not 0 <= self.failure_ratio <= 1:
            raise ValueError("need time_scale > 0, 0 <= jitter < 1, 0 <= failure_ratio <= 1")
        if min(self.pending_s, self.run_s, self.stopping_s, self.array_settle_s) < 0:
            raise ValueError("durations must not be negative")
        if unknown := set(self.buckets) - set(FAMILIES.values()):
            raise ValueError(f"unknown throttle families: {sorted(unknown)}")
        if not 0 <= self.event_delay_median_s <= self.event_delay_p99_s:
            raise ValueError("need 0 <= event_delay_median_s <= event_delay_p99_s")
        if not 0 <= self.event_duplicate_ratio <= 1 or not 0 <= self.event_drop_ratio <= 1:
            raise ValueError("need event ratios in [0, 1]")
        if not 0 <= self.queue_visibility_timeout_s <= MAX_VISIBILITY_S:
            raise ValueError(f"need 0 <= queue_visibility_timeout_s <= {MAX_VISIBILITY_S}")
        name = self.queue_name
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,80}", name):
            raise ValueError(f"bad queue name {name!r}: 1 to 80 letters, digits, - and _")


class AwsError(Exception):
    """An error reply: HTTP status, AWS error code, message and extra body fields."""

    def __init__(self, status: int, code: str, message: str, **fields: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.fields = status, code, message, fields


def _invalid(message: str) -> AwsError:
    return AwsError(400, "InvalidParameterException", message)


def _client_error(message: str) -> AwsError:
    return AwsError(400, "ClientException", message)


class _Bucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, spec: Bucket) -> None:
        self.burst, self.rate = spec.burst, spec.rate_per_s
        self.tokens, self.stamp = spec.burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _Job:
    """One ECS task or Batch job; its state follows from the clock, so it needs no timer."""

    __slots__ = (
        "arn", "array", "cached", "cached_phase", "command", "created_at", "definition",
        "events", "exit_at", "exit_code", "id", "name", "owner", "reported_at", "request",
        "running_at", "service", "stop_at", "stop_reason", "stopping_s",
    )  # fmt: skip

    def __init__(
        self,
        service: Service,
        job_id: str,
        arn: str,
        *,
        name: str,
        owner: str,  # ECS cluster name, Batch queue name
        definition: str,  # task definition / job definition ARN
        command: tuple[str, ...],
        request: dict[str, Any],
        created_at: float,
        pending_s: float,
        run_s: float,
        stopping_s: float,
        exit_code: int,
    ) -> None:
        self.service, self.id, self.arn, self.name, self.owner = service, job_id, arn, name, owner
        self.definition, self.command, self.request = definition, command, request
        self.created_at = created_at
        self.running_at = created_at + pending_s
        self.exit_at = self.running_at + run_s
        self.stopping_s = stopping_s
        self.exit_code = exit_code
        self.stop_at: float | None = None  # StopTask / TerminateJob before the natural exit
        self.stop_reason = ""
        self.reported_at: float | None = None  # first describe that showed it terminal
        self.cached_phase = -1
        self.cached = b""
        self.array: _Array | None = None  # a Batch array parent's children
        self.events: range | list[int] = NO_EVENTS  # its planned events (_Events indexes)

    @property
    def end_at(self) -> float:
        return self.exit_at if self.stop_at is None else self.stop_at

    @property
    def terminal_at(self) -> float:
        return self.end_at + self.stopping_s

    @property
    def started(self) -> bool:
        """Whether it reached RUNNING (a task stopped while pending never did)."""
        return self.stop_at is None or self.running_at < self.stop_at

    def stop(self, now: float, reason: str) -> None:
        if now < self.end_at:
            self.stop_at, self.stop_reason, self.cached_phase = now, reason, -1

    def phase(self, now: float) -> int:
        """Index into ECS_LIFE / BATCH_LIFE; ECS_STOPPED / BATCH_DONE once terminal."""
        if self.array is not None:  # an array parent: SUBMITTED, PENDING, then done
            if now >= self.end_at + self.stopping_s:  # stopping_s: Config.array_settle_s
                return BATCH_DONE
            return 1 if self.array.runnable_from <= now else 0
        ecs = self.service == "ecs"
        pending = 2 if ecs else 4  # the statuses before RUNNING
        end = self.end_at
        if now >= end + self.stopping_s:
            return ECS_STOPPED if ecs else BATCH_DONE
        if now >= end:  # ECS only: DEACTIVATING, STOPPING, DEPROVISIONING
            return pending + 1 + _part(now - end, self.stopping_s, 3)
        if now >= self.running_at:
            return pending  # RUNNING
        return _part(now - self.created_at, self.running_at - self.created_at, pending)

    def desired_status(self, phase: int) -> str:
        """ECS: RUNNING until the container exits or a stop is asked for."""
        return "STOPPED" if phase > 2 or self.stop_at is not None else "RUNNING"

    def final_exit_code(self) -> int | None:
        if not self.started or self.array is not None:
            return None
        return SIGTERM_EXIT if self.stop_at is not None else self.exit_code


class _Array:
    """The children of a Batch array job, ``<parent id>:<index>``: their lives in flat arrays
    (and sorted copies, counted by bisection), stops and first terminal reports in dicts.

    A child's life is a single job's: SUBMITTED, PENDING, RUNNABLE, STARTING in equal parts of
    its `pending` span from the parent's creation, RUNNING from `running`, ended at `exits`
    (or at its stop). The pending phases are compared as ``pending <= elapsed * 4 / k`` for
    both a child's own phase and the counts, so a describe of a child and the parent's
    statusSummary never disagree at a boundary."""

    __slots__ = (
        "created_at", "end_at", "exit_codes", "exits", "failed_exits", "pending", "reported",
        "runnable_from", "running", "size", "sorted_exits", "sorted_pending", "sorted_running",
        "stopped",
    )  # fmt: skip

    def __init__(self, created_at: float, lives: Iterable[tuple[float, float, int]]) -> None:
        self.created_at = created_at
        self.pending, self.running = array("d"), array("d")
        self.exits, self.exit_codes = array("d"), array("i")
        for pending_s, run_s, code in lives:  # the arithmetic of _Job: the same floats
            running_at = created_at + pending_s
            self.pending.append(pending_s)
            self.running.append(running_at)
            self.exits.append(running_at + run_s)
            self.exit_codes.append(code)
        self.size = len(self.pending)
        self.sorted_pending = array("d", sorted(self.pending))
        self.sorted_running = array("d", sorted(self.running))
        self.sorted_exits = array("d", sorted(self.exits))
        self.failed_exits = array(
            "d", sorted(e for e, c in zip(self.exits, self.exit_codes, strict=True) if c)
        )
        # The parent turns PENDING when its first child turns RUNNABLE (phase 2 of 4).
        self.runnable_from = created_at + self.sorted_pending[0] / 2
        self.end_at = self.sorted_exits[-1]  # the last child's end
        self.stopped: dict[int, tuple[float, str]] = {}  # index → (stopped at, reason)
        self.reported: dict[int, float] = {}  # index → first describe that showed it ended

    def natural_phase(self, i: int, now: float) -> int:
        """Child i's phase had it not been stopped."""
        if now >= self.exits[i]:
            return BATCH_DONE
        if now >= self.running[i]:
            return 4
        quarters, pending = (now - self.created_at) * 4, self.pending[i]
        return (pending <= quarters) + (pending <= quarters / 2) + (pending <= quarters / 3)

    def phase(self, i: int, now: float) -> int:
        stop = self.stopped.get(i)
        if stop is not None and now >= stop[0]:
            return BATCH_DONE
        return self.natural_phase(i, now)

    def status(self, i: int, now: float) -> str:
        phase = self.phase(i, now)
        if phase < BATCH_DONE:
            return BATCH_LIFE[phase]
        return "FAILED" if i in self.stopped or self.exit_codes[i] else "SUCCEEDED"

    def summary(self, now: float) -> dict[str, int]:
        """The children by status: bisection, then a correction for each stopped child."""
        quarters = (now - self.created_at) * 4
        past = [bisect.bisect_right(self.sorted_pending, quarters / k) for k in (1, 2, 3)]
        running = bisect.bisect_right(self.sorted_running, now)
        ended = bisect.bisect_right(self.sorted_exits, now)
        failed = bisect.bisect_right(self.failed_exits, now)
        counts = dict(
            zip(
                BATCH_STATUSES,
                (
                    self.size - past[0],
                    past[0] - past[1],
                    past[1] - past[2],
                    past[2] - running,
                    running - ended,
                    ended - failed,
                    failed,
                ),
                strict=True,
            )
        )
        for i, (stop_at, _) in self.stopped.items():
            if now >= stop_at:  # ended by its stop, whatever its natural life says
                phase = self.natural_phase(i, now)
                if phase < BATCH_DONE:
                    natural = BATCH_LIFE[phase]
                else:
                    natural = "FAILED" if self.exit_codes[i] else "SUCCEEDED"
                counts[natural] -= 1
                counts["FAILED"] += 1
        return counts

    def stop(self, i: int, now: float, reason: str) -> None:
        if i not in self.stopped and now < self.exits[i]:
            self.stopped[i] = (now, reason)
            self._new_end()

    def stop_all(self, now: float, reason: str) -> None:
        for i in range(self.size):
            if i not in self.stopped and now < self.exits[i]:
                self.stopped[i] = (now, reason)
        self._new_end()

    def child_end(self, i: int) -> float:
        stop = self.stopped.get(i)
        return self.exits[i] if stop is None else stop[0]

    def _new_end(self) -> None:
        self.end_at = max(self.child_end(i) for i in range(self.size))


def _part(elapsed: float, span: float, parts: int) -> int:
    """Which of `parts` equal slices of `span` seconds `elapsed` falls in (clamped)."""
    return max(0, min(parts - 1, int(elapsed * parts / span))) if span > 0 else parts - 1


def _ms(t: float) -> int:
    return int(t * 1000)


def _name(ref: Any, default: str = "default") -> str:
    """A cluster's or queue's name from its name or ARN."""
    if not isinstance(ref, str) or not ref:
        return default
    return ref.rpartition("/")[2] if ref.startswith("arn:") else ref


def _iso(t: float) -> str:
    """An ECS event's timestamp: ``2016-12-06T16:41:06.595Z``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _changes(job: _Job) -> list[tuple[float, int]]:
    """Each (moment, phase) at which the job's phase changes as its life now stands, its
    creation first: the moments `_Job.phase` turns (float rounding may put a turn a few ulps
    after the mark computed for it: the mark is moved there)."""
    start, end = job.created_at, job.end_at
    if job.array is not None:
        marks = [start, job.array.runnable_from, end + job.stopping_s]
    else:
        ecs = job.service == "ecs"
        parts, span = (2 if ecs else 4), job.running_at - start
        marks = [start + span * k / parts for k in range(parts)]
        marks += (job.running_at, end)
        if ecs:
            s = job.stopping_s
            marks += (end + s / 3, end + s * 2 / 3, end + s)
    changes: list[tuple[float, int]] = []
    last = -1
    for mark in sorted(set(marks)):
        at, phase = mark, job.phase(mark)
        for _ in range(4):
            if phase > last:
                break
            at = math.nextafter(at, math.inf)
            phase = job.phase(at)
        if phase > last:
            changes.append((at, phase))
            last = phase
    return changes


# _Events.flags bits, per event
_DROPPED, _DUPLICATED, _SUPERSEDED, _DUE = 1, 2, 4, 8
_SEQ_BITS = 32
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_UUID_MASK = (1 << 128) - 1
_UUID_STEP = 0x9E3779B97F4A7C15F39CC0605CEDC835  # odd: seq → id is one-to-one
# _Message.state
_VISIBLE, _IN_FLIGHT, _GONE = 0, 1, 2


class _Message:
    """One copy of an event in the queue, from the moment it came due until deleted."""

    __slots__ = ("deliver_at", "first_received_at", "no", "receives", "seq", "state", "visible_at")

    def __init__(self, no: int, seq: int, deliver_at: float) -> None:
        self.no, self.seq, self.deliver_at = no, seq, deliver_at
        self.receives = 0
        self.first_received_at = self.visible_at = 0.0
        self.state = _VISIBLE


class _Events:
    """EventBridge into one SQS queue: every state change of every task and job, planned when
    it is created (and re-planned when stopped), and the queue's messages.

    An event is an index (`seq`) into flat per-event arrays; the heap holds one int per copy to
    deliver, ``(delivery µs << 32) | seq``, so a planned event costs about 100 bytes. Events come
    due lazily, when an SQS call looks (no timers); one is rendered to JSON only when a
    ReceiveMessage returns it."""

    def __init__(self, c: Config) -> None:
        assert c.queue_name is not None
        self.name = c.queue_name
        self.arn = f"arn:aws:sqs:{c.region}:{c.account_id}:{self.name}"
        self.rng = random.Random(f"{c.seed}/events")  # its own: the lives drawn stay the same
        self.event_salt, self.message_salt = self.rng.getrandbits(128), self.rng.getrandbits(128)
        self.median, self.p99 = c.event_delay_median_s, c.event_delay_p99_s
        self.sigma = math.log(self.p99 / self.median) / Z99 if self.median else 0.0
        self.duplicate_ratio, self.drop_ratio = c.event_duplicate_ratio, c.event_drop_ratio
        self.visibility_s = c.queue_visibility_timeout_s
        # Per event, by seq.
        self.jobs: list[_Job] = []
        self.change_at = array("d")
        self.deliver_at = array("d")  # its first copy's delivery (NaN: dropped)
        self.received_at = array("d")  # the first receive of a copy (NaN: none yet)
        self.phase = array("b")
        self.flags = bytearray()
        self.second_at: dict[int, float] = {}  # a duplicated event's second copy's delivery
        self.heap: list[int] = []  # a key per copy not yet due
        # The queue.
        self.live: dict[int, _Message] = {}  # message number → visible or in-flight message
        self.visible: deque[_Message] = deque()  # may hold messages deleted meanwhile
        self.timeouts: list[tuple[float, int, _Message]] = []  # heap: (visible again at, no, m)
        self.last_no = 0
        self.n_visible = self.n_in_flight = 0
        self.broken = self.closing = False
        self.waiters = 0
        self.changed = asyncio.Event()  # replaced by a fresh one at each wake-up
        self.counts: Counter[str] = Counter()
        self.delays = array("d")  # per delivered copy: delivery - change
        self.lags = array("d")  # per message: its first receive - its delivery

    # -- planning ------------------------------------------------------------------------------

    def delay(self) -> float:
        if not self.median:
            return 0.0
        return self.median * math.exp(self.sigma * self.rng.gauss(0.0, 1.0))

    def _push(self, at: float, seq: int) -> None:
        heapq.heappush(self.heap, (int(at * 1_000_000) << _SEQ_BITS) | seq)

    def _add(self, job: _Job, at: float, phase: int) -> None:
        seq, rng = len(self.flags), self.rng
        self.jobs.append(job)
        self.change_at.append(at)
        self.phase.append(phase)
        self.received_at.append(math.nan)
        if self.drop_ratio and rng.random() < self.drop_ratio:
            self.flags.append(_DROPPED)
            self.deliver_at.append(math.nan)
            self._push(at, seq)  # to count it as due (and dropped) when its change happens
        else:
            deliver_at = at + self.delay()
            self.deliver_at.append(deliver_at)
            self._push(deliver_at, seq)
            if self.duplicate_ratio and rng.random() < self.duplicate_ratio:
                second_at = self.second_at[seq] = at + self.delay()
                self._push(second_at, seq)
                self.flags.append(_DUPLICATED)
            else:
                self.flags.append(0)
        self.counts["planned"] += 1

    def plan(self, job: _Job, changes: Iterable[tuple[float, int]], now: float) -> None:
        """A new job's events, or a stopped job's new future: the events it had planned after
        `now` are superseded (dropped unseen), those of `changes` from `now` on are added."""
        kept: list[int] = []
        for seq in job.events:
            flags = self.flags[seq]
            if flags & _SUPERSEDED:
                continue
            if self.change_at[seq] > now:
                self.flags[seq] = flags | _SUPERSEDED
                self.counts["planned"] -= 1
                self.counts["superseded"] += 1
            else:
                kept.append(seq)
        had = {(self.change_at[seq], self.phase[seq]) for seq in kept}
        first = len(self.flags)
        for at, phase in changes:
            if at >= now and (at, phase) not in had:
                self._add(job, at, phase)
        added = range(first, len(self.flags))
        job.events = kept + list(added) if kept else added
        self.wake()

    # -- the queue -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Wake the long polls up to look again."""
        if self.waiters:
            self.changed.set()
            self.changed = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        changed = self.changed
        self.waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await changed.wait()
        finally:
            self.waiters -= 1

    def advance(self, now: float) -> None:
        """The copies due by `now` into the queue; in-flight messages whose visibility timeout
        has passed visible again (first in line)."""
        heap, flags, counts = self.heap, self.flags, self.counts
        now_us = int(now * 1_000_000)
        while heap and heap[0] >> _SEQ_BITS <= now_us:
            key = heapq.heappop(heap)
            seq = key & _SEQ_MASK
            f = flags[seq]
            if f & _SUPERSEDED:
                continue
            if not f & _DUE:
                flags[seq] = f | _DUE
                counts["due"] += 1
            if f & _DROPPED:
                counts["dropped"] += 1
                continue
            if self.broken:
                counts["lost"] += 1
                continue
            at = (key >> _SEQ_BITS) / 1_000_000
            counts["delivered"] += 1
            if f & _DUE:  # the second copy of a duplicated event
                counts["duplicated"] += 1
            self.delays.append(at - self.change_at[seq])
            self.last_no += 1
            message = self.live[self.last_no] = _Message(self.last_no, seq, at)
            self.visible.append(message)
            self.n_visible += 1
        timeouts = self.timeouts
        while timeouts and timeouts[0][0] <= now:
            until, _, message = heapq.heappop(timeouts)
            if message.state == _IN_FLIGHT and message.visible_at == until:
                message.state = _VISIBLE
                self.visible.appendleft(message)
                self.n_in_flight -= 1
                self.n_visible += 1

    def next_due(self) -> float | None:
        """When the next copy comes due or in-flight message turns visible (clock seconds)."""
        times = [(self.heap[0] >> _SEQ_BITS) / 1_000_000] if self.heap else []
        if self.timeouts:
            times.append(self.timeouts[0][0])
        return min(times, default=None)

    def take(self, now: float, n: int, visibility_s: float) -> list[_Message]:
        """Up to `n` visible messages, in flight for `visibility_s` from now on."""
        self.advance(now)
        taken: list[_Message] = []
        visible, counts = self.visible, self.counts
        while visible and len(taken) < n:
            message = visible.popleft()
            if message.state != _VISIBLE:  # deleted meanwhile
                continue
            message.state = _IN_FLIGHT
            message.receives += 1
            message.visible_at = now + visibility_s
            heapq.heappush(self.timeouts, (message.visible_at, message.no, message))
            self.n_visible -= 1
            self.n_in_flight += 1
            counts["received"] += 1
            if message.receives == 1:
                message.first_received_at = now
                self.lags.append(now - message.deliver_at)
                if math.isnan(self.received_at[message.seq]):
                    self.received_at[message.seq] = now
            else:
                counts["redelivered"] += 1
            taken.append(message)
        return taken

    @staticmethod
    def handle(message: _Message) -> str:
        return f"fake-{message.no:x}-{message.receives}"

    def delete(self, handle: Any) -> bool:
        """Delete the message a receipt handle was given for (whichever receive gave it, and
        again after: both succeed, as on SQS). False for a handle this queue never gave."""
        found = (
            re.fullmatch(r"fake-([0-9a-f]+)-[0-9]+", handle) if isinstance(handle, str) else None
        )
        if found is None:
            return False
        no = int(found[1], 16)
        message = self.live.pop(no, None)
        if message is None:
            return 0 < no <= self.last_no
        if message.state == _VISIBLE:
            self.n_visible -= 1
        else:
            self.n_in_flight -= 1
        message.state = _GONE
        self.counts["deleted"] += 1
        return True

    def set_broken(self, broken: bool, now: float) -> None:
        """Broken: deleted, as far as its callers can tell. Its messages are lost, and the
        events falling due until it is repaired; repaired, it is empty and works again."""
        self.advance(now)  # what came due before the change is on the queue's old side of it
        if broken and not self.broken:
            self.counts["lost"] += len(self.live)
            for message in self.live.values():
                message.state = _GONE
            self.live.clear()
            self.visible.clear()
            self.timeouts.clear()
            self.n_visible = self.n_in_flight = 0
        self.broken = broken
        self.wake()

    # -- observation ---------------------------------------------------------------------------

    def event_id(self, seq: int) -> str:
        """The EventBridge event's id (a duplicate's copies share it)."""
        return str(uuid.UUID(int=(self.event_salt + seq * _UUID_STEP) & _UUID_MASK, version=4))

    def message_id(self, no: int) -> str:
        return str(uuid.UUID(int=(self.message_salt + no * _UUID_STEP) & _UUID_MASK, version=4))

    def first_copy_at(self, seq: int) -> float | None:
        """When the event's first copy is delivered; None if it is dropped."""
        at = self.deliver_at[seq]
        if math.isnan(at):
            return None
        return min(at, self.second_at.get(seq, at))

    def stats(self) -> dict[str, Any]:
        c = self.counts
        keys = ("planned", "superseded", "due", "dropped", "delivered", "duplicated", "lost",
                "received", "redelivered", "deleted")  # fmt: skip
        return {
            "queue": self.name,
            "broken": self.broken,
            "model": {
                "delay": "lognormal",
                "median_s": self.median,
                "p99_s": self.p99,
                "sigma": round(self.sigma, 4),
                "duplicate_ratio": self.duplicate_ratio,
                "drop_ratio": self.drop_ratio,
            },
            **{key: c[key] for key in keys},
            "visible": self.n_visible,
            "in_flight": self.n_in_flight,
            "delay_s": _summary(self.delays),
            "receive_lag_s": _summary(self.lags),
        }


def _summary(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return {"n": 0}

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))], 4)

    return {"n": n, "median": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1)}


class FakeAws:
    """The server: ``async with FakeAws(config) as aws`` (or `start`/`close`). Not thread-safe:
    use it from the loop it runs on, or run the CLI in its own process."""

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or Config(), **overrides)
        c = self.config
        self._clock = c.clock
        self._rng = random.Random(c.seed)
        self._ids = random.Random(f"{c.seed}/ids")
        self._ecs_arn = f"arn:aws:ecs:{c.region}:{c.account_id}:"
        self._batch_arn = f"arn:aws:batch:{c.region}:{c.account_id}:"
        self._tasks: dict[str, _Job] = {}  # ECS task id → task
        self._jobs: dict[str, _Job] = {}  # Batch job id → job (an array's parent only)
        self._children = 0  # Batch array children, over all arrays
        self._by_started_by: dict[str, list[_Job]] = defaultdict(list)
        self._by_job_name: dict[str, list[_Job]] = defaultdict(list)  # lower-case name
        self._tokens: dict[tuple[str, str], tuple[dict[str, Any], list[_Job]]] = {}
        self._buckets = {family: _Bucket(spec) for family, spec in c.buckets.items()}
        self._handlers: dict[str, Callable[[dict[str, Any], float], bytes]] = {
            "ecs.RunTask": self._run_task,
            "ecs.DescribeTasks": self._describe_tasks,
            "ecs.StopTask": self._stop_task,
            "ecs.ListTasks": self._list_tasks,
            "ecs.DescribeClusters": self._describe_clusters,
            "ecs.DescribeTaskDefinition": self._describe_task_definition,
            "batch.SubmitJob": self._submit_job,
            "batch.DescribeJobs": self._describe_jobs,
            "batch.TerminateJob": self._terminate_job,
            "batch.ListJobs": self._list_jobs,
            "batch.DescribeJobQueues": self._describe_job_queues,
            "logs.GetLogEvents": self._get_log_events,
        }
        self._events = _Events(c) if c.queue_name is not None else None
        self._sqs_handlers: dict[str, Callable[[dict[str, Any], float], bytes]] = {
            "GetQueueUrl": self._get_queue_url,
            "CreateQueue": self._create_queue,
            "GetQueueAttributes": self._get_queue_attributes,
            "DeleteMessage": self._delete_message,
            "DeleteMessageBatch": self._delete_message_batch,
        }  # and ReceiveMessage, which waits
        self._request_ids = itertools.count(1)
        self.calls: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self._describe_sizes: dict[str, Counter[int]] = {op: Counter() for op in DESCRIBES}
        # Per describe op: sum of ids * ceil(N/100) / N over its calls, N the jobs open at the call
        # (created, not yet reported terminal): the calls a poller batching every round of
        # the open jobs perfectly into 100s would have made for the same describes.
        self._round_calls: dict[str, float] = dict.fromkeys(DESCRIBES, 0.0)
        self._reported: Counter[str] = Counter()  # service → jobs reported terminal
        self._counted_since = time.monotonic()
        self._runner: web.ServerRunner | None = None
        self._endpoint_url: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._events is not None:
            self._events.closing = False
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        try:
            await self._runner.setup()
            await web.TCPSite(self._runner, self.config.host, self.config.port).start()
            host, port = self._runner.addresses[0][:2]
            self._endpoint_url = f"http://{host}:{port}"
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._events is not None:  # long polls answer at once
            self._events.closing = True
            self._events.wake()
        self._endpoint_url = None
        if self._runner is not None:
            await self._runner.cleanup()  # stop listening, let in-flight replies finish
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def endpoint_url(self) -> str:
        if self._endpoint_url is None:
            raise RuntimeError("FakeAws is not started")
        return self._endpoint_url

    # -- observation -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Calls and throttled calls per "service.Operation", ids per describe call, jobs."""
        elapsed_s = time.monotonic() - self._counted_since
        describes: dict[str, Any] = {}
        for op, sizes in self._describe_sizes.items():
            calls, ids = sum(sizes.values()), sum(n * k for n, k in sizes.items())
            describes[op] = {
                "calls": calls,
                "ids": ids,
                "mean_ids": round(ids / calls, 2) if calls else None,
                "sizes": {str(n): k for n, k in sorted(sizes.items())},
                "round_calls": round(self._round_calls[op], 3),
            }
        total = sum(self.calls.values())
        events: dict[str, Any] = {}
        if self._events is not None:
            self._events.advance(self._clock())
            events["events"] = self._events.stats()
        return {
            "elapsed_s": round(elapsed_s, 3),
            "calls_total": total,
            "calls_per_s": round(total / elapsed_s, 1) if elapsed_s > 0 else None,
            "calls": dict(sorted(self.calls.items())),
            "throttled": dict(sorted(self.throttled.items())),
            "describe_ids": describes,
            "tasks": {
                "ecs": len(self._tasks),
                "batch": len(self._jobs),
                "batch_children": self._children,
            },
            **events,
        }

    def reset_counts(self) -> None:
        """Zero the call counters (not the tasks and jobs)."""
        self.calls.clear()
        self.throttled.clear()
        for sizes in self._describe_sizes.values():
            sizes.clear()
        self._round_calls = dict.fromkeys(DESCRIBES, 0.0)
        self._counted_since = time.monotonic()

    def terminal_at(self, job_id: str) -> float | None:
        """When the task (ARN or id) or Batch job (or array child, ``<parent>:<i>``) became
        terminal; None while it is not yet. KeyError for an unknown one."""
        if (child := self._find_child(job_id)) is not None:
            array, i = child
            end = array.child_end(i)
        else:
            end = self._find(job_id).terminal_at
        return end if end <= self._clock() else None

    def reported_at(self, job_id: str) -> float | None:
        """When a describe call first showed it terminal (None: not yet)."""
        if (child := self._find_child(job_id)) is not None:
            array, i = child
            return array.reported.get(i)
        return self._find(job_id).reported_at

    def terminal_times(self) -> dict[str, dict[str, Any]]:
        """Every task (by ARN) and job (by id): created, terminal and first reported terminal."""
        now = self._clock()
        return {
            (job.arn if job.service == "ecs" else job.id): {
                "service": job.service,
                "name": job.name,
                "created_at": job.created_at,
                "terminal_at": job.terminal_at if job.terminal_at <= now else None,
                "reported_at": job.reported_at,
                "exit_code": job.final_exit_code(),
                "stopped": job.stop_at is not None,
                **(
                    {}
                    if job.array is None
                    else {
                        "array_size": job.array.size,
                        "children_failed": job.array.summary(now)["FAILED"],
                    }
                ),
                **({} if self._events is None else self._terminal_event(job, now)),
            }
            for job in itertools.chain(self._tasks.values(), self._jobs.values())
        }

    def _terminal_event(self, job: _Job, now: float) -> dict[str, float | None]:
        """When the job's terminal event's first copy was delivered (None: not yet, or dropped)
        and first received."""
        ev = self._events
        assert ev is not None
        done = ECS_STOPPED if job.service == "ecs" else BATCH_DONE
        for seq in reversed(job.events):
            if ev.phase[seq] == done and not ev.flags[seq] & _SUPERSEDED:
                at, received = ev.first_copy_at(seq), ev.received_at[seq]
                return {
                    "terminal_event_at": at if at is not None and at <= now else None,
                    "terminal_event_received_at": None if math.isnan(received) else received,
                }
        return {"terminal_event_at": None, "terminal_event_received_at": None}

    def events(self) -> list[dict[str, Any]]:
        """Every event published so far (its change has happened; superseded ones are not):
        its id, task (ARN) or job (id), status, change time, its copies' delivery times
        (planned: maybe still ahead), whether it was dropped, and its first receive. In
        planning order: by job, then by change."""
        ev = self._queue_events()
        now = self._clock()
        log = []
        for seq, flags in enumerate(ev.flags):
            at = ev.change_at[seq]
            if flags & _SUPERSEDED or at > now:
                continue
            job, phase = ev.jobs[seq], ev.phase[seq]
            received = ev.received_at[seq]
            log.append(
                {
                    "id": ev.event_id(seq),
                    "service": job.service,
                    "job": job.arn if job.service == "ecs" else job.id,
                    "status": self._event_status(job, phase, at),
                    "change_at": at,
                    "deliver_at": None if flags & _DROPPED else ev.deliver_at[seq],
                    "duplicate_at": ev.second_at.get(seq),
                    "dropped": bool(flags & _DROPPED),
                    "received_at": None if math.isnan(received) else received,
                }
            )
        return log

    def _event_status(self, job: _Job, phase: int, at: float) -> str:
        if job.service == "ecs":
            return "STOPPED" if phase == ECS_STOPPED else ECS_LIFE[phase]
        if phase < BATCH_DONE:
            return BATCH_LIFE[phase]
        return str(self._event_detail(job, phase, at)["status"])

    def _find(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id) or self._tasks.get(job_id.rpartition("/")[2])
        if job is None:
            raise KeyError(job_id)
        return job

    def _find_child(self, job_id: Any) -> tuple[_Array, int] | None:
        """(its array, its index) for a ``<parent id>:<index>`` id; None for another id."""
        if not isinstance(job_id, str) or ":" not in job_id or job_id.startswith("arn:"):
            return None
        parent_id, _, index = job_id.partition(":")
        parent = self._jobs.get(parent_id)
        if parent is None or parent.array is None or not index.isdigit():
            return None
        i = int(index)
        if i >= parent.array.size or index != str(i):
            return None
        return parent.array, i

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        target = request.headers.get("X-Amz-Target")
        if target is not None:
            prefix, _, operation = target.partition(".")
            service = TARGETS.get(prefix, "?")
        elif (operation_ := BATCH_PATHS.get(request.path)) is not None:
            service, operation = "batch", operation_
        elif request.path.startswith("/_fakeaws/"):
            return self._control(request)
        else:
            service, operation = "batch", "Unknown"
        key = f"{service}.{operation}"
        self.calls[key] += 1
        if service == "sqs":
            return await self._handle_sqs(operation, body)
        try:
            bucket = self._buckets.get(FAMILIES.get(key, "")) if self.config.throttle else None
            if bucket is not None and not bucket.take():
                self.throttled[key] += 1
                raise self._throttling(service)
            handler = self._handlers.get(key)
            if handler is None:
                raise AwsError(400, "UnknownOperationException", f"{key} is not faked")
            params = orjson.loads(body) if body else {}
            if not isinstance(params, dict):
                raise AwsError(400, "SerializationException", "the body is not a JSON object")
            payload, status = handler(params, self._clock()), 200
        except AwsError as exc:
            return self._error(service, exc)
        except (KeyError, TypeError, ValueError) as exc:  # a malformed request
            return self._error(service, _client_error(f"bad request: {exc!r}"))
        return web.Response(body=payload, status=status, headers=self._headers(service))

    def _headers(self, service: str) -> dict[str, str]:
        kind = "application/json" if service == "batch" else "application/x-amz-json-1.1"
        if service == "sqs":
            kind = "application/x-amz-json-1.0"
        return {"Content-Type": kind, "x-amzn-RequestId": f"fake-{next(self._request_ids)}"}

    def _error(self, service: str, exc: AwsError) -> web.Response:
        headers = self._headers(service)
        if service == "batch":  # REST-JSON: the code travels in a header
            headers["x-amzn-ErrorType"] = exc.code
            body = {"message": exc.message, **exc.fields}
        elif service == "sqs":  # JSON, "awsQueryCompatible": the old Query code in a header
            fields = dict(exc.fields)
            headers["x-amzn-query-error"] = f"{fields.pop('query', exc.code)};Sender"
            body = {"__type": f"com.amazonaws.sqs#{exc.code}", "message": exc.message, **fields}
        else:
            body = {"__type": exc.code, "message": exc.message, **exc.fields}
        return web.Response(body=orjson.dumps(body), status=exc.status, headers=headers)

    @staticmethod
    def _throttling(service: str) -> AwsError:
        if service == "batch":
            return AwsError(429, "TooManyRequestsException", "Too Many Requests")
        return AwsError(400, "ThrottlingException", "Rate exceeded")

    def _control(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/_fakeaws/stats":
            payload: Any = self.stats()
        elif request.path == "/_fakeaws/terminal":
            payload = self.terminal_times()
        elif request.path == "/_fakeaws/reset" and request.method == "POST":
            self.reset_counts()
            payload = {"reset": True}
        elif request.path == "/_fakeaws/events" and self._events is not None:
            payload = self.events()
        elif (
            request.path == "/_fakeaws/queue"
            and request.method == "POST"
            and self._events is not None
            and (broken := request.query.get("broken", "").lower()) in ("true", "false")
        ):
            self.set_queue_broken(broken == "true")
            payload = {"broken": self._events.broken}
        else:
            return web.Response(status=404, text="unknown control path")
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    # -- shared ----------------------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"

    def _life(self, launch: Launch) -> tuple[float, float, float, int]:
        """(pending, run, stopping) clock seconds and the exit code for a new task or job."""
        c, rng = self.config, self._rng

        def span(seconds: float) -> float:
            factor = rng.uniform(1 - c.jitter, 1 + c.jitter) if c.jitter else 1.0
            return seconds * factor / c.time_scale

        pending_s, run_s = span(c.pending_s), span(c.run_s)
        stopping_s = span(c.stopping_s) if launch.service == "ecs" else 0.0
        if c.failure_ratio and rng.random() < c.failure_ratio:
            code = c.failure_exit_code
        else:
            code = c.exit_code if isinstance(c.exit_code, int) else c.exit_code(launch)
        return pending_s, run_s, stopping_s, code

    def _render(self, job: _Job, now: float, *, report: bool = True) -> bytes:
        """The task's or job's JSON, rendered once per phase."""
        phase = job.phase(now)
        # An array parent's statusSummary moves within a phase: cached only once it has ended.
        if phase != job.cached_phase or (job.array is not None and phase != BATCH_DONE):
            doc = (
                self._ecs_task(job, phase)
                if job.service == "ecs"
                else self._batch_job(job, phase, now)
            )
            job.cached, job.cached_phase = orjson.dumps(doc), phase
        if (
            report
            and job.reported_at is None
            and phase >= (ECS_STOPPED if job.service == "ecs" else BATCH_DONE)
        ):
            job.reported_at = now
            self._reported[job.service] += 1
        return job.cached

    def _count_ids(self, op: str, n: int) -> None:
        self._describe_sizes[op][n] += 1
        service = op.partition(".")[0]
        created = len(self._tasks) if service == "ecs" else len(self._jobs)
        open_jobs = max(created - self._reported[service], n, 1)
        self._round_calls[op] += n * math.ceil(open_jobs / 100) / open_jobs

    # -- ECS ---------------------------------------------------------------------------------

    def _definition_arn(self, ref: str) -> str:
        if ref.startswith("arn:"):
            return ref
        family, _, revision = ref.partition(":")
        return self._ecs_arn + f"task-definition/{family}:{revision or 1}"

    def _run_task(self, params: dict[str, Any], now: float) -> bytes:
        cluster = _name(params.get("cluster"))
        token = params.pop("clientToken", None)
        if isinstance(token, str) and (issued := self._tokens.get((cluster, token))):
            first, tasks = issued
            if first != params:
                message = f"The clientToken {token!r} is already in use with other parameters."
                raise AwsError(
                    400, "ConflictException", message, resourceIds=[t.arn for t in tasks]
                )
        else:
            definition = params.get("taskDefinition")
            count = params.get("count", 1)
            if not isinstance(definition, str) or not definition:
                raise _invalid("taskDefinition is required.")
            if not isinstance(count, int) or not 1 <= count <= 10:
                raise _invalid("count must be between 1 and 10.")
            tasks = [self._new_task(params, cluster, definition, now) for _ in range(count)]
            if isinstance(token, str):
                self._tokens[(cluster, token)] = (params, tasks)
        rendered = b",".join(self._render(t, now, report=False) for t in tasks)
        return b'{"tasks":[' + rendered + b'],"failures":[]}'

    def _new_task(self, params: dict[str, Any], cluster: str, definition: str, now: float) -> _Job:
        task_id = self._new_id()
        started_by = params.get("startedBy")
        overrides = (params.get("overrides") or {}).get("containerOverrides") or []
        command = next(
            (
                o.get("command") or []
                for o in overrides
                if o.get("name") == self.config.container_name
            ),
            [],
        )
        name = started_by if isinstance(started_by, str) else task_id
        pending_s, run_s, stopping_s, code = self._life(
            Launch("ecs", name, tuple(command), self._rng)
        )
        task = _Job(
            "ecs",
            task_id,
            self._ecs_arn + f"task/{cluster}/{task_id}",
            name=name,
            owner=cluster,
            definition=self._definition_arn(definition),
            command=tuple(command),
            request=params,
            created_at=now,
            pending_s=pending_s,
            run_s=run_s,
            stopping_s=stopping_s,
            exit_code=code,
        )
        self._tasks[task_id] = task
        if isinstance(started_by, str):
            self._by_started_by[started_by].append(task)
        if self._events is not None:
            self._plan_events(task, now)
        return task

    def _ecs_task(self, task: _Job, phase: int) -> dict[str, Any]:
        r = task.request
        stopping, stopped = phase > 2, phase == ECS_STOPPED
        status = "STOPPED" if stopped else ECS_LIFE[phase]
        container: dict[str, Any] = {
            "containerArn": self._ecs_arn + f"container/{task.owner}/{task.id}/main",
            "taskArn": task.arn,
            "name": self.config.container_name,
            "image": "public.ecr.aws/docker/library/busybox:latest",
            "lastStatus": "STOPPED" if stopping else "RUNNING" if phase == 2 else "PENDING",
        }
        doc: dict[str, Any] = {
            "taskArn": task.arn,
            "clusterArn": self._ecs_arn + f"cluster/{task.owner}",
            "taskDefinitionArn": task.definition,
            "lastStatus": status,
            "desiredStatus": task.desired_status(phase),
            "createdAt": round(task.created_at, 3),
            "launchType": r.get("launchType", "FARGATE"),
            "cpu": "256",
            "memory": "512",
            "group": r.get("group") or "family:" + task.definition.rpartition("/")[2].split(":")[0],
            "version": phase + 1,
            "containers": [container],
            "overrides": r.get("overrides") or {"containerOverrides": []},
            "tags": r.get("tags") or [],
        }
        if isinstance(started_by := r.get("startedBy"), str):
            doc["startedBy"] = started_by
        if task.started and phase >= 2:
            doc["startedAt"] = round(task.running_at, 3)
        if stopping:
            end = round(task.end_at, 3)
            doc.update(stoppingAt=end, executionStoppedAt=end)
            if task.stop_at is not None:
                doc["stopCode"] = "UserInitiated"
                doc["stoppedReason"] = task.stop_reason or "Task stopped by user"
            else:
                doc["stopCode"] = "EssentialContainerExited"
                doc["stoppedReason"] = "Essential container in task exited"
            if (exit_code := task.final_exit_code()) is not None:
                container["exitCode"] = exit_code
        if stopped:
            doc["stoppedAt"] = round(task.terminal_at, 3)
        return doc

    def _task_for(self, ref: Any, cluster: str) -> _Job | None:
        task = self._tasks.get(ref.rpartition("/")[2]) if isinstance(ref, str) else None
        return task if task is not None and task.owner == cluster else None

    def _describe_tasks(self, params: dict[str, Any], now: float) -> bytes:
        refs = params.get("tasks")
        if not isinstance(refs, list) or not refs:
            raise _invalid("Tasks cannot be empty.")
        if len(refs) > MAX_DESCRIBE:
            raise _invalid(f"Tasks cannot have more than {MAX_DESCRIBE} elements.")
        self._count_ids("ecs.DescribeTasks", len(refs))
        cluster = _name(params.get("cluster"))
        found, failures, tasks = [], [], self._tasks
        for ref in refs:  # the hot loop: _task_for inlined, reported STOPPED tasks from cache
            task = tasks.get(ref.rpartition("/")[2]) if isinstance(ref, str) else None
            if task is None or task.owner != cluster:
                failures.append({"arn": ref, "reason": "MISSING"})
            elif task.cached_phase == ECS_STOPPED and task.reported_at is not None:
                found.append(task.cached)  # STOPPED is final: its JSON never changes again
            else:
                found.append(self._render(task, now))
        return b'{"tasks":[' + b",".join(found) + b'],"failures":' + orjson.dumps(failures) + b"}"

    def _stop_task(self, params: dict[str, Any], now: float) -> bytes:
        task = self._task_for(params.get("task"), _name(params.get("cluster")))
        if task is None:
            raise _invalid("The referenced task was not found.")
        end = task.end_at
        task.stop(now, str(params.get("reason") or ""))
        if self._events is not None and task.end_at != end:
            self._plan_events(task, now)
        return b'{"task":' + self._render(task, now, report=False) + b"}"

    def _list_tasks(self, params: dict[str, Any], now: float) -> bytes:
        cluster = _name(params.get("cluster"))
        desired = params.get("desiredStatus", "RUNNING")
        family = params.get("family")
        started_by = params.get("startedBy")
        pool: Iterable[_Job] = (
            self._by_started_by.get(started_by, [])
            if isinstance(started_by, str)
            else self._tasks.values()
        )
        arns = [
            t.arn
            for t in pool
            if t.owner == cluster
            and t.desired_status(t.phase(now)) == desired
            and (family is None or f"task-definition/{family}:" in t.definition)
        ]
        return orjson.dumps(_page(arns, params, "taskArns", limit=100))

    def _describe_clusters(self, params: dict[str, Any], now: float) -> bytes:
        names = [_name(c) for c in params.get("clusters") or ["default"]]
        counts: Counter[tuple[str, str]] = Counter()
        for task in self._tasks.values():
            phase = task.phase(now)
            if phase < ECS_STOPPED:
                counts[(task.owner, "running" if phase == 2 else "pending")] += 1
        clusters = [
            {
                "clusterArn": self._ecs_arn + f"cluster/{name}",
                "clusterName": name,
                "status": "ACTIVE",
                "registeredContainerInstancesCount": 0,
                "runningTasksCount": counts[(name, "running")],
                "pendingTasksCount": counts[(name, "pending")],
                "activeServicesCount": 0,
                "capacityProviders": ["FARGATE", "FARGATE_SPOT"],
            }
            for name in names
        ]
        return orjson.dumps({"clusters": clusters, "failures": []})

    def _describe_task_definition(self, params: dict[str, Any], now: float) -> bytes:
        arn = self._definition_arn(str(params["taskDefinition"]))
        family, _, revision = arn.rpartition("/")[2].partition(":")
        c = self.config
        container = {
            "name": c.container_name,
            "image": "public.ecr.aws/docker/library/busybox:latest",
            "essential": True,
            "memory": 512,
            "logConfiguration": {
                "logDriver": "awslogs",
                "options": {
                    "awslogs-group": c.log_group,
                    "awslogs-region": c.region,
                    "awslogs-stream-prefix": c.log_stream_prefix,
                },
            },
        }
        definition = {
            "taskDefinitionArn": arn,
            "family": family,
            "revision": int(revision) if revision.isdigit() else 1,
            "containerDefinitions": [container],
            "networkMode": "awsvpc",
            "status": "ACTIVE",
            "requiresCompatibilities": ["FARGATE"],
            "compatibilities": ["EC2", "FARGATE"],
            "cpu": "256",
            "memory": "512",
            "registeredAt": 1_700_000_000.0,
        }
        return orjson.dumps({"taskDefinition": definition, "tags": []})

    # -- Batch ---------------------------------------------------------------------------------

    def _submit_job(self, params: dict[str, Any], now: float) -> bytes:
        name, queue, definition = params["jobName"], params["jobQueue"], params["jobDefinition"]
        if not all(isinstance(v, str) and v for v in (name, queue, definition)):
            raise _client_error("jobName, jobQueue and jobDefinition are required.")
        c_scale = self.config.time_scale
        size = (params.get("arrayProperties") or {}).get("size")
        if size is not None and (not isinstance(size, int) or not 2 <= size <= MAX_ARRAY):
            raise _client_error(f"Array size must be between 2 and {MAX_ARRAY}.")
        job_id = str(uuid.UUID(int=self._ids.getrandbits(128), version=4))
        command = tuple((params.get("containerOverrides") or {}).get("command") or ())
        children: _Array | None = None
        if size is None:
            pending_s, run_s, _, code = self._life(Launch("batch", name, command, self._rng))
        else:
            lives = (
                self._life(Launch("batch", name, command, self._rng, index=i)) for i in range(size)
            )
            children = _Array(now, ((p, r, code) for p, r, _, code in lives))
            pending_s = children.sorted_pending[0]  # the first child's start
            run_s, code = children.end_at - now - pending_s, 0
            self._children += size
        if not definition.startswith("arn:"):
            definition_name, _, revision = definition.partition(":")
            definition = self._batch_arn + f"job-definition/{definition_name}:{revision or 1}"
        job = _Job(
            "batch",
            job_id,
            self._batch_arn + f"job/{job_id}",
            name=name,
            owner=_name(queue),
            definition=definition,
            command=command,
            request=params,
            created_at=now,
            pending_s=pending_s,
            run_s=run_s,
            stopping_s=0.0 if children is None else self.config.array_settle_s / c_scale,
            exit_code=code,
        )
        if children is not None:
            job.array = children
            job.exit_at = children.end_at  # the last child's end, to the float
        self._jobs[job_id] = job
        self._by_job_name[name.lower()].append(job)
        if self._events is not None:
            self._plan_events(job, now)
        return orjson.dumps({"jobArn": job.arn, "jobName": name, "jobId": job_id})

    def _batch_job(self, job: _Job, phase: int, now: float) -> dict[str, Any]:
        done = phase == BATCH_DONE
        exit_code = job.final_exit_code()
        summary = None if job.array is None else job.array.summary(now)
        if summary is not None:  # an array parent
            status = ("FAILED" if summary["FAILED"] else "SUCCEEDED") if done else BATCH_LIFE[phase]
        elif done:
            status = "SUCCEEDED" if job.stop_at is None and exit_code == 0 else "FAILED"
        else:
            status = BATCH_LIFE[phase]
        parent_id, colon, index = job.id.partition(":")
        task_id = parent_id.replace("-", "")
        if colon:  # an array child: a task of its own
            task_id = f"{task_id[:24]}{int(index):08x}"
        definition_name = job.definition.rpartition("/")[2].partition(":")[0]
        container: dict[str, Any] = {
            "image": "public.ecr.aws/docker/library/busybox:latest",
            "command": list(job.command),
            "logConfiguration": {"logDriver": "awslogs", "options": {}},
        }
        r = job.request
        doc: dict[str, Any] = {
            "jobArn": job.arn,
            "jobName": job.name,
            "jobId": job.id,
            "jobQueue": self._batch_arn + f"job-queue/{job.owner}",
            "status": status,
            "createdAt": _ms(job.created_at),
            "jobDefinition": job.definition,
            "dependsOn": r.get("dependsOn") or [],
            "parameters": r.get("parameters") or {},
            "tags": r.get("tags") or {},
            "platformCapabilities": ["FARGATE"],
            "attempts": [],
            "container": container,
        }
        if job.stop_at is not None:
            doc["isTerminated"] = True
        if summary is not None:
            assert job.array is not None
            doc["arrayProperties"] = {"statusSummary": summary, "size": job.array.size}
            if job.started and now >= job.running_at:  # its first child's start
                doc["startedAt"] = _ms(job.running_at)
            if done:
                doc["stoppedAt"] = _ms(job.terminal_at)  # when Batch said it had ended
                if status == "FAILED":  # terminated: the reason given; else a child failed
                    doc["statusReason"] = (
                        job.stop_at is not None and job.stop_reason
                    ) or ARRAY_FAILED
            return doc
        if colon:
            doc["arrayProperties"] = {"index": int(index)}
        if job.started and phase >= 4:
            doc["startedAt"] = _ms(job.running_at)
            container["logStreamName"] = f"{definition_name}/default/{task_id}"
            container["taskArn"] = self._ecs_arn + f"task/batch/{task_id}"
        if done:
            doc["stoppedAt"] = _ms(job.end_at)
            reason = job.stop_reason if job.stop_at is not None else None
            doc["statusReason"] = reason or "Essential container in task exited"
            if exit_code is not None:
                container["exitCode"] = exit_code
                doc["attempts"] = [
                    {
                        "container": {
                            "exitCode": exit_code,
                            "logStreamName": container["logStreamName"],
                            "taskArn": container["taskArn"],
                        },
                        "startedAt": doc["startedAt"],
                        "stoppedAt": doc["stoppedAt"],
                        "statusReason": doc["statusReason"],
                    }
                ]
        return doc

    def _describe_jobs(self, params: dict[str, Any], now: float) -> bytes:
        ids = params.get("jobs")
        if not isinstance(ids, list):
            raise _client_error("jobs is required.")
        if len(ids) > MAX_DESCRIBE:
            raise _client_error(f"jobs cannot have more than {MAX_DESCRIBE} elements.")
        self._count_ids("batch.DescribeJobs", len(ids))
        found, jobs = [], self._jobs
        for job_id in ids:  # unknown ids are left out, as on AWS
            if (job := jobs.get(job_id)) is not None:
                found.append(self._render(job, now))
            elif (child := self._find_child(job_id)) is not None:
                found.append(self._render_child(jobs[job_id.partition(":")[0]], child[1], now))
        return b'{"jobs":[' + b",".join(found) + b"]}"

    def _child(self, parent: _Job, i: int) -> _Job:
        """Array child i of `parent` as a job of its own, made for one reply."""
        assert parent.array is not None
        a = parent.array
        child = _Job(
            "batch",
            f"{parent.id}:{i}",
            f"{parent.arn}:{i}",
            name=parent.name,
            owner=parent.owner,
            definition=parent.definition,
            command=parent.command,
            request=parent.request,
            created_at=parent.created_at,
            pending_s=a.pending[i],
            run_s=0.0,
            stopping_s=0.0,
            exit_code=a.exit_codes[i],
        )
        child.running_at, child.exit_at = a.running[i], a.exits[i]  # the very floats counted
        if (stop := a.stopped.get(i)) is not None:
            child.stop_at, child.stop_reason = stop
        return child

    def _render_child(self, parent: _Job, i: int, now: float) -> bytes:
        assert parent.array is not None
        phase = parent.array.phase(i, now)
        if phase == BATCH_DONE:
            parent.array.reported.setdefault(i, now)
        return orjson.dumps(self._batch_job(self._child(parent, i), phase, now))

    def _terminate_job(self, params: dict[str, Any], now: float) -> bytes:
        job_id = params.get("jobId", "")
        reason = str(params.get("reason") or "terminated")
        if (child := self._find_child(job_id)) is not None:  # one child; the parent waits on
            array, i = child
            parent = self._jobs[job_id.partition(":")[0]]
            end = parent.end_at
            array.stop(i, now, reason)
            parent.exit_at, parent.cached_phase = array.end_at, -1
            if self._events is not None and parent.end_at != end:
                self._plan_events(parent, now)
            return b"{}"
        job = self._jobs.get(job_id)
        if job is None:
            raise _client_error(f"Job {params.get('jobId')} not found.")
        end = job.end_at
        if job.array is not None:  # every child still going, then the parent with them
            job.array.stop_all(now, reason)
        job.stop(now, reason)
        if self._events is not None and job.end_at != end:
            self._plan_events(job, now)
        return b"{}"

    def _list_jobs(self, params: dict[str, Any], now: float) -> bytes:
        if (array_job_id := params.get("arrayJobId")) is not None:
            return self._list_children(str(array_job_id), params, now)
        queue = _name(params.get("jobQueue"), "")
        filters = params.get("filters") or []
        names = [
            v.lower() for f in filters if f.get("name") == "JOB_NAME" for v in f.get("values", [])
        ]
        if names:  # every status, newest first
            pool: list[_Job] = []
            for wanted in names:
                if wanted.endswith("*"):
                    prefix = wanted[:-1]
                    pool += [j for j in self._jobs.values() if j.name.lower().startswith(prefix)]
                else:
                    pool += self._by_job_name.get(wanted, [])
            jobs = sorted(
                (j for j in pool if j.owner == queue), key=lambda j: j.created_at, reverse=True
            )
            limit = 100
        else:
            jobs = [j for j in self._jobs.values() if j.owner == queue]
            limit = 1000
        details = [self._batch_job(j, j.phase(now), now) for j in jobs]
        if not names:  # without a filter: one status, RUNNING unless told
            details = [d for d in details if d["status"] == params.get("jobStatus", "RUNNING")]
        summaries = [_job_summary(d) for d in details]
        return orjson.dumps(_page(summaries, params, "jobSummaryList", limit=limit))

    def _list_children(self, parent_id: str, params: dict[str, Any], now: float) -> bytes:
        """ListJobs(arrayJobId): the children in index order, of one status (RUNNING unless
        told; a JOB_NAME filter, which all the children match, means every status)."""
        parent = self._jobs.get(parent_id)
        if parent is None or parent.array is None:
            raise _client_error(f"Job {parent_id} is not an array job.")
        a = parent.array
        wanted = None if params.get("filters") else params.get("jobStatus", "RUNNING")
        summaries = [
            _job_summary(self._batch_job(self._child(parent, i), a.phase(i, now), now))
            for i in range(a.size)
            if wanted is None or a.status(i, now) == wanted
        ]
        return orjson.dumps(_page(summaries, params, "jobSummaryList", limit=1000))

    def _describe_job_queues(self, params: dict[str, Any], now: float) -> bytes:
        names = [_name(q) for q in params.get("jobQueues") or ["default"]]
        queues = [
            {
                "jobQueueName": name,
                "jobQueueArn": self._batch_arn + f"job-queue/{name}",
                "state": "ENABLED",
                "status": "VALID",
                "priority": 1,
                "computeEnvironmentOrder": [
                    {
                        "order": 1,
                        "computeEnvironment": self._batch_arn + "compute-environment/fake",
                    }
                ],
            }
            for name in names
        ]
        return orjson.dumps({"jobQueues": queues})

    # -- CloudWatch Logs ------------------------------------------------------------------------

    def _get_log_events(self, params: dict[str, Any], now: float) -> bytes:
        token = (
            params.get("nextToken") or "f/00000000000000000000000000000000000000000000000000000000"
        )
        return orjson.dumps(
            {"events": [], "nextForwardToken": token, "nextBackwardToken": "b/" + token[2:]}
        )

    # -- EventBridge → SQS ---------------------------------------------------------------------

    @property
    def queue_url(self) -> str:
        """``<endpoint>/<account>/<queue>``: the events' queue."""
        return f"{self.endpoint_url}/{self.config.account_id}/{self._queue_events().name}"

    def set_queue_broken(self, broken: bool = True) -> None:
        """Broken: every SQS call on the queue answers AWS.SimpleQueueService.NonExistentQueue,
        as if it had been deleted: the messages in it are lost, and so are the events falling
        due until it is repaired (``set_queue_broken(False)``: empty, working again)."""
        self._queue_events().set_broken(broken, self._clock())

    def _queue_events(self) -> _Events:
        if self._events is None:
            raise RuntimeError("no events: FakeAws(events=True) or events=<queue name>")
        return self._events

    def _plan_events(self, job: _Job, now: float) -> None:
        """Plan a new job's events, or re-plan a stopped one's. Batch sends none at SUBMITTED;
        an array job's events are its parent's, none for its children."""
        assert self._events is not None
        changes = _changes(job)
        if job.service == "batch":
            changes = [(at, phase) for at, phase in changes if phase]
        self._events.plan(job, changes, now)

    def _event_detail(self, job: _Job, phase: int, at: float) -> dict[str, Any]:
        """The task or job as described at `at`, when it turned `phase` (a stop asked for
        later does not show yet)."""
        stop = job.stop_at, job.stop_reason
        if job.stop_at is not None and at < job.stop_at:
            job.stop_at = None
        try:
            if job.service == "batch":
                return self._batch_job(job, phase, at)
            doc = self._ecs_task(job, phase)
        finally:
            job.stop_at, job.stop_reason = stop
        del doc["tags"]  # ECS events carry no tags
        for key in ("createdAt", "startedAt", "stoppingAt", "executionStoppedAt", "stoppedAt"):
            if key in doc:
                doc[key] = _iso(doc[key])
        doc["updatedAt"] = _iso(at)
        return doc

    def _event_body(self, seq: int) -> bytes:
        """The EventBridge event, as its SQS message's body."""
        ev = self._queue_events()
        job, at = ev.jobs[seq], ev.change_at[seq]
        ecs = job.service == "ecs"
        event = {
            "version": "0",
            "id": ev.event_id(seq),
            "detail-type": "ECS Task State Change" if ecs else "Batch Job State Change",
            "source": "aws.ecs" if ecs else "aws.batch",
            "account": self.config.account_id,
            "time": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.config.region,
            "resources": [job.arn],
            "detail": self._event_detail(job, ev.phase[seq], at),
        }
        return orjson.dumps(event)

    async def _handle_sqs(self, operation: str, body: bytes) -> web.Response:
        try:
            params = orjson.loads(body) if body else {}
            if not isinstance(params, dict):
                raise _sqs_invalid("the body is not a JSON object")
            if operation == "ReceiveMessage":
                payload = await self._receive_message(params)
            elif (handler := self._sqs_handlers.get(operation)) is not None:
                payload = handler(params, self._clock())
            else:
                raise AwsError(
                    400,
                    "UnsupportedOperation",
                    f"sqs.{operation} is not faked",
                    query="AWS.SimpleQueueService.UnsupportedOperation",
                )
        except AwsError as exc:
            return self._error("sqs", exc)
        except (KeyError, TypeError, ValueError) as exc:  # a malformed request
            return self._error("sqs", _sqs_invalid(f"bad request: {exc!r}"))
        return web.Response(body=payload, headers=self._headers("sqs"))

    def _queue(self, params: Mapping[str, Any]) -> _Events:
        """The queue a QueueUrl names (any endpoint: its last path segment is its name)."""
        url, ev = params.get("QueueUrl"), self._events
        if ev is None or ev.broken or not isinstance(url, str):
            raise _no_queue()
        if url.rstrip("/").rpartition("/")[2] != ev.name:
            raise _no_queue()
        return ev

    def _get_queue_url(self, params: dict[str, Any], now: float) -> bytes:
        ev = self._events
        if ev is None or ev.broken or params.get("QueueName") != ev.name:
            raise _no_queue()
        return orjson.dumps({"QueueUrl": self.queue_url})

    def _create_queue(self, params: dict[str, Any], now: float) -> bytes:
        """The events' queue's URL (it exists from the start); no other queue can be made."""
        ev = self._events
        if ev is None or params.get("QueueName") != ev.name:
            name = "none" if ev is None else ev.name
            raise _sqs_invalid(f"fakeaws has one queue ({name}), named by Config.events")
        if ev.broken:
            raise AwsError(
                400,
                "QueueDeletedRecently",
                "You must wait 60 seconds after deleting a queue before you can create another "
                "with the same name.",
                query="AWS.SimpleQueueService.QueueDeletedRecently",
            )
        return orjson.dumps({"QueueUrl": self.queue_url})

    async def _receive_message(self, params: dict[str, Any]) -> bytes:
        ev = self._queue(params)
        n = int(_sqs_int(params, "MaxNumberOfMessages", 1, 10, 1))
        wait_s = _sqs_int(params, "WaitTimeSeconds", 0, 20, 0)
        visibility_s = _sqs_int(params, "VisibilityTimeout", 0, MAX_VISIBILITY_S, ev.visibility_s)
        wanted = {
            *(params.get("MessageSystemAttributeNames") or ()),
            *(params.get("AttributeNames") or ()),  # deprecated, still honoured
        }
        deadline = time.monotonic() + wait_s
        while True:  # the long poll: until a message is visible or the wait is over
            if ev.broken:
                raise _no_queue()
            now = self._clock()
            taken = ev.take(now, n, visibility_s)
            remaining = deadline - time.monotonic()
            if taken or remaining <= 0 or ev.closing:
                break
            pause = min(remaining, POLL_TICK_S)  # a hand-moved clock is seen within a tick
            if (due := ev.next_due()) is not None:  # the clock is assumed to run in real time
                pause = min(pause, max(due - now, 0.001))
            await ev.wait(pause)  # new events wake it up early
        if not taken:
            return b"{}"
        return orjson.dumps({"Messages": [self._message(ev, m, wanted) for m in taken]})

    def _message(self, ev: _Events, message: _Message, wanted: set[str]) -> dict[str, Any]:
        body = self._event_body(message.seq)
        rendered: dict[str, Any] = {
            "MessageId": ev.message_id(message.no),
            "ReceiptHandle": ev.handle(message),
            "MD5OfBody": hashlib.md5(body, usedforsecurity=False).hexdigest(),
            "Body": body.decode(),
        }
        if wanted:
            attributes = {
                "SenderId": "AIDAIEVENTBRIDGEFAKE",
                "SentTimestamp": str(_ms(message.deliver_at)),
                "ApproximateReceiveCount": str(message.receives),
                "ApproximateFirstReceiveTimestamp": str(_ms(message.first_received_at)),
            }
            rendered["Attributes"] = {
                k: v for k, v in attributes.items() if "All" in wanted or k in wanted
            }
        return rendered

    def _delete_message(self, params: dict[str, Any], now: float) -> bytes:
        ev = self._queue(params)
        handle = params.get("ReceiptHandle")
        if not ev.delete(handle):
            raise _bad_handle(handle)
        return b"{}"

    def _delete_message_batch(self, params: dict[str, Any], now: float) -> bytes:
        ev = self._queue(params)
        entries = params.get("Entries") or []
        if not entries:
            raise AwsError(
                400,
                "EmptyBatchRequest",
                "There should be at least one DeleteMessageBatchRequestEntry in the request.",
                query="AWS.SimpleQueueService.EmptyBatchRequest",
            )
        if len(entries) > 10:
            raise AwsError(
                400,
                "TooManyEntriesInBatchRequest",
                f"Maximum number of entries per request are 10. You have sent {len(entries)}.",
                query="AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
            )
        ids = [entry.get("Id") for entry in entries]
        for entry_id in ids:
            if not isinstance(entry_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,80}", entry_id):
                raise AwsError(
                    400,
                    "InvalidBatchEntryId",
                    "A batch entry id can only contain alphanumeric characters, hyphens and "
                    "underscores. It can be at most 80 letters long.",
                    query="AWS.SimpleQueueService.InvalidBatchEntryId",
                )
        if len(set(ids)) < len(ids):
            raise AwsError(
                400,
                "BatchEntryIdsNotDistinct",
                "Two or more batch entries in the request have the same Id.",
                query="AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
            )
        successful, failed = [], []
        for entry in entries:
            handle = entry.get("ReceiptHandle")
            if ev.delete(handle):
                successful.append({"Id": entry["Id"]})
            else:
                error = _bad_handle(handle)
                failed.append(
                    {
                        "Id": entry["Id"],
                        "SenderFault": True,
                        "Code": error.code,
                        "Message": error.message,
                    }
                )
        return orjson.dumps({"Successful": successful, "Failed": failed})

    def _get_queue_attributes(self, params: dict[str, Any], now: float) -> bytes:
        ev = self._queue(params)
        ev.advance(now)
        every = {
            "QueueArn": ev.arn,
            "ApproximateNumberOfMessages": str(ev.n_visible),
            "ApproximateNumberOfMessagesNotVisible": str(ev.n_in_flight),
            "ApproximateNumberOfMessagesDelayed": "0",
            "VisibilityTimeout": str(int(ev.visibility_s)),
            "ReceiveMessageWaitTimeSeconds": "0",
            "DelaySeconds": "0",
            "MessageRetentionPeriod": "345600",
            "MaximumMessageSize": "262144",
            "SqsManagedSseEnabled": "true",
        }
        names = params.get("AttributeNames") or []
        if unknown := [n for n in names if n != "All" and n not in every]:
            raise AwsError(
                400,
                "InvalidAttributeName",
                f"Unknown Attribute {unknown[0]}.",
                query="InvalidAttributeName",
            )
        attributes = every if "All" in names else {n: every[n] for n in names}
        return orjson.dumps({"Attributes": attributes} if attributes else {})


def _sqs_invalid(message: str) -> AwsError:
    return AwsError(400, "InvalidParameterValue", message, query="InvalidParameterValue")


def _no_queue() -> AwsError:
    return AwsError(
        400,
        "QueueDoesNotExist",
        "The specified queue does not exist.",
        query="AWS.SimpleQueueService.NonExistentQueue",
    )


def _bad_handle(handle: Any) -> AwsError:
    return AwsError(
        400,
        "ReceiptHandleIsInvalid",
        f'The input receipt handle "{handle}" is not a valid receipt handle.',
        query="ReceiptHandleIsInvalid",
    )


def _sqs_int(params: Mapping[str, Any], name: str, low: int, high: int, default: float) -> float:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _sqs_invalid(
            f"Value {value} for parameter {name} is invalid. Reason: Must be between {low} and "
            f"{high}, if provided."
        )
    return value


def _job_summary(detail: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("jobArn", "jobId", "jobName", "createdAt", "status", "statusReason", "startedAt",
            "stoppedAt", "jobDefinition")  # fmt: skip
    summary = {k: detail[k] for k in keys if k in detail}
    if "exitCode" in detail["container"]:
        summary["container"] = {"exitCode": detail["container"]["exitCode"]}
    if array_properties := detail.get("arrayProperties"):  # size (a parent) or index (a child)
        summary["arrayProperties"] = {
            k: v for k, v in array_properties.items() if k in ("size", "index")
        }
    return summary


def _page(items: list[Any], params: Mapping[str, Any], key: str, *, limit: int) -> dict[str, Any]:
    """One page of a list call: `maxResults` (capped at `limit`) from the `nextToken` offset."""
    size = min(int(params.get("maxResults") or limit), limit)
    start = int(params.get("nextToken") or 0)
    page: dict[str, Any] = {key: items[start : start + size]}
    if start + size < len(items):
        page["nextToken"] = str(start + size)
    return page


# -- CLI ---------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> tuple[Config, str | None, str | None, bool]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = p.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=0)
    add("--region", default="us-east-1")
    add("--pending-s", type=float, default=5.0)
    add("--run-s", type=float, default=60.0)
    add("--stopping-s", type=float, default=0.0, help="ECS: container exit → STOPPED")
    add("--array-settle-s", type=float, default=0.0, help="Batch: last child's end → parent's")
    add("--jitter", type=float, default=0.0, help="relative, e.g. 0.2 for ±20%%")
    add("--exit-code", type=int, default=0)
    add("--failure-ratio", type=float, default=0.0)
    add("--failure-exit-code", type=int, default=1)
    add("--seed", type=int, default=0)
    add("--time-scale", type=float, default=1.0, help="durations are divided by this")
    add("--container-name", default="main")
    add("--log-group", default="/ecs/jobs")
    add("--no-throttle", action="store_true", help="never throttle")
    for family, spec in DEFAULT_BUCKETS.items():
        flag = family.replace(".", "-")
        add(f"--{flag}-rate", type=float, default=spec.rate_per_s, help=f"{family} calls/s")
        add(f"--{flag}-burst", type=float, default=spec.burst)
    add("--dump", metavar="PATH", help="write terminal_times() here as JSON on exit")
    add(
        "--events",
        nargs="?",
        const=EVENT_QUEUE,
        default=False,
        metavar="QUEUE",
        help=f"EventBridge events into this SQS queue (default name: {EVENT_QUEUE})",
    )
    add("--event-delay-median-s", type=float, default=0.5, help="lognormal delivery delay")
    add("--event-delay-p99-s", type=float, default=3.0)
    add("--event-duplicate-ratio", type=float, default=0.01)
    add("--event-drop-ratio", type=float, default=0.0)
    add("--queue-visibility-timeout-s", type=float, default=30.0)
    add("--dump-events", metavar="PATH", help="write events() here as JSON on exit")
    add("--no-uvloop", action="store_true")
    a = p.parse_args(argv)
    buckets = {
        family: Bucket(
            getattr(a, f"{family.replace('.', '_')}_burst"),
            getattr(a, f"{family.replace('.', '_')}_rate"),
        )
        for family in DEFAULT_BUCKETS
    }
    plain = ("host", "port", "region", "pending_s", "run_s", "stopping_s", "array_settle_s",
             "jitter", "exit_code", "failure_ratio", "failure_exit_code", "seed", "time_scale",
             "container_name", "log_group", "events", "event_delay_median_s",
             "event_delay_p99_s", "event_duplicate_ratio", "event_drop_ratio",
             "queue_visibility_timeout_s")  # fmt: skip
    settings = {name: getattr(a, name) for name in plain}
    config = Config(**settings, throttle=not a.no_throttle, buckets=buckets)
    return config, a.dump, a.dump_events, not a.no_uvloop


async def serve(
    config: Config, dump: str | None = None, dump_events: str | None = None
) -> dict[str, Any]:
    """Run until SIGINT/SIGTERM (a second one exits at once); return the final stats."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)  # a second signal: the operator wants out now
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    async with FakeAws(config) as aws:
        print(aws.endpoint_url, flush=True)
        await stop.wait()
        stats = aws.stats()
        if dump:
            data = orjson.dumps(aws.terminal_times())
            await asyncio.to_thread(Path(dump).write_bytes, data)
        if dump_events:
            data = orjson.dumps(aws.events())
            await asyncio.to_thread(Path(dump_events).write_bytes, data)
    return stats


def main(argv: list[str] | None = None) -> None:
    config, dump, dump_events, use_uvloop = _parse(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        stats = runner.run(serve(config, dump, dump_events))
    sys.stdout.write(json.dumps(stats) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
