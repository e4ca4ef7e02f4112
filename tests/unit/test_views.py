"""The reply types of `views.py` are what the daemon sends: the same keys, no more, no fewer."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from orchestrator import access, client, errors, events, models, views
from orchestrator.api import Api
from orchestrator.drivers import Router
from orchestrator.settings import JobDefaults
from orchestrator.testing import InMemoryStore
from tests.unit.engine.support import make_job


def keys(typed: object) -> set[str]:
    return set(typing.get_type_hints(typed))


def required(typed: object) -> set[str]:
    return set(typed.__required_keys__)  # type: ignore[attr-defined]


def test_a_job_view_has_the_keys_of_a_job() -> None:
    sent = make_job().to_dict()
    assert required(views.Job) == set(sent)
    assert keys(views.Job) == set(sent) | {"history", "attempts", "dependents"}


def test_an_event_view_has_the_keys_of_an_event() -> None:
    event = models.Event("j", "local", "n", None, models.JobState.QUEUED, 1.0, seq=3)
    assert required(views.Event) == keys(views.Event) == set(event.to_dict())


async def test_a_ping_view_has_the_keys_of_a_ping(tmp_path: Path) -> None:
    hub = events.Hub()
    store = InMemoryStore(hub)
    await store.open()
    api = Api(JobDefaults(), store, Router(), {}, hub, policy=access.Policy())
    sent = await api.ping(models.Peer(uid=0, gid=0, pid=1))
    assert required(views.Ping) == set(sent)
    # "cluster": only on a shared PostgreSQL; "events": only with a backend's events queue
    assert keys(views.Ping) == {*sent, "cluster", "events"}


async def test_a_ping_on_a_shared_database_says_who_leads(tmp_path: Path) -> None:
    hub = events.Hub()
    store = InMemoryStore(hub)
    await store.open()
    leader = {"node": "h2", "since": "2026-11-29T00:00:00.000Z", "token": 3, "expires_in_s": 7.5}
    described = {"node": "h1", "candidate": True, "leading": False, "leader": leader}
    api = Api(
        JobDefaults(), store, Router(), {}, hub, policy=access.Policy(), cluster=lambda: described
    )
    sent = await api.ping(models.Peer(uid=0, gid=0, pid=1))
    assert keys(views.Ping) == {*sent, "events"}
    assert sent["cluster"] == described
    assert required(views.Cluster) == set(described)
    assert required(views.Leader) == set(leader)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("not_found", client.NotFound),
        ("invalid_job", client.InvalidJob),
        ("invalid_request", client.InvalidRequest),
        ("idempotency_conflict", client.IdempotencyConflict),
        ("forbidden", client.Forbidden),
        ("shutting_down", client.ShuttingDown),
        ("store_full", client.StoreUnavailable),
        ("store_unavailable", client.StoreUnavailable),
        ("overloaded", client.Overloaded),
        ("something_new", errors.RemoteError),
    ],
)
def test_an_error_reply_raises_the_class_of_its_code(
    code: str, cls: type[errors.RemoteError]
) -> None:
    raised = client.remote_error(code, "why")
    assert type(raised) is cls
    assert isinstance(raised, errors.RemoteError)
    assert (raised.code, raised.remote_code, raised.detail) == (code, code, "why")
    assert raised.message == f"{code}: why"


def test_every_error_code_the_daemon_sends_has_its_class() -> None:
    sent = {
        c.code
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.OrchestratorError)
    }
    # The daemon's own codes that reach a client (the others are internal to it).
    reaching = {
        "not_found",
        "invalid_request",
        "invalid_json",
        "line_too_long",
        "unknown_op",
        "unsupported_version",
        "invalid_job",
        "idempotency_conflict",
        "forbidden",
        "backend_unavailable",
        "overloaded",
        "shutting_down",
        "store_error",
        "store_unavailable",
        "store_full",
        "logs_unavailable",
    }
    assert reaching <= sent
    assert reaching <= set(client.REMOTE_ERRORS)


def test_a_views_state_is_a_job_state() -> None:
    assert set(typing.get_args(views.State)) == {state.value for state in models.JobState}
