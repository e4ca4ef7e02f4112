"""An adversarial review of the job model of issue #15 (arrays, GPUs, CPU limits, images,
priorities, dependencies), through the real daemon: each test tries to break a promise of the
README the way a careless client, an attacker or an unlucky host would. Six of them found bugs,
fixed since: the first failed child named by index, an array's queue deadline passed behind a
dependency, children named through their parent's name or prefix (and an expanded array by a
prefix of its id), a zero-padded index, and a registration whose reply was lost sent again."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, views
from orchestrator.backends import cgroups
from orchestrator.client import Client, IdempotencyConflict, InvalidJob, NotFound
from orchestrator.settings import load as load_settings
from orchestrator.testing import make_settings
from tests.integration.test_aws import batch_section, ecs_section
from tests.support.cgroup import FOUND
from tests.support.daemon import DaemonProcess, running
from tests.support.faultproxy import Reply, Request, Rule, error_reply
from tests.support.moto import BatchEnv, EcsEnv, MotoServer

pytestmark = pytest.mark.timeout(120)


async def _until(probe: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    """Poll `probe` until it is true (a bound, not a measurement: fails only when stuck)."""
    async with asyncio.timeout(timeout_s):
        while not await probe():  # noqa: ASYNC110 (the daemon's state, not ours: polled)
            await asyncio.sleep(0.02)
    assert await probe(), what


async def _children(client: Client, parent_id: str) -> list[views.Job]:
    """Every child of an array parent (all pages)."""
    out: list[views.Job] = []
    cursor: str | None = None
    while True:
        page, cursor = await client.list_page(parent=parent_id, cursor=cursor)
        out += page
        if cursor is None:
            return out


def _gated(gate: Path, then: str = "exit 0") -> list[str]:
    """A command that waits until `gate` exists (or its directory is gone), then runs `then`."""
    script = f'while [ ! -e "{gate}" ] && [ -d "{gate.parent}" ]; do sleep 0.02; done; {then}'
    return ["sh", "-c", script]


# -- local arrays: identity, dependencies, cancels --------------------------------------------


async def test_an_array_resubmitted_with_its_key_is_the_same_job_expanded_once(
    short_tmp: Path,
) -> None:
    gate = short_tmp / "gate"
    spec = {"command": _gated(gate), "array_size": 4, "idempotency_key": "arr-1"}
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        first = await client.call("submit", job=spec)
        parent_id = first["job"]["id"]

        async def expanded() -> bool:
            return len(await _children(client, parent_id)) == 4

        await _until(expanded, "the array expanded")
        again = await client.call("submit", job=spec)  # a careless client's retry
        with pytest.raises(IdempotencyConflict) as conflict:
            await client.submit({**spec, "array_size": 5})
        gate.touch()
        final = await client.wait(parent_id)
        after = await client.call("submit", job=spec)  # and once it has ended
        children = await _children(client, parent_id)
        listed, _ = await client.list_page()
    assert first["created"] is True
    assert (again["created"], again["job"]["id"]) == (False, parent_id)
    assert (after["created"], after["job"]["id"]) == (False, parent_id)
    assert "array_size" in str(conflict.value)
    assert final["state"] == "SUCCEEDED"
    assert final["info"]["array_status"] == {"SUCCEEDED": 4}
    assert sorted(c["id"] for c in children) == [f"{parent_id}:{i}" for i in range(4)]
    assert [j["id"] for j in listed] == [parent_id]


async def test_an_array_whose_dependency_fails_is_cancelled_and_never_expanded(
    short_tmp: Path,
) -> None:
    ran = short_tmp / "ran"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        dep = await client.submit({"command": ["sh", "-c", "exit 3"], "retry": {"attempts": 1}})
        parent = await client.submit(
            {
                "command": ["sh", "-c", f'touch "{ran}"'],
                "array_size": 3,
                "depends_on": [dep["id"]],
            }
        )
        final = await client.wait(parent["id"])
        children = await _children(client, parent["id"])
        with pytest.raises(NotFound):
            await client.get(f"{parent['id']}:0")
    assert (final["state"], final["failure"]) == ("CANCELLED", "dependency")
    assert str(final["reason"]).startswith(f"dependency {dep['id']} ended FAILED")
    assert children == []
    assert not ran.exists()
    assert "array_status" not in final["info"]


async def test_an_array_after_finished_runs_once_its_dependency_failed(short_tmp: Path) -> None:
    out = short_tmp / "out"
    out.mkdir()
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        dep = await client.submit({"command": ["false"], "retry": {"attempts": 1}})
        parent = await client.submit(
            {
                "command": ["sh", "-c", f'touch "{out}/$ORCHESTRATOR_ARRAY_INDEX"'],
                "array_size": 3,
                "depends_on": [dep["id"]],
                "after": "finished",
            }
        )
        final = await client.wait(parent["id"])
        dep_final = await client.get(dep["id"])
    assert dep_final["state"] == "FAILED"
    assert final["state"] == "SUCCEEDED"
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2"]


async def test_a_job_after_an_array_and_one_of_its_children_waits_for_the_whole_array(
    short_tmp: Path,
) -> None:
    gate, order = short_tmp / "gate", short_tmp / "order"
    # Child 1 ends at once; the others wait for the gate.
    script = (
        f'[ "$ORCHESTRATOR_ARRAY_INDEX" = 1 ] || while [ ! -e "{gate}" ] && '
        f'[ -d "{short_tmp}" ]; do sleep 0.02; done; echo "child $ORCHESTRATOR_ARRAY_INDEX" '
        f'>> "{order}"'
    )
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["sh", "-c", script], "array_size": 3})
        parent_id = parent["id"]
        with pytest.raises(InvalidJob) as too_early:  # P:7 does not exist (nor will it)
            await client.submit({"command": ["true"], "depends_on": [f"{parent_id}:7"]})

        async def child_1_done() -> bool:
            try:
                return (await client.get(f"{parent_id}:1"))["state"] == "SUCCEEDED"
            except NotFound:
                return False

        await _until(child_1_done, "child 1 ended")
        after = await client.submit(
            {
                "command": ["sh", "-c", f'echo after >> "{order}"'],
                "depends_on": [parent_id, f"{parent_id}:1"],
            }
        )
        await asyncio.sleep(0.3)
        waiting = await client.get(after["id"], history=True)
        gate.touch()
        final = await client.wait(after["id"])
        parent_final = await client.get(parent_id)
    assert "job.depends_on[0]" in str(too_early.value)
    assert waiting["state"] == "QUEUED"
    assert waiting["depends_on"] == [parent_id, f"{parent_id}:1"]
    assert "waiting for 1 of 2 dependencies" in str(waiting["reason"])
    assert final["state"] == "SUCCEEDED"
    assert parent_final["state"] == "SUCCEEDED"
    lines = order.read_text().splitlines()
    assert lines[-1] == "after"
    assert sorted(lines[:-1]) == ["child 0", "child 1", "child 2"]


async def test_cancelling_one_child_fails_the_parent_with_that_childs_class(
    short_tmp: Path,
) -> None:
    gate = short_tmp / "gate"
    settings = make_settings(short_tmp, local={"max_concurrency": 4})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": _gated(gate), "array_size": 3})
        parent_id = parent["id"]

        async def all_running() -> bool:
            kids = await _children(client, parent_id)
            return len(kids) == 3 and all(c["state"] == "RUNNING" for c in kids)

        await _until(all_running, "every child running")
        cancelled = await client.call("cancel", job_id=f"{parent_id}:1")
        child = await client.wait(f"{parent_id}:1")
        mid = await client.get(parent_id)
        gate.touch()
        final = await client.wait(parent_id)
        again = await client.call("cancel", job_id=f"{parent_id}:1")
    assert cancelled["already_ended"] is False
    assert (child["state"], child["failure"]) == ("CANCELLED", "cancelled")
    assert mid["state"] == "RUNNING"  # the others run on
    assert (final["state"], final["failure"]) == ("FAILED", "cancelled")
    assert str(final["reason"]).startswith(
        f"2/3 succeeded, 1 cancelled; first: {parent_id}:1 CANCELLED"
    )
    assert final["info"]["array_status"] == {"SUCCEEDED": 2, "CANCELLED": 1}
    assert again["already_ended"] is False  # cancelling a cancelled job again is no error


async def test_cancelling_an_array_waiting_for_its_dependency_never_expands_it(
    short_tmp: Path,
) -> None:
    gate, ran = short_tmp / "gate", short_tmp / "ran"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        dep = await client.submit({"command": _gated(gate)})
        parent = await client.submit(
            {"command": ["touch", str(ran)], "array_size": 5, "depends_on": [dep["id"]]}
        )
        await asyncio.sleep(0.2)
        cancelled = await client.cancel(parent["id"])
        gate.touch()
        assert (await client.wait(dep["id"]))["state"] == "SUCCEEDED"
        await asyncio.sleep(0.5)  # time for a (wrong) expansion to show
        final = await client.get(parent["id"])
        children = await _children(client, parent["id"])
    assert cancelled["state"] == "CANCELLED"
    assert (final["state"], final["failure"]) == ("CANCELLED", "cancelled")
    assert children == []
    assert not ran.exists()


async def test_the_first_failed_child_named_by_the_parent_is_the_first_one(
    short_tmp: Path,
) -> None:
    # Child 0 fails at once with 10; child 2 fails with 12 only after child 0 has ended.
    script = (
        'i="$ORCHESTRATOR_ARRAY_INDEX"; [ "$i" = 1 ] && exit 0; '
        f'[ "$i" = 2 ] && while [ ! -e "{short_tmp}/gate" ] && [ -d "{short_tmp}" ]; '
        "do sleep 0.02; done; exit $((10 + i))"
    )
    settings = make_settings(short_tmp, local={"max_concurrency": 4})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {"command": ["sh", "-c", script], "array_size": 3, "retry": {"attempts": 1}}
        )
        parent_id = parent["id"]

        async def child_0_failed() -> bool:
            try:
                return (await client.get(f"{parent_id}:0"))["state"] == "FAILED"
            except NotFound:
                return False

        await _until(child_0_failed, "child 0 failed")
        (short_tmp / "gate").touch()
        final = await client.wait(parent_id)
    assert final["state"] == "FAILED"
    # Child 0 is the first by index and by time: the README's `first: ID:12 FAILED (…)`.
    assert f"first: {parent_id}:0 FAILED (exit code 10)" in str(final["reason"]), final["reason"]


# -- naming children: what a careless client types ----------------------------------------


async def test_malformed_child_names_are_plain_refusals_on_every_op(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["true"], "array_size": 4})
        parent_id = parent["id"]
        await client.wait(parent_id)
        refs = [
            f"{parent_id}:abc",
            f"{parent_id}:-1",
            f"{parent_id}:4",
            f"{parent_id}:99999",
            f"{parent_id}:99999999",
            f"{parent_id}:",
            f"{parent_id}:1:1",
            f"{parent_id}: 1",
            f"{parent_id}:1\n",
            f"{parent_id}:٣",  # an Arabic-Indic digit: str.isdigit() says yes, int() too
            ":3",
        ]
        codes: dict[tuple[str, str], str] = {}
        for ref in refs:
            for op in ("get", "cancel"):
                with pytest.raises(errors.RemoteError) as refused:
                    await client.call(op, job_id=ref)
                codes[(op, ref)] = refused.value.code
            for op in ("wait", "logs"):
                with pytest.raises(errors.RemoteError) as refused:
                    async for _ in client.stream(op, job_id=ref):
                        pass
                codes[(op, ref)] = refused.value.code
        still = await client.ping()
    plain = ("not_found", "invalid_request", "ambiguous_job")  # `P:` starts every child's id
    odd = {key: code for key, code in codes.items() if code not in plain}
    assert odd == {}, odd
    assert still["status"] == "ok"


async def test_a_zero_padded_child_index_is_that_child_or_a_refusal_naming_what_was_typed(
    short_tmp: Path,
) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["true"], "array_size": 4})
        parent_id = parent["id"]
        await client.wait(parent_id)
        assert (await client.get(f"{parent_id}:3"))["id"] == f"{parent_id}:3"
        try:
            padded = await client.get(f"{parent_id}:00003")
        except NotFound as exc:
            message = str(exc)
        else:
            message = ""
            assert padded["id"] == f"{parent_id}:3"
    # Refused: then not by saying that P:3, which exists, does not.
    assert f"'{parent_id}:3'" not in message, message


async def test_a_local_child_is_named_through_its_parents_name_or_prefix(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["true"], "array_size": 4, "name": "shards"})
        parent_id = parent["id"]
        await client.wait(parent_id)
        by_parent = [await client.get(ref) for ref in (parent_id, "shards")]
        found: dict[str, str] = {}
        for ref in ("shards:3", f"{parent_id[:-2]}:3", f"{parent_id.upper()}:3"):
            try:
                found[ref] = (await client.get(ref))["id"]
            except errors.RemoteError as exc:
                found[ref] = exc.code
    assert {j["id"] for j in by_parent} == {parent_id}  # the parent by each of its names
    # ... and so its child 3, as `status ID:3` promises (and as a Batch array does).
    assert set(found.values()) == {f"{parent_id}:3"}, found


async def test_an_expanded_array_is_still_named_by_a_prefix_of_its_id(short_tmp: Path) -> None:
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["true"], "array_size": 3})
        parent_id = parent["id"]
        await client.wait(parent_id)
        listed, _ = await client.list_page()
        found: dict[str, str] = {}
        for ref in (parent_id[:8], parent_id.upper()):  # "case does not matter"
            try:
                found[ref] = (await client.get(ref))["id"]
            except errors.RemoteError as exc:
                found[ref] = f"{exc.code}: {exc}"
    assert [j["id"] for j in listed] == [parent_id]  # the only job `ls` shows
    assert set(found.values()) == {parent_id}, found


# -- arrays and time: queue deadlines, timeouts, priorities ----------------------------------


async def test_an_arrays_queue_deadline_passed_behind_a_dependency_fails_it(
    short_tmp: Path,
) -> None:
    gate, ran = short_tmp / "gate", short_tmp / "ran"
    async with running(make_settings(short_tmp)), Client(short_tmp / "o.sock") as client:
        dep = await client.submit({"command": _gated(gate)})
        common = {"command": ["touch", str(ran)], "depends_on": [dep["id"]], "queue_timeout_s": 1}
        single = await client.submit(common)
        array = await client.submit({**common, "array_size": 2})
        await asyncio.sleep(1.5)  # both deadlines pass while the dependency runs
        gate.touch()
        single_final = await client.wait(single["id"])
        array_final = await client.wait(array["id"])
        children = await _children(client, array["id"])
    # The plain job keeps the README's promise ("fails when its dependencies are done") ...
    assert (single_final["state"], single_final["failure"]) == ("FAILED", "timeout")
    # ... and so must the array: nothing of it may run.
    assert not ran.exists()
    assert (array_final["state"], array_final["failure"]) == ("FAILED", "timeout")
    assert children == []


async def test_timeout_s_limits_each_child_not_the_whole_array(short_tmp: Path) -> None:
    # One slot: 5 children of ~0.5 s run one after the other (~2.5 s) under a 2 s timeout
    # each; child 5 sleeps past it.
    script = '[ "$ORCHESTRATOR_ARRAY_INDEX" = 5 ] && exec sleep 60; sleep 0.5'
    settings = make_settings(short_tmp, local={"max_concurrency": 1})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {
                "command": ["sh", "-c", script],
                "array_size": 6,
                "timeout_s": 2,
                "retry": {"attempts": 1},
            }
        )
        final = await client.wait(parent["id"])
        children = {c["id"]: c for c in await _children(client, parent["id"])}
    slow = children[f"{parent['id']}:5"]
    assert (slow["state"], slow["failure"]) == ("FAILED", "timeout")
    assert all(children[f"{parent['id']}:{i}"]["state"] == "SUCCEEDED" for i in range(5)), children
    assert (final["state"], final["failure"]) == ("FAILED", "timeout")
    assert final["info"]["array_status"] == {"SUCCEEDED": 5, "FAILED": 1}


async def test_an_arrays_priority_orders_its_children_against_other_jobs(
    short_tmp: Path,
) -> None:
    gate, order = short_tmp / "gate", short_tmp / "order"

    def note(tag: str) -> dict[str, Any]:
        return {"command": ["sh", "-c", f'echo "{tag}" >> "{order}"']}

    settings = make_settings(short_tmp, local={"max_concurrency": 1})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        blocker = await client.submit({"command": _gated(gate)})

        async def blocking() -> bool:
            return (await client.get(blocker["id"]))["state"] == "RUNNING"

        await _until(blocking, "the blocker runs")
        low = await client.submit(note("low") | {"priority": -5})
        plain = await client.submit(note("plain"))
        array = await client.submit(
            {
                "command": ["sh", "-c", f'echo "child-$ORCHESTRATOR_ARRAY_INDEX" >> "{order}"'],
                "array_size": 3,
                "priority": 5,
            }
        )
        urgent = await client.submit(note("urgent") | {"priority": 10})

        async def expanded() -> bool:
            return len(await _children(client, array["id"])) == 3

        await _until(expanded, "the array expanded")
        gate.touch()
        for job in (low, plain, array, urgent):
            await client.wait(job["id"])
    lines = order.read_text().split()
    assert lines[0] == "urgent"
    assert sorted(lines[1:4]) == ["child-0", "child-1", "child-2"]
    assert lines[4:] == ["plain", "low"]


# -- big arrays, paging, kill -9 -------------------------------------------------------------

BIG = 1_200  # more than one page of `list` (1,000)


async def test_a_big_array_ends_once_with_every_child_and_pages_through_its_children(
    short_tmp: Path,
) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 16})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit({"command": ["true"], "array_size": BIG})
        parent_id = parent["id"]
        final = await client.wait(parent_id)
        events = [r["event"] async for r in client.watch(parent_id, since=0) if "event" in r]
        first, cursor = await client.list_page(parent=parent_id)
        rest, end = await client.list_page(parent=parent_id, cursor=cursor)
        listed, _ = await client.list_page()
        as_json = await client.get(parent_id)
    assert final["state"] == "SUCCEEDED"
    assert final["info"]["array_status"] == {"SUCCEEDED": BIG}
    assert [e["to"] for e in events] == ["QUEUED", "SUBMITTED", "RUNNING", "SUCCEEDED"]
    assert (len(first), len(rest), end) == (1000, BIG - 1000, None)
    ids = [j["id"] for j in first + rest]
    assert len(set(ids)) == BIG
    assert set(ids) == {f"{parent_id}:{i}" for i in range(BIG)}
    assert {j["state"] for j in first + rest} == {"SUCCEEDED"}
    assert [j["id"] for j in listed] == [parent_id]
    assert as_json["array_size"] == BIG


@pytest.mark.parametrize(
    "crash_at",
    [
        "server.after_accept",  # committed, not yet expanded: the restart expands it
        "dispatch.before_attempt:3",  # expanded, two children launched, the rest queued
        "dispatch.after_submit:2",  # a child launched, its launch not yet recorded
    ],
)
def test_an_array_killed_mid_way_runs_each_child_exactly_once(
    daemon: DaemonProcess, short_tmp: Path, crash_at: str
) -> None:
    out = short_tmp / "out"
    out.mkdir()
    script = f'echo "$ORCHESTRATOR_ATTEMPT" >> "{out}/$ORCHESTRATOR_ARRAY_INDEX"'
    spec = {"command": ["sh", "-c", script], "array_size": 5, "idempotency_key": "crash-arr"}
    daemon.start(extra_env={"ORCHESTRATOR_CRASH_AT": crash_at})
    with daemon.client() as client:
        try:
            client.submit(spec)
        except errors.OrchestratorError:
            pass  # the daemon died before it answered: the key finds the job again
    assert daemon.wait_exit() == 137
    daemon.start()
    with daemon.client() as client:
        parent = client.submit(spec)  # created, or found by its key
        final = client.wait(parent["id"])
        children = client.call("list", parent=parent["id"], limit=100)["jobs"]
    assert final["state"] == "SUCCEEDED", final
    assert final["info"]["array_status"] == {"SUCCEEDED": 5}
    assert sorted(c["id"] for c in children) == [f"{parent['id']}:{i}" for i in range(5)]
    # Each index ran once, in one attempt: nothing twice, nothing lost.
    assert {p.name: p.read_text().split() for p in out.iterdir()} == {
        str(i): ["1"] for i in range(5)
    }


# -- local GPUs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpus",
    [
        ["0", "0"],  # a device twice: two jobs would share it
        ["0", ""],  # an empty name: CUDA_VISIBLE_DEVICES would be cut short
        ["0,1"],  # a comma inside a name: two devices passed off as one
        ["0", " 0"],  # a space: CUDA reads " 0" as device 0, handed out twice
        '["1", "1"]',  # the same, as JSON from the environment
        "2,2",  # and as a comma list
    ],
)
def test_local_gpus_that_would_hand_one_device_twice_stop_the_daemon(
    short_tmp: Path, gpus: list[str] | str
) -> None:
    environ = {"ORCHESTRATOR__LOCAL__GPUS": gpus if isinstance(gpus, str) else str(gpus)}
    if isinstance(gpus, list):  # TOML, as an admin writes it
        config = short_tmp / "config.toml"
        config.write_text("[local]\ngpus = [" + ", ".join(f'"{g}"' for g in gpus) + "]\n")
        environ = {"ORCHESTRATOR_CONFIG": str(config)}
    with pytest.raises(errors.ConfigError) as refused:
        load_settings(environ=environ)
    assert "local.gpus" in str(refused.value)
    proc = DaemonProcess(short_tmp, env=environ)
    try:
        proc.start(wait=False)
        assert proc.wait_exit() == 2  # not restarted by systemd
    finally:
        proc.close()
    assert "local.gpus" in proc.log()
    assert not (short_tmp / "o.sock").exists()


def _devices_job(out: Path, tag: str, *, then: str = "exit 0") -> dict[str, Any]:
    """A job that writes the devices it was given to `out/<tag>`, then runs `then`."""
    return {"command": ["sh", "-c", f'echo "[$CUDA_VISIBLE_DEVICES]" >> "{out}/{tag}"; {then}']}


async def test_a_gpu_job_cancelled_while_waiting_never_runs_and_frees_its_turn(
    short_tmp: Path,
) -> None:
    out, gate = short_tmp / "out", short_tmp / "gate"
    out.mkdir()
    settings = make_settings(short_tmp, local={"gpus": "0,1", "max_concurrency": 8})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        holder = await client.submit(
            _devices_job(out, "holder", then=_gated(gate)[2]) | {"resources": {"gpus": 1}}
        )

        async def holding() -> bool:
            return (out / "holder").exists()

        await _until(holding, "the holder runs")
        both = await client.submit(_devices_job(out, "both") | {"resources": {"gpus": 2}})
        await asyncio.sleep(0.2)
        assert (await client.get(both["id"]))["state"] == "QUEUED"  # one free, two needed
        cancelled = await client.cancel(both["id"])
        one = await client.submit(_devices_job(out, "one") | {"resources": {"gpus": 1}})
        one_final = await client.wait(one["id"])
        gate.touch()
        await client.wait(holder["id"])
        after = await client.submit(_devices_job(out, "after") | {"resources": {"gpus": 2}})
        after_final = await client.wait(after["id"])
    assert cancelled["state"] == "CANCELLED"
    assert not (out / "both").exists()
    assert (out / "one").read_text().split() == ["[1]"]
    assert one_final["state"] == "SUCCEEDED"
    assert (out / "after").read_text().split() == ["[0,1]"]  # every device came back
    assert after_final["state"] == "SUCCEEDED"


async def test_a_gpu_job_that_cannot_start_gives_its_devices_back(short_tmp: Path) -> None:
    out = short_tmp / "out"
    out.mkdir()
    settings = make_settings(short_tmp, local={"gpus": "7", "max_concurrency": 8})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        broken = [
            await client.submit(
                {"command": ["true"], "cwd": str(short_tmp / "nowhere"), "retry": {"attempts": 1}}
                | {"resources": {"gpus": 1}}
            ),
            await client.submit(
                {"command": [str(short_tmp / "no-such-program")], "retry": {"attempts": 1}}
                | {"resources": {"gpus": 1}}
            ),
        ]
        finals = [await client.wait(job["id"]) for job in broken]
        fine = await client.submit(_devices_job(out, "fine") | {"resources": {"gpus": 1}})
        fine_final = await client.wait(fine["id"])
    assert [f["state"] for f in finals] == ["FAILED", "FAILED"]
    assert [f["exit_code"] for f in finals] == [126, 127]
    assert fine_final["state"] == "SUCCEEDED"
    assert (out / "fine").read_text().split() == ["[7]"]


async def test_a_retried_gpu_job_gets_devices_for_each_attempt_and_keeps_none(
    short_tmp: Path,
) -> None:
    out, marks = short_tmp / "out", short_tmp / "marks"
    out.mkdir()
    # Fails with 75 on its first two attempts, then succeeds.
    retried = _devices_job(
        out, "retried", then=f'echo x >> "{marks}"; [ "$(wc -l < "{marks}")" -ge 3 ]  || exit 75'
    )
    settings = make_settings(short_tmp, local={"gpus": "0,1", "max_concurrency": 8})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        job = await client.submit(
            retried
            | {
                "resources": {"gpus": 2},
                "retry": {"attempts": 3, "exit_codes": [75], "backoff_s": 0},
            }
        )
        final = await client.wait(job["id"])
        after = await client.submit(_devices_job(out, "after") | {"resources": {"gpus": 2}})
        after_final = await client.wait(after["id"])
    assert (final["state"], final["attempt"]) == ("SUCCEEDED", 3)
    assert (out / "retried").read_text().split() == ["[0,1]"] * 3
    assert final["info"]["gpus"] == ["0", "1"]
    assert after_final["state"] == "SUCCEEDED"
    assert (out / "after").read_text().split() == ["[0,1]"]


async def test_a_jobs_own_cuda_visible_devices_cannot_take_another_jobs_gpu(
    short_tmp: Path,
) -> None:
    out, gate = short_tmp / "out", short_tmp / "gate"
    out.mkdir()
    settings = make_settings(
        short_tmp,
        local={
            "gpus": "0,1",
            "max_concurrency": 8,
            "inherit_env": ["PATH", "CUDA_VISIBLE_DEVICES"],
        },
    )
    grab = {"CUDA_VISIBLE_DEVICES": "0,1"}
    async with running(settings), Client(short_tmp / "o.sock") as client:
        holder = await client.submit(
            _devices_job(out, "holder", then=_gated(gate)[2]) | {"resources": {"gpus": 1}}
        )

        async def holding() -> bool:
            return (out / "holder").exists()

        await _until(holding, "the holder runs")
        none = await client.submit(_devices_job(out, "none") | {"env": grab})
        one = await client.submit(
            _devices_job(out, "one") | {"env": grab, "resources": {"gpus": 1}}
        )
        finals = [await client.wait(j["id"]) for j in (none, one)]
        gate.touch()
        await client.wait(holder["id"])
    assert [f["state"] for f in finals] == ["SUCCEEDED", "SUCCEEDED"]
    assert (out / "holder").read_text().split() == ["[0]"]
    assert (out / "none").read_text().split() == ["[]"]  # asked for none: sees none
    assert (out / "one").read_text().split() == ["[1]"]  # its own, not the holder's


async def test_array_children_needing_gpus_never_share_one(short_tmp: Path) -> None:
    held = short_tmp / "held"
    held.mkdir()
    # Each child takes a lock per device it was given (mkdir is atomic), holds it a moment,
    # and fails if another child held it.
    script = (
        'for d in $(echo "$CUDA_VISIBLE_DEVICES" | tr , " "); do '
        f'mkdir "{held}/$d" || exit 9; done; sleep 0.1; '
        f'for d in $(echo "$CUDA_VISIBLE_DEVICES" | tr , " "); do rmdir "{held}/$d"; done; '
        f'echo "$CUDA_VISIBLE_DEVICES" > "{short_tmp}/given-$ORCHESTRATOR_ARRAY_INDEX"'
    )
    settings = make_settings(short_tmp, local={"gpus": "a,b,c", "max_concurrency": 8})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {
                "command": ["sh", "-c", script],
                "array_size": 8,
                "resources": {"gpus": 1},
                "retry": {"attempts": 1},
            }
        )
        final = await client.wait(parent["id"])
    assert final["state"] == "SUCCEEDED", final["reason"]
    given = [(short_tmp / f"given-{i}").read_text().strip() for i in range(8)]
    assert set(given) <= {"a", "b", "c"}


# -- local CPU limits and the cgroups they leave ----------------------------------------------

CPU_V1 = cgroups.probe_cpu_v1(enabled=True, create=False)
MEMORY_V1 = cgroups.probe_memory_v1(enabled=True, create=False)
CPU_V2 = FOUND.enabled and FOUND.cpu == "cpu.max"
needs_a_cpu_cgroup = pytest.mark.skipif(
    not (CPU_V1.enabled or CPU_V2), reason=f"no cpu cgroup this process may make: {CPU_V1.detail}"
)


def _quota_reader() -> list[str]:
    """A job that prints its own CFS quota, as the kernel holds it, in µs per 100 ms."""
    if CPU_V2:
        assert FOUND.root is not None
        where = f'{FOUND.root}/"$ORCHESTRATOR_JOB_ID-$ORCHESTRATOR_ATTEMPT"/cpu.max'
        return ["sh", "-c", f"cut -d' ' -f1 {where}"]
    assert CPU_V1.root is not None
    where = f'{CPU_V1.root}/"$ORCHESTRATOR_JOB_ID-$ORCHESTRATOR_ATTEMPT"/cpu.cfs_quota_us'
    return ["sh", "-c", f"cat {where}"]


def _left_behind(job_ids: list[str]) -> list[Path]:
    """Cgroup directories of these jobs' attempts still there, under every root the daemon
    makes them in."""
    roots = [r for r in (FOUND.root, CPU_V1.root, MEMORY_V1.root) if r is not None]
    return [
        path
        for root in roots
        if root.is_dir()
        for path in root.iterdir()
        if any(path.name.startswith(f"{job_id}-") for job_id in job_ids)
    ]


async def _output(client: Client, job_id: str) -> str:
    return "".join([line.get("data", "") async for line in client.logs(job_id)])


@needs_a_cpu_cgroup
async def test_extreme_cpu_limits_are_clamped_or_kept_and_leave_no_cgroup(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 4})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        tiny = await client.submit({"command": _quota_reader(), "resources": {"cpu": 0.001}})
        huge = await client.submit({"command": _quota_reader(), "resources": {"cpu": 1024}})
        both = await client.submit(
            {"command": _quota_reader(), "resources": {"cpu": 1.5, "memory_mib": 64}}
        )
        jobs = (tiny, huge, both)
        finals = [await client.wait(j["id"]) for j in jobs]
        said = [(await _output(client, j["id"])).strip() for j in jobs]
        with pytest.raises(errors.RemoteError) as over:
            await client.submit({"command": ["true"], "resources": {"cpu": 1024.5}})
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 3, finals
    # The kernel's floor is 1 ms per period; 1,024 CPUs and 1.5 are kept as asked.
    assert said == ["1000", "102400000", "150000"]
    assert over.value.code == "invalid_request"
    assert _left_behind([j["id"] for j in jobs]) == []


@needs_a_cpu_cgroup
async def test_no_attempt_of_a_cpu_limited_job_leaves_a_cgroup_however_it_ends(
    short_tmp: Path,
) -> None:
    marks, gate = short_tmp / "marks", short_tmp / "gate"
    limited = {"resources": {"cpu": 0.5, "memory_mib": 64}}
    settings = make_settings(short_tmp, local={"max_concurrency": 8})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        retried = await client.submit(
            {
                "command": ["sh", "-c", f'echo x >> "{marks}"; [ "$(wc -l < "{marks}")" -ge 3 ]'],
                "retry": {"attempts": 3, "exit_codes": [1], "backoff_s": 0},
            }
            | limited
        )
        no_cwd = await client.submit(
            {"command": ["true"], "cwd": str(short_tmp / "nowhere"), "retry": {"attempts": 1}}
            | limited
        )
        cancelled = await client.submit({"command": _gated(gate)} | limited)
        timed_out = await client.submit(
            {"command": ["sleep", "60"], "timeout_s": 1, "retry": {"attempts": 1}} | limited
        )
        # A leftover process of the job keeps its cgroup populated past the job's own end.
        leftover = await client.submit(
            {"command": ["sh", "-c", "(setsid sleep 60 &) ; exit 0"]} | limited
        )

        async def running_now() -> bool:
            return (await client.get(cancelled["id"]))["state"] == "RUNNING"

        await _until(running_now, "the job to cancel runs")
        await client.cancel(cancelled["id"])
        jobs = (retried, no_cwd, cancelled, timed_out, leftover)
        finals = {j["id"]: await client.wait(j["id"]) for j in jobs}
        left = await asyncio.to_thread(_left_behind, list(finals))
    states = [finals[j["id"]]["state"] for j in jobs]
    assert states == ["SUCCEEDED", "FAILED", "CANCELLED", "FAILED", "SUCCEEDED"], finals
    assert finals[retried["id"]]["attempt"] == 3
    assert left == []


# -- images on ECS (moto behind the fault proxy) ---------------------------------------------

REGISTER = ("ecs", "RegisterTaskDefinition")
DIGEST = "sha256:" + "0123456789abcdef" * 4


async def _run_all(client: Client, specs: list[dict[str, Any]]) -> list[views.Job]:
    submitted = await asyncio.gather(*(client.submit(spec) for spec in specs))
    return list(await asyncio.gather(*(client.wait(job["id"]) for job in submitted)))


def _derived_arns(moto: MotoServer, env: EcsEnv, family: str) -> list[str]:
    """Every revision registered of the families derived from `family`."""
    with moto.client("ecs", env.region) as ecs:
        pages = ecs.get_paginator("list_task_definitions").paginate()
        arns = [arn for page in pages for arn in page["taskDefinitionArns"]]
    return [arn for arn in arns if f":task-definition/{family}-orch-" in arn]


@pytest.mark.usefixtures("proxied_aws_env")
async def test_odd_but_valid_images_run_exactly_as_given_one_registration_each(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record(*REGISTER)
    images = [
        "localhost:5000/team/app_x.y-z:v1.2.3",
        f"registry.example.com/app@{DIGEST}",
        f"registry.example.com:443/a/b/c:tag-1@{DIGEST}",
        "Registry.Example.com/Team/App:Tag",  # letters' case is the registry's business
        "a",
        "1" + "x" * 254,  # 255 characters: the longest a job may name
    ]
    settings = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        # Two jobs per image, at once: single-flight must make one registration of each.
        finals = await _run_all(client, [{"command": ["true"], "image": i} for i in images * 2])
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * len(finals)
    assert fault_proxy.counts[REGISTER] == len(images)
    registered = []
    for request in fault_proxy.requests(*REGISTER):
        (container,) = [c for c in request.json()["containerDefinitions"] if c["name"] == "main"]
        registered.append(container["image"])
    assert sorted(registered) == sorted(images)
    by_image = {(f["image"], f["info"]["task_definition"]) for f in finals}
    assert len(by_image) == len(images)  # both jobs of an image ran under one definition
    assert len(_derived_arns(moto, ecs_env, ecs_env.task_definition)) == len(images)


@pytest.mark.usefixtures("proxied_aws_env")
async def test_one_image_on_two_targets_is_one_definition_per_distinct_base(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    with moto.client("ecs", ecs_env.region) as ecs:
        base = ecs.describe_task_definition(taskDefinition=ecs_env.task_definition)
        kept = ("networkMode", "requiresCompatibilities", "cpu", "memory", "containerDefinitions")
        ecs.register_task_definition(
            family="other-td", **{k: base["taskDefinition"][k] for k in kept}
        )
        ecs.create_cluster(clusterName="twin-cluster")
    targets = {"other": {"task_definition": "other-td"}, "twin": {"cluster": "twin-cluster"}}
    settings = make_settings(
        short_tmp, ecs=ecs_section(ecs_env, targets=targets), jobs={"backend": "ecs"}
    )
    image = "registry.example.com/same:1"
    async with running(settings), Client(short_tmp / "o.sock") as client:
        finals = await _run_all(
            client,
            [{"command": ["true"], "image": image}]
            + [{"command": ["true"], "image": image, "target": t} for t in ("other", "twin")],
        )
    plain, other, twin = (f["info"]["task_definition"] for f in finals)
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 3
    assert plain == twin  # the same base and image: the same content, the same definition
    assert other != plain
    assert ":task-definition/other-td-orch-" in other
    assert fault_proxy.counts[REGISTER] == 2
    assert len(_derived_arns(moto, ecs_env, ecs_env.task_definition)) == 1
    assert len(_derived_arns(moto, ecs_env, "other-td")) == 1


@pytest.mark.usefixtures("proxied_aws_env")
async def test_a_throttled_registration_is_retried_and_commits_once(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    # More throttles than botocore's attempts (2 here) for one call: the start is retried too.
    fault_proxy.throttle(*REGISTER, times=3)
    ecs = ecs_section(ecs_env, max_attempts=2, register_rate_per_s=20.0)
    settings = make_settings(short_tmp, ecs=ecs, jobs={"backend": "ecs"})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        finals = await _run_all(
            client, [{"command": ["true"], "image": "registry.example.com/slow:1"}] * 3
        )
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 3, finals
    assert fault_proxy.counts[REGISTER] == 4  # 2 + 2 tries: a start retry after botocore's
    assert fault_proxy.forwarded[REGISTER] == 1  # the only one that reached AWS
    assert len(_derived_arns(moto, ecs_env, ecs_env.task_definition)) == 1


@pytest.mark.usefixtures("proxied_aws_env")
async def test_a_slow_registration_is_shared_by_every_job_that_needs_it(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.latency(*REGISTER, 1.0)
    settings = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    specs = [
        {"command": ["true"], "image": f"registry.example.com/slow:{i % 2}"} for i in range(12)
    ]
    async with running(settings), Client(short_tmp / "o.sock") as client:
        finals = await _run_all(client, specs)
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * 12
    assert fault_proxy.counts[REGISTER] == 2
    assert len({f["info"]["task_definition"] for f in finals}) == 2
    assert len(_derived_arns(moto, ecs_env, ecs_env.task_definition)) == 2


@pytest.mark.usefixtures("proxied_aws_env")
async def test_a_registration_whose_reply_is_lost_is_not_registered_again(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    def commit_then_fail(request: Request) -> Reply:
        """AWS registers it; the reply is lost on the way back (a 503 in its place)."""
        forwarded = urllib.request.Request(
            moto.endpoint_url + request.path_qs,
            data=request.body,
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            method=request.method,
        )
        with urllib.request.urlopen(forwarded, timeout=30) as reply:
            assert reply.status == 200
        return error_reply("json", 503, "ServiceUnavailable", "reply lost")

    fault_proxy.add_rule(Rule(*REGISTER, commit_then_fail, times=1))
    settings = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        (final,) = await _run_all(
            client, [{"command": ["true"], "image": "registry.example.com/lost:1"}]
        )
    assert final["state"] == "SUCCEEDED"
    arns = _derived_arns(moto, ecs_env, ecs_env.task_definition)
    assert len(arns) == 1, arns


# -- Batch arrays (moto behind the fault proxy) ----------------------------------------------


@pytest.mark.usefixtures("proxied_aws_env")
async def test_a_batch_array_with_an_image_and_its_children_by_every_name(
    short_tmp: Path, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("batch", "SubmitJob")
    fault_proxy.record("batch", "RegisterJobDefinition")
    configured = make_settings(short_tmp, batch=batch_section(batch_env), jobs={"backend": "batch"})
    image = f"registry.example.com:5000/render/frames:2@{DIGEST}"
    async with running(configured), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {"command": ["true"], "array_size": 5, "image": image, "name": "frames"}
        )
        parent_id = parent["id"]
        final = await client.wait(parent_id)
        by_name = await client.get("frames:4")  # a Batch child through its parent's name
        by_prefix = await client.get(f"{parent_id[:10]}:0")
        refusals: dict[str, str] = {}
        for ref in (f"{parent_id}:5", f"{parent_id}:99999", f"{parent_id}:x"):
            with pytest.raises(errors.RemoteError) as refused:
                await client.get(ref)
            refusals[ref] = f"{refused.value.code}: {refused.value}"
        try:
            said = [line async for line in client.logs(f"{parent_id}:2")]
            logs = f"ended {said[-1].get('state')}" if said[-1].get("end") else "no end"
        except errors.RemoteError as exc:
            logs = exc.code
        still = await client.ping()
    assert final["state"] == "SUCCEEDED"
    (submit,) = fault_proxy.requests("batch", "SubmitJob")
    (register,) = fault_proxy.requests("batch", "RegisterJobDefinition")
    assert submit.json()["arrayProperties"] == {"size": 5}
    assert register.json()["containerProperties"]["image"] == image
    assert f":job-definition/{batch_env.job_definition}-orch-" in submit.json()["jobDefinition"]
    assert (by_name["id"], by_name["state"]) == (f"{parent_id}:4", "SUCCEEDED")
    assert by_name["info"]["array_child_of"] == parent_id
    assert by_prefix["id"] == f"{parent_id}:0"
    assert refusals[f"{parent_id}:5"].startswith("not_found")
    assert f"array job {parent_id} has 5 children" in refusals[f"{parent_id}:5"]
    assert refusals[f"{parent_id}:99999"].startswith("not_found")
    assert refusals[f"{parent_id}:x"].startswith("not_found")
    assert logs == "ended SUCCEEDED"  # a Batch child's own log stream, read to its end
    assert still["status"] == "ok"


@pytest.mark.usefixtures("proxied_aws_env")
async def test_batch_fair_share_gets_each_priority_in_range_and_overrides_win(
    short_tmp: Path, moto: MotoServer, batch_env: BatchEnv, fault_proxy: Any
) -> None:
    with moto.client("batch", batch_env.region) as batch:
        queue = batch.describe_job_queues(jobQueues=[batch_env.job_queue])["jobQueues"][0]
        batch.create_job_queue(
            jobQueueName="spot-queue",
            state="ENABLED",
            priority=2,
            computeEnvironmentOrder=queue["computeEnvironmentOrder"],
        )
    fault_proxy.record("batch", "SubmitJob")
    section = batch_section(
        batch_env,
        share_identifier="team-a",
        targets={"spot": {"job_queue": "spot-queue", "share_identifier": "spot-share"}},
    )
    configured = make_settings(short_tmp, batch=section, jobs={"backend": "batch"})
    specs: list[dict[str, Any]] = [
        {"priority": -1000},
        {"priority": 1000},
        {"priority": 0, "array_size": 3},
        {"priority": 7, "target": "spot"},
        {"priority": 5, "overrides": {"schedulingPriorityOverride": 42}},
        {"priority": 5, "overrides": {"shareIdentifier": "own"}},
    ]
    async with running(configured), Client(short_tmp / "o.sock") as client:
        finals = await _run_all(client, [{"command": ["true"], **spec} for spec in specs])
    assert [f["state"] for f in finals] == ["SUCCEEDED"] * len(specs)
    sent = {
        r.json()["tags"]["orchestrator:job-id"]: r.json()
        for r in fault_proxy.requests("batch", "SubmitJob")
    }
    got = [
        (sent[f["id"]]["shareIdentifier"], sent[f["id"]]["schedulingPriorityOverride"])
        for f in finals
    ]
    assert got == [
        ("team-a", 0),
        ("team-a", 2000),
        ("team-a", 1000),
        ("spot-share", 1007),
        ("team-a", 42),
        ("own", 1005),
    ]


async def test_an_array_cancelled_as_it_expands_leaves_no_child_behind(short_tmp: Path) -> None:
    settings = make_settings(short_tmp, local={"max_concurrency": 4})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parents = []
        for delay_s in (0.0, 0.0, 0.005, 0.01, 0.02, 0.05, 0.1):  # before, during, after
            parent = await client.submit({"command": ["sleep", "60"], "array_size": 20})
            await asyncio.sleep(delay_s)
            await client.cancel(parent["id"])
            parents.append(parent["id"])
        finals = [await client.wait(p) for p in parents]
        children = [await _children(client, p) for p in parents]
    assert {(f["state"], f["failure"]) for f in finals} == {("CANCELLED", "cancelled")}
    for kids in children:
        assert len(kids) in (0, 20)  # expanded whole, or not at all
        assert {c["state"] for c in kids} <= {"CANCELLED"}, kids


@pytest.mark.usefixtures("proxied_aws_env")
async def test_an_ecs_array_with_an_image_registers_it_once_for_every_child(
    short_tmp: Path, ecs_env: EcsEnv, fault_proxy: Any
) -> None:
    fault_proxy.record("ecs", "RunTask")
    settings = make_settings(short_tmp, ecs=ecs_section(ecs_env), jobs={"backend": "ecs"})
    async with running(settings), Client(short_tmp / "o.sock") as client:
        parent = await client.submit(
            {"command": ["true"], "array_size": 6, "image": "registry.example.com/fan:1"}
        )
        final = await client.wait(parent["id"])
        children = await _children(client, parent["id"])
    assert final["state"] == "SUCCEEDED"
    assert fault_proxy.counts[REGISTER] == 1
    definitions = {r.json()["taskDefinition"] for r in fault_proxy.requests("ecs", "RunTask")}
    assert len(definitions) == 1
    assert f":task-definition/{ecs_env.task_definition}-orch-" in definitions.pop()
    assert sorted(c["id"] for c in children) == [f"{parent['id']}:{i}" for i in range(6)]
    assert {c["image"] for c in children} == {"registry.example.com/fan:1"}
