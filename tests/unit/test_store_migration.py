"""A store written by an older version is brought up to date when opened, keeping every job."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from orchestrator import events, models
from orchestrator.settings import StoreSettings
from orchestrator.store import SCHEMA_VERSION, JobQuery, SqliteStore


async def test_a_version_1_store_is_brought_up_to_date_and_keeps_its_jobs(tmp_path: Path) -> None:
    settings = StoreSettings(path=tmp_path / "store.db", synchronous="NORMAL", min_free_bytes=0)
    store = SqliteStore(settings, events.Hub())
    await store.open()
    (outcome,) = await store.accept_many([(models.JobSpec(command=["true"]), "local")], None)
    assert isinstance(outcome, tuple)
    job = outcome[0]
    (waiting,) = await store.accept_many(
        [(models.JobSpec(command=["true"], depends_on=[job.id]), "local")], None
    )
    assert isinstance(waiting, tuple)
    await store.close()
    with sqlite3.connect(settings.path) as conn:  # as version 1 wrote it
        conn.execute("ALTER TABLE events DROP COLUMN failure")
        conn.execute("DROP INDEX jobs_name")
        conn.execute("ALTER TABLE jobs DROP COLUMN name")
        conn.execute("DROP TABLE definitions")
        conn.execute("DROP TABLE dependencies")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()

    store = SqliteStore(settings, events.Hub())
    await store.open()
    try:
        assert await store.get(job.id) == job
        accepted, _ = await store.events_since(0)
        assert (accepted.job_id, accepted.to_state, accepted.failure) == (job.id, "QUEUED", None)
        begun = await store.begin_attempt(job.id)
        assert begun is not None
        await store.record_submitted(job.id, external_id="x", state=models.JobState.RUNNING)
        await store.transition(
            job.id, models.JobState.RUNNING, models.JobState.FAILED, info={"failure": "user"}
        )
        assert (await store.events_since(0))[-1].failure == "user"
        assert [j.id for j in await store.list_jobs(JobQuery(name=job.id))] == [
            job.id
        ]  # the name index
        await store.remember_definition("ecs", "d" * 64, "arn:td")  # version 4's table
        assert await store.definition("ecs", "d" * 64) == "arn:td"
        assert await store.dependents(job.id) == [waiting[0].id]  # filled in from the specs
    finally:
        await store.close()
    with sqlite3.connect(settings.path) as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert int(version) == SCHEMA_VERSION == 4
