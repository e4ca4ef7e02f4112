"""Socket ingest: acknowledged jobs/s and ack latency, one at a time and bulk, FULL and NORMAL.

    python bench/ingest.py [--jobs 20000] [--rate 1000] [--window 1024] [--save PATH.json]

Starts `orchestrator serve` (local backend, max_concurrency=1 so accepted jobs wait QUEUED and
running them does not compete for the CPU), then per `store.synchronous` mode:
- paced: one request at a time on one connection at `--rate`/s (a blocking socket, so the
  client's own event loop stays out of the figures); ack latency p50/p99/max;
- bulk: `--jobs` one-job `submit` lines pipelined on one connection (`--window` unanswered at
  most), as a raw NDJSON producer would send them; acknowledged jobs/s;
- batched: the same jobs as `submit_many` requests of 500, the way `orchestrator submit --file`
  and `Client.submit_many` send them.
An ack means the job is committed to SQLite. Then the floors an ack cannot beat here: a reply
the daemon gives before any task, store or thread (an unknown op), and the fdatasync latency of
the file system under the store. Prints Markdown tables; `--save PATH.json` also writes every
paced ack latency and floor sample (seconds), for `bench/plots.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from tests.support import postgres
from tests.support.daemon import DaemonProcess


def request(i: int) -> bytes:
    job = {"command": ["sleep", "3600"], "name": f"bench-{i}"}
    return orjson.dumps({"v": 1, "id": i, "op": "submit", "job": job}) + b"\n"


def paced(
    path: Path, count: int, rate: float, line: Callable[[int], bytes] = request
) -> list[float]:
    """`count` requests one at a time at `rate`/s; the latency of each reply. A blocking socket
    and no event loop: the client's own overhead stays out of the figures."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    replies = sock.makefile("rb")
    latencies = []
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        if (delay := due - time.perf_counter()) > 0:
            time.sleep(delay)
        data = line(i)
        sent = time.perf_counter()
        sock.sendall(data)
        reply = orjson.loads(replies.readline())
        latencies.append(time.perf_counter() - sent)
        assert reply["ok"] or reply["code"] == "unknown_op", reply
    sock.close()
    return latencies


def unknown_op(i: int) -> bytes:
    """Answered by the connection's reader before any task, store or thread: the floor."""
    return b'{"v": 1, "id": %d, "op": "no-such-op"}\n' % i


def fsync_latencies(directory: Path, count: int = 2000) -> list[float]:
    """fdatasync of a 4 KiB append, as a WAL commit does, on the store's file system."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        latencies = []
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - t)
        return latencies
    finally:
        os.close(fd)
        os.unlink(name)


async def batched(path: Path, count: int, batch: int = 500, window: int = 4) -> float:
    """Like `orchestrator submit --file`: `submit_many` requests of `batch` jobs."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 26)
    slots = asyncio.Semaphore(window)
    jobs = [{"command": ["sleep", "3600"], "name": f"bench-{i}"} for i in range(batch)]
    requests = count // batch
    start = time.perf_counter()

    async def feed() -> None:
        for i in range(requests):
            await slots.acquire()
            line = orjson.dumps({"v": 1, "id": i, "op": "submit_many", "jobs": jobs}) + b"\n"
            writer.write(line)
            await writer.drain()

    feeder = asyncio.create_task(feed())
    for _ in range(requests):
        reply = orjson.loads(await reader.readline())
        assert reply["ok"], reply
        assert all(r["ok"] for r in reply["results"]), reply
        slots.release()
    elapsed = time.perf_counter() - start
    await feeder
    writer.close()
    return requests * batch / elapsed


async def bulk(path: Path, count: int, window: int) -> float:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
    slots = asyncio.Semaphore(window)
    start = time.perf_counter()

    async def feed() -> None:
        for i in range(count):
            await slots.acquire()
            writer.write(request(i))
            if i % 256 == 0:
                await writer.drain()
        await writer.drain()

    feeder = asyncio.create_task(feed())
    for _ in range(count):
        reply = orjson.loads(await reader.readline())
        assert reply["ok"], reply
        slots.release()
    elapsed = time.perf_counter() - start
    await feeder
    writer.close()
    return count / elapsed


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


def run_mode(
    mode: str, args: argparse.Namespace, store_url: str | None = None
) -> tuple[dict[str, float], list[float]]:
    """The figures of one `store.synchronous` mode (or of PostgreSQL at `store_url`), and
    every paced ack latency (s)."""
    root = Path(tempfile.mkdtemp(prefix="orc-bench-", dir="/tmp"))
    env = {
        "ORCHESTRATOR__STORE__SYNCHRONOUS": mode,
        "ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": "1",
        "ORCHESTRATOR__LOGGING__LEVEL": "WARNING",
    }
    if store_url is not None:
        env["ORCHESTRATOR__STORE__URL"] = store_url
    daemon = DaemonProcess(root, env=env)
    daemon.start()
    try:
        latencies = paced(daemon.socket_path, args.paced, args.rate)
        rate = asyncio.run(bulk(daemon.socket_path, args.jobs, args.window))
        batched_rate = asyncio.run(batched(daemon.socket_path, args.jobs))
    finally:
        daemon.stop()
        kill_jobs_under(root)
        shutil.rmtree(root, ignore_errors=True)
    figures = {
        "p50_ms": pct(latencies, 0.50) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "bulk_per_s": rate,
        "batched_per_s": batched_rate,
    }
    return figures, latencies


def kill_jobs_under(root: Path) -> int:
    """Local jobs outlive the daemon (by design): end the benchmark's `sleep`s. Each job is a
    child of the work directory's keeper (`_keeper.py WORK_DIR`) and leads a process group of
    its own; with older code, of a runner (`_runner.py ... ROOT ...`). How many were alive."""
    wanted = str(root).encode()
    parents: dict[int, int] = {}  # pid -> ppid
    keepers: set[int] = set()
    found = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if b"_keeper.py" in cmdline and wanted in cmdline:
            keepers.add(pid)
        elif b"_runner.py" in cmdline and wanted in cmdline:
            found += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    for pid, ppid in parents.items():
        if ppid in keepers and pid not in keepers:
            found += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # the job and whatever it started
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
    return found


def floors(args: argparse.Namespace) -> list[tuple[str, list[float]]]:
    """What an ack cannot beat on this machine: the socket and event loop alone, and the
    fsync that a FULL commit waits for."""
    root = Path(tempfile.mkdtemp(prefix="orc-bench-", dir="/tmp"))
    daemon = DaemonProcess(root, env={"ORCHESTRATOR__LOGGING__LEVEL": "WARNING"})
    daemon.start()
    try:
        loop_only = paced(daemon.socket_path, args.paced, args.rate, unknown_op)
    finally:
        daemon.stop()
    try:
        return [
            ("reply from the connection's reader (no store, no thread)", loop_only),
            ("fdatasync of a 4 KiB append (the store's file system)", fsync_latencies(root)),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="bulk submissions per mode")
    parser.add_argument("--paced", type=int, default=5_000, help="paced submissions per mode")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced submissions per second")
    parser.add_argument("--window", type=int, default=1024, help="bulk: unanswered at most")
    parser.add_argument("--save", type=Path, help="write the raw samples as JSON (for plots.py)")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also on PostgreSQL: a server from Debian's binaries in a temporary directory, "
        "durable (fsync, synchronous commits), on a unix socket",
    )
    args = parser.parse_args()
    print(
        f"# ingest: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"paced {args.paced} at {args.rate:.0f}/s, bulk {args.jobs}"
    )
    print(
        "| synchronous | ack p50 (ms) | ack p99 (ms) | ack max (ms) "
        "| bulk, 1 job/line (jobs/s) | bulk, submit_many x500 (jobs/s) |"
    )
    print("|---|---|---|---|---|---|")
    modes: dict[str, dict[str, object]] = {}
    with contextlib.ExitStack() as stack:
        runs: list[tuple[str, str, str | None]] = [
            ("FULL", "FULL", None),
            ("NORMAL", "NORMAL", None),
        ]
        if args.postgres:
            server = stack.enter_context(postgres.running_server(durable=True))
            if server is None:
                sys.exit("--postgres: no PostgreSQL server binaries (apt-get install postgresql)")
            runs.append(("PostgreSQL", "FULL", asyncio.run(server.new_database())))
        for label, mode, url in runs:
            r, latencies = run_mode(mode, args, url)
            modes[label] = {**r, "latencies_s": latencies}
            print(
                f"| {label} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} "
                f"| {r['bulk_per_s']:,.0f} | {r['batched_per_s']:,.0f} |"
            )
    print("\n| floor | p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---|---|")
    floor_samples = floors(args)
    for label, values in floor_samples:
        print(
            f"| {label} | {pct(values, 0.5) * 1000:.2f} | {pct(values, 0.99) * 1000:.2f} "
            f"| {max(values) * 1000:.1f} |"
        )
    if args.save:
        settings = {"paced": args.paced, "rate": args.rate, "jobs": args.jobs}
        floors_s = [{"label": label, "latencies_s": values} for label, values in floor_samples]
        data = {"settings": settings, "modes": modes, "floors": floors_s}
        ab.save_json(args.save, "ingest", data)
        print(f"\n(raw samples saved in {args.save})")


if __name__ == "__main__":
    main()
