"""`priority` and `labels` (issue #15) through the real daemon: local jobs as real processes
that record the order they ran in, ECS and Batch on moto behind the fault proxy for the tags."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.integration.test_aws import batch_section, ecs_section
from tests.support.daemon import running, until_state
from tests.support.moto import BatchEnv, EcsEnv

pytestmark = pytest.mark.timeout(90)


def recorder(log: Path, name: str) -> list[str]:
    return ["sh", "-c", f'echo {name} >> "{log}"']


async def take_the_slot(client: Client, gate: Path) -> None:
    """Run a job that holds the one local slot until `gate` exists (or its test has gone)."""
    wait = f'while [ ! -e "{gate}" ] && [ -d "{gate.parent}" ]; do sleep 0.02; done'
    blocker = await client.submit({"command": ["sh", "-c", wait]})
    await until_state(client, blocker["id"], "RUNNING")


async def test_with_one_slot_higher_priority_runs_first_and_fifo_within_a_priority(
    short_tmp: Path,
) -> None:
    log, gate = short_tmp / "ran", short_tmp / "go"
    settings = make_settings(short_tmp, local={"max_concurrency": 1})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        await take_the_slot(client, gate)
        ids = []
        for name, priority in [("low-a", 0), ("low-b", 0), ("high", 5), ("low-c", 0), ("neg", -5)]:
            job = await client.submit({"command": recorder(log, name), "priority": priority})
            assert job["priority"] == priority
            ids.append(job["id"])
        gate.touch()
        for job_id in ids:
            await client.wait(job_id)
    assert log.read_text().split() == ["high", "low-a", "low-b", "low-c", "neg"]


async def test_a_job_that_waited_long_enough_goes_before_a_higher_priority(
    short_tmp: Path,
) -> None:
    log, gate = short_tmp / "ran", short_tmp / "go"
    # One step of priority is worth 10 ms of waiting: 0.5 s of waiting beats priority 10.
    settings = make_settings(
        short_tmp, local={"max_concurrency": 1}, dispatcher={"priority_aging_s": 0.01}
    )
    async with running(settings), Client(short_tmp / "o.sock") as client:
        await take_the_slot(client, gate)
        old = await client.submit({"command": recorder(log, "old")})
        await asyncio.sleep(0.5)  # the waiting itself: what the old job's place is made of
        urgent = await client.submit({"command": recorder(log, "urgent"), "priority": 10})
        gate.touch()
        await client.wait(old["id"])
        await client.wait(urgent["id"])
    assert log.read_text().split() == ["old", "urgent"]


async def test_labels_are_kept_filtered_on_and_refused_when_not_tags(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        ml = await client.submit({"command": ["true"], "labels": {"team": "ml", "tier": "gold"}})
        web = await client.submit({"command": ["true"], "labels": {"team": "web"}})
        await client.submit({"command": ["true"]})
        assert (await client.get(ml["id"]))["labels"] == {"team": "ml", "tier": "gold"}
        by_team, _ = await client.list_page(labels={"team": "ml"})
        assert [j["id"] for j in by_team] == [ml["id"]]
        both = (await client.list_page(labels={"team": "ml", "tier": "gold"}))[0]
        assert [j["id"] for j in both] == [ml["id"]]
        assert (await client.list_page(labels={"team": "ml", "tier": "x"}))[0] == []
        assert [j["id"] for j in (await client.list_page(labels={"team": "web"}))[0]] == [web["id"]]
        for labels, words in [
            ({"orchestrator:job-id": "x"}, "reserved"),
            ({"aws:foo": "x"}, "reserved"),
            ({"bad\nkey": "x"}, "a key is 1 to 128"),
            ({"k": "v" * 257}, "a value is at most 256"),
            ({f"k{i}": "v" for i in range(41)}, "at most 40"),
        ]:
            with pytest.raises(errors.RemoteError) as refused:
                await client.submit({"command": ["true"], "labels": labels})
            assert refused.value.code == "invalid_request"
            assert words in str(refused.value), str(refused.value)


@pytest.mark.usefixtures("proxied_aws_env")
async def test_labels_become_ecs_and_batch_tags_beside_the_daemons_own(
    short_tmp: Path, ecs_env: EcsEnv, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    fault_proxy.record("batch", "SubmitJob")
    settings = make_settings(
        short_tmp,
        ecs=ecs_section(ecs_env, run_task_kwargs={"tags": [{"key": "team", "value": "ops"}]}),
        batch=batch_section(batch_env),
    )
    labels = {"team": "ml", "cost center": "a/b"}
    async with running(settings), Client(short_tmp / "o.sock") as client:
        for backend in ("ecs", "batch"):
            job = await client.submit({"command": ["true"], "backend": backend, "labels": labels})
            assert (await client.wait(job["id"]))["state"] == "SUCCEEDED"
    (run_task,) = fault_proxy.requests("ecs", "RunTask")
    tags = {t["key"]: t["value"] for t in run_task.json()["tags"]}
    assert tags["team"] == "ml"  # the label over the settings' tag of the same key
    assert tags["cost center"] == "a/b"
    assert "orchestrator:job-id" in tags
    assert [t["key"] for t in run_task.json()["tags"]].count("team") == 1
    (submit,) = fault_proxy.requests("batch", "SubmitJob")
    assert {k: submit.json()["tags"][k] for k in labels} == labels
    assert "orchestrator:job-id" in submit.json()["tags"]
