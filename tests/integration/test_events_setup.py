"""`orchestrator events setup` and the events checks of `orchestrator check` (issue #17), against
a moto server over HTTP: the queue, its policy, the rule and its target made once and left
alone after; a dry run that only reads; state changes of the configured clusters and job
queues routed to the queue by moto's EventBridge, others not; what `check` says when a piece
is missing; and the deployment files in deploy/events/ held to what the code does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # (no stubs installed)

from orchestrator import settings
from orchestrator.backends import events_setup
from tests.integration.test_preflight import batch_env_vars, by_name, check, ecs_env_vars
from tests.support.faultproxy import FaultProxy
from tests.support.moto import EcsEnv, MotoServer

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "events"
ECS_QUEUE, ECS_RULE = events_setup.default_names("ecs")
BATCH_QUEUE, BATCH_RULE = events_setup.default_names("batch")
READS = ("Describe", "Get", "List")


def setup(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "events", "setup", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def setup_json(*args: str, **env: str) -> dict[str, Any]:
    """What `events setup --json` reports, done in this process (the CLI's own tests run it as
    a command: `setup`): the same `plan`, `apply` or `dry_run`, and `to_dict`."""
    assert set(args) <= {"--backend", "ecs", "batch", "--dry-run"}, args
    backend = args[args.index("--backend") + 1]
    loaded = settings.load(None, {**os.environ, **env})

    async def go() -> events_setup.Outcome:
        plan = await events_setup.plan(backend, loaded.settings, None, None)
        return events_setup.dry_run(plan) if "--dry-run" in args else await events_setup.apply(plan)

    return events_setup.to_dict(asyncio.run(go()))


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {a["resource"]: a["action"] for a in report["actions"]}


def targets_config(short_tmp: Path, **clusters: str) -> str:
    """A config file with an ECS target per name → cluster; its path for ORCHESTRATOR_CONFIG."""
    path = short_tmp / "targets.toml"
    path.write_text("".join(f'[ecs.targets.{n}]\ncluster = "{c}"\n' for n, c in clusters.items()))
    return str(path)


def cluster_arn(moto: MotoServer, name: str) -> str:
    with moto.client("ecs") as ecs:
        arn: str = ecs.describe_clusters(clusters=[name])["clusters"][0]["clusterArn"]
        return arn


def resources(moto: MotoServer, queue: str, rule: str) -> dict[str, Any]:
    """The queue's attributes (not its message counts), the rule, its targets, as AWS has them."""
    with moto.client("sqs") as sqs, moto.client("events") as events:
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        described = events.describe_rule(Name=rule)
        targets = events.list_targets_by_rule(Rule=rule)["Targets"]
    described.pop("ResponseMetadata")
    return {
        "url": url,
        "attributes": {k: v for k, v in attributes.items() if not k.startswith("Approximate")},
        "rule": described,
        "targets": targets,
    }


def send_state_change(moto: MotoServer, backend: str, arn: str) -> None:
    kind = events_setup.KINDS[backend]
    detail = {kind.field: arn, "lastStatus": "RUNNING", "status": "RUNNING"}
    with moto.client("events") as events:
        reply = events.put_events(
            Entries=[
                {
                    "Source": kind.source,
                    "DetailType": kind.detail_type,
                    "Detail": json.dumps(detail),
                }
            ]
        )
    assert reply["FailedEntryCount"] == 0, reply


def received(moto: MotoServer, url: str) -> list[dict[str, Any]]:
    """Every message waiting in the queue (taken out of it), as the events they carry."""
    found: list[dict[str, Any]] = []
    with moto.client("sqs") as sqs:
        while True:
            reply = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0, MaxNumberOfMessages=10)
            messages = reply.get("Messages") or []
            if not messages:
                return found
            for message in messages:
                found.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


# -- setup -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("aws_env")
def test_setup_makes_queue_policy_rule_and_target_and_a_second_run_changes_nothing(
    moto: MotoServer, ecs_env: EcsEnv
) -> None:
    env = ecs_env_vars(ecs_env)
    first = setup_json("--backend", "ecs", **env)
    assert [(a["resource"], a["action"], a["done"]) for a in first["actions"]] == [
        ("queue", "create", True),
        ("queue policy", "create", True),
        ("rule", "create", True),
        ("target", "create", True),
    ]
    made = resources(moto, ECS_QUEUE, ECS_RULE)
    url, queue_arn, rule_arn = made["url"], made["attributes"]["QueueArn"], made["rule"]["Arn"]
    assert first["queue"] == {"name": ECS_QUEUE, "arn": queue_arn, "url": url}
    assert first["rule"] == {"name": ECS_RULE, "arn": rule_arn}
    assert first["settings"]["env"] == f"ORCHESTRATOR__ECS__EVENTS__QUEUE_URL={url}"
    assert {k: made["attributes"][k] for k in first["actions"][0]["request"]["Attributes"]} == {
        "VisibilityTimeout": "60",
        "ReceiveMessageWaitTimeSeconds": "20",
        "MessageRetentionPeriod": "86400",
        "SqsManagedSseEnabled": "true",
    }
    policy = json.loads(made["attributes"]["Policy"])
    assert policy["Statement"] == [
        {
            "Sid": f"orchestrator-events-{ECS_RULE}",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}},
        }
    ]
    assert json.loads(made["rule"]["EventPattern"]) == {
        "source": ["aws.ecs"],
        "detail-type": ["ECS Task State Change"],
        "detail": {"clusterArn": [cluster_arn(moto, ecs_env.cluster)]},
    }
    assert made["rule"]["State"] == "ENABLED"
    assert made["targets"] == [{"Id": "orchestrator-sqs", "Arn": queue_arn}]

    second = setup("--backend", "ecs", **env)
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    for resource, name in [
        ("queue", ECS_QUEUE),
        ("queue policy", ECS_QUEUE),
        ("rule", ECS_RULE),
        ("target", "orchestrator-sqs"),
    ]:
        assert f"{'unchanged':<13} {resource:<13} {name}" in lines, second.stdout
    assert "created" not in second.stdout
    assert "updated" not in second.stdout
    assert resources(moto, ECS_QUEUE, ECS_RULE) == made
    assert "  [ecs.events]" in lines
    assert f'  queue_url = "{url}"' in lines
    assert f"  ORCHESTRATOR__ECS__EVENTS__QUEUE_URL={url}" in lines


@pytest.mark.usefixtures("proxied_aws_env")
def test_a_dry_run_only_reads_and_says_what_it_would_send(
    moto: MotoServer, ecs_env: EcsEnv, fault_proxy: FaultProxy
) -> None:
    env = ecs_env_vars(ecs_env)
    with moto.client("sqs") as sqs, moto.client("events") as events:
        before = sqs.list_queues().get("QueueUrls"), events.list_rules()["Rules"]
        dry = setup("--backend", "ecs", "--dry-run", **env)
        after = sqs.list_queues().get("QueueUrls"), events.list_rules()["Rules"]
    assert dry.returncode == 0, dry.stderr
    assert before == after == (None, [])
    assert "dry run: nothing changed" in dry.stdout
    assert dry.stdout.count("would create") == 4
    for call in (
        "sqs:CreateQueue",
        "sqs:SetQueueAttributes",
        "events:PutRule",
        "events:PutTargets",
    ):
        assert f"    {call} {{" in dry.stdout, dry.stdout
    assert '"QueueName": "orchestrator-ecs-events"' in dry.stdout
    assert "queue URL: known once the queue is created" in dry.stdout
    called = set(fault_proxy.counts)
    assert called, "the dry run went through the proxy"
    assert all(operation.startswith(READS) for _, operation in called), called

    setup_json("--backend", "ecs", **env)
    made = resources(moto, ECS_QUEUE, ECS_RULE)
    longer = {**env, "ORCHESTRATOR__ECS__EVENTS__VISIBILITY_TIMEOUT_S": "120"}
    writes_before = {k: n for k, n in fault_proxy.counts.items() if not k[1].startswith(READS)}
    report = setup_json("--backend", "ecs", "--dry-run", **longer)
    writes_after = {k: n for k, n in fault_proxy.counts.items() if not k[1].startswith(READS)}
    assert writes_after == writes_before
    queue_action = report["actions"][0]
    assert (queue_action["action"], queue_action["done"]) == ("update", False)
    assert queue_action["changes"] == ["VisibilityTimeout: 60 → 120"]
    assert queue_action["request"] == {
        "QueueUrl": made["url"],
        "Attributes": {"VisibilityTimeout": "120"},
    }
    assert resources(moto, ECS_QUEUE, ECS_RULE) == made

    applied = setup("--backend", "ecs", **longer)
    assert applied.returncode == 0, applied.stderr
    assert f"{'updated':<13} {'queue':<13} {ECS_QUEUE}" in applied.stdout.splitlines()
    assert resources(moto, ECS_QUEUE, ECS_RULE)["attributes"]["VisibilityTimeout"] == "120"


@pytest.mark.usefixtures("aws_env")
def test_a_new_target_updates_the_pattern_and_a_changed_policy_is_mended_keeping_others(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv
) -> None:
    env = ecs_env_vars(ecs_env)
    setup_json("--backend", "ecs", **env)
    with moto.client("ecs") as ecs:
        gpu_arn = ecs.create_cluster(clusterName="gpu-cluster")["cluster"]["clusterArn"]
    with_target = {**env, "ORCHESTRATOR_CONFIG": targets_config(short_tmp, gpu="gpu-cluster")}
    report = setup_json("--backend", "ecs", **with_target)
    assert verdicts(report) == {
        "queue": "unchanged",
        "queue policy": "unchanged",
        "rule": "update",
        "target": "unchanged",
    }
    assert report["actions"][2]["changes"] == [f"EventPattern: +{gpu_arn}"]
    assert {s["setting"]: s["arn"] for s in report["sources"]} == {
        "ecs.cluster": cluster_arn(moto, ecs_env.cluster),
        "ecs.targets.gpu.cluster": gpu_arn,
    }
    made = resources(moto, ECS_QUEUE, ECS_RULE)
    pattern = json.loads(made["rule"]["EventPattern"])
    assert sorted(pattern["detail"]["clusterArn"]) == sorted(
        [cluster_arn(moto, ecs_env.cluster), gpu_arn]
    )

    ours = json.loads(made["attributes"]["Policy"])["Statement"][0]
    foreign = {
        "Sid": "someone-elses",
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": ours["Resource"],
    }
    stale = {**ours, "Condition": {"ArnEquals": {"aws:SourceArn": "arn:aws:events:x:1:rule/old"}}}
    tampered = {"Version": "2012-10-17", "Statement": [foreign, stale]}
    with moto.client("sqs") as sqs:
        sqs.set_queue_attributes(QueueUrl=made["url"], Attributes={"Policy": json.dumps(tampered)})
    report = setup_json("--backend", "ecs", **with_target)
    assert verdicts(report)["queue policy"] == "update"
    assert report["actions"][1]["changes"] == [f"statement orchestrator-events-{ECS_RULE}: changed"]
    mended = json.loads(resources(moto, ECS_QUEUE, ECS_RULE)["attributes"]["Policy"])
    assert mended["Statement"] == [foreign, ours]


@pytest.mark.usefixtures("aws_env")
def test_state_changes_of_our_clusters_reach_the_queue_and_others_do_not(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv
) -> None:
    with moto.client("ecs") as ecs:
        gpu_arn = ecs.create_cluster(clusterName="gpu-cluster")["cluster"]["clusterArn"]
        other_arn = ecs.create_cluster(clusterName="someone-else")["cluster"]["clusterArn"]
    env = {
        **ecs_env_vars(ecs_env),
        "ORCHESTRATOR_CONFIG": targets_config(short_tmp, gpu="gpu-cluster"),
    }
    url = setup_json("--backend", "ecs", **env)["queue"]["url"]
    ours = cluster_arn(moto, ecs_env.cluster)
    for arn in (ours, other_arn, gpu_arn):
        send_state_change(moto, "ecs", arn)
    got = received(moto, url)
    assert sorted(e["detail"]["clusterArn"] for e in got) == sorted([ours, gpu_arn])
    assert {(e["source"], e["detail-type"]) for e in got} == {("aws.ecs", "ECS Task State Change")}
    send_state_change(moto, "batch", ours)  # the right ARN, but not a task state change
    assert received(moto, url) == []


@pytest.mark.usefixtures("aws_env")
def test_batch_job_state_changes_of_our_queue_reach_the_queue_and_others_do_not(
    moto: MotoServer,
) -> None:
    batch_env = moto.setup_batch()
    report = setup_json("--backend", "batch", **batch_env_vars(batch_env))
    assert report["queue"]["name"] == BATCH_QUEUE
    assert report["rule"]["name"] == BATCH_RULE
    assert report["sources"] == [
        {"setting": "batch.job_queue", "given": batch_env.job_queue, "arn": batch_env.job_queue_arn}
    ]
    assert report["settings"]["env"].startswith("ORCHESTRATOR__BATCH__EVENTS__QUEUE_URL=")
    url = report["queue"]["url"]
    other = batch_env.job_queue_arn.replace(batch_env.job_queue, "another-queue")
    for arn in (other, batch_env.job_queue_arn):
        send_state_change(moto, "batch", arn)
    got = received(moto, url)
    assert [e["detail"]["jobQueue"] for e in got] == [batch_env.job_queue_arn]
    assert got[0]["detail-type"] == "Batch Job State Change"
    again = setup_json("--backend", "batch", **batch_env_vars(batch_env))
    assert set(verdicts(again).values()) == {"unchanged"}


@pytest.mark.usefixtures("aws_env")
def test_a_cluster_or_queue_that_does_not_exist_fails_naming_it_and_its_setting(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv
) -> None:
    result = setup("--backend", "ecs", **ecs_env_vars(ecs_env, CLUSTER="nope"))
    assert result.returncode == 1
    assert "no cluster 'nope' (ecs.cluster) in this account and Region" in result.stderr
    env = {**ecs_env_vars(ecs_env), "ORCHESTRATOR_CONFIG": targets_config(short_tmp, gpu="gone")}
    result = setup("--backend", "ecs", **env)
    assert result.returncode == 1
    assert "'gone' (ecs.targets.gpu.cluster)" in result.stderr
    batch = setup("--backend", "batch", ORCHESTRATOR__BATCH__JOB_QUEUE="missing-queue")
    assert batch.returncode == 1
    assert "no job queue 'missing-queue' (batch.job_queue)" in batch.stderr
    with moto.client("sqs") as sqs, moto.client("events") as events:
        assert sqs.list_queues().get("QueueUrls") is None
        assert events.list_rules()["Rules"] == []


@pytest.mark.usefixtures("aws_env")
@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--queue-name", "events.fifo", "a FIFO queue cannot be used"),
        ("--queue-name", "no spaces", "an SQS queue name is"),
        ("--rule-name", "no/slash", "an EventBridge rule name is"),
    ],
)
def test_names_aws_would_refuse_are_usage_errors(
    ecs_env: EcsEnv, option: str, value: str, said: str
) -> None:
    result = setup("--backend", "ecs", option, value, **ecs_env_vars(ecs_env))
    assert result.returncode == 2
    assert option in result.stderr
    assert said in result.stderr


@pytest.mark.usefixtures("proxied_aws_env")
def test_a_refused_permission_names_the_action_the_resource_and_the_policy_file(
    ecs_env: EcsEnv, fault_proxy: FaultProxy
) -> None:
    message = (
        "User: arn:aws:iam::123456789012:user/ops is not authorized to perform: events:PutRule"
    )
    fault_proxy.error("events", "PutRule", 400, "AccessDeniedException", message, times=None)
    result = setup("--backend", "ecs", **ecs_env_vars(ecs_env))
    assert result.returncode == 1
    assert f"rule '{ECS_RULE}': events:PutRule was refused (AccessDeniedException" in result.stderr
    assert "this identity may not call events:PutRule" in result.stderr
    assert "deploy/events/setup-iam-policy.json lists every permission needed" in result.stderr


# -- check -------------------------------------------------------------------------------------


def events_checks(short_tmp: Path, **env: str) -> dict[str, dict[str, Any]]:
    """The ECS events checks of `orchestrator check`, made in this process (the command itself
    is run by the tests around them)."""
    loaded = settings.load(None, {**os.environ, **env})
    found = asyncio.run(events_setup.check("ecs", loaded.settings))
    return {c.name: c.to_dict() for c in found if ".events." in c.name}


@pytest.mark.usefixtures("aws_env")
def test_check_passes_after_setup_and_names_what_is_missing(
    short_tmp: Path, moto: MotoServer, ecs_env: EcsEnv
) -> None:
    env = ecs_env_vars(ecs_env)
    url = setup_json("--backend", "ecs", **env)["queue"]["url"]
    with_url = {**env, "ORCHESTRATOR__ECS__EVENTS__QUEUE_URL": url}
    code, report = check(short_tmp, **with_url)
    assert code == 0, report
    checks = by_name(report)
    assert {n: checks[n]["ok"] for n in checks if ".events." in n} == {
        "ecs.events.queue": True,
        "ecs.events.rule": True,
        "ecs.events.policy": True,
    }
    assert (
        f"rule '{ECS_RULE}' sends ECS Task State Change of 1 cluster"
        in checks["ecs.events.rule"]["detail"]
    )
    made = resources(moto, ECS_QUEUE, ECS_RULE)

    with moto.client("ecs") as ecs:
        gpu_arn = ecs.create_cluster(clusterName="gpu-cluster")["cluster"]["clusterArn"]
    config = targets_config(short_tmp, gpu="gpu-cluster")
    found = events_checks(short_tmp, **with_url, ORCHESTRATOR_CONFIG=config)
    assert found["ecs.events.rule"]["ok"] is False
    assert (
        f"does not cover {gpu_arn} (ecs.targets.gpu.cluster)" in found["ecs.events.rule"]["detail"]
    )

    other_rule = made["rule"]["Arn"].replace(ECS_RULE, "another-rule")
    statement = events_setup.statement(made["attributes"]["QueueArn"], other_rule, "another-rule")
    policy = {"Version": "2012-10-17", "Statement": [statement]}
    with moto.client("sqs") as sqs:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    found = events_checks(short_tmp, **with_url)
    assert found["ecs.events.rule"]["ok"] is True
    assert found["ecs.events.policy"]["ok"] is False
    assert (
        f"does not let events.amazonaws.com send from {made['rule']['Arn']}"
        in (found["ecs.events.policy"]["detail"])
    )

    with moto.client("events") as events:
        events.remove_targets(Rule=ECS_RULE, Ids=["orchestrator-sqs"])
        events.delete_rule(Name=ECS_RULE)
    found = events_checks(short_tmp, **with_url)
    assert found["ecs.events.queue"]["ok"] is True
    assert found["ecs.events.rule"]["ok"] is False
    assert (
        f"no EventBridge rule on the default bus sends to {made['attributes']['QueueArn']}"
        in (found["ecs.events.rule"]["detail"])
    )
    assert found["ecs.events.policy"]["ok"] is False

    with moto.client("sqs") as sqs:
        sqs.delete_queue(QueueUrl=url)
    code, report = check(short_tmp, **with_url)
    assert code == 1
    queue = by_name(report)["ecs.events.queue"]
    assert queue["ok"] is False
    assert f"SQS queue {url} (ecs.events.queue_url) does not exist" in queue["detail"]


@pytest.mark.usefixtures("aws_env")
def test_check_of_batch_events_passes_after_setup(short_tmp: Path, moto: MotoServer) -> None:
    batch_env = moto.setup_batch()
    with moto.client("logs") as logs:
        logs.create_log_group(logGroupName="/aws/batch/job")
    env = batch_env_vars(batch_env)
    url = setup_json("--backend", "batch", **env)["queue"]["url"]
    code, report = check(short_tmp, **env, ORCHESTRATOR__BATCH__EVENTS__QUEUE_URL=url)
    assert code == 0, report
    assert {"batch.events.queue", "batch.events.rule", "batch.events.policy"} <= set(
        by_name(report)
    )


@pytest.mark.usefixtures("aws_env")
def test_check_leaves_events_alone_without_a_queue_url(short_tmp: Path, ecs_env: EcsEnv) -> None:
    code, report = check(short_tmp, **ecs_env_vars(ecs_env))
    assert code == 0, report
    assert not [name for name in by_name(report) if ".events." in name]


# -- deploy/events -----------------------------------------------------------------------------


def policy_actions(name: str) -> set[str]:
    policy = json.loads((DEPLOY / name).read_text())
    actions: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        listed = statement["Action"]
        actions.update([listed] if isinstance(listed, str) else listed)
    return actions


def iam_actions(operations: tuple[tuple[str, str], ...]) -> set[str]:
    return {f"{service}:{operation}" for service, operation in operations}


def test_the_iam_policies_grant_what_the_code_calls_and_no_more() -> None:
    setup_needs = iam_actions(events_setup.SETUP_OPERATIONS)
    check_needs = iam_actions(events_setup.CHECK_OPERATIONS)
    assert set(iam_actions(tuple(events_setup.OPERATIONS))) == setup_needs | check_needs
    granted = policy_actions("setup-iam-policy.json")
    assert setup_needs <= granted
    assert granted <= setup_needs | check_needs  # ListRuleNamesByTarget: for `check` run by ops
    consuming = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
    daemon = policy_actions("iam-policy.json")
    assert check_needs | consuming <= daemon
    assert daemon <= check_needs | consuming


class _CloudFormationLoader(yaml.SafeLoader):  # type: ignore[misc]  # (no stubs installed)
    """YAML with CloudFormation's short tags (!Ref, !GetAtt, !Sub…) read as plain values."""


def _untagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node, deep=True)}
    return {suffix: loader.construct_mapping(node, deep=True)}


_CloudFormationLoader.add_multi_constructor("!", _untagged)


def test_the_cloudformation_template_makes_what_setup_makes() -> None:
    template = yaml.load((DEPLOY / "cloudformation.yaml").read_text(), _CloudFormationLoader)
    resources = template["Resources"]
    for backend, prefix, arns in [
        ("ecs", "Ecs", "ClusterArns"),
        ("batch", "Batch", "JobQueueArns"),
    ]:
        kind = events_setup.KINDS[backend]
        queue_name, rule_name = events_setup.default_names(backend)
        queue = resources[f"{prefix}EventsQueue"]["Properties"]
        assert queue["QueueName"] == queue_name
        assert queue["ReceiveMessageWaitTimeSeconds"] == events_setup.WAIT_S
        assert queue["MessageRetentionPeriod"] == events_setup.RETENTION_S
        assert queue["SqsManagedSseEnabled"] is True
        rule = resources[f"{prefix}StateChangesRule"]["Properties"]
        assert rule["Name"] == rule_name
        assert rule["State"] == "ENABLED"
        assert rule["EventPattern"] == {
            "source": [kind.source],
            "detail-type": [kind.detail_type],
            "detail": {kind.field: {"Ref": arns}},
        }
        assert rule["Targets"] == [
            {"Id": events_setup.TARGET_ID, "Arn": {"GetAtt": f"{prefix}EventsQueue.Arn"}}
        ]
        policy = resources[f"{prefix}EventsQueuePolicy"]["Properties"]["PolicyDocument"]
        expected = events_setup.statement("QUEUE", "RULE", rule_name)
        assert policy["Statement"] == [
            {
                **expected,
                "Resource": {"GetAtt": f"{prefix}EventsQueue.Arn"},
                "Condition": {
                    "ArnEquals": {"aws:SourceArn": {"GetAtt": f"{prefix}StateChangesRule.Arn"}}
                },
            }
        ]
        assert template["Outputs"][f"{prefix}QueueUrl"]["Value"] == {"Ref": f"{prefix}EventsQueue"}


@pytest.mark.usefixtures("aws_env")
def test_the_cloudformation_stack_on_moto_routes_events_as_setup_would(
    moto: MotoServer, ecs_env: EcsEnv
) -> None:
    ours = cluster_arn(moto, ecs_env.cluster)
    with moto.client("cloudformation") as cloudformation:
        cloudformation.create_stack(
            StackName="orchestrator-events",
            TemplateBody=(DEPLOY / "cloudformation.yaml").read_text(),
            Parameters=[{"ParameterKey": "ClusterArns", "ParameterValue": ours}],
        )
        stack = cloudformation.describe_stacks(StackName="orchestrator-events")["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert set(outputs) == {"EcsQueueUrl"}  # no job queue given: no Batch resources
    # moto makes no AWS::SQS::QueuePolicy: setup would add the policy, and change nothing else.
    report = setup_json("--backend", "ecs", "--dry-run", **ecs_env_vars(ecs_env))
    assert verdicts(report) == {
        "queue": "unchanged",
        "queue policy": "update",
        "rule": "unchanged",
        "target": "unchanged",
    }
    send_state_change(moto, "ecs", ours)
    send_state_change(moto, "ecs", ours.replace(ecs_env.cluster, "not-ours"))
    with moto.client("sqs") as sqs:
        url = sqs.get_queue_url(QueueName=ECS_QUEUE)["QueueUrl"]
    assert [e["detail"]["clusterArn"] for e in received(moto, url)] == [ours]
