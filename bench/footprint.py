"""Memory per running local job: the drop of MemAvailable while N `sleep` jobs run, over N.

    python bench/footprint.py [--jobs 100] [--runs 2]

Starts `orchestrator serve` (local backend, `max_concurrency` above N), reads MemAvailable (the
median of five reads) before, submits N `sleep 600` jobs, waits until all are RUNNING, reads it
again, then cancels them. The figure counts everything a running job costs the host: its runner,
the job's own process, page tables, the daemon's share. Issue #11's target: ≤ 1.5 MiB per job.
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


def one_run(jobs: int) -> float:
    """MiB per running job, for one daemon and `jobs` jobs."""
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
            time.sleep(2)  # the runners' start-up settles
            after = mem_available_kib()
            for job_id in ids:
                client.cancel(job_id)
        return (before - after) / jobs / 1024
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
        print(f"run {run}: {args.jobs} running `sleep` jobs: {one_run(args.jobs):.2f} MiB per job")


if __name__ == "__main__":
    main()
