"""The retry policy through the real daemon and socket: local jobs as real subprocesses that
count their own runs in a file, ECS and Batch on a real moto server behind the fault proxy,
whose describe answers say how each attempt ended (shapes from the AWS API references)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator import views
from orchestrator.client import Client
from orchestrator.store.protocol import AttemptEntry, HistoryEntry
from orchestrator.testing import make_settings
from tests.integration.test_aws import batch_section, ecs_section, stopped_with
from tests.support.daemon import accepted, running
from tests.support.faultproxy import Reply, Request, Rule
from tests.support.moto import BatchEnv, EcsEnv

pytestmark = pytest.mark.timeout(90)


def counting(runs: Path, script: str) -> list[str]:
    """A command that adds a line to `runs` each time it runs, then runs `script` with $n, the
    number of this run (1, 2, ...)."""
    return ["sh", "-c", f'echo run >> "{runs}"; n=$(wc -l < "{runs}"); {script}']


def runs_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def outcome(
    client: Client, job_id: str
) -> tuple[views.Job, list[HistoryEntry], list[AttemptEntry]]:
    """The job once it has ended, its history and its attempts."""
    await client.wait(job_id)
    full = await client.get(job_id, history=True)
    return full, full["history"], full["attempts"]


# -- local: user failures retried only for the exit codes listed ------------------------------


async def test_a_listed_exit_code_is_retried_as_a_new_attempt_that_succeeds(
    short_tmp: Path,
) -> None:
    runs = short_tmp / "runs"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            {
                "command": counting(runs, 'test "$n" -ge 2 || exit 75'),
                "retry": {"exit_codes": [75], "backoff_s": 0},
            }
        )
        final, history, attempts = await outcome(client, job["id"])
    assert (final["state"], final["exit_code"], final["attempt"]) == ("SUCCEEDED", 0, 2)
    assert runs_of(runs) == 2  # ran once per attempt, no more
    assert [(h["from"], h["to"]) for h in history] == [
        (None, "QUEUED"),
        ("QUEUED", "RUNNING"),
        ("RUNNING", "QUEUED"),  # the retry
        ("QUEUED", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    assert history[2]["reason"] == "attempt 1 failed (user: exit code 75); attempt 2 of 3 in 0s"
    assert [(a["attempt"], a["token"], a["outcome"]) for a in attempts] == [
        (1, f"{job['id']}-1", "failed (user): exit code 75"),
        (2, f"{job['id']}-2", "submitted"),
    ]
    assert attempts[0]["external_id"] != attempts[1]["external_id"]
    previous = final["info"]["retry"]["previous"]
    assert (previous["attempt"], previous["failure"], previous["exit_code"]) == (1, "user", 75)
    assert final["retry"] == {
        "attempts": 3,
        "on": ["infrastructure", "start"],
        "exit_codes": [75],
        "backoff_s": 0.0,
    }


async def test_an_exit_code_not_listed_is_not_retried(short_tmp: Path) -> None:
    runs = short_tmp / "runs"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            {"command": counting(runs, "exit 3"), "retry": {"exit_codes": [75], "backoff_s": 0}}
        )
        final, history, attempts = await outcome(client, job["id"])
    assert (final["state"], final["failure"], final["exit_code"], final["attempt"]) == (
        "FAILED",
        "user",
        3,
        1,
    )
    assert runs_of(runs) == 1
    assert "QUEUED" not in [h["to"] for h in history[1:]]
    assert [a["outcome"] for a in attempts] == ["submitted"]


async def test_the_daemon_default_retries_no_user_failure(short_tmp: Path) -> None:
    runs = short_tmp / "runs"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": counting(runs, "exit 75")})
        final, _, _ = await outcome(client, job["id"])
    assert (final["state"], final["failure"], runs_of(runs)) == ("FAILED", "user", 1)


async def test_retries_stop_at_the_attempts_and_the_last_failure_is_the_jobs(
    short_tmp: Path,
) -> None:
    runs = short_tmp / "runs"
    settings = make_settings(short_tmp, jobs={"retry": {"exit_codes": [75], "backoff_s": 0}})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": counting(runs, "exit 75"), "retry": {"attempts": 4}})
        final, history, attempts = await outcome(client, job["id"])
    assert (final["state"], final["failure"], final["attempt"], runs_of(runs)) == (
        "FAILED",
        "user",
        4,
        4,
    )
    assert [h["to"] for h in history].count("QUEUED") == 4  # accepted, then 3 retries
    assert [h["reason"] for h in history if h["from"] and h["to"] == "QUEUED"][-1] == (
        "attempt 3 failed (user: exit code 75); attempt 4 of 4 in 0s"
    )
    assert [a["outcome"] for a in attempts] == ["failed (user): exit code 75"] * 3 + ["submitted"]


async def test_a_rejected_command_is_never_retried(short_tmp: Path) -> None:
    settings = make_settings(
        short_tmp, jobs={"retry": {"on": ["start", "infrastructure"], "backoff_s": 0}}
    )
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["no-such-command-xyz"]})
        final, _, attempts = await outcome(client, job["id"])
    assert (final["state"], final["failure"], len(attempts)) == ("FAILED", "rejected", 1)


async def test_a_timeout_is_never_retried(short_tmp: Path) -> None:
    runs = short_tmp / "runs"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            {
                "command": counting(runs, "sleep 30"),
                "timeout_s": 0.5,
                "retry": {"exit_codes": [143, 137], "backoff_s": 0},  # what the stop causes
            }
        )
        final, _, attempts = await outcome(client, job["id"])
    assert (final["state"], final["failure"], len(attempts), runs_of(runs)) == (
        "FAILED",
        "timeout",
        1,
        1,
    )


async def test_a_job_waiting_for_its_retry_is_cancelled_at_once_and_never_runs_again(
    short_tmp: Path,
) -> None:
    runs = short_tmp / "runs"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            {"command": counting(runs, "exit 75"), "retry": {"exit_codes": [75], "backoff_s": 600}}
        )
        async for reply in client.watch(job["id"]):  # until the retry is recorded
            event = reply.get("event") or {}
            if event.get("from") == "RUNNING" and event.get("to") == "QUEUED":
                assert event["failure"] == "user"
                break
        waiting = await client.get(job["id"])
        assert (waiting["state"], waiting["attempt"]) == ("QUEUED", 1)
        assert waiting["reason"] is not None
        assert waiting["reason"].startswith("attempt 1 failed (user: exit code 75); attempt 2 of 3")
        await client.cancel(job["id"])
        final = await client.wait(job["id"])
    assert (final["state"], final["failure"], final["attempt"]) == ("CANCELLED", "cancelled", 1)
    assert runs_of(runs) == 1


async def test_a_retry_waiting_over_a_restart_runs_once_when_due(short_tmp: Path) -> None:
    runs = short_tmp / "runs"
    settings = make_settings(short_tmp)
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            {
                "command": counting(runs, 'test "$n" -ge 2 || exit 75'),
                "retry": {"exit_codes": [75], "backoff_s": 3},
            }
        )
        # Every event of the job from its acceptance on (`since=0`: a retry recorded before
        # the watch began is not missed), until the one that sent it back for its retry.
        async for reply in client.watch(job["id"], since=0):
            event = reply.get("event") or {}
            if event.get("to") == "QUEUED" and event.get("from") is not None:
                break
    assert runs_of(runs) == 1
    async with running(settings), Client(short_tmp / "o.sock") as client:
        # Not launched at once on recovery: the retry keeps its time (1.5-3 s after it was
        # recorded), then runs once.
        assert (await client.get(job["id"]))["state"] == "QUEUED"
        final, _, attempts = await outcome(client, job["id"])
    assert (final["state"], final["attempt"], runs_of(runs)) == ("SUCCEEDED", 2, 2)
    assert len(attempts) == 2


async def test_a_bad_retry_policy_is_refused_naming_the_field(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        for retry, words in [
            ({"on": ["user"]}, "retried by exit code: list the codes in exit_codes"),
            ({"on": ["timeout"]}, "'timeout' failures are never retried"),
            ({"on": ["spot"]}, "unknown failure class 'spot'"),
            ({"attempts": 0}, "greater than or equal to 1"),
            ({"exit_codes": [0]}, "greater than or equal to 1"),
            ({"backoff_s": -1}, "greater than or equal to 0"),
            ({"tries": 2}, "job.retry.tries: unknown field"),
        ]:
            with pytest.raises(Exception) as refused:  # noqa: PT011 - the message is the check
                await client.submit({"command": ["true"], "retry": retry})
            assert "retry" in str(refused.value), (retry, str(refused.value))
            assert words in str(refused.value), (retry, str(refused.value))
        assert (await client.ping())["pong"] is True  # and it keeps serving


# -- ECS ---------------------------------------------------------------------------------------


def ecs_settings(root: Path, env: EcsEnv, **retry: Any) -> Any:
    return make_settings(
        root,
        ecs=ecs_section(env),
        jobs={"backend": "ecs", "retry": {"backoff_s": 0, **retry}},
    )


@pytest.mark.usefixtures("proxied_aws_env")
async def test_ecs_a_task_that_failed_to_start_is_retried_and_attempt_2_succeeds(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    # The first DescribeTasks finds the first task STOPPED before its container ran.
    never_ran = stopped_with(
        None, "TaskFailedToStart", "CannotPullContainerError: pull access denied"
    )
    fault_proxy.add_rule(Rule("ecs", "DescribeTasks", never_ran, times=1))
    async with running(ecs_settings(short_tmp, ecs_env)), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["echo", "hi"]})
        final, history, attempts = await outcome(client, job["id"])
    assert (final["state"], final["attempt"], final["exit_code"]) == ("SUCCEEDED", 2, 0)
    tokens = [r.json()["clientToken"] for r in fault_proxy.requests("ecs", "RunTask")]
    assert tokens == [f"{job['id']}-1", f"{job['id']}-2"]  # one RunTask per attempt
    assert attempts[0]["outcome"] is not None
    assert attempts[0]["outcome"].startswith("failed (start): ")
    assert "CannotPullContainerError" in attempts[0]["outcome"]
    retry = next(h for h in history if h["from"] and h["to"] == "QUEUED")
    assert retry["reason"] is not None
    assert retry["reason"].startswith("attempt 1 failed (start: ")


@pytest.mark.usefixtures("proxied_aws_env")
async def test_ecs_spot_interruptions_are_retried_within_attempts_then_fail_infrastructure(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    spot = stopped_with(143, "SpotInterruption", "Your Spot Task was interrupted.")
    fault_proxy.add_rule(Rule("ecs", "DescribeTasks", spot, times=None))
    settings = ecs_settings(short_tmp, ecs_env, attempts=2)
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit({"command": ["sleep", "1"]})
        final, _, attempts = await outcome(client, job["id"])
    assert (final["state"], final["failure"], final["attempt"]) == ("FAILED", "infrastructure", 2)
    assert final["reason"] is not None
    assert "SpotInterruption" in final["reason"]
    assert len(fault_proxy.requests("ecs", "RunTask")) == 2
    assert [str(a["outcome"]).split(":")[0] for a in attempts] == [
        "failed (infrastructure)",
        "submitted",
    ]


@pytest.mark.usefixtures("proxied_aws_env")
@pytest.mark.parametrize(("exit_codes", "run_tasks"), [([3], 2), ([], 1)], ids=["listed", "not"])
async def test_ecs_a_container_exit_code_is_retried_only_when_listed(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any, exit_codes: list[int], run_tasks: int
) -> None:
    fault_proxy.record("ecs", "RunTask")
    fault_proxy.add_rule(Rule("ecs", "DescribeTasks", stopped_with(3), times=1))
    settings = ecs_settings(short_tmp, ecs_env, exit_codes=exit_codes)
    async with running(settings), Client(short_tmp / "o.sock") as client:
        final, _, _ = await outcome(client, (await client.submit({"command": ["x"]}))["id"])
    assert len(fault_proxy.requests("ecs", "RunTask")) == run_tasks
    expected = ("SUCCEEDED", None) if exit_codes else ("FAILED", "user")
    assert (final["state"], final["failure"]) == expected


# -- Batch -------------------------------------------------------------------------------------


def host_terminated(request: Request) -> Reply:
    """A DescribeJobs responder: every asked-for job FAILED because its host went away (the
    Batch user guide's "Host EC2 (instance …) terminated." status reason)."""
    jobs = [
        {
            "jobId": job_id,
            "jobName": "x",
            "jobQueue": "q",
            "status": "FAILED",
            "statusReason": "Host EC2 (instance i-0123456789abcdef0) terminated.",
            "attempts": [
                {
                    "container": {"reason": "Host EC2 (instance i-0123456789abcdef0) terminated."},
                    "statusReason": "Host EC2 (instance i-0123456789abcdef0) terminated.",
                }
            ],
            "container": {},
            "createdAt": 1,
            "jobDefinition": "d",
        }
        for job_id in request.json()["jobs"]
    ]
    body = json.dumps({"jobs": jobs}).encode()
    return Reply(200, body, {"Content-Type": "application/json"})


def batch_settings(root: Path, env: BatchEnv, **retry: Any) -> Any:
    return make_settings(
        root,
        batch=batch_section(env),
        jobs={"backend": "batch", "retry": {"backoff_s": 0, **retry}},
    )


@pytest.mark.usefixtures("proxied_aws_env")
async def test_batch_host_terminations_are_retried_within_attempts_then_fail_infrastructure(
    short_tmp: Path, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("batch", "SubmitJob")
    fault_proxy.add_rule(Rule("batch", "DescribeJobs", host_terminated, times=None))
    async with (
        running(batch_settings(short_tmp, batch_env)),
        Client(short_tmp / "o.sock") as client,
    ):
        job = await client.submit({"command": ["true"]})
        final, _, attempts = await outcome(client, job["id"])
    assert (final["state"], final["failure"], final["attempt"]) == ("FAILED", "infrastructure", 3)
    names = [r.json()["jobName"] for r in fault_proxy.requests("batch", "SubmitJob")]
    assert names == [f"orch-{job['id']}-{n}" for n in (1, 2, 3)]  # a new Batch job per attempt
    assert len(attempts) == 3


@pytest.mark.usefixtures("proxied_aws_env")
async def test_batch_a_job_batch_retries_itself_is_not_retried_again(
    short_tmp: Path, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("batch", "SubmitJob")
    fault_proxy.add_rule(Rule("batch", "DescribeJobs", host_terminated, times=None))
    async with (
        running(batch_settings(short_tmp, batch_env)),
        Client(short_tmp / "o.sock") as client,
    ):
        job = await client.submit(
            {"command": ["true"], "overrides": {"retryStrategy": {"attempts": 3}}}
        )
        final, _, attempts = await outcome(client, job["id"])
    assert (final["state"], final["failure"], len(attempts)) == ("FAILED", "infrastructure", 1)
    (submit,) = fault_proxy.requests("batch", "SubmitJob")
    assert submit.json()["retryStrategy"] == {"attempts": 3}
    assert final["info"]["vendor_attempts"] == 3


# -- many at once --------------------------------------------------------------------------------


async def test_many_jobs_failing_together_are_each_retried_once_per_attempt(
    short_tmp: Path,
) -> None:
    """Fifty jobs whose first run fails: every one runs exactly twice, whatever the order in
    which their retries come due."""
    root = short_tmp / "r"
    root.mkdir()
    settings = make_settings(short_tmp, local={"max_concurrency": 8})
    make: Callable[[int], dict[str, Any]] = lambda i: {  # noqa: E731
        "command": counting(root / str(i), 'test "$n" -ge 2 || exit 75'),
        "retry": {"exit_codes": [75], "backoff_s": 0.2},
    }
    async with running(settings), Client(short_tmp / "o.sock") as client:
        ids = [accepted(j)["id"] async for j in client.submit_many(make(i) for i in range(50))]
        finals = await asyncio.gather(*(client.wait(i) for i in ids))
    assert [(f["state"], f["attempt"]) for f in finals] == [("SUCCEEDED", 2)] * 50
    assert [runs_of(root / str(i)) for i in range(50)] == [2] * 50


# -- what the CLI shows ----------------------------------------------------------------------


async def test_status_shows_the_attempt_of_the_most_and_the_previous_failure(
    short_tmp: Path,
) -> None:
    runs = short_tmp / "runs"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            {
                "command": counting(runs, 'test "$n" -ge 2 || exit 75'),
                "retry": {"exit_codes": [75], "backoff_s": 0},
            }
        )
        await client.wait(job["id"])
        shown = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            "status",
            "--socket",
            str(short_tmp / "o.sock"),
            job["id"],
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await shown.communicate()
    lines = out.decode().splitlines()
    assert shown.returncode == 0
    assert any(line.split()[:2] == ["attempt:", "2/3"] for line in lines), lines
    assert "previous:      user — exit code 75" in lines, lines
