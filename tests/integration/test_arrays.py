"""Array jobs (`array_size`, issue #15) through the real daemon. Local: 50 children as real
processes told their index, the parent's state and progress derived from theirs, a failing
child failing the parent with its class, retries per child, a cancel reaching every child, an
array after a dependency, a kill -9 halfway, the CLI's view. Batch on moto: 1,000 children in one
SubmitJob, tracked to the end through the parent, a child reachable by `<id>:<index>`. ECS on
moto: one RunTask per child with its index."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import Client, InvalidJob, InvalidRequest, NotFound
from orchestrator.testing import make_settings
from tests.integration.test_aws import batch_section, ecs_section
from tests.support.daemon import DaemonProcess, running
from tests.support.moto import BatchEnv, EcsEnv

pytestmark = pytest.mark.timeout(120)


def indexed(out: Path, code: str = "0") -> list[str]:
    """A child that writes its index (both variables) to `out/<index>` and exits `code`."""
    script = (
        f'echo "$ORCHESTRATOR_ARRAY_INDEX $AWS_BATCH_JOB_ARRAY_INDEX" > "{out}/$ORCHESTRATOR_'
        f'ARRAY_INDEX"; exit {code}'
    )
    return ["sh", "-c", script]


async def test_a_local_array_of_50_runs_each_index_once_and_the_parent_follows(
    short_tmp: Path,
) -> None:
    out = short_tmp / "out"
    out.mkdir()
    settings = make_settings(short_tmp, local={"max_concurrency": 8})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": indexed(out), "array_size": 50, "name": "fan"})
        final = await client.wait(parent["id"])
        listed, _ = await client.list_page()
        children, _ = await client.list_page(parent=parent["id"], limit=100)
        seventh = await client.get(f"{parent['id']}:7")
        with pytest.raises(NotFound):
            await client.get(f"{parent['id']}:50")
    assert (final["state"], final["array_size"]) == ("SUCCEEDED", 50)
    assert final["info"]["array_status"] == {"SUCCEEDED": 50}
    assert sorted(int(p.name) for p in out.iterdir()) == list(range(50))
    assert all(p.read_text().split() == [p.name, p.name] for p in out.iterdir())
    assert [j["id"] for j in listed] == [parent["id"]]  # children are left out of a listing
    assert sorted(j["id"] for j in children) == sorted(f"{parent['id']}:{i}" for i in range(50))
    assert {j["state"] for j in children} == {"SUCCEEDED"}
    assert seventh["state"] == "SUCCEEDED"
    assert seventh["depends_on"] == []


async def test_a_failing_child_fails_the_parent_with_its_class_after_all_have_ended(
    short_tmp: Path,
) -> None:
    out = short_tmp / "out"
    out.mkdir()
    fails_3 = indexed(out, '$([ "$ORCHESTRATOR_ARRAY_INDEX" = 3 ] && echo 4 || echo 0)')
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": fails_3, "array_size": 6})
        final = await client.wait(parent["id"])
        child = await client.get(f"{parent['id']}:3")
    assert (final["state"], final["failure"]) == ("FAILED", "user")
    assert final["info"]["array_status"] == {"SUCCEEDED": 5, "FAILED": 1}
    assert str(final["reason"]).startswith("5/6 succeeded, 1 failed; first: ")
    assert f"{parent['id']}:3 FAILED (exit code 4)" in str(final["reason"])
    assert (child["state"], child["exit_code"]) == ("FAILED", 4)
    assert len(list(out.iterdir())) == 6  # the others all ran


async def test_logs_are_each_childs_and_the_parent_says_so(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {"command": ["sh", "-c", "echo child $ORCHESTRATOR_ARRAY_INDEX"], "array_size": 3}
        )
        await client.wait(parent["id"])
        second = [line async for line in client.logs(f"{parent['id']}:2")]
        with pytest.raises(InvalidRequest) as refused:
            _ = [line async for line in client.logs(parent["id"])]
    assert "".join(chunk.get("data", "") for chunk in second) == "child 2\n"
    assert second[-1]["end"]
    assert f"logs {parent['id']}:<index>" in str(refused.value)


async def test_retries_apply_per_child(short_tmp: Path) -> None:
    marks = short_tmp / "marks"
    marks.mkdir()
    # Child 2 fails with 75 the first time only; the others succeed at once.
    script = (
        f'm="{marks}/$ORCHESTRATOR_ARRAY_INDEX"; echo x >> "$m"; '
        '[ "$ORCHESTRATOR_ARRAY_INDEX" = 2 ] && [ "$(wc -l < "$m")" = 1 ] && exit 75; exit 0'
    )
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {
                "command": ["sh", "-c", script],
                "array_size": 4,
                "retry": {"exit_codes": [75], "backoff_s": 0},
            }
        )
        final = await client.wait(parent["id"])
        retried = await client.get(f"{parent['id']}:2")
    assert final["state"] == "SUCCEEDED"
    assert retried["attempt"] == 2
    assert {p.name: len(p.read_text().split()) for p in marks.iterdir()} == {
        "0": 1,
        "1": 1,
        "2": 2,
        "3": 1,
    }


async def test_cancelling_the_parent_stops_every_child(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 2})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["sleep", "60"], "array_size": 5})
        children: list[Any] = []
        while not any(c["state"] == "RUNNING" for c in children):
            children, _ = await client.list_page(parent=parent["id"])
            await asyncio.sleep(0.05)
        await client.cancel(parent["id"])
        final = await client.wait(parent["id"])
        children, _ = await client.list_page(parent=parent["id"])
    assert (final["state"], final["failure"]) == ("CANCELLED", "cancelled")
    assert final["reason"] == "stopped (cancel): 0/5 succeeded, 5 cancelled"
    assert {c["state"] for c in children} == {"CANCELLED"}  # 2 running, 3 never started


async def test_an_array_waits_for_its_dependency_and_refusals_name_the_field(
    short_tmp: Path,
) -> None:
    out, gate = short_tmp / "out", short_tmp / "gate"
    out.mkdir()
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        first = await client.submit(
            {"command": ["sh", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.02; done']}
        )
        parent = await client.submit(
            {"command": indexed(out), "array_size": 3, "depends_on": [first["id"]]}
        )
        await asyncio.sleep(0.3)
        waiting = await client.get(parent["id"])
        ran_before = list(out.iterdir())
        gate.touch()
        final = await client.wait(parent["id"])
        for size in (1, 10_001, "3"):
            with pytest.raises(InvalidRequest) as refused:
                await client.submit({"command": ["true"], "array_size": size})
            assert "job.array_size" in str(refused.value)
    assert waiting["state"] == "QUEUED"
    assert ran_before == []  # nothing ran before the dependency ended
    assert final["state"] == "SUCCEEDED"
    assert len(list(out.iterdir())) == 3


def test_an_array_survives_a_kill_9_halfway(daemon: DaemonProcess, short_tmp: Path) -> None:
    out, gate = short_tmp / "out", short_tmp / "gate"
    out.mkdir()
    script = (
        f'[ "$ORCHESTRATOR_ARRAY_INDEX" -ge 3 ] && while [ ! -e "{gate}" ] && '
        f'[ -d "{short_tmp}" ]; do sleep 0.02; done; '
        f'echo "$ORCHESTRATOR_ARRAY_INDEX" >> "{out}/ran"'
    )
    daemon.start()
    with daemon.client() as client:
        parent = client.submit({"command": ["sh", "-c", script], "array_size": 6})
        while len((out / "ran").read_text().split() if (out / "ran").exists() else []) < 3:
            pass
    daemon.stop(signal.SIGKILL)
    gate.touch()  # the rest end while no daemon runs (or after)
    daemon.start()
    with daemon.client() as client:
        final = client.wait(parent["id"])
    assert final["state"] == "SUCCEEDED"
    assert sorted((out / "ran").read_text().split(), key=int) == [str(i) for i in range(6)]


def test_the_cli_submits_an_array_and_shows_its_progress(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    daemon.start()
    cli = daemon.cli

    code = '[ "$ORCHESTRATOR_ARRAY_INDEX" = 1 ] && exit 3; exit 0'
    done = cli("submit", "--array", "4", "--wait", "--", "sh", "-c", code)
    parent = done.stdout.strip()
    assert done.returncode == 1, done.stderr  # the parent FAILED: no exit code of its own
    listed = cli("ls").stdout.splitlines()
    assert any(
        line.startswith(parent) and line.endswith("[3/4 succeeded, 1 failed]") for line in listed
    ), listed
    shown = cli("status", parent).stdout.splitlines()
    assert f"{'array:':<15}3/4 succeeded, 1 failed (children: `ls --children {parent}`)" in shown
    child = cli("status", f"{parent}:1").stdout.splitlines()
    assert f"{'array:':<15}child 1 of {parent}" in child
    assert f"{'exit_code:':<15}3" in child
    children = cli("ls", "--children", parent).stdout.splitlines()[1:]
    assert sorted(line.split()[0] for line in children) == [f"{parent}:{i}" for i in range(4)]


@pytest.mark.usefixtures("proxied_aws_env")
async def test_a_batch_array_of_1000_is_one_submit_tracked_through_its_parent(
    short_tmp: Path, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("batch", "SubmitJob")
    fault_proxy.record("batch", "DescribeJobs")
    configured = make_settings(short_tmp, batch=batch_section(batch_env), jobs={"backend": "batch"})
    async with running(configured), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {"command": ["true"], "array_size": 1000, "retry": {"exit_codes": [75]}}
        )
        final = await client.wait(parent["id"])
        child = await client.get(f"{parent['id']}:999")
        with pytest.raises(NotFound):
            await client.get(f"{parent['id']}:1000")
        with pytest.raises(InvalidJob) as too_many:  # Batch's evaluateOnExit takes 5
            await client.submit(
                {"command": ["true"], "array_size": 2, "retry": {"exit_codes": [1, 2, 3, 4]}}
            )
        assert "job.retry.exit_codes" in str(too_many.value)
        assert "at most 3 exit codes" in str(too_many.value)
        for op in ("cancel", "wait"):  # a Batch child is Batch's: the whole array is ours
            with pytest.raises(InvalidRequest) as refused:
                await client.call(op, job_id=f"{parent['id']}:3")
            assert f"is a child of the batch array job {parent['id']}" in str(refused.value)
    (submit,) = fault_proxy.requests("batch", "SubmitJob")
    kwargs = submit.json()
    assert kwargs["arrayProperties"] == {"size": 1000}
    assert kwargs["retryStrategy"] == {  # the daemon's policy, applied by Batch to each child
        "attempts": 3,
        "evaluateOnExit": [
            {"onExitCode": "75", "action": "RETRY"},
            {"onStatusReason": "Host EC2*", "action": "RETRY"},
            {"onReason": "*", "action": "EXIT"},
        ],
    }
    assert final["state"] == "SUCCEEDED"
    assert final["info"]["array_status"]["SUCCEEDED"] == 1000
    described = {i for r in fault_proxy.requests("batch", "DescribeJobs") for i in r.json()["jobs"]}
    probe = "0" * 32  # the start-up health check's
    # No child was polled: the parent, and child 999 when asked for
    assert described - {probe} == {final["external_id"], f"{final['external_id']}:999"}
    assert child["id"] == f"{parent['id']}:999"
    assert child["state"] == "SUCCEEDED"
    assert child["external_id"] == f"{final['external_id']}:999"
    assert child["info"]["array_child_of"] == parent["id"]


@pytest.mark.usefixtures("proxied_aws_env")
async def test_an_ecs_array_runs_one_task_per_child_told_its_index(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    configured = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(configured), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["true"], "array_size": 3})
        final = await client.wait(parent["id"])
    assert final["state"] == "SUCCEEDED"
    indexes = []
    for request in fault_proxy.requests("ecs", "RunTask"):
        (override,) = request.json()["overrides"]["containerOverrides"]
        env = {e["name"]: e["value"] for e in override["environment"]}
        assert env["ORCHESTRATOR_ARRAY_INDEX"] == env["AWS_BATCH_JOB_ARRAY_INDEX"]
        indexes.append(int(env["ORCHESTRATOR_ARRAY_INDEX"]))
    assert sorted(indexes) == [0, 1, 2]
