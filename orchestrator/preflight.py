"""`orchestrator check`: is this configuration able to run jobs? Checked before you find out.

The store's directory must be writable; then every configured backend checks what it needs
(`check()` of each backend: ECS — the cluster ACTIVE, the task definition present with
`container_name`, the subnets and security groups existing, the awslogs log group reachable;
Batch — the queue ENABLED and VALID with an ENABLED compute environment that can scale; local —
`backends/local_check.py`: a writable work directory, cgroups or the fallback to process groups,
with `local.run_as = "submitter"` whether this process can switch users as the daemon must, and
whether jobs will see the daemon's state). An AWS backend with `events.queue_url` set also
checks its events (`backends/events_setup.check`): the queue readable, a rule sending its state
changes there, a queue policy letting EventBridge send.
Each check is a line with what was found; any failure makes the command exit non-zero.
"""

from __future__ import annotations

import os

from orchestrator.backends import local_check
from orchestrator.backends.base import Check, checked
from orchestrator.settings import Settings

__all__ = ["Check", "environment_summary", "run"]


async def run(settings: Settings) -> list[Check]:
    from orchestrator.daemon import build_backends  # the backends the daemon would build

    checks = [await checked("store", lambda: local_check.writable(settings.store.path.parent))]
    for backend in build_backends(settings).values():  # unstarted: `check()` needs no start
        try:
            checks += await backend.check()
        finally:
            await backend.close()
    for name in ("ecs", "batch"):
        section = getattr(settings, name)
        if section.enabled and section.events.queue_url:
            from orchestrator.backends import events_setup  # imports aioboto3: only when used

            checks += await events_setup.check(name, settings)
    return checks


def environment_summary() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return f"AWS endpoint: {endpoint}" if endpoint else "AWS endpoint: the default for the Region"
