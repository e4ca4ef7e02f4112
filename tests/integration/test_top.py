"""`orchestrator top`'s data source, the `top` operation, over the real socket of a real daemon
(fake backends): counts, the jobs listed, the last failures, lanes, AWS telemetry, health,
filters, and who sees what. Then what the screen makes of a snapshot (`top.View`, `render`)."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from orchestrator import errors, events, models, snapshot, top
from orchestrator.backends import base
from orchestrator.client import Client, SyncClient
from orchestrator.testing import FakeBackend, InMemoryStore, Script, make_settings
from tests.support.daemon import running, until_state
from tests.support.peers import PeerClient, open_to_others

pytestmark = pytest.mark.timeout(60)
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run clients as other uids")

S = models.JobState
A, B = 4242, 4343  # made-up uids: no passwd entry needed
SCRIPTS = {
    "long": Script(states=(S.RUNNING,)),  # runs until stopped
    "breaks": Script(states=(S.RUNNING, S.FAILED), exit_code=3),
}


@dataclass
class AwsLikeFake(FakeBackend):
    """A fake that reports AWS calls and token buckets, as the ECS backend does."""

    def telemetry(self) -> base.Telemetry:
        return base.Telemetry(
            calls=[("ecs", "RunTask", 7, 2), ("logs", "GetLogEvents", 3, 0)],
            buckets=[("ecs.run_task", 5.0, 10.0), ("ecs.describe", 20.0, 20.0)],
        )


@dataclass
class Daemon:
    socket_path: Path
    ids: dict[str, str]  # job name → id


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    """local: one slot, holding `long` (RUNNING) with `waiting` QUEUED behind it, after
    `breaks` FAILED (exit 3); ecs: nothing yet, AWS telemetry."""
    settings = make_settings(short_tmp, server={"allowed_uids": [0, A, B]})
    local = FakeBackend(max_in_flight=1, scripts=SCRIPTS)
    ecs = AwsLikeFake(name="ecs", scripts=SCRIPTS)
    async with (
        running(settings, backends={"local": local, "ecs": ecs}),
        Client(settings.server.socket_path) as client,
    ):
        ids = {}
        for name, state in (("breaks", "FAILED"), ("long", "RUNNING"), ("waiting", "QUEUED")):
            job = await client.submit({"command": ["x"], "name": name})
            ids[name] = job["id"]
            await until_state(client, job["id"], state)
        yield Daemon(settings.server.socket_path, ids)


async def test_a_snapshot_has_counts_jobs_failures_lanes_aws_and_health(daemon: Daemon) -> None:
    async with Client(daemon.socket_path) as client:
        reply = await client.top()
    assert reply["jobs_by_state"] == {
        **{state.value: 0 for state in S},
        "QUEUED": 1,
        "RUNNING": 1,
        "FAILED": 1,
    }
    # The unfinished jobs, newest first, with what a line of the screen shows.
    assert [(j["name"], j["state"], j["attempt"], j["backend"]) for j in reply["jobs"]] == [
        ("waiting", "QUEUED", 0, "local"),
        ("long", "RUNNING", 1, "local"),
    ]
    long = reply["jobs"][1]
    assert long["id"] == daemon.ids["long"]
    assert set(long) == {
        "id",
        "name",
        "backend",
        "state",
        "attempt",
        "attempts",
        "created_at",
        "since",
        "updated_at",
        "exit_code",
        "failure",
        "reason",
    }
    assert long["created_at"] <= long["since"] <= reply["at"]
    (failed,) = reply["failures"]
    assert (failed["name"], failed["state"], failed["exit_code"]) == ("breaks", "FAILED", 3)
    assert failed["failure"] == "user"
    assert failed["reason"] is None  # the fake gives none (the local backend: "exit code 3")
    assert reply["lanes"] == {
        "ecs": {"in_flight": 0, "queued": 0},
        "local": {"in_flight": 1, "queued": 1},
    }
    assert reply["backends"] == ["ecs", "local"]
    assert reply["aws"] == {
        "calls": [
            {
                "backend": "ecs",
                "service": "ecs",
                "operation": "RunTask",
                "calls": 7,
                "throttles": 2,
            },
            {
                "backend": "ecs",
                "service": "logs",
                "operation": "GetLogEvents",
                "calls": 3,
                "throttles": 0,
            },
        ],
        "buckets": [
            {
                "backend": "ecs",
                "bucket": "ecs.run_task",
                "rate_per_s": 5.0,
                "configured_rate_per_s": 10.0,
            },
            {
                "backend": "ecs",
                "bucket": "ecs.describe",
                "rate_per_s": 20.0,
                "configured_rate_per_s": 20.0,
            },
        ],
    }
    assert (reply["status"], reply["problems"]) == ("ok", [])
    assert reply["pid"] == os.getpid()
    assert reply["filter"] == {"state": None, "backend": None}


async def test_filters_narrow_the_lists_not_the_counts(daemon: Daemon) -> None:
    async with Client(daemon.socket_path) as client:
        running_only = await client.top(["RUNNING"])
        assert [j["name"] for j in running_only["jobs"]] == ["long"]
        assert running_only["filter"] == {"state": ["RUNNING"], "backend": None}
        assert sum(running_only["jobs_by_state"].values()) == 3
        # A finished state lists finished jobs.
        assert [j["name"] for j in (await client.top(["FAILED"]))["jobs"]] == ["breaks"]
        on_ecs = await client.top(backend="ecs")
        assert (on_ecs["jobs"], on_ecs["failures"]) == ([], [])
        ecs_job = await client.submit({"command": ["x"], "name": "long", "backend": "ecs"})
        await until_state(client, ecs_job["id"], "RUNNING")
        on_ecs = await client.top(backend="ecs")
        assert [j["id"] for j in on_ecs["jobs"]] == [ecs_job["id"]]
        assert on_ecs["lanes"]["ecs"] == {"in_flight": 1, "queued": 0}
        assert [j["name"] for j in (await client.top(limit=1))["jobs"]] == ["long"]
        assert (await client.top(failures=0))["failures"] == []
        for bad in ({"limit": 0}, {"limit": 501}, {"state": "NOPE"}, {"failures": -1}):
            with pytest.raises(errors.RemoteError) as refused:
                await client.call("top", **bad)
            assert refused.value.remote_code == "invalid_request"


async def test_the_sync_client_asks_for_it_too(daemon: Daemon) -> None:
    def ask() -> dict[str, Any]:
        with SyncClient(daemon.socket_path, timeout_s=10) as client:
            return client.top(["QUEUED", "RUNNING"], "local", limit=5, failures=1)

    reply = await asyncio.to_thread(ask)
    assert [j["name"] for j in reply["jobs"]] == ["waiting", "long"]
    assert [j["name"] for j in reply["failures"]] == ["breaks"]


@needs_root
async def test_a_peer_sees_only_its_own_jobs_and_not_the_lanes(daemon: Daemon) -> None:
    open_to_others(daemon.socket_path)
    async with PeerClient(A, daemon.socket_path) as a, PeerClient(B, daemon.socket_path) as b:
        mine = await a.call("submit", job={"command": ["x"], "name": "long", "backend": "ecs"})
        mine_id = mine["job"]["id"]
        failed = await a.call("submit", job={"command": ["x"], "name": "breaks", "backend": "ecs"})
        async with Client(daemon.socket_path) as admin:
            await until_state(admin, mine_id, "RUNNING")
            await until_state(admin, failed["job"]["id"], "FAILED")
            everything = await admin.top()
        seen_by_a = await a.call("top")
        assert seen_by_a["ok"], seen_by_a
        assert [j["id"] for j in seen_by_a["jobs"]] == [mine_id]
        assert [j["id"] for j in seen_by_a["failures"]] == [failed["job"]["id"]]
        assert {k: v for k, v in seen_by_a["jobs_by_state"].items() if v} == {
            "RUNNING": 1,
            "FAILED": 1,
        }
        assert seen_by_a["lanes"] is None  # every user's jobs in flight: the admins' business
        assert seen_by_a["aws"] == everything["aws"]  # the daemon's own, as is its health
        assert seen_by_a["status"] == "ok"
        seen_by_b = await b.call("top")
        assert (seen_by_b["jobs"], seen_by_b["failures"]) == ([], [])
        assert sum(seen_by_b["jobs_by_state"].values()) == 0
        assert {j["id"] for j in everything["jobs"]} >= {mine_id, daemon.ids["long"]}


# -- the snapshot alone, over a store in memory ---------------------------------------------


async def _store_with_two_users() -> tuple[InMemoryStore, dict[str, str]]:
    clock = iter(float(t) for t in range(1_000, 2_000))
    store = InMemoryStore(events.Hub(), clock=lambda: next(clock))
    await store.open()
    ids = {}
    for name, uid in (("a-old", A), ("b-run", B), ("a-run", A), ("a-fail", A), ("b-fail", B)):
        peer = models.Peer(uid=uid, gid=uid, pid=1)
        (outcome,) = await store.accept_many(
            [(models.JobSpec(command=["x"], name=name), "local")], peer
        )
        assert isinstance(outcome, tuple), outcome
        ids[name] = outcome[0].id
    await store.transition(ids["b-run"], S.QUEUED, S.RUNNING)
    await store.transition(ids["a-run"], S.QUEUED, S.RUNNING)
    for name in ("b-fail", "a-fail", "a-old"):  # ended in this order: a-old last
        await store.transition(
            ids[name], S.QUEUED, S.FAILED, reason=f"{name} broke", info={"failure": "start"}
        )
    return store, ids


@pytest.mark.parametrize("in_lanes", [2, snapshot.UNFINISHED_READ_MAX + 1])
async def test_the_snapshot_of_a_peer_holds_its_own_jobs_alone(in_lanes: int) -> None:
    # Both ways to the unfinished jobs: read whole (few in the lanes) and listed by the store.
    store, _ = await _store_with_two_users()
    lanes = {"local": snapshot.Lane(in_flight=in_lanes, queued=0)}

    async def build(owner: int | None, **query: Any) -> dict[str, Any]:
        return await snapshot.build(
            store,
            snapshot.Query(**query),
            owner=owner,
            telemetry={"local": base.Telemetry()},
            lanes=lanes,
            show_lanes=owner is None,
            problems=[],
            now=3_000.0,
        )

    of_a = await build(A)
    assert [j["name"] for j in of_a["jobs"]] == ["a-run"]
    assert [j["name"] for j in of_a["failures"]] == ["a-old", "a-fail"]  # the last ended first
    assert of_a["failures"][0]["failure"] == "start"
    assert {k: v for k, v in of_a["jobs_by_state"].items() if v} == {"RUNNING": 1, "FAILED": 2}
    assert of_a["lanes"] is None
    everyone = await build(None)
    assert [j["name"] for j in everyone["jobs"]] == ["a-run", "b-run"]
    assert [j["name"] for j in everyone["failures"]] == ["a-old", "a-fail", "b-fail"]
    assert everyone["lanes"] == {"local": {"in_flight": in_lanes, "queued": 0}}
    assert [j["name"] for j in (await build(None, failures=1))["failures"]] == ["a-old"]
    assert (await build(B, states=[S.RUNNING], backend="ecs"))["jobs"] == []
    assert [j["name"] for j in (await build(B, states=[S.RUNNING]))["jobs"]] == ["b-run"]


# -- the screen ------------------------------------------------------------------------------


def _screen(view: top.View, width: int = 160, height: int = 40) -> str:
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(top.render(view, "12:00:00", width), height=height)
    return console.export_text()


def _snapshot(**over: Any) -> dict[str, Any]:
    job = {
        "id": "01m8kcmyywke8h186jw239ystb",
        "name": "evil",
        "backend": "ecs",
        "state": "FAILED",
        "attempt": 2,
        "attempts": 3,
        "created_at": "2026-01-01T00:00:00.000Z",
        "since": "2026-01-01T00:00:30.000Z",
        "updated_at": "2026-01-01T00:00:30.000Z",
        "exit_code": 1,
        "failure": "user",
        "reason": "bad\n\x1b[2Jstate: SUCCEEDED [bold]x[/bold] \u202e",
    }
    base_snapshot: dict[str, Any] = {
        "at": "2026-01-01T00:01:00.000Z",
        "pid": 7,
        "version": "0.1.0",
        "uptime_s": 90,
        "status": "degraded",
        "problems": [{"reason": "store_low_space", "message": "only\x1b]0;title\x07 left"}],
        "jobs_by_state": {"FAILED": 1},
        "lanes": {"ecs": {"in_flight": 0, "queued": 0}},
        "backends": ["ecs"],
        "jobs": [],
        "failures": [job],
        "aws": {
            "calls": [
                {
                    "backend": "ecs",
                    "service": "ecs",
                    "operation": "RunTask",
                    "calls": 10,
                    "throttles": 1,
                }
            ],
            "buckets": [
                {
                    "backend": "ecs",
                    "bucket": "ecs.run_task",
                    "rate_per_s": 2.5,
                    "configured_rate_per_s": 10.0,
                }
            ],
        },
    }
    return {**base_snapshot, **over}


def test_what_came_from_the_daemon_is_shown_escaped_and_never_as_markup() -> None:
    view = top.View()
    view.took(_snapshot(), 0.0)
    screen = _screen(view)
    assert "\x1b" not in screen
    assert "\u202e" not in screen
    assert r"bad\n\x1b[2Jstate: SUCCEEDED [bold]x[/bold] \u202e" in screen
    assert r"health: DEGRADED — only\x1b]0;title\x07 left" in screen
    assert "FAILED  user" in screen
    assert "30s ago" in screen  # ended 30 s before the snapshot


def test_aws_rates_are_the_counters_change_per_second() -> None:
    view = top.View()
    view.took(_snapshot(), 10.0)
    assert view.rates == {}  # one sample: no rate yet
    later = _snapshot()
    later["aws"]["calls"][0] = {**later["aws"]["calls"][0], "calls": 14, "throttles": 2}
    view.took(later, 12.0)
    assert view.rates == {("ecs", "ecs", "RunTask"): (2.0, 0.5)}
    assert "AWS: 2.0 calls/s, 0.5 throttles/s" in _screen(view)
    view.took(_snapshot(pid=8), 13.0)  # a restarted daemon counts from 0: no rate across it
    assert view.rates == {}


def test_keys_cycle_the_filters_and_the_screen_says_which() -> None:
    view = top.View()
    view.took(_snapshot(backends=["ecs", "local"]), 0.0)
    assert view.press("s") == "refresh"
    assert view.state == "QUEUED"
    for _ in range(len(top.STATES) - 1):
        view.press("s")
    assert view.state == "LOST"
    view.press("s")
    assert view.state is None  # back to the unfinished jobs
    assert [view.press("b"), view.backend] == ["refresh", "ecs"]
    view.press("b")
    view.press("s")
    assert (view.state, view.backend) == ("QUEUED", "local")
    assert "state: QUEUED" in _screen(view)
    assert "backend: local" in _screen(view)
    assert view.press("a") == "refresh"
    assert (view.state, view.backend) == (None, None)
    assert view.press("x") is None
    assert view.press("q") == "quit"


def test_a_daemon_gone_is_said_and_a_narrow_terminal_still_shows_the_essentials() -> None:
    view = top.View()
    view.lost("/tmp/o.sock: connection refused")
    screen = _screen(view)
    assert "daemon unreachable — retrying" in screen
    assert "/tmp/o.sock: connection refused" in screen
    view.took(_snapshot(), 0.0)
    narrow = _screen(view, width=80, height=24)
    assert "FAILED 1" in narrow
    assert "user" in narrow
    assert "q  quit" in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80
