"""From a dependency's end to its dependent's dispatch: how long a job waits once what it
depends on has ended (issue #15).

    python bench/dependencies.py                  # 1,000 chains of two jobs in flight
    python bench/dependencies.py --chains 5000 --save /tmp/deps.json

An in-process daemon (real SQLite store, real dispatcher and poller) on the scripted fake
backend of `orchestrator.testing` standing in for ECS, so that what is measured is the
daemon's own path and not a platform's: the poller records the first job's end (SUCCEEDED
after a few describes), the dispatcher hears it, reads the dependent's dependencies, puts it in
its lane, records its attempt, submits it and records it SUBMITTED. Each latency is the
dependent's SUBMITTED time minus its dependency's SUCCEEDED time, both as the store recorded
them. All the chains are submitted at once (one `submit_many` of `ref:` pairs), so their ends
come close together: the figure includes the queueing that causes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as `python bench/dependencies.py`: `tests.support` too
    sys.path.insert(0, str(_REPO))

from orchestrator import logs, models  # noqa: E402
from orchestrator.client import Client  # noqa: E402
from orchestrator.settings import LoggingSettings  # noqa: E402
from orchestrator.testing import FakeBackend, Script, make_settings  # noqa: E402
from tests.support.daemon import running  # noqa: E402

S = models.JobState


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(chains: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="deps-"))
    settings = make_settings(
        root,
        poller={"base_s": 0.2, "cap_s": 1.0},
        dispatcher={"submit_concurrency": 64},
        logging={"level": "WARNING"},
    )
    fake = FakeBackend(
        max_in_flight=2 * chains + 10,
        default_script=Script(states=(S.RUNNING, S.RUNNING, S.SUCCEEDED)),
    )
    socket_path = settings.server.socket_path
    async with running(settings, backends={"local": fake}), Client(socket_path) as client:
        started = time.monotonic()
        specs = []
        for i in range(chains):
            specs.append({"name": f"first-{i}", "command": ["x"]})
            specs.append({"name": f"then-{i}", "command": ["x"], "depends_on": [f"ref:first-{i}"]})
        ids = [r["id"] async for r in client.submit_many(specs) if not isinstance(r, Exception)]
        assert len(ids) == 2 * chains, "every spec accepted"
        finals = await asyncio.gather(*(client.wait(i) for i in ids[1::2]))
        firsts = await asyncio.gather(*(client.get(i) for i in ids[0::2]))
        elapsed = time.monotonic() - started
    lags = []
    for first, then in zip(firsts, finals, strict=True):
        ended = _epoch(first["state_times"]["SUCCEEDED"])
        submitted = _epoch(then["state_times"]["SUBMITTED"])
        lags.append(submitted - ended)
    result = {
        "chains": chains,
        "cpus": os.cpu_count(),
        "load_start": os.getloadavg()[0],
        "elapsed_s": round(elapsed, 2),
        "lag_p50_ms": round(1000 * statistics.median(lags), 1),
        "lag_p99_ms": round(1000 * _percentile(lags, 0.99), 1),
        "lag_max_ms": round(1000 * max(lags), 1),
        "all_succeeded": all(f["state"] == "SUCCEEDED" for f in finals),
    }
    return {**result, "lags_s": lags}


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    logs.configure(LoggingSettings(level="WARNING", format="json"))
    result = asyncio.run(run(args.chains))
    if args.save is not None:
        args.save.write_text(json.dumps(result))
    print(f"# dependencies: {result['cpus']} CPUs, load average {result['load_start']:.2f}")
    print("| chains | all succeeded | wall (s) | lag p50 (ms) | lag p99 (ms) | lag max (ms) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {result['chains']:,} | {result['all_succeeded']} | {result['elapsed_s']} | "
        f"{result['lag_p50_ms']} | {result['lag_p99_ms']} | {result['lag_max_ms']} |"
    )


if __name__ == "__main__":
    main()
