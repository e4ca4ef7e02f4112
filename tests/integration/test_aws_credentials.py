"""Credentials AWS refuses are the daemon's trouble, never a job's (issue #13): a burst of
credential and signing errors on the launch call (RunTask, SubmitJob) or the describe call
(DescribeTasks, DescribeJobs), answered by the fault proxy in AWS's own shapes, in front of a
real moto server. While it lasts no job fails and none uses up an attempt, and the daemon says it
is degraded (`ping`); once it ends every job finishes, each launched once, and `ping` is ok.
On the code before this change, a refused RunTask or SubmitJob failed the job at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator import views
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support.daemon import accepted, running
from tests.support.moto import BatchEnv, EcsEnv, MotoServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("proxied_aws_env")]

# (service, launch call, describe call) per backend.
CALLS = {
    "ecs": ("ecs", "RunTask", "DescribeTasks"),
    "batch": ("batch", "SubmitJob", "DescribeJobs"),
}
# The codes of AWS's common errors reference that say the credentials or signature were refused
# (a clock skewed by more than 5 minutes gets InvalidSignatureException "Signature expired").
REFUSALS = [
    ("ExpiredTokenException", 400, "The security token included in the request is expired"),
    ("UnrecognizedClientException", 400, "The security token included in the request is invalid"),
    ("InvalidSignatureException", 400, "Signature expired: 20261129T000000Z is now earlier than"),
]
JOBS = 5


def settings_for(backend: str, short_tmp: Path, moto: MotoServer) -> Any:
    if backend == "batch":
        moto.configure_batch(use_docker=False)  # SubmitJob finishes the job at once: SUCCEEDED
    env: EcsEnv | BatchEnv = moto.setup_ecs() if backend == "ecs" else moto.setup_batch()
    extra = {"check_health_on_startup": False} if backend == "ecs" else {}
    return make_settings(
        short_tmp,
        jobs={"backend": backend},
        dispatcher={"retry_base_s": 0.05, "retry_cap_s": 0.5},
        **{backend: env.settings(max_attempts=4, **extra)},
    )


async def degraded(client: Client) -> list[views.Problem]:
    ping = await client.ping()
    problems = ping["problems"]
    return [p for p in problems if p["reason"] == "backend_credentials"]


async def until_degraded(client: Client, wanted: bool, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while bool(await degraded(client)) != wanted:
        assert time.monotonic() < deadline, f"ping never said degraded={wanted}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", ["ecs", "batch"])
@pytest.mark.parametrize(("code", "status", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_refused_credentials_on_the_launch_call_fail_no_job(
    backend: str,
    code: str,
    status: int,
    message: str,
    short_tmp: Path,
    moto: MotoServer,
    fault_proxy: Any,
) -> None:
    service, launch, _ = CALLS[backend]
    settings = settings_for(backend, short_tmp, moto)
    refusal = fault_proxy.error(service, launch, status, code, message, times=None)
    async with running(settings), Client(settings.server.socket_path) as client:
        ids = [
            accepted(j)["id"]
            async for j in client.submit_many({"command": ["true"]} for _ in range(JOBS))
        ]
        await until_degraded(client, True)
        (problem,) = await degraded(client)
        assert problem["message"].startswith(f"{backend}: credentials refused"), problem
        assert code in problem["message"], problem
        await asyncio.sleep(1.0)  # several deferred tries of the same attempts meanwhile
        during = [await client.get(i) for i in ids]
        assert {j["state"] for j in during} == {"QUEUED"}, during  # none failed
        assert {j["attempt"] for j in during} <= {0, 1}, during  # no attempt used up
        fault_proxy.remove_rule(refusal)
        finals = await asyncio.gather(*(client.wait(i) for i in ids))
        histories = [await client.get(i, history=True) for i in ids]
        assert not await degraded(client)
    assert [j["state"] for j in finals] == ["SUCCEEDED"] * JOBS, finals
    assert [len(h["attempts"]) for h in histories] == [1] * JOBS  # the same attempt, resubmitted
    assert fault_proxy.forwarded[(service, launch)] == JOBS  # each launched once


@pytest.mark.parametrize("backend", ["ecs", "batch"])
async def test_refused_credentials_on_the_describe_call_fail_no_job(
    backend: str, short_tmp: Path, moto: MotoServer, fault_proxy: Any
) -> None:
    service, _, describe = CALLS[backend]
    settings = settings_for(backend, short_tmp, moto)
    code, status, message = REFUSALS[0]
    refusal = fault_proxy.error(service, describe, status, code, message, times=None)
    async with running(settings), Client(settings.server.socket_path) as client:
        ids = [
            accepted(j)["id"]
            async for j in client.submit_many({"command": ["true"]} for _ in range(JOBS))
        ]
        await until_degraded(client, True)
        during = [await client.get(i) for i in ids]
        assert not [j for j in during if j["state"] in ("FAILED", "LOST")], during
        fault_proxy.remove_rule(refusal)
        finals = await asyncio.gather(*(client.wait(i) for i in ids))
        await until_degraded(client, False)
    assert [j["state"] for j in finals] == ["SUCCEEDED"] * JOBS, finals
