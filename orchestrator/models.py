"""Jobs, their states and the rules that connect them.

Pure data: nothing here does I/O. The store enforces these rules; everything else reads them.
"""

from __future__ import annotations

import enum
import functools
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pydantic
import pydantic_core
from pydantic_core import InitErrorDetails, PydanticCustomError

BackendName = Literal["local", "ecs", "batch"]
StopReason = Literal["cancel", "timeout", "queue_timeout"]


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"  # accepted and durable, not yet handed to a backend
    SUBMITTED = "SUBMITTED"  # the backend accepted it
    PENDING = "PENDING"  # waiting on dependencies (Batch)
    RUNNABLE = "RUNNABLE"  # waiting for capacity
    STARTING = "STARTING"  # capacity found, container starting
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"  # the backend no longer knows the job and its outcome cannot be established

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.LOST}
)
ACTIVE: frozenset[JobState] = frozenset(JobState) - TERMINAL
# Progress order of the non-terminal states; a job only ever moves forward.
_RANK: dict[JobState, int] = {
    state: rank
    for rank, state in enumerate(
        [
            JobState.QUEUED,
            JobState.SUBMITTED,
            JobState.PENDING,
            JobState.RUNNABLE,
            JobState.STARTING,
            JobState.RUNNING,
        ]
    )
}


def can_transition(old: JobState, new: JobState) -> bool:
    """Whether `old → new` is a legal move: forward, or to any terminal state, never out of one."""
    if old in TERMINAL:
        return False
    if new in TERMINAL:
        return True
    return _RANK[new] > _RANK[old]


def is_regression(old: JobState, new: JobState) -> bool:
    """A vendor reporting an earlier state than we already recorded (eventual consistency)."""
    return old not in TERMINAL and new not in TERMINAL and _RANK[new] < _RANK[old]


# A label's key and value, as AWS tags allow them (letters, digits, spaces and _ . : / = + - @);
# `orchestrator:` keys are the daemon's own.
_LABEL_KEY = re.compile(r"[\w.:/=+\-@ ]{1,128}")
_LABEL_VALUE = re.compile(r"[\w.:/=+\-@ ]{0,256}")
MAX_LABELS = 40  # AWS takes 50 tags a resource: 10 kept for the daemon's and the settings'
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")


def _matching(pattern: re.Pattern[str], kind: str, allowed: str) -> Any:
    """A str validated against `pattern`, refused with `allowed` in words (not the regex)."""

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise PydanticCustomError(kind, allowed)
        return value

    return pydantic.AfterValidator(check)


_Name = Annotated[
    str,
    _matching(
        _NAME_PATTERN,
        "job_name",
        "must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ),
]
_Key = Annotated[
    str,
    _matching(
        _KEY_PATTERN,
        "idempotency_key",
        "must be 1 to 128 printable ASCII characters, without spaces",
    ),
]
# An image reference as ECS and Batch take it: [registry[:port]/]repository[:tag][@digest].
_IMAGE_PATTERN = re.compile(r"[a-z0-9][a-z0-9._\-/:@]{0,254}", re.IGNORECASE)
_Image = Annotated[
    str,
    _matching(
        _IMAGE_PATTERN,
        "image",
        "must be an image reference ([registry/]repository[:tag][@digest]): 1 to 255 "
        "letters, digits and . _ - / : @, starting with a letter or digit",
    ),
]
MAX_ARRAY_SIZE = 10_000  # AWS Batch's limit on an array job's children
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_NAMES = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:=[A-Za-z_][A-Za-z0-9_]*)*")  # joined by "="

# What the kernel lets a process be started with (execve, posix_spawn): no string may hold a
# NUL byte (Python refuses it before the call), one argument or NAME=value string may take at
# most MAX_ARG_STRLEN bytes with its terminating NUL, and all of them with their pointers at
# most `launch_limit_bytes()` — past either, the launch fails with E2BIG.
MAX_ARG_STRLEN = 131072  # Linux: 32 pages
LAUNCH_RESERVE_BYTES = 64 * 1024  # kept from a spec for what a launch adds (runner, base env)
_STACK_ARG_CAP = 6 * 1024 * 1024  # Linux: at most 3/4 of _STK_LIM, whatever the stack limit


@functools.cache  # the stack limit is the daemon's, set before it starts
def launch_limit_bytes() -> int:
    """The bytes argv and envp (strings, NULs and pointers) may take at exec on this host: a
    quarter of the stack limit (what sysconf(ARG_MAX) reports), at most 6 MiB, at least
    128 KiB — Linux's rule."""
    return max(MAX_ARG_STRLEN, min(os.sysconf("SC_ARG_MAX"), _STACK_ARG_CAP))


def launch_bytes(argv: Iterable[str], env: Mapping[str, str]) -> int:
    """What `argv` and `env` take at exec: each string's UTF-8 bytes, its NUL and its pointer.
    The local backend can compare its real launch (runner arguments, inherited environment)
    with `launch_limit_bytes()`; `JobSpec` checks the spec's own part."""
    args = list(argv)
    strings = (
        _utf8_size("".join(args)) + _utf8_size("".join(env)) + _utf8_size("".join(env.values()))
    )
    return strings + 9 * len(args) + 10 * len(env)  # NUL + 8-byte pointer each, "=" for env


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _env_string_size(name: str, value: str) -> int:
    return len(name) + 1 + _utf8_size(value) + 1  # NAME=value and its NUL


def _launch_problems(spec: JobSpec) -> list[InitErrorDetails]:
    """Each string of `spec` no process could be started with, at its own location: a NUL
    byte, a bad variable name, one string over MAX_ARG_STRLEN."""
    problems: list[InitErrorDetails] = []

    def refuse(loc: tuple[int | str, ...], kind: str, message: str, **context: int) -> None:
        error = PydanticCustomError(kind, message, context or None)
        problems.append({"type": error, "loc": loc, "input": None})

    def argument(loc: tuple[int | str, ...], value: str) -> None:
        if "\x00" in value:
            refuse(loc, "nul_byte", "must not contain a NUL byte")
        elif (size := _utf8_size(value) + 1) > MAX_ARG_STRLEN:
            refuse(loc, "argument_too_long", _TOO_LONG, size=size, limit=MAX_ARG_STRLEN)

    for index, arg in enumerate(spec.command):
        argument(("command", index), arg)
    for name, value in spec.env.items():
        if why := _bad_name(name):  # `[key]`: the name itself, as pydantic marks a dict's key
            refuse(("env", name, "[key]"), "env_name", f"the variable's name {why}")
        elif "\x00" in value:
            refuse(("env", name), "nul_byte", "must not contain a NUL byte")
        elif (size := _env_string_size(name, value)) > MAX_ARG_STRLEN:
            refuse(
                ("env", name), "argument_too_long", _TOO_LONG_ENV, size=size, limit=MAX_ARG_STRLEN
            )
    if spec.cwd is not None:
        argument(("cwd",), spec.cwd)
    if spec.default_cwd is not None:
        argument(("default_cwd",), spec.default_cwd)
    return problems


_TOO_LONG = (
    "takes {size} bytes (UTF-8, with its terminating NUL), more than the {limit} one argument "
    "of a process can take"
)
_TOO_LONG_ENV = (
    "takes {size} bytes as NAME=value (UTF-8, with its terminating NUL), more than the {limit} "
    "one environment string of a process can take"
)


def _bad_name(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if "=" in name:
        return "must not contain '='"
    if "\x00" in name:
        return "must not contain a NUL byte"
    if not _ENV_NAME.fullmatch(name):
        return "must be letters, digits and _, and not start with a digit"
    return None


# The failure classes (`failures.py`) a retry policy may name in `on`; `user` failures are
# retried by exit code (`exit_codes`), and the daemon's own verdicts and AWS's refusals never.
RETRIED_CLASSES = ("start", "infrastructure")
NEVER_RETRIED = ("rejected", "timeout", "cancelled", "lost", "dependency")
MAX_DEPENDENCIES = 100
MAX_ATTEMPTS = 100
MAX_BACKOFF_S = 3600.0


def _whole_seconds(value: object) -> object:
    """Strict mode refuses 5 for a float field; a whole number of seconds is fine."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ValueError("too large") from None
    return value


class Retry(pydantic.BaseModel):
    """A retry policy (`engine.retries` applies it): a job gets at most `attempts` attempts in
    all; one that failed is followed by another when its failure class is in `on`, or it is a
    `user` failure whose exit code is in `exit_codes`, after `backoff_s` doubled at every retry
    (jittered). A field left out is the daemon's default (`[jobs.retry]`)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)

    attempts: Annotated[int, pydantic.Field(ge=1, le=MAX_ATTEMPTS)] | None = None
    on: list[str] | None = None
    exit_codes: list[Annotated[int, pydantic.Field(ge=1, le=255)]] | None = None
    backoff_s: (
        Annotated[float, pydantic.Field(ge=0, le=MAX_BACKOFF_S, allow_inf_nan=False)] | None
    ) = None

    @pydantic.field_validator("backoff_s", mode="before")
    @classmethod
    def _int_is_a_duration_too(cls, value: object) -> object:
        return _whole_seconds(value)

    @pydantic.field_validator("on")
    @classmethod
    def _retried_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for name in value:
            if name == "user":
                raise ValueError(
                    "'user' failures are retried by exit code: list the codes in exit_codes"
                )
            if name in NEVER_RETRIED:
                raise ValueError(f"{name!r} failures are never retried")
            if name not in RETRIED_CLASSES:
                raise ValueError(
                    f"unknown failure class {name!r}: one of {', '.join(RETRIED_CLASSES)}"
                )
        return sorted(set(value))  # one spelling of one policy (idempotency compares specs)

    @pydantic.field_validator("exit_codes")
    @classmethod
    def _codes_once(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else sorted(set(value))

    def over(self, defaults: Retry) -> Retry:
        """This policy with every field it leaves out taken from `defaults`."""
        given = self.model_dump(exclude_none=True)
        return defaults.model_copy(update=given) if given else defaults


class Resources(pydantic.BaseModel):
    """What one attempt of a job needs: vCPUs, memory (MiB), GPUs. ECS: the task's `cpu`
    (1 vCPU = 1024 units) and `memory`, GPUs as the container's resource requirements (EC2
    only); Batch: the container's VCPU, MEMORY and GPU requirements; local: the memory limit of
    the attempt's cgroup (cpu and GPUs are refused there, saying why)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)

    cpu: Annotated[float, pydantic.Field(gt=0, le=1024, allow_inf_nan=False)] | None = None
    memory_mib: Annotated[int, pydantic.Field(ge=4, le=4 * 1024 * 1024)] | None = None
    gpus: Annotated[int, pydantic.Field(ge=1, le=64)] | None = None

    @pydantic.field_validator("cpu", mode="before")
    @classmethod
    def _int_is_a_count_too(cls, value: object) -> object:
        return _whole_seconds(value)  # 2 is 2.0 vCPUs as 5 is 5.0 seconds


# The built-in policy (`[jobs.retry]`'s defaults). A stored spec whose `retry` is None has this
# one: the daemon stores a policy with a job only when it differs (the common case costs
# nothing), and so a job accepted before policies existed has it too.
DEFAULT_RETRY = Retry(attempts=3, on=list(RETRIED_CLASSES), exit_codes=[], backoff_s=10.0)
_DEFAULT_RETRY_DUMP = DEFAULT_RETRY.model_dump()


class JobSpec(pydantic.BaseModel):
    """What a client asks for. Unknown fields are an error, never a silent drop."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)

    command: Annotated[
        list[Annotated[str, pydantic.Field(max_length=65536)]],
        pydantic.Field(min_length=1, max_length=4096),
    ]
    name: _Name | None = None
    backend: BackendName | None = None
    env: dict[str, str] = pydantic.Field(default_factory=dict)
    cwd: Annotated[str, pydantic.Field(min_length=1, max_length=4096)] | None = None
    # Where a local job that names no `cwd` runs (the CLI sends the caller's directory). Not
    # part of what the job is: the same idempotency key from another directory is the same
    # job. Other backends ignore it.
    default_cwd: Annotated[str, pydantic.Field(min_length=1, max_length=4096)] | None = None
    timeout_s: Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)] | None = None
    queue_timeout_s: Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)] | None = None
    idempotency_key: _Key | None = None
    overrides: dict[str, Any] = pydantic.Field(default_factory=dict)
    retry: Retry | None = None  # filled in with the daemon's defaults when accepted
    # Higher first; within a priority, first come first served; a job's wait counts too
    # (`dispatcher.priority_aging_s`), so nothing waits for ever.
    priority: Annotated[int, pydantic.Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)] = 0
    # Kept with the job (`ls --label`), and sent as ECS/Batch tags beside the daemon's own.
    labels: dict[str, str] = pydantic.Field(default_factory=dict, max_length=MAX_LABELS)
    # Jobs this one waits for (ids; at submit also unique id prefixes, unique names, or
    # `ref:NAME`, an earlier spec of the same `submit_many`: the daemon stores their ids).
    # `after`: "success" (each must have SUCCEEDED; one that ends otherwise cancels this job,
    # failure class `dependency`) or "finished" (each must have ended, however).
    depends_on: list[Annotated[str, pydantic.Field(min_length=1, max_length=256)]] = pydantic.Field(
        default_factory=list, max_length=MAX_DEPENDENCIES
    )
    after: Literal["success", "finished"] = "success"
    resources: Resources | None = None
    # A named target of its backend (`[ecs.targets.NAME]`, `[batch.targets.NAME]`): another
    # cluster, queue, definition or network, with the backend's clients and buckets.
    target: Annotated[str, pydantic.Field(min_length=1, max_length=64)] | None = None
    # The container image to run instead of the task or job definition's (ECS, Batch): the
    # backend registers a definition derived from its configured one, once per distinct
    # content (`backends.definitions`).
    image: _Image | None = None
    # Run `array_size` copies of the job, each told its index (`ORCHESTRATOR_ARRAY_INDEX`, and
    # `AWS_BATCH_JOB_ARRAY_INDEX`): Batch runs one array job; ECS and local get one child job
    # per index (`<id>:<index>`), and this job is their parent (`engine.arrays`).
    array_size: Annotated[int, pydantic.Field(ge=2, le=MAX_ARRAY_SIZE)] | None = None

    @pydantic.field_validator("labels")
    @classmethod
    def _labels_as_tags(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.fullmatch(key):
                raise ValueError(
                    f"label {key!r}: a key is 1 to 128 letters, digits, spaces or _ . : / = + - @"
                )
            if key.lower().startswith("orchestrator:") or key.lower().startswith("aws:"):
                raise ValueError(f"label {key!r}: keys starting orchestrator: or aws: are reserved")
            if not _LABEL_VALUE.fullmatch(value):
                raise ValueError(
                    f"label {key!r}: a value is at most 256 letters, digits, spaces or "
                    "_ . : / = + - @"
                )
        return labels

    @pydantic.field_validator("timeout_s", "queue_timeout_s", mode="before")
    @classmethod
    def _int_is_a_duration_too(cls, value: object) -> object:
        return _whole_seconds(value)

    @pydantic.model_validator(mode="after")
    def _launchable(self) -> JobSpec:
        """What no process could be started with (posix_spawn raises ValueError on a NUL byte,
        execve fails with E2BIG) is refused now, not at launch, on every backend. Each field's
        strings are looked at together first (this runs for every spec submitted or read back);
        only a suspect spec is searched string by string, every culprit at its own location."""
        command, env = self.command, self.env
        cwd = self.cwd or self.default_cwd or ""  # the one a launch uses
        args, names, values = "".join(command), "=".join(env), "".join(env.values())
        args_size, values_size = _utf8_size(args), _utf8_size(values)
        if (
            "\x00" in args
            or "\x00" in values
            or "\x00" in cwd
            or "\x00" in (self.default_cwd or "")
            or (env and not _ENV_NAMES.fullmatch(names))
            or names.count("=") > max(len(env) - 1, 0)  # a name holding "=" reads as two
            or args_size >= MAX_ARG_STRLEN
            or len(names) + values_size + 2 > MAX_ARG_STRLEN
        ) and (problems := _launch_problems(self)):
            raise pydantic_core.ValidationError.from_exception_data("JobSpec", problems)
        size = args_size + 9 * len(command)  # each string: its bytes, a NUL, an 8-byte pointer
        if env:  # NAME=value: the names joined by "=" hold all but one of the "="
            size += len(names) + 1 + values_size + 9 * len(env)
        if cwd:
            size += _utf8_size(cwd) + 9
        budget = launch_limit_bytes() - LAUNCH_RESERVE_BYTES
        if size > budget:
            raise PydanticCustomError(
                "launch_too_large",
                "command, env and cwd take {size} bytes together (UTF-8, with a NUL and a "
                "pointer each), more than the {budget} a process can be started with here "
                "(the kernel's limit on arguments and environment, E2BIG, less {reserve} kept "
                "for what the launch adds)",
                {"size": size, "budget": budget, "reserve": LAUNCH_RESERVE_BYTES},
            )
        return self


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a request over the socket (SO_PEERCRED)."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] = frozenset()  # supplementary groups


@dataclass(frozen=True, slots=True)
class Job:
    """One job as the store holds it. Immutable: every change produces a new value."""

    id: str
    spec: JobSpec
    backend: str
    state: JobState
    created_at: float
    updated_at: float
    state_times: Mapping[str, float]
    attempt: int = 0  # number of the latest attempt, 0 before the first
    launching: bool = False  # an attempt is recorded but its outcome not yet stored
    token: str | None = None
    external_id: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    vendor_status: str | None = None
    stop_reason: StopReason | None = None
    peer: Peer | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name or self.id

    def entered(self, state: JobState) -> float | None:
        return self.state_times.get(state.value)

    @property
    def owner(self) -> str | None:
        """The node whose daemon runs this local job, on a PostgreSQL several daemons share
        (`info.owner`: the one that accepted it); None elsewhere."""
        found = self.info.get("owner")
        return found if isinstance(found, str) else None

    @property
    def failure(self) -> str | None:
        """The failure class of a job that ended otherwise than SUCCEEDED (`failures.py`)."""
        if not self.state.terminal or self.state == JobState.SUCCEEDED:
            return None
        found = self.info.get("failure")
        return found if isinstance(found, str) else None

    def to_dict(self) -> dict[str, Any]:
        """The job as clients see it (`status --json`)."""
        return {
            "id": self.id,
            "name": self.name,
            "backend": self.backend,
            "state": self.state.value,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "failure": self.failure,
            "vendor_status": self.vendor_status,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "state_times": {state: iso(at) for state, at in self.state_times.items()},
            "attempt": self.attempt,
            "external_id": self.external_id,
            "stop_reason": self.stop_reason,
            "idempotency_key": self.spec.idempotency_key,
            "command": self.spec.command,
            # Where it runs (local): its own cwd, else the directory it was submitted from.
            "cwd": self.spec.cwd or (self.spec.default_cwd if self.backend == "local" else None),
            "timeout_s": self.spec.timeout_s,
            "queue_timeout_s": self.spec.queue_timeout_s,
            "retry": (
                dict(_DEFAULT_RETRY_DUMP)
                if self.spec.retry is None
                else self.spec.retry.model_dump()
            ),
            "priority": self.spec.priority,
            "labels": dict(self.spec.labels),
            "depends_on": list(self.spec.depends_on),
            "after": self.spec.after,
            "resources": None if self.spec.resources is None else self.spec.resources.model_dump(),
            "target": self.spec.target,
            "image": self.spec.image,
            "array_size": self.spec.array_size,
            "peer": None if self.peer is None else {"uid": self.peer.uid, "pid": self.peer.pid},
            "info": dict(self.info),
        }


@dataclass(frozen=True, slots=True)
class Event:
    """One committed state change (from_state is None for the acceptance of a new job)."""

    job_id: str
    backend: str
    name: str
    from_state: JobState | None
    to_state: JobState
    at: float
    reason: str | None = None
    exit_code: int | None = None
    created_at: float = 0.0  # when the job was accepted (for latency metrics)
    peer_uid: int | None = None  # who submitted the job (for whom its events are), not sent
    failure: str | None = None  # the failure class of a terminal state but SUCCEEDED (or, going
    # back to QUEUED, of the attempt a retry follows)
    seq: int = 0  # its place in the store's order of events: grows with every change committed

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "job_id": self.job_id,
            "backend": self.backend,
            "name": self.name,
            "from": None if self.from_state is None else self.from_state.value,
            "to": self.to_state.value,
            "at": iso(self.at),
            "reason": self.reason,
            "exit_code": self.exit_code,
            "failure": self.failure,
        }


@functools.lru_cache(maxsize=64)  # a new job's times are all one instant, and so are a batch's
def iso(at: float) -> str:
    """A Unix timestamp as RFC 3339 UTC with milliseconds."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_DIGIT_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # every 10-bit value, 2 digits
_PAIR_SHIFTS = range(120, -10, -10)


def new_job_id(now: float | None = None) -> str:
    """A 26-character id that sorts by creation time (48-bit ms timestamp + 80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | random.getrandbits(80)  # reseeded from the OS in a forked child
    # 26 base-32 digits (130 bits, the first two zero), two at a time.
    return "".join([_DIGIT_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])
