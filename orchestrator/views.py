"""What the daemon's replies hold, as types: the job, an event, a compact submit result, ping.

The Python client returns these (`orchestrator.client`); the daemon builds them (`models`,
`api`). `tests/unit/test_views.py` holds each to what the daemon really sends.
"""

# No `from __future__ import annotations`: TypedDict reads NotRequired from evaluated
# annotations only.
from typing import Any, Literal, NotRequired, TypedDict

from orchestrator.store.protocol import AttemptEntry, HistoryEntry

State = Literal[
    "QUEUED",
    "SUBMITTED",
    "PENDING",
    "RUNNABLE",
    "STARTING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "LOST",
]


class PeerView(TypedDict):
    uid: int
    pid: int


class Job(TypedDict):
    """One job (`status --json`). Times are RFC 3339 UTC."""

    id: str
    name: str
    backend: str
    state: State
    exit_code: int | None
    reason: str | None
    failure: str | None  # the failure class of an end other than SUCCEEDED
    vendor_status: str | None
    created_at: str
    updated_at: str
    state_times: dict[str, str]
    attempt: int
    external_id: str | None
    stop_reason: str | None
    idempotency_key: str | None
    command: list[str]
    cwd: str | None
    timeout_s: float | None
    queue_timeout_s: float | None
    retry: dict[str, Any] | None
    priority: int
    labels: dict[str, str]
    depends_on: list[str]
    after: Literal["success", "finished"]
    resources: dict[str, Any] | None
    target: str | None
    image: str | None
    array_size: int | None
    peer: PeerView | None
    info: dict[str, Any]
    history: NotRequired[list[HistoryEntry]]  # `get(history=True)`
    attempts: NotRequired[list[AttemptEntry]]
    dependents: NotRequired[list[str]]  # with `history`: the jobs that depend on this one


# One committed state change (`watch`); "from" (None for the acceptance) is a keyword, hence
# the functional syntax.
Event = TypedDict(
    "Event",
    {
        "seq": int,
        "job_id": str,
        "backend": str,
        "name": str,
        "from": State | None,
        "to": State,
        "at": str,
        "reason": str | None,
        "exit_code": int | None,
        "failure": str | None,
    },
)


class Submitted(TypedDict):
    """One spec's result in `submit_many` that was accepted."""

    ok: Literal[True]
    id: str
    name: str
    state: State
    created: bool  # False: its idempotency key named an existing job


class Problem(TypedDict):
    reason: str
    message: str


class Leader(TypedDict):
    node: str
    since: str  # when it took the lease (the database's clock)
    token: int  # the lease's fencing token
    expires_in_s: float  # unless renewed (renewed every third of the TTL)


class Cluster(TypedDict):
    node: str  # this daemon's
    candidate: bool  # stands for the lease (it has an AWS backend)
    leading: bool
    leader: Leader | None  # None: nobody holds the lease now


class Events(TypedDict):
    """How a backend with an events queue is tracked now (`changefeed.ChangeFeed.describe`)."""

    tracking: Literal["events", "polling"]
    why: str | None  # why it is polled (the queue unreadable, events missing), if it is
    receivers: int  # ReceiveMessage long polls running
    held: int  # events for jobs not tracked yet, held for them a while


class Ping(TypedDict):
    pong: bool
    status: Literal["ok", "degraded"]
    problems: list[Problem]
    store_free_bytes: int | None
    version: str
    pid: int
    uptime_s: float
    jobs: dict[str, int] | None  # None: the store cannot be read now (a problem says why)
    backends: list[str]
    cluster: NotRequired[Cluster]  # on a PostgreSQL several daemons may share
    events: NotRequired[dict[str, Events]]  # backends with an events queue, driven here
