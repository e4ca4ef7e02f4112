"""Tracking N in-flight jobs: describe calls, detection lag, daemon RSS and CPU — orchestrator
against the Airflow polling baseline, on the same stand-in, in the same run.

    python bench/track.py                                  # N = 1,000 and 10,000, Batch
    python bench/track.py --jobs 500 --time-scale 30 --run-s 120
    python bench/track.py --backend ecs --no-baseline
    python bench/track.py --jobs 1000 --time-scale 2 --save /tmp/track.json  # for plots.py
    python bench/track.py --jobs 10000 --time-scale 2 --no-baseline --postgres

At the defaults (time scale 1, jobs of 30 s + 300 s ±50%) a side takes about the longest job
plus the launch of all N (~10 min at N = 10,000) and the baseline's last, long poll intervals;
expect roughly an hour for both N and both sides. Larger time scales shrink that but multiply
the daemon's (and the baseline's) load per wall second by the same factor: on a small machine
CPU contention then shows up as lag, so take lags from runs at scale 1 (or 2).

For each N and each side, a fresh `bench/fakeaws.py` (a child process: its CPU is its own) with
the same arguments and seed, so both sides get the same job lives:

- orchestrator: `orchestrator serve` (a child, `tests/support/daemon.py`) with the Batch (or ECS)
  backend pointed at the stand-in; N jobs sent with `Client.submit_many`; `ping` (counts by
  state) until all N are terminal; then one `list` for their `state_times`.
- orchestrator on PostgreSQL (`--postgres`): the same again, with `store.url` on a durable
  PostgreSQL server (fsync, synchronous commits; Debian's binaries, started in a temporary
  directory as `bench/ingest.py --postgres` starts it, a fresh database per N, reached on a unix
  socket): one daemon, which takes the cluster lease at its start and leads alone.
- baseline: `bench/airflow_baseline.py` in a child process: N Airflow task instances, each
  submitting its job and polling it the way `BatchClientHook` (ECS: the `tasks_stopped` waiter)
  does.

Launch buckets are generous on both sides (dispatch is not what is measured here; see
`dispatch.py`); the describe bucket is AWS's (DescribeJobs/DescribeTasks: 20/s, burst 100).

Time scale: the stand-in divides job durations by `--time-scale`; every delay of both sides is
divided by the same factor (the daemon's poller base_s, cap_s, fill_ahead_s and
missing_grace_s; the baseline's sleeps and its botocore-legacy retry back-off), and so that the
describe budget stays 20 calls per *unscaled* second the describe bucket's rate is multiplied by
it (`--unscaled-buckets`: keep 20/s of wall time). Durations and lags are reported unscaled
(measured x scale). Fixed costs (an HTTP round trip, a store commit) are magnified by the scale
too, so lags at scale 1 are the honest ones.

Columns: describe calls (every attempt the stand-in answered, throttled included), throttled
replies, ids per call, calls per job-hour (calls ÷ Σ job lifetimes at the stand-in, creation →
terminal, unscaled), calls per poll round ÷ ceil(N/100) (a round polls each of the N open jobs
once and may take ceil(N/100) calls; N is counted at each call, so the allowance shrinks as jobs
end: the target is ≤ 1), peak calls per cap window (the most describe calls in any window one
poller cap long, sampled: how often jobs are polled, young ones sooner, as well as how well
they are batched), detection lag (from the moment
the stand-in made a job terminal to its terminal state in orchestrator's store, resp. to the
first baseline describe that showed it terminal), failed jobs, peak RSS (daemon: VmHWM;
baseline: ru_maxrss) and CPU seconds over the tracking phase (first submit → all terminal) with
the mean share of one core per unscaled second.

`--save PATH.json` writes the raw samples behind the tables, for `bench/plots.py`: per N and
side, every job's lag, the stand-in's describe-call counter over time, and each job's creation,
terminal and first-reported times at the stand-in (epoch seconds of the wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from orchestrator.client import Client
from tests.support import postgres
from tests.support.daemon import DaemonProcess


@dataclasses.dataclass
class Row:
    side: str
    jobs: int
    store: str = ""  # orchestrator's store with --postgres ("SQLite", "PostgreSQL"); else ""
    failed: int = 0
    job_s_mean: float = math.nan  # unscaled lifetime at the stand-in
    job_hours: float = math.nan
    calls: int = 0
    throttled: int = 0
    ids_mean: float = math.nan
    round_calls: float = math.nan  # calls perfect rounds over the open jobs would have made
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    max_round: int = 0
    lags: list[float] = dataclasses.field(default_factory=list)  # unscaled seconds
    store_lags: list[float] = dataclasses.field(default_factory=list)  # reported → store
    # raw samples for --save: the first submit (epoch), the stand-in's describe counter over
    # time (sample epochs, cumulative calls, cumulative per-round allowance) and each job's
    # [created_at, terminal_at, reported_at] at the stand-in (epoch; None: not yet)
    started_at: float = math.nan
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    standin_jobs: list[list[float | None]] = dataclasses.field(default_factory=list)
    rss_mb: float = math.nan
    cpu_s: float = math.nan
    wall_s: float = math.nan
    launch_s: float = math.nan  # wall seconds from the first submit to the last job's creation
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.side} ({self.store})" if self.store else self.side


def fake_config(args: argparse.Namespace) -> list[str]:
    scale = 1.0 if args.unscaled_buckets else args.time_scale
    return ab.fake_args(
        pending_s=args.pending_s,
        run_s=args.run_s,
        jitter=args.jitter,
        time_scale=args.time_scale,
        seed=args.seed,
        buckets={
            ab.LAUNCH_FAMILY[args.backend]: (ab.GENEROUS, ab.GENEROUS),
            ab.DESCRIBE_FAMILY[args.backend]: (args.describe_rate * scale, args.describe_burst),
        },
    )


def describe_wall_rate(args: argparse.Namespace) -> float:
    return float(args.describe_rate) * (1.0 if args.unscaled_buckets else args.time_scale)


def default_timeout_s(args: argparse.Namespace, n: int, baseline: bool) -> float:
    scale = float(args.time_scale)
    longest = (args.pending_s + args.run_s) * (1 + args.jitter) / scale
    if baseline:  # its delays grow to minutes; its throttle loop adds more
        return float(3 * longest + 60 + 3 * 630 / scale + n / 20)
    return float(longest + 60 + n / 20)  # launching at 20/s at least (PostgreSQL: ~40/s)


def fill_from_fake(
    row: Row, stats: dict[str, Any], terminal: dict[str, dict[str, Any]], args: argparse.Namespace
) -> None:
    op = ab.DESCRIBE_OP[args.backend]
    row.calls = int(stats["calls"].get(op, 0))
    row.throttled = sum(int(v) for v in stats["throttled"].values())
    ids = stats["describe_ids"].get(op) or {}
    row.ids_mean = ids.get("mean_ids") or math.nan
    row.round_calls = ids.get("round_calls") or math.nan
    row.sizes = {k: int(v) for k, v in (ids.get("sizes") or {}).items()}
    now = time.time()
    lives = [
        (t["terminal_at"] if t["terminal_at"] is not None else now) - t["created_at"]
        for t in terminal.values()
    ]
    row.job_s_mean = sum(lives) / len(lives) * args.time_scale if lives else math.nan
    row.job_hours = sum(lives) * args.time_scale / 3600
    row.standin_jobs = [
        [t["created_at"], t["terminal_at"], t["reported_at"]] for t in terminal.values()
    ]
    if terminal:
        row.launch_s = max(t["created_at"] for t in terminal.values()) - row.started_at


def keep_samples(row: Row, sampler: ab.StatsSampler) -> None:
    row.samples = {
        "at": sampler.walls,
        "describe_calls": [float(c) for c in sampler.counts],
        "round_calls": sampler.round_calls,
    }


def cap_wall_s(args: argparse.Namespace) -> float:
    """The poller's cap in wall seconds: one poll round."""
    return float(args.cap_s / args.time_scale)


def sample_interval(args: argparse.Namespace) -> float:
    return min(1.5, max(0.02, cap_wall_s(args) / 10))


async def wait_terminal(
    client: Client, daemon: DaemonProcess, n: int, timeout_s: float, interval_s: float
) -> None:
    def all_terminal(counts: dict[str, int]) -> bool:
        return sum(counts.get(s, 0) for s in ab.TERMINAL) >= n

    interval = min(1.0, max(0.1, interval_s))
    counts = await ab.wait_counts(client, daemon, all_terminal, timeout_s, interval)
    if not all_terminal(counts):
        raise TimeoutError(f"not all {n} jobs terminal after {timeout_s:.0f}s: {counts}")


async def run_orchestrator(
    n: int, args: argparse.Namespace, root: Path, store: str = "", store_url: str | None = None
) -> Row:
    """The orchestrator side; on PostgreSQL at `store_url` if given (`store` names the store in
    the report, "" without --postgres)."""
    row = Row("orchestrator", n, store=store)
    timing = ab.PollerTiming(time_scale=args.time_scale)
    tag = f"-{store.lower()}" if store else ""
    fake = ab.FakeAwsProcess(fake_config(args), root / f"fakeaws-orchestrator{tag}.log")
    fake.start()
    env = ab.daemon_env(
        args.backend,
        fake.url,
        max_in_flight=n,
        poller=timing,
        launch=(ab.GENEROUS, ab.GENEROUS),
        describe=(describe_wall_rate(args), args.describe_burst),
        synchronous=args.synchronous,
    )
    if store_url is not None:
        env["ORCHESTRATOR__STORE__URL"] = store_url
    daemon = DaemonProcess(root / f"daemon{tag}", env=env)
    daemon.root.mkdir(parents=True, exist_ok=True)
    try:
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        async with aiohttp.ClientSession() as http, Client(daemon.socket_path) as client:
            await fake.reset(http)
            sampler = ab.StatsSampler(
                fake, http, ab.DESCRIBE_OP[args.backend], sample_interval(args), pid=pid
            )
            sampler.start()
            before = ab.proc_sample(pid)
            t0, row.started_at = time.monotonic(), time.time()
            await ab.submit_all(client, n, "track")
            timeout_s = args.timeout_s or default_timeout_s(args, n, False)
            await wait_terminal(client, daemon, n, timeout_s, cap_wall_s(args) / 4)
            after = ab.proc_sample(pid)
            row.wall_s = time.monotonic() - t0
            await sampler.stop()
            stats, terminal = await fake.stats(http), await fake.terminal(http)
            jobs = await client.list(limit=n + 1000)
        assert before is not None
        assert after is not None
        row.cpu_s = after.cpu_s - before.cpu_s
        row.rss_mb = after.hwm_mb
        row.max_round = sampler.max_in_window(timing.scaled_cap_s)
        fill_from_fake(row, stats, terminal, args)
        keep_samples(row, sampler)
        if args.keep:
            dump = {"jobs": jobs, "terminal": terminal, "stats": stats}
            (root / f"orchestrator{tag}-jobs.json").write_bytes(orjson.dumps(dump))
            samples = {"times": sampler.times, "counts": sampler.counts}
            (root / f"orchestrator{tag}-describes.json").write_bytes(orjson.dumps(samples))
        for job in jobs:
            at_fake = terminal.get(job.get("external_id") or "")
            stored = ab.terminal_time(job)
            if job["state"] != "SUCCEEDED":
                row.failed += 1
            if at_fake is None or stored is None or at_fake["terminal_at"] is None:
                continue
            row.lags.append((stored - at_fake["terminal_at"]) * args.time_scale)
            if at_fake["reported_at"] is not None:
                row.store_lags.append((stored - at_fake["reported_at"]) * args.time_scale)
        if len(row.lags) != n:
            row.note = f"{n - len(row.lags)} jobs without a lag"
    finally:
        if daemon.proc is not None:
            daemon.stop()
        fake.stop()
    return row


def spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


async def run_baseline(n: int, args: argparse.Namespace, root: Path) -> Row:
    row = Row("baseline (Airflow)", n)
    fake = ab.FakeAwsProcess(fake_config(args), root / "fakeaws-baseline.log")
    fake.start()
    out = root / "baseline.json"
    command = [
        sys.executable,
        str(ab.BENCH / "airflow_baseline.py"),
        *("--endpoint", fake.url, "--backend", args.backend, "--jobs", str(n)),
        *("--time-scale", f"{args.time_scale:g}", "--out", str(out)),
    ]
    proc: subprocess.Popen[bytes] | None = None
    try:
        async with aiohttp.ClientSession() as http:
            await fake.reset(http)
            proc = spawn(command, root / "baseline.log")
            op = ab.DESCRIBE_OP[args.backend]
            sampler = ab.StatsSampler(fake, http, op, sample_interval(args))
            sampler.start()
            t0, row.started_at = time.monotonic(), time.time()
            timeout_s = args.timeout_s or default_timeout_s(args, n, True)
            code = await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout_s)
            row.wall_s = time.monotonic() - t0
            await sampler.stop()
            if code != 0:
                raise RuntimeError(f"the baseline exited {code}; see {root / 'baseline.log'}")
            stats, terminal = await fake.stats(http), await fake.terminal(http)
        report = orjson.loads(out.read_bytes())
        if args.keep:
            dump = {"terminal": terminal, "stats": stats}
            (root / "baseline-fake.json").write_bytes(orjson.dumps(dump))
        row.cpu_s, row.rss_mb, row.failed = report["cpu_s"], report["maxrss_mb"], report["failed"]
        row.max_round = sampler.max_in_window(cap_wall_s(args))
        fill_from_fake(row, stats, terminal, args)
        keep_samples(row, sampler)
        for external_id, job in report["jobs"].items():
            at_fake = terminal.get(external_id)
            if at_fake is None or at_fake["terminal_at"] is None or not job["terminal_seen_at"]:
                continue
            row.lags.append((job["terminal_seen_at"] - at_fake["terminal_at"]) * args.time_scale)
        if row.failed:
            errors_seen = {str(j["error"]).split(":")[0] for j in report["jobs"].values()}
            row.note = f"{row.failed} tasks failed ({', '.join(sorted(errors_seen - {'None'}))})"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        fake.stop()
    return row


def sizes_summary(sizes: dict[str, int]) -> str:
    bins = {"100": 0, "50-99": 0, "10-49": 0, "2-9": 0, "1": 0}
    for size, count in sizes.items():
        k = int(size)
        key = "100" if k >= 100 else "50-99" if k >= 50 else "10-49" if k >= 10 else "2-9"
        bins[key if k > 1 else "1"] += count
    total = sum(bins.values()) or 1
    return ", ".join(f"{k}: {v} ({100 * v / total:.0f}%)" for k, v in bins.items() if v)


def per_round(row: Row) -> float:
    """Describe calls per poll round ÷ ceil(N/100), N the jobs open at each call (≤ 1: met).
    The stand-in weighs each call of k ids by ceil(N/100)/N x k: a round over N open jobs
    allows ceil(N/100) calls, shrinking as jobs end."""
    return row.calls / row.round_calls if row.round_calls else math.nan


def report(n: int, rows: list[Row], args: argparse.Namespace) -> str:
    rounds = math.ceil(n / 100)
    headers = [
        "side", "jobs", "failed", "mean job (s)", "describe calls", "throttled", "ids/call",
        "calls/job-hour", "calls/round ÷ ceil(N/100)", "peak calls/cap window", "lag p50 (s)",
        "lag p99 (s)",
        "lag max (s)", "peak RSS (MB)", "CPU (s)", "CPU % (unscaled)",
    ]  # fmt: skip
    body = []
    for r in rows:
        cpu_pct = 100 * r.cpu_s / (r.wall_s * args.time_scale) if r.wall_s else math.nan
        body.append(
            [
                r.label,
                f"{r.jobs:,}",
                r.failed,
                ab.fmt(r.job_s_mean, 0),
                f"{r.calls:,}",
                f"{r.throttled:,}",
                ab.fmt(r.ids_mean, 1),
                ab.fmt(r.calls / r.job_hours if r.job_hours else math.nan, 1),
                ab.fmt(per_round(r), 2),
                f"{r.max_round:,} ({r.max_round / rounds:.2f}x)",
                ab.fmt(ab.percentile(r.lags, 50)),
                ab.fmt(ab.percentile(r.lags, 99)),
                ab.fmt(max(r.lags) if r.lags else math.nan),
                ab.fmt(r.rss_mb, 0),
                ab.fmt(r.cpu_s, 1),
                ab.fmt(cpu_pct, 1),
            ]
        )
    lines = [f"### N = {n:,} ({args.backend})", "", ab.table(headers, body), ""]
    for r in rows:
        lines.append(f"- {r.label}: ids per describe call: {sizes_summary(r.sizes) or 'none'}")
        if r.store_lags:
            lines.append(
                f"  - lag split: stand-in's first terminal reply → store p50 "
                f"{ab.fmt(ab.percentile(r.store_lags, 50))} s, p99 "
                f"{ab.fmt(ab.percentile(r.store_lags, 99))} s (unscaled)"
            )
        if r.note:
            lines.append(f"  - {r.note}")
        lines.append(f"  - tracking phase: {r.wall_s:.1f} s of wall time")
        if not math.isnan(r.launch_s) and r.launch_s > 0:
            lines.append(
                f"  - all {len(r.standin_jobs):,} created at the stand-in {r.launch_s:.1f} s "
                f"(wall) after the first submit: {len(r.standin_jobs) / r.launch_s:,.0f} jobs/s"
            )
    for orc in rows:
        if orc.side != "orchestrator":
            continue
        checks = [
            ("calls per poll round ≤ ceil(N/100)", per_round(orc) <= 1.0),
            ("detection lag p99 ≤ 5 s", ab.percentile(orc.lags, 99) <= 5.0),
            ("no throttled describes", orc.throttled == 0),
            ("RSS ≤ 200 MB", orc.rss_mb <= 200),
            ("0 failed", orc.failed == 0),
        ]
        lines.append(
            f"- targets ({orc.label}): "
            + "; ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks)
        )
    return "\n".join(lines)


def save(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    """`--save`: the settings and every row so far, raw samples included."""
    timing = ab.PollerTiming(time_scale=args.time_scale)
    settings = {
        "backend": args.backend,
        "time_scale": args.time_scale,
        "cap_s": timing.cap_s,  # unscaled: one poll round at the cap
        "describe_rate": args.describe_rate,
        "describe_burst": args.describe_burst,
        "pending_s": args.pending_s,
        "run_s": args.run_s,
        "jitter": args.jitter,
    }
    ab.save_json(args.save, "track", {"settings": settings, "runs": runs})


async def amain(args: argparse.Namespace, server: postgres.PostgresServer | None) -> None:
    runs: list[dict[str, Any]] = []
    for n in args.jobs:
        root = Path(tempfile.mkdtemp(prefix=f"orc-track-{n}-", dir="/tmp"))
        if server is None:
            rows = [await run_orchestrator(n, args, root)]
        else:
            rows = [
                await run_orchestrator(n, args, root, "SQLite"),
                await run_orchestrator(n, args, root, "PostgreSQL", await server.new_database()),
            ]
        if not args.no_baseline:
            rows.append(await run_baseline(n, args, root))
        print(report(n, rows, args), flush=True)
        print()
        if args.save:
            runs.append({"jobs": n, "sides": [dataclasses.asdict(r) for r in rows]})
            save(args, runs)
            print(f"(raw samples saved in {args.save})\n")
        if args.keep:
            print(f"(logs kept in {root})\n")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=ab.summary(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    p.add_argument("--jobs", type=int, nargs="+", default=[1000, 10_000], help="N, one run each")
    p.add_argument("--backend", choices=("batch", "ecs"), default="batch")
    p.add_argument("--pending-s", type=float, default=30.0, help="unscaled: submit → RUNNING")
    p.add_argument("--run-s", type=float, default=300.0, help="unscaled: RUNNING → exit")
    p.add_argument("--jitter", type=float, default=0.5, help="durations x uniform(1-j, 1+j)")
    p.add_argument("--time-scale", type=float, default=1.0, help="divide every duration by it")
    p.add_argument("--describe-rate", type=float, default=20.0, help="per unscaled second")
    p.add_argument("--describe-burst", type=float, default=100.0)
    p.add_argument(
        "--unscaled-buckets",
        action="store_true",
        help="describe bucket in wall seconds, not multiplied by the time scale",
    )
    p.add_argument("--cap-s", type=float, default=15.0, help=argparse.SUPPRESS)
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=0.0, help="per side (default: from sizes)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the logs and stores in /tmp")
    p.add_argument("--save", type=Path, help="write the raw samples as JSON (for plots.py)")
    p.add_argument(
        "--postgres",
        action="store_true",
        help="orchestrator twice, on SQLite and on PostgreSQL (`store.url`): a durable server "
        "from Debian's binaries in a temporary directory, on a unix socket",
    )
    args = p.parse_args()
    timing = ab.PollerTiming(time_scale=args.time_scale)
    print(f"# track: `{ab.command_line()}`")
    print()
    print(f"- machine: {ab.machine_line()}")
    print(
        f"- time scale {args.time_scale:g}: job durations and every delay of both sides divided "
        f"by it; durations, lags and CPU % reported unscaled"
    )
    stores = "; PostgreSQL: durable (fsync, synchronous commits)" if args.postgres else ""
    print(f"- daemon: {timing.describe()}; store synchronous={args.synchronous}{stores}")
    print(
        f"- jobs at the stand-in: pending {args.pending_s:g} s, run {args.run_s:g} s, "
        f"jitter ±{100 * args.jitter:g}% (unscaled), exit 0"
    )
    print(
        f"- describe bucket (stand-in and daemon): {args.describe_rate:g}/s burst "
        f"{args.describe_burst:g} per unscaled second = {describe_wall_rate(args):g}/s of wall "
        f"time; launch buckets generous"
    )
    print()
    with contextlib.ExitStack() as stack:
        server = None
        if args.postgres:
            server = stack.enter_context(postgres.running_server(durable=True))
            if server is None:
                sys.exit("--postgres: no PostgreSQL server binaries (apt-get install postgresql)")
        asyncio.run(amain(args, server))


if __name__ == "__main__":
    main()
