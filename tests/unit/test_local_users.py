"""As whom a local job runs with `local.run_as = "submitter"`: the identity the daemon looks up,
what it hands to the keeper (`user`) and the environment and working directory the job gets. No
process is started here."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from orchestrator import models
from orchestrator.backends import _runner, users
from orchestrator.backends.local import LocalBackend
from orchestrator.settings import LocalSettings

ALICE = users.Identity(4242, 4242, (4242, 5555), "alice", "/home/alice", "/bin/bash")
NO_ENTRY = users.Identity(4243, 100)


def test_the_runner_is_given_uid_gid_and_groups_and_reads_them_back() -> None:
    assert ALICE.runner_arg() == "4242:4242:4242,5555"
    assert NO_ENTRY.runner_arg() == "4243:100:"
    user = _runner.User(ALICE.runner_arg())
    assert (user.uid, user.gid, user.groups) == (4242, 4242, [4242, 5555])
    assert str(user) == "uid 4242 (gid 4242, supplementary groups 4242,5555)"
    assert _runner.User(NO_ENTRY.runner_arg()).groups == []


@pytest.mark.parametrize("bad", ["4242", "4242:x:", "4242:1:a", "", "1:2:3:4"])
def test_a_malformed_user_is_a_usage_error(bad: str, capfd: pytest.CaptureFixture[str]) -> None:
    assert _runner.main(["--check-user", bad]) == 2
    assert capfd.readouterr().err.startswith("usage: ")


def test_a_passwd_entry_gives_home_user_logname_and_shell() -> None:
    assert ALICE.environment() == {
        "HOME": "/home/alice",
        "USER": "alice",
        "LOGNAME": "alice",
        "SHELL": "/bin/bash",
    }
    assert ALICE.default_cwd == "/home/alice"
    # No passwd entry: none of them, and a job naming no cwd starts in /.
    assert NO_ENTRY.environment() == {}
    assert NO_ENTRY.default_cwd == "/"


def test_lookup_reads_the_user_database() -> None:
    root = pwd.getpwuid(0)
    found = users.lookup(0, 0)
    assert (found.uid, found.gid, found.name, found.home) == (0, 0, root.pw_name, root.pw_dir)
    assert 0 in found.groups
    assert set(found.groups) == set(os.getgrouplist(root.pw_name, 0))
    # The gid stored with the job (the submitter's at the time) is the primary one.
    assert 4321 in users.lookup(0, 4321).groups


def test_lookup_of_a_uid_with_no_passwd_entry_gives_its_gid_alone() -> None:
    uid = next(uid for uid in range(4242, 5000) if not _has_entry(uid))
    assert users.lookup(uid, 777) == users.Identity(uid, 777)


def _has_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: users.Identity | None, **spec: object
) -> tuple[dict[str, str], str]:
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setenv("USER", "root")
    monkeypatch.setenv("LOGNAME", "root")
    monkeypatch.setenv("SHELL", "/bin/zsh")
    backend = LocalBackend(
        LocalSettings(inherit_env=["PATH", "HOME", "USER", "LOGNAME", "SHELL"]), tmp_path
    )
    job_spec = models.JobSpec(command=["id"], **spec)  # type: ignore[arg-type]
    return backend._environment(job_spec, "job", 1, tmp_path / "job" / "1", user)


def test_a_submitters_job_gets_its_own_home_not_the_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, cwd = _environment(tmp_path, monkeypatch, ALICE)
    assert cwd == "/home/alice"
    assert {name: env.get(name) for name in users.PASSWD_VARIABLES} == ALICE.environment()
    assert env["PATH"] == os.environ["PATH"]

    env, _ = _environment(tmp_path, monkeypatch, NO_ENTRY)
    assert {name: env.get(name) for name in users.PASSWD_VARIABLES} == dict.fromkeys(
        users.PASSWD_VARIABLES
    )


def test_the_jobs_own_env_and_cwd_win_over_the_passwd_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, cwd = _environment(tmp_path, monkeypatch, ALICE, env={"HOME": "/scratch"}, cwd="/srv/work")
    assert (env["HOME"], env["USER"]) == ("/scratch", "alice")
    assert cwd == "/srv/work"


def test_a_job_of_the_daemons_own_runs_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, cwd = _environment(tmp_path, monkeypatch, None)
    assert cwd == str(tmp_path / "job" / "1")  # its attempt directory
    assert (env["HOME"], env["USER"], env["SHELL"]) == ("/root", "root", "/bin/zsh")
