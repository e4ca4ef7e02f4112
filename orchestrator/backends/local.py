"""The embedded backend: each job is a subprocess on this host.

Each attempt runs under `_runner.py`, a small parent in its own process group that records the
job's exit status in the attempt's directory, beside its stdout and stderr. The external id is
`PID:START_TIME` of that runner, so a restarted daemon re-adopts a process only if both still
match, and learns the outcome of one that ended while it was down from the exit file.

Where cgroups can be made (`cgroups.probe`), each attempt also runs in a cgroup of its own, named
in its external id (`PID:START_TIME:CGROUP`): stops signal every process in it, and a job is
terminal only once its cgroup is empty. When the job's own process has ended with its outcome
recorded, what it left running is stopped as on a cancel (SIGTERM, SIGKILL after
`local.kill_grace_s`), as systemd stops a unit's control group. When the runner has gone without
recording anything but the cgroup still holds processes (the runner was killed while the daemon
was down), the job is re-adopted as `orphaned`: it stays RUNNING, `cancel` and timeouts still stop
it, and once its processes have ended it is LOST (there is no exit status to tell its outcome).
Elsewhere jobs run in process groups, as they always did.

With `local.run_as = "submitter"` each job runs as the user who submitted it (`users.py`): the
daemon looks up that user's groups, home and name at launch and passes them to the runner,
which takes them on in the job's child only, after joining the cgroup and before entering the
job's working directory. A job with no recorded submitter is not run (it would run as the
daemon). A daemon that cannot switch users refuses to start.

The runner copies the job's stdout and stderr to their files up to `local.max_output_bytes` each,
and keeps trying to record the exit status while the disk refuses it (staying alive, so the job
is seen RUNNING); one that cannot even claim its attempt exits with a status naming the errno,
which this daemon, its parent, records as the job's failure.

What the daemon reads about a job (the exit file, the claim, `/proc/PID/stat`, the logs) can
fail for reasons that say nothing about the job: the daemon is out of descriptors (EMFILE) or
memory, the disk returns EIO. Only proof of absence (ENOENT, ESRCH) counts as such: a job whose
files cannot be read right now keeps its state, the failure is logged (`local.read_failed`) and
counted (`orchestrator_local_read_errors_total`), and the poller reads again on its next round,
backing off as for any job whose state does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import select
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import structlog

from orchestrator import errors, models
from orchestrator.backends import _runner, base, cgroups, users
from orchestrator.settings import LocalSettings

log = structlog.get_logger("orchestrator.backends.local")

RUNNER = Path(_runner.__file__)
_READ_CHUNK = 64 * 1024


class _RunnerId(NamedTuple):
    """An external id: `PID:START_TIME` of the runner, then `:CGROUP` (its directory) when the
    attempt runs in a cgroup of its own. The pid and start time name the runner while it lives;
    the cgroup names the job's processes whatever became of the runner."""

    pid: int
    start: int
    cgroup: Path | None


def _parse_external_id(external_id: str) -> _RunnerId:
    pid, start, *cgroup = external_id.split(":", 2)
    return _RunnerId(int(pid), int(start), Path(cgroup[0]) if cgroup else None)


# Outcomes that say nothing of the job's own process: its runner ended without recording one.
_UNRECORDED = frozenset({"vanished", "killed", "setup_failed"})
_ORPHANED = "orphaned"  # the runner has gone and recorded nothing; the job's processes run on


class _Unsure(Exception):
    """A read about a job failed without proving anything (EMFILE, ENOMEM, EIO, a garbled
    line): the job keeps its state until a later read tells."""

    def __init__(self, what: str, error: Exception) -> None:
        self.what = what
        self.errno_name = (
            errno.errorcode.get(error.errno, str(error.errno))
            if isinstance(error, OSError) and error.errno is not None
            else "corrupt"
        )
        self.detail = str(error)
        super().__init__(f"{what}: {error}")


def _alive(pid: int, start: int) -> bool:
    """Whether the process `pid` exists and is the one started at `start` (not a reused pid);
    `_Unsure` when /proc cannot tell right now."""
    try:
        return _runner.start_time(pid) == start
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, ValueError, IndexError) as exc:
        raise _Unsure(f"/proc/{pid}/stat", exc) from exc


_SYS_CLOSE_RANGE = {"x86_64": 436, "aarch64": 436}.get(os.uname().machine)
_CLOSE_RANGE_CLOEXEC = 4
_LIBC = ctypes.CDLL(None, use_errno=True)  # this process's libc, already loaded


def _close_range_cloexec() -> bool:
    """close_range(2) marking every descriptor from 3 up close-on-exec; False where the
    kernel or platform lacks it."""
    if _SYS_CLOSE_RANGE is None:
        return False
    result: int = _LIBC.syscall(_SYS_CLOSE_RANGE, 3, 0xFFFFFFFF, _CLOSE_RANGE_CLOEXEC)
    return result == 0


def _cloexec_inherited() -> None:
    """Make close-on-exec each of our descriptors above stderr that a child would inherit (from
    whoever started the daemon, or opened without O_CLOEXEC): a job must never hold the
    daemon's sockets or pipes. Unlike a close action of the spawn, which cannot name a
    descriptor at or above the soft RLIMIT_NOFILE (EBADF), this works whatever its number.
    One `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` does it (Linux ≥ 5.11) without needing a
    descriptor of its own, so a daemon out of descriptors can still start jobs; else the
    descriptors are listed from /proc."""
    if _close_range_cloexec():
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                os.set_inheritable(fd, False)
        except OSError:
            continue  # closed since the listing (it was the listing's own descriptor)


def _utf8_prefix(data: bytes) -> bytes:
    """`data` less a trailing incomplete UTF-8 sequence (read it next time, whole)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        if byte & 0x80 == 0:
            return data
        needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
        return data if back >= needed else data[:-back]
    return data


# Launch errors that the same launch would meet again.
_PERMANENT_SPAWN_ERRORS = frozenset({errno.E2BIG, errno.ENOENT, errno.ENOEXEC, errno.EACCES})


class LocalBackend:
    name = "local"
    describe_batch_size = 1000
    max_start_attempts: int | None = None
    start_budget_s: float | None = None
    log_delivery_s = 0.0  # the runner has written everything once the job has ended

    def __init__(self, settings: LocalSettings, work_dir: Path) -> None:
        self._settings = settings
        self._work_dir = work_dir
        self.max_in_flight = settings.max_concurrency
        self._wake: base.Wake = lambda _job_id: None
        # Runners this process spawned (and so must reap) → their wait status once reaped.
        self._children: dict[str, int | None] = {}
        self._pidfds: dict[str, int] = {}
        self._finished: set[str] = set()
        self._killers: dict[str, asyncio.Task[None]] = {}
        # Runners spawned whose start time could not be read: adopted once `locate` names them.
        self._orphans: set[int] = set()
        self._read_errors: dict[str, int] = {}  # errno name → reads that failed inconclusively
        self._unsure: dict[str, int] = {}  # external id → inconclusive reads in a row
        self._containment = cgroups.Containment(None, "not started")
        # Watches of cgroup.events (EPOLLPRI: the kernel flags each change) of the jobs whose
        # runner has gone while processes remain: each change has the job polled at once.
        self._epoll: select.epoll | None = None
        self._cgroup_fds: dict[str, int] = {}  # external id → its cgroup.events
        self._cgroup_jobs: dict[int, str] = {}  # that descriptor → job id

    @property
    def containment(self) -> cgroups.Containment:
        return self._containment

    async def start(self) -> None:
        # A configuration this daemon cannot honour is said now, not by every job failing.
        if self._settings.run_as == "submitter" and (why := await users.check(RUNNER)):
            raise errors.CannotRunAsSubmitter(why)
        self._work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._work_dir = self._work_dir.resolve()
        self._containment = cgroups.probe(
            enabled=self._settings.cgroup == "auto", root=self._settings.cgroup_root, create=True
        )
        if self._containment.enabled:
            log.info(
                "local.cgroups",
                root=str(self._containment.root),
                kill="cgroup.kill" if self._containment.kill_file else "each member",
            )
        elif self._settings.cgroup == "auto":
            log.warning(
                "local.cgroup_unavailable",
                reason=self._containment.detail,
                fallback="process groups: a job's processes that leave its process group "
                "survive cancel and timeouts, and are not waited for",
            )

    async def close(self) -> None:
        # Jobs keep running: the next daemon adopts them. Only our watches end here.
        for task in self._killers.values():
            task.cancel()
        for external_id in list(self._pidfds):
            self._unwatch(external_id)
        for external_id in list(self._cgroup_fds):
            self._unwatch_cgroup(external_id)
        if self._epoll is not None:
            asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        self._children.clear()

    def set_wake(self, wake: base.Wake) -> None:
        self._wake = wake

    def validate(self, spec: models.JobSpec) -> None:
        if spec.overrides:
            raise errors.InvalidJob("the local backend takes no overrides", "job.overrides")
        # The launch as it will be, with an id and attempt as long as real ones: E2BIG now.
        stand_in = self._work_dir / ("x" * 26) / "999"
        argv, env = self._launch(spec, "x" * 26, 999, stand_in, stand_in)
        size, limit = models.launch_bytes(argv, env), models.launch_limit_bytes()
        if size > limit:
            raise errors.InvalidJob(
                f"the launch would take {size} bytes of arguments and environment (with what "
                f"the daemon passes on), over this host's limit of {limit} (E2BIG)",
                "job",
            )

    def _launch(
        self,
        spec: models.JobSpec,
        job_id: str,
        attempt: int,
        attempt_dir: Path,
        cgroup: Path | None,
        user: users.Identity | None = None,
    ) -> tuple[list[str], dict[str, str]]:
        """The runner's argv and the environment it passes on to the job: run as `user` if
        given, with its HOME, USER, LOGNAME and SHELL instead of the daemon's (unless the job's
        own `env` sets them), in its home directory unless the job names a `cwd`."""
        env = {k: os.environ[k] for k in self._settings.inherit_env if k in os.environ}
        if user is not None:
            for name in users.PASSWD_VARIABLES:
                env.pop(name, None)
            env.update(user.environment())
        env.update(spec.env)
        env.update(ORCHESTRATOR_JOB_ID=job_id, ORCHESTRATOR_ATTEMPT=str(attempt))
        default_cwd = str(attempt_dir) if user is None else user.default_cwd
        argv = [
            sys.executable,
            "-I",
            "-S",
            str(RUNNER),
            *(["--cgroup", str(cgroup)] if cgroup is not None else []),
            *(["--user", user.runner_arg()] if user is not None else []),
            str(attempt_dir),
            spec.cwd or default_cwd,
            str(self._settings.max_output_bytes),
            "--",
            *spec.command,
        ]
        return argv, env

    def partition(self, job: models.Job) -> str:
        return self.name

    def attempt_dir(self, job: models.Job) -> Path:
        return self._work_dir / job.id / str(job.attempt)

    def _new_cgroup(self, job: models.Job) -> Path | None:
        """Where the current attempt runs if this daemon makes cgroups."""
        root = self._containment.root
        return None if root is None else root / f"{job.id}-{job.attempt}"

    @staticmethod
    def _cgroup_of(job: models.Job, runner: _RunnerId) -> Path | None:
        """The attempt's cgroup named in its external id; one not named for this job and
        attempt is not believed (the external id comes from the store, not from the kernel)."""
        if runner.cgroup is None or runner.cgroup.name != f"{job.id}-{job.attempt}":
            return None
        return runner.cgroup

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
        argv, env = self._launch(job.spec, job.id, job.attempt, attempt_dir, cgroup, user)
        # Not O_APPEND: splice(2) refuses such a target. The runner writes from the end.
        write = os.O_WRONLY | os.O_CREAT
        try:
            _cloexec_inherited()
            # posix_spawn (vfork underneath) keeps the event loop's pause to well under a ms.
            pid = os.posix_spawn(  # noqa: ASYNC221 - returns at once, see above
                sys.executable,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(attempt_dir / "stdout"), write, 0o600),
                    (os.POSIX_SPAWN_OPEN, 2, str(attempt_dir / "stderr"), write, 0o600),
                ],
                setsid=True,
            )
        except (OSError, ValueError) as exc:
            # Whatever the launch raises is this attempt's start failure, never an exception
            # that leaves the job in limbo: EAGAIN, ENOMEM, EMFILE (the host is short of
            # something now) are worth a retry; E2BIG, a NUL byte (ValueError), a missing
            # interpreter are not.
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroups.remove(cgroup)
            retryable = isinstance(exc, OSError) and exc.errno not in _PERMANENT_SPAWN_ERRORS
            raise errors.StartFailed(
                f"cannot start the job runner: {exc}", retryable=retryable
            ) from exc
        try:
            external_id = f"{pid}:{_runner.start_time(pid)}"
            if cgroup is not None:
                external_id += f":{cgroup}"
        except (OSError, ValueError, IndexError) as exc:
            # It runs, but cannot be named now; its claim names it when the attempt is settled.
            self._orphans.add(pid)
            raise errors.OutcomeUnknown(
                f"started the job runner (pid {pid}) but cannot read its start time: {exc}"
            ) from exc
        self._children[external_id] = None
        self._watch(external_id, job.id)
        return base.Submitted(
            external_id=external_id,
            state=models.JobState.RUNNING,
            vendor_status="running",
            info={"pid": pid, "dir": str(attempt_dir)}
            | ({"cgroup": str(cgroup)} if cgroup is not None else {})
            | ({"uid": user.uid, "gid": user.gid} if user is not None else {}),
        )

    # -- observe ---------------------------------------------------------------------------

    async def describe(self, jobs: Sequence[models.Job]) -> Mapping[str, base.Observation]:
        observations = {job.external_id: self._observe(job) for job in jobs if job.external_id}
        self._reap_unwatched()
        return observations

    def _observe(self, job: models.Job) -> base.Observation:
        assert job.external_id is not None
        failures = self._unsure.get(job.external_id)
        try:
            observation = self._observe_now(job)
        except _Unsure as exc:
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
        runner = _parse_external_id(external_id)
        if runner.pid in self._orphans:  # a runner of ours named by its claim: ours to reap
            self._orphans.discard(runner.pid)
            self._children[external_id] = None
        cgroup = self._cgroup_of(job, runner)
        exit_file = self.attempt_dir(job) / "exit"
        done = self._read_exit(external_id, exit_file, runner_gone=False)
        # In a cgroup, the end is told once the runner has gone too (it is one of the members).
        if done is None or cgroup is not None:
            if self._runner_running(external_id, runner):
                self._watch(external_id, job.id)  # adopted after a restart, or not watched yet
                return base.Observation(external_id, models.JobState.RUNNING, "running")
            # The runner is gone. It may have written the file just after we looked.
            if done is None:
                done = self._read_exit(external_id, exit_file, runner_gone=True)
            if done is None:
                done = self._runner_outcome(external_id)
        if cgroup is not None:
            if (draining := self._draining(job, cgroup, done)) is not None:
                return draining
            if job.vendor_status == _ORPHANED and done.vendor_status in _UNRECORDED:
                done = base.Observation(
                    external_id,
                    models.JobState.LOST,
                    "vanished",
                    reason="the job's runner ended without recording an exit status; its "
                    "processes ran on (re-adopted) and have ended since: the outcome is unknown",
                )
        self._forget(external_id)
        return done

    def _runner_running(self, external_id: str, runner: _RunnerId) -> bool:
        if external_id in self._children:
            return self._reap(external_id) is None
        return _alive(runner.pid, runner.start)

    def _runner_outcome(self, external_id: str) -> base.Observation:
        """The outcome of an attempt whose runner has gone without recording one: what its wait
        status tells, if it was our child; else nothing (LOST)."""
        status = self._children.get(external_id)
        if status is not None and os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            return base.Observation(
                external_id,
                models.JobState.FAILED,
                "killed",
                reason=f"killed by {signal.Signals(signum).name}",
                exit_code=128 + signum,
            )
        failed = _runner.setup_failure(os.WEXITSTATUS(status)) if status is not None else None
        if failed is not None:
            return base.Observation(
                external_id,
                models.JobState.FAILED,
                "setup_failed",
                reason="the job's runner could not set up its attempt (join its cgroup, claim "
                f"it): {os.strerror(failed)} ({errno.errorcode.get(failed, failed)}); "
                "the job did not run",
            )
        if status is not None:  # our own child: we saw it end, and how
            why = f"exited with status {os.WEXITSTATUS(status)} (its error is in the job's stderr)"
        else:
            why = "was killed while the daemon was down, or the host rebooted"
        return base.Observation(
            external_id,
            models.JobState.LOST,
            "vanished",
            reason=f"the job's runner ended without recording an exit status: it {why}",
        )

    def _draining(
        self, job: models.Job, cgroup: Path, done: base.Observation
    ) -> base.Observation | None:
        """None once the attempt's cgroup is empty (and removed); while it is not, what to say
        of the job (RUNNING), having made sure that what is left ends: stopped if the job's own
        process has ended with its outcome recorded, watched if the runner has gone without."""
        assert job.external_id is not None
        external_id = job.external_id
        try:
            busy = cgroups.populated(cgroup)
            if busy:  # watched from now on, and looked at again: no change after this is missed
                self._watch_cgroup(external_id, job.id, cgroup)
                busy = cgroups.populated(cgroup)
        except (OSError, ValueError) as exc:
            raise _Unsure("cgroup.events", exc) from exc
        if not busy:
            try:
                cgroups.remove(cgroup)
            except OSError as exc:  # left behind; the job has ended all the same
                log.warning("local.cgroup_not_removed", cgroup=str(cgroup), error=exc.strerror)
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

    def _read_exit(
        self, external_id: str, path: Path, *, runner_gone: bool
    ) -> base.Observation | None:
        """The recorded outcome; None while there is none. A file that cannot be read now
        raises `_Unsure`. One that does not parse (the runner replaces it atomically, so only
        a failing disk makes one) is waited on while the runner lives; once it is gone, the
        outcome cannot be established: LOST, saying why."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _Unsure("exit file", exc) from exc
        try:
            result: dict[str, Any] = orjson.loads(data)
            code = int(result["exit_code"])
            killed_by = int(result["signal"]) if result.get("signal") else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if not runner_gone:
                return None
            return base.Observation(
                external_id,
                models.JobState.LOST,
                "unreadable",
                reason=f"the exit file is corrupt ({exc!r}) and its runner has ended",
            )
        reason: str | None
        if result.get("error"):
            reason = str(result["error"])
        elif killed_by:
            reason = f"killed by {signal.Signals(killed_by).name}"
        else:
            reason = None if code == 0 else f"exit code {code}"
        state = models.JobState.SUCCEEDED if code == 0 else models.JobState.FAILED
        info: dict[str, Any] = {k: result[k] for k in ("started_at", "finished_at") if k in result}
        return base.Observation(
            external_id, state, "exited", reason=reason, exit_code=code, info=info
        )

    def _read_failed(self, key: str | None, exc: _Unsure, **context: Any) -> None:
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

    def _reap_unwatched(self) -> None:
        """Reap the runners of ours that no pidfd watches (pidfd_open failed: EMFILE)."""
        for pid in list(self._orphans):
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped = pid
            if reaped:
                self._orphans.discard(pid)
        for external_id in [e for e in self._finished if e not in self._pidfds]:
            if self._reap(external_id) is not None:
                self._finished.discard(external_id)
                self._children.pop(external_id, None)

    # -- stop ------------------------------------------------------------------------------

    async def stop(self, job: models.Job) -> None:
        """SIGTERM to every process of the job's cgroup (else its process group), SIGKILL after
        the grace period."""
        if job.external_id is None:
            return
        runner = _parse_external_id(job.external_id)
        if (cgroup := self._cgroup_of(job, runner)) is not None:
            self._stop_cgroup(job.external_id, job.id, cgroup)
            return
        if job.external_id in self._killers:
            return
        pid = runner.pid
        try:
            if not self._is_runner(job.external_id):
                return
        except _Unsure as exc:
            self._read_failed(job.external_id, exc, job_id=job.id)
            return  # cannot tell whose pid it is now: the poller stops it again next round
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        self._killers[job.external_id] = asyncio.create_task(
            self._kill_after_grace(job.external_id, job.id),
            name=f"local-kill-{job.id}",
        )

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
            self._read_failed(external_id, _Unsure("cgroup.procs", exc), job_id=job_id)
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
            self._read_failed(None, _Unsure("cgroup", exc), job_id=job_id)

    def _is_runner(self, external_id: str) -> bool:
        """Whether the runner (and so its process group) is still there to be signalled. A
        child of ours not yet reaped holds its pid, so no start time needs checking."""
        if external_id in self._children and self._children[external_id] is None:
            return True
        runner = _parse_external_id(external_id)
        return _alive(runner.pid, runner.start)

    async def _kill_after_grace(
        self, external_id: str, job_id: str, cgroup: Path | None = None
    ) -> None:
        await asyncio.sleep(self._settings.kill_grace_s)
        if cgroup is not None:
            self._kill_cgroup(cgroup, job_id)
            return
        while True:
            try:
                alive = self._is_runner(external_id)
                break
            except _Unsure as exc:
                self._read_failed(external_id, exc, job_id=job_id)
                await asyncio.sleep(min(1.0, self._settings.kill_grace_s))
        if alive:
            pid = _parse_external_id(external_id).pid
            log.warning("local.kill", pid=pid, grace_s=self._settings.kill_grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    # -- recovery --------------------------------------------------------------------------

    async def locate(self, job: models.Job) -> base.Located:
        """Did the current attempt's runner start? Claim the attempt to find out: if the claim
        is ours, no runner ever will (it gives up when it finds the claim taken). What cannot
        be read now answers "cannot tell", never "not launched"."""
        try:
            located = self._claim_or_read(self.attempt_dir(job))
        except _Unsure as exc:
            self._read_failed(None, exc, job_id=job.id)
            return base.Located(None, launched=None)
        cgroup = self._new_cgroup(job)
        if cgroup is None:
            return located
        if located.launched is False:  # made before a crash, never joined: not needed now
            with contextlib.suppress(OSError):
                cgroups.remove(cgroup)
        elif located.external_id is not None and cgroup.is_dir():
            return base.Located(f"{located.external_id}:{cgroup}", launched=True)
        return located

    @staticmethod
    def _claim_or_read(attempt_dir: Path) -> base.Located:
        try:
            os.stat(attempt_dir)
        except FileNotFoundError:
            return base.Located(None, launched=False)
        except OSError as exc:
            raise _Unsure("attempt directory", exc) from exc
        tmp = attempt_dir / f"claim.recovery.{os.getpid()}"
        try:
            tmp.write_bytes(orjson.dumps({"pid": None, "by": "recovery"}))
            try:
                os.link(tmp, attempt_dir / "claim")
            except FileExistsError:
                pass
            else:
                return base.Located(None, launched=False)
            data = (attempt_dir / "claim").read_bytes()
        except OSError as exc:
            raise _Unsure("claim file", exc) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        try:
            claim = orjson.loads(data)
            if claim.get("pid") is None:
                return base.Located(None, launched=False)
            return base.Located(f"{int(claim['pid'])}:{int(claim['start_time'])}", launched=True)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _Unsure("claim file", exc) from exc

    def telemetry(self) -> base.Telemetry:
        return base.Telemetry(read_errors=sorted(self._read_errors.items()))

    def can_resubmit(self, job: models.Job) -> bool:
        return False  # `locate` always knows: the attempt's claim file decides

    # -- logs ------------------------------------------------------------------------------

    async def read_logs(self, job: models.Job, cursor: Any) -> base.LogPage:
        try:
            return await asyncio.to_thread(self._read_logs, self.attempt_dir(job), cursor)
        except _Unsure as exc:
            self._read_failed(None, exc, job_id=job.id)
            raise errors.LogsUnavailable(
                f"cannot read the job's {exc.what} right now: {exc.detail}; try again"
            ) from exc

    @staticmethod
    def _read_logs(attempt_dir: Path, cursor: Any) -> base.LogPage:
        offsets: dict[str, int] = dict(cursor or {"stdout": 0, "stderr": 0})
        chunks = []
        for stream in ("stdout", "stderr"):
            try:
                with open(attempt_dir / stream, "rb") as fh:
                    fh.seek(offsets[stream])
                    data = _utf8_prefix(fh.read(_READ_CHUNK))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _Unsure(stream, exc) from exc
            if data:
                offsets[stream] += len(data)
                chunks.append(base.LogChunk(stream, data.decode("utf-8", errors="replace")))
        return base.LogPage(chunks, offsets)

    # -- exit watches (pidfd: the kernel tells us when a runner exits) ----------------------

    def _watch(self, external_id: str, job_id: str) -> None:
        if external_id in self._pidfds:
            return
        pid = _parse_external_id(external_id).pid
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone already, or no pidfd: polling still finds the outcome
        self._pidfds[external_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, external_id, job_id)

    def _exited(self, external_id: str, job_id: str) -> None:
        self._unwatch(external_id)
        if external_id in self._children:  # an adopted runner is not ours to reap
            self._reap(external_id)
        if external_id in self._finished:  # its outcome is recorded; it only needed reaping
            self._finished.discard(external_id)
            self._children.pop(external_id, None)
            return
        self._wake(job_id)

    def _reap(self, external_id: str) -> int | None:
        """Collect our child's wait status if it has exited (None while it runs)."""
        status = self._children.get(external_id)
        if status is not None:
            return status
        pid = _parse_external_id(external_id).pid
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere; the exit file still tells
            status = 0
        else:
            if reaped == 0:
                return None
        self._children[external_id] = status
        return status

    def _unwatch(self, external_id: str) -> None:
        fd = self._pidfds.pop(external_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    # -- cgroup watches (cgroup.events: the kernel flags each change with EPOLLPRI) ---------

    def _watch_cgroup(self, external_id: str, job_id: str, cgroup: Path) -> None:
        """Have the job polled as soon as its cgroup's `populated` changes. Only for jobs
        whose runner has gone (else the runner's pidfd tells): one descriptor each."""
        if external_id in self._cgroup_fds:
            return
        try:
            if self._epoll is None:
                self._epoll = select.epoll()
                asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._cgroups_changed)
            fd = os.open(cgroup / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # gone already, or out of descriptors: polling still finds the end
        try:
            os.pread(fd, 4096, 0)  # read once, so that only a later change is reported
            self._epoll.register(fd, select.EPOLLPRI | select.EPOLLET)
        except OSError:
            os.close(fd)
            return
        self._cgroup_fds[external_id] = fd
        self._cgroup_jobs[fd] = job_id

    def _cgroups_changed(self) -> None:
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            if (job_id := self._cgroup_jobs.get(fd)) is not None:
                self._wake(job_id)

    def _unwatch_cgroup(self, external_id: str) -> None:
        fd = self._cgroup_fds.pop(external_id, None)
        if fd is not None:
            self._cgroup_jobs.pop(fd, None)
            if self._epoll is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
            os.close(fd)

    def _forget(self, external_id: str) -> None:
        """The job's outcome is known: drop everything we hold for it."""
        if (killer := self._killers.pop(external_id, None)) is not None:
            killer.cancel()
        self._unsure.pop(external_id, None)
        self._unwatch_cgroup(external_id)
        if external_id in self._children and self._reap(external_id) is None:
            self._finished.add(external_id)  # still exiting: the pidfd watch reaps it
            return
        self._children.pop(external_id, None)
        self._unwatch(external_id)
