"""`orchestrator events setup` and the events part of `orchestrator check` (issue #17): the SQS
queue the daemon reads state-change events from, its policy, and the EventBridge rule that
sends them there.

One queue and one rule per backend cover the section and all its targets: they share its
account and Region, so the rule's pattern lists the ARN of every cluster (ECS, matched on
`detail.clusterArn`) or job queue (Batch, `detail.jobQueue`) the settings name. `plan` only
reads (so `--dry-run` changes nothing) and says, per resource, whether it would be created,
updated or left unchanged, with the request it would send; `apply` sends those requests.
Running it again changes nothing: every resource is compared with what it should be first.

Every AWS call goes through `_Aws`, which refuses operations not listed in `OPERATIONS` (the
tests hold the IAM policies in deploy/events/ to that list) and turns AWS's errors into
messages naming the resource and, for a refusal, the IAM action and the policy file listing
what is needed.

About 700 lines, past the usual 500: the plan, its application and the checks share the
resolution of the settings into ARNs and the idea of the right pattern and queue policy, and
are kept together so that what `setup` makes and what `check` accepts cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from orchestrator import errors
from orchestrator.backends import base
from orchestrator.backends.aws_api import AwsApi, client_options
from orchestrator.settings import AwsBackendSettings, Settings

SETUP_POLICY = "deploy/events/setup-iam-policy.json"
DAEMON_POLICY = "deploy/events/iam-policy.json"
TARGET_ID = "orchestrator-sqs"
EVENTS_PRINCIPAL = "events.amazonaws.com"
WAIT_S = 20  # the queue's ReceiveMessageWaitTimeSeconds: long polls unless a call says otherwise
RETENTION_S = 86400  # older events are worthless: the sweep has described those jobs since

# Every AWS operation this module calls, as (service, operation); the IAM action of each is
# "service:operation". `setup` needs SETUP_OPERATIONS; `check` (as the daemon) CHECK_OPERATIONS.
RESOLVE_OPERATIONS = (("ecs", "DescribeClusters"), ("batch", "DescribeJobQueues"))
SETUP_OPERATIONS = (
    *RESOLVE_OPERATIONS,
    ("sqs", "GetQueueUrl"),
    ("sqs", "GetQueueAttributes"),
    ("sqs", "CreateQueue"),
    ("sqs", "SetQueueAttributes"),
    ("events", "DescribeRule"),
    ("events", "PutRule"),
    ("events", "ListTargetsByRule"),
    ("events", "PutTargets"),
)
CHECK_OPERATIONS = (
    *RESOLVE_OPERATIONS,
    ("sqs", "GetQueueAttributes"),
    ("sqs", "ReceiveMessage"),
    ("events", "ListRuleNamesByTarget"),
    ("events", "DescribeRule"),
)
OPERATIONS = frozenset(SETUP_OPERATIONS + CHECK_OPERATIONS)

_MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_MISSING_RULE = frozenset({"ResourceNotFoundException"})
_DENIED = re.compile(r"AccessDenied|Unauthorized|AuthorizationError|NotAuthorized")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_RULE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EventsSetupFailed(errors.OrchestratorError):
    """`orchestrator events setup` could not read or make what it needs: nothing after the
    step that failed was done."""

    code = "events_setup_failed"


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What tells one backend's state changes apart."""

    source: str
    detail_type: str
    field: str  # the detail field holding the ARN of the cluster or job queue
    setting: str  # the settings key naming it
    noun: str


KINDS = {
    "ecs": _Kind("aws.ecs", "ECS Task State Change", "clusterArn", "cluster", "cluster"),
    "batch": _Kind("aws.batch", "Batch Job State Change", "jobQueue", "job_queue", "job queue"),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """A cluster or job queue whose state changes the rule must send: the setting naming it."""

    setting: str  # "ecs.cluster", "ecs.targets.gpu.cluster"
    given: str
    arn: str


@dataclasses.dataclass(frozen=True)
class Action:
    """One resource's verdict, and the request that carries it out (none when unchanged)."""

    resource: Literal["queue", "queue policy", "rule", "target"]
    name: str
    verdict: Literal["create", "update", "unchanged"]
    service: str
    operation: str
    request: Mapping[str, Any]  # without QueueUrl when the queue is still to be created
    changes: tuple[str, ...] = ()
    needs_queue_url: bool = False

    def to_dict(self, *, done: bool) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "name": self.name,
            "action": self.verdict,
            "done": done and self.verdict != "unchanged",
            "call": None if self.verdict == "unchanged" else f"{self.service}:{self.operation}",
            "request": None if self.verdict == "unchanged" else self.shown_request(),
            "changes": list(self.changes),
        }

    def shown_request(self, queue_url: str | None = None) -> dict[str, Any]:
        if not self.needs_queue_url:
            return dict(self.request)
        return {"QueueUrl": queue_url or "<the URL CreateQueue returns>", **self.request}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `setup` found and would do; made by reads only."""

    backend: str
    client: Mapping[str, Any]  # `AwsApi` options of the backend's section
    region: str
    account: str
    sources: tuple[Source, ...]
    queue_name: str
    queue_arn: str
    queue_url: str | None  # None: the queue does not exist yet
    rule_name: str
    rule_arn: str
    actions: tuple[Action, ...]
    configured_url: str | None  # the section's `events.queue_url` now


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A plan, and whether it was carried out (False: a dry run)."""

    plan: Plan
    applied: bool
    queue_url: str | None


def default_names(backend: str) -> tuple[str, str]:
    return f"orchestrator-{backend}-events", f"orchestrator-{backend}-state-changes"


def bad_name(kind: Literal["queue", "rule"], name: str) -> str | None:
    """Why `name` cannot name the queue or the rule (None: it can)."""
    if kind == "queue":
        if name.endswith(".fifo"):
            return "a FIFO queue cannot be used: EventBridge would need a message group per event"
        if not _QUEUE_NAME.match(name):
            return "an SQS queue name is 1 to 80 letters, digits, '-' or '_'"
    elif not _RULE_NAME.match(name):
        return "an EventBridge rule name is 1 to 64 letters, digits, '.', '-' or '_'"
    return None


class _Aws:
    """The clients of one run. Errors come out as `EventsSetupFailed` naming the resource."""

    def __init__(self, backend: str, options: Mapping[str, Any], policy_file: str) -> None:
        self._apis = {s: AwsApi(s, buckets={}, **options) for s in ("sqs", "events", backend)}
        self._policy_file = policy_file

    async def __aenter__(self) -> _Aws:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for api in self._apis.values():
            await api.close()

    async def find(
        self, service: str, operation: str, what: str, missing: frozenset[str], **kw: Any
    ) -> dict[str, Any] | None:
        """`call`, but None when AWS answers that `what` does not exist (`missing` codes)."""
        try:
            return await self._call(service, operation, **kw)
        except errors.AwsRejected as exc:
            if exc.aws_code in missing:
                return None
            raise EventsSetupFailed(self._explain(exc, what)) from exc
        except errors.AwsError as exc:
            raise EventsSetupFailed(self._explain(exc, what)) from exc

    async def call(self, service: str, operation: str, what: str, **kw: Any) -> dict[str, Any]:
        try:
            return await self._call(service, operation, **kw)
        except errors.AwsError as exc:
            raise EventsSetupFailed(self._explain(exc, what)) from exc

    async def _call(self, service: str, operation: str, **kw: Any) -> dict[str, Any]:
        assert (service, operation) in OPERATIONS, f"{service}:{operation} is not in OPERATIONS"
        return await self._apis[service].call(operation, **kw)

    def _explain(self, exc: errors.AwsError, what: str) -> str:
        action = f"{exc.service}:{exc.operation}"
        said = f"{exc.aws_code}: {exc.aws_message}"
        if _DENIED.search(exc.aws_code):
            return (
                f"{what}: {action} was refused ({said}): this identity may not call {action}; "
                f"{self._policy_file} lists every permission needed"
            )
        if isinstance(exc, errors.AwsCredentials):
            return f"{what}: AWS refused the credentials ({said}) on {action}"
        if isinstance(exc, errors.AwsUnreachable):
            return f"{what}: the {exc.service} endpoint did not answer {action} ({said})"
        return f"{what}: {action} failed: {said}"


# -- what the settings name --------------------------------------------------------------------


def _section(backend: str, settings: Settings) -> AwsBackendSettings:
    if backend not in KINDS:
        raise EventsSetupFailed(f"no events for backend {backend!r} (only ecs and batch)")
    section: AwsBackendSettings = getattr(settings, backend)
    return section


def _named(backend: str, section: AwsBackendSettings) -> list[tuple[str, str]]:
    """(setting, value) of every cluster or job queue of the section and its targets."""
    kind = KINDS[backend]
    named = []
    for target, each in section.each_target().items():
        key = backend if target is None else f"{backend}.targets.{target}"
        key += f".{kind.setting}"
        value = getattr(each, kind.setting)
        if not value:
            raise EventsSetupFailed(f"{key} is not set: the rule needs every {kind.noun}")
        named.append((key, str(value)))
    return named


async def _resolve(aws: _Aws, backend: str, section: AwsBackendSettings) -> tuple[Source, ...]:
    """The ARN of each cluster or job queue the settings name; a missing one is an error
    naming it and its setting."""
    named = _named(backend, section)
    wanted = list(dict.fromkeys(value for _, value in named))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 100):
        chunk = wanted[start : start + 100]
        if backend == "ecs":
            what = f"ECS clusters {', '.join(chunk)}"
            reply = await aws.call("ecs", "DescribeClusters", what, clusters=chunk)
            for c in reply.get("clusters") or []:
                if c.get("status") != "INACTIVE":
                    found[c["clusterName"]] = found[c["clusterArn"]] = c["clusterArn"]
        else:
            what = f"Batch job queues {', '.join(chunk)}"
            reply = await aws.call("batch", "DescribeJobQueues", what, jobQueues=chunk)
            for q in reply.get("jobQueues") or []:
                found[q["jobQueueName"]] = found[q["jobQueueArn"]] = q["jobQueueArn"]
    missing = [f"{value!r} ({key})" for key, value in named if value not in found]
    if missing:
        noun = KINDS[backend].noun
        raise EventsSetupFailed(
            f"no {noun} {', '.join(missing)} in this account and Region: the rule can only "
            f"match {noun}s that exist (check the settings, or create the {noun} first)"
        )
    return tuple(Source(key, value, found[value]) for key, value in named)


def pattern(backend: str, sources: Sequence[Source]) -> dict[str, Any]:
    """The rule's event pattern: this backend's state changes of these clusters or queues."""
    kind = KINDS[backend]
    arns = sorted({s.arn for s in sources})
    return {
        "source": [kind.source],
        "detail-type": [kind.detail_type],
        "detail": {kind.field: arns},
    }


def statement(queue_arn: str, rule_arn: str, rule_name: str) -> dict[str, Any]:
    """The queue policy's statement that lets the rule (and only it) send to the queue."""
    return {
        "Sid": f"orchestrator-events-{rule_name}",
        "Effect": "Allow",
        "Principal": {"Service": EVENTS_PRINCIPAL},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}},
    }


def _canonical(value: Any) -> Any:
    """A pattern with its lists sorted: the same pattern whatever the order it was written in."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    return value


def _loads(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _statements(policy: Any) -> list[dict[str, Any]]:
    found = policy.get("Statement", []) if isinstance(policy, dict) else []
    listed = found if isinstance(found, list) else [found]
    return [s for s in listed if isinstance(s, dict)]


# -- plan --------------------------------------------------------------------------------------


async def plan(
    backend: str, settings: Settings, queue_name: str | None = None, rule_name: str | None = None
) -> Plan:
    """Read what exists and decide, per resource, what `apply` must send. Calls only reads."""
    section = _section(backend, settings)
    default_queue, default_rule = default_names(backend)
    queue_name, rule_name = queue_name or default_queue, rule_name or default_rule
    if why := bad_name("queue", queue_name):
        raise EventsSetupFailed(f"queue name {queue_name!r}: {why}")
    if why := bad_name("rule", rule_name):
        raise EventsSetupFailed(f"rule name {rule_name!r}: {why}")
    options = client_options(section)
    async with _Aws(backend, options, SETUP_POLICY) as aws:
        sources = await _resolve(aws, backend, section)
        partition, _, region, account, _ = sources[0].arn.split(":", 5)[1:]
        url, attributes = await _read_queue(aws, queue_name)
        queue_arn = (
            attributes.get("QueueArn") or f"arn:{partition}:sqs:{region}:{account}:{queue_name}"
        )
        what = f"EventBridge rule {rule_name!r}"
        rule = await aws.find("events", "DescribeRule", what, _MISSING_RULE, Name=rule_name)
        rule_arn = f"arn:{partition}:events:{region}:{account}:rule/{rule_name}"
        rule_arn = (rule or {}).get("Arn") or rule_arn
        actions = (
            *_queue_actions(queue_name, url, attributes, section.events.visibility_timeout_s),
            _policy_action(queue_name, url, attributes, statement(queue_arn, rule_arn, rule_name)),
            _rule_action(backend, rule_name, rule, pattern(backend, sources), queue_name),
            await _target_action(aws, rule_name, rule is not None, queue_arn),
        )
    return Plan(
        backend=backend,
        client=options,
        region=region,
        account=account,
        sources=sources,
        queue_name=queue_name,
        queue_arn=queue_arn,
        queue_url=url,
        rule_name=rule_name,
        rule_arn=rule_arn,
        actions=actions,
        configured_url=section.events.queue_url,
    )


async def _read_queue(aws: _Aws, name: str) -> tuple[str | None, dict[str, str]]:
    what = f"SQS queue {name!r}"
    found = await aws.find("sqs", "GetQueueUrl", what, _MISSING_QUEUE, QueueName=name)
    if found is None:
        return None, {}
    url = str(found["QueueUrl"])
    reply = await aws.call("sqs", "GetQueueAttributes", what, QueueUrl=url, AttributeNames=["All"])
    return url, dict(reply.get("Attributes") or {})


def _queue_actions(
    name: str, url: str | None, attributes: Mapping[str, str], visibility_s: int
) -> tuple[Action]:
    wanted = {
        "VisibilityTimeout": str(visibility_s),
        "ReceiveMessageWaitTimeSeconds": str(WAIT_S),
        "MessageRetentionPeriod": str(RETENTION_S),
    }
    if not attributes.get("KmsMasterKeyId"):  # a queue encrypted with a KMS key stays so
        wanted["SqsManagedSseEnabled"] = "true"
    if url is None:
        request = {"QueueName": name, "Attributes": wanted}
        return (Action("queue", name, "create", "sqs", "CreateQueue", request),)
    differ = {k: v for k, v in wanted.items() if attributes.get(k) != v}
    changes = tuple(f"{k}: {attributes.get(k)} → {v}" for k, v in differ.items())
    verdict: Literal["update", "unchanged"] = "update" if differ else "unchanged"
    request = {"QueueUrl": url, "Attributes": differ}
    return (Action("queue", name, verdict, "sqs", "SetQueueAttributes", request, changes),)


def _policy_action(
    name: str, url: str | None, attributes: Mapping[str, str], ours: dict[str, Any]
) -> Action:
    """Our statement in the queue's policy; statements others put there are kept."""
    current = _loads(attributes.get("Policy"))
    others = [s for s in _statements(current) if s.get("Sid") != ours["Sid"]]
    policy = {"Version": "2012-10-17", "Statement": [*others, ours]}
    attributes_sent = {"Policy": json.dumps(policy)}
    if url is None:
        return Action(
            "queue policy",
            name,
            "create",
            "sqs",
            "SetQueueAttributes",
            {"Attributes": attributes_sent},
            needs_queue_url=True,
        )
    mine = [s for s in _statements(current) if s.get("Sid") == ours["Sid"]]
    if mine == [ours]:
        return Action("queue policy", name, "unchanged", "sqs", "SetQueueAttributes", {})
    change = f"statement {ours['Sid']}: " + ("changed" if mine else "added")
    request = {"QueueUrl": url, "Attributes": attributes_sent}
    return Action("queue policy", name, "update", "sqs", "SetQueueAttributes", request, (change,))


def _rule_action(
    backend: str, name: str, rule: Mapping[str, Any] | None, wanted: dict[str, Any], queue: str
) -> Action:
    kind = KINDS[backend]
    request = {
        "Name": name,
        "EventPattern": json.dumps(wanted),
        "State": "ENABLED",
        "Description": f"orchestrator: {kind.detail_type} of its {kind.noun}s to SQS {queue}",
    }
    if rule is None:
        return Action("rule", name, "create", "events", "PutRule", request)
    changes = []
    current = _loads(rule.get("EventPattern"))
    if _canonical(current) != _canonical(wanted):
        had = set(((current or {}).get("detail") or {}).get(kind.field) or [])
        now = set(wanted["detail"][kind.field])
        moved = [f"+{a}" for a in sorted(now - had)] + [f"-{a}" for a in sorted(had - now)]
        changes.append(f"EventPattern: {' '.join(moved) or 'source or detail-type differ'}")
    changes += [
        f"{key}: {rule.get(key)} → {request[key]}"
        for key in ("State", "Description")
        if rule.get(key) != request[key]
    ]
    verdict: Literal["update", "unchanged"] = "update" if changes else "unchanged"
    return Action("rule", name, verdict, "events", "PutRule", request, tuple(changes))


async def _target_action(aws: _Aws, rule: str, exists: bool, queue_arn: str) -> Action:
    wanted = {"Id": TARGET_ID, "Arn": queue_arn}
    request = {"Rule": rule, "Targets": [wanted]}
    if not exists:
        return Action("target", TARGET_ID, "create", "events", "PutTargets", request)
    current = None
    kw: dict[str, Any] = {"Rule": rule}
    while current is None:
        reply = await aws.call("events", "ListTargetsByRule", f"targets of rule {rule!r}", **kw)
        current = next((t for t in reply.get("Targets") or [] if t.get("Id") == TARGET_ID), None)
        if not reply.get("NextToken"):
            break
        kw["NextToken"] = reply["NextToken"]
    if current == wanted:
        return Action("target", TARGET_ID, "unchanged", "events", "PutTargets", {})
    if current is None:
        return Action("target", TARGET_ID, "create", "events", "PutTargets", request)
    change = f"Arn: {current.get('Arn')} → {queue_arn}" + (
        "" if set(current) <= set(wanted) else f", without {sorted(set(current) - set(wanted))}"
    )
    return Action("target", TARGET_ID, "update", "events", "PutTargets", request, (change,))


# -- apply -------------------------------------------------------------------------------------


async def apply(plan: Plan) -> Outcome:
    """Send what the plan says, in order: queue, its policy, the rule, its target."""
    url = plan.queue_url
    async with _Aws(plan.backend, plan.client, SETUP_POLICY) as aws:
        for action in plan.actions:
            if action.verdict == "unchanged":
                continue
            what = f"{action.resource} {action.name!r}"
            reply = await aws.call(
                action.service, action.operation, what, **action.shown_request(url)
            )
            if action.operation == "CreateQueue":
                url = str(reply["QueueUrl"])
                await _same_arn(aws, url, plan.queue_arn)
            elif action.operation == "PutRule" and reply.get("RuleArn") != plan.rule_arn:
                raise EventsSetupFailed(
                    f"rule {plan.rule_name!r} has ARN {reply.get('RuleArn')}, not the "
                    f"{plan.rule_arn} the queue policy names: run `events setup` again"
                )
            elif action.operation == "PutTargets" and reply.get("FailedEntryCount"):
                raise EventsSetupFailed(f"{what}: PutTargets failed: {reply.get('FailedEntries')}")
    return Outcome(plan, applied=True, queue_url=url)


async def _same_arn(aws: _Aws, url: str, expected: str) -> None:
    what = f"SQS queue {url}"
    reply = await aws.call(
        "sqs", "GetQueueAttributes", what, QueueUrl=url, AttributeNames=["QueueArn"]
    )
    if (arn := (reply.get("Attributes") or {}).get("QueueArn")) != expected:
        raise EventsSetupFailed(f"{what} has ARN {arn}, not {expected}: run `events setup` again")


def dry_run(plan: Plan) -> Outcome:
    return Outcome(plan, applied=False, queue_url=plan.queue_url)


# -- reporting ---------------------------------------------------------------------------------


def setting_lines(backend: str, url: str) -> tuple[str, str]:
    """The TOML and the environment forms of the setting that points the daemon at the queue."""
    toml = f"[{backend}.events]\nqueue_url = {json.dumps(url)}"
    return toml, f"ORCHESTRATOR__{backend.upper()}__EVENTS__QUEUE_URL={url}"


def to_dict(outcome: Outcome) -> dict[str, Any]:
    p, url = outcome.plan, outcome.queue_url
    settings = setting_lines(p.backend, url) if url else None
    return {
        "backend": p.backend,
        "dry_run": not outcome.applied,
        "region": p.region,
        "account": p.account,
        "sources": [dataclasses.asdict(s) for s in p.sources],
        "queue": {"name": p.queue_name, "arn": p.queue_arn, "url": url},
        "rule": {"name": p.rule_name, "arn": p.rule_arn},
        "actions": [a.to_dict(done=outcome.applied) for a in p.actions],
        "settings": None if settings is None else {"toml": settings[0], "env": settings[1]},
    }


_DONE = {"create": "created", "update": "updated", "unchanged": "unchanged"}
_WOULD = {"create": "would create", "update": "would update", "unchanged": "unchanged"}


def render(outcome: Outcome) -> list[str]:
    """What `events setup` prints: where, what the rule covers, each action, the setting."""
    p, url = outcome.plan, outcome.queue_url
    dry = "" if outcome.applied else " (dry run: nothing changed)"
    lines = [f"events setup for {p.backend} in {p.region}, account {p.account}{dry}"]
    lines += [f"  rule {p.rule_name} covers {s.setting} = {s.given}: {s.arn}" for s in p.sources]
    verbs = _DONE if outcome.applied else _WOULD
    for a in p.actions:
        lines.append(f"{verbs[a.verdict]:<13} {a.resource:<13} {a.name}")
        lines += [f"    {change}" for change in a.changes]
        if a.verdict != "unchanged":
            sent = json.dumps(a.shown_request(url))
            lines.append(f"    {a.service}:{a.operation} {sent}")
    if url is None:
        lines.append("queue URL: known once the queue is created (run without --dry-run)")
        return lines
    toml, env = setting_lines(p.backend, url)
    lines += [
        f"queue URL: {url}",
        "add to the daemon's settings:",
        *("  " + t for t in toml.split("\n")),
    ]
    lines += ["or to its environment:", f"  {env}"]
    if p.configured_url == url:
        lines.append("(the settings read here already name this queue)")
    elif p.configured_url:
        lines.append(f"(the settings read here name another queue now: {p.configured_url})")
    return lines


# -- check -------------------------------------------------------------------------------------


async def check(backend: str, settings: Settings) -> list[base.Check]:
    """`orchestrator check` of `<backend>.events`: the queue readable, a rule sending this
    backend's state changes of every configured cluster or job queue to it, and a queue policy
    letting EventBridge send. Nothing when no `queue_url` is set."""
    section = _section(backend, settings)
    url = section.events.queue_url
    if url is None:
        return []
    kind, prefix = KINDS[backend], f"{backend}.events."
    found: dict[str, Any] = {}
    async with _Aws(backend, client_options(section), DAEMON_POLICY) as aws:

        async def queue() -> str:
            what = f"SQS queue {url} ({backend}.events.queue_url)"
            reply = await aws.find(
                "sqs",
                "GetQueueAttributes",
                what,
                _MISSING_QUEUE,
                QueueUrl=url,
                AttributeNames=["All"],
            )
            if reply is None:
                raise errors.CheckFailed(
                    f"{what} does not exist: fix the setting, or make the queue with "
                    f"`orchestrator events setup --backend {backend}`"
                )
            attributes = found["queue"] = reply.get("Attributes") or {}
            await aws.call(
                "sqs",
                "ReceiveMessage",
                what,
                QueueUrl=url,
                WaitTimeSeconds=0,
                MaxNumberOfMessages=1,
                VisibilityTimeout=0,
            )
            waiting = attributes.get("ApproximateNumberOfMessages", "?")
            return f"queue {attributes.get('QueueArn')} is readable ({waiting} messages waiting)"

        async def rule() -> str:
            if "queue" not in found:
                raise errors.CheckFailed("not checked: the queue could not be read")
            queue_arn = found["queue"].get("QueueArn")
            sources = await _resolve(aws, backend, section)
            names = await _rules_targeting(aws, queue_arn)
            if not names:
                raise errors.CheckFailed(
                    f"no EventBridge rule on the default bus sends to {queue_arn}: the daemon "
                    f"would get no events (`orchestrator events setup --backend {backend}`)"
                )
            problems = []
            for name in names:
                described = await aws.call("events", "DescribeRule", f"rule {name!r}", Name=name)
                if why := _rule_problem(kind, described, sources):
                    problems.append(f"rule {name!r} {why}")
                else:
                    found["rule"] = described
                    return (
                        f"rule {name!r} sends {kind.detail_type} of {len(sources)} {kind.noun}(s)"
                    )
            raise errors.CheckFailed(
                "; ".join(problems) + f" (`orchestrator events setup --backend {backend}` fixes it)"
            )

        async def policy() -> str:
            if "rule" not in found:
                raise errors.CheckFailed("not checked: no rule fit to send to the queue")
            rule_arn = found["rule"].get("Arn", "")
            queue_arn = found["queue"].get("QueueArn", "")
            for s in _statements(_loads(found["queue"].get("Policy"))):
                if _allows(s, queue_arn, rule_arn):
                    return f"the queue policy lets {EVENTS_PRINCIPAL} send from {rule_arn}"
            raise errors.CheckFailed(
                f"the queue policy of {queue_arn} does not let {EVENTS_PRINCIPAL} send from "
                f"{rule_arn}: EventBridge's deliveries would fail unseen "
                f"(`orchestrator events setup --backend {backend}` fixes it)"
            )

        return [
            await base.checked(f"{prefix}queue", queue),
            await base.checked(f"{prefix}rule", rule),
            await base.checked(f"{prefix}policy", policy),
        ]


async def _rules_targeting(aws: _Aws, queue_arn: str) -> list[str]:
    names: list[str] = []
    kw: dict[str, Any] = {"TargetArn": queue_arn}
    while True:
        reply = await aws.call("events", "ListRuleNamesByTarget", f"rules of {queue_arn}", **kw)
        names += reply.get("RuleNames") or []
        if not reply.get("NextToken"):
            return names
        kw["NextToken"] = reply["NextToken"]


def _rule_problem(kind: _Kind, rule: Mapping[str, Any], sources: Sequence[Source]) -> str | None:
    """Why this rule does not send every state change the daemon needs (None: it does)."""
    if not str(rule.get("State")).startswith("ENABLED"):
        return f"is {rule.get('State')}"
    given = _loads(rule.get("EventPattern"))
    if not isinstance(given, dict):
        return "has no event pattern"
    for key, want in (("source", kind.source), ("detail-type", kind.detail_type)):
        if key in given and want not in (given[key] or []):
            return f"does not match {key} {want!r} (it has {given[key]})"
    listed = (given.get("detail") or {}).get(kind.field)
    if listed is None:
        return None  # every cluster or job queue
    prefixes = [e["prefix"] for e in listed if isinstance(e, dict) and "prefix" in e]
    missing = [
        f"{s.arn} ({s.setting})"
        for s in sources
        if s.arn not in listed and not any(s.arn.startswith(p) for p in prefixes)
    ]
    return f"does not cover {', '.join(missing)}" if missing else None


def _allows(s: Mapping[str, Any], queue_arn: str, rule_arn: str) -> bool:
    """Whether a policy statement lets EventBridge send this rule's events to the queue."""

    def listed(value: Any) -> list[str]:
        return [str(v) for v in (value if isinstance(value, list) else [value])]

    principal = s.get("Principal")
    named = principal if isinstance(principal, dict) else {"AWS": principal}
    principals = listed(named.get("AWS", [])) + listed(named.get("Service", []))
    if s.get("Effect") != "Allow" or not {"*", EVENTS_PRINCIPAL} & set(principals):
        return False
    actions = [a.lower() for a in listed(s.get("Action", []))]
    if not {"sqs:sendmessage", "sqs:*", "*"} & set(actions):
        return False
    if not any(fnmatch.fnmatchcase(queue_arn, r) for r in listed(s.get("Resource", []))):
        return False
    for operator, conditions in (s.get("Condition") or {}).items():
        for key, value in conditions.items():
            if key.lower() != "aws:sourcearn":
                continue
            like = operator.endswith("Like")
            if not any(
                fnmatch.fnmatchcase(rule_arn, v) if like else v == rule_arn for v in listed(value)
            ):
                return False
    return True
