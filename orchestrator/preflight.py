"""`orchestrator check`: is this configuration able to run jobs? Checked before you find out.

Every configured backend is asked about what it needs: ECS — the cluster ACTIVE, the task
definition present with `container_name`, the subnets and security groups existing, the awslogs
log group reachable; Batch — the queue ENABLED and VALID with an ENABLED compute environment that
can scale; local — a writable work directory, whether jobs get cgroups of their own (where
they cannot, the daemon falls back to process groups: said, not failed), and with
`local.run_as = "submitter"` whether this process can switch users as the daemon must. The
store's directory must be writable too. Each check is a line with what was found; any failure
makes the command exit non-zero.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator import errors
from orchestrator.backends import _runner, aws, cgroups, users
from orchestrator.ratelimit import Priority
from orchestrator.settings import BatchSettings, EcsSettings, Settings


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Probe = Callable[[], Awaitable[str]]  # returns what it found; raises `Failed` (or AwsError)


class Failed(Exception):
    """A check found something wrong; the message says what."""


async def _run(name: str, probe: Probe) -> Check:
    try:
        return Check(name, True, await probe())
    except Failed as exc:
        return Check(name, False, str(exc))
    except errors.OrchestratorError as exc:
        return Check(name, False, exc.message)


async def run(settings: Settings) -> list[Check]:
    checks = [await _run("store", lambda: _writable(settings.store.path.parent))]
    if settings.local.enabled:
        checks.append(await _run("local", lambda: _writable(settings.local_work_dir())))
        checks.append(await _run("local.cgroup", lambda: _cgroup(settings)))
        if settings.local.run_as == "submitter":
            checks.append(await _run("local.run_as", _run_as_submitter))
    if settings.ecs.enabled:
        checks += await _ecs(settings.ecs)
    if settings.batch.enabled:
        checks += await _batch(settings.batch)
    return checks


async def _writable(directory: Path) -> str:
    def probe() -> str:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".check-"):
            pass
        return f"{directory} is writable"

    try:
        return await asyncio.to_thread(probe)
    except OSError as exc:
        raise Failed(f"{directory}: {exc.strerror}") from exc


async def _cgroup(settings: Settings) -> str:
    """What the daemon would find, as seen from this process's cgroup (so run it where the
    daemon runs): nothing is made or moved."""
    found = cgroups.probe(
        enabled=settings.local.cgroup == "auto", root=settings.local.cgroup_root, create=False
    )
    if found.enabled:
        kill = "cgroup.kill" if found.kill_file else "no cgroup.kill: each member is killed"
        return f"{found.detail} ({kill})"
    if settings.local.cgroup == "off":
        return found.detail
    return (
        f"unavailable, jobs fall back to process groups (what a job starts outside its group "
        f"survives cancel and timeouts): {found.detail}"
    )


async def _run_as_submitter() -> str:
    """Whether this process could run jobs as their submitters, as the daemon checks at start-up
    (so run it as the daemon runs: its user, its capabilities)."""
    why = await users.check(Path(_runner.__file__))
    if why is not None:
        raise Failed(errors.CannotRunAsSubmitter(why).message)
    return "submitter: this process can run jobs as other users (CAP_SETUID, CAP_SETGID, CAP_KILL)"


def _api(service: str, settings: EcsSettings | BatchSettings) -> aws.AwsApi:
    return aws.AwsApi(service, buckets={}, **aws.client_options(settings))


async def _ecs(s: EcsSettings) -> list[Check]:
    ecs, ec2, logs = _api("ecs", s), _api("ec2", s), _api("logs", s)
    for api in (ecs, ec2, logs):
        await api.start()
    try:

        async def cluster() -> str:
            reply = await ecs.call("DescribeClusters", Priority.HIGH, clusters=[s.cluster])
            found = reply.get("clusters") or []
            if not found or found[0].get("status") != "ACTIVE":
                status = found[0].get("status") if found else "missing"
                raise Failed(f"cluster {s.cluster!r} is {status}")
            return f"cluster {s.cluster!r} is ACTIVE"

        definition: dict[str, Any] = {}

        async def task_definition() -> str:
            reply = await ecs.call(
                "DescribeTaskDefinition", Priority.HIGH, taskDefinition=s.task_definition
            )
            definition.update(reply["taskDefinition"])
            names = [c.get("name") for c in definition.get("containerDefinitions", [])]
            if s.container_name not in names:
                raise Failed(
                    f"{definition['taskDefinitionArn']} has no container {s.container_name!r} "
                    f"(it has {', '.join(map(str, names))})"
                )
            return f"{definition['taskDefinitionArn']} has container {s.container_name!r}"

        async def network() -> str:
            if not s.subnets and not s.security_groups:
                return "no awsvpc subnets or security groups configured"
            if s.subnets:
                subnets = await ec2.call("DescribeSubnets", Priority.HIGH, SubnetIds=s.subnets)
                if len(subnets.get("Subnets", [])) != len(s.subnets):
                    raise Failed(f"some of the subnets {s.subnets} do not exist")
            if s.security_groups:
                groups = await ec2.call(
                    "DescribeSecurityGroups", Priority.HIGH, GroupIds=s.security_groups
                )
                if len(groups.get("SecurityGroups", [])) != len(s.security_groups):
                    raise Failed(f"some of the security groups {s.security_groups} do not exist")
            return f"subnets {s.subnets} and security groups {s.security_groups} exist"

        async def log_group() -> str:
            container: dict[str, Any] = next(
                (
                    c
                    for c in definition.get("containerDefinitions", [])
                    if c.get("name") == s.container_name
                ),
                {},
            )
            options = (container.get("logConfiguration") or {}).get("options") or {}
            group = options.get("awslogs-group")
            if not group:
                raise Failed(
                    f"container {s.container_name!r} has no awslogs log group: "
                    "`orchestrator logs` cannot work"
                )
            return await _log_group(logs, group)

        return [
            await _run("ecs.cluster", cluster),
            await _run("ecs.task_definition", task_definition),
            await _run("ecs.network", network),
            await _run("ecs.logs", log_group),
        ]
    finally:
        for api in (ecs, ec2, logs):
            await api.close()


async def _log_group(logs: aws.AwsApi, group: str) -> str:
    reply = await logs.call("DescribeLogGroups", Priority.HIGH, logGroupNamePrefix=group)
    if not any(g.get("logGroupName") == group for g in reply.get("logGroups", [])):
        raise Failed(f"log group {group!r} does not exist (or is not readable)")
    return f"log group {group!r} is reachable"


async def _batch(s: BatchSettings) -> list[Check]:
    batch, logs = _api("batch", s), _api("logs", s)
    for api in (batch, logs):
        await api.start()
    try:

        async def queue() -> str:
            reply = await batch.call("DescribeJobQueues", Priority.HIGH, jobQueues=[s.job_queue])
            queues = reply.get("jobQueues") or []
            if not queues:
                raise Failed(f"job queue {s.job_queue!r} does not exist")
            q = queues[0]
            if q.get("state") != "ENABLED" or q.get("status") != "VALID":
                raise Failed(f"job queue {s.job_queue!r} is {q.get('state')}/{q.get('status')}")
            environments = [o["computeEnvironment"] for o in q.get("computeEnvironmentOrder", [])]
            if not environments:
                raise Failed(f"job queue {s.job_queue!r} has no compute environment")
            described = await batch.call(
                "DescribeComputeEnvironments", Priority.HIGH, computeEnvironments=environments
            )
            usable = [
                env["computeEnvironmentName"]
                for env in described.get("computeEnvironments", [])
                if env.get("state") == "ENABLED"
                and env.get("status") == "VALID"
                and (
                    env.get("type") == "UNMANAGED"
                    or (env.get("computeResources") or {}).get("maxvCpus", 0) > 0
                )
            ]
            if not usable:
                raise Failed(
                    f"no compute environment of {s.job_queue!r} is ENABLED, VALID and able to scale"
                )
            return f"job queue {s.job_queue!r} is ENABLED/VALID; compute: {', '.join(usable)}"

        async def definition() -> str:
            name = str(s.job_definition)
            # "name:revision" and ARNs are looked up as such, a bare name by its ACTIVE revisions
            by = {"jobDefinitions": [name]} if ":" in name else {"jobDefinitionName": name}
            reply = await batch.call("DescribeJobDefinitions", Priority.HIGH, status="ACTIVE", **by)
            if not reply.get("jobDefinitions"):
                raise Failed(f"job definition {name!r} is not ACTIVE (or does not exist)")
            return f"job definition {name!r} is ACTIVE"

        async def log_group() -> str:
            return await _log_group(logs, "/aws/batch/job")

        return [
            await _run("batch.queue", queue),
            await _run("batch.job_definition", definition),
            await _run("batch.logs", log_group),
        ]
    finally:
        for api in (batch, logs):
            await api.close()


def environment_summary() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return f"AWS endpoint: {endpoint}" if endpoint else "AWS endpoint: the default for the Region"
