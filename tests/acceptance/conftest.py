"""What the acceptance tests share: a real `orchestrator serve` process, started and stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    """`orchestrator serve` on the local backend, running in `short_tmp`."""
    proc = DaemonProcess(short_tmp)
    proc.start()
    yield proc
    proc.close()
