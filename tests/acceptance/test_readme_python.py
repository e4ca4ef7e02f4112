"""The README's Python example, run as written against a real daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(short_tmp, env={"ORCHESTRATOR__LOCAL__MAX_CONCURRENCY": "8"})
    proc.start()
    yield proc
    proc.close()


def test_the_readme_python_example_runs(daemon: DaemonProcess) -> None:
    section = README.read_text().split("### From Python", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    ran = subprocess.run(
        [sys.executable, "-c", code],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "SUCCEEDED 0 None\n"
