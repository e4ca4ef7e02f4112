"""`orchestrator serve` and `orchestrator check` with settings that contradict each other: exit
2 before anything starts, naming both keys and where each came from (the TOML file, an
environment variable). Issue #13, item 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)

EXIT_USAGE = 2


def _config(short_tmp: Path, extra: str) -> Path:
    path = short_tmp / "orchestrator.toml"
    path.write_text(
        f"""
[server]
socket_path = "{short_tmp / "o.sock"}"

[store]
path = "{short_tmp / "state" / "o.db"}"

[ecs]
enabled = true
cluster = "c1"
container_name = "main"
region_name = "us-east-1"
task_definition = "td:1"
max_attempts = 1
connect_timeout_s = 1.0
{extra}
"""
    )
    return path


def _run(short_tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI with no real AWS: were the settings accepted, the daemon would fail (exit 1) on
    an endpoint nobody listens on, or `check` would report failing checks (exit 1)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env={
            **base,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "XDG_RUNTIME_DIR": str(short_tmp / "run"),
            "XDG_STATE_HOME": str(short_tmp / "xdg"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


COMMANDS = [("serve",), ("check",), ("check", "--json"), ("config", "show")]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_launch_type_from_env_and_a_strategy_from_the_file(
    short_tmp: Path, command: tuple[str, ...]
) -> None:
    config = _config(short_tmp, 'capacity_provider_strategy = [{capacityProvider = "FARGATE"}]')
    result = _run(
        short_tmp, *command, "--config", str(config), ORCHESTRATOR__ECS__LAUNCH_TYPE="EC2"
    )
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert result.stderr == (
        "orchestrator: invalid configuration:\n"
        "  ecs.launch_type (from env:ORCHESTRATOR__ECS__LAUNCH_TYPE) and "
        f"ecs.capacity_provider_strategy (from file:{config}) contradict each other: RunTask "
        "takes a launch type or a capacity provider strategy, not both\n"
    )
    assert result.stdout == ""
    assert not (short_tmp / "o.sock").exists()


@pytest.mark.parametrize("command", COMMANDS[:2], ids=" ".join)
def test_security_groups_from_the_file_with_subnets_emptied_by_env(
    short_tmp: Path, command: tuple[str, ...]
) -> None:
    config = _config(short_tmp, 'subnets = ["subnet-1"]\nsecurity_groups = ["sg-1"]')
    result = _run(
        short_tmp,
        *command,
        ORCHESTRATOR_CONFIG=str(config),
        ORCHESTRATOR__ECS__SUBNETS="",
    )
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert (
        f"ecs.security_groups (from file:{config}) given without ecs.subnets "
        "(from env:ORCHESTRATOR__ECS__SUBNETS): an awsvpc network configuration needs subnets"
    ) in result.stderr


@pytest.mark.parametrize("command", COMMANDS[:2], ids=" ".join)
def test_a_fargate_task_size_from_run_task_kwargs_in_env_and_file(
    short_tmp: Path, command: tuple[str, ...]
) -> None:
    config = _config(short_tmp, '[ecs.run_task_kwargs.overrides]\ncpu = "1024"')
    result = _run(
        short_tmp,
        *command,
        "--config",
        str(config),
        ORCHESTRATOR__ECS__RUN_TASK_KWARGS='{"overrides": {"memory": "1024"}}',
    )
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert (
        f"ecs.run_task_kwargs.overrides.cpu (from file:{config}) and "
        "ecs.run_task_kwargs.overrides.memory (from env:ORCHESTRATOR__ECS__RUN_TASK_KWARGS) ask "
        "for a Fargate task of 1024 CPU units with 1024 MiB, a task size Fargate does not "
        "offer: with 1024 CPU units, task memory is one of 2048, 3072, 4096, 5120, 6144, 7168, "
        "8192 MiB"
    ) in result.stderr


def test_the_same_settings_without_the_contradiction_get_past_loading(short_tmp: Path) -> None:
    """The control: with `launch_type` alone, `check` loads the settings and runs its checks
    (which fail against an endpoint nobody listens on: exit 1, not 2)."""
    config = _config(short_tmp, "")
    result = _run(short_tmp, "check", "--config", str(config), ORCHESTRATOR__ECS__LAUNCH_TYPE="EC2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  ecs.cluster" in result.stdout
