from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.moto", "tests.support.service", "tests.support.postgres"]
# Shared suites imported by test modules: their asserts explain a failure as a test's do.
pytest.register_assert_rewrite("tests.store_conformance")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path: unix socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="orc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
