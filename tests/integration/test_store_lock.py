"""One store, one daemon: `orchestrator serve` as real processes on one store. A second daemon
is refused (exit 2, naming the store and the holder's pid) before it recovers anything; the
lock goes with the holder, however it dies; a file that is not an orchestrator store is refused
and left as it was."""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import store, views
from tests.support.daemon import DaemonProcess
from tests.support.waits import wait_for

pytestmark = pytest.mark.timeout(90)

SLEEPER = {"command": ["sleep", "1000"]}


@pytest.fixture
def daemons(short_tmp: Path) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(name: str, env: dict[str, str] | None = None) -> DaemonProcess:
        root = short_tmp / name
        root.mkdir()
        made.append(DaemonProcess(root, env=env))
        return made[-1]

    yield make
    for daemon in made:
        daemon.close()


def running_job(daemon: DaemonProcess) -> views.Job:
    with daemon.client() as client:
        job_id = client.submit(SLEEPER)["id"]
        wait_for(lambda: client.get(job_id)["state"] == "RUNNING", "the job to run", timeout_s=15.0)
        return client.get(job_id, history=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def lock_path(daemon: DaemonProcess) -> Path:
    return daemon.store_path.with_name(daemon.store_path.name + ".lock")


def cancel_and_wait(daemon: DaemonProcess, job_id: str) -> views.Job:
    with daemon.client() as client:
        client.cancel(job_id)
        return client.wait(job_id)


def test_a_second_daemon_on_the_same_store_exits_2_naming_the_store_and_the_holder(
    daemons: Callable[..., DaemonProcess],
) -> None:
    first = daemons("a")
    first.start()
    before = running_job(first)
    runner_pid = before["info"]["pid"]
    second = daemons("b", env={"ORCHESTRATOR__STORE__PATH": str(first.store_path)})

    second.start(wait=False)
    assert second.wait_exit(timeout_s=20) == 2, second.log()
    refusal = [e for e in second.log_events() if e.get("event") == "daemon.failed"]
    assert len(refusal) == 1, second.log()
    assert str(first.store_path) in refusal[0]["error"]
    assert first.proc is not None
    assert f"pid {first.proc.pid}" in refusal[0]["error"]
    assert "daemon.ready" not in second.log()  # it recovered nothing, served nothing
    assert not second.socket_path.exists()

    # The first keeps serving, its job untouched and still running.
    with first.client() as client:
        assert client.call("ping")["pong"] is True
        assert client.get(before["id"], history=True) == before
    assert alive(runner_pid)
    assert lock_path(first).read_text().strip() == str(first.proc.pid)

    # Once the first stops, the second starts and adopts what the first left running.
    assert first.stop() == 0
    second.start()
    with second.client() as client:
        assert client.get(before["id"])["state"] == "RUNNING"
    final = cancel_and_wait(second, before["id"])
    assert (final["state"], final["reason"]) == ("CANCELLED", "cancelled by request")


def test_the_lock_goes_with_a_daemon_killed_by_sigkill_and_no_job_holds_it(
    daemons: Callable[..., DaemonProcess],
) -> None:
    daemon = daemons("a")
    daemon.start()
    job = running_job(daemon)
    runner_pid: int = job["info"]["pid"]
    lock = lock_path(daemon)
    assert daemon.proc is not None
    assert lock.read_text().strip() == str(daemon.proc.pid)
    assert lock.stat().st_mode & 0o777 == 0o600
    assert daemon.store_path.stat().st_mode & 0o777 == 0o600
    # Neither the job's runner nor the job itself has the lock open (close-on-exec).
    for pid in processes_in_group(runner_pid):
        held = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(lock) not in held, f"process {pid} holds the store's lock"

    daemon.stop(signal.SIGKILL)
    assert alive(runner_pid)  # the job outlives the daemon, and must not keep its lock
    daemon.start()  # exits 2 (and this raises) if the lock were still held
    assert lock.read_text().strip() == str(daemon.proc.pid)
    with daemon.client() as client:
        assert client.get(job["id"])["state"] == "RUNNING"
    final = cancel_and_wait(daemon, job["id"])
    assert final["state"] == "CANCELLED"


def processes_in_group(pgid: int) -> list[int]:
    """The processes of the job's group: once there is one (the job is RUNNING as soon as it
    is forked, a moment before its first process makes the group with setsid)."""

    def members() -> list[int]:
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.getpgid(int(name)) == pgid:
                        found.append(int(name))
                except ProcessLookupError:
                    continue
        return found

    wait_for(lambda: bool(members()), f"a process in group {pgid}", timeout_s=10.0)
    return members()


def _empty(path: Path) -> str:
    path.touch(mode=0o600)
    return "the file is empty (0 bytes)"


def _random(path: Path) -> str:
    path.write_bytes(b"\x7fELF not a database" + os.urandom(64 * 1024))
    return "not an SQLite database"


def _someone_elses_sqlite(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('precious')")
    conn.close()
    return "without orchestrator's schema_version; its tables: customers"


def _newer_store(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'",
            (str(store.SCHEMA_VERSION + 1),),
        )
    conn.close()
    return f"schema_version {store.SCHEMA_VERSION + 1}, newer than this orchestrator"


@pytest.mark.parametrize(
    "make_file", [_empty, _random, _someone_elses_sqlite, _newer_store], ids=lambda f: f.__name__
)
def test_a_file_that_is_not_a_usable_store_is_refused_with_exit_2_and_left_as_it_was(
    daemons: Callable[..., DaemonProcess], make_file: Callable[[Path], str]
) -> None:
    daemon = daemons("a")
    if make_file is _newer_store:
        daemon.start()  # a real store, as a newer version would leave it
        assert daemon.stop() == 0
    daemon.store_path.parent.mkdir(parents=True, exist_ok=True)
    expected = make_file(daemon.store_path)
    before = daemon.store_path.read_bytes()

    daemon.start(wait=False)
    assert daemon.wait_exit(timeout_s=20) == 2, daemon.log()
    refusal = [e for e in daemon.log_events() if e.get("event") == "daemon.failed"]
    assert len(refusal) == 1, daemon.log()
    message = refusal[0]["error"]
    assert str(daemon.store_path) in message
    assert expected in message
    if make_file is not _newer_store:
        assert "is not an orchestrator store" in message
    assert daemon.store_path.read_bytes() == before
    assert not daemon.socket_path.exists()
    # Nothing new beside it but the lock: no journal of ours, no half-made store.
    beside = {p.name for p in daemon.store_path.parent.iterdir()}
    assert beside <= {daemon.store_path.name, lock_path(daemon).name, "jobs"}
