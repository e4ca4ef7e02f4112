"""`orchestrator check` against a moto server: what it finds right and what it finds wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.moto import BatchEnv, EcsEnv, MotoServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("aws_env")]


def check(short_tmp: Path, **env: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "check", "--json"],
        env={
            **os.environ,
            "ORCHESTRATOR__STORE__PATH": str(short_tmp / "state" / "o.db"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.stdout, result.stderr
    report: dict[str, Any] = orjson.loads(result.stdout)
    return result.returncode, report


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def ecs_env_vars(env: EcsEnv, **overrides: str) -> dict[str, str]:
    values = {
        "ENABLED": "true",
        "CLUSTER": env.cluster,
        "CONTAINER_NAME": env.container_name,
        "REGION_NAME": env.region,
        "TASK_DEFINITION": env.task_definition,
        "SUBNETS": ",".join(env.subnet_ids),
        "SECURITY_GROUPS": ",".join(env.security_group_ids),
        "MAX_ATTEMPTS": "1",
        **overrides,
    }
    return {f"ORCHESTRATOR__ECS__{k}": v for k, v in values.items()}


def test_a_good_ecs_setup_passes_every_check(short_tmp: Path, moto: MotoServer) -> None:
    env = moto.setup_ecs()
    code, report = check(short_tmp, **ecs_env_vars(env))
    assert code == 0, report
    assert report["ok"] is True
    assert set(by_name(report)) == {
        "store",
        "local",
        "local.cgroup",
        "local.hide_state",
        "ecs.cluster",
        "ecs.task_definition",
        "ecs.network",
        "ecs.logs",
    }


@pytest.mark.parametrize(
    ("override", "failing", "needle"),
    [
        ({"CLUSTER": "nope"}, "ecs.cluster", "'nope' is missing"),
        ({"CONTAINER_NAME": "sidecar"}, "ecs.task_definition", "no container 'sidecar'"),
        ({"SUBNETS": "subnet-00000000"}, "ecs.network", "subnet"),
        ({"SECURITY_GROUPS": "sg-00000000"}, "ecs.network", "sg-00000000"),
    ],
)
def test_a_broken_ecs_setup_fails_the_check_that_names_it(
    short_tmp: Path, moto: MotoServer, override: dict[str, str], failing: str, needle: str
) -> None:
    env = moto.setup_ecs()
    code, report = check(short_tmp, **ecs_env_vars(env, **override))
    assert code == 1
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert failing in failed, report
    assert needle in failed[failing]


def batch_env_vars(env: BatchEnv, **overrides: str) -> dict[str, str]:
    values = {
        "ENABLED": "true",
        "JOB_QUEUE": env.job_queue,
        "JOB_DEFINITION": env.job_definition,
        "REGION_NAME": env.region,
        "MAX_ATTEMPTS": "1",
        **overrides,
    }
    return {f"ORCHESTRATOR__BATCH__{k}": v for k, v in values.items()}


def test_batch_queue_checks(short_tmp: Path, moto: MotoServer) -> None:
    env = moto.setup_batch()
    with moto.client("logs") as logs:
        logs.create_log_group(logGroupName="/aws/batch/job")
    code, report = check(short_tmp, **batch_env_vars(env))
    assert code == 0, report
    assert {"batch.queue", "batch.job_definition", "batch.logs"} <= set(by_name(report))
    with moto.client("batch") as batch:
        batch.update_job_queue(jobQueue=env.job_queue, state="DISABLED")
    code, report = check(short_tmp, **batch_env_vars(env, JOB_DEFINITION="missing"))
    assert code == 1
    checks = by_name(report)
    assert checks["batch.queue"]["ok"] is False
    assert "DISABLED" in checks["batch.queue"]["detail"]
    assert checks["batch.job_definition"]["ok"] is False


def test_an_unwritable_store_directory_fails(short_tmp: Path) -> None:
    blocker = short_tmp / "file"
    blocker.write_text("")
    code, report = check(short_tmp, ORCHESTRATOR__STORE__PATH=str(blocker / "sub" / "o.db"))
    assert code == 1
    assert by_name(report)["store"]["ok"] is False


@pytest.mark.parametrize(
    ("hide_state", "said"),
    [("auto", "jobs see "), ("off", "off: jobs run as the daemon's user and can read and write")],
)
def test_check_says_whether_local_jobs_will_see_the_daemons_state(
    short_tmp: Path, hide_state: str, said: str
) -> None:
    code, report = check(short_tmp, ORCHESTRATOR__LOCAL__HIDE_STATE=hide_state)
    assert code == 0, report
    line = by_name(report)["local.hide_state"]
    assert line["ok"] is True
    assert line["detail"].startswith(said), line
    if hide_state == "auto":  # the store's directory, the work directory
        assert str(short_tmp) in line["detail"], line
