"""Run the real daemon for tests: in this process (fast) or as `orchestrator serve` (real
signals, real crashes, real restarts)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from orchestrator import errors, views
from orchestrator.client import Client, SyncClient
from orchestrator.daemon import Daemon
from orchestrator.settings import Settings

STARTUP_TIMEOUT_S = 15.0


@contextlib.asynccontextmanager
async def running(settings: Settings, **kwargs: Any) -> AsyncIterator[Daemon]:
    """An in-process daemon serving on `settings.server.socket_path` until the block ends."""
    daemon = Daemon(settings, **kwargs)
    task = asyncio.create_task(daemon.run(), name="daemon-under-test")
    try:
        await _until_ready(settings.server.socket_path, task)
        yield daemon
    finally:
        daemon.request_stop()
        async with asyncio.timeout(15):
            await task


async def _until_ready(socket_path: Path, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if task.done():
            task.result()  # raise what stopped it
            raise AssertionError("the daemon stopped during start-up")
        try:
            async with Client(socket_path) as client:
                await client.ping()
                return
        except errors.RemoteError:
            return  # it answered, if only to refuse us: it is up
        except errors.DaemonUnreachable:
            await asyncio.sleep(0.02)
    raise AssertionError(f"the daemon did not answer on {socket_path} within {STARTUP_TIMEOUT_S}s")


def settings_env(settings_dict: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Settings sections as `ORCHESTRATOR__SECTION__KEY` variables."""
    env = {}
    for section, values in settings_dict.items():
        for key, value in values.items():
            text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
            env[f"ORCHESTRATOR__{section.upper()}__{key.upper()}"] = str(text)
    return env


class DaemonProcess:
    """`orchestrator serve` as a child process, with its log in `root/daemon-N.log`; `wrapper`
    runs it under another command (e.g. `prlimit --nofile=64:64 --`), `pass_fds` are left open
    in it."""

    def __init__(
        self,
        root: Path,
        env: Mapping[str, str] | None = None,
        *,
        wrapper: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.root = root
        self.wrapper = list(wrapper)
        self.pass_fds = tuple(pass_fds)
        self.socket_path = root / "o.sock"
        self.store_path = root / "state" / "orchestrator.db"
        self.env = {
            **os.environ,
            "ORCHESTRATOR__SERVER__SOCKET_PATH": str(self.socket_path),
            "ORCHESTRATOR__STORE__PATH": str(self.store_path),
            "ORCHESTRATOR__STORE__SYNCHRONOUS": "NORMAL",
            "ORCHESTRATOR__POLLER__BASE_S": "0.05",
            "ORCHESTRATOR__POLLER__CAP_S": "0.5",
            "ORCHESTRATOR__LOGGING__FORMAT": "json",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.root / f"daemon-{self.starts}.log"

    def start(self, extra_env: Mapping[str, str] | None = None, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "orchestrator", "serve"],
                env={**self.env, **(extra_env or {})},
                pass_fds=self.pass_fds,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                with SyncClient(self.socket_path, timeout_s=5) as client:
                    client.call("ping")
                    return
            except errors.DaemonUnreachable:
                time.sleep(0.02)
        raise AssertionError(f"daemon not ready in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Send `signum` and wait for the exit; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def wait_exit(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON log line of the current run."""
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                if isinstance(value := orjson.loads(line), dict):
                    out.append(value)
        return out

    def client(self) -> SyncClient:
        return SyncClient(self.socket_path, timeout_s=30)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """An `orchestrator` command run to its end against this daemon, its output kept."""
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


async def until_state(client: Client, job_id: str, state: str) -> None:
    """Return once the job has reached `state` (watched, not polled)."""
    async for reply in client.watch(job_id):
        current = reply.get("event", {}).get("to") or reply.get("job", {}).get("state")
        if current == state:
            return
    raise AssertionError(f"job {job_id} ended without reaching {state}")


def accepted(result: views.Submitted | errors.RemoteError) -> views.Submitted:
    """One result of `Client.submit_many` that must be an accepted job, not a refusal."""
    assert not isinstance(result, errors.RemoteError), result
    return result
