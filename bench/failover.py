"""Failover of the AWS lease between several daemons on one PostgreSQL (issue #16): kill -9 the
leader again and again under a steady stream of jobs; how soon the next one launches and tracks.

    python bench/failover.py                      # 3 daemons, 20 kills, lease TTL 10 s
    python bench/failover.py --ttl 3
    python bench/failover.py --kills 5 --rate 10 --keep

A durable PostgreSQL (fsync, synchronous commits; Debian's binaries in a temporary directory,
started as `bench/ingest.py --postgres` starts it), `bench/fakeaws.py` as ECS (jobs pending
`--pending-s` then running `--run-s`, ±`--jitter`, exit 0; AWS's describe bucket, launch bucket
generous) and `--nodes` `orchestrator serve` processes h1..hN on it (each its own socket and
work directory, `cluster.node` hN, `cluster.lease_ttl_s` `--ttl`, the ECS backend only, INFO
logs as JSON). A client submits `--rate` jobs/s, round robin over the daemons that do not lead
(a job's idempotency key is its number, so a submission is retried safely elsewhere).

Then `--kills` times: wait until every daemon agrees on one leader, wait `--settle-s` plus a
random part of a renewal period (TTL/3, so the kill lands anywhere in the lease's cycle),
`kill -9` the leader, and watch the survivors until one is elected and has launched and tracked;
then start the killed daemon again (it rejoins as a follower) and wait until the jobs that
queued up meanwhile have been launched (at most `--steady-queued` QUEUED), so that every kill
finds the same steady stream. Times are from the kill (the wall clock: the daemons' log
timestamps and the stand-in's task creation times are on it):

- elected: the new leader's `cluster.elected` log line; recovered: its `cluster.recovered`
  (every unfinished job read and handed over, the launches cut short settled);
- first launch: the first RunTask the stand-in received from the new leader (the earliest
  creation time, at the stand-in, of the tasks the new leader's `job.dispatched` lines name);
  "any launch" is the first task the stand-in created after the kill, whoever asked;
- first change: the new leader's first `job.state_changed` line (of any kind: a dispatch's
  QUEUED → SUBMITTED is one); first tracked change: its first one from a state past QUEUED,
  i.e. a change observed at AWS by its poller (or its recovery);
- backlog launched: QUEUED back to at most `--steady-queued`; catch-up: the new leader's
  launches per second from its first until then.

The target (issue #16): the first launch within the lease's TTL + 2 s of the kill. At the end
the stream stops, every job is awaited, and each is checked to have launched and ended once: one
task at the stand-in per job (under the token `<job id>-<attempt>`), one terminal event per job
in the database, no job left unfinished or LOST.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import awsbench as ab
from orchestrator import errors
from orchestrator.client import Client
from tests.support import postgres
from tests.support.daemon import DaemonProcess

TERMINAL = set(ab.TERMINAL)
_CHILDREN: list[DaemonProcess | ab.FakeAwsProcess] = []  # stopped at the end, whatever happens
_WANTED = frozenset(
    {
        "cluster.elected",
        "cluster.recovered",
        "cluster.deposed",
        "cluster.lead_failed",
        "job.dispatched",
        "job.state_changed",
    }
)


# -- the daemons' logs -------------------------------------------------------------------------


class LogTail:
    """The log events of one run of a daemon that matter here, read as the file grows; each
    with `at`, its timestamp in epoch seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.events: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.events
        end = data.rfind(b"\n")
        if end < 0:
            return self.events
        self.offset += end + 1
        for line in data[:end].split(b"\n"):
            if b'"cluster.' not in line and b'"job.' not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict) and event.get("event") in _WANTED:
                    event["at"] = ab.epoch(str(event["timestamp"]))
                    self.events.append(event)
        return self.events

    def after(self, t: float, name: str) -> list[dict[str, Any]]:
        return [e for e in self.read() if e["event"] == name and e["at"] >= t]


class Node:
    """One `orchestrator serve` and the logs of each of its runs."""

    def __init__(self, name: str, daemon: DaemonProcess) -> None:
        self.name = name
        self.daemon = daemon
        self.tails: list[LogTail] = []

    @property
    def tail(self) -> LogTail:
        return self.tails[-1]

    @property
    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    async def start(self) -> None:
        await asyncio.to_thread(self.daemon.start)
        self.tails.append(LogTail(self.daemon.log_path))

    async def ping(self) -> dict[str, Any]:
        async with asyncio.timeout(10), Client(self.daemon.socket_path) as client:
            return dict(await client.ping())


async def agreed_leader(nodes: list[Node], timeout_s: float) -> Node:
    """The one daemon that says it leads, once every live daemon names it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [n for n in nodes if n.alive]
        with contextlib.suppress(errors.OrchestratorError, TimeoutError, OSError):
            seen = [(await n.ping())["cluster"] for n in alive]
            names = {s["leader"]["node"] if s["leader"] else None for s in seen}
            leading = [n for n, s in zip(alive, seen, strict=True) if s["leading"]]
            if len(names) == 1 and None not in names and len(leading) == 1:
                return leading[0]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no agreed leader within {timeout_s:.0f} s")


# -- the stream of jobs --------------------------------------------------------------------------


class Submitter:
    """`rate` jobs/s, round robin over `targets` (set by the caller: the followers)."""

    def __init__(self, rate: float, prefix: str) -> None:
        self.rate = rate
        self.prefix = prefix
        self.targets: list[Node] = []
        self.ids: dict[str, str] = {}  # idempotency key → job id
        self.retried = 0
        self.late = 0.0  # the longest a submission waited past its due time (s)
        self._clients: dict[str, Client] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="submitter")

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()

    async def _client(self, node: Node) -> Client:
        client = self._clients.get(node.name)
        if client is None:
            client = await Client(node.daemon.socket_path).connect()
            self._clients[node.name] = client
        return client

    async def _drop(self, node: Node) -> None:
        client = self._clients.pop(node.name, None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _submit(self, i: int) -> None:
        key = f"{self.prefix}-{i}"
        spec = {"command": ["bench", str(i)], "name": key, "idempotency_key": key}
        for attempt in range(100):
            targets = [n for n in self.targets if n.alive] or self.targets
            node = targets[(i + attempt) % len(targets)]
            try:
                async with asyncio.timeout(10):
                    job = await (await self._client(node)).submit(spec)
            except (errors.OrchestratorError, OSError, TimeoutError):
                self.retried += 1
                await self._drop(node)
                await asyncio.sleep(0.1)
                continue
            self.ids[key] = job["id"]
            return
        raise RuntimeError(f"job {key} could not be submitted")

    async def _run(self) -> None:
        start = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        i = 0
        try:
            while True:
                due = start + i / self.rate
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                else:
                    self.late = max(self.late, -delay)
                task = asyncio.create_task(self._submit(i))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
        finally:
            if pending:  # let the submissions under way finish: each job is known, or not sent
                await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))


# -- one kill ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Kill:
    index: int
    victim: str
    killed_at: float  # epoch
    queued: int = 0  # jobs QUEUED at the kill (all daemons')
    in_flight: int = 0  # jobs launched and not yet ended at the kill
    new_leader: str = ""
    token: int = 0
    elected_s: float = math.nan
    recovered_s: float = math.nan
    recovered_jobs: int = 0
    launch_s: float = math.nan  # the new leader's first RunTask, at the stand-in
    any_launch_s: float = math.nan  # the first task the stand-in created after the kill
    dispatched_s: float = math.nan  # the new leader's first `job.dispatched` line
    change_s: float = math.nan  # its first `job.state_changed` line
    tracked_s: float = math.nan  # its first `job.state_changed` from a state past QUEUED
    backlog: int = 0  # the most jobs QUEUED seen after the kill
    drained_s: float = math.nan  # until QUEUED is back to at most --steady-queued
    catch_up_per_s: float = math.nan  # the new leader's launches/s from its first to drained
    launched: bool = False  # the new leader was seen launching and tracking
    note: str = ""


async def until_new_leader(survivors: list[Node], since: float, timeout_s: float) -> Node:
    """The survivor whose log says it was elected after `since`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in survivors:
            if node.tail.after(since, "cluster.elected"):
                return node
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no daemon elected within {timeout_s:.0f} s of the kill")


async def until_launched_and_tracked(node: Node, since: float, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dispatched = node.tail.after(since, "job.dispatched")
        tracked = [e for e in node.tail.after(since, "job.state_changed") if tracked_change(e)]
        if dispatched and tracked:
            return True
        await asyncio.sleep(0.1)
    return False


def tracked_change(event: dict[str, Any]) -> bool:
    return event.get("from_state") not in (None, "QUEUED")


def fill_times(kill: Kill, node: Node, until: float, tasks: dict[str, dict[str, Any]]) -> None:
    """The kill's figures from the new leader's log of the run it was elected in and the
    stand-in's tasks; `until` is the next kill (its events after that are not this one's)."""
    t = kill.killed_at
    events = [e for e in node.tail.read() if t <= e["at"] < until]

    def first(name: str, keep: Any = None) -> dict[str, Any] | None:
        found = [e for e in events if e["event"] == name and (keep is None or keep(e))]
        return found[0] if found else None

    if (elected := first("cluster.elected")) is not None:
        kill.elected_s = elected["at"] - t
        kill.token = int(elected["token"])
    if (recovered := first("cluster.recovered")) is not None:
        kill.recovered_s = recovered["at"] - t
        kill.recovered_jobs = int(recovered["jobs"])
    if (dispatched := first("job.dispatched")) is not None:
        kill.dispatched_s = dispatched["at"] - t
    if (changed := first("job.state_changed")) is not None:
        kill.change_s = changed["at"] - t
    if (tracked := first("job.state_changed", tracked_change)) is not None:
        kill.tracked_s = tracked["at"] - t
    launched = [
        tasks[str(e["external_id"])]["created_at"]
        for e in events
        if e["event"] == "job.dispatched" and str(e["external_id"]) in tasks
    ]
    launched = [at for at in launched if at >= t]
    if launched:
        kill.launch_s = min(launched) - t
    after = [task["created_at"] for task in tasks.values() if t <= task["created_at"] < until]
    if after:
        kill.any_launch_s = min(after) - t
    if not math.isnan(kill.drained_s) and not math.isnan(kill.dispatched_s):
        span = kill.drained_s - kill.dispatched_s
        launches = sum(
            1 for e in events if e["event"] == "job.dispatched" and e["at"] <= t + kill.drained_s
        )
        kill.catch_up_per_s = launches / span if span > 0 else math.nan
    elections = [e for e in events if e["event"] == "cluster.elected"]
    if len(elections) > 1:
        kill.note += f"{len(elections)} elections of {node.name} before the next kill; "


# -- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    ttl: float
    kills: list[Kill]
    jobs: int = 0
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    tasks: int = 0  # distinct tasks at the stand-in
    run_task_calls: int = 0  # RunTask requests the stand-in answered (retries included)
    jobs_without_task: int = 0
    jobs_with_more_tasks: list[str] = dataclasses.field(default_factory=list)
    foreign_tasks: int = 0  # tasks no job of ours names
    attempts: dict[int, int] = dataclasses.field(default_factory=dict)
    terminal_events: dict[int, int] = dataclasses.field(default_factory=dict)  # count → jobs
    repeated: list[str] = dataclasses.field(default_factory=list)  # job, state seen twice
    elections: int = 0
    deposed: list[str] = dataclasses.field(default_factory=list)  # not by our kills
    retried_submissions: int = 0
    submit_late_s: float = 0.0
    wall_s: float = 0.0
    drain_s: float = 0.0


def node_env(
    args: argparse.Namespace, fake_url: str, store_url: str, name: str, ttl: float
) -> dict[str, str]:
    env = ab.daemon_env(
        "ecs",
        fake_url,
        max_in_flight=100_000,
        poller=ab.PollerTiming(),
        launch=(ab.GENEROUS, ab.GENEROUS),
        describe=(args.describe_rate, args.describe_burst),
        log_level="INFO",
    )
    env |= {
        "ORCHESTRATOR__STORE__URL": store_url,
        "ORCHESTRATOR__CLUSTER__NODE": name,
        "ORCHESTRATOR__CLUSTER__LEASE_TTL_S": f"{ttl:g}",
    }
    return env


def fake_config(args: argparse.Namespace) -> list[str]:
    return ab.fake_args(
        pending_s=args.pending_s,
        run_s=args.run_s,
        jitter=args.jitter,
        time_scale=1.0,
        seed=args.seed,
        buckets={
            ab.LAUNCH_FAMILY["ecs"]: (ab.GENEROUS, ab.GENEROUS),
            ab.DESCRIBE_FAMILY["ecs"]: (args.describe_rate, args.describe_burst),
        },
    )


async def watch_queue(kill: Kill, nodes: list[Node], steady: int, timeout_s: float) -> None:
    """From the kill on, the most jobs QUEUED (`backlog`); done once the new leader has launched
    and the jobs that queued up while no one led have been launched too (QUEUED back to at most
    `steady`): each kill then starts from the same steady stream."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = await counts_now(nodes)
        queued = counts.get("QUEUED", 0)
        kill.backlog = max(kill.backlog, queued)
        if counts and kill.launched and queued <= steady:
            kill.drained_s = time.time() - kill.killed_at
            return
        await asyncio.sleep(0.25)
    kill.note += f"the queue did not drain to {steady} within {timeout_s:.0f} s; "


async def counts_now(nodes: list[Node]) -> dict[str, int]:
    for node in nodes:
        if node.alive:
            with contextlib.suppress(errors.OrchestratorError, TimeoutError, OSError):
                return dict((await node.ping())["jobs"] or {})
    return {}


async def run(
    args: argparse.Namespace, ttl: float, server: postgres.PostgresServer, root: Path
) -> Outcome:
    rng = random.Random(args.seed)
    store_url = await server.new_database()
    fake = ab.FakeAwsProcess(fake_config(args), root / "fakeaws.log")
    fake.start()
    _CHILDREN.append(fake)
    nodes = [
        Node(
            f"h{i}",
            DaemonProcess(root / f"h{i}", env=node_env(args, fake.url, store_url, f"h{i}", ttl)),
        )
        for i in range(1, args.nodes + 1)
    ]
    for node in nodes:
        node.daemon.root.mkdir(parents=True)
        _CHILDREN.append(node.daemon)
    outcome = Outcome(ttl, [])
    submitter = Submitter(args.rate, f"ttl{ttl:g}")
    t0 = time.monotonic()
    try:
        await nodes[0].start()
        await agreed_leader(nodes[:1], ttl + 15)
        await asyncio.gather(*(n.start() for n in nodes[1:]))
        leader = await agreed_leader(nodes, ttl + 15)
        submitter.targets = [n for n in nodes if n is not leader]
        submitter.start()
        await asyncio.sleep(args.warmup_s)
        for k in range(args.kills):
            leader = await agreed_leader(nodes, ttl + 15)
            submitter.targets = [n for n in nodes if n is not leader]
            await asyncio.sleep(args.settle_s + rng.uniform(0, ttl / 3))
            counts = await counts_now(submitter.targets)
            assert leader.daemon.proc is not None
            kill = Kill(k + 1, leader.name, time.time())
            leader.daemon.proc.send_signal(signal.SIGKILL)
            kill.queued = counts.get("QUEUED", 0)
            kill.in_flight = sum(v for s, v in counts.items() if s not in TERMINAL) - kill.queued
            await asyncio.to_thread(leader.daemon.proc.wait)
            survivors = [n for n in nodes if n is not leader]
            watch = asyncio.create_task(
                watch_queue(kill, survivors, args.steady_queued, args.drain_timeout_s)
            )
            new = await until_new_leader(survivors, kill.killed_at, ttl + 30)
            kill.new_leader = new.name
            kill.launched = await until_launched_and_tracked(new, kill.killed_at, 30)
            if not kill.launched:
                kill.note += "no launch and tracked change by the new leader within 30 s; "
                kill.launched = True  # let the queue's watch end all the same
            outcome.kills.append(kill)
            print(
                f"  kill {k + 1}/{args.kills}: {leader.name} killed, {new.name} elected "
                f"{new.tail.after(kill.killed_at, 'cluster.elected')[0]['at'] - kill.killed_at:.2f}"
                f" s later ({kill.queued} queued, {kill.in_flight} in flight at the kill)",
                flush=True,
            )
            await leader.start()  # it rejoins as a follower
            await watch
        drain_from = time.monotonic()
        await submitter.stop()
        total = len(submitter.ids)
        deadline = time.monotonic() + args.pending_s + args.run_s * 2 + ttl + 120
        counts = {}
        while time.monotonic() < deadline:
            counts = await counts_now(nodes)
            if sum(counts.get(s, 0) for s in TERMINAL) >= total:
                break
            await asyncio.sleep(0.5)
        outcome.drain_s = time.monotonic() - drain_from
        outcome.wall_s = time.monotonic() - t0
        async with aiohttp.ClientSession() as http:
            stats, tasks = await fake.stats(http), await fake.terminal(http)
        if args.keep:
            (root / "fakeaws-tasks.json").write_bytes(orjson.dumps(tasks))
        alive = next(n for n in nodes if n.alive)
        async with Client(alive.daemon.socket_path) as client:
            jobs = [job async for job in client.iter_jobs(limit=None)]
        await check(outcome, args, submitter, jobs, stats, tasks, store_url, nodes)
    finally:
        for node in nodes:
            node.daemon.close()
        fake.stop()
    return outcome


async def check(
    outcome: Outcome,
    args: argparse.Namespace,
    submitter: Submitter,
    jobs: list[Any],
    stats: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    store_url: str,
    nodes: list[Node],
) -> None:
    """Every figure of the run: the kills' times, then launched once and ended once."""
    kills = outcome.kills
    for i, kill in enumerate(kills):
        until = kills[i + 1].killed_at if i + 1 < len(kills) else math.inf
        node = next(n for n in nodes if n.name == kill.new_leader)
        # the run the new leader was elected in after this kill (it may have been killed and
        # started again later: each of its runs has a log of its own)
        tail = next(
            (
                t
                for t in node.tails
                if any(e["at"] < until for e in t.after(kill.killed_at, "cluster.elected"))
            ),
            node.tail,
        )
        shadow = Node(node.name, node.daemon)
        shadow.tails = [tail]
        fill_times(kill, shadow, until, tasks)
    outcome.retried_submissions = submitter.retried
    outcome.submit_late_s = submitter.late
    ours = set(submitter.ids.values())
    outcome.jobs = len(ours)
    outcome.states = dict(Counter(str(j["state"]) for j in jobs if j["id"] in ours))
    outcome.attempts = dict(Counter(int(j["attempt"]) for j in jobs if j["id"] in ours))
    outcome.tasks = len(tasks)
    outcome.run_task_calls = int(stats["calls"].get(ab.LAUNCH_OP["ecs"], 0))
    per_job: Counter[str] = Counter()
    for task in tasks.values():
        job_id = str(task["name"]).rpartition("-")[0]
        if job_id in ours:
            per_job[job_id] += 1
        else:
            outcome.foreign_tasks += 1
    outcome.jobs_without_task = sum(1 for j in ours if per_job[j] == 0)
    outcome.jobs_with_more_tasks = sorted(j for j, c in per_job.items() if c > 1)
    conn = await asyncpg.connect(store_url)
    try:
        ends = await conn.fetch(
            "SELECT job_id, count(*) AS n FROM events WHERE to_state = ANY($1::text[]) "
            "GROUP BY job_id",
            sorted(TERMINAL),
        )
        repeated = await conn.fetch(
            "SELECT job_id, to_state, count(*) AS n FROM events GROUP BY job_id, to_state "
            "HAVING count(*) > 1 ORDER BY job_id"
        )
    finally:
        await conn.close()
    ended = {str(r["job_id"]): int(r["n"]) for r in ends}
    outcome.terminal_events = dict(Counter(ended.get(j, 0) for j in ours))
    outcome.repeated = [f"{r['job_id']} {r['to_state']} x{r['n']}" for r in repeated]
    for node in nodes:
        for tail in node.tails:
            for e in tail.read():
                if e["event"] == "cluster.elected":
                    outcome.elections += 1
                elif e["event"] in ("cluster.deposed", "cluster.lead_failed"):
                    outcome.deposed.append(f"{node.name}: {e.get('why') or e.get('error')}")


# -- the report ----------------------------------------------------------------------------------


def spread(values: list[float]) -> list[str]:
    found = [v for v in values if not math.isnan(v)]
    if not found:
        return ["n/a"] * 4
    return [
        f"{min(found):.2f}",
        f"{ab.percentile(found, 50):.2f}",
        f"{ab.percentile(found, 90):.2f}",
        f"{max(found):.2f}",
    ]


def report(outcome: Outcome, args: argparse.Namespace) -> str:
    kills = outcome.kills
    ttl = outcome.ttl
    target = ttl + 2.0
    rows = [
        ("kill → elected (`cluster.elected`)", [k.elected_s for k in kills]),
        ("kill → recovered (`cluster.recovered`)", [k.recovered_s for k in kills]),
        ("**kill → first launch by the new leader** (RunTask at the stand-in)", [
            k.launch_s for k in kills
        ]),
        ("kill → its first `job.dispatched` line", [k.dispatched_s for k in kills]),
        ("kill → its first state change (any)", [k.change_s for k in kills]),
        ("**kill → its first tracked state change** (from past QUEUED)", [
            k.tracked_s for k in kills
        ]),
        ("kill → first task created at the stand-in, whoever asked", [
            k.any_launch_s for k in kills
        ]),
        (f"kill → the backlog launched (QUEUED ≤ {args.steady_queued})", [
            k.drained_s for k in kills
        ]),
    ]  # fmt: skip
    lines = [
        f"### lease TTL {ttl:g} s: {len(kills)} kills of the leader of {args.nodes}",
        "",
        ab.table(
            ["from the kill (s)", "min", "p50", "p90", "max"],
            [[label, *spread(values)] for label, values in rows],
        ),
        "",
    ]
    launches = [k.launch_s for k in kills]
    met = sum(1 for v in launches if v <= target)
    lines.append(
        f"- target: first launch ≤ TTL + 2 s = {target:g} s: {met}/{len(kills)} kills "
        f"({'PASS' if met == len(kills) else 'FAIL'})"
    )
    late = [k for k in kills if k.any_launch_s < k.elected_s]
    lines.append(
        f"- kills with a RunTask of the dying leader reaching the stand-in after the kill (its "
        f"request was under way): {len(late)} (the new leader settles such a launch: the job "
        f"is adopted, not launched again)"
    )
    recovered = [k.recovered_jobs for k in kills]
    lines.append(
        f"- at each kill (p50): jobs queued {ab.percentile([k.queued for k in kills], 50):.0f}, "
        f"in flight {ab.percentile([k.in_flight for k in kills], 50):.0f}; most queued after "
        f"it {ab.percentile([k.backlog for k in kills], 50):.0f}, launched by the new leader at "
        f"{ab.percentile([k.catch_up_per_s for k in kills], 50):.1f} jobs/s; the new leader "
        f"recovered {min(recovered)} to {max(recovered)} unfinished jobs"
    )
    lines.append(
        f"- jobs: {outcome.jobs:,} submitted at {args.rate:g}/s through the followers "
        f"({outcome.retried_submissions} submissions retried, the longest "
        f"{outcome.submit_late_s:.2f} s late); final states "
        f"{dict(sorted(outcome.states.items()))}; attempts "
        f"{dict(sorted(outcome.attempts.items()))}"
    )
    once = (
        outcome.jobs_without_task == 0
        and not outcome.jobs_with_more_tasks
        and outcome.foreign_tasks == 0
        and outcome.tasks == outcome.jobs
        and outcome.terminal_events == {1: outcome.jobs}
        and outcome.states == {"SUCCEEDED": outcome.jobs}
    )
    lines.append(
        f"- launched once, ended once: {outcome.tasks:,} tasks at the stand-in for "
        f"{outcome.jobs:,} jobs ({outcome.run_task_calls:,} RunTask calls answered); jobs "
        f"without a task {outcome.jobs_without_task}, with more than one "
        f"{len(outcome.jobs_with_more_tasks)}, tasks of no job {outcome.foreign_tasks}; "
        f"terminal events per job {dict(sorted(outcome.terminal_events.items()))}: "
        f"{'PASS' if once else 'FAIL'}"
    )
    if outcome.jobs_with_more_tasks:
        lines.append(f"  - jobs launched twice, e.g. {outcome.jobs_with_more_tasks[:5]}")
    if outcome.repeated:
        lines.append(
            f"- the same state recorded twice for a job: {len(outcome.repeated)}, e.g. "
            f"{outcome.repeated[:5]}"
        )
    lines.append(
        f"- elections: {outcome.elections} (1 at the start + {len(kills)} kills); leaders "
        f"deposed other than by a kill: {len(outcome.deposed)}"
        + (f", e.g. {outcome.deposed[:3]}" if outcome.deposed else "")
    )
    lines += [f"  - kill {k.index}: {k.note.rstrip('; ')}" for k in kills if k.note]
    lines.append(
        f"- wall time {outcome.wall_s:.0f} s, of which {outcome.drain_s:.0f} s draining the "
        f"last jobs"
    )
    if args.verbose:
        lines += ["", ab.table(
            ["kill", "victim", "new", "token", "queued", "in flight", "elected", "recovered",
             "jobs", "launch", "any launch", "dispatched", "change", "tracked", "backlog",
             "drained", "catch-up/s"],
            [[k.index, k.victim, k.new_leader, k.token, k.queued, k.in_flight,
              ab.fmt(k.elected_s), ab.fmt(k.recovered_s), k.recovered_jobs, ab.fmt(k.launch_s),
              ab.fmt(k.any_launch_s), ab.fmt(k.dispatched_s), ab.fmt(k.change_s),
              ab.fmt(k.tracked_s), k.backlog, ab.fmt(k.drained_s),
              ab.fmt(k.catch_up_per_s, 1)] for k in kills],
        )]  # fmt: skip
    return "\n".join(lines)


async def amain(args: argparse.Namespace, server: postgres.PostgresServer) -> None:
    for ttl in args.ttl:
        root = Path(tempfile.mkdtemp(prefix=f"orc-failover-{ttl:g}-", dir="/tmp"))
        outcome = await run(args, ttl, server, root)
        print()
        print(report(outcome, args), flush=True)
        print()
        if args.save:
            data = {"settings": vars(args) | {"save": str(args.save)}}
            ab.save_json(
                args.save.with_suffix(f".ttl{ttl:g}.json"),
                "failover",
                data | {"outcome": dataclasses.asdict(outcome)},
            )
        if args.keep:
            print(f"(logs kept in {root})\n")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    p = ab.arguments(__doc__)
    p.add_argument("--nodes", type=int, default=3, help="daemons on the one database")
    p.add_argument("--kills", type=int, default=20, help="kill -9 of the leader, this many times")
    p.add_argument(
        "--ttl", type=float, nargs="+", default=[10.0], help="cluster.lease_ttl_s, one run each"
    )
    p.add_argument("--rate", type=float, default=20.0, help="jobs submitted per second")
    p.add_argument("--pending-s", type=float, default=1.0, help="at the stand-in: → RUNNING")
    p.add_argument("--run-s", type=float, default=3.0, help="at the stand-in: RUNNING → exit")
    p.add_argument("--jitter", type=float, default=0.5, help="durations x uniform(1-j, 1+j)")
    p.add_argument("--describe-rate", type=float, default=20.0, help="DescribeTasks bucket /s")
    p.add_argument("--describe-burst", type=float, default=100.0)
    p.add_argument("--warmup-s", type=float, default=10.0, help="the stream alone, first")
    p.add_argument(
        "--settle-s",
        type=float,
        default=4.0,
        help="after a restart, before the next kill (plus up to TTL/3 at random)",
    )
    p.add_argument(
        "--steady-queued",
        type=int,
        default=40,
        help="after a failover, wait until at most this many jobs are QUEUED before the next",
    )
    p.add_argument("--drain-timeout-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="also a row per kill")
    p.add_argument("--keep", action="store_true", help="keep the logs in /tmp")
    p.add_argument("--save", type=Path, help="write the figures as JSON (PATH.ttlN.json)")
    args = p.parse_args()
    if args.nodes < 2:
        p.error("--nodes: at least 2")
    print(f"# failover: `{ab.command_line()}`")
    print()
    print(f"- machine: {ab.machine_line()}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(
        f"- {args.nodes} daemons (ECS backend, INFO logs) on one durable PostgreSQL; jobs at the "
        f"stand-in pending {args.pending_s:g} s, run {args.run_s:g} s, ±{100 * args.jitter:g}%; "
        f"describe bucket {args.describe_rate:g}/s burst {args.describe_burst:g}; poller "
        f"defaults; {args.rate:g} jobs/s through the followers"
    )
    signal.signal(signal.SIGTERM, _interrupted)  # as Ctrl-C: the daemons and servers stop
    with postgres.running_server(durable=True) as server:
        if server is None:
            sys.exit("no PostgreSQL server binaries (apt-get install postgresql)")
        try:
            asyncio.run(amain(args, server))
        finally:  # whatever the event loop did not get to close
            for child in _CHILDREN:
                if isinstance(child, DaemonProcess):
                    child.close()
                else:
                    child.stop()


if __name__ == "__main__":
    main()
