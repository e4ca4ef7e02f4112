"""`orchestrator serve` as a service user (uid SERVICE) under `setpriv`, holding only the
capabilities a test gives it, as the shipped systemd units run it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, settings_env

SERVICE = 4343  # the daemon's own uid when it runs as a service user
PEER = 4242  # a made-up uid: no passwd entry


def service_root(short_tmp: Path) -> Path:
    """A directory of the service user's own for its store and socket, reachable by others."""
    os.chmod(short_tmp, 0o711)
    root = short_tmp / "svc"
    root.mkdir(mode=0o711)
    os.chown(root, SERVICE, SERVICE)
    return root


def as_service(*caps: str) -> list[str]:
    """`setpriv` running a command as the service user, holding `caps` (ambient) and no other."""
    held = ",".join(f"+{cap}" for cap in caps)
    ambient = [f"--inh-caps={held}", f"--ambient-caps={held}"] if caps else ["--inh-caps=-all"]
    bounding = f"--bounding-set=-all,{held}" if caps else "--bounding-set=-all"
    return [
        "setpriv",
        f"--reuid={SERVICE}",
        f"--regid={SERVICE}",
        "--clear-groups",
        *ambient,
        bounding,
        "--",
    ]


REPO = Path(__file__).resolve().parents[2]
_REEXEC = (
    "import os, sys; os.execv(sys.executable, [sys.executable, '-c', 'import orchestrator.cli'])"
)


def service_python() -> tuple[list[str], dict[str, str]]:
    """How to run `orchestrator serve` as the service user: a wrapper (after `setpriv`) and
    the environment it needs. This interpreter if that user may run it (and so start runners
    with it); else the system's python3 of the same version with this environment's packages
    on PYTHONPATH (an interpreter under /root, say, is out of other users' reach). Skips the
    test when neither works."""
    candidates: list[tuple[list[str], dict[str, str]]] = [
        ([], {}),
        (["sh", "-c", 'shift; exec /usr/bin/python3 "$@"', "sh"], {}),
    ]
    paths = [str(REPO), sysconfig.get_paths()["purelib"]]
    candidates[1][1]["PYTHONPATH"] = os.pathsep.join(paths)
    why = ""
    for wrapper, env in candidates:
        result = subprocess.run(
            [*as_service(), *wrapper, sys.executable, "-c", _REEXEC],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode == 0:
            return wrapper, env
        why = result.stderr.strip()[-300:]
    pytest.skip(f"no interpreter here can run the package as uid {SERVICE}: {why}")


@pytest.fixture
def service_daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for proc in started:
        proc.close()


def service_daemon(root: Path, wrapper: list[str], **local: Any) -> DaemonProcess:
    """`orchestrator serve` as the service user (`wrapper`: its `setpriv`), its local jobs run
    as their submitters unless `local` says otherwise."""
    python, python_env = service_python()
    env = settings_env(
        {
            "server": {"allowed_uids": [0, SERVICE, PEER]},
            "local": {"run_as": "submitter", "kill_grace_s": 1.0, **local},
        }
    )
    return DaemonProcess(root, {"HOME": str(root), **python_env, **env}, wrapper=wrapper + python)
