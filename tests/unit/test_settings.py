"""`orchestrator.settings.load`: defaults < TOML file < environment, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import orjson
import pydantic
import pytest

from orchestrator import errors, settings

_DIR_VARS = ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", "STATE_DIRECTORY", "XDG_STATE_HOME")


@pytest.fixture(autouse=True)
def _hermetic_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Defaults read the runtime/state directories from the process environment."""
    for name in _DIR_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def _toml(tmp_path: Path, text: str, name: str = "orchestrator.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _config_error(config_path: Path | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(errors.ConfigError) as info:
        settings.load(config_path, environ or {})
    return info.value.message


# --- defaults --------------------------------------------------------------------------------


def _dirs(tmp_path: Path) -> dict[str, str]:
    """The fixture's directory variables, as an environ to hand to `load`."""
    return {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}


def test_defaults_with_an_empty_environ(tmp_path: Path) -> None:
    loaded = settings.load(None, _dirs(tmp_path))
    assert loaded.settings == settings.Settings()
    assert (dict(loaded.sources), loaded.config_path) == ({}, None)
    assert loaded.settings.server.socket_path == tmp_path / "run" / "orchestrator" / (
        "orchestrator.sock"
    )
    assert loaded.settings.store.path == tmp_path / "state" / "orchestrator" / "orchestrator.db"
    assert loaded.settings.local_work_dir() == tmp_path / "state" / "orchestrator" / "jobs"
    # The embedded default works on a fresh machine: local jobs, no AWS.
    assert (loaded.settings.jobs.backend, loaded.settings.local.enabled) == ("local", True)
    assert {loaded.source_of(key) for key in settings.flatten(loaded.settings)} == {"default"}


def test_systemd_directories_win_over_xdg(tmp_path: Path) -> None:
    environ = {
        **_dirs(tmp_path),
        "RUNTIME_DIRECTORY": f"{tmp_path}/rt:{tmp_path}/other",
        "STATE_DIRECTORY": f"{tmp_path}/st",
    }
    loaded = settings.load(None, environ)
    assert loaded.settings.server.socket_path == tmp_path / "rt" / "orchestrator.sock"
    assert loaded.settings.store.path == tmp_path / "st" / "orchestrator.db"
    assert loaded.source_of("server.socket_path") == "default"


def test_the_process_environment_is_not_read_when_environ_is_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ORCHESTRATOR__SERVER__MAX_CONNECTIONS", "7")
    monkeypatch.setenv(settings.CONFIG_ENV, str(tmp_path / "missing.toml"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "process-rt"))
    loaded = settings.load(None, {"STATE_DIRECTORY": str(tmp_path / "given")})
    assert loaded.settings.server.max_connections == settings.Settings().server.max_connections
    assert loaded.config_path is None
    assert not loaded.settings.server.socket_path.is_relative_to(tmp_path / "process-rt")
    assert loaded.settings.store.path == tmp_path / "given" / "orchestrator.db"


# --- precedence ------------------------------------------------------------------------------


def test_precedence_on_the_same_key(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[poller]\ncap_s = 20.0\n")
    env = {"ORCHESTRATOR__POLLER__CAP_S": "25"}
    layers = {
        "default": settings.load(None, {}),
        "file": settings.load(path, {}),
        "env": settings.load(path, env),
    }
    got = {
        name: (loaded.settings.poller.cap_s, loaded.source_of("poller.cap_s"))
        for name, loaded in layers.items()
    }
    assert got == {
        "default": (settings.PollerSettings().cap_s, "default"),
        "file": (20.0, f"file:{path}"),
        "env": (25.0, "env:ORCHESTRATOR__POLLER__CAP_S"),
    }
    assert settings.PollerSettings().cap_s not in (20.0, 25.0)


def test_file_and_env_merge_within_a_section(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nmax_connections = 10\nidle_timeout_s = 1.5\n")
    loaded = settings.load(path, {"ORCHESTRATOR__SERVER__IDLE_TIMEOUT_S": "2.5"})
    server = loaded.settings.server
    assert (server.max_connections, server.idle_timeout_s) == (10, 2.5)
    assert dict(loaded.sources) == {
        "server.max_connections": f"file:{path}",
        "server.idle_timeout_s": "env:ORCHESTRATOR__SERVER__IDLE_TIMEOUT_S",
    }
    assert loaded.source_of("server.max_line_bytes") == "default"
    assert loaded.config_path == path


def test_file_values_of_every_kind(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        f"""
[server]
socket_path = "{tmp_path}/o.sock"
allowed_uids = [0, 1000]
[store]
synchronous = "NORMAL"
[jobs]
backend = "batch"
timeout_s = 60
[poller]
jitter = "full"
[local]
enabled = false
inherit_env = ["PATH"]
[logging]
level = "DEBUG"
""",
    )
    s = settings.load(path, {}).settings
    assert (
        s.server.socket_path,
        s.server.allowed_uids,
        s.store.synchronous,
        s.jobs.backend,
        s.jobs.timeout_s,
        s.poller.jitter,
        s.local.enabled,
        s.local.inherit_env,
        s.logging.level,
    ) == (tmp_path / "o.sock", [0, 1000], "NORMAL", "batch", 60.0, "full", False, ["PATH"], "DEBUG")


def test_config_env_names_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nmax_connections = 3\n")
    loaded = settings.load(None, {settings.CONFIG_ENV: str(path)})
    assert (loaded.settings.server.max_connections, loaded.config_path) == (3, path)
    assert loaded.source_of("server.max_connections") == f"file:{path}"


def test_explicit_path_wins_over_config_env(tmp_path: Path) -> None:
    explicit = _toml(tmp_path, "[server]\nmax_connections = 3\n", "a.toml")
    other = _toml(tmp_path, "[server]\nmax_connections = 4\n", "b.toml")
    loaded = settings.load(explicit, {settings.CONFIG_ENV: str(other)})
    assert (loaded.settings.server.max_connections, loaded.config_path) == (3, explicit)


def test_env_names_are_case_insensitive() -> None:
    loaded = settings.load(None, {"orchestrator__Server__max_connections": "5"})
    assert loaded.settings.server.max_connections == 5
    assert loaded.source_of("server.max_connections") == "env:orchestrator__Server__max_connections"


def test_unrelated_env_is_ignored(tmp_path: Path) -> None:
    environ = {
        **_dirs(tmp_path),
        "PATH": "/bin",
        "ORCHESTRATOR_X": "1",
        "ORCHESTRATORS__SERVER__X": "1",
    }
    loaded = settings.load(None, environ)
    assert (loaded.settings, dict(loaded.sources)) == (settings.Settings(), {})


# --- lists in the environment ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1000", [1000]),
        ("1000,1001", [1000, 1001]),
        (" 1000 , 1001 ,", [1000, 1001]),
        ("[1000, 1001]", [1000, 1001]),
        ("[]", []),
        ("", []),
    ],
)
def test_allowed_uids_from_env(value: str, expected: list[int]) -> None:
    loaded = settings.load(None, {"ORCHESTRATOR__SERVER__ALLOWED_UIDS": value})
    assert loaded.settings.server.allowed_uids == expected
    assert loaded.source_of("server.allowed_uids") == "env:ORCHESTRATOR__SERVER__ALLOWED_UIDS"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("PATH", ["PATH"]),
        ("PATH,HOME,AWS_REGION", ["PATH", "HOME", "AWS_REGION"]),
        ('["PATH", "HOME"]', ["PATH", "HOME"]),
    ],
)
def test_inherit_env_from_env(value: str, expected: list[str]) -> None:
    loaded = settings.load(None, {"ORCHESTRATOR__LOCAL__INHERIT_ENV": value})
    assert loaded.settings.local.inherit_env == expected


@pytest.mark.parametrize("value", ["x", "1,x", "[1,", '["x"]'])
def test_bad_uid_lists_from_env(value: str) -> None:
    message = _config_error(environ={"ORCHESTRATOR__SERVER__ALLOWED_UIDS": value})
    assert "server.allowed_uids" in message


# --- errors ----------------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nmax_conections = 3\n")
    message = _config_error(path)
    assert "server.max_conections: unknown setting" in message
    assert f"file:{path}" in message


def test_unknown_section_in_file_names_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[sever]\nmax_connections = 3\n")
    message = _config_error(path)
    assert "sever" in message
    assert f"file:{path}" in message


def test_unknown_key_in_env() -> None:
    message = _config_error(environ={"ORCHESTRATOR__SERVER__MAX_CONECTIONS": "3"})
    assert "server.max_conections: unknown setting" in message
    assert "env:ORCHESTRATOR__SERVER__MAX_CONECTIONS" in message


def test_unknown_section_in_env_names_the_variable() -> None:
    message = _config_error(environ={"ORCHESTRATOR__SEVER__MAX_CONNECTIONS": "3"})
    assert "ORCHESTRATOR__SEVER__MAX_CONNECTIONS" in message
    assert "'sever'" in message


def test_a_whole_section_from_env_that_is_not_json_names_the_variable() -> None:
    message = _config_error(environ={"ORCHESTRATOR__SERVER": "oops"})
    assert "ORCHESTRATOR__SERVER" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nmax_connections = "many"\n', "server.max_connections"),
        ("[server]\nmax_connections = 0\n", "server.max_connections"),
        ("[poller]\njitter = 'random'\n", "poller.jitter"),
        ("[poller]\ncap_s = -1.0\n", "poller.cap_s"),
        ("[store]\nsynchronous = 'OFF'\n", "store.synchronous"),
        ("[logging]\nlevel = 3\n", "logging.level"),
        ("server = 5\n", "server"),
    ],
)
def test_wrong_type_in_file(tmp_path: Path, text: str, key: str) -> None:
    path = _toml(tmp_path, text)
    message = _config_error(path)
    assert f"{key}: " in message
    assert f"(from file:{path})" in message


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("ORCHESTRATOR__SERVER__MAX_CONNECTIONS", "many", "server.max_connections"),
        ("ORCHESTRATOR__POLLER__FACTOR", "0.5", "poller.factor"),
        ("ORCHESTRATOR__POLLER__BASE_S", "nan", "poller.base_s"),
        ("ORCHESTRATOR__LOCAL__ENABLED", "maybe", "local.enabled"),
        ("ORCHESTRATOR__JOBS__BACKEND", "lambda", "jobs.backend"),
    ],
)
def test_wrong_type_in_env(name: str, value: str, key: str) -> None:
    message = _config_error(environ={name: value})
    assert f"{key}: " in message
    assert f"(from env:{name})" in message


@pytest.mark.parametrize("where", ["file", "env"])
def test_bad_list_element_names_its_source(tmp_path: Path, where: str) -> None:
    if where == "file":
        path: Path | None = _toml(tmp_path, '[server]\nallowed_uids = ["root"]\n')
        environ = {}
        source = f"file:{path}"
    else:
        path = None
        environ = {"ORCHESTRATOR__SERVER__ALLOWED_UIDS": "root"}
        source = "env:ORCHESTRATOR__SERVER__ALLOWED_UIDS"
    message = _config_error(path, environ)
    assert f"(from {source})" in message


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nmax_connections = 0\nbogus = 1\n")
    message = _config_error(path, {"ORCHESTRATOR__POLLER__CAP_S": "-1"})
    assert message.startswith("invalid configuration:")
    assert sorted(line.strip().split(":")[0] for line in message.splitlines()[1:]) == [
        "poller.cap_s",
        "server.bogus",
        "server.max_connections",
    ]


def test_invalid_toml_names_the_path(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server\nmax_connections = 3\n")
    message = _config_error(path)
    assert message.startswith(f"config file {path} is not valid TOML")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert _config_error(path) == f"config file {path} does not exist"


def test_missing_file_from_config_env_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert _config_error(environ={settings.CONFIG_ENV: str(path)}) == (
        f"config file {path} does not exist"
    )


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    assert _config_error(tmp_path).startswith(f"config file {tmp_path} cannot be read")


def test_config_error_is_chained_to_the_validation_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nmax_connections = 0\n")
    with pytest.raises(errors.ConfigError) as info:
        settings.load(path, {})
    assert isinstance(info.value.__cause__, pydantic.ValidationError)
    assert info.value.code == "invalid_config"


# --- flatten ---------------------------------------------------------------------------------


def test_flatten_covers_every_field_of_every_section() -> None:
    s = settings.Settings()
    flat = settings.flatten(s)
    dumped = s.model_dump(mode="json")
    expected: dict[str, object] = {}
    for section, values in dumped.items():
        for name, value in values.items():
            if (section, name) in {("jobs", "retry"), ("ecs", "events"), ("batch", "events")}:
                # the sections within a section
                expected.update({f"{section}.{name}.{k}": v for k, v in value.items()})
            else:
                expected[f"{section}.{name}"] = value
    assert flat == expected
    assert flat["jobs.retry.on"] == ["start", "infrastructure"]
    orjson.dumps(flat)  # JSON-able, for `config show --json`


def test_flatten_reflects_loaded_values(tmp_path: Path) -> None:
    loaded = settings.load(None, {**_dirs(tmp_path), "ORCHESTRATOR__SERVER__ALLOWED_UIDS": "5,6"})
    flat = settings.flatten(loaded.settings)
    assert (flat["server.allowed_uids"], flat["server.socket_path"]) == (
        [5, 6],
        str(tmp_path / "run" / "orchestrator" / "orchestrator.sock"),
    )


# --- deep_merge ------------------------------------------------------------------------------


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    over = {"a": {"c": [3], "e": {"f": 1}}, "d": {"g": 2}}
    assert settings.deep_merge(base, over) == {
        "a": {"b": 1, "c": [3], "e": {"f": 1}},
        "d": {"g": 2},
    }
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not mutated


# --- events (issue #17) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("ORCHESTRATOR__ECS__EVENTS__QUEUE_URL", "orchestrator-ecs-events", "SQS queue URL"),
        ("ORCHESTRATOR__BATCH__EVENTS__QUEUE_URL", "sqs://queue", "SQS queue URL"),
        ("ORCHESTRATOR__ECS__EVENTS__WAIT_S", "25", "less than or equal to 20"),
        ("ORCHESTRATOR__BATCH__EVENTS__SWEEP_SHARE", "0", "greater than 0"),
        ("ORCHESTRATOR__ECS__EVENTS__MAX_RECEIVERS", "0", "greater than or equal to 1"),
    ],
)
def test_events_settings_that_cannot_work_are_refused_naming_the_variable(
    tmp_path: Path, variable: str, value: str, said: str
) -> None:
    message = _config_error(environ={**_dirs(tmp_path), variable: value})
    assert variable in message
    assert said in message


def test_a_queue_url_from_the_environment_is_the_backends_queue(tmp_path: Path) -> None:
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/orchestrator-ecs-events"
    loaded = settings.load(None, {**_dirs(tmp_path), "ORCHESTRATOR__ECS__EVENTS__QUEUE_URL": url})
    assert loaded.settings.ecs.events.queue_url == url
    assert loaded.settings.batch.events.queue_url is None
    assert loaded.settings.ecs.for_target(None).events.queue_url == url
