"""`orchestrator check`: is this configuration able to run jobs? Checked before you find out.

The store's directory must be writable; then every configured backend checks what it needs
(`check()` of each backend: ECS — the cluster ACTIVE, the task definition present with
`container_name`, the subnets and security groups existing, the awslogs log group reachable;
Batch — the queue ENABLED and VALID with an ENABLED compute environment that can scale; local —
`backends/local_check.py`: a writable work directory, cgroups or the fallback to process groups,
and with `local.run_as = "submitter"` whether this process can switch users as the daemon must).
Each check is a line with what was found; any failure makes the command exit non-zero.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from orchestrator.backends import local_check
from orchestrator.backends.base import Check, checked
from orchestrator.ratelimit import TokenBucket
from orchestrator.settings import Settings

if TYPE_CHECKING:
    from orchestrator.backends.batch import BatchBackend
    from orchestrator.backends.ecs import EcsBackend

__all__ = ["Check", "environment_summary", "run"]


async def run(settings: Settings) -> list[Check]:
    checks = [await checked("store", lambda: local_check.writable(settings.store.path.parent))]
    if settings.local.enabled:
        checks += await local_check.check(settings.local, settings.local_work_dir())
    for backend in _aws_backends(settings):
        try:
            checks += await backend.check()
        finally:
            await backend.close()
    return checks


def _aws_backends(settings: Settings) -> list[EcsBackend | BatchBackend]:
    """The AWS backends the daemon would build, unstarted: `check()` starts the clients it
    needs (aioboto3 is imported only when one is on)."""
    backends: list[EcsBackend | BatchBackend] = []
    logs_bucket = TokenBucket("logs", settings.cloudwatch.rate_per_s, settings.cloudwatch.burst)
    if settings.ecs.enabled:
        from orchestrator.backends.ecs import EcsBackend

        backends.append(EcsBackend(settings.ecs, logs_bucket))
    if settings.batch.enabled:
        from orchestrator.backends.batch import BatchBackend

        backends.append(BatchBackend(settings.batch, logs_bucket))
    return backends


def environment_summary() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return f"AWS endpoint: {endpoint}" if endpoint else "AWS endpoint: the default for the Region"
