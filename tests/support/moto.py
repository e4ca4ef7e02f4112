"""A real moto server for a pytest session, AWS resources built on it, and pytest fixtures.

A conftest enables the fixtures with ``pytest_plugins = ["tests.support.moto"]``:

- ``moto_server`` (session): one moto server on 127.0.0.1, started and warmed up once.
- ``moto`` (function): the same server, reset before the test.
- ``fault_proxy`` (function): a `faultproxy.FaultProxy` in front of it, in a background thread.
- ``aws_env`` / ``proxied_aws_env`` (function): dummy credentials, a region and
  ``AWS_ENDPOINT_URL`` pointing at moto / at the proxy, in the environment.

A test that needs its own server process (say with ``MOTO_SIMPLE_BATCH_FAIL_AFTER=0``) uses
``with MotoServer(env={...}) as server:``.

Quirks of moto 5.2.5 these helpers work around: ECS RunTask with the EC2 launch type (or none)
answers HTTP 500 when the cluster has no container instances, so `EcsEnv.run_task_kwargs` uses
FARGATE; `reset` keeps state transitions and ``/moto-api/config``, so `MotoServer.reset`
restores those it changed itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import IO, Any, Literal, Self

import boto3
import pytest

from . import faultproxy

Progression = Literal["immediate", "time", "manual"]

DEFAULT_REGION = "us-east-1"
DUMMY_CREDENTIALS: Mapping[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
}
_WARM_UP_CALLS = (
    ("ecs", "list_clusters"),
    ("batch", "describe_job_queues"),
    ("logs", "describe_log_groups"),
    ("ec2", "describe_vpcs"),
    ("iam", "list_roles"),
)


@dataclasses.dataclass(frozen=True)
class EcsEnv:
    """An ECS cluster with an awsvpc task definition and the network to run it in."""

    region: str
    cluster: str
    task_definition: str  # the family
    task_definition_arn: str
    container_name: str
    subnet_ids: tuple[str, ...]
    security_group_ids: tuple[str, ...]
    log_group: str
    stream_prefix: str
    vpc_id: str

    def run_task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for one RunTask of this task definition (FARGATE, see the module)."""
        return {
            "cluster": self.cluster,
            "taskDefinition": self.task_definition,
            "launchType": "FARGATE",
            "count": 1,
            "networkConfiguration": {
                "awsvpcConfiguration": {
                    "subnets": list(self.subnet_ids),
                    "securityGroups": list(self.security_group_ids),
                    "assignPublicIp": "DISABLED",
                }
            },
        }

    def log_stream(self, task_arn: str) -> str:
        """The awslogs stream of the task's container: ``prefix/container/task-id``."""
        return f"{self.stream_prefix}/{self.container_name}/{task_arn.rpartition('/')[2]}"

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The daemon's `ecs` settings section for this environment, `extra` merged over."""
        return {
            "enabled": True,
            "cluster": self.cluster,
            "container_name": self.container_name,
            "region_name": self.region,
            "task_definition": self.task_definition,
            "subnets": list(self.subnet_ids),
            "security_groups": list(self.security_group_ids),
            **extra,
        }


@dataclasses.dataclass(frozen=True)
class BatchEnv:
    """An UNMANAGED compute environment, an ENABLED job queue and a container job definition."""

    region: str
    role_arn: str
    compute_environment: str
    compute_environment_arn: str
    job_queue: str
    job_queue_arn: str
    job_definition: str
    job_definition_arn: str

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The daemon's `batch` settings section for this environment, `extra` merged over."""
        return {
            "enabled": True,
            "job_queue": self.job_queue,
            "job_definition": self.job_definition,
            "region_name": self.region,
            **extra,
        }


class MotoServer:
    """``python -m moto.server`` in a subprocess on 127.0.0.1 and a free port.

    `env` is added to the server's environment (after dummy credentials), for settings moto
    reads in the server process such as ``MOTO_SIMPLE_BATCH_FAIL_AFTER``.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        start_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        self._env = {**os.environ, **DUMMY_CREDENTIALS, **(env or {})}
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._request_timeout_s = request_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None
        self._initial_config: dict[str, Any] = {}
        self._config_changed = False
        self._transitions: set[str] = set()

    # -- lifecycle --

    @property
    def endpoint_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the moto server is not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        """Start the server and wait, at most `start_timeout_s`, until it answers."""
        if self._process is not None:
            raise RuntimeError("the moto server is already started")
        deadline = time.monotonic() + self._start_timeout_s
        for _ in range(3):  # another process may take the free port before the server binds it
            process = self._spawn()
            try:
                if self._wait_until_up(process, deadline):
                    self._initial_config = self._call("GET", "/moto-api/config")
                    return
            except BaseException:
                self.stop()
                raise
            log = self._log_tail()
            self.stop()
            if "Address already in use" not in log:
                raise RuntimeError(f"moto server exited early:\n{log}")
        raise RuntimeError("moto server: three free ports were taken before it could bind one")

    def stop(self) -> None:
        """Terminate the server; kill it if it has not exited within `stop_timeout_s`."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(self._stop_timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the server writes it; stop() closes it
        self._port = _free_port()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._port)],
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self._process

    def _wait_until_up(self, process: subprocess.Popen[bytes], deadline: float) -> bool:
        """True once the server answers, False if it exited; TimeoutError past `deadline`."""
        while process.poll() is None:
            try:
                self._call("GET", "/moto-api/config", timeout_s=0.5)
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"moto server not up within {self._start_timeout_s} s:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.05)
        return False

    def _log_tail(self, max_bytes: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - max_bytes))
        return self._log.read().decode(errors="replace")

    # -- moto's control API --

    def reset(self) -> None:
        """Drop every AWS resource, and undo this object's transitions and config changes.

        ``POST /moto-api/reset`` alone keeps both.
        """
        self._call("POST", "/moto-api/reset")
        for model_name in sorted(self._transitions):
            self.unset_transition(model_name)
        if self._config_changed:
            self._call("POST", "/moto-api/config", self._initial_config)
            self._config_changed = False

    def set_transition(
        self,
        model_name: str,
        progression: Progression,
        seconds: float | None = None,
        times: int | None = None,
    ) -> None:
        """How a model (``ecs::task``, ``batch::job``) advances: see moto's state manager.

        ``time`` takes `seconds` per state, ``manual`` advances one state per `times` reads.
        """
        transition: dict[str, Any] = {"progression": progression}
        if seconds is not None:
            transition["seconds"] = seconds
        if times is not None:
            transition["times"] = times
        body = {"model_name": model_name, "transition": transition}
        self._call("POST", "/moto-api/state-manager/set-transition", body)
        self._transitions.add(model_name)

    def unset_transition(self, model_name: str) -> None:
        self._call("POST", "/moto-api/state-manager/unset-transition", {"model_name": model_name})
        self._transitions.discard(model_name)

    def configure_batch(self, use_docker: bool) -> None:
        """Without Docker, SubmitJob finishes jobs at once (SUCCEEDED unless the server has
        ``MOTO_SIMPLE_BATCH_FAIL_AFTER=0``, then FAILED)."""
        self._call("POST", "/moto-api/config", {"batch": {"use_docker": use_docker}})
        self._config_changed = True

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        if data is None and method == "POST":
            data = b""
        request = urllib.request.Request(
            self.endpoint_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s or self._request_timeout_s) as r:
            payload = r.read()
        return json.loads(payload) if payload else None

    # -- AWS resources (synchronous boto3) --

    def client_kwargs(self, region: str = DEFAULT_REGION) -> dict[str, str]:
        """Keyword arguments for a boto3/aioboto3 client talking straight to this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": region,
            "aws_access_key_id": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }

    @contextlib.contextmanager
    def client(self, service: str, region: str = DEFAULT_REGION) -> Iterator[Any]:
        """A synchronous boto3 client for this server, closed on exit."""
        client = boto3.client(service, **self.client_kwargs(region))
        try:
            yield client
        finally:
            client.close()

    def warm_up(self, region: str = DEFAULT_REGION) -> None:
        """One cheap call per service the tests use: moto's first call to each is slow (~1 s)."""
        for service, operation in _WARM_UP_CALLS:
            with self.client(service, region) as client:
                getattr(client, operation)()

    def setup_ecs(self, region: str = DEFAULT_REGION, name: str = "orchestrator-test") -> EcsEnv:
        with self.client("ec2", region) as ec2:
            vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
            ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})
            subnet = ec2.create_subnet(
                VpcId=vpc_id, CidrBlock="10.0.1.0/24", AvailabilityZone=f"{region}a"
            )
            group = ec2.create_security_group(
                GroupName=name, Description="orchestrator tests", VpcId=vpc_id
            )
        log_group, stream_prefix, container_name = f"/ecs/{name}", "ecs", "main"
        with self.client("logs", region) as logs:
            logs.create_log_group(logGroupName=log_group)
        container = {
            "name": container_name,
            "image": "public.ecr.aws/docker/library/busybox:latest",
            "command": ["sh", "-c", "echo hello"],
            "essential": True,
            "memory": 128,  # moto answers HTTP 500 without it
            "logConfiguration": {
                "logDriver": "awslogs",
                "options": {
                    "awslogs-group": log_group,
                    "awslogs-region": region,
                    "awslogs-stream-prefix": stream_prefix,
                },
            },
        }
        with self.client("ecs", region) as ecs:
            ecs.create_cluster(clusterName=name)
            task_definition = ecs.register_task_definition(
                family=name,
                networkMode="awsvpc",
                requiresCompatibilities=["EC2", "FARGATE"],
                cpu="256",
                memory="512",
                containerDefinitions=[container],
            )["taskDefinition"]
        return EcsEnv(
            region=region,
            cluster=name,
            task_definition=name,
            task_definition_arn=task_definition["taskDefinitionArn"],
            container_name=container_name,
            subnet_ids=(subnet["Subnet"]["SubnetId"],),
            security_group_ids=(group["GroupId"],),
            log_group=log_group,
            stream_prefix=stream_prefix,
            vpc_id=vpc_id,
        )

    def setup_batch(
        self, region: str = DEFAULT_REGION, name: str = "orchestrator-test"
    ) -> BatchEnv:
        """Batch names must match ``[A-Za-z0-9][A-Za-z0-9_-]{1,126}[A-Za-z0-9]``."""
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "batch.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        with self.client("iam", region) as iam:
            role_arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))[
                "Role"
            ]["Arn"]
        with self.client("batch", region) as batch:
            environment = batch.create_compute_environment(
                computeEnvironmentName=name, type="UNMANAGED", state="ENABLED", serviceRole=role_arn
            )
            queue = batch.create_job_queue(
                jobQueueName=name,
                state="ENABLED",
                priority=1,
                computeEnvironmentOrder=[
                    {"order": 1, "computeEnvironment": environment["computeEnvironmentArn"]}
                ],
            )
            definition = batch.register_job_definition(
                jobDefinitionName=name,
                type="container",
                containerProperties={
                    "image": "public.ecr.aws/docker/library/busybox:latest",
                    "command": ["sh", "-c", "echo hello"],
                    "resourceRequirements": [
                        {"type": "VCPU", "value": "1"},
                        {"type": "MEMORY", "value": "128"},
                    ],
                },
            )
        return BatchEnv(
            region=region,
            role_arn=role_arn,
            compute_environment=name,
            compute_environment_arn=environment["computeEnvironmentArn"],
            job_queue=name,
            job_queue_arn=queue["jobQueueArn"],
            job_definition=name,
            job_definition_arn=definition["jobDefinitionArn"],
        )


def _free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- pytest fixtures --


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        server.warm_up()
        yield server


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    moto_server.reset()
    return moto_server


@pytest.fixture
def fault_proxy(moto: MotoServer) -> Iterator[faultproxy.FaultProxy]:
    with faultproxy.ThreadedFaultProxy(moto.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto: MotoServer) -> str:
    """Point the standard AWS environment at moto; return the endpoint URL."""
    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", DEFAULT_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint_url)
    return moto.endpoint_url


@pytest.fixture
def proxied_aws_env(
    monkeypatch: pytest.MonkeyPatch, aws_env: str, fault_proxy: faultproxy.FaultProxy
) -> str:
    """Like `aws_env`, with ``AWS_ENDPOINT_URL`` pointing at the fault proxy."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint_url)
    return fault_proxy.endpoint_url
