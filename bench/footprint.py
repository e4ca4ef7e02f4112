"""Memory per running local job: the drop of MemAvailable while N `sleep` jobs run, over N.

    python bench/footprint.py [--jobs 100] [--runs 2] [--step 10] [--save PATH.json]

Starts `orchestrator serve` (local backend, `max_concurrency` above N), reads MemAvailable (the
median of five reads) before, submits N `sleep 600` jobs, waits until all are RUNNING, reads it
again, then cancels them. The figure counts everything a running job costs the host beyond the
daemon and its keeper, which run before the first job: the job's own process, its page tables,
its pipes, what the daemon and the keeper hold for it. The keeper's own memory (a fixed cost,
one per daemon) is printed beside it: its PSS and RSS from /proc/PID/smaps_rollup while the jobs
run. Issue #11's target: ≤ 1.5 MiB per job.

`--step K` also measures on the way up, every K running jobs (submitted K at a time, each level
measured once all are RUNNING); the figure per job is still the one at N. `--save PATH.json`
writes every level's readings (MemAvailable's drop, the daemon's RSS, the keeper's PSS and RSS,
MiB) for `bench/plots.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from bench.ingest import kill_jobs_under
from tests.support.daemon import DaemonProcess
from tests.support.keeper import keeper_pids

_READY_S = 120.0


def mem_available_kib() -> int:
    """MemAvailable: the median of five reads, 0.2 s apart."""
    reads = []
    for _ in range(5):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        reads.append(int(line.split()[1]))
        time.sleep(0.2)
    return int(statistics.median(reads))


def keeper_kib(work_dir: Path) -> tuple[int, int]:
    """(PSS, RSS) in KiB of the work directory's keeper."""
    (pid,) = keeper_pids(work_dir)
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line and "-" not in line[:9])
    return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0])


@dataclasses.dataclass(frozen=True)
class Level:
    """Readings with `running` jobs RUNNING, in MiB."""

    running: int
    mem_available_drop_mib: float  # since before the first job
    daemon_rss_mib: float
    keeper_pss_mib: float
    keeper_rss_mib: float


def levels(jobs: int, step: int) -> list[int]:
    """The running-job counts measured: every `step` up to `jobs`, and `jobs` itself."""
    if step <= 0 or step >= jobs:
        return [jobs]
    return [*range(step, jobs, step), jobs]


def one_run(jobs: int, step: int = 0) -> tuple[float, tuple[int, int], list[Level]]:
    """MiB per running job, for one daemon and `jobs` jobs; the keeper's (PSS, RSS) in KiB
    at `jobs`; the readings at 0 jobs and at each level on the way up (see `levels`)."""
    root = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    daemon = DaemonProcess(root, env={"ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": str(jobs + 10)})
    daemon.start()
    assert daemon.proc is not None
    work_dir = daemon.store_path.parent / "jobs"

    def reading(running: int, before: int) -> tuple[Level, tuple[int, int]]:
        available = mem_available_kib()
        keeper = keeper_kib(work_dir)
        sample = ab.proc_sample(daemon.proc.pid) if daemon.proc is not None else None
        level = Level(
            running=running,
            mem_available_drop_mib=(before - available) / 1024,
            daemon_rss_mib=sample.rss_mb if sample is not None else float("nan"),
            keeper_pss_mib=keeper[0] / 1024,
            keeper_rss_mib=keeper[1] / 1024,
        )
        return level, keeper

    try:
        time.sleep(2)  # the daemon's own start-up settles
        before = mem_available_kib()
        readings = [reading(0, before)[0]] if step else []
        with daemon.client() as client:
            ids: list[str] = []
            for level in levels(jobs, step):
                while len(ids) < level:
                    ids.append(client.submit({"command": ["sleep", "600"]})["id"])
                deadline = time.monotonic() + _READY_S
                while sum(client.get(i)["state"] == "RUNNING" for i in ids) < level:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"not all {level} jobs were RUNNING after {_READY_S}s")
                    time.sleep(0.5)
                time.sleep(2)  # the jobs' start-up settles
                last, keeper = reading(level, before)
                readings.append(last)
                if step:
                    print(
                        f"  {level} running: MemAvailable -{last.mem_available_drop_mib:.1f} MiB, "
                        f"daemon RSS {last.daemon_rss_mib:.1f} MiB, keeper PSS "
                        f"{last.keeper_pss_mib:.1f} / RSS {last.keeper_rss_mib:.1f} MiB",
                        flush=True,
                    )
            for job_id in ids:
                client.cancel(job_id)
        return last.mem_available_drop_mib / jobs, keeper, readings
    finally:
        daemon.stop()
        kill_jobs_under(root)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="running jobs to measure")
    parser.add_argument("--runs", type=int, default=2, help="daemons started, one after another")
    parser.add_argument("--step", type=int, default=0, help="also measure every K running jobs")
    parser.add_argument("--save", type=Path, help="write the raw samples as JSON (for plots.py)")
    args = parser.parse_args()
    runs = []
    for run in range(1, args.runs + 1):
        per_job, (pss, rss), readings = one_run(args.jobs, args.step)
        print(
            f"run {run}: {args.jobs} running `sleep` jobs: {per_job:.2f} MiB per job; "
            f"the keeper: PSS {pss / 1024:.1f} MiB, RSS {rss / 1024:.1f} MiB"
        )
        runs.append({"per_job_mib": per_job, "levels": [dataclasses.asdict(r) for r in readings]})
    if args.save:
        ab.save_json(args.save, "footprint", {"jobs": args.jobs, "step": args.step, "runs": runs})
        print(f"(raw samples saved in {args.save})")


if __name__ == "__main__":
    main()
