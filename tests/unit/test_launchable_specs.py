"""Specs no process could be started with are refused when validated, naming the field (issue
11, item 4): a NUL byte (posix_spawn raises ValueError), a bad variable name, E2BIG."""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest

from orchestrator import errors, models, protocol, store

MAX = models.MAX_ARG_STRLEN


def refusal(spec: dict[str, Any]) -> str:
    """The `invalid_request` message `submit` answers for `spec`."""
    with pytest.raises(errors.BadRequest) as caught:
        protocol.decode(orjson.dumps({"id": 1, "op": "submit", "job": spec}))
    assert caught.value.error.code == "invalid_request"
    return caught.value.error.message


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"command": ["a\0"]}, "job.command[0]: must not contain a NUL byte"),
        ({"command": ["sh", "-c", "\0"]}, "job.command[2]: must not contain a NUL byte"),
        ({"command": ["x"], "env": {"FOO": "a\0b"}}, "job.env.FOO: must not contain a NUL byte"),
        ({"command": ["x"], "cwd": "/srv\0"}, "job.cwd: must not contain a NUL byte"),
        (
            {"command": ["x"], "env": {"F\0O": ""}},
            "job.env['F\\x00O']: the variable's name must not contain a NUL byte",
        ),
        (
            {"command": ["x"], "env": {"A=B": ""}},
            "job.env['A=B']: the variable's name must not contain '='",
        ),
        (
            {"command": ["x"], "env": {"": "v"}},
            "job.env['']: the variable's name must not be empty",
        ),
        (
            {"command": ["x"], "env": {"9LIVES": ""}},
            "job.env['9LIVES']: the variable's name must be letters, digits and _, and not start "
            "with a digit",
        ),
    ],
)
def test_a_spec_that_cannot_be_launched_is_refused_naming_the_field(
    spec: dict[str, Any], message: str
) -> None:
    assert refusal(spec) == message


def test_every_culprit_is_reported_at_once() -> None:
    message = refusal({"command": ["ok", "\0", "\0"], "env": {"A": "", "B": "\0"}, "cwd": "\0"})
    assert message.split("; ") == [
        "job.command[1]: must not contain a NUL byte",
        "job.command[2]: must not contain a NUL byte",
        "job.env.B: must not contain a NUL byte",
        "job.cwd: must not contain a NUL byte",
    ]


@pytest.mark.parametrize(
    "env",
    [{"A": "1", "B": "2"}, {"PATH": "/bin", "_x9": "", "lower_case": "é"}],
)
def test_good_variables_pass(env: dict[str, str]) -> None:
    assert models.JobSpec(command=["x"], env=env).env == env


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"A": "1", "B=C": "2"}, "'B=C'"),  # joined, "A=B=C" would read as three good names
        ({"A": "1", "": "2"}, "''"),
        ({"A": "1", "B C": "2"}, "'B C'"),
    ],
)
def test_a_bad_name_among_good_ones_is_found(env: dict[str, str], name: str) -> None:
    assert refusal({"command": ["x"], "env": env}).startswith(f"job.env[{name}]: the variable's")


def test_one_argument_may_take_max_arg_strlen_bytes_with_its_nul_and_no_more() -> None:
    fits = "é" * ((MAX - 2) // 2) + "x"  # UTF-8 bytes: MAX - 1, plus the NUL
    assert models.JobSpec(command=["echo", fits]).command[1] == fits
    over = "é" * (MAX // 2)  # 65,536 characters, as many as allowed: MAX bytes, plus the NUL
    assert refusal({"command": ["echo", over]}) == (
        f"job.command[1]: takes {MAX + 1} bytes (UTF-8, with its terminating NUL), more than "
        f"the {MAX} one argument of a process can take"
    )


def test_one_environment_string_may_take_max_arg_strlen_bytes_as_name_equals_value() -> None:
    value = "x" * (MAX - len("LONG=") - 1)
    assert models.JobSpec(command=["x"], env={"LONG": value}).env["LONG"] == value
    assert refusal({"command": ["x"], "env": {"LONG": value + "x"}}).startswith(
        f"job.env.LONG: takes {MAX + 1} bytes as NAME=value"
    )


def test_launch_bytes_counts_strings_nuls_and_pointers_in_utf8() -> None:
    assert models.launch_bytes(["ab", "é"], {"K": "vé"}) == (2 + 1 + 8) + (2 + 1 + 8) + (
        len("K=vé".encode()) + 1 + 8
    )


def test_command_env_and_cwd_together_must_fit_the_launch_budget() -> None:
    budget = models.launch_limit_bytes() - models.LAUNCH_RESERVE_BYTES
    cwd = "/srv/work"
    env = {"SEED": "7"}
    fixed = models.launch_bytes(["run", cwd], env)
    filler = ["x" * 60_000] * ((budget - fixed) // 60_009)
    last = budget - fixed - models.launch_bytes(filler, {}) - 9
    command = ["run", *filler, "y" * last]
    assert models.launch_bytes([*command, cwd], env) == budget
    assert models.JobSpec(command=command, env=env, cwd=cwd).command == command
    assert refusal({"command": [*command[:-1], command[-1] + "y"], "env": env, "cwd": cwd}) == (
        f"job: command, env and cwd take {budget + 1} bytes together (UTF-8, with a NUL and a "
        f"pointer each), more than the {budget} a process can be started with here (the "
        f"kernel's limit on arguments and environment, E2BIG, less "
        f"{models.LAUNCH_RESERVE_BYTES} kept for what the launch adds)"
    )


@pytest.mark.parametrize(
    ("arg_max", "limit"),
    [
        (2 * 1024 * 1024, 2 * 1024 * 1024),  # an 8 MiB stack: a quarter of it
        (2**62, 6 * 1024 * 1024),  # an unlimited stack: the kernel caps at 3/4 of _STK_LIM
        (4096, MAX),  # a tiny stack: the kernel still allows 32 pages
    ],
)
def test_the_launch_limit_follows_the_kernels_rule(
    monkeypatch: pytest.MonkeyPatch, arg_max: int, limit: int
) -> None:
    monkeypatch.setattr(os, "sysconf", lambda name: arg_max)
    models.launch_limit_bytes.cache_clear()  # read once per process
    try:
        assert models.launch_limit_bytes() == limit
    finally:
        models.launch_limit_bytes.cache_clear()


def test_a_stored_spec_that_newer_rules_refuse_is_still_read() -> None:
    """Accepted by an older version, it is kept as it was (the dispatcher deals with it)."""
    stored = orjson.dumps({"command": ["a\0"], "env": {"A=B": "\0"}, "cwd": "/\0"})
    spec = store.rows.spec_from_json(stored)
    assert (spec.command, spec.env, spec.cwd) == (["a\0"], {"A=B": "\0"}, "/\0")
