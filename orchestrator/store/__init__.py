"""The durable job store: the `Store` protocol and its SQLite implementation (`SqliteStore`).

`protocol` says what every store must do; `sqlite` is the daemon's store, built from `writer`
(its threads and group commit), `schema` (its file, lock and schema version) and `rows` (rows ↔
`models`). The in-memory store for tests is `orchestrator.testing.InMemoryStore`.
"""

from orchestrator.store.protocol import (
    ALL_JOBS,
    PROBLEM_REASONS,
    PURGE_SLICE,
    AcceptOutcome,
    AttemptEntry,
    HistoryEntry,
    JobQuery,
    Problem,
    ProblemReason,
    Store,
    check_same_spec,
    job_event,
)
from orchestrator.store.schema import SCHEMA_VERSION
from orchestrator.store.sqlite import SqliteStore

__all__ = [
    "ALL_JOBS",
    "PROBLEM_REASONS",
    "PURGE_SLICE",
    "SCHEMA_VERSION",
    "AcceptOutcome",
    "AttemptEntry",
    "HistoryEntry",
    "JobQuery",
    "Problem",
    "ProblemReason",
    "SqliteStore",
    "Store",
    "check_same_spec",
    "job_event",
]
