"""`orchestrator.logs.LogSink`: lines out in order; a stdout that is full or broken costs log
lines (counted, reported once on stderr), never a blocked or failed caller."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog

from orchestrator import logs
from orchestrator.settings import LoggingSettings

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0


def unread(read_end: int) -> int:
    """Bytes waiting in a pipe."""
    return int(struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4))[0])


def reports(path: Path) -> list[str]:
    """The drop reports written to the sink's stderr."""
    return [line for line in path.read_text().splitlines() if "dropping log lines" in line]


def test_lines_reach_the_stream_whole_and_in_order(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        sink = logs.LogSink(out, report_to=err)
        sink.start()
        lines = [f"line {i} " + "x" * (i % 300) + "\n" for i in range(5000)]
        for line in lines:
            sink.write(line)
        assert sink.flush(WAIT_S)
        assert (tmp_path / "out").read_text() == "".join(lines)  # no flush needed: on the fd
        assert sink.close(WAIT_S)
    assert sink.dropped() == []
    assert (tmp_path / "err").read_text() == ""


def test_a_stdout_nobody_reads_drops_lines_instead_of_blocking_and_reports_once(
    tmp_path: Path,
) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out, open(tmp_path / "err", "w") as err:
        sink = logs.LogSink(out, report_to=err, capacity=10)
        sink.start()
        line = "y" * 1000 + "\n"
        for i in range(100_000):
            sink.write(line)  # returns at once: the test would time out otherwise
            if i % 100 == 99:
                time.sleep(0.001)  # the writer runs: it fills the pipe, then blocks on it
            if dict(sink.dropped()).get("queue_full", 0) >= 1000:
                break
        # 64 KiB in the pipe, 10 lines queued, one batch in the writer's hands: the rest dropped.
        assert dict(sink.dropped())["queue_full"] >= 1000
        assert unread(read_end) >= fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) // 2
        os.close(read_end)  # the writer, blocked on the full pipe, now gets EPIPE
        for _ in range(20):
            sink.write(line)
        assert sink.close(WAIT_S)
    dropped = dict(sink.dropped())
    assert dropped.keys() == {"queue_full", "epipe"}
    assert dropped["epipe"] >= 1
    first, second = reports(tmp_path / "err")  # one line per reason, nothing else
    assert 'orchestrator_log_lines_dropped_total{reason="queue_full"}' in first
    assert 'orchestrator_log_lines_dropped_total{reason="epipe"}' in second
    assert "Broken pipe" in second


def test_a_broken_stdout_drops_and_counts_every_line_and_reports_once(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -n 1` after its line
    with os.fdopen(write_end, "w") as out, open(tmp_path / "err", "w") as err:
        sink = logs.LogSink(out, report_to=err)
        sink.start()
        for round_ in range(3):  # separate writes: each fails with EPIPE again
            for i in range(100):
                sink.write(f"{round_} {i}\n")
            assert sink.flush(WAIT_S)
        assert sink.close(WAIT_S)
    assert sink.dropped() == [("epipe", 300)]
    (report,) = reports(tmp_path / "err")
    assert report.startswith("orchestrator: cannot write log output (Broken pipe)")


def test_a_dead_stderr_as_well_is_ignored(tmp_path: Path) -> None:
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    os.close(out_read)
    os.close(err_read)
    with os.fdopen(out_write, "w") as out, os.fdopen(err_write, "w") as err:
        sink = logs.LogSink(out, report_to=err)
        sink.start()
        for i in range(10):
            sink.write(f"{i}\n")
        assert sink.flush(WAIT_S)
        sink.write("after\n")
        assert sink.close(WAIT_S)  # both threads ended normally
    assert sink.dropped() == [("epipe", 11)]


def test_lines_written_after_close_are_counted_not_queued(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        sink = logs.LogSink(out, report_to=err)
        sink.start()
        sink.write("before\n")
        assert sink.close(WAIT_S)
        sink.write("after\n")
    assert (tmp_path / "out").read_text() == "before\n"
    assert sink.dropped() == [("closed", 1)]
    assert reports(tmp_path / "err") == []


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`logs.configure` sets process-wide state: put it back as it was."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("botocore", "aiobotocore")}
    monkeypatch.setattr(logs, "_sink", None)
    yield
    if logs._sink is not None:
        logs._sink.close(WAIT_S)
    structlog.reset_defaults()
    root.handlers[:], level = saved
    root.setLevel(level)
    for name, quiet_level in quiet.items():
        logging.getLogger(name).setLevel(quiet_level)


@pytest.mark.usefixtures("restore_logging")
def test_structlog_and_library_logging_share_the_sink_in_order(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as out:
        logs.configure(LoggingSettings(format="json"), stream=out)
        # A fresh logger: module loggers would be cached with this configuration.
        structlog.get_logger("test").info("test.first", job_id="j1")
        logging.getLogger("asyncio").warning("library %s", "line")
        structlog.get_logger("test").info("test.last")
        assert logs.flush(WAIT_S)
    events = [orjson.loads(line) for line in (tmp_path / "out").read_text().splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [
        ("test.first", "info"),
        ("library line", "warning"),
        ("test.last", "info"),
    ]
    assert events[0]["job_id"] == "j1"
    assert list(events[0])[:3] == ["timestamp", "level", "event"]
    assert events[1]["logger"] == "asyncio"
    assert logs.dropped() == []


@pytest.mark.usefixtures("restore_logging")
def test_console_rendering_goes_through_the_sink_too(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as out:
        logs.configure(LoggingSettings(format="console"), stream=out)
        structlog.get_logger("test").info("test.console", job_id="j1")
        assert logs.flush(WAIT_S)
    (line,) = (tmp_path / "out").read_text().splitlines()
    assert "test.console" in line
    assert "j1" in line
    assert not line.startswith("{")


@pytest.mark.usefixtures("restore_logging")
def test_a_logged_traceback_carries_no_frame_locals(tmp_path: Path) -> None:
    """A failing request's locals hold job specs, and their env holds secrets: a traceback in
    the log names frames and lines, never their variables."""
    with open(tmp_path / "out", "w") as out:
        logs.configure(LoggingSettings(format="json"), stream=out)

        def accept(spec: dict[str, object]) -> None:
            raise RuntimeError("store refused")

        try:
            accept({"env": {"AWS_SECRET_ACCESS_KEY": "hunter2-secret"}})
        except RuntimeError:
            structlog.get_logger("test").exception("request.failed")
        assert logs.flush(WAIT_S)
    text = (tmp_path / "out").read_text()
    (event,) = [orjson.loads(line) for line in text.splitlines()]
    assert event["exception"][0]["exc_value"] == "store refused"
    assert any(frame["name"] == "accept" for frame in event["exception"][0]["frames"])
    assert "hunter2-secret" not in text
