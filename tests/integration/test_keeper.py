"""The local backend's keeper (`backends/_keeper.py`) under abuse, with real daemons, real keepers
and real peers: a work directory whose path no unix socket may have, peers of another uid,
garbage on its socket, jobs that try to talk to it, its life across daemon stops, and a second
keeper for the same directory. Whatever happens, the keeper stays one process, refuses whom it
must, and every job ends with its true exit code.

Jobs that must outlive a step wait for a gate file (`Gated`), so no test depends on how long
anything takes; every wait is bounded (`tests/support/waits.py`)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backends import keeper as keeper_client
from orchestrator.client import SyncClient
from tests.support.cgroup import FOUND
from tests.support.daemon import DaemonProcess, settings_env
from tests.support.keeper import KeeperConnection, keeper_pids, log_events
from tests.support.peers import SYSTEM_PYTHON
from tests.support.probes import running_pid
from tests.support.waits import wait_for

pytestmark = pytest.mark.timeout(90)

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="setpriv to another uid needs root")
needs_cgroups = pytest.mark.skipif(
    not FOUND.enabled, reason=f"no cgroup v2 this process may make cgroups in: {FOUND.detail}"
)

# What a peer got first from the socket named by argv[1]: the bytes (b'' when the keeper closed
# the connection without a word), TIMEOUT, or why it could not connect. PEEK prints it; run by
# the system python, so any uid can run it.
_FIRST_WORDS = """
import socket, sys
def first_words():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
        return repr(s.recv(1 << 16))
    except socket.timeout:
        return "TIMEOUT"
    except OSError as exc:
        return "ERROR " + repr(exc)
"""
PEEK = _FIRST_WORDS + "print(first_words(), flush=True)\n"


class Gated:
    """A job that records its pid in `root/NAME.ran`, waits for the gate `root/NAME.go`, then
    exits with `code` (99 if the gate never opened within 30 s)."""

    def __init__(self, root: Path, name: str, code: int) -> None:
        self.ran = root / f"{name}.ran"
        self.gate = root / f"{name}.go"
        self.code = code

    @property
    def command(self) -> list[str]:
        script = (
            f"echo $$ >> {self.ran}; i=0; "
            f"while [ ! -e {self.gate} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
            f"[ -e {self.gate} ] && exit {self.code}; exit 99"
        )
        return ["sh", "-c", script]

    def open(self) -> None:
        self.gate.touch()

    def runs(self) -> list[str]:
        return self.ran.read_text().split() if self.ran.exists() else []


class Harness:
    """Daemons on `root`, and what a failed test leaves behind cleaned up: daemons killed
    (stopped ones too), gates opened, keepers of the work directories used killed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[DaemonProcess] = []
        self.gates: list[Gated] = []
        self.work_dirs: list[Path] = []

    def daemon(self, local: dict[str, Any] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.root, settings_env({"local": local or {}}))
        self.daemons.append(daemon)
        work_dir = Path((local or {}).get("work_dir") or daemon.store_path.parent / "jobs")
        self.work_dirs.append(work_dir)
        return daemon

    def gated(self, name: str, code: int) -> Gated:
        gated = Gated(self.root, name, code)
        self.gates.append(gated)
        return gated

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.close()
        for gated in self.gates:
            gated.open()
        for work_dir in self.work_dirs:
            for pid in keeper_pids(work_dir):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def harness(short_tmp: Path) -> Iterator[Harness]:
    harness = Harness(short_tmp)
    yield harness
    harness.cleanup()


def work_dir_of(daemon: DaemonProcess) -> Path:
    return daemon.store_path.parent / "jobs"


def started_pid(client: SyncClient, job_id: str) -> int:
    """The pid of the job's own process, once it runs."""

    def pid() -> int | None:
        job = client.get(job_id)
        assert job["state"] in ("QUEUED", "SUBMITTED", "RUNNING"), job
        return job["info"].get("pid") if job["state"] == "RUNNING" and job["info"] else None

    found: int = wait_for(pid, f"job {job_id} to run")
    return found


def outcome(client: SyncClient, job_id: str) -> tuple[str, int | None]:
    final = client.wait(job_id)
    return final["state"], final["exit_code"]


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


def keeper_said(work_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(work_dir) if e.get("event") == name]


def op(message: dict[str, Any] | None) -> str | None:
    """The `op` of a line from the keeper; None if it closed the connection instead."""
    return None if message is None else message.get("op")


def expect(conn: KeeperConnection, wanted: str, context: object = None) -> dict[str, Any]:
    """The keeper's next line, which must have op `wanted`."""
    message = conn.line()
    assert op(message) == wanted, (context, message)
    assert message is not None
    return message


def only_keeper(work_dir: Path) -> int:
    """The one keeper of `work_dir` (not counting its children that have yet to exec their
    job). A second one may show for a moment (one started while the first still starts exits
    at once: the lock is held); two that stay fail the test."""
    pids: list[int] = wait_for(
        lambda: (found := keeper_pids(work_dir)) and len(found) == 1 and found,
        f"exactly one keeper of {work_dir}",
    )
    return pids[0]


# -- 1. a work directory longer than a unix socket's path ------------------------------------


def test_a_work_dir_longer_than_a_socket_path_runs_jobs_across_a_restart(
    harness: Harness,
) -> None:
    # Fails if the keeper binds, or the daemon connects to, `WORK_DIR/keeper.sock` by its full
    # path: AF_UNIX takes 107 bytes at most, so no job could be launched (nor adopted).
    work = harness.root / ("w" * 60) / ("x" * 60) / "jobs"
    assert len(os.fsencode(work / "keeper.sock")) > 108
    daemon = harness.daemon({"work_dir": str(work)})
    daemon.start()
    slow = harness.gated("slow", 5)
    with daemon.client() as client:
        quick = client.submit({"command": ["sh", "-c", "exit 3"]})
        assert outcome(client, quick["id"]) == ("FAILED", 3)
        job = client.submit({"command": slow.command})
        started_pid(client, job["id"])
    keeper = only_keeper(work)
    assert (work / "keeper.sock").exists()

    daemon.kill()  # kill -9: the next daemon must find the same keeper by the same long path
    daemon.start()
    slow.open()
    with daemon.client() as client:
        assert outcome(client, job["id"]) == ("FAILED", 5)
        after = client.submit({"command": ["sh", "-c", "exit 0"]})
        assert outcome(client, after["id"]) == ("SUCCEEDED", 0)
    assert only_keeper(work) == keeper
    assert len(slow.runs()) == 1  # adopted, not run again
    assert events(daemon, "local.keeper_connected")[0]["keeper_pid"] == keeper


# -- 2. a peer of another uid ----------------------------------------------------------------


@needs_root
def test_a_peer_of_another_uid_is_refused_without_a_hello(harness: Harness) -> None:
    daemon = harness.daemon()
    daemon.start()
    work = work_dir_of(daemon)
    victim = harness.gated("victim", 7)
    with daemon.client() as client:
        job = client.submit({"command": victim.command})
        started_pid(client, job["id"])
    keeper = only_keeper(work)
    sock = work / "keeper.sock"
    # Let uid 65534 reach the socket at all: search permission on every directory above it
    # (short_tmp, state/ and jobs/ are 0700) and the socket 0666 (the keeper makes it 0600).
    # The file modes no longer stand in its way: the keeper's peer check is all that does.
    for directory in (harness.root, harness.root / "state", work):
        os.chmod(directory, 0o711)
    os.chmod(sock, 0o666)

    # Fails (the peer prints the hello it got) if the keeper does not check the peer's uid.
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    peer = subprocess.run(
        [*as_nobody, SYSTEM_PYTHON, "-I", "-c", PEEK, str(sock)],
        capture_output=True,
        timeout=30,
    )
    # Connected (not EACCES), then closed by the keeper with nothing said: no `hello`, which
    # lists every job's key and pid, and would have made the peer the keeper's daemon.
    assert peer.stdout.decode().strip() == "b''", (peer.stdout, peer.stderr)
    refusals = keeper_said(work, "keeper.refused")
    assert any("uid 65534" in e["reason"] for e in refusals), refusals
    assert only_keeper(work) == keeper
    # Refused before it could replace the daemon's connection: the daemon never lost it.
    assert not events(daemon, "local.keeper_disconnected"), daemon.log()

    # The control: the same probe as the keeper's own uid is answered with a hello, so the
    # refusal above was the uid's doing, not the probe's. (The victim still runs: the keeper
    # may not exit when this peer, which replaced the daemon's connection, hangs up.)
    own = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", PEEK, str(sock)], capture_output=True, timeout=30
    )
    assert own.stdout.decode().startswith('b\'{"op": "hello"'), (own.stdout, own.stderr)
    victim.open()
    with daemon.client() as client:
        assert outcome(client, job["id"]) == ("FAILED", 7)
        # The control replaced the daemon's connection: it reconnects and runs the next job.
        after = client.submit({"command": ["sh", "-c", "exit 2"]})
        assert outcome(client, after["id"]) == ("FAILED", 2)
    assert only_keeper(work) == keeper
    assert len(victim.runs()) == 1


# -- 3. garbage on the socket from the keeper's own uid -------------------------------------

# Each is one line, answered by `{"op": "error"}` (a keeper that let any of them raise out of
# its loop would die: a new pid afterwards, and the running jobs' outcomes gone with it).
GARBAGE = [
    b"this is not json\n",
    b"[1, 2, 3]\n",  # JSON, not an object
    b'"launch"\n',
    b"42\n",
    b"null\n",
    b'{"op": "dance"}\n',  # an unknown op
    b'{"no_op": true}\n',
    b'{"op": "launch", "key": "x/1"}\n',  # a launch missing nearly everything
    b'{"op": "launch", "key": "x/1", "dir": "/nonexistent/orc", "command": "true", "env": []}\n',
    b'{"op": "forget", "keys": 5}\n',
    b"\x00\n",  # a NUL byte
    b'{"op": "forget", "keys": []}\x00\n',
    b'{"op": "la\x00unch"}\n',
    b"\xff\xfe\xfd\n",  # not UTF-8
    b"[" * 100_000 + b"\n",  # nested past the recursion limit
    b"9" * 10_000 + b"\n",  # an integer past int's string limit
]


def test_garbage_on_the_socket_neither_kills_the_keeper_nor_loses_a_job(harness: Harness) -> None:
    daemon = harness.daemon()
    daemon.start()
    work = work_dir_of(daemon)
    during = harness.gated("during", 9)  # ends while we hold the keeper's connection
    holder = harness.gated("holder", 8)  # runs throughout: the keeper may not exit meanwhile
    with daemon.client() as client:
        job = client.submit({"command": during.command})
        pid = started_pid(client, job["id"])
        held = client.submit({"command": holder.command})
        started_pid(client, held["id"])
    key = f"{job['id']}/1"
    keeper = only_keeper(work)
    attempt_dir = work / job["id"] / "1"

    # Freeze the daemon, so that it cannot reconnect (and replace us) while we are at it: each
    # line below is then answered to us, not drained unanswered.
    daemon.send_signal(signal.SIGSTOP)
    try:
        with KeeperConnection(work) as conn:
            hello = expect(conn, "hello")
            assert hello["pid"] == keeper
            records = {j["key"]: j for j in hello["jobs"]}
            assert set(records) == {key, f"{held['id']}/1"}
            for garbage in GARBAGE:
                conn.send(garbage)
                expect(conn, "error", garbage[:60])
            # Requests that are well formed but wrong: a launch into a directory that does not
            # exist fails saying so (nothing ran); a launch of the running job's key is given
            # that job again (not run twice); forgetting a job that runs forgets nothing.
            missing = str(harness.root / "no" / "such" / "dir")
            conn.send(
                b'{"op": "launch", "key": "y/1", "dir": "%s", "command": ["true"], "env": {}, '
                b'"cwd": "/", "limit": 1}\n' % missing.encode()
            )
            answer = expect(conn, "failed")
            assert answer["errno"] == errno.ENOENT
            conn.send(
                b'{"op": "launch", "key": "%s", "dir": "%s", "command": ["true"], "env": {}, '
                b'"cwd": "/", "limit": 1}\n' % (key.encode(), str(attempt_dir).encode())
            )
            again = {"op": "launched", "key": key, "pid": pid, "start": records[key]["start"]}
            assert conn.line() == again
            conn.send(b'{"op": "forget", "keys": ["%s"]}\n' % key.encode())
            conn.send(b'{"op": "signal", "key": "%s", "signal": 0}\n' % key.encode())
            conn.send(b'{"op": "signal", "key": "nobody/1", "signal": 9}\n')
            conn.send(b"still not json\n")  # answered once the three above (unanswered) are done
            expect(conn, "error")

            # The job ends now, while we hold the keeper's connection: its outcome is told to
            # us, and must still reach the daemon later (it was not forgotten above).
            during.open()
            exited = expect(conn, "exited")
            assert (exited["key"], exited["result"]["exit_code"]) == (key, 9)

            # A line of 10 MiB with no newline: past the keeper's bound, the connection closes.
            try:
                conn.send(b"x" * (10 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert conn.line() is None
        assert keeper_said(work, "keeper.line_too_long")

        # A request cut short by a hang-up, on a connection of its own.
        with KeeperConnection(work) as conn:
            expect(conn, "hello")
            conn.send(b'{"op": "launch", "key": "z/1", "dir": ')
    finally:
        daemon.send_signal(signal.SIGCONT)

    # Once more with the daemon running: everything at once, then a hang-up. The daemon's
    # reconnection may replace us at any point; what we sent is then drained unanswered.
    with KeeperConnection(work) as conn:
        conn.send(b"".join(GARBAGE))
        conn.sock.shutdown(socket.SHUT_WR)
        said = []
        while (line := conn.line()) is not None:
            said.append(line)
        assert [line["op"] for line in said[:1]] == ["hello"], said
        assert all(line["op"] == "error" for line in said[1:]), said

    assert only_keeper(work) == keeper  # the same keeper all along
    assert len(keeper_said(work, "keeper.bad_request")) >= len(GARBAGE) + 1
    with daemon.client() as client:
        assert outcome(client, job["id"]) == ("FAILED", 9)
        after = client.submit({"command": ["sh", "-c", "exit 4"]})
        assert outcome(client, after["id"]) == ("FAILED", 4)
        holder.open()
        assert outcome(client, held["id"]) == ("FAILED", 8)
    assert len(during.runs()) == 1
    assert len(holder.runs()) == 1
    assert only_keeper(work) == keeper
    assert len(events(daemon, "local.keeper_connected")) >= 2  # it did reconnect


# -- 4. jobs that try to talk to the keeper --------------------------------------------------

# A job that connects to the keeper (argv[1]) from its own process (argv[2] "own") or from a
# child that has left the job's session first ("setsid"), and prints what it got first.
JOB_PEEK = (
    _FIRST_WORDS
    + """
import os
leader = os.getpid()
def peek():
    print(f"leader={leader} sid={os.getsid(0)} got={first_words()}", flush=True)
if sys.argv[2] == "setsid":
    child = os.fork()
    if child == 0:
        os.setsid()
        peek()
        os._exit(0)
    os.waitpid(child, 0)
else:
    peek()
"""
)


def peeked(stdout: str) -> dict[str, str]:
    """`leader`, `sid` and `got` of what JOB_PEEK printed."""
    line = stdout.strip()
    leader, sid, got = line.split(" ", 2)
    return {"leader": leader[7:], "sid": sid[4:], "got": got[4:]}


@pytest.mark.parametrize(
    "cgroup",
    [pytest.param("auto", marks=needs_cgroups, id="cgroups"), pytest.param("off", id="sessions")],
)
def test_a_job_that_connects_to_the_keeper_is_refused(harness: Harness, cgroup: str) -> None:
    # hide_state off: the socket is in plain sight of the job, only the keeper's peer check
    # stands in its way. With cgroups the job leaves its session first (the session check alone
    # would let it in); without, it connects from its own session. Fails (the job prints the
    # hello it got) if the keeper's cgroup, resp. session, check is missing or wrong.
    daemon = harness.daemon({"hide_state": "off", "cgroup": cgroup})
    daemon.start()
    work = work_dir_of(daemon)
    keeper = only_keeper(work)
    mode = "setsid" if cgroup == "auto" else "own"
    command = [SYSTEM_PYTHON, "-I", "-c", JOB_PEEK, str(work / "keeper.sock"), mode]
    with daemon.client() as client:
        job = client.submit({"command": command})
        final = client.wait(job["id"])
    stdout = (work / job["id"] / "1" / "stdout").read_text()
    assert (final["state"], final["exit_code"]) == ("SUCCEEDED", 0), (final, stdout)
    said = peeked(stdout)
    assert said["got"] == "b''", stdout  # connected, and closed with no hello
    reasons = [e["reason"] for e in keeper_said(work, "keeper.refused")]
    if cgroup == "auto":
        assert "cgroup" in final["info"], final  # it did run in a cgroup of its own
        assert said["sid"] != said["leader"], stdout  # out of the job's session: its cgroup told
        assert any("in a job's cgroup" in reason for reason in reasons), reasons
    else:
        assert said["sid"] == said["leader"], stdout
        assert any("in the session of job" in reason for reason in reasons), reasons
    # Refused before it could replace the daemon's connection; the daemon runs the next job.
    assert not events(daemon, "local.keeper_disconnected"), daemon.log()
    with daemon.client() as client:
        after = client.submit({"command": ["sh", "-c", "exit 6"]})
        assert outcome(client, after["id"]) == ("FAILED", 6)
    assert only_keeper(work) == keeper


# A job whose own process ends at once, leaving a child in its cgroup (and session) that
# ignores SIGTERM, waits until the keeper has reaped the job's process, then connects to the
# keeper (argv[1]) and writes what it got first to argv[2] (its stdout has gone with the job).
LEFTOVER = """
import os, signal, socket, sys, time
leader = os.getpid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before the fork: the child is never without it
if os.fork() == 0:
    for _ in range(1000):
        if not os.path.exists(f"/proc/{leader}"):
            break
        time.sleep(0.01)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
        got = repr(s.recv(1 << 16)[:40])
    except socket.timeout:
        got = "TIMEOUT"
    except OSError as exc:
        got = "ERROR " + repr(exc)
    with open(sys.argv[2] + ".tmp", "w") as fh:
        fh.write(got)
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    os._exit(0)
os._exit(0)
"""


@needs_cgroups
def test_what_a_job_leaves_in_its_cgroup_is_refused_by_the_keeper(harness: Harness) -> None:
    # The daemon counts the job as running until its cgroup is empty, and stops what is left
    # (SIGTERM, then SIGKILL after kill_grace_s): the leftover is still the job's, and the
    # keeper must refuse it as it refuses the job's own process.
    daemon = harness.daemon({"hide_state": "off", "kill_grace_s": 5.0})
    daemon.start()
    work = work_dir_of(daemon)
    keeper = only_keeper(work)
    said = harness.root / "leftover.said"
    command = [SYSTEM_PYTHON, "-I", "-c", LEFTOVER, str(work / "keeper.sock"), str(said)]
    with daemon.client() as client:
        job = client.submit({"command": command})
        got = wait_for(lambda: said.exists() and said.read_text(), "the leftover to connect")
        assert outcome(client, job["id"]) == ("SUCCEEDED", 0)
        after = client.submit({"command": ["sh", "-c", "exit 6"]})
        assert outcome(client, after["id"]) == ("FAILED", 6)
    assert only_keeper(work) == keeper
    assert got == "b''", f"a job's leftover process was let in by the keeper: it got {got}"


# -- 5. the keeper's life across daemon stops ------------------------------------------------


def test_the_keeper_outlives_the_daemon_only_while_it_holds_a_job(harness: Harness) -> None:
    daemon = harness.daemon()
    work = work_dir_of(daemon)

    # No job: the daemon's SIGTERM leaves the keeper with nothing to keep, and it exits.
    daemon.start()
    with daemon.client() as client:
        done = client.submit({"command": ["sh", "-c", "exit 3"]})
        assert outcome(client, done["id"]) == ("FAILED", 3)  # recorded, then forgotten
    first = only_keeper(work)
    assert daemon.stop(signal.SIGTERM) == 0
    # Fails if the keeper waits for a daemon forever, or was not told to forget the job.
    wait_for(lambda: not running_pid(first), "the idle keeper to exit")
    assert [e["pid"] for e in keeper_said(work, "keeper.exiting")] == [first]

    # A job running: the keeper stays, reaps it while no daemon runs, and keeps its outcome.
    daemon.start()
    late = harness.gated("late", 6)
    with daemon.client() as client:
        job = client.submit({"command": late.command})
        pid = started_pid(client, job["id"])
    second = only_keeper(work)
    assert second != first
    assert daemon.stop(signal.SIGTERM) == 0
    late.open()
    wait_for(lambda: not running_pid(pid), "the job to end while no daemon runs")
    # Its outcome awaits a `forget` no daemon can send yet: the keeper must still be there (an
    # exited keeper would have taken the exit status with it: the job would be LOST).
    assert running_pid(second)
    assert second not in [e["pid"] for e in keeper_said(work, "keeper.exiting")]

    daemon.start()
    with daemon.client() as client:
        assert outcome(client, job["id"]) == ("FAILED", 6)
        assert not [j for j in client.call("list")["jobs"] if j["state"] == "RUNNING"]
    assert only_keeper(work) == second  # the same keeper, found, not started anew
    assert events(daemon, "local.keeper_connected")[0]["keeper_pid"] == second
    # Settled and forgotten, no job runs: once this daemon stops too, the keeper exits.
    assert daemon.stop(signal.SIGTERM) == 0
    wait_for(lambda: not running_pid(second), "the keeper to exit after the last daemon")
    assert len(late.runs()) == 1


# -- 6. never two keepers ---------------------------------------------------------------------


def test_a_second_keeper_for_the_same_work_dir_exits_at_once(harness: Harness) -> None:
    daemon = harness.daemon()
    work = work_dir_of(daemon)
    daemon.start()
    held = harness.gated("held", 5)  # keeps the keeper alive once the daemon has gone
    with daemon.client() as client:
        job = client.submit({"command": held.command})
        started_pid(client, job["id"])
    keeper = only_keeper(work)
    daemon.kill()

    # A second keeper that took the directory over would unlink the first's socket, bind its
    # own and wait 30 s for a daemon: the bound below would be exceeded, and two would show.
    second = subprocess.run(
        [sys.executable, "-I", "-S", str(keeper_client.KEEPER), str(work)],
        capture_output=True,
        timeout=10,
    )
    assert second.returncode == 0, second
    assert only_keeper(work) == keeper

    # The first keeper still answers on its socket: the restarted daemon finds it.
    held.open()
    daemon.start()
    with daemon.client() as client:
        assert outcome(client, job["id"]) == ("FAILED", 5)
    assert events(daemon, "local.keeper_connected")[0]["keeper_pid"] == keeper
    assert only_keeper(work) == keeper
    assert len(held.runs()) == 1


# -- a launch answered with an error ---------------------------------------------------------


def test_a_launch_answered_with_an_error_runs_nothing(short_tmp: Path) -> None:
    work = short_tmp / "jobs"
    for attempt in ("a/1", "b/1"):
        (work / attempt).mkdir(parents=True, mode=0o700)
    marker = short_tmp / "ran"
    with open(work / "keeper.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(keeper_client.KEEPER), str(work)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        conn = wait_for(lambda: connect_quietly(work), "the hand-started keeper to listen")
        with conn:
            expect(conn, "hello")
            base = {"op": "launch", "env": {"PATH": os.environ["PATH"]}, "cwd": "/"}
            touch = {**base, "key": "a/1", "dir": str(work / "a/1"), "command": ["touch", marker]}
            conn.send(json_line({**touch, "limit": "not a number"}))
            answer = conn.line()
            assert op(answer) in ("error", "failed"), answer
            # A second launch looks for the first one's marker for up to 2 s: 0 if it appears.
            look = f"for i in $(seq 40); do [ -e {marker} ] && exit 0; sleep 0.05; done; exit 1"
            conn.send(
                json_line(
                    {**base, "key": "b/1", "dir": str(work / "b/1"), "limit": 1 << 20}
                    | {"command": ["sh", "-c", look]}
                )
            )
            expect(conn, "launched")
            exited = expect(conn, "exited")
            conn.send(json_line({"op": "forget", "keys": ["b/1"]}))
        assert proc.wait(timeout=15) == 0  # no daemon, no job: it exits
        assert exited["result"]["exit_code"] == 1, "the launch answered with an error ran"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def connect_quietly(work_dir: Path) -> KeeperConnection | None:
    try:
        return KeeperConnection(work_dir)
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def json_line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, default=str).encode() + b"\n"
