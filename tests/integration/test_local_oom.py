"""A local job whose process the kernel's OOM killer killed fails as `infrastructure`, saying so;
one killed by SIGKILL otherwise is the job's own (`user`). Real kernel, real cgroups, a real OOM
kill: the job waits for a file while the test puts a small memory limit on its attempt's cgroup
(v1 `memory.limit_in_bytes` on a hybrid host, v2 `memory.max` where the memory controller is
enabled for job cgroups), then allocates far more. Skipped where neither can be made here."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator import views
from orchestrator.backends import cgroups
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support.cgroup import FOUND
from tests.support.daemon import running, until_state

pytestmark = pytest.mark.timeout(90)

MEMORY_V1 = cgroups.probe_memory_v1(enabled=True, create=False)
V2_MEMORY = FOUND.enabled and FOUND.memory == "memory.events"

needs_oom_counts = pytest.mark.skipif(
    not (MEMORY_V1.enabled or V2_MEMORY),
    reason="no memory cgroup this process may make: "
    f"v1: {MEMORY_V1.detail}; v2: {FOUND.detail if not FOUND.enabled else FOUND.memory}",
)

LIMIT = str(64 << 20)
# Far over the limit, and every page written: the OOM killer takes it within a moment.
ALLOCATE = f"{shlex.quote(sys.executable)} -c \"b = b'x' * (512 << 20)\""
# `infrastructure` is retried by default: a second attempt would run without the limit.
ONE_ATTEMPT: dict[str, Any] = {"retry": {"attempts": 1}}
OOM_REASON = "the kernel OOM-killed a process of the job"


def limit_memory(job: views.Job) -> Path:
    """Put the limit on the attempt's memory cgroup (v1, else v2) and return that cgroup."""
    info = job["info"]
    if "memory_cgroup" in info:
        cgroup = Path(info["memory_cgroup"])
        (cgroup / "memory.limit_in_bytes").write_text(LIMIT)
        with contextlib.suppress(OSError):  # no swap accounting (swapaccount=0): no swap file
            (cgroup / "memory.memsw.limit_in_bytes").write_text(LIMIT)
        return cgroup
    cgroup = Path(info["cgroup"])
    (cgroup / "memory.max").write_text(LIMIT)
    with contextlib.suppress(OSError):
        (cgroup / "memory.swap.max").write_text("0")
    return cgroup


def gone(cgroup: Path) -> bool:
    """Whether the cgroup directory has been removed."""
    return not cgroup.exists()


def without_v2(short_tmp: Path) -> dict[str, Any]:
    """Settings under which jobs get no v2 cgroup (a root that is not one: process groups),
    so that only their v1 memory cgroup counts."""
    (short_tmp / "not-a-cgroup").mkdir(exist_ok=True)
    return {"cgroup_root": short_tmp / "not-a-cgroup"}


async def run_until_limited(
    short_tmp: Path, script: str, local: dict[str, Any] | None = None
) -> tuple[views.Job, Path]:
    """Run `script` (given `$GO`, a file to wait for) with the memory limit on its attempt:
    its end, and the cgroup the limit was put on."""
    go = short_tmp / "go"
    waiting = f"GO={shlex.quote(str(go))}; while [ ! -e $GO ]; do sleep 0.02; done; {script}"
    settings = make_settings(short_tmp, local=local or {})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", waiting], **ONE_ATTEMPT})
        await until_state(client, job["id"], "RUNNING")
        current = await client.get(job["id"])
        cgroup = limit_memory(current)
        go.touch()
        return await client.wait(job["id"]), cgroup


@needs_oom_counts
async def test_a_job_the_oom_killer_killed_fails_as_infrastructure(short_tmp: Path) -> None:
    final, cgroup = await run_until_limited(short_tmp, f"exec {ALLOCATE}")
    assert (final["state"], final["exit_code"]) == ("FAILED", 137), final
    assert final["failure"] == "infrastructure", final
    assert final["reason"] == f"killed by SIGKILL; {OOM_REASON}"
    assert gone(cgroup), f"{cgroup} is still there"


@needs_oom_counts
@pytest.mark.parametrize(
    ("then", "state", "failure", "reason"),
    [
        ("exit $?", "FAILED", "infrastructure", f"exit code 137; {OOM_REASON}"),
        ("exit 0", "SUCCEEDED", None, None),
    ],
    ids=["fails-with-it", "succeeds-all-the-same"],
)
async def test_a_job_whose_child_was_oom_killed_is_infrastructure_only_if_it_failed(
    short_tmp: Path, then: str, state: str, failure: str | None, reason: str | None
) -> None:
    final, cgroup = await run_until_limited(short_tmp, f"{ALLOCATE}; {then}")
    assert (final["state"], final["failure"], final["reason"]) == (state, failure, reason), final
    assert gone(cgroup), f"{cgroup} is still there"


@pytest.mark.skipif(not MEMORY_V1.enabled, reason=f"no v1 memory cgroup: {MEMORY_V1.detail}")
async def test_without_a_v2_cgroup_the_v1_memory_cgroup_still_tells(short_tmp: Path) -> None:
    final, cgroup = await run_until_limited(short_tmp, f"exec {ALLOCATE}", without_v2(short_tmp))
    assert "cgroup" not in final["info"]  # process groups: only the v1 memory cgroup counted
    assert (final["failure"], final["reason"]) == (
        "infrastructure",
        f"killed by SIGKILL; {OOM_REASON}",
    )
    assert gone(cgroup), f"{cgroup} is still there"


@pytest.mark.skipif(not MEMORY_V1.enabled, reason=f"no v1 memory cgroup: {MEMORY_V1.detail}")
async def test_what_a_job_left_running_is_moved_out_of_its_v1_memory_cgroup(
    short_tmp: Path,
) -> None:
    """Without a v2 cgroup nothing stops what a job leaves running: once the attempt is over
    it is moved to the directory above, so that the attempt's memory cgroup goes."""
    pidfile = short_tmp / "left.pid"
    script = f"setsid sleep 1000 & echo $! > {shlex.quote(str(pidfile))}"
    settings = make_settings(short_tmp, local=without_v2(short_tmp))
    try:
        async with running(settings), Client(short_tmp / "o.sock") as client:
            job = await client.submit({"command": ["sh", "-c", script]})
            final = await client.wait(job["id"])
        assert final["state"] == "SUCCEEDED", final
        memory = Path(final["info"]["memory_cgroup"])
        assert gone(memory), f"{memory} is still there"
        left = int(pidfile.read_text())
        assert str(left) in (memory.parent / "cgroup.procs").read_text().split()
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


async def test_a_job_killed_by_sigkill_without_oom_is_its_own_failure(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", "kill -9 $$"], **ONE_ATTEMPT})
        final = await client.wait(job["id"])
    assert (final["state"], final["exit_code"]) == ("FAILED", 137), final
    assert (final["failure"], final["reason"]) == ("user", "killed by SIGKILL")
    if MEMORY_V1.enabled:  # counted, nothing killed, and removed once over
        memory = Path(final["info"]["memory_cgroup"])
        assert memory.parent == MEMORY_V1.root
        assert gone(memory)


@pytest.mark.skipif(not MEMORY_V1.enabled, reason=f"no v1 memory cgroup: {MEMORY_V1.detail}")
async def test_on_a_v1_memory_hierarchy_the_job_runs_in_its_attempts_memory_cgroup(
    short_tmp: Path,
) -> None:
    """What the job's own process says of itself: it is in the attempt's memory cgroup, as
    named in its info, which is removed once the attempt is over."""
    out = short_tmp / "cgroup"
    script = f"cat /proc/self/cgroup > {shlex.quote(str(out))}"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script]})
        final = await client.wait(job["id"])
    assert final["state"] == "SUCCEEDED", final
    memory = Path(final["info"]["memory_cgroup"])
    assert memory.name == f"{final['id']}-{final['attempt']}"
    (line,) = [line for line in out.read_text().splitlines() if ":memory:" in line]
    assert line.endswith(f"/{cgroups.JOBS_V1}/{memory.name}"), line
    assert gone(memory)
