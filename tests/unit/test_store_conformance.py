"""Every store implementation against the one conformance suite (`tests/store_conformance.py`).
A new implementation is one more entry in `BACKINGS`: a class that builds its stores on one
test's data."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import events
from orchestrator.settings import StoreSettings
from orchestrator.store import SCHEMA_VERSION, SqliteStore, Store
from orchestrator.testing import InMemoryStore, MemoryData
from tests import store_conformance
from tests.store_conformance import Backing


class SqliteBacking:
    def __init__(self, root: Path) -> None:
        self.settings = StoreSettings(
            path=root / "state" / "store.db", synchronous="NORMAL", min_free_bytes=0
        )

    def store(self, hub: events.Hub, clock: Callable[[], float]) -> Store:
        return SqliteStore(self.settings, hub, clock)

    def write_newer_schema(self) -> None:
        with sqlite3.connect(self.settings.path) as conn:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION + 1),),
            )
        conn.close()


class MemoryBacking:
    def __init__(self, root: Path) -> None:
        self.data = MemoryData()

    def store(self, hub: events.Hub, clock: Callable[[], float]) -> Store:
        return InMemoryStore(hub, clock=clock, data=self.data)

    def write_newer_schema(self) -> None:
        self.data.schema_version = SCHEMA_VERSION + 1


BACKINGS: dict[str, Callable[[Path], Backing]] = {
    "sqlite": SqliteBacking,
    "memory": MemoryBacking,
}


@pytest.mark.parametrize("case", store_conformance.CASES, ids=lambda case: case.__name__)
@pytest.mark.parametrize("kind", list(BACKINGS))
async def test_store(kind: str, case: store_conformance.Case, tmp_path: Path) -> None:
    await store_conformance.run(case, BACKINGS[kind](tmp_path))
