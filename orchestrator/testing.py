"""Fakes shipped with the package, for unit tests of logic (yours and ours).

`FakeBackend` is an in-memory backend whose jobs follow a script of states, one step per
describe; it records every call so tests can assert batching and stops. `InMemoryStore` is a
`Store` with the SQLite store's semantics and no files or threads (both pass the conformance
suite, `tests/store_conformance.py`). `make_settings` builds settings rooted in a temporary
directory with fast polling.

Over ~500 lines on purpose: the package's test doubles are shipped in one module, as
procrastinate ships its `InMemoryConnector` in `procrastinate.testing`, so that a user's tests
import every fake from one place.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fnmatch
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from orchestrator import errors, events, models, settings, store
from orchestrator.backends import base
from orchestrator.engine import tracking

S = models.JobState


def make_settings(root: Path, **sections: Mapping[str, Any]) -> settings.Settings:
    """Settings with the socket and the store under `root` and quick polling; `sections`
    override any section's keys, e.g. `make_settings(tmp, local={"max_concurrency": 2})`."""
    data: dict[str, Any] = {
        "server": {"socket_path": root / "o.sock", "shutdown_grace_s": 2.0},
        "store": {"path": root / "state" / "orchestrator.db", "synchronous": "NORMAL"},
        "poller": {"base_s": 0.05, "factor": 1.5, "cap_s": 0.5},
        "dispatcher": {"retry_base_s": 0.01, "retry_cap_s": 0.05},
        "local": {"kill_grace_s": 1.0},
    }
    return settings.Settings(**settings.deep_merge(data, sections))


@dataclass
class Script:
    """How one fake job behaves: the states it reports on successive describes, then stays in
    the last one. `submit_errors` are raised by the first submits, in order."""

    states: Sequence[models.JobState] = (S.RUNNING, S.SUCCEEDED)
    exit_code: int | None = 0
    submit_errors: Sequence[errors.StartFailed] = ()
    stop_ends_in: models.JobState = S.FAILED  # what a stopped job ends as (the vendor's view)
    # Its process started at submit (reported as info `started_at`), whatever states it shows.
    started_at_submit: bool = False


@dataclass
class _FakeJob:
    script: Script
    submitted_at: float = 0.0
    step: int = 0
    stopped: bool = False
    forgotten: bool = False  # describe answers "missing"


@dataclass
class FakeBackend:
    """An in-memory `Backend`. Jobs follow `script_for(job)` (default: `default_script`)."""

    name: str = "local"  # stands in for the local backend: job specs name a real backend
    max_in_flight: int = 1000
    describe_batch_size: int = 100
    max_start_attempts: int | None = None
    start_budget_s: float | None = None
    log_delivery_s: float = 0.0
    late_output_s: float | None = None  # a second log line appears this long after the end
    default_script: Script = field(default_factory=Script)
    scripts: dict[str, Script] = field(default_factory=dict)  # by job name
    submits: list[tuple[str, int]] = field(default_factory=list)  # (job id, attempt)
    describe_batches: list[list[str]] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    settled_ids: list[str] = field(default_factory=list)  # jobs whose end the store recorded
    _jobs: dict[str, _FakeJob] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _wake: base.Wake | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def set_wake(self, wake: base.Wake) -> None:
        self._wake = wake

    def validate(self, spec: models.JobSpec) -> None:
        if "invalid" in spec.overrides:
            raise errors.InvalidJob("not accepted by the fake", "overrides.invalid")

    def partition(self, job: models.Job) -> str:
        return str(job.spec.overrides.get("partition", "default"))

    def script_for(self, job: models.Job) -> Script:
        return self.scripts.get(job.spec.name or "", self.default_script)

    async def submit(self, job: models.Job) -> base.Submitted:
        self.submits.append((job.id, job.attempt))
        script = self.script_for(job)
        failed = self._failures.get(job.id, 0)
        if failed < len(script.submit_errors):
            self._failures[job.id] = failed + 1
            raise script.submit_errors[failed]
        external_id = f"fake-{next(self._ids)}"
        self._jobs[external_id] = _FakeJob(script, submitted_at=time.time())
        return base.Submitted(external_id=external_id, state=S.SUBMITTED, vendor_status="SUBMITTED")

    async def describe(self, jobs: Sequence[models.Job]) -> Mapping[str, base.Observation]:
        assert len(jobs) <= self.describe_batch_size, "describe batch over the limit"
        ids = [job.external_id or "" for job in jobs]
        self.describe_batches.append(ids)
        out = {}
        for external_id in ids:
            fake = self._jobs.get(external_id)
            if fake is None or fake.forgotten:
                continue
            out[external_id] = self._observe(external_id, fake)
        return out

    def _observe(self, external_id: str, fake: _FakeJob) -> base.Observation:
        info = {"started_at": fake.submitted_at} if fake.script.started_at_submit else {}
        if fake.stopped:
            state = fake.script.stop_ends_in
            return base.Observation(external_id, state, state.value, reason="stopped", info=info)
        states = fake.script.states
        state = states[min(fake.step, len(states) - 1)]
        fake.step += 1
        exit_code = fake.script.exit_code if state.terminal else None
        return base.Observation(external_id, state, state.value, exit_code=exit_code, info=info)

    async def stop(self, job: models.Job) -> None:
        self.stops.append(job.id)
        if job.external_id in self._jobs:
            self._jobs[job.external_id].stopped = True

    async def locate(self, job: models.Job) -> base.Located:
        for external_id, fake in self._jobs.items():
            if not fake.forgotten and external_id == job.external_id:
                return base.Located(external_id, launched=True)
        return base.Located(None, launched=None)

    def telemetry(self) -> base.Telemetry:
        return base.Telemetry()

    def settled(self, job: models.Job) -> None:
        self.settled_ids.append(job.id)

    async def check(self) -> list[base.Check]:
        return [base.Check(f"{self.name}.fake", True, "a fake backend: nothing to check")]

    def can_resubmit(self, job: models.Job) -> bool:
        return False

    async def read_logs(self, job: models.Job, cursor: Any) -> base.LogPage:
        """One line at once; with `late_output_s`, a second once the job has been over for
        that long (as CloudWatch delivers the last lines late)."""
        read = cursor or 0
        if read == 0:
            return base.LogPage([base.LogChunk("stdout", f"output of {job.id}\n")], 1)
        late = self.late_output_s
        if (
            read == 1
            and late is not None
            and job.state.terminal
            and time.time() - job.updated_at >= late
        ):
            return base.LogPage([base.LogChunk("stdout", f"late output of {job.id}\n")], 2)
        return base.LogPage([], read)

    # -- for tests -------------------------------------------------------------------------

    def forget(self, external_id: str) -> None:
        """Make the vendor stop knowing this job (describe reports it missing)."""
        self._jobs[external_id].forgotten = True


@dataclass
class _Attempt:
    attempt: int
    token: str
    started_at: float
    external_id: str | None = None
    outcome: str | None = None


@dataclass
class MemoryData:
    """What an `InMemoryStore` holds. Stores built on one `MemoryData` see the same jobs: a new
    store on it is a daemon restarted on the same store. `schema_version` is the version of the
    orchestrator that wrote it (set it higher to see a store refuse it)."""

    schema_version: int = store.SCHEMA_VERSION
    jobs: dict[str, models.Job] = field(default_factory=dict)
    keys: dict[tuple[int | None, str], str] = field(default_factory=dict)  # (uid, key) → id
    events: dict[str, list[models.Event]] = field(default_factory=dict)  # by job, in order
    seq: int = 0  # the number of the last event committed
    attempts: dict[str, list[_Attempt]] = field(default_factory=dict)
    definitions: dict[tuple[str, str], str] = field(default_factory=dict)  # (backend, digest)


class InMemoryStore(store.Store):
    """A `Store` in memory, with the SQLite store's semantics (the conformance suite in
    `tests/store_conformance.py` holds both to them): for unit tests of the engine and the API
    with no files or threads. Each write happens at once, in the caller's task; its events are
    published before it returns.

    `fail_writes("why")` makes every write fail with `StoreError`, as a full disk does, until
    `fail_writes(None)`; meanwhile the store reports the `store_commit_failed` problem, until a
    write succeeds."""

    def __init__(
        self,
        hub: events.Hub,
        *,
        clock: Callable[[], float] = time.time,
        data: MemoryData | None = None,
    ) -> None:
        self._hub = hub
        self._clock = clock
        self.data = MemoryData() if data is None else data
        self._open = False
        self._broken: str | None = None
        self._commit_failure: str | None = None

    # -- lifecycle and health --------------------------------------------------------------

    async def open(self) -> None:
        if self.data.schema_version > store.SCHEMA_VERSION:
            raise errors.StoreTooNew("<memory>", self.data.schema_version, store.SCHEMA_VERSION)
        self._open = True
        self._hub.committed_up_to(self.data.seq)

    async def close(self) -> None:
        self._open = False

    def fail_writes(self, why: str | None) -> None:
        self._broken = why

    async def ping(self) -> None:
        self._writable()

    def problems(self) -> list[store.Problem]:
        if self._commit_failure is None:
            return []
        message = f"the store's last commit failed: {self._commit_failure}"
        return [store.Problem("store_commit_failed", message)]

    def free_bytes(self) -> int | None:
        return None

    def check_room(self) -> None:
        pass

    def _writable(self) -> None:
        if not self._open:
            raise errors.StoreError("the store is not open")
        if self._broken is not None:
            self._commit_failure = self._broken
            raise errors.StoreError(f"commit failed: {self._broken}")

    def _job(self, job_id: str) -> models.Job:
        if not self._open:
            raise errors.StoreError("the store is not open")
        job = self.data.jobs.get(job_id)
        if job is None:
            raise errors.JobNotFound(job_id)
        return job

    def _commit(self, job: models.Job, changed: models.Event | None = None) -> models.Job:
        """Keep `job` and its event (all checks passed), publish the event; the job."""
        self._commit_failure = None
        self.data.jobs[job.id] = job
        if changed is not None:
            self.data.seq += 1
            changed = dataclasses.replace(changed, seq=self.data.seq)
            self.data.events.setdefault(job.id, []).append(changed)
            self._hub.publish(changed)
        return job

    def _moved(
        self,
        job: models.Job,
        new: models.JobState,
        *,
        reason: str | None,
        exit_code: int | None = None,
        vendor_status: str | None = None,
        external_id: str | None = None,
        info: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> tuple[models.Job, models.Event]:
        """`job` moved to `new` (with `changes`) and the event of it, to `_commit`; nothing is
        kept yet. `IllegalTransition` if `models.can_transition` does not allow it."""
        if not models.can_transition(job.state, new):
            raise errors.IllegalTransition(job.id, job.state.value, new.value)
        now = self._clock()
        moved = dataclasses.replace(
            job,
            state=new,
            updated_at=now,
            state_times={**job.state_times, new.value: now},
            reason=reason,
            exit_code=job.exit_code if exit_code is None else exit_code,
            vendor_status=job.vendor_status if vendor_status is None else vendor_status,
            external_id=job.external_id if external_id is None else external_id,
            info=_as_stored({**job.info, **(info or {})}),
            **changes,
        )
        return moved, store.job_event(moved, job.state)

    def _launching(self, job_id: str) -> models.Job:
        job = self._job(job_id)
        if job.state != S.QUEUED or not job.launching:
            raise errors.StaleState(job_id, "QUEUED (launching)", job.state.value)
        return job

    # -- writes ----------------------------------------------------------------------------

    async def accept_many(
        self, specs: Sequence[tuple[models.JobSpec, str]], peer: models.Peer | None
    ) -> list[store.AcceptOutcome]:
        self._writable()
        now = self._clock()
        kept_peer = None if peer is None else models.Peer(peer.uid, peer.gid, peer.pid)
        outcomes: list[store.AcceptOutcome] = []
        for spec, backend in specs:
            key = None
            if spec.idempotency_key is not None:
                key = (None if peer is None else peer.uid, spec.idempotency_key)
                existing_id = self.data.keys.get(key)
                if existing_id is not None:
                    existing = self.data.jobs[existing_id]
                    try:
                        store.check_same_spec(existing, spec, backend)
                    except errors.IdempotencyConflict as exc:
                        outcomes.append(exc)
                    else:
                        outcomes.append((existing, False))
                    continue
            job = models.Job(
                id=models.new_job_id(now),
                spec=spec,
                backend=backend,
                state=S.QUEUED,
                created_at=now,
                updated_at=now,
                state_times={S.QUEUED.value: now},
                peer=kept_peer,
            )
            self.data.attempts[job.id] = []
            if key is not None:
                self.data.keys[key] = job.id
            self._commit(job, store.job_event(job, None))
            outcomes.append((dataclasses.replace(job, peer=peer), True))
        return outcomes

    async def transition(
        self,
        job_id: str,
        expected: models.JobState,
        new: models.JobState,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        vendor_status: str | None = None,
        external_id: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        self._writable()
        job = self._job(job_id)
        if job.state != expected:
            raise errors.StaleState(job_id, expected.value, job.state.value)
        return self._commit(
            *self._moved(
                job,
                new,
                reason=reason,
                exit_code=exit_code,
                vendor_status=vendor_status,
                external_id=external_id,
                info=info,
            )
        )

    async def observe(
        self,
        job_id: str,
        *,
        vendor_status: str | None,
        reason: str | None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        self._writable()
        job = self._job(job_id)
        return self._commit(
            dataclasses.replace(
                job,
                vendor_status=vendor_status,
                reason=job.reason if reason is None else reason,
                info=_as_stored({**job.info, **(info or {})}),
            )
        )

    async def relocate(self, job_id: str, external_id: str) -> models.Job:
        self._writable()
        job = self._job(job_id)
        for attempt in self.data.attempts[job_id]:
            if attempt.attempt == job.attempt:
                attempt.external_id = external_id
        return self._commit(dataclasses.replace(job, external_id=external_id))

    async def begin_attempt(self, job_id: str) -> models.Job | None:
        self._writable()
        job = self._job(job_id)
        if job.state != S.QUEUED or job.launching or job.stop_reason:
            return None
        now = self._clock()
        attempt = job.attempt + 1
        token = f"{job.id}-{attempt}"
        self.data.attempts[job_id].append(_Attempt(attempt, token, now))
        return self._commit(
            dataclasses.replace(
                job,
                attempt=attempt,
                token=token,
                launching=True,
                updated_at=now,
                info=_as_stored({**job.info, "attempt_started_at": now}),
            )
        )

    async def record_submitted(
        self,
        job_id: str,
        *,
        external_id: str,
        state: models.JobState,
        vendor_status: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        self._writable()
        job = self._launching(job_id)
        moved, changed = self._moved(
            job,
            state,
            reason=None,
            vendor_status=vendor_status,
            external_id=external_id,
            info=info,
            launching=False,
        )
        current = self.data.attempts[job_id][-1]
        current.external_id, current.outcome = external_id, "submitted"
        return self._commit(moved, changed)

    async def record_start_failure(
        self, job_id: str, reason: str, *, final: bool, failure: str = "start"
    ) -> models.Job:
        self._writable()
        job = self._launching(job_id)
        self.data.attempts[job_id][-1].outcome = f"start failed: {reason}"
        job = dataclasses.replace(job, launching=False, reason=reason)
        if not final:
            return self._commit(job)
        return self._commit(*self._moved(job, S.FAILED, reason=reason, info={"failure": failure}))

    async def retry(
        self,
        job_id: str,
        expected: models.JobState,
        *,
        reason: str,
        outcome: str,
        info: dict[str, Any] | None = None,
    ) -> models.Job:
        self._writable()
        job = self._job(job_id)
        if job.state != expected:
            raise errors.StaleState(job_id, expected.value, job.state.value)
        if job.stop_reason is not None:
            raise errors.StaleState(job_id, expected.value, f"{job.state.value}, stopping")
        if job.state.terminal or job.state == S.QUEUED:
            raise errors.IllegalTransition(job_id, job.state.value, S.QUEUED.value)
        now = self._clock()
        requeued = dataclasses.replace(
            job,
            state=S.QUEUED,
            launching=False,
            updated_at=now,
            state_times={S.QUEUED.value: now},
            reason=reason,
            exit_code=None,
            vendor_status=None,
            external_id=None,
            info=_as_stored({**job.info, **(info or {})}),
        )
        self.data.attempts[job_id][-1].outcome = outcome
        return self._commit(requeued, store.job_event(requeued, job.state))

    async def expand(
        self, parent_id: str, children: Sequence[models.JobSpec]
    ) -> tuple[models.Job, list[models.Job]]:
        self._writable()
        parent = self._job(parent_id)
        if parent.state != S.QUEUED or parent.launching or parent.stop_reason is not None:
            raise errors.StaleState(parent_id, S.QUEUED.value, parent.state.value)
        now = self._clock()
        made = []
        for index, spec in enumerate(children):
            child = models.Job(
                id=f"{parent_id}:{index}",
                spec=spec,
                backend=parent.backend,
                state=S.QUEUED,
                created_at=now,
                updated_at=now,
                state_times={S.QUEUED.value: now},
                peer=parent.peer,
            )
            self.data.attempts[child.id] = []
            made.append(self._commit(child, store.job_event(child, None)))
        parent = self._commit(
            *self._moved(
                parent,
                S.SUBMITTED,
                reason=f"expanded into {len(made)} child jobs",
                info={"array_status": {S.QUEUED.value: len(made)}},
            )
        )
        return parent, made

    async def request_stop(self, job_id: str, why: models.StopReason) -> models.Job:
        self._writable()
        job = self._job(job_id)
        if job.state.terminal:
            return job
        if job.state == S.QUEUED and not job.launching:
            final, reason = tracking.stopped_outcome(job, why)
            info = {"failure": tracking.stop_failure(why)}
            return self._commit(*self._moved(job, final, reason=reason, stop_reason=why, info=info))
        if job.stop_reason is None:
            job = self._commit(dataclasses.replace(job, stop_reason=why))
        return job

    async def stop_children(self, parent_id: str, why: models.StopReason) -> list[models.Job]:
        self._writable()
        prefix, launched = f"{parent_id}:", []
        for job_id in sorted(self.data.jobs):
            child = self.data.jobs[job_id]
            if job_id.startswith(prefix) and not child.state.terminal and not child.stop_reason:
                stopped = await self.request_stop(job_id, why)
                if not stopped.state.terminal:
                    launched.append(stopped)
        return launched

    async def purge(self, older_than: float) -> list[str]:
        self._writable()
        ids = [
            job.id
            for job in sorted(self.data.jobs.values(), key=lambda job: job.id)
            if job.state.terminal and job.updated_at < older_than
        ][: store.PURGE_SLICE]
        if ids:
            self._commit_failure = None
        for job_id in ids:
            job = self.data.jobs.pop(job_id)
            self.data.events.pop(job_id, None)
            self.data.attempts.pop(job_id, None)
            if job.spec.idempotency_key is not None:
                key = (None if job.peer is None else job.peer.uid, job.spec.idempotency_key)
                self.data.keys.pop(key, None)
        return ids

    # -- reads -----------------------------------------------------------------------------

    async def get(self, job_id: str) -> models.Job:
        return self._job(job_id)

    async def list_jobs(self, query: store.JobQuery = store.ALL_JOBS) -> list[models.Job]:
        q = query
        found = []
        for job_id in sorted(self._jobs(), reverse=True):
            job = self.data.jobs[job_id]
            if (
                (q.before is None or job.id < q.before)
                and (q.peer_uid is None or (job.peer is not None and job.peer.uid == q.peer_uid))
                and (q.states is None or job.state in q.states)
                and (q.backend is None or job.backend == q.backend)
                and (q.name is None or fnmatch.fnmatchcase(job.name, q.name))
                and (q.since is None or job.created_at >= q.since)
                and (q.id_prefix is None or job.id.startswith(q.id_prefix))
                and all(job.spec.labels.get(k) == v for k, v in (q.labels or {}).items())
                and (q.target is None or job.spec.target == q.target)
                and (q.children or ":" not in job.id)
            ):
                found.append(job)
                if len(found) >= q.limit:
                    break
        return found

    async def unfinished(self) -> list[models.Job]:
        jobs = self._jobs()
        return [jobs[i] for i in sorted(jobs) if not jobs[i].state.terminal]

    async def history(self, job_id: str) -> list[store.HistoryEntry]:
        self._jobs()
        return [
            {
                "at": models.iso(e.at),
                "from": None if e.from_state is None else e.from_state.value,
                "to": e.to_state.value,
                "reason": e.reason,
                "exit_code": e.exit_code,
            }
            for e in self.data.events.get(job_id, ())
        ]

    async def events_since(
        self,
        since: int,
        *,
        job_id: str | None = None,
        peer_uid: int | None = None,
        limit: int = 1000,
    ) -> list[models.Event]:
        self._jobs()
        found = [
            event
            for events in (
                self.data.events.values() if job_id is None else [self.data.events.get(job_id, [])]
            )
            for event in events
            if event.seq > since and (peer_uid is None or event.peer_uid == peer_uid)
        ]
        return sorted(found, key=lambda event: event.seq)[:limit]

    async def attempts(self, job_id: str) -> list[store.AttemptEntry]:
        self._jobs()
        return [
            {
                "attempt": a.attempt,
                "token": a.token,
                "external_id": a.external_id,
                "started_at": models.iso(a.started_at),
                "outcome": a.outcome,
            }
            for a in self.data.attempts.get(job_id, ())
        ]

    async def dependents(self, job_id: str) -> list[str]:
        jobs = self._jobs()
        if job_id not in jobs:
            return []
        return sorted(j.id for j in jobs.values() if job_id in j.spec.depends_on)

    async def count_children(self, parent_id: str) -> dict[str, int]:
        prefix = f"{parent_id}:"
        return dict(
            collections.Counter(
                job.state.value for job in self._jobs().values() if job.id.startswith(prefix)
            )
        )

    async def count_by_state(self, peer_uid: int | None = None) -> dict[str, int]:
        counts = collections.Counter(
            job.state.value
            for job in self._jobs().values()
            if peer_uid is None or (job.peer is not None and job.peer.uid == peer_uid)
        )
        return dict(counts)

    async def definition(self, backend: str, digest: str) -> str | None:
        self._jobs()
        return self.data.definitions.get((backend, digest))

    async def remember_definition(self, backend: str, digest: str, arn: str) -> None:
        self._writable()
        self.data.definitions[(backend, digest)] = arn

    def _jobs(self) -> dict[str, models.Job]:
        """Every job, by id (the store must be open)."""
        if not self._open:
            raise errors.StoreError("the store is not open")
        return self.data.jobs


def _as_stored(info: Mapping[str, Any]) -> dict[str, Any]:
    """`info` as the SQLite store gives it back: through JSON (tuples become lists; what JSON
    cannot hold is refused, as it is there)."""
    loaded: dict[str, Any] = orjson.loads(orjson.dumps(info))
    return loaded


class FakeDefinitionVendor:
    """A `backends.definitions.Vendor` in memory: registrations counted, `find` answering from
    what it registered, `fail` to refuse them, `gate` to hold them."""

    def __init__(self) -> None:
        self.registered: list[dict[str, Any]] = []
        self.in_aws: dict[str, tuple[str, str]] = {}  # name → (digest, arn)
        self.finds = 0
        self.inactive: set[str] = set()  # ARNs deregistered
        self.base_reads = 0
        self.base_memory = "512"
        self.fail: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def base_definition(self, target: str | None) -> dict[str, Any]:
        self.base_reads += 1
        return {
            "family": f"app-{target or 'default'}",
            "containerDefinitions": [{"name": "main"}],
            "memory": self.base_memory,  # change it to stand for a new revision
        }

    def with_image(self, base: Mapping[str, Any], image: str) -> dict[str, Any]:
        return {**base, "containerDefinitions": [{"name": "main", "image": image}]}

    async def find(self, name: str, digest: str) -> str | None:
        self.finds += 1
        found = self.in_aws.get(name)
        if found is None or found[0] != digest or found[1] in self.inactive:
            return None
        return found[1]

    async def active(self, arn: str) -> bool:
        return arn not in self.inactive

    async def register(self, kwargs: Mapping[str, Any], digest: str) -> str:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.registered.append(dict(kwargs))
        revision = sum(r["family"] == kwargs["family"] for r in self.registered)
        arn = f"arn:td/{kwargs['family']}:{revision}"
        self.in_aws[kwargs["family"]] = (digest, arn)
        return arn
