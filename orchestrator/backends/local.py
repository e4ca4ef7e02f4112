"""The embedded backend: each job is a subprocess on this host.

Each attempt runs under `_runner.py`, a small parent in its own process group that records the
job's exit status in the attempt's directory, beside its stdout and stderr. The external id is
`PID:START_TIME` of that runner, so a restarted daemon re-adopts a process only if both still
match, and learns the outcome of one that ended while it was down from the exit file.

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
import errno
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

from orchestrator import errors, models
from orchestrator.backends import _runner, base
from orchestrator.settings import LocalSettings

log = structlog.get_logger("orchestrator.backends.local")

RUNNER = Path(_runner.__file__)
_READ_CHUNK = 64 * 1024


def _parse_external_id(external_id: str) -> tuple[int, int]:
    pid, start = external_id.split(":", 1)
    return int(pid), int(start)


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


def _cloexec_inherited() -> None:
    """Make close-on-exec each of our descriptors above stderr that a child would inherit (from
    whoever started the daemon, or opened without O_CLOEXEC): a job must never hold the
    daemon's sockets or pipes. Unlike a close action of the spawn, which cannot name a
    descriptor at or above the soft RLIMIT_NOFILE (EBADF), this works whatever its number."""
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

    async def start(self) -> None:
        self._work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._work_dir = self._work_dir.resolve()

    async def close(self) -> None:
        # Jobs keep running: the next daemon adopts them. Only our watches end here.
        for task in self._killers.values():
            task.cancel()
        for external_id in list(self._pidfds):
            self._unwatch(external_id)
        self._children.clear()

    def set_wake(self, wake: base.Wake) -> None:
        self._wake = wake

    def validate(self, spec: models.JobSpec) -> None:
        if spec.overrides:
            raise errors.InvalidJob("the local backend takes no overrides", "job.overrides")

    def partition(self, job: models.Job) -> str:
        return self.name

    def attempt_dir(self, job: models.Job) -> Path:
        return self._work_dir / job.id / str(job.attempt)

    # -- submit ----------------------------------------------------------------------------

    async def submit(self, job: models.Job) -> base.Submitted:
        attempt_dir = self.attempt_dir(job)
        try:
            attempt_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # ENOSPC, EIO: nothing started
            raise errors.StartFailed(
                f"cannot create the job's directory {attempt_dir}: {exc.strerror}", retryable=True
            ) from exc
        env = {k: os.environ[k] for k in self._settings.inherit_env if k in os.environ}
        env.update(job.spec.env)
        env.update(ORCHESTRATOR_JOB_ID=job.id, ORCHESTRATOR_ATTEMPT=str(job.attempt))
        cwd = job.spec.cwd or str(attempt_dir)
        argv = [
            sys.executable,
            "-I",
            "-S",
            str(RUNNER),
            str(attempt_dir),
            cwd,
            str(self._settings.max_output_bytes),
            "--",
            *job.spec.command,
        ]
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
        except OSError as exc:  # EAGAIN, ENOMEM, EMFILE: the host is short of something now
            raise errors.StartFailed(f"cannot start the job runner: {exc}", retryable=True) from exc
        try:
            external_id = f"{pid}:{_runner.start_time(pid)}"
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
            info={"pid": pid, "dir": str(attempt_dir)},
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
        pid, start = _parse_external_id(external_id)
        if pid in self._orphans:  # a runner of ours named by its claim: ours to reap
            self._orphans.discard(pid)
            self._children[external_id] = None
        exit_file = self.attempt_dir(job) / "exit"
        if (done := self._read_exit(external_id, exit_file, runner_gone=False)) is not None:
            return done
        if external_id in self._children:
            status = self._reap(external_id)
            running = status is None
        else:
            status = None
            running = _alive(pid, start)
        if running:
            self._watch(external_id, job.id)  # adopted after a restart, or not watched yet
            return base.Observation(external_id, models.JobState.RUNNING, "running")
        # The runner is gone. It may have written the file just after we looked.
        if (done := self._read_exit(external_id, exit_file, runner_gone=True)) is not None:
            return done
        self._forget(external_id)
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
                reason=f"the job's runner could not claim its attempt: {os.strerror(failed)} "
                f"({errno.errorcode.get(failed, failed)}); the job did not run",
            )
        return base.Observation(
            external_id,
            models.JobState.LOST,
            "vanished",
            reason="the job's runner ended without recording an exit status "
            "(killed while the daemon was down, or the host rebooted)",
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
            self._forget(external_id)
            return base.Observation(
                external_id,
                models.JobState.LOST,
                "unreadable",
                reason=f"the exit file is corrupt ({exc!r}) and its runner has ended",
            )
        self._forget(external_id)
        reason: str | None
        if result.get("error"):
            reason = str(result["error"])
        elif killed_by:
            reason = f"killed by {signal.Signals(killed_by).name}"
        else:
            reason = None if code == 0 else f"exit code {code}"
        state = models.JobState.SUCCEEDED if code == 0 else models.JobState.FAILED
        info = {"finished_at": result["finished_at"]} if "finished_at" in result else {}
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
        """SIGTERM to the job's process group, SIGKILL after the grace period."""
        if job.external_id is None or job.external_id in self._killers:
            return
        pid, _ = _parse_external_id(job.external_id)
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

    def _is_runner(self, external_id: str) -> bool:
        """Whether the runner (and so its process group) is still there to be signalled. A
        child of ours not yet reaped holds its pid, so no start time needs checking."""
        if external_id in self._children and self._children[external_id] is None:
            return True
        return _alive(*_parse_external_id(external_id))

    async def _kill_after_grace(self, external_id: str, job_id: str) -> None:
        await asyncio.sleep(self._settings.kill_grace_s)
        while True:
            try:
                alive = self._is_runner(external_id)
                break
            except _Unsure as exc:
                self._read_failed(external_id, exc, job_id=job_id)
                await asyncio.sleep(min(1.0, self._settings.kill_grace_s))
        if alive:
            pid, _ = _parse_external_id(external_id)
            log.warning("local.kill", pid=pid, grace_s=self._settings.kill_grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    # -- recovery --------------------------------------------------------------------------

    async def locate(self, job: models.Job) -> base.Located:
        """Did the current attempt's runner start? Claim the attempt to find out: if the claim
        is ours, no runner ever will (it gives up when it finds the claim taken). What cannot
        be read now answers "cannot tell", never "not launched"."""
        try:
            return self._claim_or_read(self.attempt_dir(job))
        except _Unsure as exc:
            self._read_failed(None, exc, job_id=job.id)
            return base.Located(None, launched=None)

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
        pid, _ = _parse_external_id(external_id)
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
        pid, _ = _parse_external_id(external_id)
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

    def _forget(self, external_id: str) -> None:
        """The job's outcome is known: drop everything we hold for it."""
        if (killer := self._killers.pop(external_id, None)) is not None:
            killer.cancel()
        self._unsure.pop(external_id, None)
        if external_id in self._children and self._reap(external_id) is None:
            self._finished.add(external_id)  # still exiting: the pidfd watch reaps it
            return
        self._children.pop(external_id, None)
        self._unwatch(external_id)
