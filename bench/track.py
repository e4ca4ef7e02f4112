"""Tracking N in-flight jobs: describe calls, detection lag, daemon RSS and CPU — orchestrator
against the Airflow polling baseline, on the same stand-in, in the same run.

    python bench/track.py                                  # N = 1,000 and 10,000, Batch
    python bench/track.py --jobs 500 --time-scale 30 --run-s 120
    python bench/track.py --backend ecs --no-baseline
    python bench/track.py --jobs 1000 --time-scale 2 --save /tmp/track.json  # for plots.py
    python bench/track.py --jobs 10000 --time-scale 2 --no-baseline --postgres
    python bench/track.py --events --no-baseline --jobs 1000 --time-scale 4 --run-s 60 \
        --pending-s 10 --save /tmp/events.json          # polling against events, ~1 min

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

Events (`--events`, issue #17): for each N (and store) the orchestrator side runs twice on the
same seed, hence the same job lives: "polling" (as without `--events`), then "events": the
stand-in with `--events` (EventBridge → SQS, queue "orchestrator-events"; delivery delay
lognormal, `--event-delay-median-s` 0.5 and `--event-delay-p99-s` 3, `--event-duplicate-ratio`
0.01, `--event-drop-ratio` 0) and the daemon with `[<backend>.events] queue_url` on it. The
daemon's `events.sweep_s` and `grace_s` are divided by the time scale, as the poller's delays
are; its SQS settings (`wait_s`, `visibility_timeout_s`) are not, nor does the stand-in scale
the event delays (they are AWS's latency, not the jobs' lives). Hence the events side's lags
are wall seconds, **not** multiplied by the scale (polling's are). A second table per N shows
both modes: detection lag p50/p99/max; the modelled delay of each job's terminal event (its
first copy's delivery - the change, as the stand-in drew it) p50/p99; the lag above the model
(the store's terminal time - that delivery; target p99 ≤ 1 s; negative when a describe saw the
end first); describe calls per job-hour and as a share of the describe budget over the tracking
phase (calls ÷ (describe rate x wall seconds)); ReceiveMessage and DeleteMessageBatch calls per
job-hour (they follow the events' rate per wall second, so they depend on the scale); events
received / deleted / duplicated at the stand-in; CPU and peak RSS; failed jobs (must be 0); the
peak of jobs in flight (created and not yet terminal at the stand-in at once). The daemon's
`ping` is sampled for its backend's `events.tracking` ("events" throughout is a target) and
its log for `events.stopped`.

N in flight at once: the N jobs are submitted together and launched at the daemon's pace, about
200-300 jobs/s on SQLite on 2 shared cores (less with events, whose every state change is a
store write), so the shortest job, (pending + run) x (1 - jitter) / scale wall seconds, must
outlast the launch of all N; the bench warns when it may not and reports the peak. The daemon's
`max_in_flight` is N (`--max-in-flight` to cap it lower). Recommended runs (both modes each):

    # 10,000 in flight (shortest job 165 s against a launch of ~35-50 s): ~10 min a side,
    # ~20 min in all; daemon ~115-130 MB peak RSS (polling: 115 MB measured before)
    python bench/track.py --backend batch --events --no-baseline --jobs 10000 \
        --pending-s 30 --run-s 300 --save /tmp/events-10k.json
    # 100,000 in flight (shortest job 732 s of wall time against a launch of ~330-700 s):
    # ~25-30 min a side, ~1 h in all; daemon ~0.45-0.6 GB peak RSS (extrapolated: ~3.5 KB a
    # job polling, ~5 KB with events, measured at N ≤ 10,000), the stand-in ~0.3-0.5 GB;
    # expect the daemon near one full core while launching (scale 2 doubles its load)
    python bench/track.py --backend batch --events --no-baseline --jobs 100000 \
        --time-scale 2 --pending-s 30 --run-s 1800 --jitter 0.2 --save /tmp/events-100k.json

`--save PATH.json` writes the raw samples behind the tables, for `bench/plots.py`: per N and
side, every job's lag, the stand-in's describe-call counter over time, and each job's creation,
terminal and first-reported times at the stand-in (epoch seconds of the wall clock); with
`--events` also each side's mode, lag scale, the per-job modelled delays and lags above them,
SQS calls and the stand-in's event counts.
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
from orchestrator import views
from orchestrator.client import Client
from tests.support import postgres
from tests.support.daemon import DaemonProcess

LAUNCH_RATE = 200  # jobs/s the daemon launches at on SQLite, 2 shared cores (with events: ~200)


@dataclasses.dataclass
class Row:
    side: str
    jobs: int
    store: str = ""  # orchestrator's store with --postgres ("SQLite", "PostgreSQL"); else ""
    mode: str = ""  # orchestrator's tracking with --events ("polling", "events"); else ""
    lag_scale: float = 1.0  # lags are measured wall seconds x this (the time scale; events: 1)
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
    peak_in_flight: int = 0  # the most jobs created and not yet terminal at the stand-in at once
    describe_share: float = math.nan  # describe calls ÷ (describe rate x wall seconds)
    sqs_calls: dict[str, int] = dataclasses.field(default_factory=dict)  # "sqs.Op" → calls
    events: dict[str, Any] = dataclasses.field(default_factory=dict)  # stats()["events"]
    # per job, with events at the stand-in (wall seconds, never scaled): its terminal event's
    # modelled delivery delay (first copy's delivery - the change), the store's terminal time
    # - that delivery ("lag above the modelled delay"), and - its first receive
    event_delays: list[float] = dataclasses.field(default_factory=list)
    above_model: list[float] = dataclasses.field(default_factory=list)
    receive_to_store: list[float] = dataclasses.field(default_factory=list)
    no_event: int = 0  # terminal jobs whose terminal event was not delivered (dropped, late)
    before_event: int = 0  # jobs stored terminal before their terminal event's delivery
    tracking: dict[str, int] = dataclasses.field(default_factory=dict)  # pings by tracking mode
    events_stopped: int = 0  # `events.stopped` lines in the daemon's log
    note: str = ""

    @property
    def label(self) -> str:
        parts = [part for part in (self.store, self.mode) if part]
        return f"{self.side} ({', '.join(parts)})" if parts else self.side


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


def event_args(args: argparse.Namespace) -> list[str]:
    """The stand-in's EventBridge → SQS path (queue "orchestrator-events"): delays in seconds
    of the clock, not divided by the time scale."""
    return [
        "--events",
        *("--event-delay-median-s", f"{args.event_delay_median_s:g}"),
        *("--event-delay-p99-s", f"{args.event_delay_p99_s:g}"),
        *("--event-duplicate-ratio", f"{args.event_duplicate_ratio:g}"),
        *("--event-drop-ratio", f"{args.event_drop_ratio:g}"),
    ]


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
    row.peak_in_flight = peak_open(row.standin_jobs)
    row.sqs_calls = {op: int(k) for op, k in stats["calls"].items() if op.startswith("sqs.")}
    row.events = stats.get("events") or {}
    if row.wall_s:
        row.describe_share = row.calls / (describe_wall_rate(args) * row.wall_s)


def peak_open(jobs: list[list[float | None]]) -> int:
    """The most jobs created and not yet terminal at once ([created, terminal, ...] each)."""
    steps = sorted(
        [(j[0], 1) for j in jobs if j[0] is not None]
        + [(j[1], -1) for j in jobs if j[1] is not None]
    )  # at a tie, an end (-1) before a creation
    peak = open_now = 0
    for _, step in steps:
        open_now += step
        peak = max(peak, open_now)
    return peak


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
    client: Client,
    daemon: DaemonProcess,
    n: int,
    timeout_s: float,
    interval_s: float,
    tracking: dict[str, int] | None = None,
    backend: str = "",
) -> None:
    """`ping` until all `n` are terminal; with `tracking`, count the pings by the backend's
    tracking mode (`ping`'s `events.<backend>.tracking`: "events" or "polling"; "none")."""

    def all_terminal(counts: dict[str, int]) -> bool:
        return sum(counts.get(s, 0) for s in ab.TERMINAL) >= n

    def seen(reply: views.Ping) -> None:
        if tracking is not None:
            feed = reply.get("events", {}).get(backend)
            mode = "none" if feed is None else feed["tracking"]
            tracking[mode] = tracking.get(mode, 0) + 1

    interval = min(1.0, max(0.1, interval_s))
    counts = await ab.wait_counts(client, daemon, all_terminal, timeout_s, interval, seen)
    if not all_terminal(counts):
        raise TimeoutError(f"not all {n} jobs terminal after {timeout_s:.0f}s: {counts}")


async def run_orchestrator(
    n: int,
    args: argparse.Namespace,
    root: Path,
    store: str = "",
    store_url: str | None = None,
    events: bool = False,
) -> Row:
    """The orchestrator side; on PostgreSQL at `store_url` if given (`store` names the store in
    the report, "" without --postgres); tracked by the stand-in's events with `events`."""
    mode = ("events" if events else "polling") if args.events else ""
    row = Row("orchestrator", n, store=store, mode=mode)
    row.lag_scale = 1.0 if events else args.time_scale
    timing = ab.PollerTiming(time_scale=args.time_scale)
    tag = "".join(f"-{part.lower()}" for part in (store, mode) if part)
    fake_argv = fake_config(args) + (event_args(args) if events else [])
    fake = ab.FakeAwsProcess(fake_argv, root / f"fakeaws-orchestrator{tag}.log")
    fake.start()
    env = ab.daemon_env(
        args.backend,
        fake.url,
        max_in_flight=args.max_in_flight or n,
        poller=timing,
        launch=(ab.GENEROUS, ab.GENEROUS),
        describe=(describe_wall_rate(args), args.describe_burst),
        synchronous=args.synchronous,
        events=events_timing(args, fake.url) if events else None,
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
            # With events each stats() sorts every delay drawn (~0.4 s for 100,000 Batch jobs):
            # sample less often at large N (coarser "peak calls/cap window").
            interval = sample_interval(args)
            if events:
                interval = max(interval, n / 20_000)
            sampler = ab.StatsSampler(fake, http, ab.DESCRIBE_OP[args.backend], interval, pid=pid)
            sampler.start()
            before = ab.proc_sample(pid)
            t0, row.started_at = time.monotonic(), time.time()
            await ab.submit_all(client, n, "track")
            timeout_s = args.timeout_s or default_timeout_s(args, n, False)
            await wait_terminal(
                client,
                daemon,
                n,
                timeout_s,
                cap_wall_s(args) / 4,
                tracking=row.tracking,
                backend=args.backend,
            )
            after = ab.proc_sample(pid)
            row.wall_s = time.monotonic() - t0
            await sampler.stop()
            stats, terminal = await fake.stats(http), await fake.terminal(http)
            if events:  # a job seen ended before its terminal event came: wait for the event
                terminal = await until_delivered(fake, http, terminal, args)
            jobs = await client.list(limit=n + 1000)
        row.events_stopped = daemon.log().count('"events.stopped"')
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
            row.lags.append((stored - at_fake["terminal_at"]) * row.lag_scale)
            if not events:
                if at_fake["reported_at"] is not None:
                    row.store_lags.append((stored - at_fake["reported_at"]) * args.time_scale)
                continue
            delivered = at_fake.get("terminal_event_at")
            if delivered is None:
                row.no_event += 1
                continue
            row.event_delays.append(delivered - at_fake["terminal_at"])
            row.above_model.append(stored - delivered)
            row.before_event += stored < delivered  # the sweep (or a poll) saw it first
            if (received := at_fake.get("terminal_event_received_at")) is not None:
                row.receive_to_store.append(stored - received)
        if len(row.lags) != n:
            row.note = f"{n - len(row.lags)} jobs without a lag"
    finally:
        if daemon.proc is not None:
            daemon.stop()
        fake.stop()
    return row


def events_timing(args: argparse.Namespace, endpoint_url: str) -> ab.EventsTiming:
    return ab.EventsTiming(ab.queue_url(endpoint_url), time_scale=args.time_scale)


async def until_delivered(
    fake: ab.FakeAwsProcess,
    http: aiohttp.ClientSession,
    terminal: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """`terminal` again until every ended job's terminal event has been delivered (a job the
    sweep saw ended first has its event still on the way), for at most 5 x the delay's p99."""
    deadline = time.monotonic() + 5 * args.event_delay_p99_s + 1

    def waiting(times: dict[str, dict[str, Any]]) -> int:
        return sum(
            1
            for t in times.values()
            if t["terminal_at"] is not None and t.get("terminal_event_at") is None
        )

    while waiting(terminal) and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        terminal = await fake.terminal(http)
    return terminal


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
                f"(wall) after the first submit: {len(r.standin_jobs) / r.launch_s:,.0f} jobs/s; "
                f"at most {r.peak_in_flight:,} in flight at once"
            )
        if r.mode == "events":
            lines += events_notes(r)
    if args.events:
        lines += ["", events_table(rows, args)]
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
        if orc.mode == "events":
            checks = [
                ("lag above the modelled delay p99 ≤ 1 s", ab.percentile(orc.above_model, 99) <= 1),
                ("detection lag p99 ≤ 5 s", ab.percentile(orc.lags, 99) <= 5.0),
                ("tracked by events throughout", events_throughout(orc)),
                ("no throttled describes", orc.throttled == 0),
                ("0 failed", orc.failed == 0),
            ]
        lines.append(
            f"- targets ({orc.label}): "
            + "; ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks)
        )
    return "\n".join(lines)


def events_throughout(row: Row) -> bool:
    """Every ping said "events" and the daemon never logged `events.stopped`."""
    return set(row.tracking) == {"events"} and not row.events_stopped


def events_notes(r: Row) -> list[str]:
    ev = r.events
    lag = ev.get("receive_lag_s") or {}
    tracking = ", ".join(f"{k}: {v}" for k, v in sorted(r.tracking.items())) or "none"
    lines = [
        f"  - events at the stand-in: {ev.get('planned', 0):,} planned, "
        f"{ev.get('delivered', 0):,} delivered ({ev.get('duplicated', 0):,} duplicates, "
        f"{ev.get('dropped', 0):,} dropped), {ev.get('received', 0):,} received "
        f"({ev.get('redelivered', 0):,} redelivered), {ev.get('deleted', 0):,} deleted, "
        f"{ev.get('visible', 0):,} visible and {ev.get('in_flight', 0):,} in flight at the end; "
        f"delivery → first receive p50 {ab.fmt(lag.get('median', math.nan))} s, "
        f"p99 {ab.fmt(lag.get('p99', math.nan))} s",
        f"  - terminal event's first receive → store p50 "
        f"{ab.fmt(ab.percentile(r.receive_to_store, 50))} s, p99 "
        f"{ab.fmt(ab.percentile(r.receive_to_store, 99))} s (wall); SQS calls: "
        + (", ".join(f"{op[4:]} {k:,}" for op, k in sorted(r.sqs_calls.items())) or "none"),
        f"  - tracking mode in {sum(r.tracking.values())} pings: {tracking}; `events.stopped` "
        f"logged {r.events_stopped} times",
    ]
    if r.before_event:
        lines.append(
            f"  - {r.before_event:,} jobs stored terminal before their terminal event was "
            "delivered (a describe saw the end first: a negative lag above the model)"
        )
    if r.no_event:
        lines.append(f"  - {r.no_event:,} ended jobs without a delivered terminal event")
    return lines


def events_table(rows: list[Row], args: argparse.Namespace) -> str:
    """Polling against events: lags, their model, and what each costs in calls and CPU."""
    headers = [
        "side", "failed", "peak in flight", "lag p50 (s)", "lag p99 (s)", "lag max (s)",
        "modelled delay p50 (s)", "modelled delay p99 (s)", "lag above model p50 (s)",
        "lag above model p99 (s)", "describe calls/job-hour", "of describe budget",
        "ReceiveMessage/job-hour", "DeleteMessageBatch/job-hour",
        "events received / deleted / duplicated", "CPU (s)", "peak RSS (MB)",
    ]  # fmt: skip
    body = []
    for r in rows:
        hours = r.job_hours or math.nan

        def per_hour(op: str, r: Row = r, hours: float = hours) -> str:
            return ab.fmt(r.sqs_calls.get(op, 0) / hours, 1) if r.mode == "events" else "n/a"

        ev = r.events
        body.append(
            [
                r.label,
                r.failed,
                f"{r.peak_in_flight:,}",
                ab.fmt(ab.percentile(r.lags, 50)),
                ab.fmt(ab.percentile(r.lags, 99)),
                ab.fmt(max(r.lags) if r.lags else math.nan),
                ab.fmt(ab.percentile(r.event_delays, 50)),
                ab.fmt(ab.percentile(r.event_delays, 99)),
                ab.fmt(ab.percentile(r.above_model, 50)),
                ab.fmt(ab.percentile(r.above_model, 99)),
                ab.fmt(r.calls / hours, 1),
                f"{100 * r.describe_share:.1f}%" if not math.isnan(r.describe_share) else "n/a",
                per_hour("sqs.ReceiveMessage"),
                per_hour("sqs.DeleteMessageBatch"),
                (
                    f"{ev.get('received', 0):,} / {ev.get('deleted', 0):,} / "
                    f"{ev.get('duplicated', 0):,}"
                    if ev
                    else "n/a"
                ),
                ab.fmt(r.cpu_s, 1),
                ab.fmt(r.rss_mb, 0),
            ]
        )
    scale = args.time_scale
    return "\n".join(
        [
            f"#### Polling against events, N = {rows[0].jobs:,}",
            "",
            ab.table(headers, body),
            "",
            f"- lags: polling (and the baseline) measured x the time scale {scale:g}; events in "
            "wall seconds, not scaled: the event delays are AWS's latency, which the stand-in "
            "does not scale. Modelled delay: the terminal event's first delivery - the change, "
            "as the stand-in drew it; lag above the model: the store's terminal time - that "
            "delivery (target: p99 ≤ 1 s).",
            "- per job-hour: ÷ Σ job lifetimes at the stand-in (unscaled); of describe budget: "
            f"calls ÷ ({describe_wall_rate(args):g}/s x the tracking phase's wall seconds)",
        ]
    )


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
        "events": args.events,
    }
    if args.events:
        settings["event_model"] = {
            "delay_median_s": args.event_delay_median_s,
            "delay_p99_s": args.event_delay_p99_s,
            "duplicate_ratio": args.event_duplicate_ratio,
            "drop_ratio": args.event_drop_ratio,
        }
        events = ab.EventsTiming("", time_scale=args.time_scale)
        settings["events_sweep_s"], settings["events_grace_s"] = events.sweep_s, events.grace_s
    ab.save_json(args.save, "track", {"settings": settings, "runs": runs})


async def amain(args: argparse.Namespace, server: postgres.PostgresServer | None) -> None:
    runs: list[dict[str, Any]] = []
    for n in args.jobs:
        root = Path(tempfile.mkdtemp(prefix=f"orc-track-{n}-", dir="/tmp"))
        rows = []
        for store in ("",) if server is None else ("SQLite", "PostgreSQL"):
            for events in (
                ((True,) if args.events_only else (False, True)) if args.events else (False,)
            ):
                url = await server.new_database() if store == "PostgreSQL" and server else None
                rows.append(await run_orchestrator(n, args, root, store, url, events))
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
        "--events",
        action="store_true",
        help="orchestrator twice per N: polling, then tracked by the stand-in's EventBridge → "
        "SQS events (same seed, same job lives)",
    )
    p.add_argument(
        "--events-only",
        action="store_true",
        help="with --events: the events side alone (the polling side of a size run apart)",
    )
    p.add_argument("--event-delay-median-s", type=float, default=0.5, help="wall s, not scaled")
    p.add_argument("--event-delay-p99-s", type=float, default=3.0, help="wall s, not scaled")
    p.add_argument("--event-duplicate-ratio", type=float, default=0.01)
    p.add_argument("--event-drop-ratio", type=float, default=0.0)
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=0,
        help="the daemon's max_in_flight (default: N, so that all N are in flight at once)",
    )
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
    if args.events:
        print(
            f"- events: {ab.EventsTiming('', time_scale=args.time_scale).describe()}; stand-in "
            f"delivery delay lognormal median {args.event_delay_median_s:g} s, p99 "
            f"{args.event_delay_p99_s:g} s (wall, not scaled), duplicates "
            f"{args.event_duplicate_ratio:g}, drops {args.event_drop_ratio:g}"
        )
    shortest = (args.pending_s + args.run_s) * (1 - args.jitter) / args.time_scale
    for n in args.jobs:
        if n / LAUNCH_RATE > shortest:
            print(
                f"- N = {n:,}: the shortest job lives {shortest:.0f} s (wall), launching "
                f"{n:,} at ~{LAUNCH_RATE}/s takes ~{n / LAUNCH_RATE:.0f} s: fewer than N will "
                f"be in flight at once (raise --run-s or lower --jitter)"
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
