"""`orchestrator serve` as a real process: SIGTERM, kill -9, restarts, crash points. Every job
accepted before a restart ends with its true outcome, and none runs twice."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.client import SyncClient
from tests.support.daemon import DaemonProcess
from tests.support.keeper import keeper_pids

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(short_tmp, env={"ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": "3"})
    yield proc
    proc.close()


def wait_for(predicate: object, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def ran_log(root: Path) -> list[str]:
    path = root / "ran.log"
    return path.read_text().split() if path.exists() else []


def job_script(root: Path, sleep_s: float, exit_code: int) -> list[str]:
    """A job that records each run of itself, then sleeps and exits with `exit_code`."""
    return [
        "sh",
        "-c",
        f'echo "$ORCHESTRATOR_JOB_ID" >> {root}/ran.log; sleep {sleep_s}; exit {exit_code}',
    ]


def test_sigterm_mid_flight_then_restart_accounts_for_every_job_once(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    daemon.start()
    with daemon.client() as client:
        expected = {}
        for i in range(12):
            job = client.submit({"command": job_script(short_tmp, 0.5, i % 4), "name": f"j{i}"})
            expected[job["id"]] = i % 4
        wait_for(lambda: len(ran_log(short_tmp)) >= 3, what="the first jobs to run")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    events = [e["event"] for e in daemon.log_events()]
    assert "daemon.stopping" in events
    assert events[-1] == "daemon.stopped"

    daemon.start()
    with daemon.client() as client:
        finals = {job_id: client.wait(job_id) for job_id in expected}
    assert {job_id: job["exit_code"] for job_id, job in finals.items()} == expected
    assert all(
        job["state"] == ("SUCCEEDED" if expected[job["id"]] == 0 else "FAILED")
        for job in finals.values()
    )
    assert sorted(ran_log(short_tmp)) == sorted(expected)  # each ran exactly once
    with daemon.client() as client:
        attempts = [len(client.get(job_id, history=True)["attempts"]) for job_id in expected]
    assert attempts == [1] * len(expected)


def test_job_that_finished_while_the_daemon_was_down_reports_its_real_exit_code(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    daemon.start()
    with daemon.client() as client:
        job = client.submit({"command": job_script(short_tmp, 0.3, 7)})
        wait_for(lambda: ran_log(short_tmp), what="the job to start")
        pid = client.get(job["id"])["info"]["pid"]
    daemon.kill()
    # The keeper reaps it at once: no /proc entry once it has ended, and nobody wrote a file.
    wait_for(
        lambda: not Path(f"/proc/{pid}").exists(), what="the job to end while the daemon is down"
    )
    assert not Path(job_dir(daemon, job["id"]), "1", "exit").exists()
    daemon.start()
    with daemon.client() as client:
        final = client.wait(job["id"])
    assert (final["state"], final["exit_code"]) == ("FAILED", 7)


def test_job_still_running_at_restart_is_adopted_and_finishes(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    daemon.start()
    with daemon.client() as client:
        job = client.submit({"command": job_script(short_tmp, 1.5, 5)})
        wait_for(lambda: ran_log(short_tmp), what="the job to start")
    daemon.kill()
    daemon.start()
    with daemon.client() as client:
        assert client.get(job["id"])["state"] == "RUNNING"
        final = client.wait(job["id"])
    assert (final["state"], final["exit_code"]) == ("FAILED", 5)
    assert ran_log(short_tmp) == [job["id"]]


def test_job_whose_keeper_died_with_the_host_becomes_lost_with_a_reason(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    daemon.start()
    with daemon.client() as client:
        job = client.submit({"command": job_script(short_tmp, 60, 0)})
        wait_for(lambda: ran_log(short_tmp), what="the job to start")
        pid = client.get(job["id"])["info"]["pid"]
    daemon.kill()
    # As if the host rebooted: the keeper, holder of every exit status, and the job both go.
    (keeper,) = keeper_pids(job_dir(daemon, job["id"]).parent)
    os.kill(keeper, signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the job to die")
    daemon.start()
    with daemon.client() as client:
        final = client.wait(job["id"])
        later = client.submit({"command": ["sh", "-c", "exit 4"]})
        after = client.wait(later["id"])
    assert final["state"] == "LOST"
    assert final["reason"] is not None
    assert "keeper that ran the job ended" in final["reason"]
    assert (after["state"], after["exit_code"]) == ("FAILED", 4)  # a new keeper runs the next


@pytest.mark.parametrize(
    "point",
    ["dispatch.after_attempt_recorded", "dispatch.after_submit", "poller.before_transition"],
)
def test_crash_at_each_dispatch_point_runs_the_job_exactly_once(
    daemon: DaemonProcess, short_tmp: Path, point: str
) -> None:
    daemon.start(extra_env={"ORCHESTRATOR_CRASH_AT": point})
    with SyncClient(daemon.socket_path, timeout_s=10) as client:
        job = client.submit({"command": job_script(short_tmp, 0.2, 3)})
    assert daemon.wait_exit() == 137
    assert f"crash point {point} reached" in daemon.log()
    daemon.start()
    with daemon.client() as client:
        final = client.wait(job["id"])
    assert (final["state"], final["exit_code"]) == ("FAILED", 3)
    assert ran_log(short_tmp) == [job["id"]]


def test_crash_before_a_retry_is_recorded_retries_once_after_the_restart(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    """The first attempt failed with an exit code its policy retries, and the daemon died
    before recording the retry: the restarted one finds the attempt's end again (the keeper
    kept it) and retries it once — the job runs twice in all, not once, not three times."""
    daemon.start(extra_env={"ORCHESTRATOR_CRASH_AT": "poller.before_retry"})
    log = short_tmp / "ran.log"
    command = ["sh", "-c", f'echo run >> {log}; test "$(wc -l < {log})" -ge 2 || exit 75']
    spec = {"command": command, "retry": {"exit_codes": [75], "backoff_s": 0}}
    with SyncClient(daemon.socket_path, timeout_s=10) as client:
        job = client.submit(spec)
    assert daemon.wait_exit() == 137
    assert "crash point poller.before_retry reached" in daemon.log()
    daemon.start()
    with daemon.client() as client:
        final = client.wait(job["id"])
        attempts = client.get(job["id"], history=True)["attempts"]
    assert (final["state"], final["attempt"]) == ("SUCCEEDED", 2)
    assert [a["outcome"] for a in attempts] == ["failed (user): exit code 75", "submitted"]
    assert log.read_text().split() == ["run", "run"]


def job_dir(daemon: DaemonProcess, job_id: str) -> Path:
    return daemon.store_path.parent / "jobs" / job_id
