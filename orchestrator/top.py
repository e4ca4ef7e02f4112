"""`orchestrator top`: a full-screen view of the daemon, asked for a `top` snapshot about once a
second (`snapshot.py` builds it): jobs by state and backend, the unfinished jobs, the last
failures, AWS calls per second and the token buckets, health.

Keys are read from the terminal as they are typed (cbreak mode: no echo, no Enter needed, ^C
still interrupts): `q` quits, `s` cycles the state filter, `b` the backend filter, `a` clears
both. The terminal's modes are put back on every way out — `q`, ^C, SIGTERM, SIGHUP, an
exception — and the alternate screen is left. A daemon that goes away is asked again every
second, and the screen says so meanwhile.

What came from the daemon (names, reasons, messages) is shown escaped (`escaping.safe`) and as
plain text, never as rich markup.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from orchestrator import errors, models
from orchestrator.client import SyncClient
from orchestrator.escaping import safe

NO_TTY = (
    'orchestrator top needs a terminal; use "orchestrator watch --json" to follow jobs from a '
    "script"
)
REFRESH_S = 1.0
REQUEST_TIMEOUT_S = 5.0
FAILURES = 10
STATES: tuple[str, ...] = tuple(state.value for state in models.JobState)
WIDE = 120  # columns: narrower, the screen leaves out job ids

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_AwsKey = tuple[str, str, str]  # backend, service, operation


@dataclass
class View:
    """What the screen shows and how it is filtered; fed snapshots and keys, rendered by
    `render`. No I/O here."""

    state: str | None = None
    backend: str | None = None
    snapshot: dict[str, Any] | None = None
    trouble: str | None = None  # why the last snapshot could not be had
    rates: dict[_AwsKey, tuple[float, float]] = field(default_factory=dict)  # calls, throttles/s
    _counters: dict[_AwsKey, tuple[int, int]] = field(default_factory=dict)
    _sampled_at: float | None = None
    _pid: object = None

    def press(self, key: str) -> str | None:
        """`quit`, `refresh` (the filter changed: ask again now) or None for any other key."""
        if key == "q":
            return "quit"
        if key == "s":
            self.state = _next(STATES, self.state)
        elif key == "b":
            known = (self.snapshot or {}).get("backends") or []
            self.backend = _next([str(b) for b in known], self.backend)
        elif key == "a":
            self.state = self.backend = None
        else:
            return None
        return "refresh"

    def took(self, snapshot: dict[str, Any], now: float) -> None:
        """A new snapshot, taken at `now` (monotonic): AWS rates are the counters' change since
        the one before (none across a restart of the daemon)."""
        counters = {
            (str(c["backend"]), str(c["service"]), str(c["operation"])): (
                int(c["calls"]),
                int(c["throttles"]),
            )
            for c in snapshot.get("aws", {}).get("calls", [])
        }
        same_daemon = snapshot.get("pid") == self._pid
        rates: dict[_AwsKey, tuple[float, float]] = {}
        if same_daemon and self._sampled_at is not None and now > self._sampled_at:
            elapsed = now - self._sampled_at
            for key, (calls, throttles) in counters.items():
                before = self._counters.get(key, (0, 0))
                if calls >= before[0] and throttles >= before[1]:
                    rates[key] = ((calls - before[0]) / elapsed, (throttles - before[1]) / elapsed)
        self.rates, self._counters, self._sampled_at = rates, counters, now
        self._pid = snapshot.get("pid")
        self.snapshot, self.trouble = snapshot, None

    def lost(self, why: str) -> None:
        self.snapshot, self.trouble = None, why
        self._sampled_at = None


def _next(choices: Sequence[str], current: str | None) -> str | None:
    """The choice after `current`, then None (no filter), then the first again."""
    if current not in choices:
        return choices[0] if choices else None
    index = choices.index(current) + 1
    return choices[index] if index < len(choices) else None


# -- rendering -----------------------------------------------------------------------------


def render(view: View, clock: str, width: int = 160) -> RenderableType:
    """The whole screen, `width` columns wide; `clock` is the local time to show. Below
    `WIDE` columns the backends go under the counts and the job ids are left out."""
    wide = width >= WIDE
    layout = Layout()
    snap = view.snapshot
    if snap is None:
        trouble = Text("daemon unreachable — retrying", style="bold red")
        if view.trouble:
            trouble.append(f"\n{safe(view.trouble)}", style="red")
        layout.split_column(
            Layout(Text(f"orchestrator top   {clock}", style="bold"), size=1),
            Layout(trouble),
            Layout(_footer(view), size=1),
        )
        return layout
    lanes = snap.get("lanes")
    lane_lines = max(1, len(lanes or {}))
    aws_rows = _aws_rows(view)
    counts = Layout(name="counts", size=max(2, lane_lines) + 2 if wide else 4)
    parts = [Layout(_header(snap, clock), size=2), counts]
    if not wide:
        parts.append(Layout(_lanes(lanes), name="lanes", size=lane_lines + 2))
    parts += [
        Layout(_jobs(view, snap, wide), name="jobs", ratio=3),
        Layout(_failures(snap, wide), name="failures", ratio=2, minimum_size=4),
        Layout(_aws(view, snap, aws_rows, wide), name="aws", size=min(max(aws_rows, 1) + 2, 12)),
        Layout(_footer(view), size=1),
    ]
    layout.split_column(*parts)
    if wide:
        counts.split_row(Layout(_counts(snap), ratio=3), Layout(_lanes(lanes), ratio=2))
    else:
        counts.update(_counts(snap))
    return layout


def _footer(view: View) -> RenderableType:
    footer = Text()
    for key, what in (
        ("q", "quit"),
        ("s", f"state: {view.state or 'unfinished'}"),
        ("b", f"backend: {view.backend or 'all'}"),
        ("a", "clear filters"),
    ):
        footer.append(f" {key} ", style="reverse")
        footer.append(f" {what}   ")
    return footer


def _header(snap: Mapping[str, Any], clock: str) -> RenderableType:
    title = Text("orchestrator top", style="bold")
    title.append(
        safe(
            f"   daemon {snap.get('version')} pid {snap.get('pid')} "
            f"up {_duration(float(snap.get('uptime_s') or 0))}   {clock}"
        )
    )
    problems = snap.get("problems") or []
    if not problems:
        health = Text("health: ok", style="green")
    else:
        health = Text("health: DEGRADED — ", style="bold red")
        health.append(safe("; ".join(str(p.get("message")) for p in problems)), style="red")
    return Group(title, health)


def _counts(snap: Mapping[str, Any]) -> RenderableType:
    counts = snap.get("jobs_by_state") or {}
    text = Text(no_wrap=True, overflow="ellipsis")  # a line cut short shows it: `…`
    for finished in (False, True):
        for state in models.JobState:
            if state.terminal == finished:
                n = int(counts.get(state.value, 0))
                text.append(f"{state.value} {n}", style=_style(state.value) if n else "dim")
                text.append("  ")
        text.rstrip()
        text.append("\n")
    text.rstrip()
    return Panel(text, title="jobs by state (unfinished, finished)", title_align="left")


def _lanes(lanes: Mapping[str, Mapping[str, int]] | None) -> RenderableType:
    if lanes is None:
        body: RenderableType = Text("the daemon's load is shown to admins", style="dim")
    else:
        grid = Table.grid(padding=(0, 2))
        for _ in range(3):
            grid.add_column(no_wrap=True)
        for name, lane in lanes.items():
            grid.add_row(
                Text(safe(name), style="bold"),
                Text(f"{lane.get('in_flight', 0)} in flight"),
                Text(f"{lane.get('queued', 0)} queued"),
            )
        body = grid
    return Panel(body, title="backends", title_align="left")


def _jobs(view: View, snap: Mapping[str, Any], wide: bool) -> RenderableType:
    table = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
    if wide:
        table.add_column("ID", no_wrap=True, min_width=26)
    table.add_column("STATE", no_wrap=True)
    table.add_column("BACKEND", no_wrap=True)
    table.add_column("AGE", justify="right", no_wrap=True)
    table.add_column("IN STATE", justify="right", no_wrap=True)
    table.add_column("ATTEMPT", justify="right", no_wrap=True)
    table.add_column("NAME", no_wrap=True, overflow="ellipsis", ratio=1)
    at = snap.get("at")
    for job in snap.get("jobs") or []:
        most = job.get("attempts")
        table.add_row(
            *([Text(safe(str(job.get("id"))))] if wide else []),
            Text(safe(str(job.get("state"))), style=_style(str(job.get("state")))),
            Text(safe(str(job.get("backend")))),
            Text(_ago(at, job.get("created_at"))),
            Text(_ago(at, job.get("since"))),
            Text(f"{job.get('attempt')}/{most}" if most else str(job.get("attempt"))),
            Text(safe(str(job.get("name")))),
        )
    shown = "unfinished jobs" if view.state is None else f"{view.state} jobs"
    if view.backend is not None:
        shown += f" on {view.backend}"
    title = safe(f"{shown}, newest first: {len(snap.get('jobs') or [])}")
    body: RenderableType = table if snap.get("jobs") else Text("none", style="dim")
    return Panel(body, title=Text(title), title_align="left")


def _failures(snap: Mapping[str, Any], wide: bool) -> RenderableType:
    table = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
    if wide:
        table.add_column("ID", no_wrap=True, min_width=26)
    table.add_column("STATE", no_wrap=True)
    table.add_column("CLASS", no_wrap=True)
    table.add_column("EXIT", justify="right", no_wrap=True)
    table.add_column("ENDED", justify="right", no_wrap=True)
    table.add_column("NAME", no_wrap=True, overflow="ellipsis", max_width=40 if wide else 16)
    table.add_column("REASON", no_wrap=True, overflow="ellipsis", ratio=1, min_width=20)
    at = snap.get("at")
    for job in snap.get("failures") or []:
        exit_code = job.get("exit_code")
        table.add_row(
            *([Text(safe(str(job.get("id"))))] if wide else []),
            Text(safe(str(job.get("state"))), style=_style(str(job.get("state")))),
            Text(safe(str(job.get("failure") or "-"))),
            Text("-" if exit_code is None else str(exit_code)),
            Text(f"{_ago(at, job.get('updated_at'))} ago"),
            Text(safe(str(job.get("name")))),
            Text(safe(str(job.get("reason") or "-"))),
        )
    body: RenderableType = table if snap.get("failures") else Text("none", style="dim")
    return Panel(body, title="last failures", title_align="left")


def _aws_rows(view: View) -> int:
    """The lines of the AWS table: a header and a line per operation or bucket (0: none)."""
    aws = (view.snapshot or {}).get("aws") or {}
    most = max(len(aws.get("calls") or []), len(aws.get("buckets") or []))
    return most + 1 if most else 0


def _aws(view: View, snap: Mapping[str, Any], rows: int, wide: bool) -> RenderableType:
    """Per operation: calls and throttles per second (and, `wide`, since the daemon started);
    beside them the token buckets' current and configured rates."""
    aws = snap.get("aws") or {}
    calls, buckets = aws.get("calls") or [], aws.get("buckets") or []
    total_calls = sum(rate[0] for rate in view.rates.values())
    total_throttles = sum(rate[1] for rate in view.rates.values())
    title = f"AWS: {total_calls:.1f} calls/s, {total_throttles:.1f} throttles/s"
    if not rows:
        return Panel(Text("no AWS backend", style="dim"), title=title, title_align="left")
    table = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
    columns: list[tuple[str, JustifyMethod]] = [
        ("BACKEND", "left"),
        ("OPERATION", "left"),
        ("CALLS/S", "right"),
        ("THROTTLES/S", "right"),
        ("CALLS", "right"),
        ("THROTTLES", "right"),
        ("", "left"),
        ("BUCKET", "left"),
        ("RATE/S", "right"),
        ("OF", "right"),
    ]
    shown = [True, True, True, True, wide, wide, True, True, True, True]
    for (name, justify), show in zip(columns, shown, strict=True):
        if show:
            table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis")
    for i in range(rows - 1):
        cells: list[RenderableType] = [Text("")] * 6
        if i < len(calls):
            c = calls[i]
            key = (str(c["backend"]), str(c["service"]), str(c["operation"]))
            rate = view.rates.get(key)
            cells = [
                Text(safe(key[0])),
                Text(safe(f"{key[1]}:{key[2]}")),
                Text("-" if rate is None else f"{rate[0]:.1f}"),
                Text("-" if rate is None else f"{rate[1]:.1f}"),
                Text(str(c["calls"])),
                Text(str(c["throttles"]), style="yellow" if c["throttles"] else ""),
            ]
        bucket: list[RenderableType] = [Text("")] * 3
        if i < len(buckets):
            b = buckets[i]
            slowed = float(b["rate_per_s"]) < float(b["configured_rate_per_s"])
            bucket = [
                Text(safe(str(b["bucket"]))),
                Text(f"{float(b['rate_per_s']):.1f}", style="yellow" if slowed else ""),
                Text(f"{float(b['configured_rate_per_s']):.1f}"),
            ]
        row = [*cells, Text(" "), *bucket]
        table.add_row(*(cell for cell, show in zip(row, shown, strict=True) if show))
    return Panel(table, title=title, title_align="left")


_STYLES = {
    "RUNNING": "green",
    "SUCCEEDED": "green",
    "FAILED": "red",
    "LOST": "red",
    "CANCELLED": "yellow",
}


def _style(state: str) -> str:
    return _STYLES.get(state, "cyan")


def _ago(at: object, then: object) -> str:
    """How long before `at` `then` was (two RFC 3339 times of the daemon's), e.g. `3m`."""
    try:
        seconds = _time(at) - _time(then)
    except (TypeError, ValueError):
        return "-"
    return _duration(seconds)


def _time(iso: object) -> float:
    if not isinstance(iso, str):
        raise TypeError(iso)
    return datetime.fromisoformat(iso).timestamp()


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


# -- the terminal --------------------------------------------------------------------------


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


class _Terminated(Exception):
    """SIGTERM or SIGHUP: unwind (restoring the terminal), then exit as killed by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _keys_as_typed(fd: int) -> Iterator[None]:
    """The terminal in cbreak mode (keys as typed, not echoed) until the block ends, however
    it ends; SIGTERM and SIGHUP unwind the block instead of killing the process in it."""
    saved = termios.tcgetattr(fd)
    handlers = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setcbreak(fd)
        yield
    finally:
        with contextlib.suppress(termios.error):  # the terminal may be gone (SIGHUP)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _fetch(client: SyncClient | None, socket_path: Path | None, view: View, rows: int) -> bool:
    """Ask for a snapshot; False if the connection is to be dropped."""
    try:
        if client is None:
            return False
        reply = client.top(
            [view.state] if view.state else None,
            view.backend,
            limit=min(max(10, rows), 500),
            failures=FAILURES,
        )
    except errors.UnsafeSocketDirectory:
        raise  # nothing to retry: the directory must be fixed
    except errors.OrchestratorError as exc:  # refused (`code: message`), gone, garbled
        view.lost(exc.message)
        return False
    except OSError as exc:  # a timeout, a reset: the daemon may be stuck or gone
        view.lost(f"{socket_path or 'the socket'}: {exc}")
        return False
    view.took(reply, time.monotonic())
    return True


def run(socket_path: Path | None) -> int:
    """The live view until `q`; its exit status."""
    if not interactive():
        print(NO_TTY, file=sys.stderr)
        return EXIT_USAGE
    fd = sys.stdin.fileno()
    console = Console()
    view = View()
    client: SyncClient | None = None
    try:
        with (
            _keys_as_typed(fd),
            Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            due = 0.0
            while True:
                if time.monotonic() >= due:
                    due = time.monotonic() + REFRESH_S
                    # The terminal's size now (resized or not), not $COLUMNS/$LINES as rich
                    # would take them: a shell exports those once, from the size it had then.
                    console.size = os.get_terminal_size(sys.stdout.fileno())
                    if client is None:
                        client = _connect(socket_path, view)
                    if not _fetch(client, socket_path, view, console.height) and client:
                        client.close()
                        client = None
                    screen = render(view, time.strftime("%H:%M:%S"), console.width)
                    live.update(screen, refresh=True)
                ready, _, _ = select.select([fd], [], [], max(0.0, due - time.monotonic()))
                if not ready:
                    continue
                typed = os.read(fd, 64).decode("ascii", errors="ignore")
                actions = {view.press(key) for key in typed}
                if "quit" in actions:
                    return EXIT_OK
                if "refresh" in actions:
                    due = 0.0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _Terminated as exc:
        return 128 + exc.signum
    finally:
        if client is not None:
            client.close()


def _connect(socket_path: Path | None, view: View) -> SyncClient | None:
    client = SyncClient(socket_path, timeout_s=REQUEST_TIMEOUT_S)
    try:
        return client.connect()
    except errors.UnsafeSocketDirectory:
        raise
    except errors.OrchestratorError as exc:
        view.lost(exc.message)
    except OSError as exc:
        view.lost(f"{socket_path or 'the socket'}: {exc}")
    return None
