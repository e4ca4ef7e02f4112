"""`orchestrator.protocol`: request decoding, its error replies, and reply lines."""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import errors, models, protocol

S = models.JobState


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _bad(line: bytes) -> errors.BadRequest:
    with pytest.raises(errors.BadRequest) as info:
        protocol.decode(line)
    return info.value


# --- valid requests --------------------------------------------------------------------------


VALID_CASES: list[tuple[dict[str, Any], protocol.Request]] = [
    ({"v": 1, "id": 1, "op": "ping"}, protocol.Request(1, "ping", protocol.Ping())),
    (
        {"id": "a", "op": "submit", "job": {"command": ["echo", "hi"], "timeout_s": 5}},
        protocol.Request(
            "a",
            "submit",
            protocol.Submit(job=models.JobSpec(command=["echo", "hi"], timeout_s=5.0)),
        ),
    ),
    (
        {"id": "b", "op": "submit_many", "jobs": [{"command": ["x"]}, "junk"]},
        protocol.Request(
            "b", "submit_many", protocol.SubmitMany(jobs=[{"command": ["x"]}, "junk"])
        ),
    ),
    (
        {"id": 2, "op": "get", "job_id": "j1", "history": True},
        protocol.Request(2, "get", protocol.Get(job_id="j1", history=True)),
    ),
    (
        {"id": 3, "op": "list", "state": ["RUNNING", "QUEUED"], "backend": "ecs", "limit": 5},
        protocol.Request(
            3,
            "list",
            protocol.ListJobs(state=[S.RUNNING, S.QUEUED], backend="ecs", limit=5),
        ),
    ),
    ({"id": 4, "op": "list"}, protocol.Request(4, "list", protocol.ListJobs())),
    (
        {"id": 5, "op": "cancel", "job_id": "j1"},
        protocol.Request(5, "cancel", protocol.Cancel(job_id="j1")),
    ),
    (
        {"id": 6, "op": "wait", "job_id": "j1"},
        protocol.Request(6, "wait", protocol.Wait(job_id="j1")),
    ),
    ({"id": 7, "op": "watch"}, protocol.Request(7, "watch", protocol.Watch())),
    (
        {"id": 8, "op": "watch", "job_id": "j1"},
        protocol.Request(8, "watch", protocol.Watch(job_id="j1")),
    ),
    (
        {"id": 9, "op": "logs", "job_id": "j1", "follow": True},
        protocol.Request(9, "logs", protocol.Logs(job_id="j1", follow=True)),
    ),
    (
        {"id": 10, "op": "watch", "since": 41},
        protocol.Request(10, "watch", protocol.Watch(since=41)),
    ),
    (
        {"id": 11, "op": "logs", "job_id": "j", "cursor": {"stdout": 3, "stderr": 0}, "attempt": 2},
        protocol.Request(
            11,
            "logs",
            protocol.Logs(job_id="j", cursor={"stdout": 3, "stderr": 0}, attempt=2),
        ),
    ),
    (
        {"id": 12, "op": "logs", "job_id": "j", "cursor": "f/3849/s", "attempt": 1},
        protocol.Request(12, "logs", protocol.Logs(job_id="j", cursor="f/3849/s", attempt=1)),
    ),
    ({"op": "ping"}, protocol.Request(None, "ping", protocol.Ping())),
    ({"id": 3, "op": "shutdown"}, protocol.Request(3, "shutdown", protocol.Shutdown())),
    (
        {"id": 20, "op": "top", "state": "RUNNING", "backend": "ecs", "limit": 5, "failures": 0},
        protocol.Request(
            20, "top", protocol.Top(state=[S.RUNNING], backend="ecs", limit=5, failures=0)
        ),
    ),
]


@pytest.mark.parametrize(
    ("request_obj", "expected"),
    VALID_CASES,
    ids=[f"{obj['op']}-{i}" for i, (obj, _) in enumerate(VALID_CASES)],
)
def test_valid_requests_decode(request_obj: dict[str, Any], expected: protocol.Request) -> None:
    assert protocol.decode(_line(request_obj)) == expected


def test_every_op_is_covered() -> None:
    # Keeps the tables in this file honest when an op is added.
    assert {expected.op for _, expected in VALID_CASES} == set(protocol.OPS)
    assert set(PARAMS) == set(protocol.OPS)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("RUNNING", [S.RUNNING]),
        (["RUNNING"], [S.RUNNING]),
        (["QUEUED", "LOST"], [S.QUEUED, S.LOST]),
        ([], []),
    ],
)
def test_list_takes_one_state_or_many(state: object, expected: list[models.JobState]) -> None:
    request = protocol.decode(_line({"id": 1, "op": "list", "state": state}))
    assert request.params == protocol.ListJobs(state=expected)


@pytest.mark.parametrize("state", ["running", "BOGUS", ["RUNNING", 1], 3, {"RUNNING": 1}])
def test_list_rejects_bad_states(state: object) -> None:
    bad = _bad(_line({"id": 1, "op": "list", "state": state}))
    assert (bad.request_id, bad.error.code) == (1, "invalid_request")
    assert bad.error.message.startswith("state")


def test_request_builder_round_trips() -> None:
    line = protocol.request("get", "r-1", job_id="j1", history=False)
    assert line.endswith(b"\n")
    assert protocol.decode(line) == protocol.Request("r-1", "get", protocol.Get(job_id="j1"))


def test_duplicate_keys_last_one_wins() -> None:
    request = protocol.decode(b'{"op": "get", "id": 1, "job_id": "a", "job_id": "b", "id": 2}')
    assert request == protocol.Request(2, "get", protocol.Get(job_id="b"))


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{",
        b'{"op": "ping"',
        b"NaN",
        b'{"op": "ping", "id": NaN}',
        b'{"op": "ping", "id": Infinity}',
        b'{"op": "ping", "id": 1e400}',
        b'{"op": "ping", "id": 1,}',
        b"{'op': 'ping'}",
        b'{"op": "ping", "id": "\xff"}',
        b"\xef\xbb\xbf\xff\xfe",
        b"[" * 10_000 + b"]" * 10_000,
        b'{"op": "ping", "id": 1, "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    ],
    ids=[
        "empty",
        "open-brace",
        "truncated",
        "nan",
        "nan-in-object",
        "infinity",
        "too-big-float",
        "trailing-comma",
        "single-quotes",
        "invalid-utf8",
        "garbage",
        "deep-array",
        "deep-array-in-object",
    ],
)
def test_invalid_json(line: bytes) -> None:
    bad = _bad(line)
    assert (bad.request_id, bad.error.code) == (None, "invalid_json")
    assert isinstance(bad.error, errors.InvalidJson)
    assert bad.error.message.startswith("invalid JSON")


@pytest.mark.parametrize(
    "line", [b"[]", b'[{"op": "ping"}]', b"1", b"-2.5", b'"ping"', b"null", b"true"]
)
def test_top_level_must_be_an_object(line: bytes) -> None:
    bad = _bad(line)
    assert (bad.request_id, bad.error.code) == (None, "invalid_request")
    assert bad.error.message == "a request must be a JSON object"


@pytest.mark.parametrize("request_id", [True, False, 1.5, [1], {"a": 1}])
def test_id_must_be_a_string_or_an_integer(request_id: object) -> None:
    bad = _bad(_line({"id": request_id, "op": "ping"}))
    assert (bad.request_id, bad.error.code) == (None, "invalid_request")
    assert bad.error.message.startswith("id:")


@pytest.mark.parametrize("version", [0, 2, "1", None, [1]])
def test_unsupported_version(version: object) -> None:
    bad = _bad(_line({"v": version, "id": "x", "op": "ping"}))
    assert (bad.request_id, bad.error.code) == ("x", "unsupported_version")
    assert isinstance(bad.error, errors.UnsupportedVersion)
    assert repr(version) in bad.error.message


def test_boolean_version_is_unsupported() -> None:
    bad = _bad(_line({"v": True, "id": "x", "op": "ping"}))
    assert bad.error.code == "unsupported_version"


@pytest.mark.parametrize("op", [None, 1, ["ping"], "missing"])
def test_op_is_required_and_a_string(op: object) -> None:
    obj: dict[str, Any] = {"id": 7}
    if op != "missing":
        obj["op"] = op
    bad = _bad(_line(obj))
    assert (bad.request_id, bad.error.code) == (7, "invalid_request")
    assert bad.error.message.startswith("op:")


@pytest.mark.parametrize("op", ["nope", "PING", "", "submit "])
def test_unknown_op(op: str) -> None:
    bad = _bad(_line({"id": "r", "op": op}))
    assert (bad.request_id, bad.error.code) == ("r", "unknown_op")
    assert isinstance(bad.error, errors.UnknownOperation)
    assert (bad.error.op, bad.error.message) == (op, f"unknown op {op!r}")


@pytest.mark.parametrize(
    ("request_obj", "message"),
    [
        ({"op": "submit"}, "job: required"),
        ({"op": "submit", "job": {}}, "job.command: required"),
        ({"op": "submit", "job": {"command": "ls"}}, "job.command: Input should be a valid list"),
        ({"op": "submit", "job": {"command": []}}, "job.command: "),
        ({"op": "submit", "job": {"command": ["ls", 1]}}, "job.command[1]: "),
        ({"op": "submit", "job": {"command": ["ls"], "bogus": 1}}, "job.bogus: unknown field"),
        ({"op": "submit", "job": {"command": ["ls"], "env": {"A": 1}}}, "job.env.A: "),
        ({"op": "submit", "job": {"command": ["ls"], "timeout_s": "5"}}, "job.timeout_s: "),
        ({"op": "submit", "job": {"command": ["ls"], "timeout_s": -1}}, "job.timeout_s: "),
        ({"op": "submit", "job": {"command": ["ls"], "name": "-x"}}, "job.name: "),
        ({"op": "get"}, "job_id: required"),
        ({"op": "get", "job_id": ""}, "job_id: "),
        ({"op": "get", "job_id": 5}, "job_id: "),
        ({"op": "get", "job_id": "j", "history": "yes"}, "history: "),
        ({"op": "list", "limit": 0}, "limit: "),
        ({"op": "list", "limit": "5"}, "limit: "),
        ({"op": "ping", "extra": 1}, "extra: unknown field"),
        ({"op": "logs", "job_id": "j", "follow": 1}, "follow: "),
        ({"op": "watch", "since": -1}, "since: "),
        ({"op": "logs", "job_id": "j", "cursor": "x"}, "attempt: goes with cursor"),
        ({"op": "logs", "job_id": "j", "attempt": 2}, "attempt: goes with cursor"),
        ({"op": "logs", "job_id": "j", "cursor": {"stdout": 1}, "attempt": 1}, "cursor: a local"),
        (
            {"op": "logs", "job_id": "j", "cursor": {"stdout": -1, "stderr": 0}, "attempt": 1},
            "cursor",
        ),
    ],
)
def test_invalid_params_name_the_field(request_obj: dict[str, Any], message: str) -> None:
    bad = _bad(_line({"id": 42, **request_obj}))
    assert (bad.request_id, bad.error.code) == (42, "invalid_request")
    assert isinstance(bad.error, errors.InvalidRequest)
    assert bad.error.message.startswith(message), bad.error.message
    assert str(bad) == bad.error.message


def test_every_problem_is_reported() -> None:
    bad = _bad(_line({"id": 1, "op": "submit", "job": {"command": [], "bogus": 1, "env": 3}}))
    problems = [part.split(":")[0] for part in bad.error.message.split("; ")]
    assert sorted(problems) == ["job.bogus", "job.command", "job.env"]


def test_string_id_is_echoed_on_error() -> None:
    assert _bad(_line({"id": "abc", "op": "get"})).request_id == "abc"


# --- robustness: decode returns a Request or raises BadRequest, nothing else ------------------


def _decode_or_bad_request(line: bytes) -> None:
    outcome: protocol.Request | errors.BadRequest
    try:
        outcome = protocol.decode(line)
    except errors.BadRequest as bad:
        outcome = bad
    if isinstance(outcome, errors.BadRequest):
        assert isinstance(outcome.error, errors.ProtocolError | errors.InvalidJob)
        assert outcome.request_id is None or type(outcome.request_id) in (str, int)
        assert outcome.error.code in {
            "invalid_json",
            "invalid_request",
            "unknown_op",
            "unsupported_version",
        }
    else:
        assert isinstance(outcome, protocol.Request)
        assert outcome.op in protocol.OPS
        assert isinstance(outcome.params, protocol.OPS[outcome.op])


@given(st.binary(max_size=512))
def test_decode_survives_arbitrary_bytes(line: bytes) -> None:
    _decode_or_bad_request(line)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=8,
)


def _or_junk(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well-typed values, sometimes any JSON at all."""
    return st.one_of(valid, valid, valid, json_values)


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,10}", fullmatch=True)
job_specs = st.fixed_dictionaries(
    {"command": _or_junk(st.lists(st.text(max_size=5), min_size=1, max_size=3))},
    optional={
        "name": _or_junk(names),
        "env": _or_junk(st.dictionaries(st.from_regex(r"[A-Z_]{1,4}", fullmatch=True), st.text())),
        "timeout_s": _or_junk(st.integers() | st.floats(allow_nan=False)),
        "queue_timeout_s": _or_junk(st.floats(min_value=0.001, max_value=1e9)),
        "backend": _or_junk(st.sampled_from(["local", "ecs", "batch"])),
        "idempotency_key": _or_junk(st.text(max_size=8)),
        "overrides": _or_junk(st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
    },
)
job_ids = _or_junk(st.text(min_size=1, max_size=8))
flags = _or_junk(st.booleans())
states = st.sampled_from([state.value for state in S])
PARAMS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "ping": {},
    "shutdown": {},
    "submit": {"job": _or_junk(job_specs)},
    "submit_many": {"jobs": _or_junk(st.lists(_or_junk(job_specs), min_size=1, max_size=3))},
    "get": {"job_id": job_ids, "history": flags},
    "list": {
        "state": _or_junk(states | st.lists(states, max_size=3)),
        "backend": _or_junk(st.text(max_size=5)),
        "limit": _or_junk(st.integers()),
    },
    "cancel": {"job_id": job_ids},
    "wait": {"job_id": job_ids},
    "watch": {"job_id": job_ids, "since": st.integers(min_value=-2, max_value=2**70)},
    "logs": {
        "job_id": job_ids,
        "follow": flags,
        "cursor": st.one_of(
            st.text(max_size=8),
            st.fixed_dictionaries({"stdout": st.integers(), "stderr": st.integers()}),
        ),
        "attempt": st.integers(min_value=-1, max_value=3),
    },
    "top": {
        "state": _or_junk(states | st.lists(states, max_size=3)),
        "backend": _or_junk(st.text(max_size=5)),
        "limit": _or_junk(st.integers()),
        "failures": _or_junk(st.integers()),
    },
}
REQUIRED = {"job", "jobs", "job_id"}  # mostly present; their absence is tested above


def _request_for(op: str) -> st.SearchStrategy[dict[str, Any]]:
    """A request for `op`: its params mostly well typed (the optional ones present or not); an
    id and a version that are mostly right."""
    required = {"op": st.just(op)}
    optional = {"v": _or_junk(st.just(1)), "id": _or_junk(st.integers() | st.text(max_size=8))}
    for name, values in PARAMS[op].items():
        target = required if name in REQUIRED else optional
        target[name] = values
    return st.fixed_dictionaries(required, optional=optional)


known_op_requests = st.sampled_from(sorted(protocol.OPS)).flatmap(_request_for)
odd_requests = st.fixed_dictionaries(
    {"op": st.one_of(st.just("nope"), json_values)},
    optional={"v": json_values, "id": json_values, "stray": json_values},
)
requests = st.one_of(known_op_requests, known_op_requests, known_op_requests, odd_requests)


@hypothesis.settings(deadline=None)  # generation-heavy; pytest-timeout still bounds it
@given(json_values)
def test_decode_survives_arbitrary_json(value: object) -> None:
    _decode_or_bad_request(json.dumps(value).encode())


@hypothesis.settings(deadline=None)
@given(requests)
def test_decode_survives_request_shaped_json(value: dict[str, Any]) -> None:
    # json.dumps writes ints of any size and non-finite floats as bare literals; both must end
    # in a Request or a BadRequest.
    _decode_or_bad_request(json.dumps(value).encode())


# --- reply lines -----------------------------------------------------------------------------


request_ids = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text()


@given(request_id=request_ids, message=st.text())
def test_reply_lines_are_one_line_and_parse_back(
    request_id: protocol.RequestId, message: str
) -> None:
    lines = {
        "reply": protocol.reply(request_id, note=message),
        "end": protocol.end(request_id, note=message),
        "error": protocol.error(request_id, "invalid_request", message),
    }
    for kind, line in lines.items():
        assert line.endswith(b"\n"), kind
        assert line.count(b"\n") == 1, kind
        data = protocol.parse_reply(line)
        assert (data["v"], data["id"], data["ok"]) == (1, request_id, kind != "error")


def test_reply_shapes() -> None:
    parsed = [
        protocol.parse_reply(protocol.reply(1, job={"id": "j"})),
        protocol.parse_reply(protocol.end("w", count=2)),
        protocol.parse_reply(protocol.error(None, "unknown_op", "unknown op 'x'", op="x")),
    ]
    assert parsed == [
        {"v": 1, "id": 1, "ok": True, "job": {"id": "j"}},
        {"v": 1, "id": "w", "ok": True, "end": True, "count": 2},
        {
            "v": 1,
            "id": None,
            "ok": False,
            "code": "unknown_op",
            "message": "unknown op 'x'",
            "op": "x",
        },
    ]


def test_error_reply_from_a_bad_request() -> None:
    bad = _bad(b'{"id": 9, "op": "submit", "job": {}}')
    line = protocol.error(bad.request_id, bad.error.code, bad.error.message)
    assert orjson.loads(line) == {
        "v": 1,
        "id": 9,
        "ok": False,
        "code": "invalid_request",
        "message": "job.command: required",
    }


@pytest.mark.parametrize(
    "line", [b"{", b"[]", b"1", b'"ok"', b'{"v": 1, "id": 1}', b'{"op": "ping"}']
)
def test_parse_reply_rejects_non_replies(line: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        protocol.parse_reply(line)
