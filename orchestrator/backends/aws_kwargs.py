"""The kwargs of AWS calls: built from settings, the job and its overrides, checked before any
call.

- `normalise`: snake_case keys of structures renamed to the model's camelCase once, here.
- `validate`: kwargs checked against botocore's own service model; the first bad path is named
  in an `InvalidJob`.
- `merge_kwargs`: settings < backend kwargs < the job's command and env < its overrides.
- `probe_job`: a stand-in job to build a spec's kwargs before the spec is accepted.

Pure: no client, no I/O (the operation models come from a started `aws_api.AwsApi`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.model import OperationModel, Shape
from botocore.validate import ParamValidator

from orchestrator import errors, models


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
