"""Naming jobs as git and docker allow (id, unique id prefix, unique name) and `ls` that filters
in the store, says when it cut the list, and pages on. Real CLI processes, a real daemon."""

from __future__ import annotations

import orjson
import pytest

from tests.acceptance.test_cli import cli
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(120)


def submit(daemon: DaemonProcess, *args: str) -> str:
    done = cli(daemon, "submit", "--wait", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def ids_of(daemon: DaemonProcess, *args: str) -> list[str]:
    listed = cli(daemon, "ls", "--json", *args)
    assert listed.returncode == 0, listed.stderr
    return [job["id"] for job in orjson.loads(listed.stdout)]


def test_a_job_is_named_by_its_id_a_unique_prefix_or_a_unique_name(daemon: DaemonProcess) -> None:
    nightly = submit(daemon, "--name", "nightly", "--", "echo", "from nightly")
    twin_a = submit(daemon, "--name", "twin", "--", "true")
    twin_b = submit(daemon, "--name", "twin", "--", "true")
    for ref in (nightly, nightly[:12].upper(), "nightly"):
        shown = cli(daemon, "status", "--json", ref)
        assert shown.returncode == 0, (ref, shown.stderr)
        assert orjson.loads(shown.stdout)["id"] == nightly
    assert cli(daemon, "logs", "nightly").stdout == "from nightly\n"
    assert cli(daemon, "wait", "nightly").returncode == 0
    assert "had already ended" in cli(daemon, "cancel", "nightly").stderr

    several = cli(daemon, "status", "twin")
    assert several.returncode == 1
    assert "several jobs are named 'twin'" in several.stderr
    assert twin_a in several.stderr or twin_b in several.stderr
    # Ids made in one millisecond share their first 10 characters: a short prefix fits all.
    shared = cli(daemon, "status", nightly[:4])
    assert shared.returncode == 1
    assert "starts the ids of several jobs" in shared.stderr
    for unknown in ("no-such-job", nightly[:3], "zzzz"):
        missing = cli(daemon, "status", unknown)
        assert missing.returncode == 1
        assert f"no job with id, id prefix or name '{unknown}'" in missing.stderr


def test_ls_filters_in_the_daemon_says_when_it_cut_and_pages_on(daemon: DaemonProcess) -> None:
    reports = [submit(daemon, "--name", f"report-{i}", "--", "true") for i in range(3)]
    other = submit(daemon, "--name", "other", "--", "true")
    newest_first = [other, *reversed(reports)]

    assert ids_of(daemon, "--name", "report-*") == list(reversed(reports))
    assert ids_of(daemon, "--name", "report-[02]") == [reports[2], reports[0]]
    assert ids_of(daemon, "--since", "1h") == newest_first
    assert ids_of(daemon, "--since", "2999-01-01T00:00:00Z") == []
    assert ids_of(daemon, "--state", "SUCCEEDED", "--name", "oth*") == [other]

    cut = cli(daemon, "ls", "--limit", "2")
    assert cut.returncode == 0
    assert [line.split()[0] for line in cut.stdout.splitlines()[1:]] == newest_first[:2]
    assert "more jobs match" in cut.stderr
    cursor = cut.stderr.split("--cursor ")[1].split()[0]
    assert cursor == newest_first[1]
    assert ids_of(daemon, "--cursor", cursor) == newest_first[2:]
    whole = cli(daemon, "ls", "--all", "--limit", "1")
    assert [line.split()[0] for line in whole.stdout.splitlines()[1:]] == newest_first
    assert whole.stderr == ""  # nothing was cut
    exact = cli(daemon, "ls", "--limit", "4")
    assert exact.stderr == ""  # exactly as many as asked: nothing more to say

    bad = cli(daemon, "ls", "--since", "yesterday")
    assert bad.returncode == 2
    assert "neither an age" in bad.stderr
