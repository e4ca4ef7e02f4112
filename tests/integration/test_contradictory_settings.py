"""Job overrides that contradict the settings, through the real daemon and socket against moto:
refused at submit as `invalid_job`, never stored, no RunTask sent; a consistent task size goes
out as given. Issue #13, item 3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors
from orchestrator.client import Client
from orchestrator.daemon import Daemon
from orchestrator.testing import make_settings
from tests.support.daemon import running
from tests.support.moto import EcsEnv, MotoServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("proxied_aws_env")]


@pytest.fixture
async def ecs_daemon(short_tmp: Path, moto: MotoServer) -> AsyncIterator[Daemon]:
    env: EcsEnv = moto.setup_ecs()
    section = env.settings(max_attempts=4, check_health_on_startup=False)
    settings = make_settings(short_tmp, ecs=section, jobs={"backend": "ecs"})
    async with running(settings) as daemon:
        yield daemon


@pytest.mark.parametrize(
    ("overrides", "path", "needles"),
    [
        (
            {"capacityProviderStrategy": [{"capacityProvider": "FARGATE"}], "launchType": "EC2"},
            "launchType",
            ["launchType (from the job's overrides) and capacityProviderStrategy (from the job's"],
        ),
        (
            {"networkConfiguration": {"awsvpcConfiguration": {"subnets": []}}},
            "networkConfiguration.awsvpcConfiguration.subnets",
            ["securityGroups (from ecs.security_groups) given without"],
        ),
        (
            {"overrides": {"cpu": "2048", "memory": "17408"}},
            "overrides.cpu",
            [
                "a Fargate task of 2048 CPU units with 17408 MiB",
                "task memory is one of 4096, 5120, 6144",
                "15360, 16384 MiB",
            ],
        ),
    ],
)
async def test_contradictory_overrides_are_refused_at_submit(
    ecs_daemon: Daemon,
    fault_proxy: Any,
    overrides: dict[str, Any],
    path: str,
    needles: list[str],
) -> None:
    fault_proxy.record("ecs", "RunTask")
    async with Client(ecs_daemon.settings.server.socket_path) as client:
        with pytest.raises(errors.RemoteError) as info:
            await client.submit({"command": ["x"], "overrides": overrides})
        assert info.value.remote_code == "invalid_job"
        assert f"{path}: " in str(info.value)
        for needle in needles:
            assert needle in str(info.value)
        assert await client.list() == []
    assert fault_proxy.requests("ecs", "RunTask") == []


async def test_a_fargate_task_size_aws_offers_goes_out_as_given(
    ecs_daemon: Daemon, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    async with Client(ecs_daemon.settings.server.socket_path) as client:
        job = await client.submit(
            {"command": ["x"], "overrides": {"overrides": {"cpu": "2048", "memory": "16384"}}}
        )
        await client.wait(job["id"])
    (run_task,) = fault_proxy.requests("ecs", "RunTask")
    body = run_task.json()
    assert (body["launchType"], body["overrides"]["cpu"], body["overrides"]["memory"]) == (
        "FARGATE",
        "2048",
        "16384",
    )
