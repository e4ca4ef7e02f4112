"""kill -9 harness: clients submit jobs over the socket while `orchestrator serve` is killed with
SIGKILL at random moments and restarted; afterwards every promise is checked against the store
file and a log that every job's command appends to.

    python bench/kill9.py --kills 1000 --seed 7 --clients 2

What is checked (each a list of violations in `Report.violations`, empty when all holds):

- `integrity`: `PRAGMA integrity_check` on the store file (opened read-only after the final stop);
- `lost_jobs`: every acknowledged job exists and, after the final restart, is terminal; LOST
  only with a reason;
- `idempotency`: no key names two jobs; a resubmit (same key, same spec) returns the same id;
- `reruns`: no `(job, attempt)` ran twice and no job ran more than once;
- `exit_codes`: SUCCEEDED/FAILED jobs record the exit code their command exits with;
- `daemon`: the daemon never died by itself and stopped cleanly at the end.

Jobs whose submission was never acknowledged may or may not exist; those that do are held to the
same checks. `tests/integration/test_kill9.py` runs the same harness with fewer kills.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import shlex
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run as `python bench/kill9.py`: make `tests.support` importable
    sys.path.insert(0, str(_REPO))

from orchestrator import errors  # noqa: E402
from orchestrator.client import SyncClient  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "LOST")
ACTIVE = ("QUEUED", "SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")
CHECKS = ("integrity", "lost_jobs", "idempotency", "reruns", "exit_codes", "daemon")

_EXIT_CODES = (0, 0, 0, 1, 2, 3, 7)
_SLEEPS = ("0.01", "0.02", "0.04", "0.06", "0.09")
_EXIT_RE = re.compile(r"; exit (\d+)$")
_READY_RESETS_MAX = 50
# Error replies a valid submission may get from a busy or stopping daemon; any other is a bug.
_TRANSIENT_ERRORS = frozenset({"shutting_down", "overloaded", "timeout", "idempotency_conflict"})

Spec = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
    kills: int = 20
    seed: int = 7
    clients: int = 2
    max_concurrency: int = 6  # local jobs at once: the rest wait QUEUED
    up_min_s: float = 0.05  # a ready daemon lives this long, at least …
    up_max_s: float = 0.4  # … and at most, before its SIGKILL
    startup_kill_share: float = 0.15  # kills timed from the spawn instead: start-up, recovery
    startup_kill_max_s: float = 1.5
    key_share: float = 0.4  # new jobs that carry an idempotency key
    resubmit_share: float = 0.2  # submissions that repeat a key already sent (same spec)
    pause_s: float = 0.03  # mean pause between one client's submissions
    client_timeout_s: float = 5.0
    final_wait_s: float = 120.0  # for the jobs to end after the final restart, in all
    progress_every: int = 0  # print a progress line every N kills (0: quiet)


@dataclasses.dataclass
class Ledger:
    """What the clients sent and what the daemon acknowledged. Shared by the client threads."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    sent: int = 0
    resubmits: int = 0
    unacknowledged: int = 0  # sent, then the connection died (or timed out) before a reply
    refused: Counter[str] = dataclasses.field(default_factory=Counter)  # error replies by code
    acked: dict[str, Spec] = dataclasses.field(default_factory=dict)  # job id → its spec
    key_specs: dict[str, Spec] = dataclasses.field(default_factory=dict)  # every key sent
    key_ids: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # key → ids acked
    problems: list[str] = dataclasses.field(default_factory=list)

    def sending(self, spec: Spec, resubmit: bool) -> None:
        with self.lock:
            self.sent += 1
            self.resubmits += resubmit
            if (key := spec.get("idempotency_key")) is not None:
                self.key_specs.setdefault(key, spec)

    def acknowledged(self, spec: Spec, job: Mapping[str, Any]) -> None:
        with self.lock:
            self.acked[job["id"]] = spec
            if job["command"] != spec["command"]:
                self.problems.append(f"job {job['id']}: acknowledged with another command")
            if (key := spec.get("idempotency_key")) is not None:
                self.key_ids.setdefault(key, set()).add(job["id"])

    def lost_reply(self) -> None:
        with self.lock:
            self.unacknowledged += 1

    def refusal(self, code: str, spec: Spec) -> None:
        with self.lock:
            self.refused[code] += 1
            if code == "idempotency_conflict":  # every resubmit repeats the spec exactly
                self.problems.append(f"key {spec.get('idempotency_key')}: conflict, same spec")

    def pick_key(self, rng: random.Random) -> Spec | None:
        with self.lock:
            if not self.key_specs:
                return None
            return self.key_specs[rng.choice(list(self.key_specs))]


@dataclasses.dataclass
class Report:
    seed: int
    kills: int = 0
    kills_before_ready: int = 0
    ready_resets: list[int] = dataclasses.field(default_factory=list)  # starts; see `_start`
    sent: int = 0
    resubmits: int = 0
    acknowledged: int = 0
    unacknowledged: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)
    jobs_in_store: int = 0
    unacknowledged_in_store: int = 0
    keys: int = 0
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    lost: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    retried_attempts: int = 0  # jobs whose first attempt provably never launched
    runs_logged: int = 0
    duplicates: int = 0
    integrity: str = "not checked"
    elapsed_s: float = 0.0
    violations: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {check: [] for check in CHECKS}
    )

    def summary(self) -> str:
        states = " ".join(f"{state}={n}" for state, n in sorted(self.states.items()))
        return (
            f"kill9 seed={self.seed} kills={self.kills} (before ready: {self.kills_before_ready}) "
            f"acknowledged={self.acknowledged} in_store={self.jobs_in_store} terminal: {states} "
            f"LOST={len(self.lost)} reruns={self.duplicates} integrity={self.integrity} "
            f"elapsed={self.elapsed_s:.1f}s"
        )

    def table(self) -> str:
        reasons = Counter(reason or "(no reason)" for _, reason in self.lost)
        rows: list[tuple[str, object]] = [
            ("seed", self.seed),
            ("kills (before ready)", f"{self.kills} ({self.kills_before_ready})"),
            ("readiness pings reset", len(self.ready_resets)),
            ("submissions sent (resubmits)", f"{self.sent} ({self.resubmits})"),
            ("acknowledged jobs", self.acknowledged),
            ("unacknowledged submissions", self.unacknowledged),
            ("error replies", dict(self.refused) or "none"),
            (
                "jobs in store (unacknowledged)",
                f"{self.jobs_in_store} ({self.unacknowledged_in_store})",
            ),
            ("idempotency keys", self.keys),
            *((f"  {state}", n) for state, n in sorted(self.states.items())),
            ("LOST", len(self.lost)),
            *((f"  {n} x", reason) for reason, n in reasons.most_common()),
            ("jobs requeued (attempt > 1)", self.retried_attempts),
            ("runs logged", self.runs_logged),
            ("duplicate runs", self.duplicates),
            ("integrity_check", self.integrity),
            *((f"violations: {check}", len(found)) for check, found in self.violations.items()),
            ("elapsed", f"{self.elapsed_s:.1f} s"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# -- the clients ---------------------------------------------------------------------------


def job_spec(rng: random.Random, client: int, seq: int, ran_log: Path, key_share: float) -> Spec:
    """A job that logs `JOB_ID ATTEMPT` to `ran_log`, sleeps briefly and exits with a code."""
    script = (
        f'echo "$ORCHESTRATOR_JOB_ID $ORCHESTRATOR_ATTEMPT" >> {shlex.quote(str(ran_log))}; '
        f"sleep {rng.choice(_SLEEPS)}; exit {rng.choice(_EXIT_CODES)}"
    )
    spec: Spec = {"command": ["sh", "-c", script], "name": f"c{client}-{seq}"}
    if rng.random() < key_share:
        spec["idempotency_key"] = f"k{client}-{seq}"
    return spec


def _tail(text: str, lines: int = 10, width: int = 400) -> str:
    """The end of a daemon log (or of a message that quotes one), for a violation message."""
    return "\n".join(line[:width] for line in text.splitlines()[-lines:])


def expected_exit_code(command: list[str]) -> int:
    match = _EXIT_RE.search(command[-1])
    assert match is not None, command
    return int(match.group(1))


def _client_loop(
    index: int,
    daemon: DaemonProcess,
    ledger: Ledger,
    cfg: Config,
    ran_log: Path,
    stop: threading.Event,
) -> None:
    """Submit until `stop`: new jobs, some with a key, and repeats of keys already sent. A
    keyed submission whose reply was lost is retried as is, the way a careful client would."""
    rng = random.Random(f"{cfg.seed}-client-{index}")
    client: SyncClient | None = None
    retry: Spec | None = None
    seq = 0
    try:
        while not stop.is_set():
            if client is None:
                try:
                    client = SyncClient(daemon.socket_path, timeout_s=cfg.client_timeout_s)
                    client.connect()
                except (errors.DaemonUnreachable, OSError):
                    client = None
                    stop.wait(0.01)  # the daemon is down or starting
                    continue
            spec, retry = retry, None
            resubmit = spec is not None
            if spec is None and rng.random() < cfg.resubmit_share:
                spec = ledger.pick_key(rng)
                resubmit = spec is not None
            if spec is None:
                seq += 1
                spec = job_spec(rng, index, seq, ran_log, cfg.key_share)
            ledger.sending(spec, resubmit)
            try:
                reply = client.call("submit", job=spec)
            except errors.RemoteError as exc:
                ledger.refusal(exc.remote_code, spec)
            except (errors.DaemonUnreachable, errors.ProtocolError, OSError):
                ledger.lost_reply()  # killed mid-request: the job may or may not exist
                client.close()
                client = None
                if "idempotency_key" in spec:
                    retry = spec
                stop.wait(0.01)
                continue
            else:
                ledger.acknowledged(spec, reply["job"])
            stop.wait(rng.expovariate(1 / cfg.pause_s))
    finally:
        if client is not None:
            client.close()


# -- the killer ----------------------------------------------------------------------------


def _start(daemon: DaemonProcess, report: Report) -> None:
    """`daemon.start()` that tolerates a ping reset while the previous daemon's socket dies.

    Right after a SIGKILL the old socket can still take a connection and then reset it (seen on
    ~5% of restarts here); `DaemonProcess.wait_ready` only retries when nothing answers.
    """
    daemon.start(wait=False)
    for _ in range(_READY_RESETS_MAX):
        try:
            daemon.wait_ready()
            return
        except ConnectionError:
            report.ready_resets.append(daemon.starts)
            time.sleep(0.02)
    raise AssertionError(f"readiness ping reset {_READY_RESETS_MAX} times:\n{_tail(daemon.log())}")


def _kill_loop(daemon: DaemonProcess, cfg: Config, report: Report, started: float) -> None:
    rng = random.Random(f"{cfg.seed}-killer")
    for n in range(1, cfg.kills + 1):
        try:
            if rng.random() < cfg.startup_kill_share:
                daemon.start(wait=False)
                time.sleep(rng.uniform(0.0, cfg.startup_kill_max_s))
            else:
                _start(daemon, report)
                time.sleep(rng.uniform(cfg.up_min_s, cfg.up_max_s))
        except AssertionError as exc:  # it exited during start-up, or never became ready
            report.violations["daemon"].append(f"start {daemon.starts}: {_tail(str(exc))}")
            daemon.close()
            return
        assert daemon.proc is not None
        ended_by_itself = daemon.proc.poll()
        daemon.kill()
        report.kills = n
        if ended_by_itself is not None:
            report.violations["daemon"].append(
                f"start {daemon.starts}: the daemon exited {ended_by_itself} by itself:\n"
                f"{_tail(daemon.log())}"
            )
        elif not any(e.get("event") == "daemon.ready" for e in daemon.log_events()):
            report.kills_before_ready += 1
        if cfg.progress_every and n % cfg.progress_every == 0:
            print(f"[kill9] {n}/{cfg.kills} kills, {time.monotonic() - started:.0f}s", flush=True)


# -- the final run -------------------------------------------------------------------------


def _settle(daemon: DaemonProcess, ledger: Ledger, cfg: Config, report: Report) -> None:
    """With the daemon up for good: resubmit every key once more, then wait for every job."""
    with SyncClient(daemon.socket_path, timeout_s=cfg.final_wait_s) as client:
        for spec in list(ledger.key_specs.values()):
            ledger.sending(spec, resubmit=True)
            try:
                ledger.acknowledged(spec, client.submit(spec))
            except errors.RemoteError as exc:
                ledger.refusal(exc.remote_code, spec)
        deadline = time.monotonic() + cfg.final_wait_s
        waited: set[str] = set()
        pending = list(ledger.acked)
        while pending:
            for job_id in pending:
                if time.monotonic() > deadline:
                    break
                waited.add(job_id)
                try:
                    client.wait(job_id)
                except errors.RemoteError as exc:  # not_found: checked against the store
                    report.violations["lost_jobs"].append(f"wait {job_id}: {exc.message}")
                except TimeoutError:  # it stays unfinished: the store check reports it
                    report.violations["lost_jobs"].append(f"wait {job_id}: timed out")
                    return
            # Jobs nobody acknowledged (the reply was lost) must end too.
            active = client.call("list", state=list(ACTIVE), limit=100_000)["jobs"]
            pending = [job["id"] for job in active if job["id"] not in waited]
            if time.monotonic() > deadline:
                break


def _check(store_path: Path, ran_log: Path, ledger: Ledger, report: Report) -> None:
    v = report.violations
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        report.integrity = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        rows = conn.execute(
            "SELECT id, idempotency_key, state, exit_code, reason, spec, attempt FROM jobs"
        ).fetchall()
        key_counts = conn.execute(
            "SELECT idempotency_key, COUNT(*) FROM jobs WHERE idempotency_key IS NOT NULL "
            "GROUP BY idempotency_key HAVING COUNT(*) > 1"
        ).fetchall()
        launched = conn.execute(
            "SELECT job_id, COUNT(*) FROM attempts WHERE outcome = 'submitted' GROUP BY job_id "
            "HAVING COUNT(*) > 1"
        ).fetchall()
    finally:
        conn.close()
    if report.integrity != "ok":
        v["integrity"].append(f"integrity_check: {report.integrity}")

    jobs = {
        r[0]: {
            "key": r[1],
            "state": r[2],
            "exit_code": r[3],
            "reason": r[4],
            "command": json.loads(r[5])["command"],
            "attempt": r[6],
        }
        for r in rows
    }
    report.jobs_in_store = len(jobs)
    report.unacknowledged_in_store = len(jobs.keys() - ledger.acked.keys())
    report.states = dict(Counter(job["state"] for job in jobs.values()))
    report.retried_attempts = sum(job["attempt"] > 1 for job in jobs.values())

    # 2. Every acknowledged job exists and ended; LOST only with a reason.
    for job_id in ledger.acked.keys() - jobs.keys():
        v["lost_jobs"].append(f"acknowledged job {job_id} is not in the store")
    for job_id, spec in ledger.acked.items():
        if job_id in jobs and jobs[job_id]["command"] != spec["command"]:
            v["lost_jobs"].append(f"job {job_id}: the store holds another command")
    for job_id, job in sorted(jobs.items()):
        if job["state"] not in TERMINAL:
            v["lost_jobs"].append(f"job {job_id} is still {job['state']}")
        if job["state"] == "LOST":
            report.lost.append((job_id, job["reason"]))
            if not job["reason"]:
                v["lost_jobs"].append(f"job {job_id} is LOST without a reason")

    # 3. One job per idempotency key, the same id on every acknowledgement.
    v["idempotency"] += [f"key {key}: {n} jobs in the store" for key, n in key_counts]
    for key, ids in sorted(ledger.key_ids.items()):
        stored = {job_id for job_id, job in jobs.items() if job["key"] == key}
        if len(ids) > 1 or (stored and ids != stored):
            v["idempotency"].append(
                f"key {key}: acknowledged as {sorted(ids)}, stored as {sorted(stored)}"
            )
    v["idempotency"] += [p for p in ledger.problems if p.startswith("key ")]
    v["lost_jobs"] += [p for p in ledger.problems if not p.startswith("key ")]
    report.keys = len(ledger.key_specs)

    # 4. No attempt ran twice; no job ran more than once.
    runs: Counter[tuple[str, int]] = Counter()
    text = ran_log.read_text() if ran_log.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            v["reruns"].append(f"malformed line in the run log: {line!r}")
            continue
        runs[(parts[0], int(parts[1]))] += 1
    report.runs_logged = sum(runs.values())
    per_job = Counter(job_id for (job_id, _), n in runs.items() for _ in range(n))
    for (job_id, attempt), n in sorted(runs.items()):
        if n > 1:
            v["reruns"].append(f"job {job_id} attempt {attempt} ran {n} times")
        if job_id not in jobs:
            v["reruns"].append(f"job {job_id} ran but is not in the store")
        elif attempt != jobs[job_id]["attempt"]:
            v["reruns"].append(
                f"job {job_id} ran attempt {attempt}, the store's is {jobs[job_id]['attempt']}"
            )
    for job_id, n in sorted(per_job.items()):
        if n > 1:
            v["reruns"].append(f"job {job_id} ran {n} times")
    v["reruns"] += [f"job {job_id}: {n} attempts recorded as submitted" for job_id, n in launched]
    report.duplicates = sum(n - 1 for n in per_job.values())

    # 5. Exit codes are the commands' own.
    for job_id, job in sorted(jobs.items()):
        if job["state"] not in ("SUCCEEDED", "FAILED"):
            continue
        expected = expected_exit_code(job["command"])
        if (job["state"], job["exit_code"]) != (
            "SUCCEEDED" if expected == 0 else "FAILED",
            expected,
        ):
            v["exit_codes"].append(
                f"job {job_id}: {job['state']} exit_code={job['exit_code']} "
                f"({job['reason']}), its command exits {expected}"
            )
        if per_job[job_id] != 1:
            v["reruns"].append(f"job {job_id} is {job['state']} but ran {per_job[job_id]} times")


def run(cfg: Config, root: Path) -> Report:
    """The whole harness in `root` (short: the socket lives there): kills, final run, checks."""
    started = time.monotonic()
    report = Report(seed=cfg.seed)
    ran_log = root / "ran.log"
    daemon = DaemonProcess(
        root, env={"ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": str(cfg.max_concurrency)}
    )
    ledger = Ledger()
    stop = threading.Event()
    clients = [
        threading.Thread(
            target=_client_loop,
            args=(i, daemon, ledger, cfg, ran_log, stop),
            name=f"kill9-client-{i}",
            daemon=True,
        )
        for i in range(cfg.clients)
    ]
    try:
        for thread in clients:
            thread.start()
        try:
            _kill_loop(daemon, cfg, report, started)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=cfg.client_timeout_s + 5)
        try:
            _start(daemon, report)
        except AssertionError as exc:  # the store would not open, or the like: report it
            report.violations["daemon"].append(f"the final start failed: {_tail(str(exc))}")
        else:
            try:
                _settle(daemon, ledger, cfg, report)
            except (errors.DaemonUnreachable, OSError) as exc:  # it died with no kill of ours
                report.violations["daemon"].append(f"the final run failed: {exc!r}")
            if (status := daemon.stop(signal.SIGTERM)) != 0:
                report.violations["daemon"].append(f"the final SIGTERM stop exited {status}")
    finally:
        daemon.close()
    report.sent, report.resubmits = ledger.sent, ledger.resubmits
    report.acknowledged, report.unacknowledged = len(ledger.acked), ledger.unacknowledged
    report.refused = dict(ledger.refused)
    report.violations["daemon"] += [
        f"{n} valid submissions answered {code}"
        for code, n in sorted(ledger.refused.items())
        if code not in _TRANSIENT_ERRORS  # a conflict is counted under idempotency
    ]
    _check(daemon.store_path, ran_log, ledger, report)
    report.elapsed_s = time.monotonic() - started
    return report


def main(argv: Iterable[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--max-concurrency", type=int, default=Config.max_concurrency)
    parser.add_argument("--progress-every", type=int, default=50)
    parser.add_argument("--dir", type=Path, default=None, help="work dir (kept); default: a temp")
    args = parser.parse_args(None if argv is None else list(argv))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    cfg = Config(
        kills=args.kills,
        seed=seed,
        clients=args.clients,
        max_concurrency=args.max_concurrency,
        progress_every=args.progress_every,
    )
    out(f"[kill9] seed={seed} kills={cfg.kills} clients={cfg.clients}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="kill9-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    report = run(cfg, root)
    out(report.table())
    for check, found in report.violations.items():
        for message in found[:20]:
            out(f"VIOLATION {check}: {message}")
    out(report.summary())
    failed = any(report.violations.values())
    if failed or args.dir is not None:
        out(f"[kill9] work dir kept: {root} (daemon logs, store, ran.log)")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
