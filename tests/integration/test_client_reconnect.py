"""Clients that outlive a daemon restart: `wait`, `submit --wait`, `watch` and `logs -f` as real
CLI processes while the real daemon is stopped (SIGTERM, or kill -9) and started again. Each
ends with the job's real outcome and shows every change and every line once."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(90)


def cli(daemon: DaemonProcess, *args: str) -> subprocess.Popen[bytes]:
    """An `orchestrator` command talking to `daemon`, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        env={**os.environ, "ORCHESTRATOR__SERVER__SOCKET_PATH": str(daemon.socket_path)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finished(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out.decode(), err.decode()


def wait_for(predicate: object, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def restart(daemon: DaemonProcess, how: int = signal.SIGTERM, down_s: float = 1.0) -> None:
    """Stop the daemon, leave it down a while (clients find nobody), start it again."""
    daemon.stop(how)
    time.sleep(down_s)  # the outage itself, not a wait for something
    daemon.start()


@pytest.fixture
def gate(short_tmp: Path) -> Iterator[tuple[Path, str]]:
    """A file the test creates to let a job go on, and the shell that waits for it (created
    at the end whatever happened, so that no job is left waiting)."""
    path = short_tmp / "go"
    # It also stops when the test's directory goes, so a job can never outlive its test.
    yield path, f'while [ ! -e "{path}" ] && [ -d "{short_tmp}" ]; do sleep 0.05; done'
    path.touch()


def waiting(
    daemon: DaemonProcess, blocked: str, then: str, *options: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """The daemon up, a job blocked at the gate (then `then`), and `orchestrator wait` on it
    with `options`, connected by now."""
    daemon.start()
    with daemon.client() as client:
        job = client.submit({"command": ["sh", "-c", f"{blocked}; {then}"]})
    waiter = cli(daemon, "wait", *options, job["id"])
    time.sleep(0.5)  # let it connect and wait (there is nothing to watch for that)
    return job["id"], waiter


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_wait_outlives_a_restart_and_exits_with_the_jobs_code(
    daemon: DaemonProcess,
    short_tmp: Path,
    how: int,
    gate: tuple[Path, str],
) -> None:
    go, blocked = gate
    job_id, waiter = waiting(daemon, blocked, "exit 7")
    restart(daemon, how)
    go.touch()
    code, _, err = finished(waiter)
    assert code == 7, err
    assert err.splitlines()[-1].startswith(f"{job_id} FAILED exit_code=7")
    assert "trying again for up to 120 s" in err  # it said why it waited


def test_submit_wait_prints_the_id_on_stdout_at_once_and_outlives_a_restart(
    daemon: DaemonProcess,
    short_tmp: Path,
    gate: tuple[Path, str],
) -> None:
    daemon.start()
    go, blocked = gate
    submitter = cli(daemon, "submit", "--wait", "--", "sh", "-c", f"{blocked}; exit 3")
    assert submitter.stdout is not None
    job_id = submitter.stdout.readline().decode().strip()  # before the job ends
    assert len(job_id) == 26, job_id
    restart(daemon)
    go.touch()
    code, out, err = finished(submitter)
    assert (code, out) == (3, ""), err
    assert f"{job_id} FAILED exit_code=3" in err


def read_until(proc: subprocess.Popen[bytes], *texts: bytes, timeout_s: float = 20) -> bytes:
    """What `proc` wrote on stdout until a line holding every one of `texts` (read unbuffered:
    `communicate` gets the rest)."""
    assert proc.stdout is not None
    out, deadline = b"", time.monotonic() + timeout_s
    text = b" and ".join(texts)
    while not any(all(t in line for t in texts) for line in out.splitlines()):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
        assert ready, f"no {text!r} in {out!r}"
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, f"no {text!r} in {out!r}: the output ended"
        out += chunk
    return out


def test_watch_resumes_after_the_last_change_it_saw(
    daemon: DaemonProcess, short_tmp: Path, gate: tuple[Path, str]
) -> None:
    daemon.start()
    go, blocked = gate
    every = cli(daemon, "watch", "--json", "--since", "0")
    with daemon.client() as client:
        job = client.submit({"command": ["sh", "-c", f"{blocked}; exit 0"]})
        one = cli(daemon, "watch", "--json", "--since", "0", job["id"])
        wait_for(lambda: client.get(job["id"])["state"] == "RUNNING", "the job to run")
    # Both are following: each has printed what it was to see by now.
    before_one = read_until(one, b'"to":"RUNNING"')
    before_every = read_until(every, job["id"].encode(), b'"to":"RUNNING"')
    daemon.stop(signal.SIGTERM)
    go.touch()  # it ends while no daemon is there to see it
    time.sleep(1.0)
    daemon.start()
    with daemon.client() as client:
        client.wait(job["id"])
        other = client.submit({"command": ["true"]})
        client.wait(other["id"])
    code, out, err = finished(one)
    events = [orjson.loads(line) for line in (before_one.decode() + out).splitlines()]
    assert code == 0, err
    assert [(e["from"], e["to"]) for e in events] == [
        (None, "QUEUED"),
        ("QUEUED", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    every.send_signal(signal.SIGINT)
    _, out, _ = finished(every)
    seen = [orjson.loads(line) for line in (before_every.decode() + out).splitlines()]
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(set(seqs))  # none twice, in order
    assert ("RUNNING", "SUCCEEDED", job["id"]) in [(e["from"], e["to"], e["job_id"]) for e in seen]
    assert [e["to"] for e in seen if e["job_id"] == other["id"]] == [
        "QUEUED",
        "RUNNING",
        "SUCCEEDED",
    ]


def test_logs_follow_resumes_after_the_last_whole_page(
    daemon: DaemonProcess,
    short_tmp: Path,
    gate: tuple[Path, str],
) -> None:
    daemon.start()
    go, blocked = gate
    script = (
        f"for i in 1 2 3; do echo line $i; done; {blocked}; for i in 4 5 6; do echo line $i; done"
    )
    with daemon.client() as client:
        job = client.submit({"command": ["sh", "-c", script]})
    follower = cli(daemon, "logs", "-f", job["id"])
    before = read_until(follower, b"line 3")  # it is following
    restart(daemon)
    go.touch()
    code, out, err = finished(follower)
    assert code == 0, err
    assert before.decode() + out == "".join(f"line {i}\n" for i in range(1, 7))


def test_watch_since_replays_what_came_before(daemon: DaemonProcess) -> None:
    daemon.start()
    with daemon.client() as client:
        first = client.submit({"command": ["true"]})
        client.wait(first["id"])
        second = client.submit({"command": ["false"]})
        client.wait(second["id"])
    dump = cli(daemon, "watch", "--json", first["id"])
    _, out, _ = finished(dump)  # a finished job: its history, then the end
    history = [orjson.loads(line) for line in out.splitlines()]
    assert history == []  # without --since only what comes next: nothing, it has ended
    replay = cli(daemon, "watch", "--json", "--since", "0", second["id"])
    _, out, _ = finished(replay)
    replayed = [orjson.loads(line) for line in out.splitlines()]
    assert [(e["from"], e["to"]) for e in replayed] == [
        (None, "QUEUED"),
        ("QUEUED", "RUNNING"),
        ("RUNNING", "FAILED"),
    ]
    assert replayed[-1]["failure"] == "user"


def test_without_reconnecting_a_restart_ends_wait_with_255_not_the_jobs_code(
    daemon: DaemonProcess,
    short_tmp: Path,
    gate: tuple[Path, str],
) -> None:
    go, blocked = gate
    _, waiter = waiting(daemon, blocked, "exit 1", "--reconnect-s", "0")
    daemon.stop(signal.SIGTERM)
    code, _, err = finished(waiter)
    go.touch()
    assert code == 255, err
    assert "shutting_down" in err or "cannot reach" in err


def test_a_daemon_that_does_not_come_back_ends_wait_with_255_after_reconnect_s(
    daemon: DaemonProcess,
    short_tmp: Path,
    gate: tuple[Path, str],
) -> None:
    go, blocked = gate
    _, waiter = waiting(daemon, blocked, "exit 0", "--reconnect-s", "2")
    daemon.stop(signal.SIGTERM)
    started = time.monotonic()
    code, _, err = finished(waiter)
    go.touch()
    assert code == 255, err
    assert "cannot reach" in err
    assert time.monotonic() - started >= 1.5  # it did wait for the daemon
