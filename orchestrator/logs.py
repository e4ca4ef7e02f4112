"""structlog configuration: JSON lines to stdout, console rendering on a TTY.

Library logging (asyncio, botocore) is routed through the same processors and stream, so an
operator tailing `journalctl -f` or `docker logs` sees one JSON object per line, whatever wrote it.
Context is bound with contextvars, never interpolated into messages.

Logging never fails or stalls the daemon: every line goes through a `LogSink`, a bounded queue
that one thread writes out. A stdout that is full (nobody reads it) or gone (`| head -n 1`, a
full disk) costs log lines, counted by reason and reported once per reason on stderr, never a
request, a dispatch or a shutdown.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson
import structlog

from orchestrator import models
from orchestrator.settings import LoggingSettings

log = structlog.get_logger("orchestrator")

_QUEUE_LINES = 10_000  # lines held while stdout is slow (a few MB); past that, lines are dropped
_BATCH_LINES = 1_000  # lines joined into one write
_REPLACE_FLUSH_S = 1.0  # how long a re-configuration waits for the previous sink's lines

_sink: LogSink | None = None
# Tracebacks as JSON, without each frame's locals: those hold job specs (their `env` carries
# secrets) and whole batches of them, whose repr cost tens of ms per line on the event loop.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def _leading_keys(_: Any, __: str, event_dict: structlog.typing.EventDict) -> Any:
    """timestamp, level and event first: the line reads well in `journalctl -f` too."""
    head = {
        key: event_dict.pop(key) for key in ("timestamp", "level", "event") if key in event_dict
    }
    return {**head, **event_dict}


def configure(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    global _sink
    stream = stream or sys.stdout
    if _sink is not None:
        _sink.close(_REPLACE_FLUSH_S)
    sink = _sink = LogSink(stream)
    sink.start()
    console = settings.format == "console" or (settings.format == "auto" and stream.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        shared.extend([_TRACEBACKS, _leading_keys])
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)

    level = logging.getLevelName(settings.level)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _SinkLogger(sink),
        cache_logger_on_first_use=True,
    )

    handler = _SinkHandler(sink)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # botocore is chatty at INFO about credentials and retries we already report ourselves.
    logging.getLogger("botocore").setLevel(max(level, logging.WARNING))
    logging.getLogger("aiobotocore").setLevel(max(level, logging.WARNING))


def flush(timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the lines logged so far to be written out (at exit: a stdout
    nobody reads must not keep the process alive). False if they were not."""
    return True if _sink is None else _sink.flush(timeout_s)


def dropped() -> list[tuple[str, int]]:
    """Log lines dropped so far, by reason (for the metrics)."""
    return [] if _sink is None else _sink.dropped()


def log_transition(event: models.Event) -> None:
    """The one canonical log line per state change (a hub listener)."""
    if event.from_state is None:
        return  # acceptance is logged by the server, which knows the peer
    log.info(
        "job.state_changed",
        job_id=event.job_id,
        backend=event.backend,
        name=event.name,
        from_state=event.from_state.value,
        to_state=event.to_state.value,
        reason=event.reason,
        exit_code=event.exit_code,
        failure=event.failure,
    )


class LogSink:
    """Where every log line goes: a bounded queue, written out to `stream` by one thread.

    `write` never raises and never blocks. A line that finds the queue full (stdout is not
    being read) is dropped, and so is a batch the stream refuses (EPIPE, ENOSPC, EIO, ...).
    Drops are counted by reason; the first of each reason is reported in one line on
    `report_to` (stderr) by a thread of its own, so a stderr as stuck as stdout stalls only it.
    """

    def __init__(
        self, stream: TextIO, *, report_to: TextIO | None = None, capacity: int = _QUEUE_LINES
    ) -> None:
        self._stream = stream
        self._write_out = _writer(stream)
        self._write_report = _writer(sys.stderr if report_to is None else report_to)
        self._capacity = capacity
        # A line, a flush marker (set once everything before it is written) or None (stop).
        self._queue: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._reports: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the drop counts
        self._dropped: collections.Counter[str] = collections.Counter()
        self._closed = False
        self._writer = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._reporter = threading.Thread(
            target=self._report_drops, name="log-drop-reporter", daemon=True
        )

    def start(self) -> None:
        # What the stream buffered before us goes first (our own writes bypass its buffer).
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass
        self._writer.start()
        self._reporter.start()

    def write(self, line: str) -> None:
        """Queue one line (newline included); never raises, never blocks."""
        if self._closed:
            self._drop("closed", 1, None)
        elif self._queue.qsize() >= self._capacity:
            self._drop("queue_full", 1, "log output is not keeping up (is stdout being read?)")
        else:
            self._queue.put(line)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every line queued so far to be written (or dropped, and
        the drop reported)."""
        if not self._writer.is_alive():
            return self._queue.empty()
        deadline = time.monotonic() + timeout_s
        written, reported = threading.Event(), threading.Event()
        self._queue.put(written)
        if not written.wait(timeout_s):
            return False
        if not self._reporter.is_alive():
            return True
        self._reports.put(reported)
        return reported.wait(max(0.0, deadline - time.monotonic()))

    def close(self, timeout_s: float) -> bool:
        """Flush, then stop both threads, within `timeout_s` in all; later lines are dropped
        (`closed`). False if the threads did not finish in time (a stream stuck)."""
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._closed = True
        self._queue.put(None)
        self._reports.put(None)
        for thread in (self._writer, self._reporter):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        return not (self._writer.is_alive() or self._reporter.is_alive())

    def dropped(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._dropped.items())

    def _drop(self, reason: str, lines: int, why: str | None) -> None:
        with self._lock:
            first = reason not in self._dropped
            self._dropped[reason] += lines
        if first and why is not None:
            self._reports.put(
                f"orchestrator: {why}; dropping log lines, counted in "
                f'orchestrator_log_lines_dropped_total{{reason="{reason}"}}\n'
            )

    def _drain(self) -> None:
        """The writer thread: batches of queued lines, in order, one write each."""
        while True:
            item = self._queue.get()
            lines: list[str] = []
            markers: list[threading.Event] = []
            while item is not None:
                if isinstance(item, str):
                    lines.append(item)
                else:
                    markers.append(item)
                if len(lines) >= _BATCH_LINES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                try:
                    self._write_out("".join(lines))
                except OSError as exc:
                    name = errno.errorcode.get(exc.errno or 0, "oserror").lower()
                    self._drop(name, len(lines), f"cannot write log output ({exc.strerror or exc})")
                except ValueError:  # the stream was closed under us
                    self._drop("closed", len(lines), "cannot write log output (closed)")
            for marker in markers:
                marker.set()
            if item is None:
                return

    def _report_drops(self) -> None:
        """The reporter thread: one line on stderr per reason, the first time it drops lines."""
        while (item := self._reports.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()  # a flush marker
                continue
            try:
                self._write_report(item)
            except (OSError, ValueError):
                pass  # stderr is gone too: the metric still counts


def _writer(stream: TextIO | None) -> Callable[[str], None]:
    """Write text to `stream`'s file descriptor (nothing left in a Python buffer to flush, or to
    fail, at exit), or through the stream itself if it has none (tests)."""
    if stream is None:  # sys.stderr when fd 2 was closed at start-up
        return lambda text: None
    try:
        fd = stream.fileno()
    except (OSError, ValueError):

        def write_stream(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write_stream

    def write_fd(text: str) -> None:
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        while data:
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:  # someone made the fd non-blocking: wait, as a write would
                select.select([], [fd], [])

    return write_fd


class _SinkLogger:
    """What structlog hands rendered lines to, in place of its PrintLogger."""

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write(message + "\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _SinkHandler(logging.Handler):
    """Library logging (asyncio, botocore), rendered by structlog's formatter, into the sink."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # as logging.StreamHandler does: a bad record never raises
            self.handleError(record)
            return
        self._sink.write(line + "\n")
