"""examples/aws-offline as a newcomer runs it: `moto_up.py`, then `run.sh`, then the CLI.

Real processes all the way: the example's moto server, the daemon that `run.sh` starts on the
config `moto_up.py` wrote, and `orchestrator check` / `submit --wait` as a user types them.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import orjson
import pytest

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aws-offline"
START_TIMEOUT_S = 60.0  # moto's start and the resources, on a loaded 2-core machine
JOB_TIMEOUT_S = 60.0


def clean_env() -> dict[str, str]:
    """This environment without AWS or orchestrator settings of its own (profiles, endpoints,
    a config): the example must bring everything it needs."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ORCHESTRATOR", "MOTO_"))
    }
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


class Child:
    """A process in a session (and process group) of its own, its output in a file."""

    def __init__(self, argv: Sequence[str], log: Path, env: Mapping[str, str]) -> None:
        self.argv = list(argv)
        self.log = log
        self._out: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            self.argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no line {prefix!r} within {timeout_s} s:\n{self.output()}")

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, and the exit status; then no process of its group may be left."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        finally:
            self._out.close()
            self._reap_group(timeout_s)

    def _reap_group(self, timeout_s: float) -> None:
        pgid = self.proc.pid  # a session leader: its group's id is its pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)
        raise AssertionError(f"processes of {self.argv} outlived it (killed)")


@pytest.fixture
def example_dir(short_tmp: Path) -> Path:
    return short_tmp / "aws"


@pytest.fixture
def moto_up(example_dir: Path, short_tmp: Path) -> Iterator[tuple[Child, dict[str, str]]]:
    """`moto_up.py` running, and the variables it printed."""
    argv = [sys.executable, str(EXAMPLE / "moto_up.py"), "--port", "0", "--dir", str(example_dir)]
    child = Child(argv, short_tmp / "moto_up.out", clean_env())
    try:
        line = child.wait_for_line("export AWS_ENDPOINT_URL=", START_TIMEOUT_S)
        words = shlex.split(line)
        exports = dict(word.split("=", 1) for word in words[1:])
        yield child, exports
    finally:
        status = child.stop()
    assert status == 0, child.output()
    assert not (example_dir / "env.sh").exists(), "env.sh outlived its moto server"


def cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )


def test_moto_up_then_run_sh_run_an_ecs_and_a_batch_job(
    moto_up: tuple[Child, dict[str, str]], example_dir: Path, short_tmp: Path
) -> None:
    server, exports = moto_up
    assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert exports["AWS_DEFAULT_REGION"] == "us-east-1"
    config = Path(exports["ORCHESTRATOR_CONFIG"])
    assert config == example_dir / "orchestrator.toml"
    env = {**clean_env(), **exports}

    check = cli(env, "check", "--config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert ", 0 failing" in check.stdout, check.stdout
    for name in ("ecs.cluster", "ecs.logs", "batch.queue", "batch.logs"):
        assert name in check.stdout, check.stdout

    daemon = Child(
        ["sh", str(EXAMPLE / "run.sh"), str(example_dir)],
        short_tmp / "daemon.log",
        {**clean_env(), "PYTHON": sys.executable},  # run.sh takes the rest from env.sh
    )
    submits: dict[str, subprocess.Popen[str]] = {}
    jobs = {}
    try:
        ping = cli(env, "ping", "--wait-s", str(START_TIMEOUT_S))
        assert ping.returncode == 0, ping.stderr + daemon.output()
        submit = [sys.executable, "-m", "orchestrator", "submit", "--wait", "--backend"]
        for backend in ("ecs", "batch"):  # both at once: the two jobs run side by side
            submits[backend] = subprocess.Popen(
                [*submit, backend, "--", "echo", "hi"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        for backend, proc in submits.items():
            out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
            assert proc.returncode == 0, f"{backend}: {out}{err}\n{daemon.output()}"
            status = cli(env, "status", "--json", out.strip())
            assert status.returncode == 0, status.stderr
            jobs[backend] = orjson.loads(status.stdout)
    finally:
        for proc in submits.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        daemon_status = daemon.stop()
    assert daemon_status == 0, daemon.output()
    assert {b: (j["backend"], j["state"]) for b, j in jobs.items()} == {
        "ecs": ("ecs", "SUCCEEDED"),
        "batch": ("batch", "SUCCEEDED"),
    }
    assert jobs["ecs"]["exit_code"] == 0
    assert jobs["ecs"]["external_id"].startswith("arn:aws:ecs:us-east-1:")
    assert server.proc.poll() is None, server.output()
