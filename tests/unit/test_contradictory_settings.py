"""Settings and job overrides that contradict each other, refused before any call: at settings
load (naming every key and where it came from), at a backend's start, and per job at submit
(`invalid_job` naming the field and where each came from). Issue #13, item 3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from orchestrator import errors, models, settings
from orchestrator.backends import aws_kwargs
from orchestrator.backends.batch import BatchBackend
from orchestrator.backends.ecs import EcsBackend
from orchestrator.ratelimit import TokenBucket
from orchestrator.settings import BatchSettings, EcsSettings

ECS_REQUIRED: dict[str, Any] = {
    "enabled": True,
    "cluster": "c1",
    "container_name": "main",
    "region_name": "us-east-1",
    "task_definition": "td:3",
    "check_health_on_startup": False,
}
ECS_TOML = """
[ecs]
enabled = true
cluster = "c1"
container_name = "main"
region_name = "us-east-1"
task_definition = "td:3"
check_health_on_startup = false
"""
SPOT = [{"capacityProvider": "FARGATE_SPOT", "weight": 1}]


def _environ(tmp_path: Path, **env: str) -> dict[str, str]:
    return {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")} | {
        f"ORCHESTRATOR__ECS__{name}": value for name, value in env.items()
    }


def _toml(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "orchestrator.toml"
    path.write_text(ECS_TOML + extra)
    return path


def _refused(config: Path | None, environ: dict[str, str]) -> list[str]:
    """The lines of the `ConfigError` that `load` raises."""
    with pytest.raises(errors.ConfigError) as info:
        settings.load(config, environ)
    head, *lines = info.value.message.splitlines()
    assert head == "invalid configuration:"
    return [line.strip() for line in lines]


# -- at settings load: both keys and both sources ----------------------------------------------


def test_launch_type_from_env_with_a_strategy_from_the_file(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'capacity_provider_strategy = [{capacityProvider = "FARGATE_SPOT"}]\n')
    lines = _refused(config, _environ(tmp_path, LAUNCH_TYPE="EC2"))
    assert lines == [
        "ecs.launch_type (from env:ORCHESTRATOR__ECS__LAUNCH_TYPE) and "
        f"ecs.capacity_provider_strategy (from file:{config}) contradict each other: RunTask "
        "takes a launch type or a capacity provider strategy, not both"
    ]


def test_launch_type_from_the_file_with_a_strategy_from_env(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'launch_type = "FARGATE"\n')
    lines = _refused(
        config,
        _environ(tmp_path, CAPACITY_PROVIDER_STRATEGY='[{"capacityProvider": "FARGATE"}]'),
    )
    assert len(lines) == 1
    assert lines[0].startswith(
        f"ecs.launch_type (from file:{config}) and ecs.capacity_provider_strategy "
        "(from env:ORCHESTRATOR__ECS__CAPACITY_PROVIDER_STRATEGY) contradict each other"
    )


@pytest.mark.parametrize(
    ("extra", "given"),
    [
        ('security_groups = ["sg-1"]\n', "ecs.security_groups"),
        ("assign_public_ip = true\n", "ecs.assign_public_ip"),
        (
            'security_groups = ["sg-1"]\nassign_public_ip = true\n',
            "ecs.security_groups (from file:{config}) and ecs.assign_public_ip",
        ),
    ],
)
def test_security_groups_or_public_ip_without_subnets(
    tmp_path: Path, extra: str, given: str
) -> None:
    config = _toml(tmp_path, extra)
    (line,) = _refused(config, _environ(tmp_path))
    assert line == (
        f"{given.format(config=config)} (from file:{config}) given without ecs.subnets "
        "(from default): an awsvpc network configuration needs subnets, and every RunTask "
        "would go out with `subnets: []`"
    )


def test_subnets_emptied_by_env_name_the_variable(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'subnets = ["subnet-1"]\nsecurity_groups = ["sg-1"]\n')
    (line,) = _refused(config, _environ(tmp_path, SUBNETS=""))
    assert line.startswith(
        f"ecs.security_groups (from file:{config}) given without ecs.subnets "
        "(from env:ORCHESTRATOR__ECS__SUBNETS)"
    )


def test_run_task_kwargs_from_env_against_a_setting_from_the_file(tmp_path: Path) -> None:
    """The key inside the JSON is named, and its source is the variable that holds it."""
    config = _toml(tmp_path, 'capacity_provider_strategy = [{capacityProvider = "FARGATE"}]\n')
    (line,) = _refused(config, _environ(tmp_path, RUN_TASK_KWARGS='{"launchType": "FARGATE"}'))
    assert line.startswith(
        "ecs.run_task_kwargs.launchType (from env:ORCHESTRATOR__ECS__RUN_TASK_KWARGS) and "
        f"ecs.capacity_provider_strategy (from file:{config}) contradict each other"
    )


def test_run_task_kwargs_keys_are_named_as_spelled(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        '[ecs.run_task_kwargs]\nlaunch_type = "EC2"\n'
        'capacity_provider_strategy = [{capacity_provider = "FARGATE"}]\n',
    )
    (line,) = _refused(config, _environ(tmp_path))
    assert line.startswith(
        f"ecs.run_task_kwargs.launch_type (from file:{config}) and "
        f"ecs.run_task_kwargs.capacity_provider_strategy (from file:{config}) contradict"
    )


@pytest.mark.parametrize(
    ("awsvpc", "given"),
    [
        ('{"securityGroups": ["sg-1"]}', "securityGroups"),  # no subnets at all
        ('{"subnets": [], "assignPublicIp": "ENABLED"}', "assignPublicIp"),
    ],
)
def test_an_awsvpc_configuration_in_run_task_kwargs_without_subnets(
    tmp_path: Path, awsvpc: str, given: str
) -> None:
    env = _environ(
        tmp_path,
        RUN_TASK_KWARGS=f'{{"networkConfiguration": {{"awsvpcConfiguration": {awsvpc}}}}}',
    )
    (line,) = _refused(_toml(tmp_path), env)
    source = "(from env:ORCHESTRATOR__ECS__RUN_TASK_KWARGS)"
    subnets_source = source if '"subnets"' in awsvpc else "(from default)"
    subnets_key = (
        "ecs.run_task_kwargs.networkConfiguration.awsvpcConfiguration.subnets"
        if '"subnets"' in awsvpc
        else "ecs.subnets"
    )
    assert line.startswith(
        f"ecs.run_task_kwargs.networkConfiguration.awsvpcConfiguration.{given} {source} "
        f"given without {subnets_key} {subnets_source}"
    )


def test_run_task_kwargs_emptying_the_subnets_of_the_settings(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'subnets = ["subnet-1"]\nsecurity_groups = ["sg-1"]\n'
        "[ecs.run_task_kwargs.networkConfiguration.awsvpcConfiguration]\nsubnets = []\n",
    )
    (line,) = _refused(config, _environ(tmp_path))
    assert line.startswith(
        f"ecs.security_groups (from file:{config}) given without "
        "ecs.run_task_kwargs.networkConfiguration.awsvpcConfiguration.subnets "
        f"(from file:{config})"
    )


def test_every_contradiction_is_reported_at_once(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'launch_type = "FARGATE"\ncapacity_provider_strategy = [{capacityProvider = "FARGATE"}]\n'
        'security_groups = ["sg-1"]\n'
        '[ecs.run_task_kwargs.overrides]\ncpu = "256"\nmemory = "4096"\n',
    )
    lines = _refused(config, _environ(tmp_path))
    assert [line.split(" ", 1)[0] for line in lines] == [
        "ecs.launch_type",
        "ecs.security_groups",
        "ecs.run_task_kwargs.overrides.cpu",
    ]


def test_fargate_task_size_from_file_and_env(tmp_path: Path) -> None:
    config = _toml(tmp_path, '[ecs.run_task_kwargs.overrides]\ncpu = "256"\n')
    env = _environ(tmp_path, RUN_TASK_KWARGS='{"overrides": {"memory": "4096"}}')
    (line,) = _refused(config, env)
    assert line == (
        f"ecs.run_task_kwargs.overrides.cpu (from file:{config}) and "
        "ecs.run_task_kwargs.overrides.memory (from env:ORCHESTRATOR__ECS__RUN_TASK_KWARGS) ask "
        "for a Fargate task of 256 CPU units with 4096 MiB, a task size Fargate does not offer: "
        "with 256 CPU units, task memory is one of 512, 1024, 2048 MiB"
    )


@pytest.mark.parametrize(
    "extra",
    [
        'launch_type = "EC2"\n',  # not Fargate: any task size EC2 instances have room for
        'capacity_provider_strategy = [{capacityProvider = "my-asg"}]\n',
    ],
)
def test_a_task_size_fargate_lacks_is_fine_off_fargate(tmp_path: Path, extra: str) -> None:
    config = _toml(
        tmp_path, extra + '[ecs.run_task_kwargs.overrides]\ncpu = "256"\nmemory = "4096"\n'
    )
    loaded = settings.load(config, _environ(tmp_path))
    assert loaded.settings.ecs.run_task_kwargs == {"overrides": {"cpu": "256", "memory": "4096"}}


def test_fargate_spot_strategy_is_fargate(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'capacity_provider_strategy = [{capacityProvider = "FARGATE_SPOT"}]\n'
        '[ecs.run_task_kwargs.overrides]\ncpu = "256"\nmemory = "4096"\n',
    )
    (line,) = _refused(config, _environ(tmp_path))
    assert "a task size Fargate does not offer" in line


def test_consistent_settings_load(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'capacity_provider_strategy = [{capacityProvider = "FARGATE_SPOT"}]\n'
        'subnets = ["subnet-1"]\nsecurity_groups = ["sg-1"]\nassign_public_ip = true\n'
        '[ecs.run_task_kwargs.overrides]\ncpu = "1 vCPU"\nmemory = "8 GB"\n',
    )
    loaded = settings.load(config, _environ(tmp_path))
    assert loaded.settings.ecs.launch_type is None


def test_a_strategy_in_run_task_kwargs_replaces_the_default_launch_type(tmp_path: Path) -> None:
    """The default FARGATE is no contradiction: only a launch type someone set is."""
    env = _environ(
        tmp_path, RUN_TASK_KWARGS='{"capacityProviderStrategy": [{"capacityProvider": "FARGATE"}]}'
    )
    assert settings.load(_toml(tmp_path), env).settings.ecs.launch_type is None


def test_a_disabled_section_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "o.toml"
    path.write_text(
        '[ecs]\nlaunch_type = "EC2"\ncapacity_provider_strategy = [{capacityProvider = "x"}]\n'
    )
    assert settings.load(path, _environ(tmp_path)).settings.ecs.enabled is False


def test_both_spellings_in_run_task_kwargs_are_refused_at_load(tmp_path: Path) -> None:
    config = _toml(tmp_path, '[ecs.run_task_kwargs]\nlaunchType = "EC2"\nlaunch_type = "EC2"\n')
    (line,) = _refused(config, _environ(tmp_path))
    assert line.startswith(f"ecs.run_task_kwargs.launchType (from file:{config}): given both")


def test_the_model_itself_refuses_a_contradiction() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        EcsSettings(**ECS_REQUIRED, launch_type="EC2", capacity_provider_strategy=SPOT)
    (error,) = info.value.errors()
    assert error["type"] == settings.CONTRADICTION
    assert error["msg"].startswith(
        "ecs.launch_type and ecs.capacity_provider_strategy contradict each other"
    )


def test_a_key_inside_a_json_variable_is_sourced_to_that_variable(tmp_path: Path) -> None:
    loaded = settings.load(
        None, _environ(tmp_path, RUN_TASK_KWARGS='{"propagateTags": "TASK_DEFINITION"}')
    )
    assert loaded.source_of("ecs.run_task_kwargs.propagateTags") == (
        "env:ORCHESTRATOR__ECS__RUN_TASK_KWARGS"
    )


# -- the Fargate task sizes --------------------------------------------------------------------

# Every CPU size with its smallest and largest memory and its step, as the AWS page lists them.
SIZES = [
    (256, 512, 2048, None),  # 512, 1024, 2048: no single step
    (512, 1024, 4096, 1024),
    (1024, 2048, 8192, 1024),
    (2048, 4096, 16384, 1024),
    (4096, 8192, 30720, 1024),
    (8192, 16384, 61440, 4096),
    (16384, 32768, 122880, 8192),
]


def _fargate(cpu: str, memory: str, **extra: Any) -> list[aws_kwargs.Conflict]:
    kwargs = {"launchType": "FARGATE", "overrides": {"cpu": cpu, "memory": memory}, **extra}
    return aws_kwargs.run_task_conflicts(kwargs)


def _valid_pairs() -> list[tuple[int, int]]:
    pairs = [(256, 512), (256, 1024), (256, 2048)]
    for cpu, low, high, step in SIZES[1:]:
        assert step is not None
        pairs += [(cpu, low), (cpu, low + step), (cpu, high - step), (cpu, high)]
    return pairs


def _invalid_pairs() -> list[tuple[int, int]]:
    pairs = [(256, 256), (256, 1536), (256, 3072), (256, 4096)]
    for cpu, low, high, step in SIZES[1:]:
        assert step is not None
        pairs += [(cpu, low - step), (cpu, high + step), (cpu, low + step // 2)]
    return [*pairs, (8192, 16384 + 1024), (16384, 32768 + 4096)]  # off the 4 GB / 8 GB steps


@pytest.mark.parametrize(("cpu", "memory"), _valid_pairs())
def test_fargate_accepts_the_documented_sizes_up_to_their_bounds(cpu: int, memory: int) -> None:
    assert _fargate(str(cpu), str(memory)) == []


@pytest.mark.parametrize(("cpu", "memory"), _invalid_pairs())
def test_fargate_refuses_sizes_past_the_bounds_and_off_the_steps(cpu: int, memory: int) -> None:
    (conflict,) = _fargate(str(cpu), str(memory))
    assert conflict.fields == ("overrides.cpu", "overrides.memory")
    message = conflict.describe(str)
    assert f"a Fargate task of {cpu} CPU units with {memory} MiB" in message
    valid = message.rpartition("task memory is one of ")[2].removesuffix(" MiB")
    listed = [int(v) for v in valid.split(", ")]
    assert memory not in listed
    low, high, step = next((lo, hi, st) for c, lo, hi, st in SIZES if c == cpu)
    assert listed == ([512, 1024, 2048] if step is None else list(range(low, high + 1, step)))


def test_the_table_has_every_documented_size_and_no_other() -> None:
    valid = {
        (cpu, memory)
        for cpu in (128, 256, 512, 1024, 2048, 3072, 4096, 8192, 16384, 32768)
        for memory in range(256, 131072 + 1, 256)
        if not _fargate(str(cpu), str(memory))
    }
    assert len(valid) == 3 + 4 + 7 + 13 + 23 + 12 + 12
    assert {cpu for cpu, _ in valid} == {256, 512, 1024, 2048, 4096, 8192, 16384}


@pytest.mark.parametrize("cpu", ["128", "3072", "32768"])
def test_a_cpu_size_fargate_lacks_lists_the_sizes(cpu: str) -> None:
    (conflict,) = _fargate(cpu, "8192")
    assert conflict.describe(str).endswith(
        f"Fargate has no task of {cpu} CPU units (task CPU units are one of 256, 512, 1024, "
        "2048, 4096, 8192, 16384)"
    )


@pytest.mark.parametrize(
    ("cpu", "memory", "ok"),
    [
        ("0.25 vCPU", "0.5 GB", True),
        (".25 vcpu", "2GB", True),
        (".5 vCPU", "0.5 GB", False),
        ("lots", "2 GB", True),  # not a spelling read here: left to AWS
        ("1 vCPU", "2 GB", True),
        ("1 vCPU", "1 GB", False),
        ("2 vcpu", "16 GB", True),
        ("4 vCPU", "31 GB", False),
        ("1024", "9216", False),
        ("1024", "8192 MiB", True),
    ],
)
def test_task_sizes_in_vcpus_and_gb(cpu: str, memory: str, ok: bool) -> None:
    assert (_fargate(cpu, memory) == []) is ok


@pytest.mark.parametrize(
    "extra",
    [
        {"launchType": "EC2"},
        {"launchType": "EXTERNAL"},
        {"launchType": None, "capacityProviderStrategy": [{"capacityProvider": "my-asg"}]},
    ],
)
def test_task_sizes_are_not_checked_off_fargate(extra: dict[str, Any]) -> None:
    assert _fargate("256", "4096", **extra) == []


def test_only_a_pair_is_checked() -> None:
    """With only one of cpu and memory, the other is the task definition's, unseen here."""
    for overrides in ({"cpu": "256"}, {"memory": "123456"}):
        kwargs = {"launchType": "FARGATE", "overrides": overrides}
        assert aws_kwargs.run_task_conflicts(kwargs) == []


# -- per job, at submit ------------------------------------------------------------------------


def _job(overrides: dict[str, Any], backend: str = "ecs") -> models.Job:
    spec = models.JobSpec(command=["x"], overrides=overrides)
    return aws_kwargs.probe_job(spec, backend)


@pytest.fixture
async def make_ecs() -> AsyncIterator[Any]:
    started: list[EcsBackend] = []

    async def make(**overrides: Any) -> EcsBackend:
        values = {**ECS_REQUIRED, "subnets": ["subnet-1"], "security_groups": ["sg-1"]}
        backend = EcsBackend(EcsSettings(**{**values, **overrides}), TokenBucket("l", 10, 10))
        await backend.start()  # loads botocore's model; no request is sent
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.close()


def _invalid(backend: EcsBackend | BatchBackend, overrides: dict[str, Any]) -> errors.InvalidJob:
    with pytest.raises(errors.InvalidJob) as info:
        backend.validate(models.JobSpec(command=["x"], overrides=overrides))
    return info.value


async def test_a_job_launch_type_against_the_settings_strategy(make_ecs: Any) -> None:
    backend = await make_ecs(capacity_provider_strategy=SPOT)
    error = _invalid(backend, {"launch_type": "FARGATE"})
    assert error.path == "launchType"
    assert error.message == (
        "launchType: launchType (from the job's overrides) and capacityProviderStrategy "
        "(from ecs.capacity_provider_strategy) contradict each other: RunTask takes a launch "
        "type or a capacity provider strategy, not both"
    )


async def test_a_job_strategy_against_the_settings_launch_type(make_ecs: Any) -> None:
    backend = await make_ecs(launch_type="EC2")
    error = _invalid(backend, {"capacityProviderStrategy": SPOT})
    assert error.path == "capacityProviderStrategy"
    assert "launchType (from ecs.launch_type) and capacityProviderStrategy (from the job's" in (
        error.message
    )


async def test_a_job_strategy_against_run_task_kwargs(make_ecs: Any) -> None:
    backend = await make_ecs(run_task_kwargs={"launchType": "FARGATE"})
    error = _invalid(backend, {"capacityProviderStrategy": SPOT})
    assert "launchType (from ecs.run_task_kwargs)" in error.message


async def test_a_job_strategy_replaces_the_default_launch_type(make_ecs: Any) -> None:
    backend = await make_ecs()
    kwargs = backend.run_task_kwargs(_job({"capacityProviderStrategy": SPOT}))
    assert "launchType" not in kwargs
    assert (kwargs["capacityProviderStrategy"], kwargs["platformVersion"]) == (SPOT, "LATEST")
    assert backend.run_task_kwargs(_job({}))["launchType"] == "FARGATE"


async def test_a_job_on_ec2_gets_no_platform_version(make_ecs: Any) -> None:
    backend = await make_ecs(platform_version="1.4.0")
    kwargs = backend.run_task_kwargs(_job({"launchType": "EC2"}))
    assert kwargs["launchType"] == "EC2"
    assert "platformVersion" not in kwargs
    assert backend.run_task_kwargs(_job({}))["platformVersion"] == "1.4.0"


async def test_a_job_emptying_the_subnets(make_ecs: Any) -> None:
    backend = await make_ecs()
    error = _invalid(backend, {"networkConfiguration": {"awsvpcConfiguration": {"subnets": []}}})
    assert error.path == "networkConfiguration.awsvpcConfiguration.subnets"
    assert error.message.endswith(
        "networkConfiguration.awsvpcConfiguration.securityGroups (from ecs.security_groups) "
        "given without networkConfiguration.awsvpcConfiguration.subnets (from the job's "
        "overrides): an awsvpc network configuration needs subnets, and every RunTask would go "
        "out with `subnets: []`"
    )


async def test_a_job_asking_for_a_public_ip_without_subnets(make_ecs: Any) -> None:
    backend = await make_ecs(subnets=[], security_groups=[])
    error = _invalid(
        backend, {"networkConfiguration": {"awsvpcConfiguration": {"assignPublicIp": "ENABLED"}}}
    )
    assert error.path == "networkConfiguration.awsvpcConfiguration.assignPublicIp"
    assert "given without networkConfiguration.awsvpcConfiguration.subnets (from ecs.subnets)" in (
        error.message
    )


async def test_a_job_with_its_own_complete_network_is_fine(make_ecs: Any) -> None:
    backend = await make_ecs(subnets=[], security_groups=[])
    network = {"awsvpcConfiguration": {"subnets": ["s-9"], "assignPublicIp": "ENABLED"}}
    kwargs = backend.run_task_kwargs(_job({"networkConfiguration": network}))
    assert kwargs["networkConfiguration"] == network


async def test_a_job_task_size_fargate_lacks(make_ecs: Any) -> None:
    backend = await make_ecs(run_task_kwargs={"overrides": {"cpu": "512"}})
    error = _invalid(backend, {"overrides": {"memory": "5120"}})
    assert error.path == "overrides.memory"
    assert error.message == (
        "overrides.memory: overrides.cpu (from ecs.run_task_kwargs) and overrides.memory (from "
        "the job's overrides) ask for a Fargate task of 512 CPU units with 5120 MiB, a task size "
        "Fargate does not offer: with 512 CPU units, task memory is one of 1024, 2048, 3072, "
        "4096 MiB"
    )
    kwargs = backend.run_task_kwargs(_job({"overrides": {"memory": "4096"}}))
    assert (kwargs["overrides"]["cpu"], kwargs["overrides"]["memory"]) == ("512", "4096")


async def test_a_job_task_size_on_ec2_is_not_checked(make_ecs: Any) -> None:
    backend = await make_ecs(launch_type="EC2")
    kwargs = backend.run_task_kwargs(_job({"overrides": {"cpu": "256", "memory": "4096"}}))
    assert kwargs["overrides"]["memory"] == "4096"


async def test_the_backend_refuses_unvalidated_contradictory_settings_at_start() -> None:
    """Settings built without validation (as no caller does) still stop the backend."""
    values = {**ECS_REQUIRED, "launch_type": "EC2", "capacity_provider_strategy": SPOT}
    s = EcsSettings.model_construct(**{**dict(EcsSettings()), **values})
    backend = EcsBackend(s, TokenBucket("l", 10, 10))
    try:
        with pytest.raises(errors.ConfigError, match="ecs settings / run_task_kwargs: launchType"):
            await backend.start()
    finally:
        await backend.close()


@pytest.mark.parametrize("key", ["launchType", "networkConfiguration", "capacityProviderStrategy"])
async def test_batch_has_no_such_fields_and_refuses_them(key: str) -> None:
    """SubmitJob takes no launch type, strategy or network: botocore's model refuses them, in
    `submit_job_kwargs` at start and in a job's overrides at submit."""
    values: dict[str, Any] = {
        "enabled": True,
        "job_queue": "q",
        "job_definition": "jd:1",
        "region_name": "us-east-1",
        "check_health_on_startup": False,
    }
    backend = BatchBackend(
        BatchSettings(**values, submit_job_kwargs={key: "x"}), TokenBucket("l", 10, 10)
    )
    try:
        with pytest.raises(errors.ConfigError, match=f"batch settings / submit_job_kwargs: {key}"):
            await backend.start()
    finally:
        await backend.close()
    backend = BatchBackend(BatchSettings(**values), TokenBucket("l", 10, 10))
    await backend.start()
    try:
        assert _invalid(backend, {key: "x"}).path == key
    finally:
        await backend.close()
