"""N Batch jobs as one array job against N single SubmitJobs under the 50/s SubmitJob bucket
(issue #15): time until all are dispatched, time until all have ended, and the calls made.

    python bench/arrays.py                         # 10,000 jobs: singles, then one array
    python bench/arrays.py --jobs 500              # a quick try
    python bench/arrays.py --modes array --save /tmp/arrays.json

Per mode, a fresh `bench/fakeaws.py` (a child process) enforcing AWS's SubmitJob bucket
(`--batch-rate`/s, burst `--batch-burst`) and a fresh `orchestrator serve` with its Batch
backend on, its own SubmitJob bucket set to the same numbers, its DescribeJobs bucket 20/s burst
100 and the poller's default timing. Both buckets are let fill up after the daemon's start-up
health check, the stand-in's counters are reset, then:

- singles: `--jobs` jobs of one command each, sent at once with `Client.submit_many`;
- array: one job with `array_size = --jobs` (2..10,000), which the daemon sends as one
  `SubmitJob` with `arrayProperties.size` and tracks by `DescribeJobs` of the parent.

Jobs live short at the stand-in (`--pending-s`, `--run-s`, ±`--jitter`; no time scaling: the
bucket's rate is real), so the run also measures the time until everything has ended.
`--failure-ratio` makes that share of jobs (of an array's children) exit 1: the array then
ends FAILED, and the SubmitJob calls show whether the daemon sent it again.
`--array-settle-s` has the stand-in turn the parent SUCCEEDED/FAILED that long after its last
child's end (AWS does so a little later; the statusSummary shows every child ended meanwhile).

- dispatched (s): first submit → no job QUEUED at the daemon (`ping`): each one SUBMITTED or
  later (or failed);
- last launch (s): first submit → the stand-in's creation time of the last job (an array's
  children are all created by its one SubmitJob);
- all ended (s): first submit → every job terminal at the daemon (`ping`, polled every 0.2 s);
  ended at the stand-in (s): first submit → the last job's (an array's last child's) end there;
- SubmitJob calls and throttle replies, DescribeJobs calls and ids as the stand-in counted them
  (from the first submit to the end); the daemon's CPU seconds over the same span, and its peak
  RSS.

`--save PATH.json` writes every row (with the array's final `statusSummary`, as the daemon
recorded it) for later plotting.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from orchestrator import errors
from orchestrator.client import Client
from tests.support.daemon import DaemonProcess

MODES = ("singles", "array")
MAX_ARRAY = 10_000  # AWS Batch's largest array


@dataclasses.dataclass
class Row:
    mode: str
    jobs: int  # units of work: single jobs, or the array's children
    submitted: int = 0  # jobs the daemon accepted (N singles, or 1 array)
    launched: int = 0  # jobs (children) created at the stand-in
    submit_calls: int = 0
    throttled: int = 0
    describe_calls: int = 0
    describe_ids: int = 0
    dispatch_s: float = math.nan  # first submit → no job QUEUED at the daemon
    last_launch_s: float = math.nan  # first submit → the last creation at the stand-in
    ended_s: float = math.nan  # first submit → every job terminal at the daemon
    stand_in_ended_s: float = math.nan  # first submit → the last end at the stand-in
    cpu_s: float = math.nan
    rss_mb: float = math.nan
    states: dict[str, int] = dataclasses.field(default_factory=dict)  # at the daemon, at the end
    array_status: dict[str, int] | None = None  # the array's statusSummary, as recorded
    array_end: dict[str, Any] | None = None  # the array job's state, failure, reason, attempt
    children: dict[str, str] = dataclasses.field(default_factory=dict)  # `get <id>:<i>`, a few
    note: str = ""  # why a mode could not run (the daemon refused the spec)
    started_at: float = math.nan  # the first submit (epoch)


def specs(mode: str, jobs: int) -> list[dict[str, Any]]:
    if mode == "singles":
        return [{"command": ["bench", str(i)], "name": f"single-{i}"} for i in range(jobs)]
    return [{"command": ["bench", "array"], "name": "array", "array_size": jobs}]


async def submit(client: Client, mode: str, jobs: int) -> int:
    """Send the mode's specs with `submit_many`; how many were accepted. Raises the first
    refusal (all of them refused: the daemon does not take this spec)."""
    accepted, refused = 0, []
    async for result in client.submit_many(specs(mode, jobs)):
        if isinstance(result, errors.RemoteError):
            refused.append(result)
        else:
            accepted += 1
    if refused:
        raise refused[0]
    return accepted


def dispatched(n: int) -> Callable[[dict[str, int]], bool]:
    """`n` jobs, none of them QUEUED: each SUBMITTED or later, or failed."""
    return lambda counts: sum(counts.values()) >= n and counts.get("QUEUED", 0) == 0


def ended(n: int) -> Callable[[dict[str, int]], bool]:
    return lambda counts: sum(counts.get(s, 0) for s in ab.TERMINAL) >= n


async def run_mode(mode: str, args: argparse.Namespace, root: Path) -> Row:
    row = Row(mode, args.jobs)
    rate, burst = args.batch_rate, args.batch_burst
    fake = ab.FakeAwsProcess(
        [
            *ab.fake_args(
                pending_s=args.pending_s,
                run_s=args.run_s,
                jitter=args.jitter,
                time_scale=1.0,
                buckets={ab.LAUNCH_FAMILY["batch"]: (rate, burst)},
            ),
            *("--failure-ratio", f"{args.failure_ratio:g}"),
            *("--array-settle-s", f"{args.array_settle_s:g}"),
        ],
        root / f"fakeaws-{mode}.log",
    )
    fake.start()
    daemon = DaemonProcess(
        root / mode,
        env=ab.daemon_env(
            "batch",
            fake.url,
            max_in_flight=max(args.jobs, 100),
            poller=ab.PollerTiming(),
            launch=(rate, burst),
            describe=(20.0, 100.0),
            synchronous=args.synchronous,
        ),
    )
    daemon.root.mkdir(parents=True, exist_ok=True)
    try:
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        await asyncio.sleep(burst / rate + 0.5)  # both buckets full again after the health check
        async with aiohttp.ClientSession() as http, Client(daemon.socket_path) as client:
            await fake.reset(http)
            before = ab.proc_sample(pid)
            t0, row.started_at = time.monotonic(), time.time()
            try:
                row.submitted = await submit(client, mode, args.jobs)
            except errors.RemoteError as exc:
                row.note = f"refused: {exc}"
                return row
            timeout_s = args.timeout_s or 3 * args.jobs / rate + 120
            done = dispatched(row.submitted)
            counts = await ab.wait_counts(client, daemon, done, timeout_s, interval_s=0.1)
            if done(counts):
                row.dispatch_s = time.monotonic() - t0
            if not args.no_wait_end:
                done = ended(row.submitted)
                counts = await ab.wait_counts(client, daemon, done, timeout_s, interval_s=0.2)
                if done(counts):
                    row.ended_s = time.monotonic() - t0
            after = ab.proc_sample(pid)
            stats, terminal = await fake.stats(http), await fake.terminal(http)
            if mode == "array":
                [job] = await client.list(limit=1)
                row.array_status = job["info"].get("array_status")
                keys = ("state", "failure", "reason", "attempt", "exit_code")
                row.array_end = {key: job.get(key) for key in keys}
                for i in (0, args.jobs - 1):  # children, described on demand (after the stats)
                    try:
                        child = await client.get(f"{job['id']}:{i}")
                    except errors.RemoteError as exc:
                        row.children[str(i)] = f"refused: {exc}"
                    else:
                        row.children[str(i)] = f"{child['state']}, exit code {child['exit_code']}"
            row.states = {state: n for state, n in counts.items() if n}
        if before is not None and after is not None:
            row.cpu_s, row.rss_mb = after.cpu_s - before.cpu_s, after.hwm_mb
        row.submit_calls = int(stats["calls"].get(ab.LAUNCH_OP["batch"], 0))
        row.throttled = int(stats["throttled"].get(ab.LAUNCH_OP["batch"], 0))
        described = stats["describe_ids"].get(ab.DESCRIBE_OP["batch"]) or {}
        row.describe_calls = int(described.get("calls") or 0)
        row.describe_ids = int(described.get("ids") or 0)
        jobs = [t for t in terminal.values() if t["service"] == "batch"]
        row.launched = sum(int(t.get("array_size") or 1) for t in jobs)
        if jobs:
            row.last_launch_s = max(t["created_at"] for t in jobs) - row.started_at
            ends = [t["terminal_at"] for t in jobs]
            if all(e is not None for e in ends):
                row.stand_in_ended_s = max(ends) - row.started_at
    finally:
        if daemon.proc is not None:
            daemon.stop()
        fake.stop()
    return row


def report(rows: list[Row]) -> str:
    headers = [
        "mode", "jobs", "daemon jobs", "launched at the stand-in", "SubmitJob calls",
        "throttled replies", "dispatched (s)", "last launch (s)", "all ended (s)",
        "ended at the stand-in (s)", "DescribeJobs calls", "ids described", "daemon CPU (s)",
        "peak RSS (MB)", "final states",
    ]  # fmt: skip
    body = [
        [
            r.mode,
            f"{r.jobs:,}",
            f"{r.submitted:,}",
            f"{r.launched:,}",
            f"{r.submit_calls:,}",
            r.throttled,
            ab.fmt(r.dispatch_s, 2),
            ab.fmt(r.last_launch_s, 2),
            ab.fmt(r.ended_s, 1),
            ab.fmt(r.stand_in_ended_s, 1),
            f"{r.describe_calls:,}",
            f"{r.describe_ids:,}",
            ab.fmt(r.cpu_s, 1),
            ab.fmt(r.rss_mb, 0),
            ", ".join(f"{k} {v:,}" for k, v in sorted(r.states.items())) or r.note or "n/a",
        ]
        for r in rows
    ]
    lines = [ab.table(headers, body), ""]
    for r in rows:
        if r.note:
            lines.append(f"- {r.mode}: {r.note}")
        if r.array_status is not None:
            summary = ", ".join(f"{k} {v:,}" for k, v in r.array_status.items() if v)
            lines.append(f"- {r.mode}: statusSummary as the daemon last recorded it: {summary}")
        if r.array_end is not None:
            end = ", ".join(f"{k} {v}" for k, v in r.array_end.items() if v is not None)
            lines.append(f"- {r.mode}: the array job at the end: {end}")
        for i, seen in r.children.items():
            lines.append(f"- {r.mode}: child {i} (`get <id>:{i}`): {seen}")
        if r.mode == "array" and r.submitted and r.launched != r.jobs:
            lines.append(
                f"- {r.mode}: the stand-in made {r.launched:,} jobs, not {r.jobs:,} children: "
                "the daemon did not send arrayProperties"
            )
    by_mode = {r.mode: r for r in rows}
    if (s := by_mode.get("singles")) and (a := by_mode.get("array")) and not a.note:
        lines.append(
            f"- dispatch: {ab.fmt(s.dispatch_s, 1)} s and {s.submit_calls:,} SubmitJob calls "
            f"for {s.jobs:,} singles; {ab.fmt(a.dispatch_s, 2)} s and {a.submit_calls:,} for "
            f"one array of {a.jobs:,}"
        )
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> None:
    rows = await ab.run_each(
        "arrays", args.modes, lambda mode, root: run_mode(mode, args, root), keep=args.keep
    )
    print(report(rows))
    ab.save_rows(args.save, "arrays", rows)


def main() -> None:
    p = ab.arguments(__doc__)
    p.add_argument("--jobs", type=int, default=MAX_ARRAY, help="singles, and the array's size")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch-rate", type=float, default=50.0, help="SubmitJob bucket, calls/s")
    p.add_argument("--batch-burst", type=float, default=50.0)
    p.add_argument("--pending-s", type=float, default=5.0)
    p.add_argument("--run-s", type=float, default=10.0)
    p.add_argument("--jitter", type=float, default=0.2)
    p.add_argument(
        "--failure-ratio", type=float, default=0.0, help="this share of jobs (children) exits 1"
    )
    p.add_argument(
        "--array-settle-s",
        type=float,
        default=0.0,
        help="the stand-in's delay from an array's last child's end to the parent's",
    )
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    p.add_argument("--no-wait-end", action="store_true", help="stop once all are dispatched")
    p.add_argument("--timeout-s", type=float, default=0.0)
    p.add_argument("--keep", action="store_true", help="keep the logs and stores in /tmp")
    p.add_argument("--save", type=Path, help="write the rows as JSON")
    args = p.parse_args()
    if "array" in args.modes and not 2 <= args.jobs <= MAX_ARRAY:
        p.error(f"an array has 2..{MAX_ARRAY:,} children: --jobs {args.jobs}")
    print(f"# arrays: `{ab.command_line()}`")
    print()
    print(f"- machine: {ab.machine_line()}")
    print(
        f"- {args.jobs:,} Batch jobs, as singles and as one array; SubmitJob bucket "
        f"{args.batch_rate:g}/s burst {args.batch_burst:g} at the stand-in and the daemon; jobs "
        f"pending {args.pending_s:g} s, running {args.run_s:g} s (±{args.jitter:.0%}); "
        "describe buckets 20/s burst 100; no time scaling"
    )
    print()
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
