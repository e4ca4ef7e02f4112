"""The CLI as a user runs it: `orchestrator …` subprocesses against `orchestrator serve`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]


def cli(
    daemon: DaemonProcess | None,
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    base = dict(daemon.env) if daemon is not None else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )


def test_submit_wait_exits_with_the_job_exit_code(daemon: DaemonProcess) -> None:
    ok = cli(daemon, "submit", "--wait", "--", "sh", "-c", "echo out")
    assert ok.returncode == 0, ok.stderr
    assert "SUCCEEDED exit_code=0" in ok.stderr
    failed = cli(daemon, "submit", "--wait", "--", "sh", "-c", "exit 3")
    assert failed.returncode == 3
    assert "FAILED exit_code=3" in failed.stderr


def test_submit_prints_the_id_and_json_has_the_job_fields(daemon: DaemonProcess) -> None:
    plain = cli(daemon, "submit", "--name", "plain", "--", "true")
    assert plain.returncode == 0
    job_id = plain.stdout.strip()
    assert len(job_id) == 26
    as_json = cli(daemon, "submit", "--json", "--env", "A=1", "--timeout-s", "30", "--", "true")
    job = orjson.loads(as_json.stdout)
    for key in (
        "id",
        "name",
        "backend",
        "state",
        "exit_code",
        "reason",
        "created_at",
        "updated_at",
    ):
        assert key in job
    assert (job["backend"], job["timeout_s"]) == ("local", 30.0)

    waited = cli(daemon, "wait", job_id)
    assert waited.returncode == 0
    status = orjson.loads(cli(daemon, "status", "--json", job_id).stdout)
    assert (status["id"], status["name"], status["state"]) == (job_id, "plain", "SUCCEEDED")
    assert [e["to"] for e in status["history"]] == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert set(status["state_times"]) == {"QUEUED", "RUNNING", "SUCCEEDED"}
    listed = orjson.loads(cli(daemon, "ls", "--json").stdout)
    assert isinstance(listed, list)
    assert {j["id"] for j in listed} == {job_id, job["id"]}
    succeeded = orjson.loads(cli(daemon, "ls", "--json", "--state", "SUCCEEDED").stdout)
    assert job_id in {j["id"] for j in succeeded}
    human = cli(daemon, "ls")
    assert human.stdout.splitlines()[0].split() == ["ID", "STATE", "BACKEND", "EXIT", "AGE", "NAME"]


def test_logs_prints_the_jobs_own_output(daemon: DaemonProcess) -> None:
    job_id = cli(daemon, "submit", "--", "sh", "-c", "echo to-out; echo to-err >&2").stdout.strip()
    assert cli(daemon, "wait", job_id).returncode == 0
    logs = cli(daemon, "logs", job_id)
    assert (logs.returncode, logs.stdout, logs.stderr) == (0, "to-out\n", "to-err\n")
    followed = cli(
        daemon,
        "logs",
        "-f",
        cli(daemon, "submit", "--", "sh", "-c", "sleep 0.3; echo late").stdout.strip(),
    )
    assert followed.stdout == "late\n"


def test_cancel_and_wait(daemon: DaemonProcess) -> None:
    job_id = cli(daemon, "submit", "--", "sleep", "60").stdout.strip()
    cancelled = cli(daemon, "cancel", job_id)
    assert cancelled.returncode == 0
    assert job_id in cancelled.stdout
    waited = cli(daemon, "wait", "--json", job_id)
    assert waited.returncode != 0
    assert orjson.loads(waited.stdout)["state"] == "CANCELLED"


def test_submit_file_from_stdin_prints_one_id_per_line(daemon: DaemonProcess) -> None:
    lines = "\n".join(
        orjson.dumps({"command": ["true"], "name": f"bulk-{i}"}).decode() for i in range(200)
    )
    result = cli(daemon, "submit", "--file", "-", stdin=lines + "\n\n")
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == len(set(ids)) == 200
    bad = cli(
        daemon, "submit", "--file", "-", stdin='{"command": ["true"]}\nnot json\n{"command": "x"}\n'
    )
    assert bad.returncode == 1
    assert len(bad.stdout.split()) == 1
    assert "line 2: invalid JSON" in bad.stderr
    assert "line 3: invalid_request: job.command" in bad.stderr


def test_unknown_job_and_usage_errors(daemon: DaemonProcess) -> None:
    missing = cli(daemon, "status", "nope")
    assert missing.returncode == 1
    assert "not_found" in missing.stderr
    assert cli(daemon, "submit").returncode == 2
    assert cli(daemon, "submit", "--env", "NOEQUALS", "--", "true").returncode == 2
    assert cli(daemon, "frobnicate").returncode == 2


def test_unreachable_daemon_has_its_own_exit_code_and_names_the_socket(short_tmp: Path) -> None:
    socket_path = short_tmp / "nobody-here.sock"
    for args in (["ping"], ["ls"], ["submit", "--", "true"]):
        result = (
            cli(None, *args, "--socket", str(socket_path))
            if args[0] != "submit"
            else cli(None, "submit", "--socket", str(socket_path), "--", "true")
        )
        assert result.returncode == 3
        assert str(socket_path) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_ping_reports_the_daemon(daemon: DaemonProcess) -> None:
    result = cli(daemon, "ping", "--json")
    assert result.returncode == 0
    reply = orjson.loads(result.stdout)
    assert (reply["pong"], reply["backends"]) == (True, ["local"])


def test_config_show_names_the_source_of_each_value(short_tmp: Path) -> None:
    config = short_tmp / "config.toml"
    config.write_text("[local]\nmax_concurrency = 3\nkill_grace_s = 2.5\n")
    result = cli(
        None,
        "config",
        "show",
        "--json",
        "--config",
        str(config),
        env={"ORCHESTRATOR__LOCAL__KILL_GRACE_S": "4"},
    )
    assert result.returncode == 0, result.stderr
    shown = orjson.loads(result.stdout)
    assert shown["local.max_concurrency"] == {"value": 3, "source": f"file:{config}"}
    assert shown["local.kill_grace_s"] == {
        "value": 4.0,
        "source": "env:ORCHESTRATOR__LOCAL__KILL_GRACE_S",
    }
    assert shown["poller.cap_s"]["source"] == "default"


@pytest.mark.parametrize(
    ("config_text", "env", "needle"),
    [
        ("[local]\nmax_concurency = 3\n", {}, "local.max_concurency: unknown setting"),
        ("[local]\nmax_concurrency = 'many'\n", {}, "local.max_concurrency"),
        ("[local\n", {}, "is not valid TOML"),
        ("", {"ORCHESTRATOR__POLLER__CAP_S": "soon"}, "env:ORCHESTRATOR__POLLER__CAP_S"),
        ("", {"ORCHESTRATOR__NOPE__X": "1"}, "ORCHESTRATOR__NOPE__X"),
    ],
)
def test_broken_config_stops_serve_with_a_message_naming_the_key(
    short_tmp: Path, config_text: str, env: dict[str, str], needle: str
) -> None:
    config = short_tmp / "config.toml"
    config.write_text(config_text)
    result = cli(
        None,
        "serve",
        "--config",
        str(config),
        env={**env, "ORCHESTRATOR__SERVER__SOCKET_PATH": str(short_tmp / "o.sock")},
    )
    assert result.returncode == 2
    assert needle in result.stderr
    assert not (short_tmp / "o.sock").exists()


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_readme_raw_socket_example_works_with_socat(daemon: DaemonProcess) -> None:
    readme = (REPO / "README.md").read_text()
    assert "| socat - UNIX-CONNECT:" in readme
    request = '{"v": 1, "id": 1, "op": "submit", "job": {"command": ["echo", "hi"]}}\n'
    assert f"echo '{request.strip()}'" in readme
    out = subprocess.run(
        ["socat", "-", f"UNIX-CONNECT:{daemon.socket_path}"],
        input=request,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    reply = orjson.loads(out)
    assert (reply["v"], reply["id"], reply["ok"], reply["created"]) == (1, 1, True, True)
    bad = subprocess.run(
        ["socat", "-", f"UNIX-CONNECT:{daemon.socket_path}"],
        input='{"v": 1, "id": 2, "op": "explode"}\n',
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert orjson.loads(bad) == {
        "v": 1,
        "id": 2,
        "ok": False,
        "code": "unknown_op",
        "message": "unknown op 'explode'",
    }


def test_daemon_logs_json_lines_with_stable_event_names(daemon: DaemonProcess) -> None:
    cli(daemon, "submit", "--wait", "--", "true")
    events = daemon.log_events()
    names = [e["event"] for e in events]
    # Before it only the local backend's start-up lines: how jobs are contained (cgroups, or
    # not), what they cannot see, the keeper it started and connected to.
    before = names[: names.index("daemon.ready")]
    assert [name for name in before if not name.startswith("local.")] == [], before
    for expected in ("job.accepted", "job.dispatched", "job.state_changed"):
        assert expected in names
    changed = [e for e in events if e["event"] == "job.state_changed"]
    assert [(e["from_state"], e["to_state"]) for e in changed] == [
        ("QUEUED", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    assert all({"timestamp", "level", "job_id"} <= e.keys() for e in changed)
    accepted = next(e for e in events if e["event"] == "job.accepted")
    assert accepted["peer_uid"] == os.getuid()
    assert all(line.startswith("{") for line in daemon.log().splitlines())
