"""What the integration tests share: ECS and Batch set up on the moto server (`moto`)."""

from __future__ import annotations

import pytest

from tests.support.moto import BatchEnv, EcsEnv, MotoServer


@pytest.fixture
def ecs_env(moto: MotoServer) -> EcsEnv:
    """A cluster, a task definition with awslogs, a VPC with DNS hostnames (moto)."""
    return moto.setup_ecs()


@pytest.fixture
def batch_env(moto: MotoServer) -> BatchEnv:
    """A compute environment, a queue and a job definition; jobs end at once (no Docker)."""
    moto.configure_batch(use_docker=False)
    return moto.setup_batch()
