"""Every store implementation against the one conformance suite (`tests/store_conformance.py`).
A new implementation is one more entry in `BACKINGS`: a class that builds its stores on one
test's data."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from orchestrator import events
from orchestrator.settings import StoreSettings
from orchestrator.store import SCHEMA_VERSION, SqliteStore, Store, postgres
from orchestrator.store.postgres import PostgresStore
from orchestrator.testing import InMemoryStore, MemoryData
from tests import store_conformance
from tests.store_conformance import Backing
from tests.support.postgres import PostgresServer


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


class PostgresBacking:
    """A fresh database on the session's PostgreSQL server (`tests.support.postgres`)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def store(self, hub: events.Hub, clock: Callable[[], float]) -> Store:
        return PostgresStore(self.url, hub, clock)

    def write_newer_schema(self) -> None:
        async def write() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(
                    "UPDATE meta SET value = $1 WHERE key = 'schema_version'",
                    str(postgres.SCHEMA_VERSION + 1),
                )
            finally:
                await conn.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # from inside a running loop
            pool.submit(asyncio.run, write()).result()


BACKINGS: dict[str, Callable[[Path], Backing]] = {
    "sqlite": SqliteBacking,
    "memory": MemoryBacking,
}


@pytest.mark.parametrize("case", store_conformance.CASES, ids=lambda case: case.__name__)
@pytest.mark.parametrize("kind", [*BACKINGS, "postgres"])
async def test_store(
    kind: str, case: store_conformance.Case, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        backing: Backing = PostgresBacking(await server.new_database())
    else:
        backing = BACKINGS[kind](tmp_path)
    await store_conformance.run(case, backing)
