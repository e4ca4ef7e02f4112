"""The embedded backend: each job is a subprocess on this host.

Each attempt runs under `_runner.py`, a small parent in its own process group that records the
job's exit status in the attempt's directory, beside its stdout and stderr. The external id is
`PID:START_TIME` of that runner, so a restarted daemon re-adopts a process only if both still
match, and learns the outcome of one that ended while it was down from the exit file.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def _alive(pid: int, start: int) -> bool:
    """Whether the process `pid` exists and is the one started at `start` (not a reused pid)."""
    try:
        return _runner.start_time(pid) == start
    except (OSError, ValueError, IndexError):
        return False


def _inheritable_fds() -> list[int]:
    """Our descriptors above stderr that a child would inherit (event-loop internals opened
    without close-on-exec): a job must never hold the daemon's sockets or pipes."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                fds.append(fd)
        except OSError:
            continue  # closed since the listing (it was the listing's own descriptor)
    return fds


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
        attempt_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
            "--",
            *job.spec.command,
        ]
        append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            # posix_spawn (vfork underneath) keeps the event loop's pause to well under a ms.
            pid = os.posix_spawn(  # noqa: ASYNC221 - returns at once, see above
                sys.executable,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(attempt_dir / "stdout"), append, 0o600),
                    (os.POSIX_SPAWN_OPEN, 2, str(attempt_dir / "stderr"), append, 0o600),
                    *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()),
                ],
                setsid=True,
            )
        except OSError as exc:  # EAGAIN, ENOMEM: the host is short of something right now
            raise errors.StartFailed(f"cannot start the job runner: {exc}", retryable=True) from exc
        external_id = f"{pid}:{_runner.start_time(pid)}"
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
        return {job.external_id: self._observe(job) for job in jobs if job.external_id}

    def _observe(self, job: models.Job) -> base.Observation:
        assert job.external_id is not None
        external_id = job.external_id
        exit_file = self.attempt_dir(job) / "exit"
        if (done := self._read_exit(external_id, exit_file)) is not None:
            return done
        if external_id in self._children:
            status = self._reap(external_id)
            if status is None:
                return base.Observation(external_id, models.JobState.RUNNING, "running")
        elif _alive(*_parse_external_id(external_id)):
            self._watch(external_id, job.id)  # adopted after a restart
            return base.Observation(external_id, models.JobState.RUNNING, "running")
        else:
            status = None
        # The runner is gone. It may have written the file just after we looked.
        if (done := self._read_exit(external_id, exit_file)) is not None:
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
        return base.Observation(
            external_id,
            models.JobState.LOST,
            "vanished",
            reason="the job's runner ended without recording an exit status "
            "(killed while the daemon was down, or the host rebooted)",
        )

    def _read_exit(self, external_id: str, path: Path) -> base.Observation | None:
        try:
            result: dict[str, Any] = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            return base.Observation(
                external_id, models.JobState.LOST, "unreadable", reason=f"exit file: {exc}"
            )
        self._forget(external_id)
        code = int(result["exit_code"])
        reason: str | None
        if result.get("error"):
            reason = str(result["error"])
        elif result.get("signal"):
            reason = f"killed by {signal.Signals(int(result['signal'])).name}"
        else:
            reason = None if code == 0 else f"exit code {code}"
        state = models.JobState.SUCCEEDED if code == 0 else models.JobState.FAILED
        info = {"finished_at": result["finished_at"]} if "finished_at" in result else {}
        return base.Observation(
            external_id, state, "exited", reason=reason, exit_code=code, info=info
        )

    # -- stop ------------------------------------------------------------------------------

    async def stop(self, job: models.Job) -> None:
        """SIGTERM to the job's process group, SIGKILL after the grace period."""
        if job.external_id is None or job.external_id in self._killers:
            return
        pid, start = _parse_external_id(job.external_id)
        if not _alive(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        self._killers[job.external_id] = asyncio.create_task(
            self._kill_after_grace(job.external_id, pid, start),
            name=f"local-kill-{job.id}",
        )

    async def _kill_after_grace(self, external_id: str, pid: int, start: int) -> None:
        await asyncio.sleep(self._settings.kill_grace_s)
        if _alive(pid, start):
            log.warning("local.kill", pid=pid, grace_s=self._settings.kill_grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    # -- recovery --------------------------------------------------------------------------

    async def locate(self, job: models.Job) -> base.Located:
        """Did the current attempt's runner start? Claim the attempt to find out: if the claim
        is ours, no runner ever will (it gives up when it finds the claim taken)."""
        attempt_dir = self.attempt_dir(job)
        if not attempt_dir.is_dir():
            return base.Located(None, launched=False)
        tmp = attempt_dir / f"claim.recovery.{os.getpid()}"
        tmp.write_bytes(orjson.dumps({"pid": None, "by": "recovery"}))
        try:
            os.link(tmp, attempt_dir / "claim")
        except FileExistsError:
            claim = orjson.loads((attempt_dir / "claim").read_bytes())
        else:
            return base.Located(None, launched=False)
        finally:
            tmp.unlink()
        if claim.get("pid") is None:
            return base.Located(None, launched=False)
        return base.Located(f"{claim['pid']}:{claim['start_time']}", launched=True)

    def telemetry(self) -> base.Telemetry:
        return base.Telemetry()

    def can_resubmit(self, job: models.Job) -> bool:
        return False  # `locate` always knows: the attempt's claim file decides

    # -- logs ------------------------------------------------------------------------------

    async def read_logs(self, job: models.Job, cursor: Any) -> base.LogPage:
        return await asyncio.to_thread(self._read_logs, self.attempt_dir(job), cursor)

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
        if external_id in self._children and self._reap(external_id) is None:
            self._finished.add(external_id)  # still exiting: the pidfd watch reaps it
            return
        self._children.pop(external_id, None)
        self._unwatch(external_id)
