"""`depends_on` through the real daemon: local jobs as real processes that record the order
they ran in; chains, a diamond, failure propagation, `after = "finished"`, refs within one
`submit_many`, refusals, a job on another backend, and a kill -9 in the middle."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors
from orchestrator.client import Client
from orchestrator.daemon import build_backends
from orchestrator.models import JobState as S
from orchestrator.testing import FakeBackend, Script, make_settings
from tests.support.daemon import DaemonProcess, running

pytestmark = pytest.mark.timeout(90)


def step(log: Path, name: str, code: int = 0, wait: Path | None = None) -> dict[str, Any]:
    gate = (
        f'while [ ! -e "{wait}" ] && [ -d "{log.parent}" ]; do sleep 0.02; done; ' if wait else ""
    )
    return {"name": name, "command": ["sh", "-c", f'{gate}echo {name} >> "{log}"; exit {code}']}


def ran(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


async def test_a_chain_and_a_diamond_run_in_dependency_order(short_tmp: Path) -> None:
    log = short_tmp / "ran"
    settings = make_settings(short_tmp, local={"max_concurrency": 4})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        results = [
            r
            async for r in client.submit_many(
                [
                    {**step(log, "top"), "priority": -5},
                    {**step(log, "left"), "depends_on": ["ref:top"]},
                    {**step(log, "right"), "depends_on": ["ref:top"]},
                    {**step(log, "bottom"), "depends_on": ["ref:left", "ref:right"]},
                ]
            )
        ]
        ids = [r["id"] for r in results if not isinstance(r, errors.RemoteError)]
        assert len(ids) == 4, results
        finals = [await client.wait(i) for i in ids]
        bottom = await client.get(ids[3])
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 4
    order = ran(log)
    assert order[0] == "top"
    assert order[-1] == "bottom"
    assert sorted(order[1:3]) == ["left", "right"]
    assert bottom["depends_on"] == [ids[1], ids[2]]  # stored as ids


async def test_a_failure_cancels_its_dependents_transitively_with_class_dependency(
    short_tmp: Path,
) -> None:
    log = short_tmp / "ran"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        first = await client.submit(step(log, "first", code=3))
        second = await client.submit({**step(log, "second"), "depends_on": [first["id"]]})
        third = await client.submit({**step(log, "third"), "depends_on": [second["id"]]})
        either = await client.submit(
            {**step(log, "either"), "depends_on": [first["id"]], "after": "finished"}
        )
        second_end, third_end = await client.wait(second["id"]), await client.wait(third["id"])
        either_end = await client.wait(either["id"])
    assert (second_end["state"], second_end["failure"]) == ("CANCELLED", "dependency")
    assert second_end["reason"] == f"dependency {first['id']} ended FAILED: exit code 3"
    assert (third_end["state"], third_end["failure"]) == ("CANCELLED", "dependency")
    assert str(third_end["reason"]).startswith(f"dependency {second['id']} ended CANCELLED")
    assert either_end["state"] == "SUCCEEDED"  # `after: finished` runs after a failure too
    assert sorted(ran(log)) == ["either", "first"]  # second and third never ran


async def test_a_waiting_job_says_for_what_and_can_be_cancelled(short_tmp: Path) -> None:
    log, go = short_tmp / "ran", short_tmp / "go"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        slow = await client.submit(step(log, "slow", wait=go))
        waiting = await client.submit({**step(log, "after"), "depends_on": [slow["name"]]})
        job = await client.get(waiting["id"])
        while not job["reason"]:  # until it has looked at what it waits for
            await asyncio.sleep(0.02)
            job = await client.get(waiting["id"])
        assert job["state"] == "QUEUED"
        assert job["reason"] == f"waiting for 1 of 1 dependencies ({slow['id']})"
        cancelled = await client.cancel(waiting["id"])
        assert cancelled["state"] == "CANCELLED"
        go.touch()
        assert (await client.wait(slow["id"]))["state"] == "SUCCEEDED"
    assert ran(log) == ["slow"]


async def test_unknown_or_ambiguous_dependencies_are_refused_naming_the_field(
    short_tmp: Path,
) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        for deps, words in [
            (["01zzzzzzzzzzzzzzzzzzzzzzzz"], "no job with id"),
            (["ref:nobody"], "ref:NAME names an earlier spec of the same submit_many"),
        ]:
            with pytest.raises(errors.RemoteError) as refused:
                await client.submit({"command": ["true"], "depends_on": deps})
            assert refused.value.code == "invalid_job"
            assert "job.depends_on[0]" in str(refused.value)
            assert words in str(refused.value)
        # In a submit_many, a later spec cannot be named: no cycle can be made.
        results = [
            r
            async for r in client.submit_many(
                [
                    {"name": "a", "command": ["true"], "depends_on": ["ref:b"]},
                    {"name": "b", "command": ["true"], "depends_on": ["ref:a"]},
                ]
            )
        ]
        # a names a later spec; b names a, which was refused: neither is accepted.
        assert [isinstance(r, errors.RemoteError) for r in results] == [True, True]
        assert (await client.ping())["pong"] is True


async def test_a_local_job_can_wait_for_a_job_on_another_backend(short_tmp: Path) -> None:
    log = short_tmp / "ran"
    fake = FakeBackend(
        name="ecs", default_script=Script(states=(S.RUNNING, S.RUNNING, S.SUCCEEDED))
    )
    settings = make_settings(short_tmp)
    backends = {**build_backends(settings), "ecs": fake}
    async with running(settings, backends=backends), Client(short_tmp / "o.sock") as client:
        remote = await client.submit({"command": ["x"], "backend": "ecs"})
        local = await client.submit({**step(log, "local"), "depends_on": [remote["id"]]})
        assert (await client.wait(local["id"]))["state"] == "SUCCEEDED"
        assert (await client.get(remote["id"]))["state"] == "SUCCEEDED"
    assert ran(log) == ["local"]


def test_dependencies_survive_a_kill_9(daemon: DaemonProcess, short_tmp: Path) -> None:
    log, go = short_tmp / "ran", short_tmp / "go"
    daemon.start()
    with daemon.client() as client:
        first = client.submit(step(log, "first", wait=go))
        second = client.submit({**step(log, "second"), "depends_on": [first["id"]]})
    daemon.stop(signal.SIGKILL)
    go.touch()  # the first ends while no daemon runs
    daemon.start()
    with daemon.client() as client:
        assert client.wait(second["id"])["state"] == "SUCCEEDED"
    assert ran(log) == ["first", "second"]


def test_the_cli_submits_after_a_job_by_name_and_status_shows_how_it_stands(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    log = short_tmp / "ran"
    daemon.start()
    cli = daemon.cli

    first = cli("submit", "--name", "extract", "--wait", "--", "sh", "-c", f"echo 1 >> {log}")
    assert first.returncode == 0, first.stderr
    then = cli("submit", "--depends-on", "extract", "--wait", "--", "sh", "-c", f"echo 2 >> {log}")
    assert then.returncode == 0, then.stderr
    shown = cli("status", then.stdout.strip())
    assert f"{'after:':<15}{first.stdout.strip()} SUCCEEDED (success)" in shown.stdout.splitlines()
    upstream = cli("status", "extract").stdout.splitlines()  # the graph, seen from above
    assert f"{'needed by:':<15}{then.stdout.strip()} SUCCEEDED" in upstream
    assert ran(log) == ["1", "2"]
