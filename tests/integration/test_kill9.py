"""kill -9 at random moments while clients keep submitting: after the last restart nothing
acknowledged is lost, no idempotency key names two jobs, nothing ran twice, every exit code is
the command's own and the store passes `PRAGMA integrity_check`.

The harness is `bench/kill9.py` (run it by hand for long runs: `--kills 1000`); this is its CI
size. `KILL9_SEED=N` replays another seed (the kill times are seeded, the interleaving with the
daemon's own work is not).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import kill9

pytestmark = pytest.mark.timeout(240)

SEED = int(os.environ.get("KILL9_SEED", "20261121"))
KILLS = 24


def test_kill9_loses_nothing_and_runs_nothing_twice(short_tmp: Path) -> None:
    report = kill9.run(kill9.Config(kills=KILLS, seed=SEED, clients=2, final_wait_s=60), short_tmp)
    print(report.summary())
    lost_reasons = "; ".join(f"{job_id}: {reason}" for job_id, reason in report.lost)
    print(f"kill9 LOST: {len(report.lost)} {lost_reasons}")
    v = report.violations

    assert v["daemon"] == []
    assert report.kills == KILLS
    assert report.acknowledged > 0, "no submission got through: the harness tested nothing"
    # 1. The store survived every kill.
    assert (report.integrity, v["integrity"]) == ("ok", [])
    # 2. Every acknowledged job exists and ended; LOST only with a reason.
    assert v["lost_jobs"] == []
    assert sum(report.states.values()) == report.jobs_in_store >= report.acknowledged
    assert set(report.states) <= set(kill9.TERMINAL)
    # 3. One job per idempotency key, whatever the restarts in between.
    assert v["idempotency"] == []
    # 4. No attempt, and no job, ran twice.
    assert v["reruns"] == []
    assert report.duplicates == 0
    # 5. Every SUCCEEDED/FAILED job carries its command's own exit code.
    assert v["exit_codes"] == []
