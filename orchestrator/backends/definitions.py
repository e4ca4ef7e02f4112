"""Content-addressed task and job definitions: what a job's `image` runs as on ECS and Batch.

A job that names an image runs under a definition derived from its target's configured one
(that container's image replaced). The derived definition is addressed by its content: the
SHA-256 of its registration kwargs (`digest`), which also names it (`<family>-orch-<12 hex>`)
and tags it (`orchestrator:definition-digest`). So:

- it is registered once per distinct content, never once per job: the digest → ARN map is kept
  in memory and in the store (`Memory`), and a lost map is rebuilt from AWS (the definition
  named after the digest, carrying its tag) before anything is registered. An ARN from the
  store is checked once per process (still ACTIVE? someone may have deregistered it), and one
  a launch was refused with is forgotten (`forget`): the next job finds or registers it again;
- registrations of one name are single-flight (jobs with the same image wait for the one call,
  Prefect's "Too many concurrent attempts to create a new revision" cannot happen), and all of
  them draw from the backend's register token bucket (`register_rate_per_s`);
- a configured definition that changes (a new revision of its family) changes the digest: the
  configured one is read again every `BASE_TTL_S`, and jobs after that get a definition derived
  from the new one.

The backend supplies what differs between ECS and Batch (`Vendor`): reading the configured
definition, finding a derived one by name, registering one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
import structlog

log = structlog.get_logger("orchestrator.backends.definitions")

DIGEST_TAG = "orchestrator:definition-digest"
BASE_TTL_S = 300.0  # how long a configured definition, as read, is derived from
_NAME_LIMIT = 128  # Batch job definition names; ECS families take 255


class Memory(Protocol):
    """Where digest → ARN survives a restart (the daemon's store)."""

    async def definition(self, backend: str, digest: str) -> str | None: ...

    async def remember_definition(self, backend: str, digest: str, arn: str) -> None: ...


class Vendor(Protocol):
    """What one backend does with its definitions."""

    async def base_definition(self, target: str | None) -> dict[str, Any]:
        """The target's configured definition as registration kwargs (its name included)."""
        ...

    def with_image(self, base: Mapping[str, Any], image: str) -> dict[str, Any]:
        """`base` with the job's container running `image`."""
        ...

    async def find(self, name: str, digest: str) -> str | None:
        """The ARN of an ACTIVE definition called `name` tagged with `digest`, if AWS has one."""
        ...

    async def active(self, arn: str) -> bool:
        """Whether the definition `arn` is still ACTIVE (it can be launched)."""
        ...

    async def register(self, kwargs: Mapping[str, Any], digest: str) -> str:
        """Register `kwargs` tagged with `digest`; its ARN."""
        ...


def digest_of(kwargs: Mapping[str, Any]) -> str:
    """The SHA-256 of registration kwargs, written canonically (sorted keys, no spaces)."""
    return hashlib.sha256(orjson.dumps(kwargs, option=orjson.OPT_SORT_KEYS)).hexdigest()


def derived_name(base_name: str, digest: str) -> str:
    """The name of the definition derived from `base_name` with this digest."""
    suffix = f"-orch-{digest[:12]}"
    return base_name[: _NAME_LIMIT - len(suffix)] + suffix


class Registry:
    """Digest → ARN for one backend: remembered, found again, or registered once."""

    def __init__(
        self,
        backend: str,
        vendor: Vendor,
        name_key: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._vendor = vendor
        self._name_key = name_key  # "family" (ECS) or "jobDefinitionName" (Batch)
        self._clock = clock
        self._known: dict[str, str] = {}
        self._bases: dict[str | None, tuple[float, dict[str, Any]]] = {}  # read when, as what
        self._flights: dict[str, asyncio.Future[str]] = {}
        self.memory: Memory | None = None
        self.registered = 0  # registrations made by this process (tests, metrics)

    def forget(self, arn: str) -> None:
        """A launch under `arn` was refused: look it up again (in AWS) before the next."""
        self._known = {digest: known for digest, known in self._known.items() if known != arn}

    async def arn(self, target: str | None, image: str) -> str:
        """The ARN of the definition that runs `image` on `target`, registered if need be."""
        now = self._clock()
        read = self._bases.get(target)
        if read is None or now - read[0] >= BASE_TTL_S:
            read = self._bases[target] = (now, await self._vendor.base_definition(target))
        base = read[1]
        kwargs = self._vendor.with_image(base, image)
        digest = digest_of(kwargs)
        if (known := self._known.get(digest)) is not None:
            return known
        flight = self._flights.get(digest)
        if flight is None:  # the first asker does the work; the others wait for its answer
            flight = asyncio.get_running_loop().create_future()
            self._flights[digest] = flight
            try:
                flight.set_result(await self._resolve(kwargs, digest))
            except asyncio.CancelledError:
                flight.cancel()  # the daemon is stopping: so are those waiting with it
                raise
            except Exception as exc:
                flight.set_exception(exc)
                flight.exception()  # retrieved: the waiters (if any) get it too
            finally:
                del self._flights[digest]
        return await asyncio.shield(flight)

    async def _resolve(self, kwargs: Mapping[str, Any], digest: str) -> str:
        name = derived_name(str(kwargs[self._name_key]), digest)
        how = "remembered"
        arn = None if self.memory is None else await self.memory.definition(self._backend, digest)
        if arn is not None and not await self._vendor.active(arn):
            log.warning("definition.inactive", backend=self._backend, digest=digest, arn=arn)
            arn = None
        if arn is None:
            how = "found"
            arn = await self._vendor.find(name, digest)
        if arn is None:
            how = "registered"
            arn = await self._vendor.register({**kwargs, self._name_key: name}, digest)
            self.registered += 1
        if how != "remembered" and self.memory is not None:
            # (a definition found or registered again replaces an inactive one remembered)
            await self.memory.remember_definition(self._backend, digest, arn)
        self._known[digest] = arn
        log.info("definition.resolved", backend=self._backend, digest=digest, arn=arn, how=how)
        return arn
