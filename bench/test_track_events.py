"""`bench/track.py --events`: its bookkeeping, without a daemon or a stand-in.

Run by hand, not part of the suite::

    .venv/bin/python -m pytest bench/test_track_events.py -q -p no:cacheprovider
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from bench import track


def args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "backend": "batch",
        "time_scale": 4.0,
        "describe_rate": 20.0,
        "describe_burst": 100.0,
        "unscaled_buckets": False,
        "events": True,
        "event_delay_median_s": 0.5,
        "event_delay_p99_s": 3.0,
        "event_duplicate_ratio": 0.01,
        "event_drop_ratio": 0.0,
    }
    return argparse.Namespace(**(values | overrides))


def test_peak_open_counts_overlaps_and_ends_before_creations() -> None:
    jobs: list[list[float | None]] = [[0, 10, None], [5, 20, None], [10, 30, None]]
    jobs.append([25, None, None])
    # at 10 one ends as another is created: 2 at once, never 3; the open one counts
    assert track.peak_open(jobs) == 2
    assert track.peak_open([]) == 0


def test_labels_name_store_and_mode() -> None:
    assert track.Row("orchestrator", 1).label == "orchestrator"
    assert track.Row("orchestrator", 1, mode="events").label == "orchestrator (events)"
    row = track.Row("orchestrator", 1, store="SQLite", mode="polling")
    assert row.label == "orchestrator (SQLite, polling)"


def test_events_timing_scales_sweep_and_grace_only() -> None:
    env = ab.EventsTiming(ab.queue_url("http://127.0.0.1:5"), time_scale=4).env("batch")
    assert env == {
        "ORCHESTRATOR__BATCH__EVENTS__QUEUE_URL": "http://127.0.0.1:5/123456789012/"
        "orchestrator-events",
        "ORCHESTRATOR__BATCH__EVENTS__SWEEP_S": "15",
        "ORCHESTRATOR__BATCH__EVENTS__GRACE_S": "7.5",
    }
    daemon = ab.daemon_env(
        "ecs",
        "http://x",
        max_in_flight=3,
        poller=ab.PollerTiming(),
        launch=(1, 1),
        describe=(1, 1),
        events=ab.EventsTiming("http://x/1/q"),
    )
    assert daemon["ORCHESTRATOR__ECS__EVENTS__QUEUE_URL"] == "http://x/1/q"
    assert "ORCHESTRATOR__ECS__EVENTS__QUEUE_URL" not in ab.daemon_env(
        "ecs", "http://x", max_in_flight=3, poller=ab.PollerTiming(), launch=(1, 1), describe=(1, 1)
    )


def test_event_args_pass_the_model_unscaled() -> None:
    assert track.event_args(args(event_delay_median_s=0.25)) == [
        "--events",
        *("--event-delay-median-s", "0.25"),
        *("--event-delay-p99-s", "3"),
        *("--event-duplicate-ratio", "0.01"),
        *("--event-drop-ratio", "0"),
    ]


def test_report_with_both_modes_and_empty_samples() -> None:
    polling = track.Row("orchestrator", 2, mode="polling", lags=[1.0, 2.0], calls=10)
    polling.job_hours, polling.wall_s, polling.describe_share = 1.0, 10.0, 10 / 800
    events = track.Row("orchestrator", 2, mode="events", lags=[0.5, 0.6], calls=2, lag_scale=1)
    events.job_hours, events.wall_s, events.describe_share = 1.0, 10.0, math.nan
    events.event_delays, events.above_model = [0.4, 0.5], [0.1, 0.1]
    events.sqs_calls = {"sqs.ReceiveMessage": 4, "sqs.DeleteMessageBatch": 3}
    events.events = {"received": 9, "deleted": 9, "duplicated": 1}
    events.tracking = {"events": 5}
    text = track.report(2, [polling, events], args())
    assert "#### Polling against events, N = 2" in text
    lags = "| 0.50 | 0.60 | 0.60 | 0.40 | 0.50 | 0.10 | 0.10 |"
    assert f"| orchestrator (events) | 0 | 0 {lags}" in text
    assert "| 4.0 | 3.0 | 9 / 9 / 1 |" in text
    assert "tracked by events throughout: PASS" in text
    events.tracking = {"events": 4, "polling": 1}
    assert "tracked by events throughout: FAIL" in track.report(2, [polling, events], args())
