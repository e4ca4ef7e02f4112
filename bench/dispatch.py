"""Dispatch under AWS's launch buckets: achieved RunTask / SubmitJob rate as a share of the
bucket, throttle replies, and jobs failed by throttling (must be 0).

    python bench/dispatch.py                       # 2,000 jobs, ECS 40/s then Batch 50/s
    python bench/dispatch.py --jobs 500 --backends batch
    python bench/dispatch.py --save /tmp/dispatch.json   # raw launch times, for plots.py

Per backend, a fresh `bench/fakeaws.py` (a child process) enforcing the bucket as AWS does (ECS
RunTask+StopTask: `--ecs-rate`/s, burst `--ecs-burst`; Batch SubmitJob: `--batch-rate`/s, burst
`--batch-burst`) and a fresh `orchestrator serve` whose own bucket for that family is
configured to the same numbers (`--daemon-rate` to differ). Both buckets are let fill up after
the daemon's start-up health check, then `--jobs` jobs are sent at once with
`Client.submit_many`. Jobs run long at the stand-in (`--pending-s`, `--run-s`; no time scaling:
rates are real), so tracking costs little while they are launched.

- steady rate: launches counted at the stand-in (each task's/job's creation time), from the
  first one that finds the bucket empty (the launches reach `burst + rate · t`) to the last;
  "of bucket" is that rate ÷ the bucket's sustained rate. If the bucket never runs dry the
  daemon was the limit, and the rate after the first `burst` launches is shown instead;
- throttled: throttle replies the stand-in sent for the launch family (botocore's retried
  attempts included);
- retried starts: jobs that needed more than one attempt; failed (throttling): jobs FAILED or
  LOST with a throttling reason; failed (other): any other FAILED/LOST.

`--save PATH.json` writes every row with its raw launch times (epoch seconds at the stand-in)
and the moment of the first submit, for `bench/plots.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import re
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from orchestrator.client import Client
from tests.support.daemon import DaemonProcess

THROTTLING = re.compile(r"throttl|rate exceeded|too ?many ?requests", re.IGNORECASE)


@dataclasses.dataclass
class Row:
    backend: str
    rate: float
    burst: float
    daemon_rate: float
    jobs: int
    launched: int = 0
    dispatch_s: float = math.nan  # first submit → no job QUEUED
    steady_rate: float = math.nan
    emptied: bool = False  # the bucket ran dry: the rate is the bucket's, not the daemon's
    throttled: int = 0
    retried: int = 0
    failed_throttling: int = 0
    failed_other: int = 0
    queued_left: int = 0
    cpu_s: float = math.nan
    rss_mb: float = math.nan
    reasons: list[str] = dataclasses.field(default_factory=list)
    started_at: float = math.nan  # the first submit (epoch), for --save
    launches: list[float] = dataclasses.field(default_factory=list)  # epoch, sorted


def steady_rate(launch_times: list[float], rate: float, burst: float) -> tuple[float, bool]:
    """Launches per second once the bucket is empty, and whether it ever was.

    The bucket is empty from the first launch that reaches the envelope `burst + rate · t`
    (t from the first launch; a token of slack). From there to the last launch, the rate is
    what the bucket let through. If the launches never reach the envelope, the bucket was never
    the limit (the daemon was): the rate is then measured after the first `burst` launches."""
    times = sorted(launch_times)
    if len(times) < 2:
        return math.nan, False
    t0 = times[0]
    start = next((k for k, t in enumerate(times) if k + 1 >= burst + rate * (t - t0) - 1), None)
    emptied = start is not None
    if start is None:
        start = min(int(burst), len(times) - 2)
    if times[-1] <= times[start]:
        return math.nan, emptied
    return (len(times) - 1 - start) / (times[-1] - times[start]), emptied


async def wait_dispatched(
    client: Client, daemon: DaemonProcess, n: int, timeout_s: float
) -> dict[str, int]:
    """Until no job is QUEUED (each launched, or failed); the final counts by state."""

    def dispatched(counts: dict[str, int]) -> bool:
        return sum(counts.values()) >= n and counts.get("QUEUED", 0) == 0

    return await ab.wait_counts(client, daemon, dispatched, timeout_s, interval_s=0.1)


async def run_backend(backend: str, args: argparse.Namespace, root: Path) -> Row:
    rate, burst = (
        (args.ecs_rate, args.ecs_burst)
        if backend == "ecs"
        else (
            args.batch_rate,
            args.batch_burst,
        )
    )
    daemon_rate = args.daemon_rate or rate
    row = Row(backend, rate, burst, daemon_rate, args.jobs)
    fake = ab.FakeAwsProcess(
        ab.fake_args(
            pending_s=args.pending_s,
            run_s=args.run_s,
            jitter=0.2,
            time_scale=1.0,
            buckets={ab.LAUNCH_FAMILY[backend]: (rate, burst)},
        ),
        root / f"fakeaws-{backend}.log",
    )
    fake.start()
    daemon = DaemonProcess(
        root / backend,
        env=ab.daemon_env(
            backend,
            fake.url,
            max_in_flight=args.jobs,
            poller=ab.PollerTiming(),
            launch=(daemon_rate, burst),
            describe=(20.0, 100.0),
            synchronous=args.synchronous,
        ),
    )
    daemon.root.mkdir(parents=True, exist_ok=True)
    try:
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        # Let both buckets fill up again after the health check (ECS: StopTask takes a token).
        await asyncio.sleep(burst / min(rate, daemon_rate) + 0.5)
        async with aiohttp.ClientSession() as http, Client(daemon.socket_path) as client:
            await fake.reset(http)
            before = ab.proc_sample(pid)
            t0, row.started_at = time.monotonic(), time.time()
            await ab.submit_all(client, args.jobs, "dispatch")
            timeout_s = args.timeout_s or 3 * args.jobs / min(rate, daemon_rate) + 60
            counts = await wait_dispatched(client, daemon, args.jobs, timeout_s)
            row.dispatch_s = time.monotonic() - t0
            after = ab.proc_sample(pid)
            stats, terminal = await fake.stats(http), await fake.terminal(http)
            jobs = await client.list(limit=args.jobs + 1000)
        row.queued_left = counts.get("QUEUED", 0)
        if before is not None and after is not None:
            row.cpu_s, row.rss_mb = after.cpu_s - before.cpu_s, after.hwm_mb
        op = ab.LAUNCH_OP[backend]
        row.throttled = int(stats["throttled"].get(op, 0))
        launches = [t["created_at"] for t in terminal.values() if t["service"] == backend]
        if args.keep:
            (root / "launches.json").write_bytes(orjson.dumps(sorted(launches)))
        row.launched = len(launches)
        row.launches = sorted(launches)
        row.steady_rate, row.emptied = steady_rate(launches, rate, burst)
        for job in jobs:
            if job["attempt"] > 1:
                row.retried += 1
            if job["state"] in ("FAILED", "LOST"):
                reason = str(job.get("reason"))
                if THROTTLING.search(reason):
                    row.failed_throttling += 1
                else:
                    row.failed_other += 1
                if len(row.reasons) < 3:
                    row.reasons.append(f"{job['state']}: {reason}")
    finally:
        if daemon.proc is not None:
            daemon.stop()
        fake.stop()
    return row


def report(rows: list[Row]) -> str:
    headers = [
        "backend", "AWS bucket", "daemon bucket", "jobs", "launched", "dispatch (s)",
        "steady rate (/s)", "of bucket", "throttled replies", "retried starts",
        "failed (throttling)", "failed (other)", "daemon CPU (s)", "peak RSS (MB)",
    ]  # fmt: skip
    body = [
        [
            r.backend,
            f"{r.rate:g}/s, burst {r.burst:g}",
            f"{r.daemon_rate:g}/s, burst {r.burst:g}",
            f"{r.jobs:,}",
            f"{r.launched:,}",
            ab.fmt(r.dispatch_s, 1),
            ab.fmt(r.steady_rate, 1),
            f"{100 * r.steady_rate / r.rate:.1f}%" if not math.isnan(r.steady_rate) else "n/a",
            r.throttled,
            r.retried,
            r.failed_throttling,
            r.failed_other,
            ab.fmt(r.cpu_s, 1),
            ab.fmt(r.rss_mb, 0),
        ]
        for r in rows
    ]
    lines = [ab.table(headers, body), ""]
    for r in rows:
        ok = r.steady_rate >= 0.95 * r.rate and r.failed_throttling == 0 and r.queued_left == 0
        verdict = "PASS" if ok else "FAIL"
        if ok and not r.emptied:
            verdict = "INCONCLUSIVE (the bucket never ran dry: too few jobs, or a slow daemon)"
        lines.append(
            f"- {r.backend}: target ≥ 95% of the bucket with 0 throttle failures: {verdict}"
            + (f"; {r.queued_left} jobs still QUEUED at the timeout" if r.queued_left else "")
        )
        lines += [f"  - e.g. {reason}" for reason in r.reasons]
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> None:
    rows = await ab.run_each(
        "dispatch",
        args.backends,
        lambda backend, root: run_backend(backend, args, root),
        keep=args.keep,
    )
    print(report(rows))
    ab.save_rows(args.save, "dispatch", rows, what="samples")


def main() -> None:
    p = ab.arguments(__doc__)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--backends", nargs="+", choices=("ecs", "batch"), default=["ecs", "batch"])
    p.add_argument("--ecs-rate", type=float, default=40.0, help="RunTask bucket, calls/s")
    p.add_argument("--ecs-burst", type=float, default=100.0)
    p.add_argument("--batch-rate", type=float, default=50.0, help="SubmitJob bucket, calls/s")
    p.add_argument("--batch-burst", type=float, default=50.0)
    p.add_argument("--daemon-rate", type=float, default=0.0, help="default: the AWS rate")
    p.add_argument("--pending-s", type=float, default=60.0)
    p.add_argument("--run-s", type=float, default=3600.0)
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    p.add_argument("--timeout-s", type=float, default=0.0)
    p.add_argument("--keep", action="store_true", help="keep the logs and stores in /tmp")
    p.add_argument("--save", type=Path, help="write the raw samples as JSON (for plots.py)")
    args = p.parse_args()
    print(f"# dispatch: `{ab.command_line()}`")
    print()
    print(f"- machine: {ab.machine_line()}")
    print(
        f"- {args.jobs:,} jobs sent at once; jobs pending {args.pending_s:g} s, running "
        f"{args.run_s:g} s at the stand-in; no time scaling; describe buckets 20/s burst 100"
    )
    print()
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
