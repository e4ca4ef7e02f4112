"""Jobs that probe what they can reach, submitted by a real peer (`PeerClient`): submit, wait,
read their output, and tell which probes were refused and why."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.support.peers import PeerClient


async def output(peer: PeerClient, job_id: str) -> tuple[str, str]:
    """The job's stdout and stderr, as its submitter reads them."""
    streams = {"stdout": "", "stderr": ""}
    for line in await peer.request("logs", job_id=job_id):
        assert line["ok"], line
        if "stream" in line:
            streams[line["stream"]] += line["data"]
    return streams["stdout"], streams["stderr"]


async def submit(peer: PeerClient, spec: dict[str, Any]) -> dict[str, Any]:
    reply = await peer.call("submit", job=spec)
    assert reply["ok"], reply
    job: dict[str, Any] = reply["job"]
    return job


async def run(peer: PeerClient, spec: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """Submit, wait for the end: the final job, its stdout and its stderr."""
    job = await submit(peer, spec)
    final: dict[str, Any] = (await peer.request("wait", job_id=job["id"]))[-1]["job"]
    return (final, *await output(peer, job["id"]))


SLEEPER = 'echo "pid $$"; exec sleep 1000'  # a job that says its pid, then runs until stopped


async def printed_pid(
    peer: PeerClient, job_id: str, timeout_s: float = 20.0
) -> tuple[int, str, str]:
    """Once the job has printed `pid N` (see SLEEPER): N, and its stdout and stderr so far."""
    deadline = time.monotonic() + timeout_s
    while True:
        out, err = await output(peer, job_id)
        pids = [line[4:] for line in out.splitlines() if line.startswith("pid ")]
        if pids:
            return int(pids[0]), out, err
        assert time.monotonic() < deadline, f"job {job_id} printed no pid: {out} {err}"
        await asyncio.sleep(0.05)


def probes(checks: dict[str, str]) -> str:
    """A shell script running each named command, printing `NAME STATUS` for each, with the
    command's stderr prefixed by its name (to stderr)."""
    lines = [
        f"({command}) 2>&1 >/dev/null | sed 's/^/{name}: /' >&2; echo {name} ${{PIPESTATUS:-?}}"
        for name, command in checks.items()
    ]
    return "\n".join(lines)


def refused(stdout: str, stderr: str, name: str, why: str) -> bool:
    """Whether probe `name` failed (non-zero) saying `why`."""
    statuses = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    said = [line for line in stderr.splitlines() if line.startswith(f"{name}: ")]
    return statuses.get(name) not in (None, "0") and any(why in line for line in said)


def running_pid(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
