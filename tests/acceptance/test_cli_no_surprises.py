"""The CLI with no surprises (issue #14): what a script captures, options that are applied or
refused but never ignored, exit codes a job's result cannot be confused with, the socket a
configuration names, stopping the right daemon. Real `orchestrator` processes against a real
`orchestrator serve`."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.acceptance.test_cli import cli
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(90)


def status(daemon: DaemonProcess, job_id: str) -> dict[str, object]:
    shown = cli(daemon, "status", "--json", job_id)
    assert shown.returncode == 0, shown.stderr
    job: dict[str, object] = orjson.loads(shown.stdout)
    return job


def stored_spec(daemon: DaemonProcess, job_id: str) -> dict[str, object]:
    with sqlite3.connect(daemon.store_path) as conn:
        (spec,) = conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
    conn.close()
    found: dict[str, object] = orjson.loads(spec)
    return found


def test_submit_wait_gives_a_script_the_id_on_stdout_and_the_outcome_on_stderr(
    daemon: DaemonProcess,
) -> None:
    done = cli(daemon, "submit", "--wait", "--", "sh", "-c", "echo to-the-log; exit 4")
    job_id = done.stdout.strip()
    assert len(job_id) == 26
    assert done.stdout == job_id + "\n"  # nothing else: ID=$(orchestrator submit --wait …)
    assert done.returncode == 4
    assert done.stderr.strip() == f"{job_id} FAILED exit_code=4 failure=user (exit code 4)"


def test_a_job_that_timed_out_exits_with_its_code_never_0(daemon: DaemonProcess) -> None:
    done = cli(daemon, "submit", "--wait", "--timeout-s", "0.5", "--", "sleep", "30")
    assert done.returncode == 143, done.stderr  # its own end: killed by our SIGTERM
    assert "FAILED exit_code=143 failure=timeout" in done.stderr


def test_exit_codes_cannot_be_taken_for_one_another() -> None:
    """`wait`'s code for every kind of end (what a platform reports, not only what a local
    job can do): 0 only for SUCCEEDED; a failed job that exited 0 (an ECS container that
    exits 0 on the SIGTERM of a timeout) or has no code is 1; a job's own 255 is 1, since
    255 is "the outcome could not be learned"."""
    from orchestrator.cli import EXIT_OUTCOME_UNKNOWN, _job_exit_code

    cases = [
        ("SUCCEEDED", 0, 0),
        ("SUCCEEDED", None, 0),
        ("FAILED", 3, 3),
        ("FAILED", 0, 1),
        ("FAILED", None, 1),
        ("CANCELLED", 0, 1),
        ("CANCELLED", 143, 143),
        ("LOST", None, 1),
        ("FAILED", 255, 1),
    ]
    for state, code, expected in cases:
        assert _job_exit_code({"state": state, "exit_code": code}) == expected, (state, code)
    assert EXIT_OUTCOME_UNKNOWN == 255


def test_cancel_of_a_finished_job_says_so_and_exits_1(daemon: DaemonProcess) -> None:
    job_id = cli(daemon, "submit", "--wait", "--", "true").stdout.strip()
    cancelled = cli(daemon, "cancel", job_id)
    assert cancelled.returncode == 1
    assert cancelled.stderr.strip() == f"orchestrator: {job_id} had already ended (SUCCEEDED)"
    # Cancelling a cancelled job again is no error: it is what was asked.
    queued = cli(daemon, "submit", "--queue-timeout-s", "60", "--", "sleep", "30").stdout.strip()
    assert cli(daemon, "cancel", queued).returncode == 0
    again = cli(daemon, "cancel", queued)
    assert again.returncode == 0, again.stderr
    waited = cli(daemon, "wait", queued)
    assert waited.returncode not in (0, 255)
    assert "CANCELLED" in waited.stderr


@pytest.mark.parametrize("value", ["-1", "0", "abc", "nan"])
def test_a_duration_that_is_not_positive_is_a_usage_error(
    daemon: DaemonProcess, value: str
) -> None:
    for option in ("--timeout-s", "--queue-timeout-s"):
        refused = cli(daemon, "submit", option, value, "--", "true")
        assert refused.returncode == 2, (option, value, refused.stderr)
        assert option in refused.stderr


def test_a_bad_name_is_explained_in_words(daemon: DaemonProcess) -> None:
    refused = cli(daemon, "submit", "--name", "-bad", "--", "true")
    assert refused.returncode == 1
    assert "letters, digits, '.', '_' or '-', starting with a letter or digit" in refused.stderr
    assert "[A-Za-z" not in refused.stderr


def test_overrides_are_merged_in_order(daemon: DaemonProcess) -> None:
    # The local backend takes no overrides: its refusal names what was sent, merged.
    refused = cli(
        daemon,
        "submit",
        "--override",
        '{"overrides": {"cpu": "256", "containerOverrides": [{"name": "a"}]}}',
        "--override",
        '{"overrides": {"memory": "512"}, "tags": [{"key": "k", "value": "v"}]}',
        "--",
        "true",
    )
    assert refused.returncode == 1
    assert "the local backend takes no overrides" in refused.stderr
    for bad, words in (("[1]", "must be a JSON object"), ("{", "not JSON")):
        refused = cli(daemon, "submit", "--override", bad, "--", "true")
        assert refused.returncode == 2
        assert words in refused.stderr


def test_file_lines_take_the_command_lines_options_as_defaults(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    lines = "\n".join(
        orjson.dumps(spec).decode()
        for spec in (
            {"command": ["sh", "-c", "echo $A $B"], "env": {"B": "line"}},
            {"command": ["true"], "timeout_s": 99, "env": {"A": "own"}},
        )
    )
    done = cli(
        daemon,
        "submit",
        "--env",
        "A=flag",
        "--env",
        "B=flag",
        "--timeout-s",
        "30",
        "--file",
        "-",
        stdin=lines,
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split()
    assert (status(daemon, first)["timeout_s"], status(daemon, second)["timeout_s"]) == (30.0, 99.0)
    assert cli(daemon, "wait", first).returncode == 0
    assert cli(daemon, "logs", first).stdout == "flag line\n"  # its own env over the flags'
    assert stored_spec(daemon, second)["env"] == {"A": "own", "B": "flag"}


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--wait"], "--wait"),
        (["--name", "n"], "--name"),
        (["--idempotency-key", "k"], "--idempotency-key"),
    ],
)
def test_file_refuses_the_options_that_cannot_apply_to_every_line(
    daemon: DaemonProcess, flags: list[str], named: str
) -> None:
    refused = cli(daemon, "submit", *flags, "--file", "-", stdin='{"command": ["true"]}\n')
    assert refused.returncode == 2
    assert named in refused.stderr
    assert refused.stdout == ""
    listed = cli(daemon, "ls", "--json")
    assert orjson.loads(listed.stdout) == []  # nothing was submitted


def test_the_callers_directory_is_where_a_local_job_runs_but_not_what_it_is(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    here, there = short_tmp / "here", short_tmp / "there"
    here.mkdir()
    there.mkdir()

    def submit_from(where: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", "submit", *extra],
            cwd=where,
            env=daemon.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    first = submit_from(here, "--idempotency-key", "k1", "--wait", "--", "pwd")
    job_id = first.stdout.strip()
    assert first.returncode == 0, first.stderr
    again = submit_from(there, "--idempotency-key", "k1", "--json", "--", "pwd")
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stdout)["id"] == job_id  # the same job, not a conflict
    assert cli(daemon, "logs", job_id).stdout == f"{here}\n"
    assert status(daemon, job_id)["cwd"] == str(here)
    shown = cli(daemon, "status", job_id)
    assert f"{'cwd:':<15}{here}" in shown.stdout.splitlines()
    conflict = submit_from(there, "--idempotency-key", "k1", "--", "pwd", "-P")
    assert conflict.returncode == 1
    assert "command differs" in conflict.stderr


def test_client_commands_find_the_socket_the_configuration_names(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    config = short_tmp / "orchestrator.toml"
    config.write_text(f'[server]\nsocket_path = "{daemon.socket_path}"\n')
    env = {k: v for k, v in daemon.env.items() if k != "ORCHESTRATOR__SERVER__SOCKET_PATH"}
    for how in (["--config", str(config)], []):
        extra = {} if how else {"ORCHESTRATOR_CONFIG": str(config)}
        pinged = subprocess.run(
            [sys.executable, "-m", "orchestrator", "ping", *how],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert pinged.returncode == 0, pinged.stderr


def test_shutdown_stops_the_daemon_of_this_socket_only(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    other = DaemonProcess(short_tmp / "other")
    (short_tmp / "other").mkdir()
    other.start()
    try:
        stopped = cli(daemon, "shutdown")
        assert stopped.returncode == 0, stopped.stderr
        assert daemon.wait_exit() == 0
        assert "stopped (pid" in stopped.stderr
        assert cli(other, "ping").returncode == 0  # the other daemon is untouched
    finally:
        other.close()
