"""`resources` (issue #15) where each backend takes them: a local job over its memory limit is
OOM-killed by the kernel and classified; ECS and Batch get the API arguments (botocore
validates them; moto records them); what a backend cannot do is refused naming the field."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors
from orchestrator.backends import cgroups
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.integration.test_aws import batch_section, ecs_section
from tests.support.cgroup import FOUND
from tests.support.daemon import running
from tests.support.moto import BatchEnv, EcsEnv

pytestmark = pytest.mark.timeout(90)

MEMORY_V1 = cgroups.probe_memory_v1(enabled=True, create=False)
V2_MEMORY = FOUND.enabled and FOUND.memory == "memory.events"
needs_a_memory_cgroup = pytest.mark.skipif(
    not (MEMORY_V1.enabled or V2_MEMORY),
    reason=f"no memory cgroup this process may make: v1: {MEMORY_V1.detail}",
)
ALLOCATE = [sys.executable, "-c", "b = b'x' * (512 << 20)"]  # every page written


@needs_a_memory_cgroup
async def test_a_local_job_over_its_memory_is_oom_killed_and_one_within_it_runs(
    short_tmp: Path,
) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        over = await client.submit(
            {"command": ALLOCATE, "resources": {"memory_mib": 64}, "retry": {"attempts": 1}}
        )
        within = await client.submit(
            {
                "command": [sys.executable, "-c", "b = b'x' * (8 << 20)"],
                "resources": {"memory_mib": 256},
            }
        )
        over_end, within_end = await client.wait(over["id"]), await client.wait(within["id"])
    assert (over_end["state"], over_end["failure"]) == ("FAILED", "infrastructure"), over_end
    assert "OOM-killed" in str(over_end["reason"])
    assert over_end["resources"] == {"cpu": None, "memory_mib": 64, "gpus": None}
    assert within_end["state"] == "SUCCEEDED"


CPU_V1 = cgroups.probe_cpu_v1(enabled=True, create=False)
needs_a_cpu_cgroup = pytest.mark.skipif(
    not (CPU_V1.enabled or (FOUND.enabled and FOUND.cpu == "cpu.max")),
    reason=f"no cpu cgroup this process may make: v1: {CPU_V1.detail}",
)
# Busy for 1.5 s of wall time, then says how much CPU that took and where it ran.
SPIN = [
    sys.executable,
    "-c",
    "import os, time\n"
    "t = time.monotonic()\n"
    "while time.monotonic() - t < 1.5: pass\n"
    "print(os.times().user, time.monotonic() - t)\n"
    "print(open('/proc/self/cgroup').read())",
]


@needs_a_cpu_cgroup
async def test_a_local_job_gets_no_more_cpu_than_it_asked_for(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        capped = await client.submit({"command": SPIN, "resources": {"cpu": 0.25}})
        final = await client.wait(capped["id"])
        said = "".join([line.get("data", "") async for line in client.logs(capped["id"])])
    assert final["state"] == "SUCCEEDED"
    used, elapsed = (float(x) for x in said.splitlines()[0].split())
    assert used < 0.6 * elapsed  # a quarter of a CPU (an unthrottled spin takes ~all of one)
    where = final["info"].get("cpu_cgroup")
    if where is not None:  # v1: a cpu cgroup of its own, joined, removed once it ended
        assert f"/{Path(where).name}\n" in said  # in its /proc/self/cgroup
        assert not await asyncio.to_thread(Path(where).exists)


async def test_the_local_backend_refuses_what_it_cannot_enforce(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        for resources, field, words in [
            ({"gpus": 1}, "job.resources.gpus", "none (local.gpus is empty)"),
        ]:
            with pytest.raises(errors.RemoteError) as refused:
                await client.submit({"command": ["true"], "resources": resources})
            assert refused.value.code == "invalid_job"
            assert field in str(refused.value)
            assert words in str(refused.value)
        for resources, words in [
            ({"memory_mib": 1}, "greater than or equal to 4"),
            ({"cpu": 0}, "greater than 0"),
            ({"disk": 1}, "unknown field"),
        ]:
            with pytest.raises(errors.RemoteError) as bad:
                await client.submit({"command": ["true"], "resources": resources})
            assert words in str(bad.value)


@pytest.mark.usefixtures("proxied_aws_env")
async def test_ecs_and_batch_get_their_resource_arguments(
    short_tmp: Path, ecs_env: EcsEnv, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    fault_proxy.record("batch", "SubmitJob")
    settings = make_settings(short_tmp, ecs=ecs_section(ecs_env), batch=batch_section(batch_env))
    async with running(settings), Client(short_tmp / "o.sock") as client:
        for backend in ("ecs", "batch"):
            job = await client.submit(
                {
                    "command": ["true"],
                    "backend": backend,
                    "resources": {"cpu": 1, "memory_mib": 2048},
                    "retry": {"attempts": 1},
                }
            )
            assert (await client.wait(job["id"]))["state"] == "SUCCEEDED"
        # Fargate: a size AWS does not offer, and GPUs, are refused at submit.
        for resources, words in [
            ({"cpu": 1, "memory_mib": 100}, "Fargate does not offer"),
            ({"gpus": 1}, "GPUs need the EC2 launch type"),
        ]:
            with pytest.raises(errors.RemoteError) as refused:
                await client.submit({"command": ["true"], "backend": "ecs", "resources": resources})
            assert refused.value.code == "invalid_job"
            assert words in str(refused.value), str(refused.value)
    (run_task,) = fault_proxy.requests("ecs", "RunTask")
    overrides = run_task.json()["overrides"]
    assert (overrides["cpu"], overrides["memory"]) == ("1024", "2048")
    (submit,) = fault_proxy.requests("batch", "SubmitJob")
    assert submit.json()["containerOverrides"]["resourceRequirements"] == [
        {"type": "VCPU", "value": "1"},
        {"type": "MEMORY", "value": "2048"},
    ]


@pytest.mark.usefixtures("proxied_aws_env")
async def test_ecs_on_ec2_takes_gpus_and_overrides_win_over_resources(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    settings = make_settings(
        short_tmp, ecs=ecs_section(ecs_env, launch_type="EC2", max_run_task_attempts=1)
    )
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            {
                "command": ["true"],
                "backend": "ecs",
                "resources": {"gpus": 2, "memory_mib": 1024},
                "overrides": {"overrides": {"memory": "4096"}},
                "retry": {"attempts": 1},
            }
        )
        await client.wait(job["id"])  # moto has no EC2 instance to place it on: not the point
    run_task = fault_proxy.requests("ecs", "RunTask")[0]
    overrides = run_task.json()["overrides"]
    assert overrides["memory"] == "4096"  # the escape hatch wins
    (container,) = overrides["containerOverrides"]
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "2"}]


async def test_without_cgroups_a_cpu_or_memory_limit_is_refused_saying_why(
    short_tmp: Path,
) -> None:
    settings = make_settings(short_tmp, local={"cgroup": "off"})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        for resources, field in [({"cpu": 1}, "job.resources.cpu"), ({"memory_mib": 64}, "")]:
            with pytest.raises(errors.RemoteError) as refused:
                await client.submit({"command": ["true"], "resources": resources})
            assert refused.value.code == "invalid_job"
            assert field in str(refused.value)
            assert "this host cannot limit a local job's" in str(refused.value)
            assert 'local.cgroup = "off"' in str(refused.value)
