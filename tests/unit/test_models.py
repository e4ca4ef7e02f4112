"""`orchestrator.models`: the transition rules, job ids, spec validation and the client view."""

from __future__ import annotations

import itertools
import math
import re
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from orchestrator import models

S = models.JobState
ALL_STATES = list(S)
# The progress order DESIGN.md gives for the non-terminal states.
FORWARD_ORDER = [S.QUEUED, S.SUBMITTED, S.PENDING, S.RUNNABLE, S.STARTING, S.RUNNING]
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"  # no i, l, o, u


def _validation_errors(data: dict[str, Any]) -> list[tuple[str, tuple[int | str, ...]]]:
    """(type, loc) of every problem pydantic reports for `data`; fails if `data` is valid."""
    with pytest.raises(pydantic.ValidationError) as info:
        models.JobSpec.model_validate(data)
    return [(error["type"], error["loc"]) for error in info.value.errors()]


# --- states and transitions ------------------------------------------------------------------


def test_terminal_and_active_partition_the_states() -> None:
    terminal, active = models.TERMINAL, models.ACTIVE
    assert terminal == {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.LOST}
    assert active == set(FORWARD_ORDER)
    assert terminal.isdisjoint(active)
    assert terminal | active == set(ALL_STATES)
    assert {state for state in ALL_STATES if state.terminal} == terminal


@pytest.mark.parametrize(("old", "new"), list(itertools.product(ALL_STATES, ALL_STATES)))
def test_can_transition_over_every_pair(old: models.JobState, new: models.JobState) -> None:
    if old in models.TERMINAL:
        expected = False  # terminal states never change, not even to themselves
    elif new in models.TERMINAL:
        expected = True  # any live job may end, in any way
    else:
        expected = FORWARD_ORDER.index(new) > FORWARD_ORDER.index(old)
    assert models.can_transition(old, new) is expected


@pytest.mark.parametrize(("old", "new"), list(itertools.product(ALL_STATES, ALL_STATES)))
def test_is_regression_over_every_pair(old: models.JobState, new: models.JobState) -> None:
    expected = (
        old in models.ACTIVE
        and new in models.ACTIVE
        and FORWARD_ORDER.index(new) < FORWARD_ORDER.index(old)
    )
    assert models.is_regression(old, new) is expected


def test_every_active_pair_is_exactly_one_of_forward_regression_or_same() -> None:
    for old, new in itertools.product(models.ACTIVE, models.ACTIVE):
        kinds = [models.can_transition(old, new), models.is_regression(old, new), old == new]
        assert kinds.count(True) == 1, (old, new, kinds)


def test_the_whole_lifecycle_can_be_walked_forward_and_skips_are_allowed() -> None:
    path = [*FORWARD_ORDER, S.SUCCEEDED]
    assert all(models.can_transition(a, b) for a, b in itertools.pairwise(path))
    assert models.can_transition(S.QUEUED, S.RUNNING)  # a backend may skip intermediate states


# --- job ids ---------------------------------------------------------------------------------


def _decode_crockford(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_job_id_is_26_lower_case_crockford_chars() -> None:
    for _ in range(1000):
        job_id = models.new_job_id()
        assert re.fullmatch(f"[{CROCKFORD}]{{26}}", job_id), job_id


def test_job_id_carries_the_millisecond_timestamp_it_was_given() -> None:
    at = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC).timestamp()
    job_id = models.new_job_id(at)
    assert _decode_crockford(job_id) >> 80 == 1714979289123


def test_job_ids_sort_by_the_time_given() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    times = [start + i * 0.001 for i in range(500)] + [start + 86400 * 365 * 30]
    ids = [models.new_job_id(at) for at in times]
    assert sorted(ids) == ids


def test_job_ids_are_unique() -> None:
    at = 1_700_000_000.0  # the same millisecond: only the random part tells them apart
    ids = {models.new_job_id(at) for _ in range(10_000)}
    assert len(ids) == 10_000


# --- JobSpec ---------------------------------------------------------------------------------


def test_minimal_spec_and_its_defaults() -> None:
    spec = models.JobSpec.model_validate({"command": ["echo", "hi"]})
    assert spec.model_dump() == {
        "command": ["echo", "hi"],
        "name": None,
        "backend": None,
        "env": {},
        "cwd": None,
        "default_cwd": None,
        "timeout_s": None,
        "queue_timeout_s": None,
        "idempotency_key": None,
        "overrides": {},
        "retry": None,
        "priority": 0,
        "labels": {},
        "depends_on": [],
        "after": "success",
        "resources": None,
        "target": None,
        "image": None,
        "array_size": None,
    }


def test_full_spec_is_accepted() -> None:
    data = {
        "command": ["python", "-c", "print(1)"],
        "name": "nightly-report_v2.1",
        "backend": "ecs",
        "env": {"A": "1", "_B2": ""},
        "cwd": "/srv",
        "default_cwd": "/home/me",
        "timeout_s": 1.5,
        "queue_timeout_s": 60.0,
        "idempotency_key": "report:2024-05-06",
        "overrides": {"containerOverrides": [{"cpu": 256}]},
        "retry": {"attempts": 4, "on": ["start"], "exit_codes": [3, 75], "backoff_s": 0.5},
        "priority": -3,
        "labels": {"team": "ml", "cost center": "a/b"},
        "depends_on": ["01hx0000000000000000000000"],
        "after": "finished",
        "resources": {"cpu": 0.5, "memory_mib": 512, "gpus": None},
        "target": "gpu",
        "image": "registry.example.com:5000/team/app:1.2@sha256:" + "a" * 64,
        "array_size": 10_000,
    }
    assert models.JobSpec.model_validate(data).model_dump() == data


def test_spec_is_immutable() -> None:
    spec = models.JobSpec(command=["true"])
    with pytest.raises(pydantic.ValidationError):
        spec.name = "other"


def test_unknown_field_is_rejected() -> None:
    assert _validation_errors({"command": ["x"], "comand": ["y"]}) == [
        ("extra_forbidden", ("comand",))
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, [("missing", ("command",))]),
        ({"command": []}, [("too_short", ("command",))]),
        ({"command": "ls -l"}, [("list_type", ("command",))]),
        ({"command": ["ls", 1]}, [("string_type", ("command", 1))]),
        ({"command": None}, [("list_type", ("command",))]),
    ],
    ids=["missing", "empty", "string", "non-string-arg", "null"],
)
def test_command_must_be_a_non_empty_list_of_strings(
    data: dict[str, Any], expected: list[tuple[str, tuple[int | str, ...]]]
) -> None:
    assert _validation_errors(data) == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("env", {"A": 1}),
        ("env", ["A=1"]),
        ("timeout_s", "5"),
        ("timeout_s", True),
        ("timeout_s", -1.0),
        ("timeout_s", -1),
        ("timeout_s", 0),
        ("timeout_s", math.nan),
        ("timeout_s", math.inf),
        ("timeout_s", -math.inf),
        ("queue_timeout_s", "5"),
        ("queue_timeout_s", 0.0),
        ("queue_timeout_s", math.nan),
        ("backend", "lambda"),
        ("cwd", ""),
        ("idempotency_key", "has space"),
        ("idempotency_key", ""),
        ("overrides", []),
    ],
)
def test_wrong_types_and_values_are_rejected(field: str, value: object) -> None:
    errors = _validation_errors({"command": ["x"], field: value})
    assert errors, errors
    assert all(loc[0] == field for _, loc in errors), errors


@pytest.mark.parametrize("field", ["timeout_s", "queue_timeout_s"])
def test_an_int_duration_is_accepted_as_a_float(field: str) -> None:
    spec = models.JobSpec.model_validate({"command": ["x"], field: 5})
    value = getattr(spec, field)
    assert type(value) is float
    assert value == 5.0


def test_a_huge_int_duration_is_a_validation_error() -> None:
    errors = _validation_errors({"command": ["x"], "timeout_s": 10**400})
    assert [loc for _, loc in errors] == [("timeout_s",)]


@pytest.mark.parametrize("name", ["A", "_", "PATH", "_x9", "lower_case"])
def test_good_env_names(name: str) -> None:
    assert models.JobSpec(command=["x"], env={name: "v"}).env == {name: "v"}


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "É", "A\n", "A.B", "A\x00"])
def test_bad_env_names(name: str) -> None:
    errors = _validation_errors({"command": ["x"], "env": {name: "v"}})
    assert [(kind, loc[0]) for kind, loc in errors] == [("env_name", "env")]


@pytest.mark.parametrize("name", ["a", "0", "job-1", "report_v2.1", "A" * 128])
def test_good_names(name: str) -> None:
    assert models.JobSpec(command=["x"], name=name).name == name


@pytest.mark.parametrize(
    "name", ["", "-job", ".job", "_job", "a b", "a/b", "job\n", "tâche", "A" * 129]
)
def test_bad_names(name: str) -> None:
    assert _validation_errors({"command": ["x"], "name": name}) == [("job_name", ("name",))]


def test_a_bad_name_or_key_is_explained_in_words_not_a_pattern() -> None:
    with pytest.raises(pydantic.ValidationError) as bad:
        models.JobSpec(command=["x"], name="-x", idempotency_key="a b")
    text = str(bad.value)
    assert "letters, digits, '.', '_' or '-', starting with a letter or digit" in text
    assert "printable ASCII characters, without spaces" in text
    assert "[A-Za-z" not in text
    assert "pattern" not in text


# --- Job.to_dict -----------------------------------------------------------------------------


def _at(*parts: int) -> float:
    year, month, day, hour, minute, second, micro = parts
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC).timestamp()


def _job(**changes: Any) -> models.Job:
    fields: dict[str, Any] = {
        "id": "01hx0000000000000000000000",
        "spec": models.JobSpec(command=["sleep", "1"], name="nightly", timeout_s=30),
        "backend": "local",
        "state": S.FAILED,
        "created_at": _at(2024, 5, 6, 7, 8, 9, 123000),
        "updated_at": _at(2024, 5, 6, 7, 8, 10, 456000),
        "state_times": {
            "QUEUED": _at(2024, 5, 6, 7, 8, 9, 123000),
            "FAILED": _at(2024, 5, 6, 7, 8, 10, 456000),
        },
        "attempt": 1,
        "external_id": "4242",
        "exit_code": 3,
        "reason": "exited with 3",
        "vendor_status": "exited",
        "peer": models.Peer(uid=1000, gid=1000, pid=77),
    }
    fields.update(changes)
    return models.Job(**fields)


def test_job_to_dict_is_the_client_view() -> None:
    assert _job().to_dict() == {
        "id": "01hx0000000000000000000000",
        "name": "nightly",
        "backend": "local",
        "state": "FAILED",
        "exit_code": 3,
        "reason": "exited with 3",
        "failure": None,  # no class recorded in its info (a job from before failure classes)
        "vendor_status": "exited",
        "created_at": "2024-05-06T07:08:09.123Z",
        "updated_at": "2024-05-06T07:08:10.456Z",
        "state_times": {
            "QUEUED": "2024-05-06T07:08:09.123Z",
            "FAILED": "2024-05-06T07:08:10.456Z",
        },
        "attempt": 1,
        "external_id": "4242",
        "stop_reason": None,
        "idempotency_key": None,
        "command": ["sleep", "1"],
        "cwd": None,
        "timeout_s": 30.0,
        "queue_timeout_s": None,
        "retry": models.DEFAULT_RETRY.model_dump(),  # stored as None: the built-in one
        "priority": 0,
        "labels": {},
        "depends_on": [],
        "after": "success",
        "resources": None,
        "target": None,
        "image": None,
        "array_size": None,
        "peer": {"uid": 1000, "pid": 77},
        "info": {},
    }


def test_job_to_dict_timestamps_are_rfc3339_utc_and_round_trip() -> None:
    at = 1_714_979_289.5
    data = _job(created_at=at, updated_at=at, state_times={}).to_dict()
    for key in ("created_at", "updated_at"):
        text = data[key]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
        assert datetime.fromisoformat(text).timestamp() == at


def test_job_without_a_name_is_named_by_its_id_and_has_no_peer() -> None:
    job = _job(spec=models.JobSpec(command=["true"]), peer=None)
    data = job.to_dict()
    assert (data["name"], data["peer"]) == (job.id, None)


def test_event_to_dict() -> None:
    event = models.Event(
        job_id="j1",
        backend="local",
        name="nightly",
        from_state=None,
        to_state=S.QUEUED,
        at=_at(2024, 5, 6, 7, 8, 9, 123000),
        seq=42,
    )
    assert event.to_dict() == {
        "seq": 42,
        "job_id": "j1",
        "backend": "local",
        "name": "nightly",
        "from": None,
        "to": "QUEUED",
        "at": "2024-05-06T07:08:09.123Z",
        "reason": None,
        "exit_code": None,
        "failure": None,
    }
