"""Fakes shipped with the package, for unit tests of logic (yours and ours).

`FakeBackend` is an in-memory backend whose jobs follow a script of states, one step per
describe; it records every call so tests can assert batching and stops. `make_settings` builds
settings rooted in a temporary directory with fast polling.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import errors, models, settings
from orchestrator.backends import base

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
