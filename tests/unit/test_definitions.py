"""`backends.definitions.Registry`: one registration per distinct content however many jobs ask
at once, what is remembered or found never registered again, and a failure reaching every
job that waited for it (the next ask tries again)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator import errors, events
from orchestrator.backends import definitions
from orchestrator.testing import FakeDefinitionVendor as Vendor
from orchestrator.testing import InMemoryStore


async def test_concurrent_asks_for_one_image_make_one_registration() -> None:
    vendor = Vendor()
    registry = definitions.Registry("ecs", vendor, "family")
    vendor.gate.clear()
    asks = [asyncio.create_task(registry.arn(None, f"img:{i % 3}")) for i in range(50)]
    await asyncio.sleep(0.01)
    vendor.gate.set()
    arns = await asyncio.gather(*asks)
    assert len(vendor.registered) == 3
    assert len(set(arns)) == 3
    assert arns[0] == arns[3] == arns[48]
    assert all(r["family"].startswith("app-default-orch-") for r in vendor.registered)
    assert await registry.arn("gpu", "img:0") != arns[0]  # another target, another definition
    assert len(vendor.registered) == 4


async def test_remembered_and_found_definitions_are_not_registered_again() -> None:
    vendor = Vendor()
    store = InMemoryStore(events.Hub())
    await store.open()
    first = definitions.Registry("ecs", vendor, "family")
    first.memory = store
    arn = await first.arn(None, "img:1")
    restarted = definitions.Registry("ecs", vendor, "family")  # same store: remembered
    restarted.memory = store
    finds = vendor.finds
    assert await restarted.arn(None, "img:1") == arn
    assert vendor.finds == finds  # not even looked up in AWS
    lost = definitions.Registry("ecs", vendor, "family")  # no store: found in AWS by its tag
    assert await lost.arn(None, "img:1") == arn
    assert len(vendor.registered) == 1


async def test_a_failed_registration_reaches_every_waiter_and_the_next_ask_tries_again() -> None:
    vendor = Vendor()
    registry = definitions.Registry("batch", vendor, "family")
    vendor.fail = errors.StartFailed("AccessDenied", retryable=False, failure="rejected")
    vendor.gate.clear()
    asks = [asyncio.create_task(registry.arn(None, "img:1")) for _ in range(5)]
    await asyncio.sleep(0.01)
    vendor.gate.set()
    outcomes = await asyncio.gather(*asks, return_exceptions=True)
    assert all(isinstance(o, errors.StartFailed) for o in outcomes)
    vendor.fail = None
    assert (await registry.arn(None, "img:1")).startswith("arn:td/app-default-orch-")


async def test_a_cancelled_first_ask_cancels_its_waiters_and_leaves_nothing_behind() -> None:
    vendor = Vendor()
    registry = definitions.Registry("ecs", vendor, "family")
    vendor.gate.clear()
    first = asyncio.create_task(registry.arn(None, "img:1"))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(registry.arn(None, "img:1"))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    vendor.gate.set()
    assert (await registry.arn(None, "img:1")).startswith("arn:td/")
    assert len(vendor.registered) == 1


def test_names_are_derived_within_the_limit() -> None:
    digest = definitions.digest_of({"b": 1, "a": [1, 2]})
    assert digest == definitions.digest_of({"a": [1, 2], "b": 1})  # canonical: key order moot
    name = definitions.derived_name("x" * 300, digest)
    assert len(name) == 128
    assert name.endswith(f"-orch-{digest[:12]}")


async def test_a_remembered_definition_deregistered_since_is_registered_again() -> None:
    vendor = Vendor()
    store = InMemoryStore(events.Hub())
    await store.open()
    first = definitions.Registry("ecs", vendor, "family")
    first.memory = store
    old = await first.arn(None, "img:1")
    vendor.inactive.add(old)  # deregistered by someone, while no daemon ran
    restarted = definitions.Registry("ecs", vendor, "family")
    restarted.memory = store
    new = await restarted.arn(None, "img:1")
    assert new != old
    assert new.endswith(":2")
    assert len(vendor.registered) == 2
    again = definitions.Registry("ecs", vendor, "family")
    again.memory = store
    assert await again.arn(None, "img:1") == new  # the store now says the new one


async def test_a_refused_definition_is_looked_up_again_for_the_next_job() -> None:
    vendor = Vendor()
    registry = definitions.Registry("batch", vendor, "family")
    old = await registry.arn(None, "img:1")
    assert await registry.arn(None, "img:1") == old
    assert len(vendor.registered) == 1
    vendor.inactive.add(old)
    assert await registry.arn(None, "img:1") == old  # known: not asked again...
    registry.forget(old)  # ...until a launch under it is refused
    assert await registry.arn(None, "img:1") != old
    assert len(vendor.registered) == 2


async def test_a_new_revision_of_the_configured_definition_is_derived_from_in_time() -> None:
    vendor = Vendor()
    now = [0.0]
    registry = definitions.Registry("ecs", vendor, "family", clock=lambda: now[0])
    before = await registry.arn(None, "img:1")
    vendor.base_memory = "1024"  # a new revision of the configured definition
    now[0] += definitions.BASE_TTL_S - 1
    assert await registry.arn(None, "img:1") == before  # read at most every BASE_TTL_S
    assert vendor.base_reads == 1
    now[0] += 1
    after = await registry.arn(None, "img:1")
    assert after != before
    assert vendor.registered[-1]["memory"] == "1024"
    assert vendor.base_reads == 2
