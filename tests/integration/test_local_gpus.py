"""GPUs on the local backend (`local.gpus`, issue #15) through the real daemon, with device
names standing in for a host's GPUs (CUDA only reads the variable): each job that asks for GPUs
is told its own in CUDA_VISIBLE_DEVICES and never another running job's, a job waits until
enough are free while those that fit go first, a job that asks for none sees none, a job asking
for more than the host has is refused, and after a kill -9 the devices of jobs still running
stay theirs."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import Client, InvalidJob
from orchestrator.testing import make_settings
from tests.support.daemon import DaemonProcess, running

pytestmark = pytest.mark.timeout(90)


def holder(out: Path, name: str, gate: Path) -> dict[str, Any]:
    """A job that writes what it was given, then holds on until `gate` exists."""
    return {
        "name": name,
        "command": [
            "sh",
            "-c",
            f'echo "[$CUDA_VISIBLE_DEVICES]" > "{out}/{name}"; '
            f'while [ ! -e "{gate}" ] && [ -d "{out}" ]; do sleep 0.02; done',
        ],
    }


async def _until(client: Client, job_id: str, state: str) -> None:
    async with asyncio.timeout(20):
        while (await client.get(job_id))["state"] != state:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_each_job_gets_its_own_gpus_and_waits_for_them(short_tmp: Path) -> None:
    out, gate_a, gate_b = short_tmp / "out", short_tmp / "gate-a", short_tmp / "gate-b"
    out.mkdir()
    settings = make_settings(short_tmp, local={"gpus": "0,1,2", "max_concurrency": 8})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        two = await client.submit(holder(out, "two", gate_a) | {"resources": {"gpus": 2}})
        await _until(client, two["id"], "RUNNING")
        big = await client.submit(holder(out, "big", gate_b) | {"resources": {"gpus": 2}})
        cpu = await client.submit(holder(out, "cpu", gate_b))
        one = await client.submit(holder(out, "one", gate_b) | {"resources": {"gpus": 1}})
        for job in (cpu, one):
            await _until(client, job["id"], "RUNNING")
        await asyncio.sleep(0.3)
        waiting = await client.get(big["id"])
        gate_a.touch()  # "two" ends: its GPUs go to "big"
        await _until(client, big["id"], "RUNNING")
        gate_b.touch()
        finals = [await client.wait(j["id"]) for j in (two, big, cpu, one)]
        with pytest.raises(InvalidJob) as refused:
            await client.submit({"command": ["true"], "resources": {"gpus": 4}})
    assert waiting["state"] == "QUEUED"  # 1 GPU free, 2 needed: it waited
    given = {p.name: p.read_text().strip() for p in out.iterdir()}
    assert given == {"two": "[0,1]", "one": "[2]", "cpu": "[]", "big": "[0,1]"}
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 4
    assert finals[1]["info"]["gpus"] == ["0", "1"]
    assert "job.resources.gpus" in str(refused.value)
    assert "only 3 (local.gpus = 0,1,2)" in str(refused.value)


async def test_without_local_gpus_a_job_asking_for_one_is_refused(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        with pytest.raises(InvalidJob) as refused:
            await client.submit({"command": ["true"], "resources": {"gpus": 1}})
    assert "none (local.gpus is empty)" in str(refused.value)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(short_tmp, env={"ORCHESTRATOR__LOCAL__GPUS": "0,1"})
    yield proc
    proc.close()


def test_a_running_jobs_gpus_stay_its_own_after_a_kill_9(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    out, gate = short_tmp / "out", short_tmp / "gate"
    out.mkdir()
    daemon.start()
    with daemon.client() as client:
        first = client.submit(holder(out, "first", gate) | {"resources": {"gpus": 1}})
        while not (out / "first").exists():
            pass
    daemon.stop(signal.SIGKILL)
    daemon.start()
    with daemon.client() as client:
        second = client.submit(holder(out, "second", gate) | {"resources": {"gpus": 1}})
        third = client.submit(holder(out, "third", gate) | {"resources": {"gpus": 1}})
        while not (out / "second").exists():
            pass
        waiting = client.get(third["id"])["state"]
        gate.touch()
        finals = [client.wait(j["id"]) for j in (first, second, third)]
    assert (out / "first").read_text().strip() == "[0]"
    assert (out / "second").read_text().strip() == "[1]"  # not the adopted job's
    assert waiting == "QUEUED"  # both held: it waited
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 3
