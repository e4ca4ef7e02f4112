"""Named targets (issue #15): `[ecs.targets.NAME]` and `[batch.targets.NAME]` overlays of their
section, through the real daemon on moto behind the fault proxy: jobs routed to a second
cluster and a second queue, described per cluster, filtered by target; unknown targets refused
at submit, contradictory ones at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, settings
from orchestrator.client import Client
from orchestrator.daemon import build_backends
from orchestrator.testing import make_settings
from tests.integration.test_aws import batch_section, ecs_section
from tests.support.daemon import running
from tests.support.moto import BatchEnv, EcsEnv, MotoServer

pytestmark = pytest.mark.timeout(120)


@pytest.mark.usefixtures("proxied_aws_env")
async def test_jobs_go_to_their_targets_cluster_and_queue(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    with moto.client("ecs", ecs_env.region) as ecs:
        ecs.create_cluster(clusterName="gpu-cluster")
    with moto.client("batch", batch_env.region) as batch:
        queue = batch.describe_job_queues(jobQueues=[batch_env.job_queue])["jobQueues"][0]
        batch.create_job_queue(
            jobQueueName="spot-queue",
            state="ENABLED",
            priority=2,
            computeEnvironmentOrder=queue["computeEnvironmentOrder"],
        )
    fault_proxy.record("ecs", "RunTask")
    fault_proxy.record("ecs", "DescribeTasks")
    fault_proxy.record("batch", "SubmitJob")
    ecs_settings = ecs_section(ecs_env, targets={"gpu": {"cluster": "gpu-cluster"}})
    batch_settings = batch_section(batch_env, targets={"spot": {"job_queue": "spot-queue"}})
    async with (
        running(make_settings(short_tmp, ecs=ecs_settings, batch=batch_settings)),
        Client(short_tmp / "o.sock") as client,
    ):
        jobs = {
            (backend, target): await client.submit(
                {"command": ["true"], "backend": backend} | ({"target": target} if target else {})
            )
            for backend, target in [
                ("ecs", None),
                ("ecs", "gpu"),
                ("batch", None),
                ("batch", "spot"),
            ]
        }
        finals = {key: await client.wait(job["id"]) for key, job in jobs.items()}
        on_gpu, _ = await client.list_page(target="gpu")
        for backend, target, words in [
            ("ecs", "nope", "no ECS target 'nope' (known: gpu)"),
            ("batch", "gpu", "no Batch target 'gpu' (known: spot)"),
            ("local", "gpu", "the local backend has no targets"),
        ]:
            with pytest.raises(errors.RemoteError) as refused:
                await client.submit({"command": ["true"], "backend": backend, "target": target})
            assert refused.value.code == "invalid_job"
            assert words in str(refused.value)
    assert {key: f["state"] for key, f in finals.items()} == dict.fromkeys(jobs, "SUCCEEDED")
    assert finals[("ecs", "gpu")]["target"] == "gpu"
    assert [j["id"] for j in on_gpu] == [jobs[("ecs", "gpu")]["id"]]
    clusters = [r.json()["cluster"] for r in fault_proxy.requests("ecs", "RunTask")]
    assert clusters == [ecs_env.cluster, "gpu-cluster"]
    cluster_of = {
        finals[("ecs", None)]["external_id"]: ecs_env.cluster,
        finals[("ecs", "gpu")]["external_id"]: "gpu-cluster",
    }
    for describe in fault_proxy.requests("ecs", "DescribeTasks"):  # one cluster per call
        body = describe.json()
        assert {cluster_of[arn] for arn in body["tasks"]} == {body["cluster"]}
    queues = [r.json()["jobQueue"] for r in fault_proxy.requests("batch", "SubmitJob")]
    assert queues == [batch_env.job_queue, "spot-queue"]


def test_a_target_is_held_to_its_sections_rules_at_start_up(ecs_env: EcsEnv) -> None:
    environ = {
        f"ORCHESTRATOR__ECS__{k.upper()}": str(v)
        for k, v in ecs_env.settings().items()
        if not isinstance(v, list)
    }
    environ |= {
        "ORCHESTRATOR__ECS__SUBNETS": ",".join(ecs_env.subnet_ids),
        "ORCHESTRATOR__ECS__TARGETS__EC2__LAUNCH_TYPE": "EC2",
        "ORCHESTRATOR__ECS__TARGETS__EC2__CAPACITY_PROVIDER_STRATEGY": (
            '[{"capacityProvider": "FARGATE_SPOT", "weight": 1}]'
        ),
    }
    with pytest.raises(errors.ConfigError) as refused:
        settings.load(None, environ=environ)
    assert "target 'ec2'" in str(refused.value)
    assert "launch_type" in str(refused.value)


@pytest.mark.usefixtures("proxied_aws_env")
async def test_check_looks_at_every_target_too(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, batch_env: BatchEnv
) -> None:
    with moto.client("ecs", ecs_env.region) as ecs:
        ecs.create_cluster(clusterName="gpu-cluster")
    ecs_settings = ecs_section(
        ecs_env, targets={"gpu": {"cluster": "gpu-cluster"}, "gone": {"cluster": "no-such"}}
    )
    batch_settings = batch_section(batch_env, targets={"spot": {"job_queue": "no-such-queue"}})
    configured = make_settings(short_tmp, ecs=ecs_settings, batch=batch_settings)
    backends = build_backends(configured)
    try:
        checks = {c.name: c for b in ("ecs", "batch") for c in await backends[b].check()}
    finally:
        for backend in backends.values():
            await backend.close()
    assert checks["ecs.cluster"].ok
    assert checks["ecs.targets.gpu.cluster"].ok
    assert not checks["ecs.targets.gone.cluster"].ok
    assert "'no-such'" in checks["ecs.targets.gone.cluster"].detail
    assert checks["batch.queue"].ok
    assert not checks["batch.targets.spot.queue"].ok
    assert {"ecs.targets.gpu.task_definition", "batch.targets.spot.job_definition"} <= set(checks)
