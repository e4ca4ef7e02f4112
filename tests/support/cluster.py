"""Several daemons on one real PostgreSQL (issue #16), for the tests: each an `orchestrator
serve` process with its own socket and local work directory, the ECS backend talking to moto
through the fault proxy (which counts launches), the lease's TTL short."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator import views
from orchestrator.client import SyncClient
from tests.integration.test_aws_crash import WAIT_S, aws_process_env, ecs_settings, wait_for
from tests.support.daemon import DaemonProcess, settings_env
from tests.support.faultproxy import FaultProxy
from tests.support.moto import EcsEnv

TTL_S = 2.0  # the lease's TTL in these tests: a takeover within seconds
NodeFactory = Callable[..., DaemonProcess]


def nodes(
    short_tmp: Path, fault_proxy: FaultProxy, ecs_env: EcsEnv, database: str
) -> Iterator[NodeFactory]:
    """`make_node(name)`: an unstarted daemon named `name`, with the local and ECS backends,
    on the test's database; its socket and local work directory its own."""
    made: list[DaemonProcess] = []

    def make(name: str, **sections: Mapping[str, Any]) -> DaemonProcess:
        root = short_tmp / name
        root.mkdir()
        settings: dict[str, Mapping[str, Any]] = {
            **ecs_settings(ecs_env),
            "poller": {"base_s": 0.05, "cap_s": 0.5},
            "dispatcher": {"retry_base_s": 0.1, "retry_cap_s": 1.0},
            "store": {"url": database},
            "cluster": {"node": name, "lease_ttl_s": TTL_S},
            **sections,
        }
        proc = DaemonProcess(root, env=settings_env(settings))
        proc.env = {
            **{k: v for k, v in proc.env.items() if not k.startswith("AWS_")},
            **aws_process_env(fault_proxy.endpoint_url),
        }
        made.append(proc)
        return proc

    yield make
    for proc in made:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # one a test left stopped
        proc.close()


def ping(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.client() as client:
        found: dict[str, Any] = client.call("ping")
    return found


def leader_of(daemons: list[DaemonProcess]) -> DaemonProcess:
    """The daemon that says it leads, once every daemon agrees on who does."""

    def agreed() -> DaemonProcess | None:
        seen = [ping(d)["cluster"] for d in daemons]
        names = {s["leader"]["node"] if s["leader"] else None for s in seen}
        leading = [d for d, s in zip(daemons, seen, strict=True) if s["leading"]]
        if len(names) == 1 and None not in names and len(leading) == 1:
            return leading[0]
        return None

    found: DaemonProcess = wait_for(agreed, "every daemon to agree on one leader")
    return found


def submit(daemon: DaemonProcess, spec: Mapping[str, Any]) -> str:
    with daemon.client() as client:
        job_id: str = client.submit(spec)["id"]
    return job_id


def wait_job(daemon: DaemonProcess, job_id: str) -> views.Job:
    with SyncClient(daemon.socket_path, timeout_s=WAIT_S * 2) as client:
        client.wait(job_id)
        return client.get(job_id, history=True)
