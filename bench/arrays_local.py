"""An array job on the local backend: how long the daemon takes to expand it into its children
(`Store.expand`: one transaction) and to cancel all of them (`Store.stop_children`), and what
`ls` shows meanwhile (the parent alone).

    python bench/arrays_local.py                 # 10,000 children
    python bench/arrays_local.py --children 2000

The children sleep (two run at once, `local.max_concurrency = 2`), so what is measured is the
daemon's own work: from the submit until the parent is SUBMITTED (expanded), then from the
cancel until the parent is CANCELLED (every child ended: two stopped by signal, the rest never
started).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support.daemon import running


async def measure(children: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="orc-arr-") as root:
        settings = make_settings(Path(root), local={"max_concurrency": 2})
        async with running(settings), Client(Path(root) / "o.sock") as client:
            start = time.monotonic()
            job = await client.submit({"command": ["sleep", "600"], "array_size": children})
            while (await client.get(job["id"]))["state"] == "QUEUED":  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            expanded = time.monotonic() - start
            listed, _ = await client.list_page()
            await asyncio.sleep(1.0)  # two children running
            start = time.monotonic()
            await client.cancel(job["id"])
            final = await client.wait(job["id"])
            cancelled = time.monotonic() - start
    return {
        "expanded_s": expanded,
        "cancelled_s": cancelled,
        "listed": len(listed),
        "final": f"{final['state']}: {final['reason']}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=10_000)
    args = parser.parse_args()
    print(f"# `python bench/arrays_local.py --children {args.children}`")
    print(f"- machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    found = asyncio.run(measure(args.children))
    print(f"- expanded into {args.children:,} children in {found['expanded_s']:.2f} s")
    print(f"- every child ended by a cancel in {found['cancelled_s']:.2f} s: {found['final']}")
    print(f"- `ls` showed {found['listed']} job(s) meanwhile")


if __name__ == "__main__":
    main()
