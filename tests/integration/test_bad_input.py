"""Hostile and broken input on a real socket: every kind gets a named error, the connection stays
usable where that makes sense, other clients keep being served, and nothing stored is harmed."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator import models
from orchestrator.client import Client
from orchestrator.daemon import Daemon
from orchestrator.testing import make_settings
from tests.support.daemon import running

pytestmark = pytest.mark.timeout(60)


class Raw:
    """A raw connection: write bytes, read reply lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Raw:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=16 * 1024 * 1024)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            line = await self.reader.readline()
        assert line, "connection closed without a reply"
        value: dict[str, Any] = orjson.loads(line)
        return value

    async def ask(self, data: bytes) -> dict[str, Any]:
        await self.send(data)
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):  # the daemon may have hung up first
            await self.writer.wait_closed()


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    settings = make_settings(short_tmp, server={"max_line_bytes": 64 * 1024})
    async with running(settings) as daemon:
        yield daemon


@pytest.fixture
async def raw(daemon: Daemon) -> AsyncIterator[Raw]:
    conn = await Raw.open(daemon.settings.server.socket_path)
    yield conn
    await conn.close()


PING = b'{"v": 1, "id": "p", "op": "ping"}\n'


@pytest.mark.parametrize(
    ("line", "code", "needle", "echoed_id"),
    [
        (b"{not json\n", "invalid_json", "invalid JSON", None),
        (b"\xff\xfe{}\n", "invalid_json", "invalid JSON", None),
        (b'{"id": 1, "op": "ping", "x": NaN}\n', "invalid_json", "invalid JSON", None),
        (b"[1, 2, 3]\n", "invalid_request", "JSON object", None),
        (b'"ping"\n', "invalid_request", "JSON object", None),
        (b'{"id": 7}\n', "invalid_request", "op", 7),
        (b'{"id": 7, "op": "explode"}\n', "unknown_op", "explode", 7),
        (b'{"id": "a", "v": 2, "op": "ping"}\n', "unsupported_version", "version 2", "a"),
        (b'{"id": true, "op": "ping"}\n', "invalid_request", "id", None),
        (b'{"id": 1, "op": "submit"}\n', "invalid_request", "job: required", 1),
        (b'{"id": 1, "op": "submit", "job": {}}\n', "invalid_request", "job.command: required", 1),
        (
            b'{"id": 1, "op": "submit", "job": {"command": []}}\n',
            "invalid_request",
            "job.command",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": "echo hi"}}\n',
            "invalid_request",
            "job.command",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "bogus": 1}}\n',
            "invalid_request",
            "job.bogus: unknown field",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "env": {"A": 1}}}\n',
            "invalid_request",
            "job.env.A",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "timeout_s": "soon"}}\n',
            "invalid_request",
            "job.timeout_s",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "timeout_s": -1}}\n',
            "invalid_request",
            "job.timeout_s",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "backend": "k8s"}}\n',
            "invalid_request",
            "job.backend",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "backend": "ecs"}}\n',
            "backend_unavailable",
            "ecs",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "overrides": {"a": 1}}}\n',
            "invalid_job",
            "job.overrides",
            1,
        ),
        # Specs no process can be started with (issue 11, item 4): refused at submit, named.
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["echo", "a", "b\\u0000c"]}}\n',
            "invalid_request",
            "job.command[2]: must not contain a NUL byte",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "env": {"FOO": "\\u0000"}}}\n',
            "invalid_request",
            "job.env.FOO: must not contain a NUL byte",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "cwd": "/tmp\\u0000x"}}\n',
            "invalid_request",
            "job.cwd: must not contain a NUL byte",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "env": {"F\\u0000O": ""}}}\n',
            "invalid_request",
            "job.env['F\\x00O']: the variable's name must not contain a NUL byte",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "env": {"A=B": "1"}}}\n',
            "invalid_request",
            "job.env['A=B']: the variable's name must not contain '='",
            1,
        ),
        (
            b'{"id": 1, "op": "submit", "job": {"command": ["true"], "env": {"": "1"}}}\n',
            "invalid_request",
            "job.env['']: the variable's name must not be empty",
            1,
        ),
        (b'{"id": 1, "op": "get", "job_id": "nope"}\n', "not_found", "nope", 1),
        (b'{"id": 1, "op": "list", "state": "DONE"}\n', "invalid_request", "state", 1),
        (b'{"id": 1, "op": "list", "limit": 0}\n', "invalid_request", "limit", 1),
        (b"[" * 10_000 + b"]" * 10_000 + b"\n", "invalid_json", "invalid JSON", None),
    ],
)
async def test_bad_line_gets_a_named_error_and_the_connection_survives(
    raw: Raw, line: bytes, code: str, needle: str, echoed_id: object
) -> None:
    reply = await raw.ask(line)
    assert reply["ok"] is False
    assert reply["code"] == code
    assert needle in reply["message"]
    assert reply["id"] == echoed_id
    assert (await raw.ask(PING))["ok"] is True


def _command_of(size: int, cwd: str) -> list[str]:
    """`true` with arguments that make command + cwd take exactly `size` launch bytes."""
    command = ["true"]
    left = size - models.launch_bytes([*command, cwd], {})
    while left > 0:
        arg_len = min(60_000, left - 9)  # each argument costs its bytes, a NUL and a pointer
        command.append("x" * arg_len)
        left -= arg_len + 9
    assert models.launch_bytes([*command, cwd], {}) == size
    return command


async def test_a_launch_over_the_kernels_limits_is_refused_at_submit(short_tmp: Path) -> None:
    """E2BIG: one argument or NAME=value over MAX_ARG_STRLEN, or all of them together over
    what the kernel lets a process start with, is refused with the field named; a spec that
    uses the whole budget is accepted and runs."""
    settings = make_settings(short_tmp, server={"max_line_bytes": 16 * 1024 * 1024})
    budget = models.launch_limit_bytes() - models.LAUNCH_RESERVE_BYTES
    cwd = str(short_tmp)
    refused = {
        # 65,536 two-byte characters: within the length limit, over MAX_ARG_STRLEN in bytes
        "job.command[1]: takes 131073 bytes": {"command": ["echo", "é" * 65536]},
        "job.env.BIG: takes 131073 bytes as NAME=value": {
            "command": ["true"],
            "env": {"BIG": "x" * (models.MAX_ARG_STRLEN - 4)},
        },
        f"job: command, env and cwd take {budget + 1} bytes together": {
            "command": _command_of(budget + 1, cwd),
            "cwd": cwd,
        },
    }
    async with running(settings) as daemon:
        conn = await Raw.open(settings.server.socket_path)
        for needle, spec in refused.items():
            reply = await conn.ask(orjson.dumps({"id": 1, "op": "submit", "job": spec}) + b"\n")
            assert (reply["ok"], reply["code"]) == (False, "invalid_request"), needle
            assert reply["message"].startswith(needle), reply["message"]
        many = [{"command": ["true"]}, *refused.values(), {"command": ["true"]}]
        reply = await conn.ask(orjson.dumps({"id": 2, "op": "submit_many", "jobs": many}) + b"\n")
        assert [r["ok"] for r in reply["results"]] == [True, False, False, False, True]
        assert [
            r["message"][: len(n)] for r, n in zip(reply["results"][1:4], refused, strict=True)
        ] == list(refused)
        whole = {"command": _command_of(budget, cwd), "cwd": cwd}
        reply = await conn.ask(orjson.dumps({"id": 3, "op": "submit", "job": whole}) + b"\n")
        assert reply["ok"] is True, reply
        await conn.close()
        async with Client(settings.server.socket_path) as client:
            final = await client.wait(reply["job"]["id"])
        assert (final["state"], final["exit_code"]) == ("SUCCEEDED", 0), final
        assert await daemon.store.count_by_state() == {"SUCCEEDED": 3}


async def test_oversized_line_is_skipped_whole(raw: Raw) -> None:
    huge = b'{"id": 1, "op": "submit", "job": {"command": ["' + b"x" * 3_000_000 + b'"]}}\n'
    reply = await raw.ask(huge)
    assert (reply["ok"], reply["code"]) == (False, "line_too_long")
    assert "65536" in reply["message"]
    # The tail of the long line must not be read as a request of its own.
    pong = await raw.ask(PING)
    assert (pong["id"], pong["ok"]) == ("p", True)


async def test_blank_lines_are_ignored_and_unterminated_last_line_is_answered(
    daemon: Daemon,
) -> None:
    conn = await Raw.open(daemon.settings.server.socket_path)
    await conn.send(b"\n  \n" + PING.rstrip(b"\n"))
    conn.writer.write_eof()
    assert (await conn.reply())["id"] == "p"
    await conn.close()


async def test_garbage_and_a_stalled_client_do_not_starve_others(daemon: Daemon) -> None:
    path = daemon.settings.server.socket_path
    stalled = await Raw.open(path)
    await stalled.send(b'{"id": 1, "op": "submit", "job": {"command": ["tr')  # never finished
    noisy = await Raw.open(path)
    for _ in range(50):
        await noisy.send(os.urandom(512).replace(b"\n", b" ") + b"\n")
    async with Client(path) as client:
        job = await client.submit({"command": ["true"]})
        assert (await client.wait(job["id"]))["state"] == "SUCCEEDED"
        assert [j["id"] for j in await client.list()] == [job["id"]]
    errors = [await noisy.reply() for _ in range(50)]
    assert all(not reply["ok"] for reply in errors)
    await stalled.close()
    await noisy.close()


async def test_many_pipelined_requests_on_one_connection_all_get_their_own_reply(
    raw: Raw,
) -> None:
    lines = b"".join(
        orjson.dumps({"id": i, "op": "submit", "job": {"command": ["true"], "name": f"n{i}"}})
        + b"\n"
        for i in range(300)
    )
    await raw.send(lines)
    replies = [await raw.reply() for _ in range(300)]
    assert sorted(r["id"] for r in replies) == list(range(300))
    assert all(r["job"]["name"] == f"n{r['id']}" for r in replies)
    assert len({r["job"]["id"] for r in replies}) == 300


async def test_a_burst_of_submissions_keeps_each_outcome_apart(raw: Raw) -> None:
    """Submissions that arrive together are committed together; each still gets its own
    outcome: a bad spec, a repeated key and a key conflict do not touch their neighbours."""
    keyed = {"command": ["true"], "idempotency_key": "burst"}
    jobs: list[Any] = [{"command": ["true"], "name": f"n{i}"} for i in range(40)]
    jobs[10] = {"command": "not a list"}
    jobs[20] = keyed
    jobs[30] = keyed
    jobs[35] = {**keyed, "command": ["false"]}
    await raw.send(
        b"".join(
            orjson.dumps({"id": i, "op": "submit", "job": job}) + b"\n"
            for i, job in enumerate(jobs)
        )
    )
    replies = {r["id"]: r for r in [await raw.reply() for _ in jobs]}
    assert replies[10]["code"] == "invalid_request"
    assert replies[20]["created"] is True
    assert (replies[30]["created"], replies[30]["job"]["id"]) == (False, replies[20]["job"]["id"])
    assert replies[35]["code"] == "idempotency_conflict"
    plain = [replies[i] for i in range(40) if i not in (10, 20, 30, 35)]
    assert all(r["ok"] and r["created"] and r["job"]["name"] == f"n{r['id']}" for r in plain)
    listed = (await raw.ask(b'{"id": "l", "op": "list"}\n'))["jobs"]
    assert len(listed) == len(plain) + 1


async def test_idle_connection_is_closed_with_a_reason(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, server={"idle_timeout_s": 0.2})
    async with running(settings):
        conn = await Raw.open(settings.server.socket_path)
        reply = await conn.reply()
        assert (reply["ok"], reply["code"]) == (False, "idle_timeout")
        async with asyncio.timeout(5):
            assert await conn.reader.read() == b""
        await conn.close()


async def test_peer_not_in_the_allow_list_is_refused_and_changes_nothing(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, server={"allowed_uids": [os.getuid() + 4242]})
    async with running(settings) as daemon:
        conn = await Raw.open(settings.server.socket_path)
        reply = await conn.reply()
        assert (reply["ok"], reply["code"]) == (False, "forbidden")
        assert f"uid {os.getuid()}" in reply["message"]
        await conn.close()
        assert await daemon.store.count_by_state() == {}


async def test_connections_per_peer_are_capped(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, server={"max_connections_per_peer": 2})
    async with running(settings):
        path = settings.server.socket_path
        first, second = await Raw.open(path), await Raw.open(path)
        assert (await first.ask(PING))["ok"]
        assert (await second.ask(PING))["ok"]
        third = await Raw.open(path)
        reply = await third.reply()
        assert (reply["ok"], reply["code"]) == (False, "overloaded")
        await third.close()
        await first.close()
        for conn in (second,):
            assert (await conn.ask(PING))["ok"]
            await conn.close()


async def test_socket_file_is_0660_in_a_private_directory(daemon: Daemon) -> None:
    path = daemon.settings.server.socket_path
    assert path.stat().st_mode & 0o777 == 0o660
    assert not any(p.name.startswith(".o.sock") for p in path.parent.iterdir())


async def test_a_flood_of_connections_is_refused_beyond_the_cap_without_starving_others(
    short_tmp: Path,
) -> None:
    settings = make_settings(
        short_tmp, server={"max_connections": 20, "max_connections_per_peer": 1000}
    )
    async with running(settings):
        path = settings.server.socket_path
        steady = await Raw.open(path)
        assert (await steady.ask(PING))["ok"]
        flood = [await Raw.open(path) for _ in range(60)]
        answers = await asyncio.gather(*(_first_reply(conn) for conn in flood))
        refused = [a for a in answers if not a["ok"]]
        assert {a["code"] for a in refused} == {"overloaded"}
        assert len(refused) >= 60 - 19
        assert (await steady.ask(PING))["ok"]  # the established client is still served
        for conn in flood:
            await conn.close()
        await steady.close()


async def _first_reply(conn: Raw) -> dict[str, Any]:
    """A refused connection is answered (and closed) before it asks anything; an accepted one
    says nothing until asked."""
    try:
        async with asyncio.timeout(1.0):
            line = await conn.reader.readline()
    except TimeoutError:
        return await conn.ask(PING)
    value: dict[str, Any] = orjson.loads(line)
    return value


async def test_submit_many_rejects_only_the_bad_specs(raw: Raw) -> None:
    jobs = [
        {"command": ["true"], "name": "good-1"},
        {"command": "true"},
        {"command": ["true"], "bogus": 1},
        {"command": ["true"], "name": "good-2", "idempotency_key": "k"},
        {"command": ["false"], "idempotency_key": "k"},
        "not an object",
    ]
    reply = await raw.ask(orjson.dumps({"id": 9, "op": "submit_many", "jobs": jobs}) + b"\n")
    assert (reply["id"], reply["ok"]) == (9, True)
    results = reply["results"]
    assert [r["ok"] for r in results] == [True, False, False, True, False, False]
    assert [r.get("name") for r in results if r["ok"]] == ["good-1", "good-2"]
    assert "job.command" in results[1]["message"]
    assert "job.bogus: unknown field" in results[2]["message"]
    assert results[4]["code"] == "idempotency_conflict"
    assert results[5]["code"] == "invalid_request"
    names = sorted(j["name"] for j in (await raw.ask(b'{"id": 11, "op": "list"}\n'))["jobs"])
    assert names == ["good-1", "good-2"]


async def test_submit_many_finds_a_key_repeated_in_the_same_request(raw: Raw) -> None:
    """Jobs are written in runs; a key already used earlier in the run must still be found."""
    same = {"command": ["true"], "name": "once", "idempotency_key": "twice-in-one"}
    jobs = [{"command": ["true"], "name": "before"}, same, {"command": ["true"]}, same]
    reply = await raw.ask(orjson.dumps({"id": 3, "op": "submit_many", "jobs": jobs}) + b"\n")
    results = reply["results"]
    assert [r["ok"] for r in results] == [True, True, True, True]
    assert [r["created"] for r in results] == [True, True, True, False]
    assert results[3]["id"] == results[1]["id"]
    listed = (await raw.ask(b'{"id": 4, "op": "list"}\n'))["jobs"]
    assert sorted(j["name"] for j in listed) == sorted(["before", "once", results[2]["id"]])


async def test_a_request_past_its_deadline_is_answered_timeout_and_the_rest_go_on(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(short_tmp, server={"request_timeout_s": 0.3})
    async with running(settings) as daemon:
        stuck = asyncio.Event()

        async def never(*_: Any, **__: Any) -> dict[str, object]:
            await stuck.wait()
            return {}

        monkeypatch.setattr(daemon.api, "ping", never)  # a unary op that hangs
        conn = await Raw.open(settings.server.socket_path)
        await conn.send(b'{"id": "slow", "op": "ping"}\n')
        submitted = await conn.ask(
            b'{"id": "fast", "op": "submit", "job": {"command": ["true"]}}\n'
        )
        assert (submitted["id"], submitted["ok"]) == ("fast", True)
        late = await conn.reply()
        assert (late["id"], late["ok"], late["code"]) == ("slow", False, "timeout")
        assert "ping took longer than 0.3s" in late["message"]
        listed = await conn.ask(b'{"id": "after", "op": "list"}\n')
        assert (listed["id"], len(listed["jobs"])) == ("after", 1)
        await conn.close()
