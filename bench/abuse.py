"""Abuse run (issue #10): every kind of bad client and a hostile host at once, for N minutes,
while well-behaved clients check that they are still served correctly.

    python bench/abuse.py --seconds 60                      # a quick run
    python bench/abuse.py --minutes 5 --json /tmp/abuse.json
    python bench/abuse.py --minutes 5 --log-sink stalled --nofile 256

Needs root: each abusive client class runs in a process of its own under a uid of its own
(61001, 61002, ...), because the daemon caps connections per uid (`max_connections_per_peer`)
and a class sharing the well-behaved clients' uid would only measure that cap. (The late
submitters are the exception: local jobs of another uid are refused under `local.run_as =
"daemon"`, so they submit as the daemon's uid.) The classes that must see the bench's jobs are
made admins (`server.admin_uids`) where the daemon has admins. The daemon runs as `python -m
orchestrator serve` under `prlimit --nofile=N:N` (local backend, uvloop as in production),
configured with `ORCHESTRATOR__SECTION__KEY` variables, its socket in a short temporary
directory under /tmp. Everything goes over that unix socket; nothing touches the network.

First the store gets `--prefill` jobs (with a 1 s queue timeout: most end FAILED without
running), so that every `list` pages through thousands of jobs. Then the mix, all at once
until the deadline:

- hangups: connections that send `wait`, `watch` or `logs -f` on a running job, then close
  (after the first reply, or with the reply unread: the daemon's next write meets ECONNRESET)
  or half-close and close; thousands of times, far beyond the per-uid cap. At the end this
  class opens cap + 1 connections at once: cap must be admitted (no slot leaked), one refused;
- never-readers: connections that pipeline `{"op": "list", "limit": 100000}` (and one `watch`
  of everything) and never read a byte; each is reopened when the daemon drops it;
- slow readers: pipelined `list` requests read at a trickle (`--slow-read-bps`);
- late submitters: bursts of `--burst` pipelined `submit`s whose replies are read `--late-s`
  later; every acknowledged job joins the ledger (each with `queue_timeout_s`, so that the
  local backend's queue stays bounded); a submission answered with an error must not be in
  the store afterwards;
- holders: `--holders` uids, each opening `--hold` idle connections (more than the cap) for
  `--hold-s`, then letting go for `--off-s`, against the daemon's fd limit;
- garbage: invalid JSON, NUL bytes, invalid UTF-8, a line over `server.max_line_bytes`, deep
  nesting, unknown ops, wrong types; each must get one error reply with the expected code on
  a connection that stays usable;
- output floods: `yes` (stopped by `timeout_s`), `head -c 50M /dev/zero` on stdout and on
  stderr, with `local.max_output_bytes` set to `--max-output-bytes`; their logs are read back;
- the daemon's stdout (`--log-sink`): a file, a pipe closed after one line (`| head -n 1`), a
  pipe nobody reads (`stalled`, also during the final SIGTERM), or one read at 2 KiB/s (`slow`);
- normal clients (threads, `SyncClient`, the daemon's own uid): submit `sh -c 'sleep S; exit N'`
  with random N, wait, and check state and exit code; a pinger (a process of its own) pings
  every 100 ms on one connection and records each round trip;
- with `--storm-loops N` (off by default): N loops that connect, ping and hang up with no
  back-off at all, reconnecting at once after any failure.

Then the drain: the long-running target jobs are cancelled, and all jobs must end within
`--drain-s`. SIGTERM must stop the daemon with status 0 within `--stop-timeout-s`. Left-over job
processes are counted and killed (each runner leads its own process group). The store file is
then read: every acknowledged job present (else lost) and terminal, LOST jobs counted, exit codes
compared with the `exit N` of each command and with the exit status each job's runner wrote
beside its logs. RSS (VmRSS), open fds and load are sampled every 0.5 s; the daemon's log is
scanned for warnings and errors.

Prints a table, any findings (exit status 1 when there are), and with `--json PATH` (or `-`) the
whole report as JSON. The work directory (store, daemon log) is kept when there are findings or
with `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run as `python bench/abuse.py`
    sys.path.insert(0, str(_REPO))

from bench.ingest import kill_jobs_under  # noqa: E402
from orchestrator import errors  # noqa: E402
from orchestrator.client import SyncClient  # noqa: E402
from orchestrator.settings import ServerSettings  # noqa: E402

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "LOST"})
ACTIVE = ("QUEUED", "SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")
LOG_SINKS = ("file", "closed", "stalled", "slow")
ROLE_UIDS: dict[str, int | None] = {
    "hangups": 61001,
    "never_read": 61002,
    "slow_read": 61003,
    "late_submit": None,  # the daemon's uid: local jobs of other uids are refused (local.run_as)
    "garbage": 61005,
    "storm": 61006,
}
HOLDER_UID0 = 61010  # holders: 61010, 61011, ...
ADMIN_ROLES = ("hangups", "never_read", "slow_read")
_STDERR_FLOOD = "head -c 50M /dev/zero >&2; exit 3"
_EXIT_RE = re.compile(r"exit (\d+)$")
_MAX_NOTES = 30
_DEFAULTS = ServerSettings.model_construct()  # the daemon's own limits, left as they are


# -- configuration and tallies -------------------------------------------------------------


@dataclasses.dataclass
class Config:
    duration_s: float = 300.0
    seed: int = 1
    log_sink: str = "file"
    nofile: int = 256
    max_concurrency: int = 8  # local jobs at once
    max_output_bytes: int = 4 << 20
    idle_timeout_s: float = 30.0
    normal_clients: int = 4
    ping_interval_s: float = 0.1
    hangup_loops: int = 8  # concurrent hang-up cycles (far below the per-uid cap)
    never_readers: int = 2
    never_read_requests: int = 2000
    slow_readers: int = 2
    slow_batch: int = 8
    slow_read_bps: int = 32 * 1024
    burst: int = 2000
    burst_every_s: float = 30.0
    late_s: float = 10.0
    burst_queue_timeout_s: float = 10.0  # burst jobs not started by then fail: a bounded queue
    storm_loops: int = 0  # concurrent connect-ping-close loops with no back-off (0: none)
    holders: int = 4
    hold: int = 80
    hold_s: float = 20.0
    off_s: float = 10.0
    flood_every_s: float = 30.0
    prefill: int = 5000  # jobs in the store before the abuse starts
    snapshot: bool = True  # run a copy of the daemon's code, made at the start
    drain_s: float = 180.0
    stop_timeout_s: float = 15.0
    per_peer_cap: int = _DEFAULTS.max_connections_per_peer
    max_line_bytes: int = _DEFAULTS.max_line_bytes
    # Filled in at run time, for the role processes.
    socket_path: str = ""
    end_at: float = 0.0  # wall clock (time.time()): every loop stops here
    targets: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Stats:
    """What one class of clients did and got back."""

    connections: int = 0
    connect_failures: Counter[str] = dataclasses.field(default_factory=Counter)
    sent: int = 0
    answered: int = 0  # reply lines that end a request (ok or error), plus connection-level errors
    ok: int = 0
    codes: Counter[str] = dataclasses.field(default_factory=Counter)  # error replies by code
    dropped: int = 0  # connections the daemon closed while this side still wanted them
    io_errors: Counter[str] = dataclasses.field(default_factory=Counter)
    anomalies: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)  # the first anomalies, in words
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def reply(self, data: dict[str, Any]) -> None:
        self.answered += 1
        if data.get("ok"):
            self.ok += 1
        else:
            self.codes[str(data.get("code"))] += 1

    def anomaly(self, text: str) -> None:
        self.anomalies += 1
        if len(self.notes) < _MAX_NOTES:
            self.notes.append(text)

    def io_error(self, exc: BaseException) -> None:
        self.io_errors[error_name(exc)] += 1

    def to_dict(self) -> dict[str, Any]:
        """Shallow, as JSON has it (`dataclasses.asdict` would turn Counters into tuples)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def error_name(exc: BaseException) -> str:
    """`BrokenPipeError`, or `OSError(EAGAIN)` for a bare OSError with an errno."""
    number = getattr(exc, "errno", None)
    if type(exc) is OSError and number:
        return f"OSError({errno.errorcode.get(number, number)})"
    return type(exc).__name__


def request(op: str, request_id: int | str, **params: Any) -> bytes:
    return orjson.dumps({"v": 1, "id": request_id, "op": op, **params}) + b"\n"


def exit_spec(code: int, name: str, sleep_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """A job whose command says its own exit code (`... exit N`), for the store check."""
    script = f"exit {code}" if sleep_s is None else f"sleep {sleep_s:.2f}; exit {code}"
    return {"command": ["sh", "-c", script], "name": name, **extra}


def expected_exit(command: list[str]) -> int | None:
    match = _EXIT_RE.search(command[-1]) if command and command[0] == "sh" else None
    return int(match.group(1)) if match else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- a raw connection (the abusive roles) ---------------------------------------------------


class RawConn:
    """A non-blocking unix socket: nothing is read unless asked, so "never reads" means it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    async def open(cls, path: str, timeout_s: float = 5.0) -> RawConn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes, timeout_s: float | None = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv_some(self, max_bytes: int, timeout_s: float) -> int:
        """Up to `max_bytes` once readable. The wait is what times out, never a read: a
        cancelled `loop.sock_recv` may already hold bytes, which would be lost."""
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        loop.add_reader(self.sock.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            async with asyncio.timeout(timeout_s):
                await readable
        finally:
            loop.remove_reader(self.sock.fileno())
        try:
            data = self.sock.recv(max_bytes)
        except BlockingIOError:
            return 0
        self.eof = self.eof or not data
        self.buffer += data
        return len(data)

    def lines(self) -> Iterator[bytes]:
        """The complete lines received so far (taken out of the buffer)."""
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[: end + 1])
            del self.buffer[: end + 1]
            yield line

    async def recv_line(self, timeout_s: float) -> bytes | None:
        """The next line; None at EOF. TimeoutError if none comes within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (end := self.buffer.find(b"\n")) < 0:
            if self.eof:
                return None
            await self.recv_some(1 << 20, max(0.0, deadline - time.monotonic()))
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    def peer_closed(self) -> bool:
        """Whether the daemon has closed its side (checked without reading)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
        return any(events & gone for _, events in poller.poll(0))

    def close(self, reset: bool = False) -> None:
        if reset:  # drop whatever the daemon sent and we never read: its next write fails
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def parse(line: bytes, stats: Stats) -> dict[str, Any] | None:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        stats.anomaly(f"a reply line that is not JSON: {line[:120]!r}")
        return None
    if not isinstance(data, dict) or "ok" not in data:
        stats.anomaly(f"a reply line that is not a reply: {line[:120]!r}")
        return None
    return data


class Role:
    """The context of one abusive role process: its config, deadline and tally."""

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.stats = Stats()
        self.rng = random.Random(f"{cfg.seed}-{name}")
        self.end = time.monotonic() + (cfg.end_at - time.time())

    def running(self) -> bool:
        return time.monotonic() < self.end

    def left_s(self) -> float:
        return max(0.0, self.end - time.monotonic())

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, min(seconds, self.left_s())))

    async def connect(self) -> RawConn | None:
        try:
            conn = await RawConn.open(self.cfg.socket_path)
        except (OSError, TimeoutError) as exc:
            self.stats.connect_failures[error_name(exc)] += 1
            return None
        self.stats.connections += 1
        return conn

    async def call(self, conn: RawConn, op: str, timeout_s: float = 10.0, **params: Any) -> Any:
        """One request and its one reply (or None: no reply, EOF, not JSON). A refusal
        (`overloaded`) can close the connection before the request is even sent: the refusal
        is read all the same."""
        self.stats.sent += 1
        try:
            await conn.send(request(op, 1, **params))
        except (BrokenPipeError, ConnectionResetError):
            pass  # a line may be waiting all the same: a refusal, sent on connect
        line = await conn.recv_line(timeout_s)
        if line is None:
            self.stats.dropped += 1
            return None
        data = parse(line, self.stats)
        if data is not None:
            self.stats.reply(data)
        return data


# -- the abusive roles (each in a process of its own, under its own uid) --------------------


async def role_hangups(role: Role) -> None:
    """wait / watch / logs -f on a running job, then hang up; at the end, the slot check."""
    cfg, stats = role.cfg, role.stats
    targets = list(cfg.targets)
    cycles: Counter[str] = Counter()
    per_uid_refusals = 0

    async def refresh_targets() -> None:
        while role.running():
            conn = await role.connect()
            if conn is not None:
                try:
                    reply = await role.call(conn, "list", state=["RUNNING"], limit=50)
                    if reply and reply.get("ok") and reply["jobs"]:
                        targets[:] = [job["id"] for job in reply["jobs"]] + list(cfg.targets)
                except (OSError, TimeoutError) as exc:
                    stats.io_error(exc)
                finally:
                    conn.close()
            await role.sleep(5.0)

    async def cycle(rng: random.Random) -> None:
        nonlocal per_uid_refusals
        conn = await role.connect()
        if conn is None:
            await role.sleep(0.1)
            return
        op = rng.choice(("wait", "watch", "logs"))
        how = rng.choice(("close", "reset", "half"))
        params: dict[str, Any] = {"job_id": rng.choice(targets)}
        if op == "logs":
            params["follow"] = True
        try:
            await conn.send(request(op, 1, **params))
            stats.sent += 1
            if how == "close":  # read what comes first (a wait on a running job: nothing)
                with contextlib.suppress(TimeoutError):
                    line = await conn.recv_line(rng.uniform(0.05, 0.5))
                    data = parse(line, stats) if line else None
                    if data is not None:
                        stats.reply(data)  # the first line of the stream, or an error
                        if "from uid" in str(data.get("message")):  # not the global cap
                            per_uid_refusals += 1
                            stats.anomaly(
                                f"refused by the per-uid cap while this uid held at most "
                                f"{cfg.hangup_loops + 1} connections: {data.get('message')}"
                            )
            elif how == "half":
                conn.sock.shutdown(socket.SHUT_WR)
                await asyncio.sleep(rng.uniform(0.0, 0.3))
            else:
                await asyncio.sleep(rng.uniform(0.02, 0.3))  # replies pile up unread
        except (OSError, TimeoutError) as exc:
            stats.io_error(exc)
            await asyncio.sleep(0.1)
        finally:
            conn.close(reset=how == "reset")
        cycles[f"{op}/{how}"] += 1

    async def loop(index: int) -> None:
        rng = random.Random(f"{cfg.seed}-hangup-{index}")
        while role.running():
            await cycle(rng)
            await asyncio.sleep(rng.uniform(0.0, 0.05))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(refresh_targets())
        for i in range(cfg.hangup_loops):
            tg.create_task(loop(i))
    stats.extra["cycles"] = sum(cycles.values())
    stats.extra["cycles_by_kind"] = dict(sorted(cycles.items()))
    stats.extra["per_uid_refusals"] = per_uid_refusals
    stats.extra["slot_check"] = await slot_check(role)


def outcome_of(reply: dict[str, Any] | None) -> str:
    """A reply's outcome: ok, its error code, or closed_no_reply (closed before any line)."""
    if reply is None:
        return "closed_no_reply"
    return "ok" if reply.get("ok") else str(reply.get("code"))


async def slot_check(role: Role) -> dict[str, int]:
    """After every hang-up: cap + 1 connections at once from this uid, each pinging. Exactly
    `cap` must be admitted; a slot still held by a hung-up connection shows as a refusal."""
    await asyncio.sleep(3.0)  # the daemon notices a full hang-up within a fraction of a second
    cap = role.cfg.per_peer_cap
    outcome: Counter[str] = Counter()
    conns: list[RawConn] = []
    for _ in range(cap + 1):
        conn = await role.connect()
        if conn is None:
            outcome["connect_failed"] += 1
            continue
        conns.append(conn)
        try:
            reply = await role.call(conn, "ping", timeout_s=10.0)
        except (OSError, TimeoutError) as exc:
            outcome[error_name(exc)] += 1
            continue
        outcome[outcome_of(reply)] += 1
    for conn in conns:
        conn.close()
    if outcome["ok"] != cap or outcome["overloaded"] != 1:
        role.stats.anomaly(f"slot check: {cap + 1} connections at once gave {dict(outcome)}")
    return dict(outcome)


async def role_never_read(role: Role) -> None:
    """Connections that pipeline big `list`s (and one `watch` of everything), never read."""
    cfg, stats = role.cfg, role.stats
    drop_after: list[float] = []

    async def one(kind: str) -> None:
        while role.running():
            conn = await role.connect()
            if conn is None:
                await role.sleep(1.0)
                continue
            try:
                if kind == "watch":
                    await conn.send(request("watch", 1))
                    stats.sent += 1
                else:
                    for i in range(cfg.never_read_requests):
                        await conn.send(request("list", i, limit=100_000), timeout_s=2.0)
                        stats.sent += 1
            except TimeoutError:
                pass  # the daemon stopped reading us: as it should
            except OSError as exc:
                stats.io_error(exc)
            last_send = time.monotonic()
            while role.running() and not conn.peer_closed():
                await role.sleep(0.5)
            if conn.peer_closed():
                stats.dropped += 1
                drop_after.append(round(time.monotonic() - last_send, 1))
            conn.close(reset=True)
            await role.sleep(0.5)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(one("watch"))
        for _ in range(cfg.never_readers):
            tg.create_task(one("list"))
    stats.extra["dropped_after_s"] = drop_after[:20]


async def role_slow_read(role: Role) -> None:
    """Pipelined `list`s (limit 100000) read at `slow_read_bps`, batch after batch."""
    cfg, stats = role.cfg, role.stats
    bytes_read = 0
    tick_s = 0.1
    per_tick = max(1, int(cfg.slow_read_bps * tick_s))

    async def one() -> None:
        nonlocal bytes_read
        next_id = 0
        while role.running():
            conn = await role.connect()
            if conn is None:
                await role.sleep(1.0)
                continue
            try:
                while role.running():
                    ids = set(range(next_id, next_id + cfg.slow_batch))
                    next_id += cfg.slow_batch
                    await conn.send(b"".join(request("list", i, limit=100_000) for i in ids))
                    stats.sent += len(ids)
                    while ids and role.running():
                        with contextlib.suppress(TimeoutError):
                            bytes_read += await conn.recv_some(per_tick, tick_s)
                        for line in conn.lines():
                            answer(parse(line, stats), ids)
                        if conn.eof:
                            stats.dropped += 1
                            break
                        await asyncio.sleep(tick_s)
                    if conn.eof:
                        break
            except (OSError, TimeoutError) as exc:
                stats.io_error(exc)
            finally:
                conn.close()
            await role.sleep(0.5)  # dropped or failed: a careful client backs off

    def answer(data: dict[str, Any] | None, ids: set[int]) -> None:
        if data is None:
            return
        rid = data.get("id")
        if rid is None:  # a connection-level error (slow_reader, idle_timeout)
            stats.codes[str(data.get("code"))] += 1
            return
        if rid not in ids:
            stats.anomaly(f"a reply for id {rid!r}, not unanswered on this connection")
            return
        ids.discard(rid)
        stats.reply(data)
        if data.get("ok") and len(data.get("jobs", ())) > 1000:
            stats.anomaly(f"a list reply of {len(data['jobs'])} jobs (page is 1000)")

    async with asyncio.TaskGroup() as tg:
        for _ in range(cfg.slow_readers):
            tg.create_task(one())
    stats.extra["bytes_read"] = bytes_read


async def role_late_submit(role: Role) -> None:
    """Bursts of pipelined submits whose acks are read `late_s` later. The acked ids go back,
    and the names of the jobs whose submission got an error reply (were they recorded?)."""
    cfg, stats = role.cfg, role.stats
    acked: list[tuple[str, int]] = []
    refused: list[tuple[str, str]] = []  # (job name, error code)
    burst_no = 0
    while role.running():
        started = time.monotonic()
        burst_no += 1
        conn = await role.connect()
        if conn is None:
            await role.sleep(1.0)
            continue
        codes = {i: role.rng.randrange(0, 4) for i in range(cfg.burst)}
        lines = b"".join(
            request(
                "submit",
                i,
                job=exit_spec(
                    code, f"late-{burst_no}-{i}", queue_timeout_s=cfg.burst_queue_timeout_s
                ),
            )
            for i, code in codes.items()
        )
        sender = asyncio.create_task(conn.send(lines, timeout_s=None), name="late-sender")
        stats.sent += len(codes)
        try:
            await asyncio.sleep(cfg.late_s)  # read nothing meanwhile
            deadline = time.monotonic() + 60.0
            while codes and time.monotonic() < deadline:
                line = await conn.recv_line(max(0.1, deadline - time.monotonic()))
                if line is None:
                    stats.dropped += 1
                    break
                data = parse(line, stats)
                if data is None:
                    continue
                rid = data.get("id")
                if rid not in codes:
                    stats.anomaly(f"late submit: a reply for id {rid!r}: {line[:200]!r}")
                    continue
                code = codes.pop(rid)
                stats.reply(data)
                if data.get("ok"):
                    acked.append((data["job"]["id"], code))
                else:
                    refused.append((f"late-{burst_no}-{rid}", str(data.get("code"))))
        except (OSError, TimeoutError) as exc:
            stats.io_error(exc)
        finally:
            if codes:
                stats.anomaly(f"burst {burst_no}: {len(codes)} submits never answered")
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            conn.close()
        await role.sleep(cfg.burst_every_s - (time.monotonic() - started))
    stats.extra["acked"] = acked
    stats.extra["refused"] = refused
    stats.extra["bursts"] = burst_no


async def role_holder(role: Role) -> None:
    """Open `hold` idle connections (more than the cap) for `hold_s`, let go for `off_s`."""
    cfg, stats = role.cfg, role.stats
    admitted_per_phase: list[int] = []
    while role.running():
        held: list[RawConn] = []
        outcome: Counter[str] = Counter()
        for _ in range(cfg.hold):
            if not role.running():
                break
            conn = await role.connect()
            if conn is None:
                outcome["connect_failed"] += 1
                continue
            try:
                reply = await role.call(conn, "ping", timeout_s=5.0)
            except (OSError, TimeoutError) as exc:
                outcome[error_name(exc)] += 1
                conn.close()
                continue
            outcome[outcome_of(reply)] += 1
            if reply and reply.get("ok"):
                held.append(conn)
            else:
                conn.close()
        admitted_per_phase.append(outcome["ok"])
        if outcome["ok"] > cfg.per_peer_cap:
            stats.anomaly(f"{outcome['ok']} connections admitted for one uid: {dict(outcome)}")
        stats.extra.setdefault("outcomes", Counter()).update(outcome)
        await role.sleep(cfg.hold_s)
        for conn in held:
            if conn.peer_closed():
                stats.dropped += 1
            conn.close(reset=role.rng.random() < 0.5)
        await role.sleep(cfg.off_s)
    stats.extra["admitted_per_phase"] = admitted_per_phase
    stats.extra["outcomes"] = dict(stats.extra.get("outcomes", {}))


def garbage_lines(max_line_bytes: int) -> list[tuple[str, bytes, str]]:
    """(name, line, the error code it must get)."""
    huge = b'{"v": 1, "id": 1, "op": "ping", "pad": "' + b"x" * (max_line_bytes + 1024) + b'"}\n'
    return [
        ("invalid JSON", b"{not json\n", "invalid_json"),
        ("NUL bytes", b"\x00\x00\x00\x00\n", "invalid_json"),
        ("NUL inside JSON", b'{"v": 1, "id": 2, "op": "ping"\x00}\n', "invalid_json"),
        ("invalid UTF-8", b'{"v": 1, "id": 3, "op": "ping", "x": "\xff\xfe"}\n', "invalid_json"),
        ("deep nesting", b"[" * 100_000 + b"\n", "invalid_json"),
        ("huge line", huge, "line_too_long"),
        ("unknown op", b'{"v": 1, "id": 4, "op": "explode"}\n', "unknown_op"),
        ("no op", b'{"v": 1, "id": 5}\n', "invalid_request"),
        ("not an object", b"[1, 2, 3]\n", "invalid_request"),
        ("version 2", b'{"v": 2, "id": 6, "op": "ping"}\n', "unsupported_version"),
        ("float id", b'{"v": 1, "id": 1.5, "op": "ping"}\n', "invalid_request"),
        (
            "command a string",
            b'{"id": 7, "op": "submit", "job": {"command": "ls"}}\n',
            "invalid_request",
        ),
        ("limit a string", b'{"id": 8, "op": "list", "limit": "ten"}\n', "invalid_request"),
        ("limit negative", b'{"id": 9, "op": "list", "limit": -1}\n', "invalid_request"),
        ("unknown field", b'{"id": 10, "op": "ping", "extra": 1}\n', "invalid_request"),
        (
            "unknown job field",
            b'{"id": 11, "op": "submit", "job": {"command": ["true"], "bogus": 1}}\n',
            "invalid_request",
        ),
        ("empty submit_many", b'{"id": 12, "op": "submit_many", "jobs": []}\n', "invalid_request"),
        ("empty job id", b'{"id": 13, "op": "get", "job_id": ""}\n', "invalid_request"),
        ("no such job", b'{"id": 14, "op": "get", "job_id": "nope"}\n', "not_found"),
        ("wait no such job", b'{"id": 15, "op": "wait", "job_id": "nope"}\n', "not_found"),
    ]


async def role_garbage(role: Role) -> None:
    """Garbage lines on one connection (each must get its error, then a ping must work), and
    connections that send garbage and hang up."""
    cfg, stats = role.cfg, role.stats
    items = garbage_lines(cfg.max_line_bytes)
    per_item: Counter[str] = Counter()
    conn: RawConn | None = None
    while role.running():
        if conn is None and (conn := await role.connect()) is None:
            await role.sleep(1.0)
            continue
        try:
            for name, line, expected in items:
                stats.sent += 1
                await conn.send(line, timeout_s=10.0)
                reply = await conn.recv_line(10.0)
                data = parse(reply, stats) if reply else None
                if data is None:
                    stats.anomaly(f"{name}: no reply (connection closed)")
                    raise ConnectionResetError("closed")
                stats.reply(data)
                per_item[name] += 1
                code = data.get("code")
                if data.get("ok") or code != expected:
                    stats.anomaly(f"{name}: expected {expected or 'an error'}, got {data}")
            stats.sent += 1
            await conn.send(request("ping", "after-garbage"))
            reply = await conn.recv_line(10.0)
            if reply is None or not (data := parse(reply, stats)) or not data.get("ok"):
                stats.anomaly(f"ping after garbage: {reply!r}")
            else:
                stats.reply(data)
            await hit_and_run(role, items)
        except (OSError, TimeoutError) as exc:
            stats.io_error(exc)
            conn.close()
            conn = None
        await role.sleep(0.2)
    if conn is not None:
        conn.close()
    stats.extra["rounds"] = per_item.get("invalid JSON", 0)


async def hit_and_run(role: Role, items: list[tuple[str, bytes, str]]) -> None:
    """One garbage line (or half of one), then hang up without reading."""
    conn = await role.connect()
    if conn is None:
        return
    _, line, _ = role.rng.choice(items)
    if role.rng.random() < 0.5:
        line = line[: len(line) // 2]  # no newline: the daemon holds a partial line at EOF
    try:
        await conn.send(line, timeout_s=5.0)
        role.stats.extra["hit_and_run"] = role.stats.extra.get("hit_and_run", 0) + 1
    except (OSError, TimeoutError) as exc:
        role.stats.io_error(exc)
    finally:
        conn.close(reset=role.rng.random() < 0.5)


async def role_storm(role: Role) -> None:
    """Connect, ping, hang up, again at once; on any failure, again at once: a careless client
    retrying in a tight loop, `storm_loops` of them."""
    cfg, stats = role.cfg, role.stats
    outcome: Counter[str] = Counter()

    async def loop() -> None:
        while role.running():
            conn = await role.connect()
            if conn is None:
                await asyncio.sleep(0)  # no back-off: that is the point
                continue
            try:
                outcome[outcome_of(await role.call(conn, "ping", timeout_s=5.0))] += 1
            except (OSError, TimeoutError) as exc:
                outcome[error_name(exc)] += 1
            finally:
                conn.close(reset=role.rng.random() < 0.5)

    async with asyncio.TaskGroup() as tg:
        for _ in range(cfg.storm_loops):
            tg.create_task(loop())
    stats.extra["outcomes"] = dict(outcome)


ROLES: dict[str, Callable[[Role], Any]] = {
    "storm": role_storm,
    "hangups": role_hangups,
    "never_read": role_never_read,
    "slow_read": role_slow_read,
    "late_submit": role_late_submit,
    "garbage": role_garbage,
    "holder": role_holder,
}


def pinger(cfg: Config) -> dict[str, Any]:
    """The well-behaved client: one connection, a ping every `ping_interval_s`, each round
    trip timed. A blocking socket and no event loop, like a plain health check."""
    latencies: list[tuple[float, float]] = []  # (wall clock sent, round trip s)
    lateness: list[float] = []  # how late each sleep woke up: the host's scheduling noise
    remote: Counter[str] = Counter()  # error replies, by code
    failed: Counter[str] = Counter()  # no reply: the connection failed or timed out
    end = time.monotonic() + (cfg.end_at - time.time())
    client: SyncClient | None = None
    due = time.monotonic()
    while due < end:
        time.sleep(max(0.0, due - time.monotonic()))
        lateness.append(max(0.0, time.monotonic() - due))
        try:
            if client is None:
                client = SyncClient(cfg.socket_path, timeout_s=10.0).connect()
            at, sent = time.time(), time.perf_counter()
            client.call("ping")
            latencies.append((at, time.perf_counter() - sent))
        except errors.RemoteError as exc:
            remote[exc.remote_code] += 1
        except (errors.DaemonUnreachable, errors.ProtocolError, OSError) as exc:
            failed[error_name(exc)] += 1
            if client is not None:
                client.close()
            client = None
        due = max(due + cfg.ping_interval_s, time.monotonic())  # late: go on, never burst
    if client is not None:
        client.close()
    return {
        "latencies": latencies,
        "codes": dict(remote),
        "io_errors": dict(failed),
        "wake_p99_ms": percentile(lateness, 0.99) * 1000,
        "wake_max_ms": max(lateness, default=0.0) * 1000,
    }


def role_main(name: str, uid: int | None, config: str) -> int:
    """A role process: its Config as JSON in argv, its result as JSON on stdout. It starts as
    root (the interpreter lives under /root, 0700) and becomes `uid`, with the socket's group
    (root) added so that it may connect, before it talks to the daemon."""
    cfg = Config(**json.loads(config))
    if uid is not None:
        os.setgroups([0])
        os.setgid(uid)
        os.setuid(uid)
    if name == "pinger":
        result: dict[str, Any] = pinger(cfg)
    else:
        role = Role(cfg, name)
        asyncio.run(ROLES[name](role))
        result = role.stats.to_dict()
    sys.stdout.write(json.dumps(result))
    return 0


# -- the bench's own process: daemon, samplers, normal clients -------------------------------


@dataclasses.dataclass
class Ledger:
    """Every job the daemon acknowledged: id -> (kind, the exit code its command asks for)."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    jobs: dict[str, tuple[str, int | None]] = dataclasses.field(default_factory=dict)
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, code)

    def add(self, job_id: str, kind: str, code: int | None) -> None:
        with self.lock:
            self.jobs[job_id] = (kind, code)


class Daemon:
    """`python -m orchestrator serve` under prlimit, with its stdout where `log_sink` says."""

    def __init__(self, cfg: Config, root: Path, env: dict[str, str]) -> None:
        self.cfg = cfg
        self.root = root
        self.env = env
        self.socket_path = root / "o.sock"
        self.store_path = root / "state" / "orchestrator.db"
        self.log_path = root / "daemon.log"
        self.err_path = root / "daemon.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sink_thread: threading.Thread | None = None
        self.exited = threading.Event()
        self.log_bytes_read = 0

    def start(self) -> None:
        pipe = self.cfg.log_sink != "file"
        with open(self.log_path, "wb") as log, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    *("prlimit", f"--nofile={self.cfg.nofile}:{self.cfg.nofile}", "--"),
                    *(sys.executable, "-m", "orchestrator", "serve"),
                ],
                env=self.env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else log,
                stderr=err,
            )
        if self.cfg.log_sink in ("closed", "slow"):
            self.sink_thread = threading.Thread(target=self._read_sink, name="log-sink")
            self.sink_thread.start()

    def _read_sink(self) -> None:
        """`closed`: read one line, then close the pipe (`| head -n 1`). `slow`: 2 KiB/s."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        pipe = self.proc.stdout
        with open(self.log_path, "ab") as log:
            if self.cfg.log_sink == "closed":
                line = pipe.readline()
                log.write(line)
                self.log_bytes_read += len(line)
                pipe.close()
                return
            while chunk := os.read(pipe.fileno(), 1024):
                log.write(chunk)
                self.log_bytes_read += len(chunk)
                self.exited.wait(0.5)  # once the daemon has exited, the rest at once

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited {self.proc.returncode} during start-up")
            try:
                with SyncClient(self.socket_path, timeout_s=5) as client:
                    client.call("ping")
                    return
            except (errors.DaemonUnreachable, ConnectionError):
                time.sleep(0.05)
        raise RuntimeError(f"the daemon did not answer within {timeout_s}s")

    def stop(self) -> tuple[int | None, float, bool]:
        """SIGTERM; the exit status (None: not within the bound, then SIGKILLed), the seconds
        it took, and whether the daemon was still running when it was sent."""
        assert self.proc is not None
        started = time.monotonic()
        was_running = self.proc.poll() is None
        if was_running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status: int | None = self.proc.wait(timeout=self.cfg.stop_timeout_s)
        except subprocess.TimeoutExpired:
            status = None
            self.proc.kill()
            self.proc.wait()
        elapsed = time.monotonic() - started
        self._finish_sink()
        return status, elapsed, was_running

    def _finish_sink(self) -> None:
        assert self.proc is not None
        self.exited.set()
        if self.sink_thread is not None:
            self.sink_thread.join(timeout=30)
        if self.cfg.log_sink == "stalled" and self.proc.stdout is not None:
            with open(self.log_path, "ab") as log:  # what the pipe still held
                data = self.proc.stdout.read()
                log.write(data)
                self.log_bytes_read += len(data)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


@dataclasses.dataclass
class Samples:
    """Sampled every 0.5 s: the daemon's RSS and open fds, the host's load."""

    rss_kib: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (wall, KiB)
    fds: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    load: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    hwm_kib: int = 0
    cpu_s: float = 0.0
    died_at_s: float | None = None


def sample_daemon(pid: int, samples: Samples, stop: threading.Event) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("State", "").strip().startswith("Z"):
                raise FileNotFoundError(pid)
            now = time.time()
            samples.rss_kib.append((now, int(fields["VmRSS"].split()[0])))
            samples.hwm_kib = int(fields["VmHWM"].split()[0])
            samples.fds.append((now, len(os.listdir(f"/proc/{pid}/fd"))))
            stat = Path(f"/proc/{pid}/stat").read_text()
            utime, stime = stat[stat.rindex(")") + 2 :].split()[11:13]
            samples.cpu_s = (int(utime) + int(stime)) / ticks
        except (FileNotFoundError, ProcessLookupError, KeyError):
            if samples.died_at_s is None:
                samples.died_at_s = time.time()
            return
        samples.load.append((now, os.getloadavg()[0]))
        stop.wait(0.5)


def tally(stats: Stats, lock: threading.Lock, code: str | None = None) -> None:
    """One request of a client thread answered: ok, or an error reply with `code`."""
    with lock:
        stats.sent += 1
        stats.reply({"ok": code is None, "code": code})


def tally_failure(stats: Stats, lock: threading.Lock, exc: BaseException) -> None:
    """One request of a client thread left without a reply: its connection failed."""
    with lock:
        stats.sent += 1
        stats.io_error(exc)


def normal_client(
    index: int, cfg: Config, ledger: Ledger, stats: Stats, end: float, lock: threading.Lock
) -> None:
    """Submit `sh -c 'sleep S; exit N'`, wait for it, check state and exit code; repeat."""
    rng = random.Random(f"{cfg.seed}-normal-{index}")
    client = SyncClient(cfg.socket_path, timeout_s=120.0)
    seq = 0
    while time.monotonic() < end:
        seq += 1
        code = rng.choice((0, 0, 1, 2, 3, 7, 42, 255))
        spec = exit_spec(code, f"normal-{index}-{seq}", rng.choice((0.0, 0.05, 0.2, 0.5)))
        try:
            job = client.submit(spec)  # (re)connects as needed
            tally(stats, lock)
            ledger.add(job["id"], "normal", code)
            final = client.wait(job["id"])
            tally(stats, lock)
        except errors.RemoteError as exc:
            tally(stats, lock, exc.remote_code)
            client.close()
            time.sleep(0.2)  # e.g. overloaded while the holders fill every slot
            continue
        except (errors.DaemonUnreachable, errors.ProtocolError, OSError) as exc:
            tally_failure(stats, lock, exc)
            client.close()
            time.sleep(0.2)
            continue
        if (final["state"], final.get("exit_code")) != (
            "SUCCEEDED" if code == 0 else "FAILED",
            code,
        ):
            with lock:
                stats.anomaly(
                    f"job {job['id']} asked exit {code}: wait gave {final['state']} "
                    f"exit_code={final.get('exit_code')} ({final.get('reason')})"
                )
    client.close()


def output_flooder(
    cfg: Config, ledger: Ledger, stats: Stats, end: float, lock: threading.Lock
) -> None:
    """Every `flood_every_s`: `yes` (stopped by its timeout_s), 50 MB on stdout and on stderr;
    the output kept must stop at `max_output_bytes` (plus the truncation marker), which the
    job's logs, read back whole, show."""
    largest: dict[str, int] = {"stdout": 0, "stderr": 0}
    outcomes: Counter[str] = Counter()
    floods: list[tuple[str, int | None, dict[str, Any]]] = [
        ("yes", None, {"command": ["yes"], "name": "flood-yes", "timeout_s": 5}),
        ("stdout", 0, {"command": ["head", "-c", "50M", "/dev/zero"], "name": "flood-1"}),
        ("stderr", 3, {"command": ["sh", "-c", _STDERR_FLOOD], "name": "flood-2"}),
    ]
    client = SyncClient(cfg.socket_path, timeout_s=120.0)
    while time.monotonic() < end:
        started = time.monotonic()
        for kind, code, spec in floods:
            sizes = {"stdout": 0, "stderr": 0}
            try:
                job = client.submit(spec)
                tally(stats, lock)
                ledger.add(job["id"], "output", code)
                final = client.wait(job["id"])
                tally(stats, lock)
                outcomes[f"{kind}: {final['state']} exit_code={final.get('exit_code')}"] += 1
                for reply in client.stream("logs", job_id=job["id"]):
                    if "data" in reply:
                        sizes[reply["stream"]] += len(reply["data"].encode())
                tally(stats, lock)
            except errors.RemoteError as exc:
                tally(stats, lock, exc.remote_code)
                continue
            except (errors.DaemonUnreachable, errors.ProtocolError, OSError) as exc:
                tally_failure(stats, lock, exc)
                client.close()
                continue
            for stream, size in sizes.items():
                largest[stream] = max(largest[stream], size)
                if size > cfg.max_output_bytes + 200:
                    with lock:
                        stats.anomaly(f"job {job['id']}: {size} bytes of {stream} kept")
        pause_s = min(cfg.flood_every_s - (time.monotonic() - started), end - time.monotonic())
        time.sleep(max(0.0, pause_s))
    client.close()
    stats.extra["largest_log_bytes"] = largest
    stats.extra["outcomes"] = dict(outcomes)


# -- the run -------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Copy the daemon's code (the package, with the local backend's runner, which each
    launch runs from disk) to `root/src`: edits made to the working tree during the run do
    not reach the daemon under test. Returns what was copied: the commit and the local edits
    on top of it (read-only git commands)."""
    shutil.copytree(
        _REPO / "orchestrator",
        root / "src" / "orchestrator",
        ignore=shutil.ignore_patterns("__pycache__"),
    )

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(_REPO), *args],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            return "?"
        return out.stdout.strip() or "-"

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "local_edits": git("diff", "--shortstat", "HEAD", "--", "orchestrator"),
    }


def daemon_env(cfg: Config, root: Path) -> dict[str, str]:
    """The daemon's settings: the roles' uids admitted; those that must see every job (the
    hang-ups target the bench's jobs, the readers list them all) made admins, where this
    version of the daemon has admins (before it, every peer saw every job). With a snapshot
    of the code in `root/src`, the daemon runs that."""
    code = {"PYTHONPATH": str(root / "src")} if (root / "src").is_dir() else {}
    role_uids = [uid for uid in ROLE_UIDS.values() if uid is not None]
    uids = [0, os.getuid(), *role_uids, *(HOLDER_UID0 + i for i in range(cfg.holders))]
    admins = {}
    if "admin_uids" in ServerSettings.model_fields:
        admin_uids = [0, os.getuid(), *(ROLE_UIDS[name] for name in ADMIN_ROLES)]
        admins["ORCHESTRATOR__SERVER__ADMIN_UIDS"] = json.dumps(sorted(set(admin_uids)))
    return {
        **os.environ,
        **code,
        **admins,
        "ORCHESTRATOR__SERVER__SOCKET_PATH": str(root / "o.sock"),
        "ORCHESTRATOR__SERVER__ALLOWED_UIDS": json.dumps(sorted(set(uids))),
        "ORCHESTRATOR__SERVER__IDLE_TIMEOUT_S": str(cfg.idle_timeout_s),
        "ORCHESTRATOR__STORE__PATH": str(root / "state" / "orchestrator.db"),
        "ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": str(cfg.max_concurrency),
        "ORCHESTRATOR__LOCAL__MAX_OUTPUT_BYTES": str(cfg.max_output_bytes),
        "ORCHESTRATOR__LOGGING__FORMAT": "json",
    }


def start_role(name: str, uid: int | None, cfg: Config) -> subprocess.Popen[bytes]:
    """A role process (see `role_main`), under `uid` if one is given."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", name]
    argv += ["--role-config", json.dumps(dataclasses.asdict(cfg))]
    return subprocess.Popen(
        [*argv, *(() if uid is None else ("--uid", str(uid)))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        cwd="/",
    )


def collect_role(name: str, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"failed": f"{name}: still running {timeout_s:.0f}s after the deadline, killed"}
    if proc.returncode != 0:
        return {"failed": f"{name}: exited {proc.returncode} (traceback on stderr above)"}
    result: dict[str, Any] = json.loads(out)
    return result


def submit_targets(client: SyncClient, ledger: Ledger) -> list[str]:
    """Long-running jobs for the hang-up clients to wait on, watch and follow."""
    specs = [
        {"command": ["sh", "-c", "while :; do echo tick; sleep 0.2; done"], "name": "target-tick"},
        {"command": ["sleep", "100000"], "name": "target-sleep"},
    ]
    ids = []
    for spec in specs:
        job = client.submit(spec)
        ledger.add(job["id"], "target", None)
        ids.append(job["id"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(client.get(job_id)["state"] == "RUNNING" for job_id in ids):
            break
        time.sleep(0.2)
    return ids


def prefill(client: SyncClient, ledger: Ledger, count: int) -> float:
    """A store of thousands of jobs before the abuse starts, for the `list`s to page through:
    `count` jobs with a 1 s queue timeout, most of which end FAILED (queue_timeout) without
    running. Returns the seconds it took until none was queued."""
    started = time.monotonic()
    for first in range(0, count, 1000):
        specs = [
            exit_spec(0, f"prefill-{i}", queue_timeout_s=1.0)
            for i in range(first, min(count, first + 1000))
        ]
        for result in client.call("submit_many", jobs=specs)["results"]:
            if result["ok"]:
                ledger.add(result["id"], "prefill", 0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and client.call("ping")["jobs"].get("QUEUED"):
        time.sleep(0.5)
    return time.monotonic() - started


def control_ping(client: SyncClient, seconds: float, interval_s: float) -> dict[str, float]:
    """Ping round trips before any abuse starts: the host's own floor at this moment."""
    rtts = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent = time.perf_counter()
        client.call("ping")
        rtts.append(time.perf_counter() - sent)
        time.sleep(interval_s)
    return {
        "p50_ms": percentile(rtts, 0.5) * 1000,
        "p99_ms": percentile(rtts, 0.99) * 1000,
        "max_ms": max(rtts) * 1000,
    }


def reconnect(path: Path, timeout_s: float) -> tuple[SyncClient, float]:
    """A client that got a ping through, and how long that took: a daemon still digesting the
    abuse may not accept connections (EAGAIN: its listen backlog is full) or answer them."""
    started = time.monotonic()
    while True:
        client = SyncClient(path, timeout_s=30)
        try:
            client.connect()
            client.call("ping")
            return client, round(time.monotonic() - started, 1)
        except (errors.DaemonUnreachable, errors.RemoteError, OSError):
            client.close()
            if time.monotonic() - started > timeout_s:
                raise
            time.sleep(0.5)


def drain(client: SyncClient, targets: list[str], cfg: Config) -> dict[str, int]:
    """Cancel the targets; wait for every job to end. The jobs still active after the wait."""
    for job_id in targets:
        with contextlib.suppress(errors.RemoteError):
            client.cancel(job_id)
    deadline = time.monotonic() + cfg.drain_s
    active: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = client.call("ping")["jobs"]
        active = {state: n for state, n in counts.items() if state in ACTIVE and n}
        if not active:
            break
        time.sleep(1.0)
    return active


def runner_record(work_dir: Path, job_id: str, attempt: int) -> dict[str, Any] | None:
    """The exit status the job's runner wrote beside its logs (None: none written)."""
    try:
        record: dict[str, Any] = json.loads((work_dir / job_id / str(attempt) / "exit").read_text())
    except (OSError, ValueError):
        return None
    return record


def check_store(store_path: Path, ledger: Ledger) -> dict[str, Any]:
    """Every acknowledged job present and terminal, with the exit code its command asks and
    the outcome its runner recorded."""
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT id, state, exit_code, reason, spec, attempt FROM jobs"
        ).fetchall()
        integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    jobs = {r[0]: r for r in rows}
    names = {orjson.loads(r[4]).get("name") for r in rows}
    refused_but_stored = Counter(code for name, code in ledger.refused if name in names)
    report: dict[str, Any] = {
        "in_store": len(jobs),
        "acknowledged": len(ledger.jobs),
        "acknowledged_by_kind": dict(Counter(kind for kind, _ in ledger.jobs.values())),
        "states": dict(Counter(r[1] for r in rows)),
        "quick_check": integrity,
    }
    lost = sorted(ledger.jobs.keys() - jobs.keys())
    not_terminal = [r[0] for r in rows if r[1] not in TERMINAL]
    lost_state = [(r[0], r[3]) for r in rows if r[1] == "LOST"]
    wrong: list[str] = []
    reasons: Counter[str] = Counter()
    disagree: list[str] = []
    for job_id, state, exit_code, reason, _, attempt in rows:
        ran = runner_record(store_path.parent / "jobs", job_id, attempt) if attempt else None
        if ran is None or ran.get("signal") is not None or ran.get("error") is not None:
            continue  # not run, or stopped by a signal (a timeout, a cancel): no exit to compare
        code = ran.get("exit_code")
        if (state, exit_code) != ("SUCCEEDED" if code == 0 else "FAILED", code) or (
            reason or ""
        ).startswith(("queue_timeout", "timeout", "cancel")):
            disagree.append(
                f"{job_id}: its runner recorded exit {code}; the store says {state} "
                f"exit_code={exit_code} ({reason})"
            )
    for job_id, state, exit_code, reason, spec, _ in rows:
        kind, asked = ledger.jobs.get(job_id, ("unacknowledged", None))
        if asked is None:
            asked = expected_exit(orjson.loads(spec)["command"])
        if state == "FAILED" and exit_code is None:
            reasons[f"{kind}: {reason}"] += 1
        if asked is None or state not in ("SUCCEEDED", "FAILED") or exit_code is None:
            if kind == "normal" and state in TERMINAL:
                wrong.append(f"{job_id} (normal, exit {asked}): {state} ({reason})")
            continue
        if (state, exit_code) != ("SUCCEEDED" if asked == 0 else "FAILED", asked):
            wrong.append(f"{job_id} ({kind}, exit {asked}): {state} exit_code={exit_code}")
    report.update(
        lost=len(lost),
        lost_ids=lost[:20],
        not_terminal=len(not_terminal),
        not_terminal_ids=not_terminal[:20],
        LOST=len(lost_state),
        LOST_jobs=lost_state[:20],
        wrong_exit=len(wrong),
        wrong_exit_jobs=wrong[:20],
        runner_disagrees=len(disagree),
        runner_disagrees_jobs=disagree[:20],
        failed_without_exit_code=dict(reasons.most_common(10)),
        refused=dict(Counter(code for _, code in ledger.refused)),
        refused_but_stored=dict(refused_but_stored),
    )
    return report


def scan_log(path: Path, err_path: Path) -> dict[str, Any]:
    """Warning-and-worse log lines by event, a sample of each, and stderr's non-empty lines."""
    by_event: Counter[str] = Counter()
    samples: dict[str, str] = {}
    lines = 0
    data = path.read_bytes() if path.exists() else b""
    complete, _, partial = data.rpartition(b"\n")  # a stalled pipe can end mid-line
    for raw in complete.splitlines():
        lines += 1
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            key = "(not JSON)"
        else:
            if not isinstance(line, dict) or line.get("level") not in (
                "warning",
                "error",
                "critical",
            ):
                continue
            key = f"{line.get('level')} {str(line.get('event')).splitlines()[0]}"
            if line.get("op"):
                key += f" op={line['op']}"
            if exceptions := line.get("exception"):
                last = exceptions[0]  # the one raised last (its causes follow)
                key += f" {last.get('exc_type')}: {str(last.get('exc_value'))[:70]}"
        by_event[key] += 1
        samples.setdefault(key, raw.decode(errors="replace")[:600])
    err = err_path.read_text(errors="replace").splitlines() if err_path.exists() else []
    return {
        "lines": lines,
        "partial_last_line": partial[:200].decode(errors="replace"),
        "warnings_by_event": dict(by_event.most_common()),
        "samples": samples,
        "stderr": err[:40],
        "stderr_lines": len(err),
    }


def run(cfg: Config, root: Path) -> dict[str, Any]:
    """Start the daemon, fill its store, abuse it, drain it, stop it, check it: the report."""
    ledger = Ledger()
    report: dict[str, Any] = {"load_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    if cfg.snapshot:
        report["code"] = snapshot(root)
    env = daemon_env(cfg, root)
    daemon = Daemon(cfg, root, env)
    cfg.socket_path = str(daemon.socket_path)
    daemon.start()
    assert daemon.proc is not None
    samples = Samples()
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=sample_daemon, args=(daemon.proc.pid, samples, stop_sampling), name="sampler"
    )
    try:
        daemon.wait_ready()
        sampler.start()
        with SyncClient(daemon.socket_path, timeout_s=60) as admin:  # before: must work
            cfg.targets = submit_targets(admin, ledger)
            report["prefill_s"] = round(prefill(admin, ledger, cfg.prefill), 1)
            report["control_ping"] = control_ping(
                admin, seconds=5.0, interval_s=cfg.ping_interval_s
            )
        idle = [kib for _, kib in samples.rss_kib[-6:]]
        report["idle_rss_mib"] = statistics.median(idle) / 1024 if idle else None
        report["idle_fds"] = samples.fds[-1][1] if samples.fds else None
        try:
            abuse_and_drain(cfg, daemon, ledger, samples, report)
        except Exception as exc:  # the run broke off (the daemon stopped answering): say so
            report["bench_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        status, stop_s, was_running = daemon.stop()
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join()
        report["leftover_runners"] = kill_jobs_under(root)
    report["config"] = dataclasses.asdict(cfg)
    report["daemon_exit"] = status
    report["stop_s"] = round(stop_s, 2)
    started = cfg.end_at - cfg.duration_s
    report["daemon_died_at_s"] = None if was_running else (samples.died_at_s or 0) - started
    rss = [kib for _, kib in samples.rss_kib]
    report["max_rss_mib"] = max(rss) / 1024 if rss else None
    report["vm_hwm_mib"] = samples.hwm_kib / 1024
    report["max_fds"] = max((n for _, n in samples.fds), default=0)
    report["daemon_cpu_s"] = round(samples.cpu_s, 1)
    load = [value for at, value in samples.load if started <= at <= cfg.end_at]
    report["load_max"] = max(load, default=0.0)
    report["load_mean"] = statistics.fmean(load) if load else 0.0
    report["log_bytes_read_by_sink"] = daemon.log_bytes_read
    report["store"] = check_store(daemon.store_path, ledger)
    report["log"] = scan_log(daemon.log_path, daemon.err_path)
    report["findings"] = findings(cfg, report)
    return report


def abuse_and_drain(
    cfg: Config, daemon: Daemon, ledger: Ledger, samples: Samples, report: dict[str, Any]
) -> None:
    report.update(abuse(cfg, ledger))
    report["timeline"] = timeline(cfg, report.pop("ping_samples"), samples)
    report["rss_before_drain_mib"] = samples.rss_kib[-1][1] / 1024
    drain_started = time.monotonic()
    admin, report["reachable_after_s"] = reconnect(daemon.socket_path, cfg.drain_s)
    with admin:  # a new connection: the first one idled out long ago
        report["active_after_drain"] = drain(admin, cfg.targets, cfg)
    report["drain_s"] = round(time.monotonic() - drain_started, 1)
    time.sleep(2.0)  # a fresh sample, with every client gone
    report["rss_after_drain_mib"] = samples.rss_kib[-1][1] / 1024
    report["fds_after_drain"] = samples.fds[-1][1] if samples.fds else None


def timeline(
    cfg: Config, pings: list[tuple[float, float]], samples: Samples
) -> list[dict[str, Any]]:
    """Per window of the run: ping p99 and max, the daemon's RSS and fds, the host's load."""
    started = cfg.end_at - cfg.duration_s
    window_s = max(10.0, cfg.duration_s / 10)
    rows = []
    for i in range(int(-(-cfg.duration_s // window_s))):
        lo, hi = started + i * window_s, started + (i + 1) * window_s
        rtts = [rtt for at, rtt in pings if lo <= at < hi]
        rss = [kib for at, kib in samples.rss_kib if lo <= at < hi]
        fds = [n for at, n in samples.fds if lo <= at < hi]
        load = [value for at, value in samples.load if lo <= at < hi]
        rows.append(
            {
                "from_s": round(i * window_s),
                "pings": len(rtts),
                "p99_ms": percentile(rtts, 0.99) * 1000,
                "max_ms": max(rtts, default=float("nan")) * 1000,
                "rss_mib": max(rss, default=0) / 1024,
                "fds": max(fds, default=0),
                "load": max(load, default=0.0),
            }
        )
    return rows


def abuse(cfg: Config, ledger: Ledger) -> dict[str, Any]:
    """Every class at once until the deadline; each class's tally."""
    cfg.end_at = time.time() + cfg.duration_s
    end = time.monotonic() + cfg.duration_s
    started_at = cfg.end_at - cfg.duration_s
    roles = {
        name: start_role(name, uid, cfg)
        for name, uid in ROLE_UIDS.items()
        if name != "storm" or cfg.storm_loops > 0
    }
    holders = {
        f"holder-{i}": start_role("holder", HOLDER_UID0 + i, cfg) for i in range(cfg.holders)
    }
    ping_proc = start_role("pinger", None, cfg)
    lock = threading.Lock()
    normal, output = Stats(), Stats()
    threads = [
        threading.Thread(
            target=normal_client, args=(i, cfg, ledger, normal, end, lock), name=f"normal-{i}"
        )
        for i in range(cfg.normal_clients)
    ]
    threads.append(
        threading.Thread(
            target=output_flooder, args=(cfg, ledger, output, end, lock), name="flooder"
        )
    )
    for thread in threads:
        thread.start()
    print(
        f"[abuse] running {cfg.duration_s:.0f}s: {len(roles)} abusive classes, "
        f"{cfg.holders} holders, {cfg.normal_clients} normal clients, pinger",
        file=sys.stderr,
        flush=True,
    )
    for thread in threads:
        thread.join(timeout=max(0.0, end - time.monotonic()) + 300)
    classes: dict[str, Any] = {"normal": normal.to_dict(), "output_flood": output.to_dict()}
    failures: list[str] = []
    late_by = max(60.0, cfg.late_s + 90.0)
    for name, proc in {**roles, **holders}.items():
        result = collect_role(name, proc, max(0.0, end - time.monotonic()) + late_by)
        if "failed" in result:
            failures.append(result["failed"])
            continue
        if name == "late_submit":
            for job_id, code in result["extra"].pop("acked"):
                ledger.add(job_id, "late_submit", code)
            ledger.refused.extend(result["extra"].pop("refused"))
        classes[name] = result
    ping = collect_role("pinger", ping_proc, max(0.0, end - time.monotonic()) + 60)
    if "failed" in ping:
        failures.append(ping["failed"])
        ping = {"latencies": [], "codes": {}, "io_errors": {}}
    samples = [(at, rtt) for at, rtt in ping["latencies"]]
    return {
        "started_at": started_at,
        "classes": classes,
        "role_failures": failures,
        "ping_samples": samples,
        "ping": ping_summary(cfg, ping, samples),
    }


def ping_summary(
    cfg: Config, ping: dict[str, Any], samples: list[tuple[float, float]]
) -> dict[str, Any]:
    """The pinger's round trips: percentiles, the slowest (with when), the longest silence."""
    started_at = cfg.end_at - cfg.duration_s
    lat = [rtt for _, rtt in samples]
    # From the pinger's first ping (its process takes a moment to start) to the deadline.
    first = min((at for at, _ in samples), default=cfg.end_at)
    answered_at = sorted([first] + [at + rtt for at, rtt in samples] + [cfg.end_at])
    slowest = sorted(samples, key=lambda sample: -sample[1])[:5]
    return {
        "slowest": [(round(at - started_at, 1), rtt) for at, rtt in slowest],
        "sent": len(lat) + sum(ping["codes"].values()) + sum(ping["io_errors"].values()),
        "answered": len(lat) + sum(ping["codes"].values()),
        "errors": {**ping["codes"], **ping["io_errors"]},
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": max(lat, default=float("nan")) * 1000,
        "over_1s": sum(x > 1.0 for x in lat),
        "longest_gap_s": max(b - a for a, b in itertools.pairwise(answered_at)),
        "wake_p99_ms": ping.get("wake_p99_ms", float("nan")),
        "wake_max_ms": ping.get("wake_max_ms", float("nan")),
    }


def findings(cfg: Config, report: dict[str, Any]) -> list[str]:
    """What must not happen, in words."""
    out: list[str] = []
    if "bench_error" in report:
        out.append(f"the run broke off: {report['bench_error']}")
    store = report["store"]
    for key, what in (
        ("lost", "acknowledged jobs missing from the store"),
        ("not_terminal", "jobs not terminal after the drain"),
        ("LOST", "jobs LOST (no job process vanished)"),
        ("wrong_exit", "jobs with another outcome than their command's exit code"),
        ("runner_disagrees", "jobs recorded otherwise than their runner's exit record"),
    ):
        if store[key]:
            out.append(f"{store[key]} {what}")
    for code, n in store["refused_but_stored"].items():
        out.append(f"{n} submits answered {code!r} were recorded all the same (and run)")
    if store["quick_check"] != "ok":
        out.append(f"store quick_check: {store['quick_check']}")
    if report["daemon_exit"] != 0:
        out.append(
            f"SIGTERM: the daemon exited {report['daemon_exit']} after {report['stop_s']}s "
            f"(None: not within {cfg.stop_timeout_s}s, SIGKILLed)"
        )
    if report.get("daemon_died_at_s") is not None:
        out.append(f"the daemon died by itself at t={report['daemon_died_at_s']:.1f}s")
    if report.get("reachable_after_s", 0) > 5.0:
        out.append(
            f"after the abuse stopped, the daemon took {report['reachable_after_s']}s to "
            "accept and answer a ping"
        )
    if report.get("active_after_drain"):
        out.append(f"still active {cfg.drain_s:.0f}s after the run: {report['active_after_drain']}")
    if report["leftover_runners"]:
        out.append(f"{report['leftover_runners']} runner processes alive after every job ended")
    out += report.get("role_failures", [])
    for name, stats in report.get("classes", {}).items():
        for note in stats.get("notes", []):
            out.append(f"{name}: {note}")
        if stats.get("anomalies", 0) > len(stats.get("notes", [])):
            out.append(f"{name}: {stats['anomalies']} anomalies in all")
    for name, stats in report.get("classes", {}).items():
        if stats.get("codes", {}).get("internal"):
            out.append(f"{name}: {stats['codes']['internal']} requests answered 'internal'")
    normal = report.get("classes", {}).get("normal", {})
    if normal.get("codes"):
        out.append(f"normal clients got error replies: {normal['codes']}")
    if normal.get("io_errors"):
        out.append(f"normal clients' connections failed: {normal['io_errors']}")
    if report.get("ping", {}).get("longest_gap_s", 0) > 5.0:
        out.append(f"the pinger got no answer for {report['ping']['longest_gap_s']:.1f}s")
    if report.get("ping", {}).get("errors"):
        out.append(f"the pinger got errors: {report['ping']['errors']}")
    log = report["log"]
    for event, n in log["warnings_by_event"].items():
        if event.startswith(("error", "critical", "exception")) or event == "(not JSON)":
            out.append(f"daemon log: {n} x {event}: {log['samples'].get(event, '')[:300]}")
    return out


# -- the report ----------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    classes = report.get("classes", {})
    rows = [
        "| class | connections | requests sent | answered | ok | error replies | dropped "
        "| connect failures | io errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in classes.items():
        rows.append(
            f"| {name} | {s['connections']} | {s['sent']:,} | {s['answered']:,} | {s['ok']:,} "
            f"| {_codes(s['codes'])} | {s['dropped']} | {_codes(s['connect_failures'])} "
            f"| {_codes(s['io_errors'])} |"
        )
    ping = report.get("ping", {})
    store = report["store"]
    total_sent = sum(s["sent"] for s in classes.values()) + ping.get("sent", 0)
    total_answered = sum(s["answered"] for s in classes.values()) + ping.get("answered", 0)
    codes: Counter[str] = Counter()
    for s in classes.values():
        codes.update(s["codes"])
    cfg = report["config"]
    code = report.get("code", {})
    summary = [
        ("duration", f"{cfg['duration_s']:.0f} s"),
        ("daemon code", f"{code.get('commit', 'working tree')} + {code.get('local_edits', '?')}"),
        ("log sink / nofile", f"{cfg['log_sink']} / {cfg['nofile']}"),
        ("load at start / mean / max", _load(report)),
        ("requests sent / answered (all classes + pings)", f"{total_sent:,} / {total_answered:,}"),
        ("error replies by code (all classes)", _codes(codes)),
        ("ping sent / answered / errors", _ping_counts(ping)),
        ("control ping before the abuse p50 / p99 / max (ms)", _control(report)),
        (
            "ping p50 / p99 / max (ms)",
            f"{ping.get('p50_ms', 0):.2f} / {ping.get('p99_ms', 0):.2f} / "
            f"{ping.get('max_ms', 0):.1f}",
        ),
        ("pings over 1 s", ping.get("over_1s")),
        ("longest time without a ping answered (s)", f"{ping.get('longest_gap_s', 0):.1f}"),
        (
            "pinger's own wake-up lateness p99 / max (ms)",
            f"{ping.get('wake_p99_ms', 0):.1f} / {ping.get('wake_max_ms', 0):.1f}",
        ),
        ("slowest pings (s into the run, ms)", _slowest(ping)),
        ("idle RSS / max RSS / VmHWM (MiB)", _rss(report)),
        ("RSS before / after the drain (MiB)", _rss_drain(report)),
        (
            "open fds idle / max / after the drain (limit)",
            f"{report.get('idle_fds')} / {report['max_fds']} / {report.get('fds_after_drain')} "
            f"({cfg['nofile']})",
        ),
        (
            "prefill of the store / drain (s)",
            f"{report.get('prefill_s')} / {report.get('drain_s')}",
        ),
        ("first ping answered after the abuse stopped (s)", report.get("reachable_after_s")),
        ("daemon CPU (s)", report["daemon_cpu_s"]),
        (
            "jobs acknowledged (by kind)",
            f"{store['acknowledged']:,} {store['acknowledged_by_kind']}",
        ),
        ("jobs in store", f"{store['in_store']:,} {store['states']}"),
        ("terminal", store["in_store"] - store["not_terminal"]),
        ("lost (acknowledged, not in store)", store["lost"]),
        ("LOST", store["LOST"]),
        ("wrong exit code", store["wrong_exit"]),
        ("recorded otherwise than the runner's exit file", store["runner_disagrees"]),
        ("not terminal after the drain", store["not_terminal"]),
        ("FAILED without exit code (reason)", store["failed_without_exit_code"] or "none"),
        ("submits answered with an error (by code)", store["refused"] or "none"),
        ("... of which the job is in the store", store["refused_but_stored"] or "none"),
        ("store quick_check", store["quick_check"]),
        ("daemon exit after SIGTERM (s)", f"{report['daemon_exit']} ({report['stop_s']} s)"),
        ("runner processes left", report["leftover_runners"]),
        ("daemon log lines (warnings and worse)", _log(report)),
    ]
    width = max(len(name) for name, _ in summary)
    return "\n".join(
        [
            *rows,
            "",
            *(f"{name:<{width}}  {value}" for name, value in summary),
            "",
            *_timeline(report.get("timeline", [])),
            *_extras(classes),
        ]
    )


def _timeline(rows: list[dict[str, Any]]) -> list[str]:
    head = [
        "| from (s) | pings | ping p99 (ms) | ping max (ms) | RSS (MiB) | fds | load |",
        "|---|---|---|---|---|---|---|",
    ]
    return head + [
        f"| {r['from_s']} | {r['pings']} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} "
        f"| {r['rss_mib']:.1f} | {r['fds']} | {r['load']:.2f} |"
        for r in rows
    ]


def _control(report: dict[str, Any]) -> str:
    c = report.get("control_ping") or {}
    return f"{c.get('p50_ms', 0):.2f} / {c.get('p99_ms', 0):.2f} / {c.get('max_ms', 0):.1f}"


def _slowest(ping: dict[str, Any]) -> str:
    return ", ".join(f"{at:.1f}s: {rtt * 1000:.0f}" for at, rtt in ping.get("slowest", []))


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "-"


def _load(report: dict[str, Any]) -> str:
    return (
        f"{report['load_at_start'][0]:.2f} / {report['load_mean']:.2f} / {report['load_max']:.2f}"
    )


def _ping_counts(ping: dict[str, Any]) -> str:
    return f"{ping.get('sent', 0):,} / {ping.get('answered', 0):,} / {ping.get('errors') or 0}"


def _rss(report: dict[str, Any]) -> str:
    idle = report.get("idle_rss_mib") or 0.0
    return f"{idle:.1f} / {report['max_rss_mib'] or 0:.1f} / {report['vm_hwm_mib']:.1f}"


def _rss_drain(report: dict[str, Any]) -> str:
    before, after = report.get("rss_before_drain_mib"), report.get("rss_after_drain_mib")
    return f"{before or 0:.1f} / {after or 0:.1f}"


def _log(report: dict[str, Any]) -> str:
    log = report["log"]
    events = ", ".join(f"{k} {v}" for k, v in log["warnings_by_event"].items()) or "none"
    return f"{log['lines']:,} lines read; {events}; stderr {log['stderr_lines']} lines"


def _extras(classes: dict[str, Any]) -> list[str]:
    out = [""]
    for name, s in classes.items():
        if s.get("extra"):
            out.append(f"{name}: {json.dumps(s['extra'], sort_keys=True)[:600]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=5.0)
    length.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--log-sink", choices=LOG_SINKS, default="file")
    parser.add_argument("--nofile", type=int, default=Config.nofile, help="daemon's fd limit")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--max-concurrency", type=int, default=Config.max_concurrency)
    parser.add_argument("--max-output-bytes", type=int, default=Config.max_output_bytes)
    parser.add_argument("--idle-timeout-s", type=float, default=Config.idle_timeout_s)
    parser.add_argument("--normal-clients", type=int, default=Config.normal_clients)
    parser.add_argument("--burst", type=int, default=Config.burst, help="pipelined submits")
    parser.add_argument("--burst-every-s", type=float, default=Config.burst_every_s)
    parser.add_argument("--late-s", type=float, default=Config.late_s)
    parser.add_argument("--storm-loops", type=int, default=Config.storm_loops)
    parser.add_argument("--holders", type=int, default=Config.holders, help="holder uids")
    parser.add_argument("--hold", type=int, default=Config.hold, help="connections per holder")
    parser.add_argument("--hold-s", type=float, default=Config.hold_s)
    parser.add_argument("--off-s", type=float, default=Config.off_s)
    parser.add_argument("--slow-read-bps", type=int, default=Config.slow_read_bps)
    parser.add_argument("--prefill", type=int, default=Config.prefill, help="jobs in store first")
    parser.add_argument("--drain-s", type=float, default=Config.drain_s)
    parser.add_argument("--stop-timeout-s", type=float, default=Config.stop_timeout_s)
    parser.add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="run the working tree's code as it changes, not a copy made at the start",
    )
    parser.add_argument("--json", default=None, help="write the report as JSON here (- stdout)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--uid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--role-config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None:
        return role_main(args.role, args.uid, args.role_config)
    if os.geteuid() != 0:
        parser.error("needs root: the abusive classes run under uids of their own")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    cfg = Config(
        duration_s=args.seconds if args.seconds is not None else args.minutes * 60,
        seed=seed,
        log_sink=args.log_sink,
        nofile=args.nofile,
        max_concurrency=args.max_concurrency,
        max_output_bytes=args.max_output_bytes,
        idle_timeout_s=args.idle_timeout_s,
        normal_clients=args.normal_clients,
        burst=args.burst,
        burst_every_s=args.burst_every_s,
        late_s=args.late_s,
        storm_loops=args.storm_loops,
        holders=args.holders,
        hold=args.hold,
        hold_s=args.hold_s,
        off_s=args.off_s,
        slow_read_bps=args.slow_read_bps,
        prefill=args.prefill,
        snapshot=args.snapshot,
        drain_s=args.drain_s,
        stop_timeout_s=args.stop_timeout_s,
    )
    root = Path(tempfile.mkdtemp(prefix="ab-", dir="/tmp"))
    root.chmod(0o711)  # the role uids reach the socket (0660, group root) through it
    print(
        f"[abuse] seed={seed} dir={root} load={os.getloadavg()[0]:.2f} cpus={os.cpu_count()}",
        file=sys.stderr,
        flush=True,
    )
    report = run(cfg, root)
    print(table(report))
    for line in report["findings"]:
        print(f"FINDING: {line}")
    if args.json:
        text = json.dumps(report, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if report["findings"] or args.keep:
        print(f"[abuse] work dir kept: {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
