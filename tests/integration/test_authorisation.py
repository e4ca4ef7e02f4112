"""Users kept apart: real peers of other uids (`setpriv`) against a real daemon. A peer sees and
controls only the jobs it submitted, an admin every job; a local job of another uid is refused
unless local jobs run as their submitter."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import events, models
from orchestrator.client import Client
from orchestrator.settings import Settings
from orchestrator.store import SqliteStore
from orchestrator.testing import FakeBackend, Script, make_settings
from tests.support.daemon import running
from tests.support.peers import PeerClient, open_to_others

pytestmark = pytest.mark.timeout(60)
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run clients as other uids")

S = models.JobState
A, B, C = 4242, 4343, 4444  # made-up uids: no passwd entry needed
ADMINS_GROUP = 5555
LONG = Script(states=(S.RUNNING,))  # runs until stopped


def _settings(root: Path, **server: Any) -> Settings:
    # Local jobs of A and B are accepted: the fake stands in for a backend running them as
    # their submitter.
    return make_settings(
        root, server={"allowed_uids": [0, A, B, C], **server}, local={"run_as": "submitter"}
    )


@pytest.fixture
async def daemon_for_peers(short_tmp: Path) -> AsyncIterator[tuple[Path, FakeBackend]]:
    settings = _settings(short_tmp)
    fake = FakeBackend(scripts={"long": LONG})
    async with running(settings, backends={"local": fake}):
        open_to_others(settings.server.socket_path)
        yield settings.server.socket_path, fake


def _accepted(outcomes: list[Any]) -> tuple[models.Job, bool]:
    """The one outcome of `Store.accept_many`, which must not be an error."""
    (outcome,) = outcomes
    assert isinstance(outcome, tuple), outcome
    return outcome


def _answer(lines: list[dict[str, Any]], job_id: str) -> list[tuple[object, ...]]:
    """What a reply says, with the job id in it made anonymous."""
    return [
        (line["ok"], line.get("code"), str(line.get("message")).replace(job_id, "<id>"))
        for line in lines
    ]


@needs_root
async def test_a_peer_sees_and_controls_only_the_jobs_it_submitted(
    daemon_for_peers: tuple[Path, FakeBackend],
) -> None:
    path, fake = daemon_for_peers
    async with PeerClient(A, path) as a, PeerClient(B, path) as b, Client(path) as admin:
        mine = (await a.call("submit", job={"command": ["sleep", "1000"], "name": "long"}))["job"]
        theirs = (await b.call("submit", job={"command": ["true"], "name": "b-job"}))["job"]
        job_id, never = mine["id"], models.new_job_id()

        # B is told A's job does not exist, word for word as for an id never used.
        asks: list[tuple[str, dict[str, Any]]] = [
            ("get", {}),
            ("get", {"history": True}),
            ("cancel", {}),
            ("wait", {}),
            ("watch", {}),
            ("logs", {}),
            ("logs", {"follow": True}),
        ]
        for op, params in asks:
            refused = await b.request(op, job_id=job_id, **params)
            absent = await b.request(op, job_id=never, **params)
            assert _answer(refused, job_id) == _answer(absent, never), op
            assert _answer(refused, job_id) == [
                (False, "not_found", "no job with id, id prefix or name '<id>'")
            ]
        assert [j["id"] for j in (await b.call("list"))["jobs"]] == [theirs["id"]]
        assert sum((await b.call("ping"))["jobs"].values()) == 1
        assert fake.stops == []  # B's cancel did nothing

        # A sees and reads its own job, and only its own.
        assert (await a.call("get", job_id=job_id))["job"]["id"] == job_id
        logs = await a.request("logs", job_id=job_id)
        assert logs[0]["data"] == f"output of {job_id}\n"
        assert [j["id"] for j in (await a.call("list"))["jobs"]] == [job_id]
        assert (await a.call("get", job_id=theirs["id"]))["code"] == "not_found"

        # The admin (root, the daemon's own uid) sees and controls every job.
        assert {j["id"] for j in await admin.list()} == {job_id, theirs["id"]}
        assert sum(((await admin.ping())["jobs"] or {}).values()) == 2
        peer = (await admin.get(job_id))["peer"]
        assert peer is not None
        assert peer["uid"] == A
        cancelled = await admin.cancel(job_id)
        assert cancelled["stop_reason"] == "cancel"
        waited = await a.request("wait", job_id=job_id)  # A sees its job to the end
        assert waited[-1]["job"]["state"] in {"FAILED", "CANCELLED"}
        assert fake.stops == [job_id]  # issued by the poller, before the job could end


@needs_root
async def test_watching_all_jobs_shows_a_peer_only_its_own_jobs(
    daemon_for_peers: tuple[Path, FakeBackend],
) -> None:
    path, _ = daemon_for_peers
    async with (
        PeerClient(B, path) as b_watching,
        PeerClient(A, path) as a,
        PeerClient(B, path) as b,
        Client(path) as admin,
    ):
        await b_watching.send("watch")
        assert (await b_watching.line())["watching"] is True
        admin_watch = admin.watch()
        assert (await anext(admin_watch))["watching"] is True

        a_job = (await a.call("submit", job={"command": ["true"], "name": "a-job"}))["job"]
        await a.request("wait", job_id=a_job["id"])
        # Every event of A's job is published by now: B's next one comes after all of them.
        b_job = (await b.call("submit", job={"command": ["true"], "name": "b-job"}))["job"]

        first = (await b_watching.line())["event"]
        assert (first["job_id"], first["from"], first["to"]) == (b_job["id"], None, "QUEUED")
        seen_by_admin = set()
        async with asyncio.timeout(15):
            while (event := (await anext(admin_watch))["event"])["job_id"] != b_job["id"]:
                seen_by_admin.add(event["job_id"])
        assert seen_by_admin == {a_job["id"]}
        assert isinstance(admin_watch, AsyncGenerator)  # `watch` is an async generator
        await admin_watch.aclose()


@needs_root
async def test_an_idempotency_key_belongs_to_its_submitter(
    daemon_for_peers: tuple[Path, FakeBackend],
) -> None:
    path, _ = daemon_for_peers
    spec = {"command": ["true"], "idempotency_key": "nightly-report"}
    async with PeerClient(A, path) as a, PeerClient(B, path) as b, Client(path) as admin:
        a_first = await a.call("submit", job=spec)
        b_first = await b.call("submit", job=spec)
        assert (a_first["created"], b_first["created"]) == (True, True)
        assert b_first["job"]["id"] != a_first["job"]["id"]
        assert b_first["job"]["peer"]["uid"] == B

        again = await a.call("submit", job=spec)
        assert (again["created"], again["job"]["id"]) == (False, a_first["job"]["id"])
        (many,) = (await b.call("submit_many", jobs=[spec]))["results"]
        assert (many["created"], many["id"]) == (False, b_first["job"]["id"])
        conflict = await b.call("submit", job={**spec, "command": ["false"]})
        assert conflict["code"] == "idempotency_conflict"
        assert a_first["job"]["id"] not in conflict["message"]  # it names B's own job

        admins_own = await admin.call("submit", job=spec)
        assert admins_own["created"] is True


@needs_root
async def test_a_peers_list_pages_hold_its_own_jobs_only(
    daemon_for_peers: tuple[Path, FakeBackend],
) -> None:
    path, _ = daemon_for_peers
    async with PeerClient(A, path) as a, PeerClient(B, path) as b:
        a_ids, b_ids = [], []
        for n in range(5):  # interleaved: every page of A's would hold B's jobs if unfiltered
            a_ids.append((await a.call("submit", job={"command": ["true", str(n)]}))["job"]["id"])
            b_ids.append((await b.call("submit", job={"command": ["true", str(n)]}))["job"]["id"])

        for peer, own in ((a, a_ids), (b, b_ids)):
            pages: list[list[str]] = []
            cursor = None
            while True:
                params = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
                reply = await peer.call("list", **params)
                pages.append([job["id"] for job in reply["jobs"]])
                cursor = reply["next_cursor"]
                if cursor is None:
                    break
                assert len(pages) < 10
            assert [len(page) for page in pages] == [2, 2, 1]
            assert [job_id for page in pages for job_id in page] == own[::-1]


@needs_root
async def test_a_local_job_of_another_uid_is_refused_when_jobs_run_as_the_daemon(
    short_tmp: Path,
) -> None:
    settings = make_settings(short_tmp, server={"allowed_uids": [0, A]})  # run_as: daemon
    local, ecs = FakeBackend(), FakeBackend(name="ecs")
    reason = (
        f"local jobs of uid {A} would run as uid {os.getuid()} (the daemon's); "
        'set local.run_as = "submitter" to run them as their submitter'
    )
    async with running(settings, backends={"local": local, "ecs": ecs}) as daemon:
        open_to_others(settings.server.socket_path)
        async with PeerClient(A, settings.server.socket_path) as a:
            for job in ({"command": ["id"]}, {"command": ["id"], "backend": "local"}):
                refused = await a.call("submit", job=job)
                assert (refused["ok"], refused["code"], refused["message"]) == (
                    False,
                    "forbidden",
                    reason,
                )
            local_spec = {"command": ["id"], "name": "local-one"}
            ecs_spec = {"command": ["id"], "name": "ecs-one", "backend": "ecs"}
            results = (await a.call("submit_many", jobs=[local_spec, ecs_spec]))["results"]
        assert (results[0]["ok"], results[0]["code"]) == (False, "forbidden")
        assert results[1]["ok"] is True  # not a local job: it does not run here
        stored = await daemon.store.list_jobs()
        assert [(job.name, job.backend) for job in stored] == [("ecs-one", "ecs")]
        assert local.submits == []
        # The daemon's own uid (here root) runs local jobs as itself.
        async with Client(settings.server.socket_path) as admin:
            assert (await admin.submit({"command": ["id"]}))["backend"] == "local"


@needs_root
async def test_a_job_with_no_recorded_submitter_is_for_admins_only(short_tmp: Path) -> None:
    settings = _settings(short_tmp)
    async with running(settings, backends={"local": FakeBackend()}) as daemon:
        open_to_others(settings.server.socket_path)
        spec = models.JobSpec(command=["true"], name="from-before")
        orphan, _ = _accepted(await daemon.store.accept_many([(spec, "local")], None))
        async with PeerClient(A, settings.server.socket_path) as a:
            assert (await a.call("get", job_id=orphan.id))["code"] == "not_found"
            assert (await a.call("list"))["jobs"] == []
            assert (await a.call("ping"))["jobs"] == {}
        async with Client(settings.server.socket_path) as admin:
            assert (await admin.get(orphan.id))["peer"] is None
            assert [job["id"] for job in await admin.list()] == [orphan.id]


@needs_root
async def test_members_of_an_admin_group_see_every_job(short_tmp: Path) -> None:
    settings = _settings(short_tmp, admin_gids=[ADMINS_GROUP])
    async with running(settings, backends={"local": FakeBackend()}):
        path = settings.server.socket_path
        open_to_others(path)
        async with (
            PeerClient(A, path) as a,
            PeerClient(B, path) as b,
            PeerClient(C, path, groups=[ADMINS_GROUP]) as c,
            Client(path) as root,
        ):
            job_id = (await a.call("submit", job={"command": ["true"]}))["job"]["id"]
            assert (await c.call("get", job_id=job_id))["job"]["id"] == job_id
            assert [job["id"] for job in (await c.call("list"))["jobs"]] == [job_id]
            assert (await b.call("get", job_id=job_id))["code"] == "not_found"
            # Once an admin list is set, it alone says who is an admin (as allowed_uids does).
            assert await root.list() == []


async def test_a_key_stored_before_keys_were_scoped_still_names_its_job(short_tmp: Path) -> None:
    """A store written before idempotency keys were per submitter holds them plain: the
    submitter still finds its job by its key, and nobody else does."""
    settings = make_settings(short_tmp)
    spec = models.JobSpec(command=["true"], idempotency_key="from-before")
    peer_a, peer_b = models.Peer(uid=A, gid=A, pid=1), models.Peer(uid=B, gid=B, pid=2)
    store = SqliteStore(settings.store, events.Hub())
    await store.open()
    try:
        job, _ = _accepted(await store.accept_many([(spec, "local")], peer_a))
    finally:
        await store.close()
    with sqlite3.connect(settings.store.path) as conn:
        conn.execute("UPDATE jobs SET idempotency_key = ? WHERE id = ?", ("from-before", job.id))
    conn.close()

    store = SqliteStore(settings.store, events.Hub())
    await store.open()
    try:
        again, created_again = _accepted(await store.accept_many([(spec, "local")], peer_a))
        other, created_other = _accepted(await store.accept_many([(spec, "local")], peer_b))
    finally:
        await store.close()
    assert (again.id, created_again) == (job.id, False)
    assert created_other is True
    assert other.id != job.id


@needs_root
async def test_only_an_admin_may_stop_the_daemon(
    daemon_for_peers: tuple[Path, FakeBackend],
) -> None:
    path, _ = daemon_for_peers
    async with PeerClient(A, path) as a:
        refused = await a.call("shutdown")
        assert (refused["ok"], refused["code"]) == (False, "forbidden")
        assert "may not stop the daemon" in refused["message"]
        assert (await a.call("ping"))["pong"] is True  # it goes on serving


@needs_root
async def test_another_users_job_cannot_be_named_by_prefix_or_name_nor_depended_on(
    daemon_for_peers: tuple[Path, FakeBackend],
) -> None:
    """Naming by id prefix or name (and `depends_on`) looks among the peer's own jobs: another
    user's job is as absent as a job never made, however it is named."""
    path, _ = daemon_for_peers
    async with PeerClient(A, path) as a, PeerClient(B, path) as b:
        mine = (await a.call("submit", job={"command": ["true"], "name": "a-secret"}))["job"]
        for ref in (mine["id"][:12], "a-secret", "a-secret"[:4]):
            refused = await b.call("get", job_id=ref)
            assert (refused["code"], refused["message"]) == (
                "not_found",
                f"no job with id, id prefix or name {ref!r}",
            )
        after = await b.call("submit", job={"command": ["true"], "depends_on": [mine["id"]]})
        assert after["code"] == "invalid_job"
        assert "job.depends_on[0]" in after["message"]
        # Its owner names it every way.
        for ref in (mine["id"][:12], "a-secret"):
            assert (await a.call("get", job_id=ref))["job"]["id"] == mine["id"]
        listed = await b.call("list", name="a-*")
        assert listed["jobs"] == []


@needs_root
async def test_another_users_array_and_its_children_are_as_absent_as_any_job(
    daemon_for_peers: tuple[Path, FakeBackend],
) -> None:
    """An array's children are their submitter's, as the array is: another user can neither
    see, list, cancel nor depend on them, by any name; the owner can."""
    path, _ = daemon_for_peers
    async with PeerClient(A, path) as a, PeerClient(B, path) as b:
        parent = (await a.call("submit", job={"command": ["true"], "array_size": 3}))["job"]
        child = f"{parent['id']}:1"
        for _ in range(200):  # expanded once it may start
            if (await a.call("get", job_id=parent["id"]))["job"]["state"] != "QUEUED":
                break
            await asyncio.sleep(0.02)
        for op, params in (
            ("get", {"job_id": child}),
            ("cancel", {"job_id": child}),
            ("get", {"job_id": f"{parent['id']}:9"}),
        ):
            refused = await b.call(op, **params)
            assert (refused["ok"], refused["code"]) == (False, "not_found"), refused
        assert (await b.call("list", parent=parent["id"]))["jobs"] == []
        after = await b.call("submit", job={"command": ["true"], "depends_on": [child]})
        assert after["code"] == "invalid_job"
        assert (await a.call("get", job_id=child))["job"]["id"] == child
        assert len((await a.call("list", parent=parent["id"]))["jobs"]) == 3
