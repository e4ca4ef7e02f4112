"""The real daemon on a real socket with the local backend: real subprocesses, real SQLite."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, views
from orchestrator.client import Client
from orchestrator.testing import make_settings
from tests.support import fds
from tests.support.daemon import running, until_state

pytestmark = pytest.mark.timeout(60)


async def submit_and_wait(client: Client, **spec: Any) -> views.Job:
    job = await client.submit(spec)
    return await client.wait(job["id"])


async def test_job_succeeds_with_exit_code_and_history(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await submit_and_wait(client, command=["sh", "-c", "echo hi"], name="greet")
        assert job["state"] == "SUCCEEDED"
        assert job["exit_code"] == 0
        assert job["name"] == "greet"
        assert job["backend"] == "local"
        assert set(job["state_times"]) == {"QUEUED", "RUNNING", "SUCCEEDED"}
        assert job["failure"] is None
        full = await client.get(job["id"], history=True)
        assert [(e["from"], e["to"]) for e in full["history"]] == [
            (None, "QUEUED"),
            ("QUEUED", "RUNNING"),
            ("RUNNING", "SUCCEEDED"),
        ]
        assert [a["attempt"] for a in full["attempts"]] == [1]
        assert full["attempts"][0]["outcome"] == "submitted"


async def test_job_fails_with_its_real_exit_code(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await submit_and_wait(client, command=["sh", "-c", "exit 42"])
        assert (job["state"], job["exit_code"], job["reason"]) == ("FAILED", 42, "exit code 42")
        assert job["failure"] == "user"  # its own non-zero exit


async def test_missing_command_fails_with_127_and_says_why(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await submit_and_wait(client, command=["no-such-command-xyz"])
        assert job["state"] == "FAILED"
        assert job["failure"] == "rejected"  # it cannot run here: no retry would fare better
        assert job["exit_code"] == 127
        assert job["reason"] is not None
        assert "no-such-command-xyz" in job["reason"]


async def test_missing_working_directory_fails_the_job(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await submit_and_wait(client, command=["true"], cwd=str(short_tmp / "nope"))
        assert job["state"] == "FAILED"
        assert job["reason"] is not None
        assert "working directory" in job["reason"]


async def test_argv_is_not_interpreted_by_a_shell(short_tmp: Path) -> None:
    marker = short_tmp / "injected"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await submit_and_wait(client, command=["echo", f"; touch {marker}", "$(id)"])
        assert job["state"] == "SUCCEEDED"
        out = [r async for r in client.logs(job["id"])]
        assert "".join(r.get("data", "") for r in out) == f"; touch {marker} $(id)\n"
        assert not marker.exists()


async def test_env_is_merged_over_a_clean_base(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAEMON_SECRET", "do-not-leak")
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await submit_and_wait(
            client,
            command=[sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
            env={"GREETING": "hello", "PATH": "/usr/bin:/bin"},
        )
        data = "".join([r.get("data", "") async for r in client.logs(job["id"])])
        env = __import__("json").loads(data)
        assert env["GREETING"] == "hello"
        assert env["PATH"] == "/usr/bin:/bin"
        assert env["ORCHESTRATOR_JOB_ID"] == job["id"]
        assert env["ORCHESTRATOR_ATTEMPT"] == "1"
        assert "DAEMON_SECRET" not in env


async def test_logs_separate_stdout_and_stderr_and_follow_to_the_end(short_tmp: Path) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.1; done"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script]})
        replies = [r async for r in client.logs(job["id"], follow=True)]
        assert replies[-1]["end"] is True
        assert replies[-1]["state"] == "SUCCEEDED"
        by_stream: dict[str, str] = {"stdout": "", "stderr": ""}
        for reply in replies[:-1]:
            by_stream[reply["stream"]] += reply["data"]
        assert by_stream == {"stdout": "out1\nout2\nout3\n", "stderr": "err1\nerr2\nerr3\n"}


async def test_cancel_terminates_the_whole_process_group(short_tmp: Path) -> None:
    pid_file = short_tmp / "grandchild.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script]})
        await until_state(client, job["id"], "RUNNING")
        async with asyncio.timeout(10):
            while not pid_file.exists() or not pid_file.read_text().strip():  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # a file written by the job: nothing to wait on
        grandchild = int(pid_file.read_text())
        await client.cancel(job["id"])
        final = await client.wait(job["id"])
        assert final["state"] == "CANCELLED"
        assert final["stop_reason"] == "cancel"
        assert not _alive(grandchild)


async def test_cancel_escalates_to_sigkill_after_the_grace_period(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"kill_grace_s": 0.3})
    script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sh", "-c", script]})
        async for reply in client.logs(job["id"], follow=True):
            if "ready" in reply.get("data", ""):
                break
        await client.cancel(job["id"])
        final = await client.wait(job["id"])
        assert final["state"] == "CANCELLED"
        assert final["exit_code"] == 137  # SIGKILL


async def test_cancel_of_a_queued_job_never_runs_it(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 1})
    marker = short_tmp / "ran"
    async with running(settings), Client(short_tmp / "o.sock") as client:
        blocker = await client.submit({"command": ["sleep", "30"]})
        queued = await client.submit({"command": ["touch", str(marker)]})
        assert (await client.get(queued["id"]))["state"] == "QUEUED"
        cancelled = await client.cancel(queued["id"])
        assert cancelled["state"] == "CANCELLED"
        await client.cancel(blocker["id"])
        assert (await client.wait(blocker["id"]))["state"] == "CANCELLED"
        assert not marker.exists()


async def test_timeout_fails_the_job_with_reason_timeout(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await submit_and_wait(client, command=["sleep", "30"], timeout_s=0.5)
        assert job["state"] == "FAILED"
        assert job["reason"] is not None
        assert job["reason"].startswith("timeout")
        assert job["stop_reason"] == "timeout"


async def test_queue_timeout_fails_a_job_that_never_got_a_slot(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 1})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        blocker = await client.submit({"command": ["sleep", "30"]})
        starved = await submit_and_wait(client, command=["true"], queue_timeout_s=0.3)
        assert starved["state"] == "FAILED"
        assert starved["reason"] is not None
        assert starved["reason"].startswith("queue_timeout")
        await client.cancel(blocker["id"])
        # Ended and recorded before the daemon stops: else its keeper, which outlives the
        # daemon, would hold the outcome for a next daemon that never comes.
        assert (await client.wait(blocker["id"]))["state"] == "CANCELLED"


async def test_concurrency_cap_is_respected(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 2})
    log = short_tmp / "spans"
    script = f"echo start $(date +%s.%N) >> {log}; sleep 0.3; echo end $(date +%s.%N) >> {log}"
    async with running(settings), Client(short_tmp / "o.sock") as client:
        jobs = [await client.submit({"command": ["sh", "-c", script]}) for _ in range(6)]
        for job in jobs:
            assert (await client.wait(job["id"]))["state"] == "SUCCEEDED"
    running_now, peak = 0, 0
    events = sorted(
        (float(stamp), kind)
        for kind, stamp in (line.split() for line in log.read_text().splitlines())
    )
    for _, kind in events:
        running_now += 1 if kind == "start" else -1
        peak = max(peak, running_now)
    assert peak <= 2
    assert len(events) == 12


async def test_idempotency_key_returns_the_same_job(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        spec = {"command": ["true"], "idempotency_key": "order-17"}
        first = await client.call("submit", job=spec)
        second = await client.call("submit", job=spec)
        assert first["created"] is True
        assert second["created"] is False
        assert second["job"]["id"] == first["job"]["id"]
        with pytest.raises(errors.RemoteError) as info:
            await client.submit({"command": ["false"], "idempotency_key": "order-17"})
        assert info.value.remote_code == "idempotency_conflict"
        # naming the default backend explicitly, or not, is the same request
        explicit = await client.call("submit", job={**spec, "backend": "local"})
        assert (explicit["created"], explicit["job"]["id"]) == (False, first["job"]["id"])
        assert len(await client.list()) == 1
        assert (await client.wait(first["job"]["id"]))["state"] == "SUCCEEDED"  # see above


async def test_thousand_jobs_from_one_ndjson_stream_all_finish(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 16})
    specs = [{"command": ["true"] if i % 10 else ["false"], "name": f"j{i}"} for i in range(1000)]
    async with running(settings), Client(short_tmp / "o.sock") as client:
        submitted = [job async for job in client.submit_many(specs)]
        assert all(isinstance(job, dict) for job in submitted)
        ids = [job["id"] for job in submitted if isinstance(job, dict)]
        assert len(set(ids)) == 1000
        assert [job["name"] for job in submitted if isinstance(job, dict)] == [
            s["name"] for s in specs
        ]
        async with asyncio.timeout(50):
            finals = await asyncio.gather(*(client.wait(job_id) for job_id in ids))
    states = [job["state"] for job in finals]
    assert states.count("SUCCEEDED") == 900
    assert states.count("FAILED") == 100
    assert all(job["exit_code"] == (1 if job["state"] == "FAILED" else 0) for job in finals)


async def test_watch_streams_every_transition(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        seen: list[tuple[str | None, str]] = []
        stream = client.watch()
        first = await anext(stream)
        assert first["watching"] is True
        job = await client.submit({"command": ["true"]})
        async for reply in stream:
            event = reply["event"]
            assert event["job_id"] == job["id"]
            seen.append((event["from"], event["to"]))
            if event["to"] == "SUCCEEDED":
                break
        assert isinstance(stream, AsyncGenerator)  # `watch` is an async generator
        await stream.aclose()
        assert seen == [(None, "QUEUED"), ("QUEUED", "RUNNING"), ("RUNNING", "SUCCEEDED")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_job_inherits_no_descriptor_of_the_daemon_or_of_its_keeper(
    short_tmp: Path,
) -> None:
    """A job holds its stdin (/dev/null) and its two output pipes, nothing else: none of the
    daemon's sockets and store files, none of the descriptors it inherited from whoever started
    it (the daemon runs in this process: an inheritable pipe made here stands for them), none
    of the keeper's (its socket, lock, log, other jobs' pipes and files)."""
    inherited = os.pipe()
    for fd in inherited:
        os.set_inheritable(fd, True)
    try:
        async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
            job = await submit_and_wait(client, command=fds.LIST_FDS)
            output = "".join([r.get("data", "") async for r in client.logs(job["id"])])
    finally:
        for fd in inherited:
            os.close(fd)
    assert job["state"] == "SUCCEEDED", job["reason"]
    held = fds.held(output)
    assert sorted(held) == [0, 1, 2], f"the job holds {held}"
    assert held[0] == os.devnull
    assert held[1].startswith("pipe:"), held
    assert held[2].startswith("pipe:"), held


@pytest.mark.parametrize(("stop", "failure"), [("cancel", "cancelled"), ("timeout", "timeout")])
async def test_a_job_we_stop_fails_with_the_class_of_the_stop(
    short_tmp: Path, stop: str, failure: str
) -> None:
    settings = make_settings(short_tmp, local={"kill_grace_s": 1.0})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        timeout = {"timeout_s": 0.5} if stop == "timeout" else {}
        job = await client.submit({"command": ["sleep", "30"], **timeout})
        if stop == "cancel":
            await until_state(client, job["id"], "RUNNING")
            await client.cancel(job["id"])
        final = await client.wait(job["id"])
    assert final["failure"] == failure, final
