"""Prometheus metrics, opt-in (`metrics.listen`), served from the daemon's own event loop.

Pushed as things happen: jobs accepted and finished (from the event hub), dispatch latency and
detection lag. Pulled at scrape time: jobs by state (one store query), AWS calls and throttles,
token-bucket rates, socket rejections, log lines dropped. No job ids as labels: cardinality stays
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator import __version__, models

log = structlog.get_logger("orchestrator.metrics")

# (backend, flowing, message counts by outcome, receivers): one per change feed.
EventsSample = tuple[str, bool, Mapping[str, int], int]

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Every metric the daemon exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.accepted = Counter(
            "orchestrator_jobs_submitted", "Jobs accepted, by backend", ["backend"], registry=r
        )
        self.retried = Counter(
            "orchestrator_jobs_retried",
            "Attempts that failed and were followed by another (the retry policy), by backend "
            "and the failure class of the attempt",
            ["backend", "failure"],
            registry=r,
        )
        self.finished = Counter(
            "orchestrator_jobs_finished",
            "Jobs that reached a terminal state, by backend, state and failure class (empty for "
            "SUCCEEDED)",
            ["backend", "state", "failure"],
            registry=r,
        )
        self.dispatch_seconds = Histogram(
            "orchestrator_dispatch_seconds",
            "Acceptance to the backend accepting the job",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.detection_lag_seconds = Histogram(
            "orchestrator_detection_lag_seconds",
            "The backend reporting a job ended to the daemon recording it",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge("orchestrator_jobs", "Jobs in the store, by state", ["state"], registry=r)
        self.degraded = Gauge(
            "orchestrator_degraded",
            "1 while the daemon is degraded for this reason (it still serves), else 0",
            ["reason"],
            registry=r,
        )
        self.store_free_bytes = Gauge(
            "orchestrator_store_free_bytes",
            "Free space on the store's file system (-1: cannot be measured)",
            registry=r,
        )
        self.leading = Gauge(
            "orchestrator_cluster_leading",
            "1 while this daemon holds the lease on the AWS backends (a shared PostgreSQL)",
            registry=r,
        )
        self.leader = Gauge(
            "orchestrator_cluster_leader",
            "1 for the node that holds the lease now, as this daemon last saw it",
            ["node"],
            registry=r,
        )
        self.leader_since = Gauge(
            "orchestrator_cluster_leader_since_seconds",
            "When the current leader took the lease (Unix time, the database's clock)",
            registry=r,
        )
        self.lease_token = Gauge(
            "orchestrator_cluster_lease_token",
            "The current lease's fencing token (one higher at every acquisition)",
            registry=r,
        )
        Info("orchestrator_build", "Build information", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )

    def on_event(self, event: models.Event) -> None:
        """A hub listener: counts acceptances, finishes and dispatch latency."""
        if event.from_state is None:
            self._child(self.accepted, event.backend).inc()
        elif event.to_state == models.JobState.QUEUED:  # the one way back: a retry
            self._child(self.retried, event.backend, event.failure or "").inc()
        elif event.from_state == models.JobState.QUEUED and not event.to_state.terminal:
            latency = max(0.0, event.at - event.created_at)
            self._child(self.dispatch_seconds, event.backend).observe(latency)
        if event.to_state.terminal:
            failure = event.failure or ""
            self._child(self.finished, event.backend, event.to_state.value, failure).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: it sits on the per-job hot path."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def detected(self, backend: str, finished_at: float, now: float | None = None) -> None:
        lag = (time.time() if now is None else now) - finished_at
        self.detection_lag_seconds.labels(backend).observe(max(0.0, lag))

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class Sampled(Collector):
    """Values read at scrape time from the components that own them."""

    def __init__(
        self,
        aws_calls: Callable[[], Iterable[tuple[str, str, int, int]]],
        buckets: Callable[[], Iterable[tuple[str, float, float]]],
        rejections: Callable[[], Iterable[tuple[str, int]]],
        log_drops: Callable[[], Iterable[tuple[str, int]]],
        local_read_errors: Callable[[], Iterable[tuple[str, int]]] = tuple,
        events: Callable[[], Iterable[EventsSample]] = tuple,
    ) -> None:
        self._events = events
        self._aws_calls = aws_calls
        self._buckets = buckets
        self._rejections = rejections
        self._log_drops = log_drops
        self._local_read_errors = local_read_errors

    def collect(self) -> Iterable[Any]:
        calls = CounterMetricFamily(
            "orchestrator_aws_calls", "AWS API calls", labels=["service", "operation"]
        )
        throttles = CounterMetricFamily(
            "orchestrator_aws_throttles",
            "AWS API responses that said to slow down (botocore's own retries included)",
            labels=["service", "operation"],
        )
        for service, operation, n_calls, n_throttles in self._aws_calls():
            calls.add_metric([service, operation], n_calls)
            throttles.add_metric([service, operation], n_throttles)
        rate = GaugeMetricFamily(
            "orchestrator_ratelimit_rate_per_s", "Current token-bucket rate", labels=["bucket"]
        )
        configured = GaugeMetricFamily(
            "orchestrator_ratelimit_configured_rate_per_s",
            "Configured token-bucket rate",
            labels=["bucket"],
        )
        for name, current, limit in self._buckets():
            rate.add_metric([name], current)
            configured.add_metric([name], limit)
        rejected = CounterMetricFamily(
            "orchestrator_socket_rejections", "Connections refused, by reason", labels=["reason"]
        )
        for reason, count in self._rejections():
            rejected.add_metric([reason], count)
        log_dropped = CounterMetricFamily(
            "orchestrator_log_lines_dropped",
            "Log lines lost to a stdout that is full or failing, by reason",
            labels=["reason"],
        )
        for reason, count in self._log_drops():
            log_dropped.add_metric([reason], count)
        read_errors = CounterMetricFamily(
            "orchestrator_local_read_errors",
            "Reads of a local job's files that failed without telling anything (EMFILE, EIO, "
            "...): the job kept its state and was read again later, by errno",
            labels=["errno"],
        )
        for errno_name, count in self._local_read_errors():
            read_errors.add_metric([errno_name], count)
        return [
            calls,
            throttles,
            rate,
            configured,
            rejected,
            log_dropped,
            read_errors,
            *self._feeds(),
        ]

    def _feeds(self) -> list[Any]:
        flowing = GaugeMetricFamily(
            "orchestrator_events_flowing",
            "1 while the backend is tracked by its events (describes only a sweep behind them), "
            "0 while it is polled in full because they stopped",
            labels=["backend"],
        )
        messages = CounterMetricFamily(
            "orchestrator_events_messages",
            "Event messages read from the backend's queue, by what came of them: applied, stale "
            "(a duplicate or older than known), untracked (no job here has that id), foreign "
            "(another source), undecodable, unrecorded (the store failed: delivered again), ...",
            labels=["backend", "outcome"],
        )
        receivers = GaugeMetricFamily(
            "orchestrator_events_receivers", "ReceiveMessage long polls running", labels=["backend"]
        )
        for backend, is_flowing, counts, n_receivers in self._events():
            flowing.add_metric([backend], 1 if is_flowing else 0)
            receivers.add_metric([backend], n_receivers)
            for outcome, count in sorted(counts.items()):
                messages.add_metric([backend, outcome], count)
        return [flowing, messages, receivers]


_MAX_CONNECTIONS = 16  # scrapers at once; more are closed at once
_CONNECTION_S = 10.0  # one scrape's whole life


class Endpoint:
    """A minimal HTTP/1.0 responder for `GET /metrics` on the daemon's loop."""

    def __init__(
        self, metrics: Metrics, listen: str, refresh: Callable[[], Awaitable[None]]
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host, self._port = host or "127.0.0.1", int(port)
        self._metrics = metrics
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self._open = 0  # connections being answered

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("metrics.listening", address=self.address)

    @property
    def address(self) -> str:
        """HOST:PORT actually bound (port 0 in the settings picks a free one)."""
        if self._server is None or not self._server.sockets:
            return f"{self._host}:{self._port}"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Any local user can reach a TCP port: connections are capped, each one's whole life
        # (headers, refresh, a client slow to read the body) is bounded, and a request line or
        # header over the reader's limit ends it like a timeout does.
        try:
            if self._open >= _MAX_CONNECTIONS:
                return
            self._open += 1
            try:
                async with asyncio.timeout(_CONNECTION_S):
                    await self._answer(reader, writer)
            finally:
                self._open -= 1
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        while (await reader.readline()).strip():
            pass  # headers: not needed
        parts = request.split()
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
            await self._refresh()
            body, status = self._metrics.render(), b"200 OK"
        else:
            body, status = b"not found; try /metrics\n", b"404 Not Found"
        writer.write(
            b"HTTP/1.0 "
            + status
            + b"\r\nContent-Type: "
            + prometheus_client.CONTENT_TYPE_LATEST.encode()
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        await writer.drain()
