"""A real PostgreSQL server for the tests, started from Debian's binaries in a temporary
directory: `initdb` and `postgres` refuse to run as root, so as the `postgres` user (which
Debian's package creates) when the tests run as root. It listens on a unix socket only, trusts
local connections, and is stopped at the end of the session. `databases()` hands out fresh
databases on it."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest


def binaries() -> Path | None:
    """The newest installed server's `bin` directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One server: `url(database)` to connect, `new_database()` for a fresh one."""

    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.root = root
        self.bin = bin_dir
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self._names = itertools.count()
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            self.user = "postgres"
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    def start(self, *, durable: bool = False) -> None:
        """Start the server: for tests without fsync (fast); `durable`, as a production one
        (fsync, synchronous commits: for benchmarks)."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._as:
            entry = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        if not (self.data / "PG_VERSION").exists():  # made once: a restart keeps its data
            self._run(
                str(self.bin / "initdb"),
                *("-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8"),
                *("--locale=C.UTF-8", "--no-sync"),
            )
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
            "-c max_connections=200"
        )
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.root / "server.log"),
            "start",
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}"

    async def new_database(self) -> str:
        """A fresh, empty database's URL."""
        name = f"t{os.getpid()}_{next(self._names)}_{int(time.time() * 1000) % 100000}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()
        return self.url(name)


@contextlib.contextmanager
def running_server(*, durable: bool = False) -> Iterator[PostgresServer | None]:
    """A server for the session (`durable`: as `PostgresServer.start` says), or None where no
    PostgreSQL is installed."""
    bin_dir = binaries()
    if bin_dir is None or (os.geteuid() == 0 and not _has_user("postgres")):
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="orc-pg-", dir="/tmp"))
    os.chmod(root, 0o755)
    server = PostgresServer(root, bin_dir)
    try:
        server.start(durable=durable)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


REQUIRED = os.environ.get("ORCHESTRATOR_TEST_POSTGRES") == "required"  # CI: never skip


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server. Where none is installed the tests that need it are
    skipped — except under CI (`ORCHESTRATOR_TEST_POSTGRES=required`), where that fails."""
    with running_server() as server:
        if server is None:
            if REQUIRED:
                pytest.fail("PostgreSQL is required (ORCHESTRATOR_TEST_POSTGRES) but not installed")
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        yield server
