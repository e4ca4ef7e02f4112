"""The socket wire format: one JSON object per line each way. Pure: no I/O here.

A request is `{"v": 1, "id": <string|int>, "op": "<name>", ...params}`. Every reply line carries
the request's `id` and `"ok"`; an error reply adds a stable `code` and a human `message`.
Streaming operations (`watch`, `logs`, `wait`) send any number of `ok` lines and finish with one
that has `"end": true`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
import pydantic
from pydantic_core import PydanticCustomError

from orchestrator import errors, models

VERSION = 1
RequestId = str | int | None
_JobId = Annotated[str, pydantic.Field(min_length=1, max_length=128)]


class Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)


class Ping(Params):
    pass


class Shutdown(Params):
    """Stop the daemon serving this socket, as SIGTERM does (admins only)."""


class Submit(Params):
    job: models.JobSpec


class SubmitMany(Params):
    """Many job specs in one request; each is validated on its own, so one bad spec fails
    alone (its result carries the error, the others are accepted)."""

    jobs: Annotated[list[Any], pydantic.Field(min_length=1, max_length=10_000)]


class Get(Params):
    job_id: _JobId
    history: bool = False


class ListJobs(Params):
    """One page of jobs, newest first. `limit` above `MAX_PAGE` is served `MAX_PAGE` at a
    time: the reply's `next_cursor` (null on the last page) is the next request's `cursor`."""

    state: list[models.JobState] | None = None
    backend: str | None = None
    limit: Annotated[int, pydantic.Field(ge=1, le=100_000)] = 100
    cursor: _JobId | None = None
    name: Annotated[str, pydantic.Field(min_length=1, max_length=256)] | None = None  # a glob
    since: Annotated[float, pydantic.Field(allow_inf_nan=False)] | None = None  # Unix time
    labels: dict[str, str] | None = None  # jobs with every one of these
    target: Annotated[str, pydantic.Field(min_length=1, max_length=64)] | None = None
    # The children of this array job (ECS, local) instead: a listing leaves them out otherwise
    parent: _JobId | None = None

    @pydantic.field_validator("since", mode="before")
    @classmethod
    def _int_is_a_time_too(cls, value: object) -> object:
        return models._whole_seconds(value)

    @pydantic.field_validator("state", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        # strict mode wants enum members; the wire carries their names.
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [_state_or_raw(v) for v in value]
        return value


def _state_or_raw(value: object) -> object:
    try:
        return models.JobState(str(value)) if isinstance(value, str) else value
    except ValueError:
        return value  # let validation name it


class Cancel(Params):
    job_id: _JobId


class Wait(Params):
    job_id: _JobId


class Watch(Params):
    job_id: _JobId | None = None
    # Resume: the events committed after the one numbered so (an event's `seq`) are sent
    # first, from the store, then the live ones (a client that lost its connection).
    since: Annotated[int, pydantic.Field(ge=0)] | None = None


# Where a reader of a job's logs is (a `cursor` reply field, sent back to read on): the local
# backend's byte offsets per stream, or a CloudWatch forward token.
_LogCursor = (
    dict[Literal["stdout", "stderr"], Annotated[int, pydantic.Field(ge=0)]]
    | Annotated[str, pydantic.Field(min_length=1, max_length=4096)]
)


class Logs(Params):
    job_id: _JobId
    follow: bool = False
    # Resume after the last page read: its `cursor`, of the attempt it belongs to.
    cursor: _LogCursor | None = None
    attempt: Annotated[int, pydantic.Field(ge=0)] | None = pydantic.Field(
        default=None, validate_default=True
    )

    @pydantic.field_validator("cursor")
    @classmethod
    def _both_streams(cls, cursor: object) -> object:
        if isinstance(cursor, dict) and set(cursor) != {"stdout", "stderr"}:
            raise PydanticCustomError("cursor", "a local cursor has both stdout and stderr")
        return cursor

    @pydantic.field_validator("attempt")
    @classmethod
    def _with_its_cursor(cls, attempt: int | None, info: pydantic.ValidationInfo) -> int | None:
        if "cursor" in info.data and (info.data["cursor"] is None) != (attempt is None):
            raise PydanticCustomError("attempt", "goes with cursor: both or neither")
        return attempt


class Top(Params):
    """A snapshot of the daemon for `orchestrator top`: counts, the unfinished jobs (or those
    in `state`), the last failures, AWS calls and buckets, health. `backend` narrows the job
    lists; `limit` caps the jobs, `failures` the failed ones."""

    state: list[models.JobState] | None = None
    backend: str | None = None
    limit: Annotated[int, pydantic.Field(ge=1, le=500)] = 50
    failures: Annotated[int, pydantic.Field(ge=0, le=100)] = 10

    @pydantic.field_validator("state", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return ListJobs._one_or_many(value)


OPS: dict[str, type[Params]] = {
    "ping": Ping,
    "shutdown": Shutdown,
    "submit": Submit,
    "submit_many": SubmitMany,
    "get": Get,
    "list": ListJobs,
    "cancel": Cancel,
    "wait": Wait,
    "watch": Watch,
    "logs": Logs,
    "top": Top,
}
STREAMING = frozenset({"wait", "watch", "logs"})
MAX_PAGE = 1000  # jobs in one `list` reply: a reply is built whole, so its size is capped


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    op: str
    params: Params


def decode(line: bytes) -> Request:
    """Parse one request line; raise `errors.BadRequest` saying exactly what is wrong."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(None, errors.InvalidJson(f"invalid JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise errors.BadRequest(None, errors.InvalidRequest("a request must be a JSON object"))

    raw_id = data.pop("id", None)
    request_id: RequestId = (
        raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    )
    if raw_id is not None and request_id is None:
        raise errors.BadRequest(None, errors.InvalidRequest("id: must be a string or an integer"))

    version = data.pop("v", VERSION)
    if type(version) is not int or version != VERSION:  # True == 1, 1.0 == 1: not versions
        raise errors.BadRequest(
            request_id,
            errors.UnsupportedVersion(
                f"protocol version {version!r} is not supported (this daemon speaks v{VERSION})"
            ),
        )
    op = data.pop("op", None)
    if not isinstance(op, str):
        raise errors.BadRequest(
            request_id, errors.InvalidRequest('op: required, a string such as "submit"')
        )
    params_model = OPS.get(op)
    if params_model is None:
        raise errors.BadRequest(request_id, errors.UnknownOperation(op))
    try:
        params = params_model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise errors.BadRequest(request_id, _invalid(exc)) from None
    return Request(id=request_id, op=op, params=params)


def _invalid(
    exc: pydantic.ValidationError, prefix: tuple[int | str, ...] = ()
) -> errors.InvalidRequest:
    problems = []
    for error in exc.errors(include_url=False):
        path = _path((*prefix, *error["loc"]))
        if error["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown field")
        elif error["type"] == "missing":
            problems.append(f"{path}: required")
        else:
            problems.append(f"{path}: {error['msg']}")
    return errors.InvalidRequest("; ".join(problems))


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part, after in zip(loc, (*loc[1:], None), strict=True):
        if isinstance(part, int):
            out += f"[{part}]"
        elif after == "[key]":  # the key itself is wrong, not its value: job.env['A=B']
            out += f"[{part!r}]"
        elif part != "[key]":
            out += f".{part}" if out else part
    return out or "request"


def job_spec(value: Any, path: tuple[int | str, ...]) -> models.JobSpec:
    """Validate one job spec of a `submit_many`; errors name the field (`job.command`)."""
    try:
        return models.JobSpec.model_validate(value)
    except pydantic.ValidationError as exc:
        raise _invalid(exc, path) from None


def reply(request_id: RequestId, **fields: Any) -> bytes:
    return _line({"v": VERSION, "id": request_id, "ok": True, **fields})


def end(request_id: RequestId, **fields: Any) -> bytes:
    return _line({"v": VERSION, "id": request_id, "ok": True, "end": True, **fields})


def error(request_id: RequestId, code: str, message: str, **fields: Any) -> bytes:
    return _line(
        {"v": VERSION, "id": request_id, "ok": False, "code": code, "message": message, **fields}
    )


def request(op: str, request_id: RequestId, **params: Any) -> bytes:
    return _line({"v": VERSION, "id": request_id, "op": op, **params})


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def parse_reply(line: bytes) -> dict[str, Any]:
    """Client side: one reply line as a dict (raises `ProtocolError` if it is not one)."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise errors.ProtocolError(f"daemon sent invalid JSON: {exc}") from None
    if not isinstance(data, dict) or "ok" not in data:
        raise errors.ProtocolError("daemon sent a line that is not a reply")
    return data
