"""Restart with N jobs in flight: time until the daemon is ready again, and whether it still
tracks every job.

    python bench/restart.py                          # 10,000 Batch jobs in flight, SIGTERM
    python bench/restart.py --jobs 1000 --time-scale 20 --run-s 300 --finish

A fresh `bench/fakeaws.py` (a child process) keeps the jobs running for `--run-s` (unscaled;
long by default) with a generous launch bucket and AWS's describe bucket (20/s, burst 100 per
unscaled second, as in `track.py`). `orchestrator serve` (a child, logging at `--log-level`,
INFO by default as in production) gets the N jobs with `Client.submit_many` and launches them
all; then it is stopped with `--signal` (TERM: a graceful stop; KILL: a crash) and started
again, and measured:

- spawn → ping: from `Popen` of the new process to the first `ping` answered on the socket
  (what a client sees; tried every 5 ms), and spawn → `daemon.ready` (the log line's
  timestamp), `startup_s`, its phases and `recovered` from that line (in-process: store open,
  backends' health checks, the recovery scan, socket bound);
- re-adopted: `recovered` against the jobs that were in flight at the stop, and `ping`'s
  counts by state (every job still there, none lost);
- re-polled: the time after the first ping until the stand-in has answered describes for as
  many ids as jobs are in flight (each re-adopted job is polled first after `poller.base_s`);
- the first start (empty store) is measured the same way for comparison;
- `--finish`: then waits until every job is terminal and reports the states (all SUCCEEDED
  expected; set `--run-s`/`--time-scale` so that this takes minutes, not hours).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from orchestrator import errors
from orchestrator.client import Client, SyncClient
from tests.support.daemon import DaemonProcess

START_TIMEOUT_S = 120.0


@dataclasses.dataclass
class Start:
    label: str
    in_flight: int = 0  # jobs in flight before the start (0: empty store)
    ping_s: float = math.nan  # spawn → first ping answered
    ready_log_s: float = math.nan  # spawn → daemon.ready timestamp
    startup_s: float = math.nan  # daemon.ready's own startup_s
    recovered: int | None = None
    phases: str = ""  # daemon.ready's store_s / backends_s / recover_s
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    repolled_s: float = math.nan  # ready → describe ids ≥ in flight
    rss_mb: float = math.nan


def start_and_time(daemon: DaemonProcess, label: str, env: Mapping[str, str]) -> Start:
    """Spawn the daemon; time it until its socket answers a ping."""
    result = Start(label)
    t0_wall, t0 = time.time(), time.monotonic()
    daemon.start(extra_env=env, wait=False)
    assert daemon.proc is not None
    deadline = t0 + START_TIMEOUT_S
    while True:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited {daemon.proc.returncode}: {daemon.log()}")
        try:
            with SyncClient(daemon.socket_path, timeout_s=10) as client:
                reply = client.call("ping")
            result.ping_s = time.monotonic() - t0
            result.counts = dict(reply["jobs"])
            break
        except errors.DaemonUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    for event in daemon.log_events():
        if event.get("event") == "daemon.ready":
            result.ready_log_s = ab.epoch(str(event["timestamp"])) - t0_wall
            result.startup_s = float(event.get("startup_s", math.nan))
            result.recovered = event.get("recovered")
            result.phases = " / ".join(
                str(event.get(key, "?")) for key in ("store_s", "backends_s", "recover_s")
            )
    return result


async def time_repoll(
    fake: ab.FakeAwsProcess, http: aiohttp.ClientSession, op: str, wanted: int, timeout_s: float
) -> float:
    """Seconds until the stand-in has answered describes for `wanted` ids (since its reset)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        stats = await fake.stats(http)
        if int((stats["describe_ids"].get(op) or {}).get("ids", 0)) >= wanted:
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    return math.nan


def in_flight(counts: Mapping[str, int]) -> int:
    return sum(v for k, v in counts.items() if k not in ab.TERMINAL)


async def amain(args: argparse.Namespace, root: Path) -> None:
    n, scale = args.jobs, args.time_scale
    timing = ab.PollerTiming(time_scale=scale)
    describe_rate = args.describe_rate * scale
    fake = ab.FakeAwsProcess(
        ab.fake_args(
            pending_s=args.pending_s,
            run_s=args.run_s,
            jitter=args.jitter,
            time_scale=scale,
            buckets={
                ab.LAUNCH_FAMILY[args.backend]: (ab.GENEROUS, ab.GENEROUS),
                ab.DESCRIBE_FAMILY[args.backend]: (describe_rate, args.describe_burst),
            },
        ),
        root / "fakeaws.log",
    )
    fake.start()
    daemon = DaemonProcess(
        root / "daemon",
        env=ab.daemon_env(
            args.backend,
            fake.url,
            max_in_flight=n,
            poller=timing,
            launch=(ab.GENEROUS, ab.GENEROUS),
            describe=(describe_rate, args.describe_burst),
            synchronous=args.synchronous,
        ),
    )
    daemon.root.mkdir(parents=True, exist_ok=True)
    op = ab.DESCRIBE_OP[args.backend]
    try:
        level = {"ORCHESTRATOR__LOGGING__LEVEL": args.log_level}
        cold = start_and_time(daemon, "first start (empty store)", level)
        async with aiohttp.ClientSession() as http:
            async with Client(daemon.socket_path) as client:
                t0 = time.monotonic()
                await ab.submit_all(client, n, "restart")
                before = await ab.wait_counts(
                    client,
                    daemon,
                    lambda c: sum(c.values()) >= n and c.get("QUEUED", 0) == 0,
                    args.timeout_s,
                )
                launch_s = time.monotonic() - t0
            assert daemon.proc is not None
            hwm = ab.proc_sample(daemon.proc.pid)
            t_stop = time.monotonic()
            code = daemon.stop(args.signal)
            stop_s = time.monotonic() - t_stop
            await fake.reset(http)
            warm = start_and_time(
                daemon,
                f"restart after SIG{args.signal.name.removeprefix('SIG')}, jobs in flight",
                level,
            )
            warm.in_flight = in_flight(before)
            warm.repolled_s = await time_repoll(
                fake, http, op, warm.in_flight, 5 * timing.scaled_cap_s + 30
            )
            if (sample := ab.proc_sample(daemon.proc.pid)) is not None:
                warm.rss_mb = sample.rss_mb
            finished: dict[str, int] | None = None
            finish_s = math.nan
            if args.finish:
                t_finish = time.monotonic()
                async with Client(daemon.socket_path) as client:
                    finished = await ab.wait_counts(
                        client, daemon, lambda c: in_flight(c) == 0, args.finish_timeout_s, 1.0
                    )
                finish_s = time.monotonic() - t_finish
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        fake.stop()

    headers = [
        "start", "jobs in store", "in flight", "spawn → ping (s)", "spawn → daemon.ready (s)",
        "startup_s (in-process)", "store / backends / recover (s)", "recovered",
        "all re-polled (s after ping)", "RSS (MB)",
    ]  # fmt: skip
    rows = [
        [
            s.label,
            f"{sum(s.counts.values()):,}",
            f"{s.in_flight:,}",
            ab.fmt(s.ping_s, 3),
            ab.fmt(s.ready_log_s, 3),
            ab.fmt(s.startup_s, 3),
            s.phases,
            "n/a" if s.recovered is None else f"{s.recovered:,}",
            ab.fmt(s.repolled_s, 2),
            ab.fmt(s.rss_mb, 0),
        ]
        for s in (cold, warm)
    ]
    print(ab.table(headers, rows))
    print()
    print(
        f"- {n:,} jobs launched in {launch_s:.1f} s; states at the stop: {before}; daemon peak "
        f"RSS before the stop {hwm.hwm_mb if hwm else math.nan:.0f} MB"
    )
    print(f"- stop ({args.signal.name}): exit status {code} after {stop_s:.2f} s")
    print(f"- states after the restart: {warm.counts}")
    readopted = warm.recovered == warm.in_flight and in_flight(warm.counts) == warm.in_flight
    checks = [
        ("ready (ping) ≤ 2 s after the restart", warm.ping_s <= 2.0),
        ("every in-flight job re-adopted", readopted),
        ("every job still in the store", sum(warm.counts.values()) == n),
    ]
    if finished is not None:
        succeeded = finished.get("SUCCEEDED", 0) == n
        print(f"- --finish: after {finish_s:.1f} s: {finished}")
        checks.append(("all finished SUCCEEDED", succeeded))
    print("- targets: " + "; ".join(f"{c}: {'PASS' if ok else 'FAIL'}" for c, ok in checks))


def main() -> None:
    p = argparse.ArgumentParser(
        description=ab.summary(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--backend", choices=("batch", "ecs"), default="batch")
    p.add_argument(
        "--signal",
        type=lambda s: signal.Signals["SIG" + s.upper().removeprefix("SIG")],
        default=signal.SIGTERM,
        help="TERM (default) or KILL",
    )
    p.add_argument("--log-level", default="INFO", help="the daemon's")
    p.add_argument("--pending-s", type=float, default=60.0, help="unscaled")
    p.add_argument("--run-s", type=float, default=3600.0, help="unscaled")
    p.add_argument("--jitter", type=float, default=0.2)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--describe-rate", type=float, default=20.0, help="per unscaled second")
    p.add_argument("--describe-burst", type=float, default=100.0)
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    p.add_argument("--timeout-s", type=float, default=600.0, help="for the launch of all jobs")
    p.add_argument("--finish", action="store_true", help="then wait for every job to end")
    p.add_argument("--finish-timeout-s", type=float, default=7200.0)
    p.add_argument("--keep", action="store_true", help="keep the logs and store in /tmp")
    args = p.parse_args()
    timing = ab.PollerTiming(time_scale=args.time_scale)
    print(f"# restart: `{ab.command_line()}`")
    print()
    print(f"- machine: {ab.machine_line()}")
    print(
        f"- {args.jobs:,} {args.backend} jobs; at the stand-in pending {args.pending_s:g} s, run "
        f"{args.run_s:g} s (unscaled), time scale {args.time_scale:g}; daemon: "
        f"{timing.describe()}; store synchronous={args.synchronous}"
    )
    print()
    root = Path(tempfile.mkdtemp(prefix="orc-restart-", dir="/tmp"))
    try:
        asyncio.run(amain(args, root))
    finally:
        if args.keep:
            print(f"\n(logs kept in {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
