"""A live daemon fed random and adversarial lines (hypothesis): every line gets exactly one
well-formed reply, nothing crashes or hangs, and other clients — one idle, one stuck mid-line —
keep their connections while a third keeps getting answers."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(300)

MAX_LINE = 4096


class Conn:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def ask(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line + b"\n")
        reply = self.file.readline()
        assert reply.endswith(b"\n"), f"no reply line to {line[:80]!r}"
        value: dict[str, Any] = orjson.loads(reply)
        return value

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="orc-fz-", dir="/tmp"))
    proc = DaemonProcess(root, env={"ORCHESTRATOR__SERVER__MAX_LINE_BYTES": str(MAX_LINE)})
    proc.start()
    yield proc
    proc.close()
    shutil.rmtree(root, ignore_errors=True)


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()  # stdlib: big integers too, which orjson refuses


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
# Requests shaped like the real ones, with any field possibly wrong. No op that runs a command
# from random input: submits use a fixed harmless command or are invalid.
safe_ops = st.sampled_from(["ping", "get", "list", "cancel", "wait", "logs", "bogus", "", "PING"])
requests = st.fixed_dictionaries(
    {"op": safe_ops | json_values},
    optional={
        "v": st.sampled_from([1, 2, "1", None, True]),
        "id": json_values,
        "job_id": json_values,
        "limit": json_values,
        "state": json_values,
        "history": json_values,
        "follow": st.just(False),
    },
)
bad_submits = st.fixed_dictionaries(
    {
        "op": st.just("submit"),
        "job": st.fixed_dictionaries(
            {"command": st.just(["true"])},
            optional={
                "env": json_values,
                "timeout_s": json_values,
                "name": json_values,
                "backend": json_values,
                "idempotency_key": json_values,
                "overrides": json_values,
                "extra": json_values,
                "cwd": st.just("/"),
            },
        ),
    },
    optional={"id": json_values},
)
lines = st.one_of(
    st.binary(max_size=MAX_LINE * 2).map(lambda b: b.replace(b"\n", b" ")),
    requests.map(_dumps),
    bad_submits.map(_dumps),
    json_values.map(_dumps),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from(
        [
            b"{",
            b'{"op": "ping"',
            b"\xff\xfe\xfd",
            b'{"op":"ping","op":"bogus"}',
            b"NaN",
            b'{"x": NaN}',
        ]
    ),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(line=lines)
def test_every_line_gets_one_well_formed_reply_and_others_are_unaffected(
    daemon: DaemonProcess, line: bytes
) -> None:
    idle = Conn(daemon.socket_path)  # a connection that says nothing
    stuck = Conn(daemon.socket_path)
    stuck.sock.sendall(b'{"op": "pi')  # a line that never ends
    fuzz = Conn(daemon.socket_path)
    try:
        if not line.strip():
            line = b"{}"
        reply = fuzz.ask(line)
        assert isinstance(reply.get("ok"), bool)
        assert reply.get("v") == 1
        if not reply["ok"]:
            assert isinstance(reply.get("code"), str)
            assert isinstance(reply.get("message"), str)
            assert reply["code"]
            assert reply["message"]
        # the fuzzed connection is still usable, and so is a fresh one
        assert fuzz.ask(b'{"id": "after", "op": "ping"}')["id"] == "after"
        other = Conn(daemon.socket_path)
        assert other.ask(b'{"id": 1, "op": "ping"}')["pong"] is True
        other.close()
    finally:
        for conn in (idle, stuck, fuzz):
            conn.close()


def test_the_daemon_survived_and_its_store_is_intact(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        assert client.call("ping")["pong"] is True
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    with sqlite3.connect(f"file:{daemon.store_path}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
