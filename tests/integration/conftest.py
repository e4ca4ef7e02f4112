"""What the integration tests share: ECS and Batch set up on the moto server (`moto`), a
daemon run as a process of its own (`daemon`), and several on one PostgreSQL (`make_node`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import cluster
from tests.support.daemon import DaemonProcess
from tests.support.faultproxy import FaultProxy
from tests.support.moto import BatchEnv, EcsEnv, MotoServer
from tests.support.postgres import PostgresServer


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    """`orchestrator serve` as a process of its own on `short_tmp` (started by the test)."""
    proc = DaemonProcess(short_tmp)
    yield proc
    proc.close()


@pytest.fixture
def ecs_env(moto: MotoServer) -> EcsEnv:
    """A cluster, a task definition with awslogs, a VPC with DNS hostnames (moto)."""
    return moto.setup_ecs()


@pytest.fixture
def batch_env(moto: MotoServer) -> BatchEnv:
    """A compute environment, a queue and a job definition; jobs end at once (no Docker)."""
    moto.configure_batch(use_docker=False)
    return moto.setup_batch()


@pytest.fixture
def database(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL."""
    return asyncio.run(postgres_server.new_database())


@pytest.fixture
def make_node(
    short_tmp: Path, fault_proxy: FaultProxy, ecs_env: EcsEnv, database: str
) -> Iterator[cluster.NodeFactory]:
    """`make_node(name, **sections)`: an unstarted daemon named `name` on `database`, with the
    local and ECS backends (ECS through `fault_proxy`), its lease TTL `cluster.TTL_S`."""
    yield from cluster.nodes(short_tmp, fault_proxy, ecs_env, database)
