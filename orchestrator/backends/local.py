"""The embedded backend: each job is a subprocess on this host.

Every local job is started, reaped and remembered by the keeper (`_keeper.py`, talked to through
`keeper.py`): one process per work directory that outlives the daemon. The keeper is each job's
parent, so a job's outcome comes from the kernel's wait status, never from a file a job could
write; it holds the outcome until the daemon has recorded it (`settled`), so a daemon that was
down when a job ended still learns its true outcome. The external id is `PID:START_TIME` of the
job's own process, so a job is re-adopted by identity, not by pid alone; the keeper knows each
launch by `JOB_ID/ATTEMPT`.

Where cgroups can be made (`cgroups.probe`), each attempt also runs in a cgroup of its own, named
in its external id (`PID:START_TIME:CGROUP`): stops signal every process in it, and a job is
terminal only once its cgroup is empty. When the job's own process has ended with its outcome
known, what it left running is stopped as on a cancel (SIGTERM, SIGKILL after
`local.kill_grace_s`), as systemd stops a unit's control group. When the keeper has gone (killed,
or the host short of memory) while the job's processes still run, the job is re-adopted as
`orphaned`: it stays RUNNING, `cancel` and timeouts still stop it, and once its processes have
ended it is LOST (there is no exit status to tell its outcome). Elsewhere jobs run in process
groups.

A job that failed (a signal, a non-zero exit) while the kernel's OOM killer killed one of its
processes fails as `infrastructure`, not `user` (`failures.local_exit`): once the attempt is over,
before its cgroups are removed, the backend reads its OOM-kill count from `memory.events` of its
v2 cgroup (where the memory controller is enabled), or from `memory.oom_control` of the memory
cgroup (v1) each attempt also gets on a hybrid or legacy host (`cgroups.probe_memory_v1`; named
in the job's info as `memory_cgroup`; best-effort, never failing a launch). Where neither can be
read, OOM kills are not known: such a job fails as `user`.

With `local.run_as = "submitter"` each job runs as the user who submitted it (`users.py`): the
daemon looks up that user's groups, home and name at launch and passes them to the keeper, whose
forked child takes them on after joining the cgroup and before entering the job's working
directory. A job with no recorded submitter is not run (it would run as the daemon). A daemon
that cannot switch users refuses to start. With `run_as = "daemon"` (and `local.hide_state =
"auto"`), each job runs in a mount namespace where the store's directory and the work directory
are empty but for the job's own attempt directory (`_sandbox.py`), where the kernel allows it.

The keeper copies the job's stdout and stderr to their files up to `local.max_output_bytes` each.

What the daemon reads about a job (the keeper's records, the claim, `/proc/PID/stat`, cgroup
files, the logs) can fail for reasons that say nothing about the job: the keeper is being
restarted, the daemon is out of descriptors (EMFILE) or memory, the disk returns EIO. Only proof
of absence (ENOENT, ESRCH, a keeper that answers without the job) counts as such: a job that
cannot be looked at right now keeps its state, the failure is logged (`local.read_failed`) and
counted (`orchestrator_local_read_errors_total`), and the poller looks again on its next round.

Attempts launched by a daemon from before the keeper (a runner per job, which wrote an `exit`
file beside the logs) are still followed to their end from those files.

What the backend reads about a job is in `local_files.py`, what makes it look at once in
`local_watch.py`. The rest (about 700 lines) stays here: one job's way from launch through its
keeper, its cgroup and its stop to its end reads best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from orchestrator import errors, models
from orchestrator.backends import (
    _runner,
    _sandbox,
    base,
    cgroups,
    keeper,
    local_check,
    local_files,
    local_watch,
    users,
)
from orchestrator.settings import LocalSettings

log = structlog.get_logger("orchestrator.backends.local")
_CPU_PERIOD_US = 100_000  # the CFS period a CPU limit is a quota of (the kernel's default)

RUNNER = Path(_runner.__file__)


def _key(job: models.Job) -> str:
    """How the keeper knows the current attempt."""
    return f"{job.id}/{job.attempt}"


# Outcomes that say nothing of the job's own process: whoever held it ended without telling.
_UNRECORDED = frozenset({"vanished", "killed", "setup_failed"})
_ORPHANED = "orphaned"  # the keeper has gone and told nothing; the job's processes run on


# Launch errors that the same launch would meet again.
_PERMANENT_SPAWN_ERRORS = frozenset({errno.E2BIG, errno.ENOENT, errno.ENOEXEC, errno.EACCES})


class LocalBackend:
    name = "local"
    describe_batch_size = 1000
    max_start_attempts: int | None = None
    start_budget_s: float | None = None
    log_delivery_s = 0.0  # the keeper has copied everything once it tells the job has ended

    def __init__(
        self, settings: LocalSettings, work_dir: Path, hidden_from_jobs: Sequence[Path] = ()
    ) -> None:
        self._settings = settings
        self._work_dir = work_dir
        self._hidden_from_jobs = list(hidden_from_jobs)
        self._hidden: list[str] = []  # what daemon-mode jobs do not see, once checked
        self.max_in_flight = settings.max_concurrency
        self.gpu_devices = tuple(settings.gpus)  # handed out by the dispatcher's lane
        self._wake: base.Wake = lambda _job_id: None
        self._keeper = keeper.KeeperClient(work_dir, self._keeper_said)
        self._killers: dict[str, asyncio.Task[None]] = {}
        self._read_errors: dict[str, int] = {}  # errno name → reads that failed inconclusively
        self._unsure: dict[str, int] = {}  # external id → inconclusive reads in a row
        self._containment = cgroups.Containment(None, "not started")
        self._memory = cgroups.MemoryV1(None, "not started")
        self._cpu = cgroups.MemoryV1(None, "not started")  # v1 cpu cgroups, where v2 has no cpu
        self._watches = local_watch.Watches(lambda job_id: self._wake(job_id))

    @property
    def containment(self) -> cgroups.Containment:
        return self._containment

    @property
    def hidden(self) -> list[str]:
        """The directories daemon-mode jobs see empty (none where the kernel does not allow)."""
        return list(self._hidden)

    async def start(self) -> None:
        # A configuration this daemon cannot honour is said now, not by every job failing.
        if self._settings.run_as == "submitter" and (why := await users.check(RUNNER)):
            raise errors.CannotRunAsSubmitter(why)
        self._work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._work_dir = self._work_dir.resolve()
        self._keeper = keeper.KeeperClient(self._work_dir, self._keeper_said)
        self._containment = cgroups.probe(
            enabled=self._settings.cgroup == "auto", root=self._settings.cgroup_root, create=True
        )
        self._memory = cgroups.probe_memory_v1(enabled=self._settings.cgroup == "auto", create=True)
        if self._cpu_limit_file() is None:  # job cgroups without the cpu controller: v1's
            self._cpu = cgroups.probe_cpu_v1(enabled=self._settings.cgroup == "auto", create=True)
        if self._containment.enabled:
            log.info(
                "local.cgroups",
                root=str(self._containment.root),
                kill="cgroup.kill" if self._containment.kill_file else "each member",
                memory=self._containment.memory,
            )
        elif self._settings.cgroup == "auto":
            log.warning(
                "local.cgroup_unavailable",
                reason=self._containment.detail,
                fallback="process groups: a job's processes that leave its process group "
                "survive cancel and timeouts, and are not waited for",
            )
        if self._settings.cgroup == "auto":
            log.info(
                "local.oom_detection",
                how=cgroups.oom_detection(self._containment, self._memory),
                memory_v1=str(self._memory.root) if self._memory.enabled else None,
            )
        await self._check_hiding()
        try:
            await self._keeper.connect()
        except errors.KeeperUnavailable as exc:  # jobs wait; it is tried again at each launch
            log.warning("local.keeper_unavailable", error=str(exc))

    async def check(self) -> list[base.Check]:
        """`orchestrator check`: `local_check.check`, and whether jobs will see the daemon's
        state (said, not failed: the daemon starts either way, with a warning)."""
        checks = await local_check.check(self._settings, self._work_dir)
        return [*checks, await base.checked("local.hide_state", self._hiding)]

    async def _hiding(self) -> str:
        if self._settings.run_as != "daemon":
            return "not needed: jobs run as their submitters, kept out by file permissions"
        if (probed := await self._probe_hiding()) is None:
            return "off: jobs run as the daemon's user and can read and write the store"
        hidden, why = probed
        if why is None:
            return f"jobs see {', '.join(hidden)} empty but for their own attempt directory"
        return (
            f"cannot: {why}; jobs will read and write the store (the daemon warns at start-up; "
            'local.hide_state = "off" says you know)'
        )

    async def _probe_hiding(self) -> tuple[list[str], str | None] | None:
        """What daemon-mode jobs are to see empty, and why the kernel will not (None: it
        will); None when hiding is not wanted (`run_as` not `daemon`, `hide_state` off)."""
        if self._settings.run_as != "daemon" or self._settings.hide_state == "off":
            return None
        paths = [*self._hidden_from_jobs, self._work_dir]
        hidden = sorted({str(path.resolve()) for path in paths})
        return hidden, await asyncio.to_thread(_sandbox.probe, hidden, None)

    async def _check_hiding(self) -> None:
        if (probed := await self._probe_hiding()) is None:
            return
        hidden, why = probed
        if why is None:
            self._hidden = hidden
            log.info("local.state_hidden", hidden=hidden)
        else:
            log.warning(
                "local.state_visible",
                reason=why,
                consequence="local jobs run as the daemon's user and can read and write the "
                'store and other jobs\' files; set local.hide_state = "off" to silence this',
            )

    async def close(self) -> None:
        # Jobs keep running under the keeper: the next daemon adopts them. Only our watches end.
        for task in self._killers.values():
            task.cancel()
        self._watches.close()
        await self._keeper.close()

    def set_wake(self, wake: base.Wake) -> None:
        self._wake = wake

    def _keeper_said(self, key: str) -> None:
        self._wake(key.partition("/")[0])

    def validate(self, spec: models.JobSpec) -> None:
        if spec.overrides:
            raise errors.InvalidJob("the local backend takes no overrides", "job.overrides")
        if spec.target is not None:
            raise errors.InvalidJob("the local backend has no targets", "job.target")
        if spec.image is not None:
            raise errors.InvalidJob(
                "the local backend runs commands on this host and has no container runtime: "
                "run a job with an image on ECS or Batch",
                "job.image",
            )
        if (resources := spec.resources) is not None:
            if resources.cpu is not None and self._cpu_limit_file() is None:
                raise errors.InvalidJob(
                    "this host cannot limit a local job's CPU: no cgroup with the cpu "
                    f"controller ({self._containment.cpu}; cgroup v1: {self._cpu.detail})",
                    "job.resources.cpu",
                )
            if resources.gpus is not None and resources.gpus > len(self.gpu_devices):
                have = (
                    f"only {len(self.gpu_devices)} (local.gpus = {','.join(self.gpu_devices)})"
                    if self.gpu_devices
                    else "none (local.gpus is empty)"
                )
                raise errors.InvalidJob(
                    f"this host hands out {have}: a job needing {resources.gpus} would wait "
                    "for ever",
                    "job.resources.gpus",
                )
            if resources.memory_mib is not None and self._memory_limit_file() is None:
                raise errors.InvalidJob(
                    "this host cannot limit a local job's memory: no cgroup with the memory "
                    f"controller ({self._containment.memory}; cgroup v1: {self._memory.detail})",
                    "job.resources.memory_mib",
                )
        # The launch as it will be, with an id and attempt as long as real ones: E2BIG now.
        stand_in = self._work_dir / ("x" * 26) / "999"
        env, _ = self._environment(spec, "x" * 26, 999, stand_in)
        size, limit = models.launch_bytes(list(spec.command), env), models.launch_limit_bytes()
        if size > limit:
            raise errors.InvalidJob(
                f"the launch would take {size} bytes of arguments and environment (with what "
                f"the daemon passes on), over this host's limit of {limit} (E2BIG)",
                "job",
            )

    def _environment(
        self,
        spec: models.JobSpec,
        job_id: str,
        attempt: int,
        attempt_dir: Path,
        user: users.Identity | None = None,
    ) -> tuple[dict[str, str], str]:
        """The job's environment and working directory: run as `user` if given, with its HOME,
        USER, LOGNAME and SHELL instead of the daemon's (unless the job's own `env` sets them),
        in its home directory unless the job names a `cwd`."""
        env = dict(self._inherited)
        if user is not None:
            for name in users.PASSWD_VARIABLES:
                env.pop(name, None)
            env.update(user.environment())
        env.update(spec.env)
        env.update(ORCHESTRATOR_JOB_ID=job_id, ORCHESTRATOR_ATTEMPT=str(attempt))
        default_cwd = str(attempt_dir) if user is None else user.default_cwd
        return env, spec.cwd or spec.default_cwd or default_cwd

    @functools.cached_property
    def _inherited(self) -> dict[str, str]:
        """What a job gets of the daemon's environment (`local.inherit_env`): read once, as the
        daemon's environment does not change while it runs (every launch and every submit's
        check used to read it again)."""
        return {k: os.environ[k] for k in self._settings.inherit_env if k in os.environ}

    def partition(self, job: models.Job) -> str:
        return self.name

    def attempt_dir(self, job: models.Job) -> Path:
        return self._work_dir / job.id / str(job.attempt)

    def _new_cgroup(self, job: models.Job) -> Path | None:
        """Where the current attempt runs if this daemon makes cgroups."""
        root = self._containment.root
        return None if root is None else root / f"{job.id}-{job.attempt}"

    def _memory_limit_file(self) -> str | None:
        """Where a job's memory limit is written: its v2 cgroup's `memory.max` where job
        cgroups have the memory controller, else its v1 memory cgroup's
        `memory.limit_in_bytes`; None when neither is made here."""
        if self._containment.enabled and self._containment.memory == "memory.events":
            return "memory.max"
        return "memory.limit_in_bytes" if self._memory.enabled else None

    def _cpu_limit_file(self) -> str | None:
        """Where a job's CPU limit is written: its v2 cgroup's `cpu.max` where job cgroups
        have the cpu controller, else its v1 cpu cgroup's `cpu.cfs_quota_us`; None when
        neither is made here."""
        if self._containment.enabled and self._containment.cpu == "cpu.max":
            return "cpu.max"
        return "cpu.cfs_quota_us" if self._cpu.enabled else None

    def _limit_cpu(self, job: models.Job, cgroup: Path | None, cpus: float) -> Path | None:
        """Write the attempt's CPU limit (`cpus` times the CFS period, per period) before it
        starts: in its v2 cgroup, or in a v1 cpu cgroup of its own, which it returns (the
        runner joins it). A limit that cannot be written fails the launch (nothing started)."""
        quota = max(1000, round(cpus * _CPU_PERIOD_US))
        where = None
        try:
            if self._cpu_limit_file() == "cpu.max":
                if cgroup is None:
                    raise OSError("no cgroup for this attempt")
                (cgroup / "cpu.max").write_text(f"{quota} {_CPU_PERIOD_US}")
                return None
            if self._cpu.root is None:
                raise OSError("no cpu cgroup for this attempt")
            where = self._cpu.root / f"{job.id}-{job.attempt}"
            cgroups.make(where)
            (where / "cpu.cfs_period_us").write_text(str(_CPU_PERIOD_US))
            (where / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as exc:
            self._remove_cgroups(cgroup, where)
            raise errors.StartFailed(
                f"cannot limit the job's CPU to {cpus:g}: {exc}", retryable=False
            ) from exc
        return where

    def _limit_memory(
        self, job: models.Job, cgroup: Path | None, memory: Path | None, mib: int
    ) -> None:
        """Write the attempt's memory limit before it starts; a limit that cannot be written
        starts nothing (the job asked for it)."""
        name = self._memory_limit_file()
        where = (cgroup if name == "memory.max" else memory) if name else None
        try:
            if where is None:
                raise OSError(f"no {name or 'memory cgroup'} for this attempt")
            (where / str(name)).write_text(str(mib * 1024 * 1024))
        except OSError as exc:
            self._remove_cgroups(cgroup, memory)  # nothing started in them
            raise errors.StartFailed(
                f"cannot limit the job's memory to {mib} MiB: {exc}", retryable=False
            ) from exc

    def _new_memory_cgroup(self, job: models.Job) -> Path | None:
        """Where the current attempt is counted in the v1 memory hierarchy, if this daemon
        makes such cgroups."""
        root = self._memory.root
        return None if root is None else root / f"{job.id}-{job.attempt}"

    def _memory_cgroup_of(self, job: models.Job) -> Path | None:
        """The attempt's v1 memory cgroup: the one its launch recorded (`memory_cgroup`), if
        named for this job and attempt under an `orchestrator-jobs` directory; else where this
        daemon would have made it (an attempt adopted by `locate` has none recorded)."""
        name = f"{job.id}-{job.attempt}"
        recorded = job.info.get("memory_cgroup")
        if isinstance(recorded, str):
            path = Path(recorded)
            if path.is_absolute() and path.name == name and path.parent.name == cgroups.JOBS_V1:
                return path
        return self._new_memory_cgroup(job)

    @staticmethod
    def _cgroup_of(job: models.Job, ident: local_files.JobId) -> Path | None:
        """The attempt's cgroup named in its external id; one not named for this job and
        attempt is not believed (the external id comes from the store, not from the kernel)."""
        if ident.cgroup is None or ident.cgroup.name != f"{job.id}-{job.attempt}":
            return None
        return ident.cgroup

    # -- submit ----------------------------------------------------------------------------

    async def _submitter(self, job: models.Job) -> users.Identity | None:
        """Whom the job runs as: its submitter with `run_as = "submitter"` (None: the daemon)."""
        if self._settings.run_as != "submitter":
            return None
        if job.peer is None:  # accepted by a daemon that did not record submitters
            raise errors.StartFailed(
                "the job has no recorded submitter, and local jobs run as their submitter "
                '(local.run_as = "submitter"): it is not run as anyone else',
                retryable=False,
            )
        # The user database may be remote (LDAP, sssd): not on the event loop.
        return await asyncio.to_thread(users.lookup, job.peer.uid, job.peer.gid)

    async def submit(self, job: models.Job) -> base.Submitted:
        gpus = self._gpus_of(job)
        user = await self._submitter(job)
        attempt_dir = self.attempt_dir(job)
        try:
            attempt_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # ENOSPC, EIO: nothing started
            raise errors.StartFailed(
                f"cannot create the job's directory {attempt_dir}: {exc.strerror}", retryable=True
            ) from exc
        cgroup = self._new_cgroup(job)
        if cgroup is not None:
            try:
                cgroups.make(cgroup)
            except OSError as exc:  # EACCES, ENOSPC (cgroup.max.descendants), EIO: nothing started
                raise errors.StartFailed(
                    f"cannot create the job's cgroup {cgroup}: {exc.strerror}", retryable=True
                ) from exc
        memory = self._new_memory_cgroup(job)
        if memory is not None:
            try:
                cgroups.make(memory)
            except OSError as exc:  # only counts OOM kills: the job runs without it
                log.warning(
                    "local.memory_cgroup_not_made",
                    job_id=job.id,
                    cgroup=str(memory),
                    error=exc.strerror,
                    consequence="an OOM kill of this attempt will not be known",
                )
                memory = None
        limit = job.spec.resources.memory_mib if job.spec.resources is not None else None
        if limit is not None:
            self._limit_memory(job, cgroup, memory, limit)
        cpus = job.spec.resources.cpu if job.spec.resources is not None else None
        cpu = None
        if cpus is not None:
            try:
                cpu = self._limit_cpu(job, cgroup, cpus)
            except errors.StartFailed:
                self._remove_cgroups(None, memory)
                raise
        env, cwd = self._environment(job.spec, job.id, job.attempt, attempt_dir, user)
        if self.gpu_devices:  # its own GPUs, or none: never another job's
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        request = {
            "dir": str(attempt_dir),
            "command": list(job.spec.command),
            "env": env,
            "cwd": cwd,
            "cgroup": None if cgroup is None else str(cgroup),
            "memory_cgroup": None if memory is None else str(memory),
            "cpu_cgroup": None if cpu is None else str(cpu),
            "user": None if user is None else user.runner_arg(),
            "hidden": self._hidden if user is None else [],
            "limit": self._settings.max_output_bytes,
        }
        try:
            record = await self._keeper.launch(_key(job), request)
        except (errors.KeeperUnavailable, errors.LaunchFailed) as exc:
            # Nothing ran: EAGAIN, ENOMEM, EMFILE, no keeper (the host is short of something
            # now) are worth a retry; what the same launch would meet again is not.
            self._remove_cgroups(cgroup, memory, cpu)
            code = exc.errno if isinstance(exc, errors.LaunchFailed) else None
            raise errors.StartFailed(
                f"cannot start the job: {exc}", retryable=code not in _PERMANENT_SPAWN_ERRORS
            ) from exc
        except (ConnectionError, TimeoutError) as exc:
            raise errors.OutcomeUnknown(
                f"the job keeper did not answer the launch: {exc!r}; it may have started"
            ) from exc
        if cpu is not None and str(record.pid) not in _read_words(cpu / "cgroup.procs"):
            # A keeper from before `cpu_cgroup` launched it: moved into its limit now.
            with contextlib.suppress(OSError):
                (cpu / "cgroup.procs").write_text(str(record.pid))
        external_id = f"{record.pid}:{record.start}"
        if cgroup is not None:
            external_id += f":{cgroup}"
        return base.Submitted(
            external_id=external_id,
            state=models.JobState.RUNNING,
            vendor_status="running",
            info={"pid": record.pid, "dir": str(attempt_dir), "keeper": self._keeper.keeper_pid}
            | ({"cgroup": str(cgroup)} if cgroup is not None else {})
            | ({"memory_cgroup": str(memory)} if memory is not None else {})
            | ({"cpu_cgroup": str(cpu)} if cpu is not None else {})
            | ({"uid": user.uid, "gid": user.gid} if user is not None else {})
            | ({"gpus": gpus} if gpus else {}),
        )

    def _gpus_of(self, job: models.Job) -> list[str]:
        """The GPUs the dispatcher's lane gave this attempt (`job.info["gpus"]`); a job that
        asks for some is never launched without them."""
        given = job.info.get("gpus")
        gpus = [str(d) for d in given] if isinstance(given, list) else []
        wanted = job.spec.resources.gpus if job.spec.resources is not None else None
        if wanted and len(gpus) != wanted:
            raise errors.StartFailed(
                f"the job needs {wanted} GPUs and was given {len(gpus)} ({gpus})", retryable=True
            )
        return gpus

    # -- observe ---------------------------------------------------------------------------

    async def describe(self, jobs: Sequence[models.Job]) -> Mapping[str, base.Observation]:
        return {job.external_id: self._observe(job) for job in jobs if job.external_id}

    def _observe(self, job: models.Job) -> base.Observation:
        assert job.external_id is not None
        failures = self._unsure.get(job.external_id)
        try:
            observation = self._observe_now(job)
        except errors.ReadUnsure as exc:
            self._read_failed(job.external_id, exc, job_id=job.id)
            # Not an answer: the job stays as it is, and is read again on the next round.
            return base.Observation(job.external_id, job.state, job.vendor_status)
        if failures is not None:
            self._unsure.pop(job.external_id, None)
            log.info("local.read_recovered", job_id=job.id, failures=failures)
        return observation

    def _observe_now(self, job: models.Job) -> base.Observation:
        assert job.external_id is not None
        external_id = job.external_id
        ident = local_files.parse_external_id(external_id)
        cgroup = self._cgroup_of(job, ident)
        if not self._keeper.connected:
            self._keeper.reconnect_soon()
            raise errors.ReadUnsure("keeper", ConnectionError(errno.ECONNREFUSED, "not connected"))
        record = self._keeper.records.get(_key(job))
        if record is not None and record.result is None:
            return base.Observation(external_id, models.JobState.RUNNING, "running")
        result = None if record is None else record.result
        if result is not None:
            done = local_files.outcome(external_id, result)
        else:
            done = self._without_record(job, ident)
            if done.state is models.JobState.RUNNING:
                return done
        if cgroup is not None:
            if (draining := self._draining(job, cgroup, done)) is not None:
                return draining
            if job.vendor_status == _ORPHANED and done.vendor_status in _UNRECORDED:
                done = base.Observation(
                    external_id,
                    models.JobState.LOST,
                    "vanished",
                    reason="the keeper that ran the job ended without telling its exit status; "
                    "its processes ran on (re-adopted) and have ended since: the outcome is "
                    "unknown",
                )
        memory = self._memory_cgroup_of(job)
        # Failed: was a process of it OOM-killed? Read before its cgroups are removed.
        failed = done.state is models.JobState.FAILED and done.failure == "user"
        if result is not None and failed and local_files.oom_killed(cgroup, memory):
            done = local_files.outcome(external_id, result, oom_killed=True)
        cpu = job.info.get("cpu_cgroup")
        self._remove_cgroups(cgroup, memory, Path(cpu) if isinstance(cpu, str) else None)
        self._forget(external_id)
        return done

    @staticmethod
    def _remove_cgroups(cgroup: Path | None, memory: Path | None, cpu: Path | None = None) -> None:
        """The attempt is over (or never started): its cgroup (empty by now) and its v1 memory
        and cpu cgroups go. One that cannot be removed is left behind, and said so; the job has
        ended all the same."""
        for path, remove in (
            (cgroup, cgroups.remove),
            (memory, cgroups.remove_v1),
            (cpu, cgroups.remove_v1),
        ):
            if path is None:
                continue
            try:
                remove(path)
            except OSError as exc:
                log.warning("local.cgroup_not_removed", cgroup=str(path), error=exc.strerror)

    def _without_record(self, job: models.Job, ident: local_files.JobId) -> base.Observation:
        """What to say of an attempt the keeper does not know: launched by a runner from before
        the keeper (its files tell), or by a keeper that has gone (its process may run on)."""
        assert job.external_id is not None
        external_id = job.external_id
        # A runner's claim and exit file are believed only for an attempt launched before the
        # keeper: a job can write its own attempt directory, and its keeper can be killed.
        before_keeper = "keeper" not in job.info and ident.pid != 0
        claim = local_files.read_claim(self.attempt_dir(job)) if before_keeper else None
        if claim is not None and "start_time" in claim:  # a runner's: from before the keeper
            exit_file = self.attempt_dir(job) / "exit"
            done = local_files.read_exit(external_id, exit_file, runner_gone=False)
            if done is None and local_files.alive(ident.pid, ident.start):
                return base.Observation(external_id, models.JobState.RUNNING, "running")
            done = done or local_files.read_exit(external_id, exit_file, runner_gone=True)
            if done is not None:
                return done
            return base.Observation(
                external_id,
                models.JobState.LOST,
                "vanished",
                reason="the job's runner ended without recording an exit status",
            )
        if ident.pid and local_files.alive(ident.pid, ident.start):
            if ident.cgroup is None:
                self._watches.exit_of(external_id, job.id, ident.pid)
            return base.Observation(
                external_id,
                models.JobState.RUNNING,
                _ORPHANED,
                reason="the keeper that ran the job has gone; the job's process still runs "
                "(re-adopted: cancel and timeouts stop it; its exit status will not be known)",
            )
        return base.Observation(
            external_id,
            models.JobState.LOST,
            "vanished",
            reason="the keeper that ran the job ended (killed, or the host rebooted) without "
            "telling its exit status",
        )

    def _draining(
        self, job: models.Job, cgroup: Path, done: base.Observation
    ) -> base.Observation | None:
        """None once the attempt's cgroup is empty (the caller removes it); while not, what to say
        of the job (RUNNING), having made sure that what is left ends: stopped if the job's own
        process has ended with its outcome recorded, watched if the runner has gone without."""
        assert job.external_id is not None
        external_id = job.external_id
        try:
            busy = cgroups.populated(cgroup)
            if busy:  # watched from now on, and looked at again: no change after this is missed
                self._watches.cgroup_of(external_id, job.id, cgroup)
                busy = cgroups.populated(cgroup)
        except (OSError, ValueError) as exc:
            raise errors.ReadUnsure("cgroup.events", exc) from exc
        if not busy:
            return None
        if external_id in self._killers:  # being stopped: ends when the last process has gone
            self._stop_cgroup(external_id, job.id, cgroup)  # SIGKILL again once past the grace
            return base.Observation(external_id, models.JobState.RUNNING, job.vendor_status)
        if done.vendor_status in _UNRECORDED:
            return base.Observation(
                external_id,
                models.JobState.RUNNING,
                _ORPHANED,
                reason="the job's runner ended without recording an exit status; the job's "
                "processes still run (re-adopted: cancel and timeouts stop them)",
            )
        self._stop_cgroup(external_id, job.id, cgroup)
        return base.Observation(
            external_id,
            models.JobState.RUNNING,
            "stopping",
            reason="the job's process has ended; stopping the processes it left running",
        )

    def _read_failed(self, key: str | None, exc: errors.ReadUnsure, **context: Any) -> None:
        """Count an inconclusive read and log it: for a job (`key`, its external id) the first
        of a run of them, then the 2nd, 4th, 8th... (a host out of descriptors fails every
        read, every round)."""
        self._read_errors[exc.errno_name] = self._read_errors.get(exc.errno_name, 0) + 1
        failures = 1
        if key is not None:
            failures = self._unsure[key] = self._unsure.get(key, 0) + 1
        if failures & (failures - 1) == 0:
            log.warning(
                "local.read_failed",
                file=exc.what,
                errno=exc.errno_name,
                error=exc.detail,
                failures=failures,
                **context,
            )

    def settled(self, job: models.Job) -> None:
        """The job's end is recorded: the keeper may forget its outcome."""
        self._keeper.forget([_key(job)])

    # -- stop ------------------------------------------------------------------------------

    async def stop(self, job: models.Job) -> None:
        """SIGTERM to every process of the job's cgroup (else its process group), SIGKILL after
        the grace period."""
        if job.external_id is None:
            return
        ident = local_files.parse_external_id(job.external_id)
        if (cgroup := self._cgroup_of(job, ident)) is not None:
            self._stop_cgroup(job.external_id, job.id, cgroup)
            return
        if job.external_id in self._killers:
            return
        if not self._signal_group(job, signal.SIGTERM):
            return
        self._killers[job.external_id] = asyncio.create_task(
            self._kill_after_grace(job.external_id, job.id, job=job),
            name=f"local-kill-{job.id}",
        )

    def _signal_group(self, job: models.Job, signum: int) -> bool:
        """Signal the job's process group: through the keeper while it holds the job (its pid
        cannot have been reused before the keeper reaps it), else if the process is still the
        one started then. False if there is nothing left to signal."""
        assert job.external_id is not None
        record = self._keeper.records.get(_key(job))
        if record is not None:
            if record.result is not None:
                return False
            self._keeper.signal(_key(job), signum)
            return True
        ident = local_files.parse_external_id(job.external_id)
        try:
            if not ident.pid or not local_files.alive(ident.pid, ident.start):
                return False
        except errors.ReadUnsure as exc:
            self._read_failed(job.external_id, exc, job_id=job.id)
            return False  # cannot tell whose pid it is now: the poller stops it again next round
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ident.pid, signum)
        return True

    def _stop_cgroup(self, external_id: str, job_id: str, cgroup: Path) -> None:
        """SIGTERM to each process in the cgroup, then `cgroup.kill` after the grace period;
        asked again once that is over (the poller asks on every round until the job has
        ended), SIGKILL again to whatever is left."""
        killer = self._killers.get(external_id)
        if killer is not None:
            if killer.done():
                self._kill_cgroup(cgroup, job_id)
            return
        try:
            cgroups.signal_each(cgroup, signal.SIGTERM)
        except OSError as exc:  # cgroup.procs unreadable now (EMFILE): the poller asks again
            self._read_failed(external_id, errors.ReadUnsure("cgroup.procs", exc), job_id=job_id)
            return
        self._killers[external_id] = asyncio.create_task(
            self._kill_after_grace(external_id, job_id, cgroup), name=f"local-kill-{job_id}"
        )

    def _kill_cgroup(self, cgroup: Path, job_id: str) -> None:
        try:
            if not cgroups.populated(cgroup):
                return
            log.warning(
                "local.kill", job_id=job_id, cgroup=str(cgroup), grace_s=self._settings.kill_grace_s
            )
            cgroups.kill(cgroup)
        except (OSError, ValueError) as exc:  # the poller stops it again on its next round
            self._read_failed(None, errors.ReadUnsure("cgroup", exc), job_id=job_id)

    async def _kill_after_grace(
        self,
        external_id: str,
        job_id: str,
        cgroup: Path | None = None,
        job: models.Job | None = None,
    ) -> None:
        await asyncio.sleep(self._settings.kill_grace_s)
        if cgroup is not None:
            self._kill_cgroup(cgroup, job_id)
            return
        assert job is not None
        if self._signal_group(job, 0):
            log.warning("local.kill", job_id=job_id, grace_s=self._settings.kill_grace_s)
            self._signal_group(job, signal.SIGKILL)

    # -- recovery --------------------------------------------------------------------------

    async def locate(self, job: models.Job) -> base.Located:
        """Did the current attempt launch? The keeper knows what it launched; failing that,
        claim the attempt to find out: if the claim is ours, nothing ever will (the keeper
        refuses a launch whose attempt is claimed). What cannot be read now answers "cannot
        tell", never "not launched"."""
        try:
            await self._keeper.connect()  # what the last daemon sent is in what it says
        except errors.KeeperUnavailable as exc:
            self._read_failed(
                None, errors.ReadUnsure("keeper", ConnectionError(str(exc))), job_id=job.id
            )
            return base.Located(None, launched=None)
        cgroup = self._new_cgroup(job)
        suffix = f":{cgroup}" if cgroup is not None else ""
        record = self._keeper.records.get(_key(job))
        if record is not None:
            return base.Located(f"{record.pid}:{record.start}{suffix}", launched=True)
        try:
            located = local_files.claim_or_read(self.attempt_dir(job))
        except errors.ReadUnsure as exc:
            self._read_failed(None, exc, job_id=job.id)
            return base.Located(None, launched=None)
        if located.launched is False and (memory := self._new_memory_cgroup(job)) is not None:
            with contextlib.suppress(OSError):  # made before a crash, never joined
                cgroups.remove_v1(memory)
        if located.launched is False and (cpu := self._cpu.root) is not None:
            with contextlib.suppress(OSError):  # likewise
                cgroups.remove_v1(cpu / f"{job.id}-{job.attempt}")
        if cgroup is None:
            return located
        if located.launched is False:  # made before a crash, never joined: not needed now
            with contextlib.suppress(OSError):
                cgroups.remove(cgroup)
        elif located.external_id is not None and cgroup.is_dir():
            return base.Located(f"{located.external_id}{suffix}", launched=True)
        return located

    def telemetry(self) -> base.Telemetry:
        return base.Telemetry(read_errors=sorted(self._read_errors.items()))

    def can_resubmit(self, job: models.Job) -> bool:
        return False  # `locate` always knows: the keeper and the attempt's claim decide

    # -- logs ------------------------------------------------------------------------------

    async def read_logs(self, job: models.Job, cursor: Any) -> base.LogPage:
        try:
            return await asyncio.to_thread(local_files.read_logs, self.attempt_dir(job), cursor)
        except errors.ReadUnsure as exc:
            self._read_failed(None, exc, job_id=job.id)
            raise errors.LogsUnavailable(
                f"cannot read the job's {exc.what} right now: {exc.detail}; try again"
            ) from exc

    def _forget(self, external_id: str) -> None:
        """The job's outcome is known: drop the watches we hold for it."""
        if (killer := self._killers.pop(external_id, None)) is not None:
            killer.cancel()
        self._unsure.pop(external_id, None)
        self._watches.forget(external_id)


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []
