"""deploy/grafana/orchestrator.json queries only metrics the daemon exports.

The exported names are read from what a real registry renders: `orchestrator.metrics.Metrics()`
with a `metrics.Sampled` collector, wired as `daemon.py` wires them and fed one representative
sample of everything (labelled metrics render no line until they have a child). Names are
compared as they appear in the rendered text (`_total` on counters, `_bucket`/`_sum`/`_count`
on histograms, `_info` on infos), so a dashboard that queries a histogram by its bare family
name, or a counter without `_total`, fails too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import metrics, models

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "orchestrator.json"
# A PromQL metric name that starts with orchestrator_ (not preceded by a name character).
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])orchestrator_[A-Za-z0-9_:]*")
# What a rendered sample name adds to its family's name.
SUFFIX = re.compile(r"_(total|bucket|sum|count|created|info)$")
S = models.JobState


def _representative_metrics() -> metrics.Metrics:
    """The daemon's registry with a sample in every metric, labelled ones included."""
    m = metrics.Metrics()
    m.add_collector(
        metrics.Sampled(
            aws_calls=lambda: [("batch", "DescribeJobs", 10, 1), ("ecs", "RunTask", 4, 0)],
            buckets=lambda: [("batch.SubmitJob", 35.0, 50.0), ("logs", 5.0, 5.0)],
            rejections=lambda: [("too_many_connections", 2)],
            log_drops=lambda: [("queue_full", 3)],
            local_read_errors=lambda: [("EMFILE", 1)],
            events=lambda: [("ecs", True, {"applied": 3, "deleted": 3}, 1)],
        )
    )

    def event(from_state: S | None, to_state: S, failure: str | None = None) -> models.Event:
        return models.Event(
            job_id="j1",
            backend="batch",
            name="job",
            from_state=from_state,
            to_state=to_state,
            at=2.0,
            created_at=1.0,
            failure=failure,
        )

    for e in (
        event(None, S.QUEUED),  # accepted
        event(S.QUEUED, S.SUBMITTED),  # dispatched: dispatch latency
        event(S.RUNNING, S.QUEUED, "infrastructure"),  # retried
        event(S.RUNNING, S.FAILED, "user"),  # finished
    ):
        m.on_event(e)
    m.detected("batch", finished_at=1.0, now=2.0)
    for state in S:  # what `Daemon._refresh_metrics` sets at each scrape
        m.jobs.labels(state.value).set(1)
    m.degraded.labels("store_low_space").set(0)
    m.store_free_bytes.set(1 << 30)
    m.leader.labels("h1").set(1)  # `Cluster.export`, on a shared PostgreSQL
    return m


def _rendered() -> tuple[set[str], set[str]]:
    """Sample names as the endpoint renders them, and the metric families declared."""
    text = _representative_metrics().render().decode()
    families = list(text_string_to_metric_families(text))
    return {s.name for f in families for s in f.samples}, {f.name for f in families}


def _exprs(node: Any) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every panel target, nested rows included."""
    for panel in node.get("panels", []):
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target.get("expr", "")
        yield from _exprs(panel)


def _queried(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    """Metric name → the panels (and template variables) that query it."""
    where: dict[str, set[str]] = {}
    sources = list(_exprs(dashboard))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if variable.get("type") == "query":
            sources.append((f"${variable['name']}", text))
    for title, expr in sources:
        for name in METRIC_NAME.findall(expr):
            where.setdefault(name, set()).add(title)
    return where


def _unexported(dashboard: dict[str, Any]) -> list[str]:
    samples, families = _rendered()
    problems = []
    for name, titles in sorted(_queried(dashboard).items()):
        if name in samples:
            continue
        family = SUFFIX.sub("", name)
        exported = sorted(n for n in samples if SUFFIX.sub("", n) == family)
        hint = (
            f"the daemon exports {family} as {', '.join(exported)}"
            if family in {SUFFIX.sub("", f) for f in families}
            else "not a metric of orchestrator/metrics.py"
        )
        problems.append(f"{name} (in {', '.join(sorted(titles))}): {hint}")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_the_registry_renders_a_sample_of_every_family() -> None:
    # Otherwise a labelled metric the fixture forgot would look unexported.
    samples, families = _rendered()
    assert families, "nothing rendered"
    fed = {SUFFIX.sub("", name) for name in samples}
    bare = sorted(f for f in families if SUFFIX.sub("", f) not in fed)
    assert not bare, f"families with no sample in the test's registry: {bare}"


def test_every_queried_metric_is_exported(dashboard: dict[str, Any]) -> None:
    queried = _queried(dashboard)
    assert len(queried) >= 10, f"too few metrics found in the dashboard: {sorted(queried)}"
    assert not _unexported(dashboard), "\n".join(_unexported(dashboard))


@pytest.mark.parametrize(
    ("wrong", "why"),
    [
        ("orchestrator_jobs_retired_total", "a typo"),
        ("orchestrator_dispatch_seconds", "a histogram by its family name"),
        ("orchestrator_aws_calls", "a counter without _total"),
    ],
)
def test_a_name_the_daemon_does_not_export_fails(
    dashboard: dict[str, Any], wrong: str, why: str
) -> None:
    broken = json.loads(json.dumps(dashboard))
    target = next(t for p in broken["panels"] for t in p.get("targets", []))
    target["expr"] = f"sum(rate({wrong}[5m]))"
    problems = _unexported(broken)
    assert problems, why
    assert any(p.startswith(f"{wrong} ") for p in problems), problems


def test_the_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["type"] in {"row", "timeseries", "stat"}, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
