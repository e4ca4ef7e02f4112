"""What the integration tests share: ECS and Batch set up on the moto server (`moto`), and a
daemon run as a process of its own (`daemon`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.moto import BatchEnv, EcsEnv, MotoServer


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
