"""A moto server with everything orchestrator's ECS and Batch backends need, in the foreground.

    .venv/bin/python examples/aws-offline/moto_up.py [--port N] [--dir DIR] [--ecs-hold |
        --ecs-step-s S] [--batch-fail]

Starts ``python -m moto.server`` on 127.0.0.1 as a child process, sets moto up (Batch without
Docker), creates in region us-east-1: a VPC with DNS hostnames, a subnet and a security group;
an ECS cluster and an awsvpc task definition whose container logs to CloudWatch (awslogs); the
log groups; an UNMANAGED Batch compute environment, a job queue and a job definition. Then it
writes DIR/orchestrator.toml and DIR/env.sh, prints the shell exports and the next command, and
waits. Ctrl-C (or SIGTERM, SIGHUP) stops the server, and every resource with it.

DIR (default ``$TMPDIR/orchestrator-aws-offline-<uid>``, ``/tmp`` without TMPDIR) also holds the
daemon's socket and store, and moto's own log (moto.log). See README.md beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION = "us-east-1"
NAME = "orchestrator-offline"  # every resource's name (Batch: [A-Za-z0-9][A-Za-z0-9_-]+)
CONTAINER = "main"
ECS_LOG_GROUP = f"/ecs/{NAME}"
BATCH_LOG_GROUP = "/aws/batch/job"  # Batch's default: where `orchestrator logs` looks
IMAGE = "public.ecr.aws/docker/library/busybox:latest"  # moto runs no container: never pulled
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
HOLD_TIMES = 1_000_000  # describes per state with --ecs-hold: days at the daemon's poll rate
START_TIMEOUT_S = 60.0
MARKER = ".moto_up"  # in DIR: this script made it, so it may clear DIR/state


class Stop(Exception):
    """SIGTERM or SIGHUP: leave the way Ctrl-C does."""


class Failed(Exception):
    """What stops this script, said on stderr (exit status 1)."""


def default_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"orchestrator-aws-offline-{os.getuid()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start a moto server ready for orchestrator's ECS and Batch backends.",
    )
    parser.add_argument(
        "--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000; 0: a free one)"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"where the config, env.sh, socket, store and moto.log go (default {default_dir()})",
    )
    ecs = parser.add_mutually_exclusive_group()
    ecs.add_argument(
        "--ecs-hold",
        action="store_true",
        help="ECS tasks stay RUNNING until stopped (orchestrator cancel, --timeout-s)",
    )
    ecs.add_argument(
        "--ecs-step-s",
        type=float,
        default=None,
        metavar="S",
        help="ECS tasks take S seconds per state from RUNNING to STOPPED (4 steps)",
    )
    parser.add_argument(
        "--batch-fail",
        action="store_true",
        help="every Batch job ends FAILED (MOTO_SIMPLE_BATCH_FAIL_AFTER=0 in the server)",
    )
    return parser.parse_args(argv)


# -- the directory ---------------------------------------------------------------------------


def prepare_dir(path: Path) -> Path:
    """DIR made 0700 (the daemon's socket lives in it), and checked to be ours."""
    path = path.absolute()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or info.st_uid != os.getuid():
        raise Failed(f"{path} is a symlink or not yours: choose another --dir")
    if any(path.iterdir()) and not (path / MARKER).exists():
        raise Failed(f"{path} is not empty and was not made by this script: choose another --dir")
    path.chmod(0o700)
    (path / MARKER).write_text("made by examples/aws-offline/moto_up.py\n")
    return path


@contextlib.contextmanager
def dir_lock(path: Path) -> Iterator[None]:
    """One moto_up.py per DIR at a time."""
    with open(path / ".moto_up.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise Failed(f"another moto_up.py (pid {holder}) is using {path}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


def clear_state(state: Path) -> None:
    """Drop the store of an earlier run: its jobs lived in a moto server that is gone."""
    if not state.exists():
        return
    lock = state / "orchestrator.db.lock"
    if lock.exists():
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                raise Failed(
                    f"a daemon (pid {holder}) still uses {state}: stop it first (Ctrl-C)"
                ) from None
    shutil.rmtree(state)
    print(f"removed the store of an earlier run: {state}", flush=True)


# -- the server ------------------------------------------------------------------------------


def free_port(port: int = 0) -> int:
    """`port` if it is free on 127.0.0.1 right now (0: any free port); else `Failed`. Checked
    before moto binds it, so that another server already on it is never taken for moto."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as moto's server does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise Failed(f"port {port} is in use ({exc.strerror}): choose another --port") from None
        chosen: int = sock.getsockname()[1]
        return chosen


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when this script dies, even by SIGKILL (Linux)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """moto's own API (``/moto-api/...``), JSON in and out."""
        data = b"" if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.endpoint_url + path,
            data=data if method == "POST" else None,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            payload = reply.read()
        return json.loads(payload) if payload else None

    def log_tail(self, max_bytes: int = 3000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(port: int, log: Path, env: Mapping[str, str]) -> Server:
    """The server answering on 127.0.0.1:`port` (0: a free port, retried if another process
    takes it first)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for _ in range(5 if port == 0 else 1):
        chosen = free_port(port)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(chosen)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # no threads here yet
            )
        server = Server(process, chosen, log)
        try:
            while process.poll() is None:
                try:
                    server.call("GET", "/moto-api/config")
                    return server
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise Failed(
                            f"moto did not answer in {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}"
                        ) from None
                    time.sleep(0.1)
        except BaseException:
            server.stop()
            raise
        if "Address already in use" not in server.log_tail():
            raise Failed(f"moto exited {process.returncode}:\n{server.log_tail()}")
    raise Failed(
        f"port {chosen} is in use: choose another --port" if port else "no free port found"
    )


# -- the AWS resources -----------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    cluster: str
    task_definition: str
    task_definition_arn: str
    subnet: str
    security_group: str
    vpc: str
    compute_environment: str
    job_queue: str
    job_definition: str
    job_definition_arn: str


def create_resources(endpoint_url: str) -> Resources:
    import boto3  # type: ignore[import-untyped, unused-ignore]

    session = boto3.Session(
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    )

    def client(service: str) -> Any:
        return session.client(service, endpoint_url=endpoint_url)

    ec2 = client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    # Without DNS hostnames moto answers RunTask (awsvpc) with HTTP 500.
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=f"{REGION}a")
    group = ec2.create_security_group(GroupName=NAME, Description="orchestrator jobs", VpcId=vpc)

    logs = client("logs")
    for log_group in (ECS_LOG_GROUP, BATCH_LOG_GROUP):
        logs.create_log_group(logGroupName=log_group)

    ecs = client("ecs")
    ecs.create_cluster(clusterName=NAME)
    task_definition = ecs.register_task_definition(
        family=NAME,
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="512",
        containerDefinitions=[
            {
                "name": CONTAINER,
                "image": IMAGE,
                "essential": True,
                "memory": 128,  # moto answers RunTask with HTTP 500 without it
                "logConfiguration": {
                    "logDriver": "awslogs",
                    "options": {
                        "awslogs-group": ECS_LOG_GROUP,
                        "awslogs-region": REGION,
                        "awslogs-stream-prefix": "ecs",
                    },
                },
            }
        ],
    )["taskDefinition"]

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
    role = client("iam").create_role(RoleName=NAME, AssumeRolePolicyDocument=json.dumps(trust))
    batch = client("batch")
    # UNMANAGED: moto starts no instances either way, and a MANAGED one needs more to make.
    environment = batch.create_compute_environment(
        computeEnvironmentName=NAME,
        type="UNMANAGED",
        state="ENABLED",
        serviceRole=role["Role"]["Arn"],
    )
    batch.create_job_queue(
        jobQueueName=NAME,
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[
            {"order": 1, "computeEnvironment": environment["computeEnvironmentArn"]}
        ],
    )
    definition = batch.register_job_definition(
        jobDefinitionName=NAME,
        type="container",
        containerProperties={
            "image": IMAGE,
            "command": ["true"],
            "resourceRequirements": [
                {"type": "VCPU", "value": "1"},
                {"type": "MEMORY", "value": "128"},
            ],
        },
    )
    return Resources(
        cluster=NAME,
        task_definition=NAME,
        task_definition_arn=task_definition["taskDefinitionArn"],
        subnet=subnet["Subnet"]["SubnetId"],
        security_group=group["GroupId"],
        vpc=vpc,
        compute_environment=NAME,
        job_queue=NAME,
        job_definition=NAME,
        job_definition_arn=definition["jobDefinitionArn"],
    )


# -- the files -------------------------------------------------------------------------------


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def write_config(path: Path, directory: Path, server: Server, res: Resources) -> None:
    text = f"""\
# Written by examples/aws-offline/moto_up.py for the moto server at {server.endpoint_url}.
# Every AWS resource named here lives in that server (region {REGION}) and is gone when it
# stops. Run the daemon with the variables of env.sh beside this file (run.sh does).

[server]
socket_path = {toml_string(str(directory / "orchestrator.sock"))}

[store]
path = {toml_string(str(directory / "state" / "orchestrator.db"))}

[jobs]
backend = "ecs"                   # a job that names no backend runs on ECS

[local]
enabled = false                   # this example is about ECS and Batch

[ecs]
enabled = true
region_name = "{REGION}"
cluster = "{res.cluster}"
task_definition = "{res.task_definition}"
container_name = "{CONTAINER}"
subnets = ["{res.subnet}"]
security_groups = ["{res.security_group}"]
# The start-up health probe (StopTask on a bogus task id, which AWS refuses as "not found")
# gets HTTP 500 from moto, retried with back-off before the daemon shrugs it off: skipped here.
check_health_on_startup = false

[batch]
enabled = true
region_name = "{REGION}"
job_queue = "{res.job_queue}"
job_definition = "{res.job_definition}"
"""
    path.write_text(text)


def exports(server: Server, config: Path, directory: Path) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": server.endpoint_url,
        **CREDENTIALS,
        "AWS_DEFAULT_REGION": REGION,
        "ORCHESTRATOR_CONFIG": str(config),
        # clients (submit, status, ...) read no config file: they need the socket from here
        "ORCHESTRATOR__SERVER__SOCKET_PATH": str(directory / "orchestrator.sock"),
    }


def export_line(variables: Mapping[str, str]) -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())


def write_env(path: Path, variables: Mapping[str, str]) -> None:
    path.write_text(
        "# Written by examples/aws-offline/moto_up.py: `. env.sh` points AWS clients and\n"
        "# orchestrator at its moto server. Removed when that server stops.\n"
        "unset AWS_PROFILE AWS_SESSION_TOKEN AWS_REGION\n"
        f"{export_line(variables)}\n"
    )


# -- main ------------------------------------------------------------------------------------


def on_signal(signum: int, frame: types.FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def shown(path: Path) -> str:
    """`path` as the user would type it: relative to the current directory when under it."""
    relative = os.path.relpath(path)
    return shlex.quote(path.as_posix() if relative.startswith("..") else relative)


def serve(args: argparse.Namespace, directory: Path) -> None:
    """Start moto, fill it, write the files, and wait for a signal (or moto's end)."""
    clear_state(directory / "state")
    env_file, config = directory / "env.sh", directory / "orchestrator.toml"
    env_file.unlink(missing_ok=True)
    server_env = {**os.environ, **CREDENTIALS, "AWS_DEFAULT_REGION": REGION}
    if args.batch_fail:
        server_env["MOTO_SIMPLE_BATCH_FAIL_AFTER"] = "0"  # read by moto at each SubmitJob
    fail_after = server_env.get("MOTO_SIMPLE_BATCH_FAIL_AFTER")
    server = start_server(args.port, directory / "moto.log", server_env)
    try:
        # Docker-less Batch: a job ends at SubmitJob. With Docker (moto's default) each job
        # would run in a container, and end FAILED with no reason where there is no Docker.
        server.call("POST", "/moto-api/config", {"batch": {"use_docker": False}})
        if args.ecs_hold or args.ecs_step_s is not None:
            transition: dict[str, Any] = (
                {"progression": "manual", "times": HOLD_TIMES}
                if args.ecs_hold
                else {"progression": "time", "seconds": args.ecs_step_s}
            )
            server.call(
                "POST",
                "/moto-api/state-manager/set-transition",
                {"model_name": "ecs::task", "transition": transition},
            )
        res = create_resources(server.endpoint_url)
        write_config(config, directory, server, res)
        variables = exports(server, config, directory)
        write_env(env_file, variables)
        run_sh = shown(Path(__file__).resolve().parent / "run.sh")
        orchestrator = Path(sys.executable).parent / "orchestrator"
        client = shown(orchestrator) if orchestrator.exists() else "orchestrator"
        batch_end = "SUCCEEDED at once"
        if fail_after:
            batch_end = f"FAILED (MOTO_SIMPLE_BATCH_FAIL_AFTER={fail_after})"
        print(
            f"""\
moto     {server.endpoint_url} (pid {server.process.pid}, log {server.log}), region {REGION}
ECS      cluster {res.cluster}, task definition {res.task_definition_arn}
         container {CONTAINER!r} logging to {ECS_LOG_GROUP}; {res.subnet}, {res.security_group}
         tasks {ecs_behaviour(args)}
Batch    queue {res.job_queue} (UNMANAGED compute environment {res.compute_environment}),
         job definition {res.job_definition_arn}, logs in {BATCH_LOG_GROUP}
         jobs end {batch_end}
config   {config}

The daemon, in another shell (in the foreground):
  {run_sh}{"" if args.dir is None else " " + shlex.quote(str(directory))}
A job on each backend, in a third:
  . {shlex.quote(str(env_file))}
  {client} submit --backend ecs --wait -- echo hi
  {client} submit --backend batch --wait -- echo hi
The variables of env.sh:
{export_line(variables)}

Ctrl-C stops moto, and every resource above with it.""",
            flush=True,
        )
        code = server.process.wait()
        raise Failed(f"moto exited {code}:\n{server.log_tail()}")
    finally:
        with contextlib.suppress(OSError):
            if server.endpoint_url in env_file.read_text():  # ours, not a later run's
                env_file.unlink()
        server.stop()


def ecs_behaviour(args: argparse.Namespace) -> str:
    if args.ecs_hold:
        return "stay RUNNING until stopped (StopTask)"
    if args.ecs_step_s is not None:
        return f"run about 4 x {args.ecs_step_s:g} s, then stop with exit code 0"
    return "stop with exit code 0 by their 4th DescribeTasks"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        directory = prepare_dir(args.dir or default_dir())
        with dir_lock(directory):
            serve(args, directory)
    except (KeyboardInterrupt, Stop):
        print("\nmoto stopped", flush=True)
    except Failed as exc:
        print(f"moto_up: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
