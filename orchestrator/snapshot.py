"""What `orchestrator top` shows, built for the `top` socket operation: one reply a second per
screen, so it stays cheap — three store reads (counts by state, the jobs listed, the last
failures), the rest from memory (the dispatcher's lanes, the backends' telemetry, health).

The store lists jobs newest first by walking its ids, which costs the whole table when fewer
jobs than asked for are unfinished (the usual case of a store that keeps a month of finished
jobs). So while the lanes hold few jobs, the unfinished ones are read instead with
`Store.unfinished`, which its index serves, and filtered here. (`count_by_state` still reads
every row: as `ping` does.)

A peer sees what `ping` and `list` show it: counts and jobs of its own jobs only (an admin:
all). The lanes (jobs in flight and queued per backend, whoever submitted them) are the
daemon's load, shown to admins alone; the AWS calls, token buckets and health are the daemon's
own and shown to every peer, as `ping` shows health.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator import models
from orchestrator.backends.base import Telemetry
from orchestrator.store import JobQuery, Problem, Store

FAILED_STATES = (models.JobState.FAILED, models.JobState.LOST)
# The last failures are the failed jobs that ended last among this many times as many of the
# newest failed jobs (the store lists by id, that is by submission).
_FAILURE_SCAN = 4
# The unfinished states, in the order a job goes through them.
ACTIVE_STATES = tuple(s for s in models.JobState if not s.terminal)
# Up to this many jobs in the lanes, the unfinished jobs are read whole (see above).
UNFINISHED_READ_MAX = 500


@dataclass(frozen=True, slots=True)
class Query:
    """What the screen asks for: jobs in `states` (None: the unfinished ones), of `backend`
    (None: any), at most `limit` of them, and the last `failures` failed jobs."""

    states: Sequence[models.JobState] | None = None
    backend: str | None = None
    limit: int = 50
    failures: int = 10


@dataclass(frozen=True, slots=True)
class Lane:
    """One backend's lane in the dispatcher: jobs launched and not ended, jobs waiting."""

    in_flight: int
    queued: int


async def build(
    store: Store,
    query: Query,
    *,
    owner: int | None,
    telemetry: Mapping[str, Telemetry],
    lanes: Mapping[str, Lane],
    show_lanes: bool,
    problems: Sequence[Problem],
    now: float,
) -> dict[str, Any]:
    """The snapshot, for a peer that may see the jobs of `owner` (None: every job) and, with
    `show_lanes`, the daemon's load."""
    counts = await store.count_by_state(owner)
    jobs = await _jobs(store, query, owner, sum(x.in_flight + x.queued for x in lanes.values()))
    failures: list[models.Job] = []
    if query.failures:
        failed = await store.list_jobs(
            JobQuery.of(
                FAILED_STATES,
                backend=query.backend,
                limit=query.failures * _FAILURE_SCAN,
                peer_uid=owner,
            )
        )
        failed.sort(key=lambda job: job.updated_at, reverse=True)
        failures = failed[: query.failures]
    return {
        "at": models.iso(now),
        "status": "degraded" if problems else "ok",
        "problems": [{"reason": p.reason, "message": p.message} for p in problems],
        "jobs_by_state": {state.value: counts.get(state.value, 0) for state in models.JobState},
        "filter": {
            "state": None if query.states is None else [s.value for s in query.states],
            "backend": query.backend,
        },
        "jobs": [compact(job) for job in jobs],
        "failures": [compact(job) for job in failures],
        "lanes": None
        if not show_lanes
        else {
            name: {"in_flight": lane.in_flight, "queued": lane.queued}
            for name, lane in sorted(lanes.items())
        },
        "backends": sorted(telemetry),
        "aws": aws(telemetry),
    }


async def _jobs(store: Store, query: Query, owner: int | None, in_lanes: int) -> list[models.Job]:
    states = list(query.states) if query.states else list(ACTIVE_STATES)
    if in_lanes > UNFINISHED_READ_MAX or any(state.terminal for state in states):
        return await store.list_jobs(
            JobQuery.of(states, backend=query.backend, limit=query.limit, peer_uid=owner)
        )
    wanted = set(states)
    found = [
        job
        for job in await store.unfinished()
        if job.state in wanted
        and (query.backend is None or job.backend == query.backend)
        and (owner is None or (job.peer is not None and job.peer.uid == owner))
    ]
    found.sort(key=lambda job: job.id, reverse=True)
    return found[: query.limit]


def compact(job: models.Job) -> dict[str, Any]:
    """What a line of the screen needs of a job: not its command, environment or info."""
    most = None if job.spec.retry is None else job.spec.retry.attempts
    return {
        "id": job.id,
        "name": job.name,
        "backend": job.backend,
        "state": job.state.value,
        "attempt": job.attempt,
        "attempts": most,
        "created_at": models.iso(job.created_at),
        "since": models.iso(job.entered(job.state) or job.updated_at),
        "updated_at": models.iso(job.updated_at),
        "exit_code": job.exit_code,
        "failure": job.failure,
        "reason": job.reason,
    }


def aws(telemetry: Mapping[str, Telemetry]) -> dict[str, list[dict[str, Any]]]:
    """Every backend's AWS call counters (since the daemon started) and token buckets; a
    bucket two backends share is listed once."""
    calls = [
        {
            "backend": backend,
            "service": service,
            "operation": operation,
            "calls": n_calls,
            "throttles": n_throttles,
        }
        for backend, report in sorted(telemetry.items())
        for service, operation, n_calls, n_throttles in report.calls
    ]
    buckets: dict[str, dict[str, Any]] = {}
    for backend, report in sorted(telemetry.items()):
        for name, rate, configured in report.buckets:
            buckets.setdefault(
                name,
                {
                    "backend": backend,
                    "bucket": name,
                    "rate_per_s": rate,
                    "configured_rate_per_s": configured,
                },
            )
    return {"calls": calls, "buckets": list(buckets.values())}
