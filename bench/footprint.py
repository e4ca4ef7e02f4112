"""Memory per running local job: the drop of MemAvailable while N `sleep` jobs run, over N.

    python bench/footprint.py [--jobs 100] [--runs 2]

Starts `orchestrator serve` (local backend, `max_concurrency` above N), reads MemAvailable (the
median of five reads) before, submits N `sleep 600` jobs, waits until all are RUNNING, reads it
again, then cancels them. The figure counts everything a running job costs the host beyond the
daemon and its keeper, which run before the first job: the job's own process, its page tables,
its pipes, what the daemon and the keeper hold for it. The keeper's own memory (a fixed cost,
one per daemon) is printed beside it: its PSS and RSS from /proc/PID/smaps_rollup while the jobs
run. Issue #11's target: ≤ 1.5 MiB per job.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def one_run(jobs: int) -> tuple[float, tuple[int, int]]:
    """MiB per running job, for one daemon and `jobs` jobs; the keeper's (PSS, RSS) in KiB."""
    root = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    daemon = DaemonProcess(root, env={"ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": str(jobs + 10)})
    daemon.start()
    try:
        time.sleep(2)  # the daemon's own start-up settles
        before = mem_available_kib()
        with daemon.client() as client:
            ids = [client.submit({"command": ["sleep", "600"]})["id"] for _ in range(jobs)]
            deadline = time.monotonic() + _READY_S
            while sum(client.get(i)["state"] == "RUNNING" for i in ids) < jobs:
                if time.monotonic() > deadline:
                    raise SystemExit(f"not all {jobs} jobs were RUNNING after {_READY_S}s")
                time.sleep(0.5)
            time.sleep(2)  # the jobs' start-up settles
            after = mem_available_kib()
            keeper = keeper_kib(daemon.store_path.parent / "jobs")
            for job_id in ids:
                client.cancel(job_id)
        return (before - after) / jobs / 1024, keeper
    finally:
        daemon.stop()
        kill_jobs_under(root)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="running jobs to measure")
    parser.add_argument("--runs", type=int, default=2, help="daemons started, one after another")
    args = parser.parse_args()
    for run in range(1, args.runs + 1):
        per_job, (pss, rss) = one_run(args.jobs)
        print(
            f"run {run}: {args.jobs} running `sleep` jobs: {per_job:.2f} MiB per job; "
            f"the keeper: PSS {pss / 1024:.1f} MiB, RSS {rss / 1024:.1f} MiB"
        )


if __name__ == "__main__":
    main()
