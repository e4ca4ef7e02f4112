"""Settings: one nested model per component, and where each value came from.

Precedence, lowest first: built-in defaults < the TOML file (`--config PATH` or
`ORCHESTRATOR_CONFIG`) < environment variables `ORCHESTRATOR__SECTION__KEY`. Unknown keys and
wrong types are errors that name the key and its source; nothing is silently dropped. Settings
that contradict each other (`ecs`: a launch type with a capacity provider strategy, security
groups or a public IP without subnets, a Fargate task size AWS lacks — `aws_kwargs`) are errors
naming every key involved and the source of each.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import pydantic
import pydantic_core
import pydantic_settings
from pydantic_settings import EnvSettingsSource, NoDecode

from orchestrator import backoff, errors, models

ENV_PREFIX = "ORCHESTRATOR__"
ENV_DELIMITER = "__"
CONFIG_ENV = "ORCHESTRATOR_CONFIG"

CONTRADICTION = "contradiction"  # the pydantic error type of settings that contradict each other

_Seconds = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
_Count = Annotated[int, pydantic.Field(ge=1)]


def _comma_list(value: object) -> object:
    """Lists may come from env as `a,b,c` (or JSON); from TOML they are real lists."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return pydantic.TypeAdapter(list[Any]).validate_json(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


_IntList = Annotated[list[int], NoDecode, pydantic.BeforeValidator(_comma_list)]


def _json_object(value: object) -> object:
    """API kwargs may come from env as a JSON object."""
    if isinstance(value, str):
        return pydantic.TypeAdapter(dict[str, Any]).validate_json(value)
    return value


_StrList = Annotated[list[str], NoDecode, pydantic.BeforeValidator(_comma_list)]
_Json = Annotated[dict[str, Any], pydantic.BeforeValidator(_json_object)]
_Rate = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_default=True)


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the socket lives: systemd's RuntimeDirectory, else XDG_RUNTIME_DIR, else /tmp."""
    if runtime := environ.get("RUNTIME_DIRECTORY"):
        return Path(runtime.split(":")[0])
    if xdg := environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "orchestrator"
    return Path(tempfile.gettempdir()) / f"orchestrator-{os.getuid()}"


def default_socket_path(environ: Mapping[str, str] = os.environ) -> Path:
    """The socket when none is configured (the daemon's default, and so the client's)."""
    return runtime_dir(environ) / "orchestrator.sock"


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the journal lives: systemd's StateDirectory, else XDG_STATE_HOME, else
    ~/.local/state."""
    if state := environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    if xdg := environ.get("XDG_STATE_HOME"):
        return Path(xdg) / "orchestrator"
    return Path.home() / ".local" / "state" / "orchestrator"


def _path_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """The defaults that depend on the environment, from the environment `load` was given."""
    return {
        "server": {"socket_path": default_socket_path(environ)},
        "store": {"path": state_dir(environ) / "orchestrator.db"},
    }


class ServerSettings(_Section):
    socket_path: Path = pydantic.Field(default_factory=default_socket_path)
    max_line_bytes: Annotated[int, pydantic.Field(ge=1024)] = 1024 * 1024
    idle_timeout_s: _Seconds = 300.0
    request_timeout_s: _Seconds = 30.0
    max_connections: _Count = 256
    max_connections_per_peer: _Count = 64
    max_requests_in_flight: _Count = 1024  # per connection; pipelined submits go this wide
    allowed_uids: _IntList = pydantic.Field(default_factory=list)  # empty: own uid and root
    allowed_gids: _IntList = pydantic.Field(default_factory=list)
    # Who sees and controls every job, not only their own (as allowed_*: both empty: own uid
    # and root).
    admin_uids: _IntList = pydantic.Field(default_factory=list)
    admin_gids: _IntList = pydantic.Field(default_factory=list)
    shutdown_grace_s: _Seconds = 5.0


def without_password(url: str) -> str:
    """A database URL as logs and messages show it: its password left out."""
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1@", url)


class StoreSettings(_Section):
    path: Path = pydantic.Field(default_factory=lambda: state_dir() / "orchestrator.db")
    # A PostgreSQL database instead of the SQLite file at `path` ("postgresql://user@host/db";
    # env ORCHESTRATOR__STORE__URL). `path`'s directory still holds the local jobs' files.
    url: str | None = None

    @pydantic.field_validator("url")
    @classmethod
    def _postgresql(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or leave it out for SQLite)")
        return value or None

    @property
    def url_shown(self) -> str | None:
        """`url` as logs and messages show it: without its password."""
        return None if self.url is None else without_password(self.url)

    synchronous: Literal["NORMAL", "FULL"] = "FULL"
    retention_days: Annotated[float, pydantic.Field(ge=0)] = 30.0  # 0 keeps terminal jobs forever
    max_batch: _Count = 2048  # operations committed together in one transaction
    startup_check: Literal["quick", "full"] = "quick"  # PRAGMA quick_check or integrity_check
    # Below this much free space on the store's file system, new jobs are refused (the rest is
    # kept for the jobs already accepted) and the daemon reports itself degraded. 0: no check.
    min_free_bytes: Annotated[int, pydantic.Field(ge=0)] = 64 * 1024 * 1024


class ClusterSettings(_Section):
    """Several daemons sharing one PostgreSQL (`store.url`; issue #16): who this one is, and
    the lease that makes one of them at a time the leader for the AWS backends."""

    # This daemon's name among those sharing the database: local jobs belong to the node that
    # accepted them. Unique per daemon; default: the host's name.
    node: str = pydantic.Field(default_factory=socket.gethostname)
    # How long the leader's lease lasts unrenewed (on the database's clock): a follower takes
    # over at most this long after the leader stops renewing it. Renewed every third of it.
    lease_ttl_s: Annotated[float, pydantic.Field(ge=1.0, le=3600.0, allow_inf_nan=False)] = 10.0

    @pydantic.field_validator("node")
    @classmethod
    def _node_name(cls, value: str) -> str:
        if not value or len(value) > 128 or not value.isprintable() or value != value.strip():
            raise ValueError(
                "must be 1 to 128 printable characters, without leading or trailing spaces"
            )
        return value


class RetrySettings(_Section):
    """The retry policy of a job that does not give its own (`models.Retry` says what each
    field means and checks it)."""

    attempts: int = 3
    on: _StrList = pydantic.Field(default_factory=lambda: list(models.RETRIED_CLASSES))
    exit_codes: _IntList = pydantic.Field(default_factory=list)
    backoff_s: float = 10.0

    @pydantic.model_validator(mode="after")
    def _a_policy(self) -> RetrySettings:
        self.policy()  # models.Retry's rules and messages, for the settings too
        return self

    def policy(self) -> models.Retry:
        return models.Retry.model_validate(self.model_dump(), strict=False)


class JobDefaults(_Section):
    backend: models.BackendName = "local"
    timeout_s: _Seconds | None = None
    queue_timeout_s: _Seconds | None = None
    retry: RetrySettings = pydantic.Field(default_factory=RetrySettings)


class DispatcherSettings(_Section):
    submit_concurrency: _Count = 16  # backend.submit calls in flight at once, per backend
    max_start_attempts: _Count = 5
    start_budget_s: _Seconds = 900.0  # wall-clock budget for retrying a start
    retry_base_s: _Seconds = 2.0
    retry_cap_s: _Seconds = 60.0
    # What one step of `priority` is worth in waiting: a job of priority p goes before the
    # jobs of priority 0 that came up to p * this many seconds before it, and no later.
    priority_aging_s: _Seconds = 60.0


class PollerSettings(_Section):
    base_s: _Seconds = 1.0
    factor: Annotated[float, pydantic.Field(ge=1.0, allow_inf_nan=False)] = 1.5
    cap_s: _Seconds = 5.0
    jitter: backoff.Jitter = "equal"
    cap_band: Annotated[float, pydantic.Field(ge=0, le=1)] = 0.1
    describe_concurrency: _Count = 4  # describe calls in flight at once, per backend
    fill_ahead_s: Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)] = 2.0
    missing_grace_s: _Seconds = 60.0

    def policy(self) -> backoff.Policy:
        return backoff.Policy(
            base_s=self.base_s,
            factor=self.factor,
            cap_s=self.cap_s,
            jitter=self.jitter,
            cap_band=self.cap_band,
        )


class LocalSettings(_Section):
    enabled: bool = True
    max_concurrency: _Count = pydantic.Field(default_factory=lambda: os.cpu_count() or 2)
    work_dir: Path | None = None  # default: <store dir>/jobs
    kill_grace_s: _Seconds = 10.0
    inherit_env: _StrList = pydantic.Field(
        default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"]
    )
    max_output_bytes: _Count = 1024**3  # per job and stream; past it, a marker and the rest dropped
    # "daemon": jobs run as the daemon's uid, so a local job from any other uid is refused;
    # "submitter": each job runs as the user who submitted it (backends/users.py; needs
    # CAP_SETUID, CAP_SETGID and CAP_KILL, checked at start-up).
    run_as: Literal["daemon", "submitter"] = "daemon"
    # "auto": each job in a cgroup v2 of its own where one can be made (else process groups, and
    # a warning at start-up); "off": process groups only.
    cgroup: Literal["auto", "off"] = "auto"
    cgroup_root: Path | None = None  # default: <the daemon's own cgroup>/jobs
    # "auto": with run_as = "daemon", each job runs in a mount namespace of its own where the
    # store's directory and the work directory (but for the job's own attempt directory) are
    # empty, where the kernel allows it (else a warning at start-up); "off": jobs see them.
    hide_state: Literal["auto", "off"] = "auto"
    # This host's GPUs as CUDA numbers them ("0,1,2,3"): handed out to jobs that ask for
    # `resources.gpus`, each job told its own in CUDA_VISIBLE_DEVICES (and jobs that ask for
    # none, none); a job waits until enough are free. Empty: jobs asking for GPUs are refused.
    gpus: _StrList = pydantic.Field(default_factory=list)
    # On a PostgreSQL shared by several daemons: a local job whose daemon (its node) stopped
    # renewing its presence this long ago is LOST (until then it says its owner is unreachable,
    # and that daemon takes it back if it returns).
    orphan_timeout_s: _Seconds = 900.0

    @pydantic.field_validator("gpus")
    @classmethod
    def _distinct_devices(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a device is listed twice: {value}")
        if any(not device or "," in device or any(c.isspace() for c in device) for device in value):
            raise ValueError(f"device names are non-empty and hold no comma or space: {value}")
        return value


class EventsSettings(_Section):
    """Tracking by EventBridge state-change events read from an SQS queue (`[ecs.events]`,
    `[batch.events]`; `orchestrator events setup` makes the queue and the rule). Without a
    `queue_url` the backend is tracked by polling alone."""

    queue_url: str | None = None
    # While events flow, each tracked job is still described this often (the safety net)...
    sweep_s: _Seconds = 60.0
    # ... but the sweep takes at most this share of `describe_rate_per_s`: with many jobs in
    # flight it comes round more slowly.
    sweep_share: Annotated[float, pydantic.Field(gt=0, le=1)] = 0.1
    max_receivers: _Count = 8  # ReceiveMessage long polls at once, as the backlog needs
    wait_s: Annotated[int, pydantic.Field(ge=0, le=20)] = 20  # ReceiveMessage WaitTimeSeconds
    visibility_timeout_s: Annotated[int, pydantic.Field(ge=1, le=43200)] = 60
    # A change a describe found, which no event told within `grace_s` of it, is a miss; this
    # many misses in a row (no event-told change between them) and the backend goes back to
    # full polling until events flow again.
    grace_s: _Seconds = 30.0
    miss_limit: _Count = 3

    @pydantic.field_validator("queue_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"must be an SQS queue URL (https://sqs.…/ACCOUNT/NAME): {value!r}")
        return value or None


class AwsBackendSettings(_Section):
    """What ECS and Batch share: credentials, retries, limits, tracking."""

    enabled: bool = False
    region_name: str | None = None
    profile: str | None = None  # a named AWS profile; default: the standard credential chain
    check_health_on_startup: bool = True
    max_in_flight: _Count = 500  # jobs submitted and not yet terminal, at most
    max_attempts: _Count = 5  # botocore `standard` retry mode: attempts per API call, in all
    connect_timeout_s: _Seconds = 10.0
    read_timeout_s: _Seconds = 30.0
    describe_rate_per_s: _Rate = 20.0
    describe_burst: _Rate = 100.0
    # Registering the definitions a job's `image` needs (`backends.definitions`): rare, and
    # AWS throttles it hard (RegisterTaskDefinition ~1/s).
    register_rate_per_s: _Rate = 1.0
    register_burst: _Rate = 5.0
    start_budget_s: _Seconds = 600.0  # wall-clock budget for retrying a job's start
    events: EventsSettings = pydantic.Field(default_factory=EventsSettings)

    def _overlays(self) -> Mapping[str, pydantic.BaseModel]:
        """The section's named targets (`[ecs.targets.NAME]`…): its subclasses have them."""
        return {}

    def for_target(self, name: str | None) -> Self:
        """The settings a job with `target = name` runs with (None: the section's own): the
        section with the target's values over its own."""
        if name is None:
            return self
        overlay = self._overlays()[name].model_dump(exclude_none=True)
        return self.model_validate({**self.model_dump(exclude={"targets"}), **overlay})

    def each_target(self) -> dict[str | None, Self]:
        """The section's own settings (None) and each target's."""
        return {None: self} | {name: self.for_target(name) for name in self._overlays()}

    @pydantic.model_validator(mode="after")
    def _targets_consistent(self) -> Self:
        """Each target is held to the rules of the section (complete, no contradiction)."""
        if self.enabled:
            for name in self._overlays():
                try:
                    self.for_target(name)
                except pydantic.ValidationError as exc:
                    why = "; ".join(e["msg"] for e in exc.errors(include_url=False))
                    raise ValueError(f"target {name!r}: {why}") from None
        return self

    def _require(self, section: str, *names: str) -> None:
        if not self.enabled:
            return
        missing = [name for name in names if not getattr(self, name)]
        if missing:
            keys = ", ".join(f"{section}.{name}" for name in missing)
            raise ValueError(f"{keys} required when {section}.enabled is true")


_TargetName = Annotated[str, pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


class EcsTarget(_Section):
    """A named overlay of `[ecs]` (`[ecs.targets.NAME]`): what a job with `target = NAME` runs
    with instead of the section's own values. It uses the section's clients and buckets (the
    same account and Region)."""

    cluster: str | None = None
    task_definition: str | None = None
    launch_type: Literal["FARGATE", "EC2", "EXTERNAL"] | None = None
    capacity_provider_strategy: list[dict[str, Any]] | None = None
    platform_version: str | None = None
    subnets: Annotated[list[str], NoDecode, pydantic.BeforeValidator(_comma_list)] | None = None
    security_groups: (
        Annotated[list[str], NoDecode, pydantic.BeforeValidator(_comma_list)] | None
    ) = None
    assign_public_ip: bool | None = None
    run_task_kwargs: _Json | None = None


class BatchTarget(_Section):
    """A named overlay of `[batch]` (`[batch.targets.NAME]`), as `EcsTarget` is of `[ecs]`."""

    job_queue: str | None = None
    job_definition: str | None = None
    submit_job_kwargs: _Json | None = None
    share_identifier: str | None = None


class EcsSettings(AwsBackendSettings):
    cluster: str | None = None
    container_name: str | None = None
    task_definition: str | None = None  # family[:revision] or ARN
    launch_type: Literal["FARGATE", "EC2", "EXTERNAL"] | None = None  # default FARGATE, unless
    capacity_provider_strategy: list[dict[str, Any]] = pydantic.Field(default_factory=list)
    platform_version: str = "LATEST"  # Fargate only; dropped for EC2
    subnets: _StrList = pydantic.Field(default_factory=list)
    security_groups: _StrList = pydantic.Field(default_factory=list)
    assign_public_ip: bool = False
    max_run_task_attempts: _Count = 5
    run_task_kwargs: _Json = pydantic.Field(default_factory=dict)
    run_task_rate_per_s: _Rate = 20.0  # AWS: 20/s for Fargate RunTask, 40/s on EC2 (burst 100)
    run_task_burst: _Rate = 100.0
    targets: dict[_TargetName, EcsTarget] = pydantic.Field(default_factory=dict)

    def _overlays(self) -> Mapping[str, pydantic.BaseModel]:
        return self.targets

    @pydantic.field_validator("capacity_provider_strategy", mode="before")
    @classmethod
    def _strategy_from_json(cls, value: object) -> object:
        return (
            pydantic.TypeAdapter(list[Any]).validate_json(value)
            if isinstance(value, str)
            else value
        )

    @pydantic.model_validator(mode="after")
    def _complete(self) -> EcsSettings:
        self._require("ecs", "cluster", "container_name", "region_name", "task_definition")
        return self

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> EcsSettings:
        """Settings AWS would refuse on every RunTask are refused here, naming every key
        involved (`load` adds where each came from): `launch_type` with a
        `capacity_provider_strategy`, security groups or a public IP without subnets, a Fargate
        task size that does not exist — as the settings give them or as `run_task_kwargs`
        merged over them does."""
        if not self.enabled:
            return self
        from orchestrator.backends import aws_kwargs  # botocore's model: only when enabled

        conflicts = aws_kwargs.ecs_settings_conflicts(self)
        if conflicts:
            raise pydantic_core.PydanticCustomError(
                CONTRADICTION,
                "; ".join(template.format(*keys) for keys, template in conflicts),
                {"conflicts": [{"keys": list(keys), "template": t} for keys, t in conflicts]},
            )
        return self


class BatchSettings(AwsBackendSettings):
    job_queue: str | None = None
    job_definition: str | None = None
    # A fair-share queue's share for this daemon's jobs: sent as `shareIdentifier`, with each
    # job's priority as `schedulingPriorityOverride` (priority + 1000: 0 to 2000).
    share_identifier: str | None = None
    max_submit_attempts: _Count = 5
    submit_job_kwargs: _Json = pydantic.Field(default_factory=dict)
    submit_rate_per_s: _Rate = 50.0  # AWS: a fixed 50 SubmitJob calls/s per account
    submit_burst: _Rate = 50.0
    lookup_grace_s: _Seconds = 60.0  # ListJobs may lag SubmitJob: how long "not found" is unsure
    targets: dict[_TargetName, BatchTarget] = pydantic.Field(default_factory=dict)

    def _overlays(self) -> Mapping[str, pydantic.BaseModel]:
        return self.targets

    @pydantic.model_validator(mode="after")
    def _complete(self) -> BatchSettings:
        self._require("batch", "job_queue", "job_definition", "region_name")
        return self


class CloudWatchSettings(_Section):
    rate_per_s: _Rate = 10.0  # GetLogEvents and friends, shared by every backend
    burst: _Rate = 10.0
    # CloudWatch delivers a job's last lines seconds after it ends: `logs -f` reads on for this
    # long after the end before it stops.
    delivery_s: Annotated[float, pydantic.Field(ge=0, le=600)] = 10.0


class MetricsSettings(_Section):
    listen: str = ""  # HOST:PORT for the Prometheus endpoint, e.g. "127.0.0.1:9464"; empty: off

    @pydantic.field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not value.rpartition(":")[2].isdigit():
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9464")
        return value


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(pydantic_settings.BaseSettings):
    """The daemon's whole configuration."""

    model_config = pydantic_settings.SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        validate_default=True,
    )

    server: ServerSettings = pydantic.Field(default_factory=ServerSettings)
    store: StoreSettings = pydantic.Field(default_factory=StoreSettings)
    cluster: ClusterSettings = pydantic.Field(default_factory=ClusterSettings)
    jobs: JobDefaults = pydantic.Field(default_factory=JobDefaults)
    dispatcher: DispatcherSettings = pydantic.Field(default_factory=DispatcherSettings)
    poller: PollerSettings = pydantic.Field(default_factory=PollerSettings)
    local: LocalSettings = pydantic.Field(default_factory=LocalSettings)
    ecs: EcsSettings = pydantic.Field(default_factory=EcsSettings)
    batch: BatchSettings = pydantic.Field(default_factory=BatchSettings)
    cloudwatch: CloudWatchSettings = pydantic.Field(default_factory=CloudWatchSettings)
    metrics: MetricsSettings = pydantic.Field(default_factory=MetricsSettings)
    logging: LoggingSettings = pydantic.Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[pydantic_settings.BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        # `load` layers the file and the environment itself, so it can say where each value
        # came from; the model only validates what it is given.
        return (init_settings,)

    def local_work_dir(self) -> Path:
        return self.local.work_dir or self.store.path.parent / "jobs"


@dataclass(frozen=True, slots=True)
class Loaded:
    """Settings plus the source of every value that was not a default."""

    settings: Settings
    sources: Mapping[str, str]  # dotted key → "file:PATH" | "env:NAME"
    config_path: Path | None

    def source_of(self, key: str) -> str:
        return self.sources.get(key, "default")


def config_path_from(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        return explicit
    if configured := environ.get(CONFIG_ENV):
        return Path(configured)
    return None


def load(config_path: Path | None = None, environ: Mapping[str, str] | None = None) -> Loaded:
    """Read defaults, the TOML file and the environment; raise `ConfigError` naming the key."""
    environ = os.environ if environ is None else environ
    config_path = config_path_from(config_path, environ)
    file_data = _read_toml(config_path) if config_path is not None else {}
    env_data, env_names = _read_env(environ)

    sources: dict[str, str] = {}
    for key in _leaf_keys(file_data):
        sources[key] = f"file:{config_path}"
    for key in _leaf_keys(env_data):
        sources[key] = f"env:{_env_name(key, env_names)}"

    merged = deep_merge(_path_defaults(environ), deep_merge(file_data, env_data))
    try:
        settings = Settings(**merged)
    except pydantic.ValidationError as exc:
        raise errors.ConfigError(_describe(exc, sources)) from exc
    return Loaded(settings=settings, sources=sources, config_path=config_path)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise errors.ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise errors.ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise errors.ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _read_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The `ORCHESTRATOR__…` variables as nested data, and each dotted key's variable name."""
    sections = set(Settings.model_fields)
    names: dict[str, str] = {}
    for name in environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        if parts[0] not in sections:
            raise errors.ConfigError(
                f"environment variable {name}: unknown section {parts[0]!r} "
                f"(known: {', '.join(sorted(sections))})"
            )
        names[".".join(parts)] = name
    try:
        data = _EnvSource(Settings, environ)()
    except pydantic_settings.SettingsError as exc:
        culprits = sorted(
            name for key, name in names.items() if f'"{key.split(".")[-1]}"' in str(exc)
        )
        where = ", ".join(culprits) or "an ORCHESTRATOR__ variable"
        raise errors.ConfigError(f"environment variable {where}: cannot be parsed ({exc})") from exc
    return data, names


def _env_name(key: str, names: Mapping[str, str]) -> str:
    """The variable that gave dotted `key`: its own, or the one holding it as JSON (a key inside
    `ORCHESTRATOR__ECS__RUN_TASK_KWARGS='{"launchType": …}'`)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if (name := names.get(".".join(parts[:end]))) is not None:
            return name
    return key


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' env parsing, reading the mapping it is given instead of os.environ."""

    def __init__(self, settings_cls: type[Settings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` merged recursively into a copy of `base`; mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaf_keys(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaf_keys(value, f"{dotted}.")
        else:
            yield dotted


def _describe(exc: pydantic.ValidationError, sources: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        where = _source_for(key, sources)
        if error["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown setting (from {where})")
        elif error["type"] == CONTRADICTION:
            for conflict in (error.get("ctx") or {}).get("conflicts", []):
                named = [f"{k} (from {_source_for(k, sources)})" for k in conflict["keys"]]
                lines.append(conflict["template"].format(*named))
        else:
            lines.append(f"{key}: {error['msg']} (from {where})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _source_for(key: str, sources: Mapping[str, str]) -> str:
    """Where the value at `key` came from: the key itself, the setting it is part of (a list
    element), or a setting beneath it (a whole unknown section)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if (found := sources.get(".".join(parts[:end]))) is not None:
            return found
    beneath = [source for dotted, source in sources.items() if dotted.startswith(f"{key}.")]
    return beneath[0] if beneath else "default"


def flatten(settings: pydantic.BaseModel) -> dict[str, Any]:
    """Every effective setting as dotted key → JSON-able value, for `config show`: sections
    (`jobs.retry` too) are walked, values (a kwargs object, a list) are not."""
    out: dict[str, Any] = {}

    def walk(model: pydantic.BaseModel, prefix: str) -> None:
        for key in type(model).model_fields:
            value = getattr(model, key)
            if isinstance(value, pydantic.BaseModel):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = pydantic_core.to_jsonable_python(value)

    walk(settings, "")
    return out
