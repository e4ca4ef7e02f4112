"""The kwargs of AWS calls: built from settings, the job and its overrides, checked before any
call.

- `normalise`: snake_case keys of structures renamed to the model's camelCase once, here.
- `validate`: kwargs checked against botocore's own service model; the first bad path is named
  in an `InvalidJob`.
- `merge_kwargs`: settings < backend kwargs < the job's command and env < its overrides.
- `probe_job`: a stand-in job to build a spec's kwargs before the spec is accepted.
- `ecs_base_kwargs`, `ecs_defaults`: the RunTask kwargs the `ecs` settings give, and the
  defaults applied once everything is merged (FARGATE unless a strategy is given).
- `run_task_conflicts`: fields of merged RunTask kwargs that AWS refuses together (a launch type
  with a capacity provider strategy; an awsvpc configuration without subnets; a Fargate task
  size that does not exist). Settings load refuses them naming the settings and their sources;
  `refuse_run_task_conflicts` refuses a job's, naming the field and where it came from.

Pure: no client, no I/O (the operation models come from a started `aws_api.AwsApi`, or for
settings from botocore's own data files, `run_task_operation`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.model import OperationModel, Shape
from botocore.validate import ParamValidator

from orchestrator import errors, models

if TYPE_CHECKING:
    from orchestrator.settings import EcsSettings


def probe_job(spec: models.JobSpec, backend: str) -> models.Job:
    """A stand-in job for `spec`, to build and validate API kwargs before it is accepted."""
    return models.Job(
        id="0" * 26,
        spec=spec,
        backend=backend,
        state=models.JobState.QUEUED,
        created_at=0.0,
        updated_at=0.0,
        state_times={},
        attempt=1,
    )


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def normalise(value: Any, shape: Shape, path: str = "") -> Any:
    """Rename snake_case keys of structures to the model's camelCase member names, recursively.
    Keys of maps (tags, parameters) are user data and stay as they are. Both spellings of one
    member is an error naming the path."""
    if shape.type_name == "structure" and isinstance(value, Mapping):
        members = shape.members
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = key if key in members else _camel(key) if _camel(key) in members else key
            if name in out:
                raise errors.InvalidJob(f"given both as {name!r} and {key!r}", f"{path}{name}")
            member = members.get(name)
            out[name] = item if member is None else normalise(item, member, f"{path}{name}.")
        return out
    if shape.type_name == "list" and isinstance(value, list):
        member = shape.member
        return [normalise(v, member, f"{path.rstrip('.')}[{i}].") for i, v in enumerate(value)]
    if shape.type_name == "map" and isinstance(value, Mapping):
        member = shape.value
        return {k: normalise(v, member, f"{path}{k}.") for k, v in value.items()}
    return value


def prune(value: Any, shape: Shape) -> Any:
    """`value` with what `shape` does not take left out, recursively (and None values): a
    definition as a describe call returns it, made registration kwargs."""
    if shape.type_name == "structure" and isinstance(value, Mapping):
        members = shape.members
        return {
            key: prune(item, members[key])
            for key, item in value.items()
            if key in members and item is not None
        }
    if shape.type_name == "list" and isinstance(value, list):
        return [prune(item, shape.member) for item in value]
    if shape.type_name == "map" and isinstance(value, Mapping):
        return {key: prune(item, shape.value) for key, item in value.items()}
    return value


def validate(kwargs: Mapping[str, Any], operation: OperationModel) -> None:
    """Raise `InvalidJob` naming the first bad path if botocore would refuse `kwargs`."""
    report = ParamValidator().validate(dict(kwargs), operation.input_shape)
    if not report.has_errors():
        return
    kind, name, extra = report._errors[0]  # botocore keeps the structured errors here
    path = name.lstrip(".")
    if kind == "unknown field":
        path = f"{path}.{extra['unknown_param']}".lstrip(".")
    raise errors.InvalidJob(
        f"{operation.name} would be refused: {report.generate_report().splitlines()[0]}", path
    )


def merge_kwargs(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` merged recursively into `base`. Lists replace, except lists of objects with a
    `name` (container overrides, environment) which merge item by item on that name."""
    out = dict(base)
    for key, value in over.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = merge_kwargs(current, value)
        elif isinstance(current, list) and _named_list(value) and _named_list(current):
            merged = {item["name"]: item for item in current}
            for item in value:
                old = merged.get(item["name"])
                merged[item["name"]] = merge_kwargs(old, item) if old is not None else item
            out[key] = list(merged.values())
        else:
            out[key] = value
    return out


def _named_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, Mapping) and "name" in item for item in value)
    )


def environment(env: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in env.items()]


# -- ECS: the settings' kwargs, the defaults, and what AWS refuses together -------------------

LAUNCH_TYPE = "launchType"
STRATEGY = "capacityProviderStrategy"
AWSVPC = "networkConfiguration.awsvpcConfiguration"
SUBNETS = f"{AWSVPC}.subnets"
SECURITY_GROUPS = f"{AWSVPC}.securityGroups"
ASSIGN_PUBLIC_IP = f"{AWSVPC}.assignPublicIp"
TASK_CPU = "overrides.cpu"
TASK_MEMORY = "overrides.memory"

# The RunTask field → the `ecs.*` setting it is built from (see `ecs_settings_kwargs`).
ECS_SETTING_OF: Mapping[str, str] = {
    "cluster": "cluster",
    "taskDefinition": "task_definition",
    LAUNCH_TYPE: "launch_type",
    STRATEGY: "capacity_provider_strategy",
    "platformVersion": "platform_version",
    SUBNETS: "subnets",
    SECURITY_GROUPS: "security_groups",
    ASSIGN_PUBLIC_IP: "assign_public_ip",
}

# Fargate task sizes: task CPU units → the task memory (MiB) Fargate accepts with them. From the
# AWS ECS documentation, "Troubleshoot Amazon ECS task definition invalid CPU or memory errors"
# (https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-cpu-memory-error.html, the
# same table as "Task size" in the task definition parameters): 256 CPU units → 512 MiB, 1 GB,
# 2 GB; 512 → 1 to 4 GB, 1024 → 2 to 8 GB, 2048 → 4 to 16 GB, 4096 → 8 to 30 GB, in 1 GB steps;
# 8192 → 16 to 60 GB in 4 GB steps; 16384 → 32 to 120 GB in 8 GB steps (these two need Linux
# platform version 1.4.0 or later).
FARGATE_TASK_SIZES: Mapping[int, tuple[int, ...]] = {
    256: (512, 1024, 2048),
    512: tuple(range(1024, 4096 + 1, 1024)),
    1024: tuple(range(2048, 8192 + 1, 1024)),
    2048: tuple(range(4096, 16384 + 1, 1024)),
    4096: tuple(range(8192, 30720 + 1, 1024)),
    8192: tuple(range(16384, 61440 + 1, 4096)),
    16384: tuple(range(32768, 122880 + 1, 8192)),
}
FARGATE_CAPACITY_PROVIDERS = frozenset({"FARGATE", "FARGATE_SPOT"})


@functools.cache
def run_task_operation() -> OperationModel:
    """botocore's model of ECS RunTask from its own data files (no client, no credentials): for
    checking settings before any backend is started."""
    import botocore.session

    return botocore.session.get_session().get_service_model("ecs").operation_model("RunTask")


def ecs_settings_kwargs(settings: EcsSettings) -> dict[str, Any]:
    """The RunTask kwargs the `ecs` settings give, before `run_task_kwargs` and the defaults.
    No launch type unless one is set: the default FARGATE yields to a capacity provider strategy
    given anywhere (settings, `run_task_kwargs`, a job's overrides)."""
    kwargs: dict[str, Any] = {
        "cluster": settings.cluster,
        "taskDefinition": settings.task_definition,
        "count": 1,
    }
    if settings.launch_type:
        kwargs[LAUNCH_TYPE] = settings.launch_type
    if settings.capacity_provider_strategy:
        kwargs[STRATEGY] = settings.capacity_provider_strategy
    if settings.subnets or settings.security_groups or settings.assign_public_ip:
        kwargs["networkConfiguration"] = {
            "awsvpcConfiguration": {
                "subnets": settings.subnets,
                "securityGroups": settings.security_groups,
                "assignPublicIp": "ENABLED" if settings.assign_public_ip else "DISABLED",
            }
        }
    return kwargs


def ecs_base_kwargs(settings: EcsSettings, shape: Shape) -> dict[str, Any]:
    """The settings' kwargs with `run_task_kwargs` merged over, both normalised."""
    return merge_kwargs(
        normalise(ecs_settings_kwargs(settings), shape),
        normalise(settings.run_task_kwargs, shape),
    )


def ecs_defaults(kwargs: Mapping[str, Any], platform_version: str) -> dict[str, Any]:
    """Fully merged RunTask kwargs with the defaults: launch type FARGATE when neither a launch
    type nor a capacity provider strategy is given, and `platform_version` unless the launch
    type is EC2 or EXTERNAL (it is Fargate's)."""
    out = dict(kwargs)
    if out.get(LAUNCH_TYPE) is None and not out.get(STRATEGY):
        out[LAUNCH_TYPE] = "FARGATE"
    if out.get(LAUNCH_TYPE) not in ("EC2", "EXTERNAL"):
        out.setdefault("platformVersion", platform_version)
    return out


@dataclass(frozen=True, slots=True)
class Conflict:
    """Fields of one call's kwargs that AWS refuses together."""

    fields: tuple[str, ...]  # dotted paths in the kwargs
    template: str  # `str.format`: {0}, {1}… are the fields, as the caller names them

    def describe(self, name: Callable[[str], str]) -> str:
        return self.template.format(*(name(field) for field in self.fields))


def run_task_conflicts(kwargs: Mapping[str, Any]) -> list[Conflict]:
    """What in fully merged RunTask kwargs (`ecs_defaults` applied) AWS refuses together. Values
    of the wrong type are left to `validate`."""
    out: list[Conflict] = []
    strategy = kwargs.get(STRATEGY)
    if kwargs.get(LAUNCH_TYPE) is not None and isinstance(strategy, list) and strategy:
        out.append(
            Conflict(
                (LAUNCH_TYPE, STRATEGY),
                "{0} and {1} contradict each other: RunTask takes a launch type or a capacity "
                "provider strategy, not both",
            )
        )
    awsvpc = at(kwargs, AWSVPC)
    if isinstance(awsvpc, Mapping) and not awsvpc.get("subnets"):
        given = [SECURITY_GROUPS] if awsvpc.get("securityGroups") else []
        if awsvpc.get("assignPublicIp") == "ENABLED":
            given.append(ASSIGN_PUBLIC_IP)
        named = " and ".join(f"{{{i}}}" for i in range(len(given)))
        what = f"{named} given without {{{len(given)}}}" if given else "{0} empty"
        out.append(
            Conflict(
                (*given, SUBNETS),
                f"{what}: an awsvpc network configuration needs subnets, and every RunTask "
                "would go out with `subnets: []`",
            )
        )
    if (size := _fargate_size_conflict(kwargs)) is not None:
        out.append(size)
    return out


def _fargate_size_conflict(kwargs: Mapping[str, Any]) -> Conflict | None:
    overrides = kwargs.get("overrides")
    if not _on_fargate(kwargs) or not isinstance(overrides, Mapping):
        return None
    if "cpu" not in overrides or "memory" not in overrides:
        return None  # the other comes from the task definition, unseen here
    cpu, memory = _cpu_units(overrides["cpu"]), _mebibytes(overrides["memory"])
    if cpu is None or memory is None:
        return None  # a spelling not read here: AWS decides
    valid = FARGATE_TASK_SIZES.get(cpu)
    asked = f"{{0}} and {{1}} ask for a Fargate task of {cpu} CPU units with {memory} MiB"
    if valid is None:
        sizes = ", ".join(str(size) for size in FARGATE_TASK_SIZES)
        return Conflict(
            (TASK_CPU, TASK_MEMORY),
            f"{asked}: Fargate has no task of {cpu} CPU units (task CPU units are one of {sizes})",
        )
    if memory in valid:
        return None
    return Conflict(
        (TASK_CPU, TASK_MEMORY),
        f"{asked}, a task size Fargate does not offer: with {cpu} CPU units, task memory is "
        f"one of {', '.join(map(str, valid))} MiB",
    )


def _on_fargate(kwargs: Mapping[str, Any]) -> bool:
    launch_type = kwargs.get(LAUNCH_TYPE)
    if launch_type is not None:
        return bool(launch_type == "FARGATE")
    strategy = kwargs.get(STRATEGY)
    return (
        isinstance(strategy, list)
        and bool(strategy)
        and all(
            isinstance(item, Mapping) and item.get("capacityProvider") in FARGATE_CAPACITY_PROVIDERS
            for item in strategy
        )
    )


_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"


def _cpu_units(value: Any) -> int | None:
    """Task CPU as RunTask and task definitions spell it: units ("1024") or vCPUs ("1 vCPU")."""
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text.isdigit():
        return int(text)
    if match := re.fullmatch(rf"{_NUMBER}\s*vcpus?", text):
        return round(float(match.group(1)) * 1024)
    return None


def _mebibytes(value: Any) -> int | None:
    """Task memory as RunTask and task definitions spell it: MiB ("2048") or GB ("2 GB")."""
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text.isdigit():
        return int(text)
    if match := re.fullmatch(rf"{_NUMBER}\s*(gb|gib|mb|mib)", text):
        factor = 1024 if match.group(2).startswith("g") else 1
        return round(float(match.group(1)) * factor)
    return None


def _lookup(kwargs: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """Whether `kwargs` holds the field at dotted `path`, and its value (None if not)."""
    node: Any = kwargs
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def at(kwargs: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path` in `kwargs`, or None."""
    return _lookup(kwargs, path)[1]


def gives(kwargs: Mapping[str, Any], path: str) -> bool:
    """Whether `kwargs` holds the field at dotted `path`."""
    return _lookup(kwargs, path)[0]


def raw_path(data: Mapping[str, Any], path: str) -> str | None:
    """The dotted camelCase `path` as spelled in un-normalised `data` (snake_case or not), or
    None if `data` does not hold it."""
    node: Any = data
    spelled: list[str] = []
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        key = next((k for k in node if k == part or _camel(str(k)) == part), None)
        if key is None:
            return None
        spelled.append(str(key))
        node = node[key]
    return ".".join(spelled)


def refuse_run_task_conflicts(
    kwargs: Mapping[str, Any],
    job_overrides: Mapping[str, Any],
    settings: EcsSettings,
    shape: Shape,
) -> None:
    """Raise `InvalidJob` for the first conflict in a job's final RunTask kwargs, each field
    named with where it came from: the job's overrides, `run_task_kwargs` or an `ecs` setting.
    The path is the first field the job itself gave (else the first field)."""
    conflicts = run_task_conflicts(kwargs)
    if not conflicts:
        return
    conflict = conflicts[0]
    run_task_kwargs = normalise(settings.run_task_kwargs, shape)

    def name(field: str) -> str:
        if gives(job_overrides, field):
            where = "the job's overrides"
        elif gives(run_task_kwargs, field):
            where = "ecs.run_task_kwargs"
        elif field in ECS_SETTING_OF:
            where = f"ecs.{ECS_SETTING_OF[field]}"
        else:
            where = "the defaults"
        return f"{field} (from {where})"

    from_job = [field for field in conflict.fields if gives(job_overrides, field)]
    raise errors.InvalidJob(conflict.describe(name), (from_job or list(conflict.fields))[0])


def ecs_setting_key(settings: EcsSettings, field: str) -> str:
    """The dotted settings key a RunTask `field` of the settings' kwargs comes from:
    `ecs.run_task_kwargs.<as spelled there>` if that gives it, else the `ecs.*` setting."""
    spelled = raw_path(settings.run_task_kwargs, field)
    if spelled is not None:
        return f"ecs.run_task_kwargs.{spelled}"
    if field in ECS_SETTING_OF:
        return f"ecs.{ECS_SETTING_OF[field]}"
    return f"ecs.run_task_kwargs.{field}"


def ecs_settings_conflicts(settings: EcsSettings) -> list[tuple[tuple[str, ...], str]]:
    """What in the `ecs` settings (merged with `run_task_kwargs` and the defaults) AWS would
    refuse on every RunTask: each as the settings keys involved and a `str.format` template of
    the message, {0}, {1}… being those keys as the caller names them (with their sources)."""
    shape = run_task_operation().input_shape
    try:
        kwargs = ecs_defaults(ecs_base_kwargs(settings, shape), settings.platform_version)
    except errors.InvalidJob as exc:  # a key given in both spellings
        key = f"ecs.run_task_kwargs.{exc.path}" if exc.path else "ecs.run_task_kwargs"
        return [((key,), "{0}: " + _braces(str(exc.message).partition(": ")[2]))]
    return [
        (tuple(ecs_setting_key(settings, field) for field in c.fields), c.template)
        for c in run_task_conflicts(kwargs)
    ]


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
