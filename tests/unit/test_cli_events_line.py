"""`orchestrator ping`'s words on the backends tracked by their events (issue #17)."""

from __future__ import annotations

from orchestrator import cli


def test_ping_says_how_each_backend_with_a_queue_is_tracked() -> None:
    feeds = {
        "ecs": {"tracking": "events", "why": None, "receivers": 1, "held": 0},
        "batch": {"tracking": "polling", "why": "AccessDenied: …", "receivers": 1, "held": 0},
    }
    assert cli._events_line(feeds) == "; tracking: batch by polling, ecs by events"


def test_ping_says_nothing_of_events_without_a_queue() -> None:
    assert cli._events_line(None) == cli._events_line({}) == ""
