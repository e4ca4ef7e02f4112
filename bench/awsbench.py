"""Shared plumbing of the AWS benchmarks (`track.py`, `dispatch.py`, `restart.py`).

- `FakeAwsProcess`: `bench/fakeaws.py` as a child process (its CPU is its own), its URL read
  from the first line it prints, its control endpoints (`stats`, `terminal`, `reset`).
- `daemon_env`: the environment that points `orchestrator serve` at the stand-in with dummy
  credentials and enables one AWS backend (with `EventsTiming`: tracked by the stand-in's
  EventBridge → SQS events too).
- `ProcSample` / `proc_sample`: CPU seconds and RSS of a process from `/proc`.
- `StatsSampler`: the stand-in's describe-call counter sampled over time, for "calls per poll
  round" (the most calls in any window one poller cap long).
- `save_json`: a bench's raw samples for `bench/plots.py` (`--save PATH.json`).
- small helpers: percentiles, RFC 3339 parsing, Markdown tables, the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import aiohttp
import orjson

from orchestrator import errors, views
from orchestrator.client import Client
from orchestrator.settings import EventsSettings, PollerSettings

T = TypeVar("T")

if TYPE_CHECKING:
    from tests.support.daemon import DaemonProcess

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # run as `python bench/x.py`: make `tests.support` importable
    sys.path.insert(0, str(REPO))

REGION = "us-east-1"
CLUSTER = "bench"
CONTAINER = "main"
TASK_DEFINITION = "bench-job:1"
JOB_QUEUE = "bench"
JOB_DEFINITION = "bench-job:1"
GENEROUS = 1_000_000.0  # a bucket rate/burst that never throttles
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "LOST")
DESCRIBE_OP = {"batch": "batch.DescribeJobs", "ecs": "ecs.DescribeTasks"}
LAUNCH_OP = {"batch": "batch.SubmitJob", "ecs": "ecs.RunTask"}
# fakeaws CLI flag prefixes of each backend's throttle families
LAUNCH_FAMILY = {"batch": "batch-submit", "ecs": "ecs-run"}
DESCRIBE_FAMILY = {"batch": "batch-describe", "ecs": "ecs-describe"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- the stand-in ------------------------------------------------------------------------------


class FakeAwsProcess:
    """`python bench/fakeaws.py ARGS` as a child; `url` once started."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.args = ["--port", "0", *args]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.final_stats: dict[str, Any] | None = None
        self._log: TextIO | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(BENCH / "fakeaws.py"), *self.args]

    def start(self) -> str:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()  # the URL, first thing it prints
        if not line.startswith("http"):  # it died: readline() returned b""
            self.stop()
            raise RuntimeError(f"fakeaws did not start: {line!r}; see {self.log_path}")
        self.url = line
        return line

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> dict[str, Any] | None:
        """SIGTERM; the stats it prints on the way out (None if it printed none)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None
        with contextlib.suppress(orjson.JSONDecodeError):
            last = out.decode().strip().splitlines()
            if last:
                self.final_stats = orjson.loads(last[-1])
        return self.final_stats

    async def get(self, session: aiohttp.ClientSession, what: str) -> Any:
        async with session.get(f"{self.url}/_fakeaws/{what}") as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        result: dict[str, Any] = await self.get(session, "stats")
        return result

    async def terminal(self, session: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = await self.get(session, "terminal")
        return result

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"{self.url}/_fakeaws/reset") as response:
            response.raise_for_status()


def fake_args(
    *,
    pending_s: float,
    run_s: float,
    jitter: float,
    time_scale: float,
    seed: int = 0,
    buckets: Mapping[str, tuple[float, float]] = {},
) -> list[str]:
    """fakeaws CLI arguments; `buckets` maps a flag prefix ("batch-submit") to (rate, burst)."""
    args = ["--pending-s", f"{pending_s:g}", "--run-s", f"{run_s:g}", "--jitter", f"{jitter:g}"]
    args += ["--time-scale", f"{time_scale:g}", "--seed", str(seed)]
    args += ["--container-name", CONTAINER]
    for family, (rate, burst) in buckets.items():
        args += [f"--{family}-rate", f"{rate:g}", f"--{family}-burst", f"{burst:g}"]
    return args


# -- the daemon's environment ------------------------------------------------------------------


def aws_env(endpoint_url: str) -> dict[str, str]:
    """Dummy credentials, the stand-in as every service's endpoint, no profile, no IMDS."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


_DEFAULTS = PollerSettings()  # the daemon's own defaults, not a copy that can go stale


@dataclasses.dataclass(frozen=True)
class PollerTiming:
    """The poller's durations (defaults: the daemon's), all divided by one time scale."""

    time_scale: float = 1.0
    base_s: float = _DEFAULTS.base_s
    factor: float = _DEFAULTS.factor
    cap_s: float = _DEFAULTS.cap_s
    fill_ahead_s: float = _DEFAULTS.fill_ahead_s
    missing_grace_s: float = _DEFAULTS.missing_grace_s

    @property
    def scaled_cap_s(self) -> float:
        return self.cap_s / self.time_scale

    def env(self) -> dict[str, str]:
        s = self.time_scale
        return {
            "ORCHESTRATOR__POLLER__BASE_S": f"{self.base_s / s:g}",
            "ORCHESTRATOR__POLLER__FACTOR": f"{self.factor:g}",
            "ORCHESTRATOR__POLLER__CAP_S": f"{self.cap_s / s:g}",
            "ORCHESTRATOR__POLLER__FILL_AHEAD_S": f"{self.fill_ahead_s / s:g}",
            "ORCHESTRATOR__POLLER__MISSING_GRACE_S": f"{self.missing_grace_s / s:g}",
        }

    def describe(self) -> str:
        s = self.time_scale
        return (
            f"poller base_s={self.base_s:g}/{s:g}={self.base_s / s:g} s, factor={self.factor:g}, "
            f"cap_s={self.cap_s:g}/{s:g}={self.cap_s / s:g} s, fill_ahead_s and "
            f"missing_grace_s also /{s:g}"
        )


_EVENTS = EventsSettings()


@dataclasses.dataclass(frozen=True)
class EventsTiming:
    """`[<backend>.events]` against the stand-in's queue: `sweep_s` and `grace_s` (defaults: the
    daemon's) divided by the time scale, as the poller's delays are. The SQS side (`wait_s`,
    `visibility_timeout_s`) is left alone: the stand-in scales neither its event delays nor its
    visibility timeout (they stand for AWS's latency, not for the jobs' lives)."""

    queue_url: str
    time_scale: float = 1.0
    sweep_s: float = _EVENTS.sweep_s
    grace_s: float = _EVENTS.grace_s

    def env(self, backend: str) -> dict[str, str]:
        prefix = f"ORCHESTRATOR__{backend.upper()}__EVENTS__"
        s = self.time_scale
        return {
            f"{prefix}QUEUE_URL": self.queue_url,
            f"{prefix}SWEEP_S": f"{self.sweep_s / s:g}",
            f"{prefix}GRACE_S": f"{self.grace_s / s:g}",
        }

    def describe(self) -> str:
        s = self.time_scale
        return (
            f"events sweep_s={self.sweep_s:g}/{s:g}={self.sweep_s / s:g} s (sweep_share "
            f"{_EVENTS.sweep_share:g}), grace_s={self.grace_s:g}/{s:g}={self.grace_s / s:g} s, "
            f"wait_s={_EVENTS.wait_s}, visibility_timeout_s={_EVENTS.visibility_timeout_s} "
            f"(unscaled), max_receivers={_EVENTS.max_receivers}"
        )


def queue_url(endpoint_url: str, name: str = "orchestrator-events") -> str:
    """The stand-in's events queue (`fakeaws.py --events [NAME]`)."""
    return f"{endpoint_url}/123456789012/{name}"


def daemon_env(
    backend: str,
    endpoint_url: str,
    *,
    max_in_flight: int,
    poller: PollerTiming,
    launch: tuple[float, float],  # the daemon's own launch bucket (rate/s, burst)
    describe: tuple[float, float],  # the daemon's own describe bucket (rate/s, burst)
    log_level: str = "WARNING",
    synchronous: str = "FULL",
    events: EventsTiming | None = None,
) -> dict[str, str]:
    """`orchestrator serve` with `backend` ("batch" or "ecs") against the stand-in; tracked by
    the stand-in's events too with `events`."""
    prefix = f"ORCHESTRATOR__{backend.upper()}__"
    env = {
        **aws_env(endpoint_url),
        **poller.env(),
        "ORCHESTRATOR__JOBS__BACKEND": backend,
        "ORCHESTRATOR__LOCAL__ENABLED": "false",
        "ORCHESTRATOR__LOGGING__LEVEL": log_level,
        "ORCHESTRATOR__LOGGING__FORMAT": "json",
        "ORCHESTRATOR__STORE__SYNCHRONOUS": synchronous,
        f"{prefix}ENABLED": "true",
        f"{prefix}REGION_NAME": REGION,
        f"{prefix}MAX_IN_FLIGHT": str(max_in_flight),
        f"{prefix}CHECK_HEALTH_ON_STARTUP": "true",
        f"{prefix}DESCRIBE_RATE_PER_S": f"{describe[0]:g}",
        f"{prefix}DESCRIBE_BURST": f"{describe[1]:g}",
    }
    if backend == "batch":
        env |= {
            f"{prefix}JOB_QUEUE": JOB_QUEUE,
            f"{prefix}JOB_DEFINITION": JOB_DEFINITION,
            f"{prefix}SUBMIT_RATE_PER_S": f"{launch[0]:g}",
            f"{prefix}SUBMIT_BURST": f"{launch[1]:g}",
        }
    elif backend == "ecs":
        env |= {
            f"{prefix}CLUSTER": CLUSTER,
            f"{prefix}CONTAINER_NAME": CONTAINER,
            f"{prefix}TASK_DEFINITION": TASK_DEFINITION,
            f"{prefix}RUN_TASK_RATE_PER_S": f"{launch[0]:g}",
            f"{prefix}RUN_TASK_BURST": f"{launch[1]:g}",
        }
    else:
        raise ValueError(f"unknown backend {backend!r}")
    if events is not None:
        env |= events.env(backend)
    return env


def job_specs(count: int, prefix: str) -> list[dict[str, Any]]:
    return [{"command": ["bench", str(i)], "name": f"{prefix}-{i}"} for i in range(count)]


async def submit_all(client: Client, count: int, prefix: str) -> None:
    """`job_specs(count, prefix)` through `submit_many`; raise if the daemon refused any."""
    bad = [
        r
        async for r in client.submit_many(job_specs(count, prefix))
        if isinstance(r, errors.RemoteError)
    ]
    if bad:
        raise RuntimeError(f"{len(bad)} submissions refused, e.g. {bad[0]}")


# -- process accounting ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcSample:
    at: float  # time.monotonic()
    cpu_s: float  # utime + stime
    rss_mb: float  # VmRSS
    hwm_mb: float  # VmHWM: peak RSS so far


def proc_sample(pid: int) -> ProcSample | None:
    """The process's CPU and memory now; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    kb = {
        key: int(value.split()[0])
        for line in status.splitlines()
        if line.startswith(("VmRSS:", "VmHWM:"))
        for key, value in [line.split(":", 1)]
    }
    return ProcSample(time.monotonic(), cpu_s, kb.get("VmRSS", 0) / 1024, kb.get("VmHWM", 0) / 1024)


# -- describe calls over time ------------------------------------------------------------------


class StatsSampler:
    """Samples the stand-in's cumulative count of one operation (and a process's RSS) every
    `interval_s` until stopped; `max_in_window` gives the most calls in any `window_s`."""

    def __init__(
        self,
        fake: FakeAwsProcess,
        session: aiohttp.ClientSession,
        operation: str,
        interval_s: float,
        pid: int | None = None,
    ) -> None:
        self.fake, self.session, self.operation = fake, session, operation
        self.interval_s = interval_s
        self.pid = pid
        self.times: list[float] = []
        self.counts: list[int] = []
        self.walls: list[float] = []  # time.time() of each sample, the stand-in's clock
        self.round_calls: list[float] = []  # the stand-in's cumulative per-round allowance
        self.peak_rss_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stats-sampler")

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._sample()  # the final count

    async def _sample(self) -> None:
        stats = await self.fake.stats(self.session)
        self.times.append(time.monotonic())
        self.walls.append(time.time())
        self.counts.append(int(stats["calls"].get(self.operation, 0)))
        describes = stats.get("describe_ids", {}).get(self.operation) or {}
        self.round_calls.append(float(describes.get("round_calls") or 0.0))
        if self.pid is not None and (sample := proc_sample(self.pid)) is not None:
            self.peak_rss_mb = max(self.peak_rss_mb, sample.rss_mb)

    async def _run(self) -> None:
        while True:
            await self._sample()
            await asyncio.sleep(self.interval_s)

    def max_in_window(self, window_s: float) -> int:
        """The most calls counted between two samples at most `window_s` apart."""
        best = 0
        for i, start in enumerate(self.times):
            j = bisect.bisect_right(self.times, start + window_s) - 1
            best = max(best, self.counts[j] - self.counts[i])
        return best


# -- small helpers -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def terminal_time(job: Mapping[str, Any]) -> float | None:
    """When the store recorded the job's terminal state (epoch seconds)."""
    at = (job.get("state_times") or {}).get(job.get("state"))
    return epoch(at) if job.get("state") in TERMINAL and isinstance(at, str) else None


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


async def run_each(
    bench: str,
    kinds: Sequence[str],
    run_one: Callable[[str, Path], Awaitable[T]],
    *,
    keep: bool,
) -> list[T]:
    """`run_one(kind, root)` for each kind in turn, each in a fresh directory under /tmp (kept,
    and said, with `keep`)."""
    rows = []
    for kind in kinds:
        root = Path(tempfile.mkdtemp(prefix=f"orc-{bench}-{kind}-", dir="/tmp"))
        rows.append(await run_one(kind, root))
        if keep:
            print(f"(logs kept in {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def save_rows(path: Path | None, bench: str, rows: Sequence[Any], what: str = "results") -> None:
    """The rows (dataclasses) as JSON with `save_json`, if a path is given, and say where."""
    if path is not None:
        save_json(path, bench, {"rows": [dataclasses.asdict(r) for r in rows]})
        print(f"\n(raw {what} saved in {path})")


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A bench's argument parser: its docstring's first paragraph as the description, the rest
    as the epilog."""
    return argparse.ArgumentParser(
        description=summary(doc),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(doc or "").split("\n\n", 1)[-1],
    )


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph on one line (for `--help`)."""
    return " ".join((doc or "").split("\n\n")[0].split())


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def save_json(path: Path, bench: str, data: Mapping[str, Any]) -> None:
    """A bench's raw samples, with the command line and the load average, for `plots.py`."""
    header = {
        "bench": bench,
        "command": command_line(),
        "cpus": os.cpu_count(),
        "load_at_start": _LOAD_AT_START,  # when this module was imported: the bench's start
        "load_at_end": list(os.getloadavg()),
        "saved_at": time.time(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({**header, **data}))


def machine_line() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


async def wait_counts(
    client: Client,
    daemon: DaemonProcess,
    done: Callable[[dict[str, int]], bool],
    timeout_s: float,
    interval_s: float = 0.2,
    on_ping: Callable[[views.Ping], None] | None = None,
) -> dict[str, int]:
    """`ping` until `done(counts)`; the last counts (also on a timeout). `on_ping` sees each
    whole reply."""
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited {daemon.proc.returncode}; see {daemon.log_path}")
        reply = await client.ping()
        if on_ping is not None:
            on_ping(reply)
        counts = reply["jobs"] or {}
        if done(counts):
            break
        await asyncio.sleep(interval_s)
    return counts


_LOAD_AT_START = list(os.getloadavg())
