"""Human output cannot be forged by what it shows (issue 11, item 6): a job's name, command,
reason or vendor status, or an error message, that carries newlines, terminal escapes or
bidirectional overrides is printed escaped, so no line of it passes for the CLI's own.

Some of these strings cannot be submitted today (names are letters, digits and `._-`) but can
still be served: a job accepted by an older version, or a reason a vendor wrote. Those jobs are
put in the store before the daemon starts, as such a store would hold them.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator import events, models, settings
from orchestrator.store import SqliteStore
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(90)

FORGED = "\n state: SUCCEEDED\x1b[2J"
# The forged line, and everything else that moves the cursor, recolours the terminal, or reads
# as a line break: CR, an OSC title sequence ended by BEL, DEL, a C1 control, a right-to-left
# override, a Unicode line separator.
HOSTILE = f"x{FORGED}\r\x1b]0;owned\x07\x7f\x9b\u202eDEVIRP\u2028tail"
RAW = ("\x1b", "\r", "\x07", "\x7f", "\x9b", "\u202e", "\u2028")
ESCAPED = "x\\n state: SUCCEEDED\\x1b[2J\\r\\x1b]0;owned\\x07\\x7f\\x9b\\u202eDEVIRP\\u2028tail"


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(short_tmp)
    yield proc
    proc.close()


def cli(
    daemon: DaemonProcess, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=daemon.env,
        timeout=60,
        check=False,
    )


def assert_not_forged(text: str, state_lines: list[str] | None = None) -> None:
    """No raw control character, and no line that starts with `state:` but the real ones."""
    for char in RAW:
        assert char not in text, (char, text)
    lines = [line.strip() for line in text.split("\n")]
    assert [line for line in lines if line.startswith("state:")] == (state_lines or [])


def seed(daemon: DaemonProcess, *jobs: tuple[models.JobSpec, dict[str, Any] | None]) -> list[str]:
    """Put jobs in the daemon's store before it starts: each spec (built without validation,
    as an older version may have accepted it), moved to a final state if one is given."""

    async def go() -> list[str]:
        store = SqliteStore(
            settings.StoreSettings(path=daemon.store_path, synchronous="NORMAL"), events.Hub()
        )
        await store.open()
        try:
            accepted = await store.accept_many([(spec, "local") for spec, _ in jobs], None)
            ids = []
            for outcome, (_, final) in zip(accepted, jobs, strict=True):
                assert isinstance(outcome, tuple), outcome
                job = outcome[0]
                if final is not None:
                    await store.transition(job.id, models.JobState.QUEUED, **final)
                ids.append(job.id)
            return ids
        finally:
            await store.close()

    return asyncio.run(go())


def test_status_ls_and_wait_escape_a_hostile_name_command_reason_and_vendor_status(
    daemon: DaemonProcess,
) -> None:
    spec = models.JobSpec.model_construct(name=HOSTILE, command=["sh", "-c", "exit 3", HOSTILE])
    final: dict[str, Any] = {
        "new": models.JobState.FAILED,
        "reason": HOSTILE,
        "vendor_status": HOSTILE,
        "exit_code": 3,
    }
    (job_id,) = seed(daemon, (spec, final))
    daemon.start()

    status = cli(daemon, "status", job_id)
    assert status.returncode == 0, status.stderr
    assert_not_forged(status.stdout, ["state:         FAILED"])
    shown = {line.split(":", 1)[0]: line for line in status.stdout.splitlines()}
    for key in ("name", "reason", "vendor_status"):
        assert shown[key].split(None, 1)[1] == ESCAPED
    assert shown["command"].split(None, 1)[1] == f"sh -c exit 3 {ESCAPED}"
    assert f"→ FAILED  ({ESCAPED})" in status.stdout  # the history's reason

    listed = cli(daemon, "ls")
    assert listed.returncode == 0, listed.stderr
    assert_not_forged(listed.stdout)
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
    assert row.endswith(f"  {ESCAPED}")
    assert len(listed.stdout.splitlines()) == 2  # the header and the one job

    waited = cli(daemon, "wait", job_id)
    assert waited.returncode == 3
    assert_not_forged(waited.stderr)
    assert waited.stderr == f"{job_id} FAILED exit_code=3 ({ESCAPED})\n"


def test_watch_escapes_a_hostile_name(daemon: DaemonProcess) -> None:
    spec = models.JobSpec.model_construct(name=HOSTILE, command=["sleep", "600"])
    (job_id,) = seed(daemon, (spec, None))
    daemon.start()
    watch = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "watch"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert watch.stdout is not None
    stdout = watch.stdout.fileno()
    out = bytearray()
    deadline = time.monotonic() + 30

    def read_some() -> None:
        assert time.monotonic() < deadline, bytes(out)
        if select.select([stdout], [], [], 0.5)[0]:
            out.extend(os.read(stdout, 65536))

    try:
        with daemon.client() as client:
            # `watch` prints nothing until a change: submit small jobs until it shows one, so
            # that the change that matters cannot come before it listens.
            while b"\n" not in out:
                client.submit({"command": ["true"], "name": "probe"})
                read_some()
            client.cancel(job_id)
            mine = job_id.encode()
            while mine not in out or b"CANCELLED" not in out[out.index(mine) :]:
                read_some()
    finally:
        watch.terminate()
        watch.communicate(timeout=30)
    text = out.decode()
    assert_not_forged(text)
    shown = [line for line in text.splitlines() if job_id in line]
    assert shown
    assert all(f"  {job_id}  {ESCAPED}  " in line for line in shown), shown


def test_what_a_submitter_sends_is_shown_escaped_in_status_and_in_error_messages(
    daemon: DaemonProcess,
) -> None:
    daemon.start()
    submitted = cli(daemon, "submit", "--wait", "--", "sh", "-c", "exit 3", HOSTILE)
    assert submitted.returncode == 3, submitted.stderr
    job_id = submitted.stderr.split()[0]
    status = cli(daemon, "status", job_id)
    assert_not_forged(status.stdout, ["state:         FAILED"])
    assert f"sh -c exit 3 {ESCAPED}" in status.stdout

    # The daemon's error message names the bad key as it was sent.
    line = orjson.dumps({"command": ["true"], "env": {HOSTILE: "1"}}).decode()
    refused = cli(daemon, "submit", "--file", "-", stdin=line + "\n")
    assert refused.returncode == 1
    assert_not_forged(refused.stderr)
    assert len(refused.stderr.splitlines()) == 2  # the line's error, then the count
    assert "line 1: invalid_request: job.env[" in refused.stderr
