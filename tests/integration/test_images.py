"""A job's `image` (issue #15), through the real daemon on moto behind the fault proxy: the task
or job definition it runs under is derived from the configured one, registered once per
distinct content — never once per job, single-flight under concurrency — remembered in the
store across restarts, and found again in AWS by its name and tag when the store has lost it.
A registration AWS refuses fails the job (`rejected`), naming why; the local backend refuses an
image at submit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from orchestrator import views
from orchestrator.backends.definitions import DIGEST_TAG
from orchestrator.client import Client, InvalidJob, InvalidRequest
from orchestrator.testing import make_settings
from tests.integration.test_aws import batch_section, ecs_section
from tests.support.daemon import running
from tests.support.faultproxy import Rule, error_reply
from tests.support.moto import BatchEnv, EcsEnv, MotoServer

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("proxied_aws_env")]

REGISTER = ("ecs", "RegisterTaskDefinition")


async def _run(client: Client, specs: list[dict[str, Any]]) -> list[views.Job]:
    submitted = await asyncio.gather(*(client.submit(spec) for spec in specs))
    return list(await asyncio.gather(*(client.wait(job["id"]) for job in submitted)))


async def test_ecs_registers_each_distinct_image_once_and_never_again(
    tmp_path: Path, short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    configured = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    one = {"command": ["true"], "image": "registry.example.com/app:1"}
    async with running(configured), Client(short_tmp / "o.sock") as client:
        pair = await _run(client, [one, one])
        assert fault_proxy.counts[REGISTER] == 1
        images = [f"registry.example.com/app:{n}" for n in (2, 3, 4)]
        specs = [{"command": ["true"], "image": images[i % 3]} for i in range(50)]
        fifty = await _run(client, specs)
        assert fault_proxy.counts[REGISTER] == 1 + 3  # 50 concurrent jobs, 3 new images
        plain = await _run(client, [{"command": ["true"]}])
    assert {f["state"] for f in pair + fifty + plain} == {"SUCCEEDED"}
    assert pair[0]["info"]["task_definition"] == pair[1]["info"]["task_definition"]
    by_image: dict[str, set[str]] = {}
    for spec_image, final in zip([images[i % 3] for i in range(50)], fifty, strict=True):
        by_image.setdefault(spec_image, set()).add(final["info"]["task_definition"])
    assert all(len(arns) == 1 for arns in by_image.values())
    assert len({next(iter(arns)) for arns in by_image.values()}) == 3
    task_definitions = [r.json()["taskDefinition"] for r in fault_proxy.requests("ecs", "RunTask")]
    assert task_definitions[-1] == ecs_env.settings()["task_definition"]  # no image: as configured

    with moto.client("ecs", ecs_env.region) as ecs:  # what was registered: the image, tagged
        derived = ecs.describe_task_definition(
            taskDefinition=pair[0]["info"]["task_definition"], include=["TAGS"]
        )
        base = ecs.describe_task_definition(taskDefinition=ecs_env.settings()["task_definition"])
    container_name = ecs_env.settings()["container_name"]
    (container,) = [
        c for c in derived["taskDefinition"]["containerDefinitions"] if c["name"] == container_name
    ]
    assert container["image"] == "registry.example.com/app:1"
    family = derived["taskDefinition"]["family"]
    assert family.startswith(base["taskDefinition"]["family"] + "-orch-")
    digest = {t["key"]: t["value"] for t in derived["tags"]}[DIGEST_TAG]
    assert family.endswith(digest[:12])

    before = fault_proxy.counts[REGISTER]
    async with running(configured), Client(short_tmp / "o.sock") as client:  # a restart
        again = await _run(client, [one, {"command": ["true"], "image": images[0]}])
    assert fault_proxy.counts[REGISTER] == before  # remembered in the store
    assert again[0]["info"]["task_definition"] == pair[0]["info"]["task_definition"]

    elsewhere = make_settings(tmp_path / "lost", ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(elsewhere), Client(tmp_path / "lost" / "o.sock") as client:  # store lost
        found = await _run(client, [one])
    assert fault_proxy.counts[REGISTER] == before  # found again in AWS by its name and tag
    assert found[0]["info"]["task_definition"] == pair[0]["info"]["task_definition"]

    with moto.client("ecs", ecs_env.region) as ecs:  # deregistered by someone meanwhile
        ecs.deregister_task_definition(taskDefinition=pair[0]["info"]["task_definition"])
    async with running(configured), Client(short_tmp / "o.sock") as client:
        renewed = await _run(client, [one, one])
    assert fault_proxy.counts[REGISTER] == before + 1  # the store's ARN checked: registered anew
    assert renewed[0]["state"] == "SUCCEEDED"
    assert renewed[0]["info"]["task_definition"] != pair[0]["info"]["task_definition"]
    assert renewed[0]["info"]["task_definition"] == renewed[1]["info"]["task_definition"]


async def test_batch_registers_each_distinct_image_once_and_never_again(
    tmp_path: Path, short_tmp: Path, moto: MotoServer, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("batch", "SubmitJob")
    configured = make_settings(short_tmp, batch=batch_section(batch_env), jobs={"backend": "batch"})
    one = {"command": ["true"], "image": "registry.example.com/tool:7"}
    other = {"command": ["true"], "image": "registry.example.com/tool:8"}
    async with running(configured), Client(short_tmp / "o.sock") as client:
        finals = await _run(client, [one, one, other, one, other])
    assert fault_proxy.counts[("batch", "RegisterJobDefinition")] == 2
    assert {f["state"] for f in finals} == {"SUCCEEDED"}
    definitions = [r.json()["jobDefinition"] for r in fault_proxy.requests("batch", "SubmitJob")]
    assert len(set(definitions)) == 2
    with moto.client("batch", batch_env.region) as batch:
        (derived,) = batch.describe_job_definitions(jobDefinitions=[definitions[0]])[
            "jobDefinitions"
        ]
    assert derived["containerProperties"]["image"] in (one["image"], other["image"])
    assert DIGEST_TAG in derived["tags"]

    async with running(configured), Client(short_tmp / "o.sock") as client:  # a restart
        await _run(client, [one, other])
    elsewhere = make_settings(
        tmp_path / "lost", batch=batch_section(batch_env), jobs={"backend": "batch"}
    )
    async with running(elsewhere), Client(tmp_path / "lost" / "o.sock") as client:  # store lost
        await _run(client, [one, other])
    assert fault_proxy.counts[("batch", "RegisterJobDefinition")] == 2
    submitted = [r.json()["jobDefinition"] for r in fault_proxy.requests("batch", "SubmitJob")]
    assert set(submitted) == set(definitions)


async def test_a_refused_registration_fails_the_job_saying_why(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.add_rule(
        Rule(
            "ecs",
            "RegisterTaskDefinition",
            lambda _request: error_reply(
                "json", 400, "AccessDeniedException", "not allowed: ecs:RegisterTaskDefinition"
            ),
            times=None,
        )
    )
    configured = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(configured), Client(short_tmp / "o.sock") as client:
        refused = await client.wait(
            (await client.submit({"command": ["true"], "image": "example/denied:1"}))["id"]
        )
        fine = await client.wait((await client.submit({"command": ["true"]}))["id"])
    assert (refused["state"], refused["failure"]) == ("FAILED", "rejected")
    assert "job's definition" in str(refused["reason"])
    assert "AccessDenied" in str(refused["reason"])
    assert fine["state"] == "SUCCEEDED"  # the daemon serves on


async def test_the_local_backend_refuses_an_image_naming_the_field(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        with pytest.raises(InvalidJob) as refused:
            await client.submit({"command": ["true"], "image": "alpine:3"})
        with pytest.raises(InvalidRequest) as malformed:  # the spec itself
            await client.submit({"command": ["true"], "image": "has space:1"})
    assert refused.value.code == "invalid_job"
    assert "job.image" in str(refused.value)
    assert "container runtime" in str(refused.value)
    assert "job.image: must be an image reference" in str(malformed.value)
