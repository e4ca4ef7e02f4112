"""The local backend's keeper: one process that starts, reaps and remembers every local job, and
outlives the daemon.

Run by the daemon as `python -I -S _keeper.py WORK_DIR`, in a session of its own, with stderr on
`WORK_DIR/keeper.log`. (About 540 lines, one file: it runs as a script that imports only its two
siblings.) It holds `WORK_DIR/keeper.lock` for its whole life (one keeper per work
directory) and listens on `WORK_DIR/keeper.sock` (the work directory is the daemon's, 0700).

Why one process and not one per job: a Python parent per job cost 2-4 MB of memory each; the
keeper costs one interpreter for all of them, and each running job costs what its own processes
do. Why a process apart from the daemon: jobs keep running while the daemon restarts or is
upgraded, and their exit status must be kept meanwhile. The keeper is their parent, so it learns
each exit status from the kernel (`waitpid`), never from a file a job could write; it keeps the
outcomes in memory until the daemon says it has recorded them (`forget`). It is not dumpable, so
a process of the same uid (a `daemon`-mode job) cannot read its memory or ptrace it.

The protocol is one JSON object per line, on one connection at a time (the daemon's):

- keeper → daemon, on connecting: `{"op": "hello", "version", "pid", "jobs": [JOB...]}` where
  JOB is `{"key", "pid", "start", "result"}`, `result` null while the job runs;
- daemon → keeper: `{"op": "launch", "key", "dir", "command", "env", "cwd", "cgroup",
  "memory_cgroup", "cpu_cgroup", "user", "hidden", "limit"}`, answered by `{"op": "launched",
  "key", "pid", "start"}` or `{"op": "failed", "key", "errno", "error"}` (nothing ran). The
  launch claims `dir/claim` first (O_EXCL): a restarted daemon that claimed it has declared the
  attempt never launched. `memory_cgroup` (the attempt's v1 memory cgroup, which only counts
  OOM kills; its child joins it best-effort) is optional, so version 1 still holds both ways: a
  keeper from before it ignores it (the attempt's OOM kills are then not known), one that has
  it runs launches without it as before. `cpu_cgroup` (the attempt's v1 cpu cgroup: its CPU limit,
  which its child must join) is optional likewise; the daemon moves the job into it after a
  keeper from before it launched the job;
- keeper → daemon, when a job's own process has ended and its output is copied:
  `{"op": "exited", "key", "result": {"exit_code", "signal", "error", "started_at",
  "finished_at"}}`;
- daemon → keeper: `{"op": "signal", "key", "signal"}` (to the job's process group, while the
  job is not yet reaped: its pid cannot have been reused) and `{"op": "forget", "keys"}`.

A new connection replaces the old one (the daemon was restarted; the store's lock makes sure the
old one has gone): what the old one sent is carried out first, so a launch the old daemon sent is
in the `hello` the new one gets, and a launch absent from it never happens. A peer that is not
of the keeper's uid, or is one of its jobs (in a job's session or cgroup), is refused.

The keeper exits once no daemon is connected, no job runs and no outcome awaits its `forget`.
"""

import errno
import fcntl
import importlib
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from orchestrator.backends import _runner, _sandbox
else:  # run as a script with -I -S: its siblings, and nothing else of the package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _runner = importlib.import_module("_runner")
    _sandbox = importlib.import_module("_sandbox")

VERSION = 1
SOCKET = "keeper.sock"
LOCK = "keeper.lock"
LOG = "keeper.log"
_MAX_LINE = 8 << 20  # a launch carries argv and env, bounded by E2BIG (a few MiB) anyway
_FIRST_CONNECT_S = 30.0  # a keeper nobody connects to and that has no job exits after this
_KEEP_FINISHED = 100_000  # outcomes kept unforgotten at most (the oldest go first)
_UNCOLLECTED_S = 86_400.0  # with no daemon and no job running, outcomes are kept this long
_PR_SET_DUMPABLE = 4


def _log(event: str, **fields: object) -> None:
    line = json.dumps({"ts": time.time(), "event": event, "pid": os.getpid(), **fields})
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


class Job:
    __slots__ = ("key", "launch", "outputs", "pid", "report", "result", "start", "started_at")

    def __init__(self, key: str, pid: int, launch: _runner.Launch, outputs: list[_runner.Output]):
        self.key = key
        self.pid = pid
        try:
            self.start = _runner.start_time(pid)  # not reaped yet: it is our child's
        except (OSError, ValueError, IndexError):
            self.start = 0  # cannot be read now (EMFILE): the key names it all the same
        self.launch = launch
        self.started_at = time.time()
        self.outputs = outputs
        self.report = -1  # the exec report pipe, until read
        self.result: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        return {"key": self.key, "pid": self.pid, "start": self.start, "result": self.result}


class Keeper:
    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir
        self.jobs: dict[str, Job] = {}  # by key: running, then finished until forgotten
        self.running: dict[int, Job] = {}  # by pid, until reaped
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.conn: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.connected_once = False
        self.born = time.monotonic()
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for signum in (signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        self.register(wake_r, select.EPOLLIN, self.on_sigchld)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound by a name relative to the work directory (our cwd, see `main`): a unix socket's
        # path may not exceed 107 bytes, a work directory's may.
        try:
            os.unlink(SOCKET)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(SOCKET)
        finally:
            os.umask(old_umask)
        self.listener.listen(8)
        bound = os.stat(SOCKET)
        self.socket_id = (bound.st_dev, bound.st_ino)
        self.alone_since: float | None = None
        self.listener.setblocking(False)
        self.register(self.listener.fileno(), select.EPOLLIN, self.on_accept)

    def register(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        while not self.done():
            timeout = 1.0 if self.conn is None else -1
            try:
                ready = self.epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, events in ready:
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler(events)
        _log("keeper.exiting", jobs_running=len(self.running), outcomes_held=len(self.jobs))

    def done(self) -> bool:
        if self.conn is not None:
            self.alone_since = None
            return False
        if not self.socket_is_ours():  # the work directory was removed or taken over
            _log("keeper.socket_gone", path=os.path.join(self.work_dir, SOCKET))
            return True
        if self.running:
            return False
        if self.jobs:  # outcomes nobody has collected: kept a day for a daemon to come back
            now = time.monotonic()
            self.alone_since = self.alone_since or now
            return now - self.alone_since > _UNCOLLECTED_S
        return self.connected_once or time.monotonic() - self.born > _FIRST_CONNECT_S

    def socket_is_ours(self) -> bool:
        try:
            found = os.stat(os.path.join(self.work_dir, SOCKET))
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell now (EMFILE): not a reason to leave
        return (found.st_dev, found.st_ino) == self.socket_id

    # -- the daemon's connection -----------------------------------------------------------

    def on_accept(self, _events: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE: the peer's connect is left in the backlog
            _log("keeper.accept_failed", error=str(exc))
            time.sleep(0.05)
            return
        why = self.refusal(conn)
        if why is not None:
            _log("keeper.refused", reason=why)
            conn.close()
            return
        if self.conn is not None:  # the daemon was restarted: finish what the old one sent
            self.drain_old()
        conn.setblocking(False)
        self.conn = conn
        self.connected_once = True
        self.inbuf.clear()
        self.outbuf.clear()
        self.register(conn.fileno(), select.EPOLLIN, self.on_conn)
        jobs = [job.record() for job in self.jobs.values()]
        self.send({"op": "hello", "version": VERSION, "pid": os.getpid(), "jobs": jobs})

    def refusal(self, conn: socket.socket) -> str | None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.geteuid():
            return f"peer pid {pid} is uid {uid}, not the keeper's {os.geteuid()}"
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
            session = int(stat[stat.rindex(b")") + 2 :].split()[3])
            with open(f"/proc/{pid}/cgroup") as fh:
                cgroups = fh.read()
        except (OSError, ValueError, IndexError) as exc:
            return f"peer pid {pid} cannot be looked at: {exc}"
        if session in self.running:
            return f"peer pid {pid} is in the session of job {self.running[session].key}"
        # Every job held, ended or not: what a job left running in its cgroups (v2, and v1
        # memory) is still the job's. (Sessions only of jobs not yet reaped: a reaped job's pid
        # may be anyone's now.)
        names = {
            os.path.basename(path)
            for job in self.jobs.values()
            for path in (job.launch.cgroup, job.launch.memory_cgroup, job.launch.cpu_cgroup)
            if path
        }
        for line in cgroups.splitlines():
            if names & set(line.split(":", 2)[-1].split("/")):
                return f"peer pid {pid} is in a job's cgroup ({line})"
        return None

    def drain_old(self) -> None:
        """Carry out what the old connection sent (its daemon has gone: all it wrote is
        there), for at most a second and `_MAX_LINE` bytes: a peer still talking is cut off."""
        assert self.conn is not None
        old = self.conn
        deadline = time.monotonic() + 1.0
        try:
            old.setblocking(True)
            while (left := deadline - time.monotonic()) > 0 and len(self.inbuf) <= _MAX_LINE:
                old.settimeout(left)
                if not (chunk := old.recv(1 << 16)):
                    break
                self.inbuf += chunk
                self.take_lines(reply=False)
        except OSError:
            pass
        self.close_conn()

    def close_conn(self) -> None:
        if self.conn is not None:
            self.unregister(self.conn.fileno())
            self.conn.close()
            self.conn = None
        self.inbuf.clear()
        self.outbuf.clear()

    def on_conn(self, events: int) -> None:
        if events & select.EPOLLOUT:
            self.flush()
        if self.conn is None or not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            chunk = self.conn.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close_conn()
            return
        self.inbuf += chunk
        self.take_lines(reply=True)
        if len(self.inbuf) > _MAX_LINE:
            _log("keeper.line_too_long", size=len(self.inbuf))
            self.close_conn()

    def take_lines(self, *, reply: bool) -> None:
        while (end := self.inbuf.find(b"\n")) >= 0:
            line = bytes(self.inbuf[:end])
            del self.inbuf[: end + 1]
            try:
                message = json.loads(line)
                answer = self.handle(message)
            except Exception as exc:  # a bad request is answered, never fatal
                _log("keeper.bad_request", error=repr(exc))
                answer = {"op": "error", "error": repr(exc)}
            if reply and answer is not None:
                self.send(answer)

    def send(self, message: dict[str, Any]) -> None:
        if self.conn is None:
            return  # the next daemon reads it from `hello`
        self.outbuf += json.dumps(message).encode() + b"\n"
        self.flush()

    def flush(self) -> None:
        if self.conn is None:
            return
        try:
            while self.outbuf:
                sent = self.conn.send(self.outbuf)
                del self.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close_conn()
            return
        wanted = select.EPOLLIN | (select.EPOLLOUT if self.outbuf else 0)
        self.epoll.modify(self.conn.fileno(), wanted)

    # -- requests --------------------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> dict[str, Any] | None:
        op = message.get("op")
        if op == "launch":
            return self.launch(message)
        if op == "signal":
            job = self.jobs.get(str(message["key"]))
            if job is not None and job.pid in self.running:
                try:
                    os.killpg(job.pid, int(message["signal"]))
                except (ProcessLookupError, PermissionError):
                    pass
            return None
        if op == "forget":
            for key in message["keys"]:
                job = self.jobs.get(str(key))
                if job is not None and job.result is not None:
                    del self.jobs[job.key]
            return None
        raise ValueError(f"unknown op {op!r}")

    def launch(self, message: dict[str, Any]) -> dict[str, Any]:
        key = str(message["key"])
        if (known := self.jobs.get(key)) is not None:  # asked again: the same answer
            return {"op": "launched", "key": key, "pid": known.pid, "start": known.start}
        attempt_dir = str(message["dir"])
        limit = int(message["limit"])  # every field is read before anything is done
        user = _runner.User(message["user"]) if message.get("user") else None
        launch = _runner.Launch(
            command=[str(arg) for arg in message["command"]],
            env={str(k): str(v) for k, v in message["env"].items()},
            cwd=str(message["cwd"]),
            cgroup=message.get("cgroup"),
            memory_cgroup=message.get("memory_cgroup") or None,
            cpu_cgroup=message.get("cpu_cgroup") or None,
            user=user,
            hidden=[str(path) for path in message.get("hidden") or []],
            keep=attempt_dir,
            hide=_sandbox.hide,
        )
        opened: list[int] = []
        try:
            if not claim(attempt_dir, key):
                return failed(key, errno.EEXIST, "the attempt was declared never launched")
            for name in ("stdout", "stderr"):
                # Not O_APPEND: splice(2) refuses such a target. Output writes from the end.
                path = os.path.join(attempt_dir, name)
                opened.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            opened += (out_r, out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            opened += (err_r, err_w)
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            opened += (report_r, report_w)
            pid = os.fork()
        except OSError as exc:  # ENOSPC, EMFILE, EAGAIN, ENOMEM: nothing ran
            for fd in opened:
                os.close(fd)
            return failed(key, exc.errno or errno.EIO, exc.strerror or str(exc))
        if pid == 0:
            _runner.exec_child(launch, out_w, err_w, report_w)
        for fd in (out_w, err_w, report_w):
            os.close(fd)
        outputs = [_runner.Output(out_r, opened[0], limit), _runner.Output(err_r, opened[1], limit)]
        job = Job(key, pid, launch, outputs)
        job.report = report_r
        self.jobs[key] = job
        self.running[pid] = job
        for output in outputs:
            os.set_blocking(output.pipe, False)
            self.register(output.pipe, select.EPOLLIN, self.pumper(output))
        return {"op": "launched", "key": key, "pid": pid, "start": job.start}

    def pumper(self, output: _runner.Output) -> Callable[[int], None]:
        def pump(_events: int) -> None:
            if output.pump() < 0:  # every writer has gone
                self.unregister(output.pipe)

        return pump

    # -- exits -----------------------------------------------------------------------------

    def on_sigchld(self, _events: int) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.running.pop(pid, None)
            if job is not None:
                self.finish(job, status)

    def finish(self, job: Job, status: int) -> None:
        unstarted = None
        if job.report >= 0:
            try:
                said = os.read(job.report, 4096)  # the child has gone: all it wrote is there
            except OSError:
                said = b""
            os.close(job.report)
            job.report = -1
            if said:
                unstarted = _runner.Unstarted(said)
        for output in job.outputs:
            self.unregister(output.pipe)
            output.drain()
            output.close()
        result: dict[str, Any]
        if unstarted is not None:
            code, message = unstarted.outcome(job.launch)
            _runner._write(job.outputs[1].file, f"orchestrator: {message}\n")
            result = {"exit_code": code, "signal": None, "error": message}
        else:
            killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            result = {
                "exit_code": 128 + killed_by if killed_by else os.WEXITSTATUS(status),
                "signal": killed_by,
                "error": None,
            }
        for output in job.outputs:
            os.close(output.file)
        job.outputs = []
        result.update(started_at=job.started_at, finished_at=time.time())
        job.result = result
        self.send({"op": "exited", "key": job.key, "result": result})
        finished = [key for key, other in self.jobs.items() if other.result is not None]
        for key in finished[: max(0, len(finished) - _KEEP_FINISHED)]:
            del self.jobs[key]


def failed(key: str, code: int, why: str) -> dict[str, Any]:
    return {"op": "failed", "key": key, "errno": code, "error": why}


def claim(attempt_dir: str, key: str) -> bool:
    """Claim the attempt for launching: False if a restarted daemon has claimed it first."""
    tmp = os.path.join(attempt_dir, f"claim.{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump({"keeper": os.getpid(), "key": key}, fh)
        os.link(tmp, os.path.join(attempt_dir, "claim"))
    except FileExistsError:
        return False
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return True


def _not_dumpable() -> None:
    """No core dumps, no ptrace and no /proc/PID/mem or environ by processes of our uid."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _cloexec_inherited() -> None:
    """Make close-on-exec every descriptor above stderr this process inherited (from the
    daemon, from whoever started the daemon): a job must never hold them. One
    `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` (Linux ≥ 5.11) works whatever their numbers (a
    spawn's close action cannot name one at or above the soft limit); else they are listed."""
    import ctypes

    number = {"x86_64": 436, "aarch64": 436}.get(os.uname().machine)
    if (
        number is not None
        and ctypes.CDLL(None, use_errno=True).syscall(number, 3, 0xFFFFFFFF, 4) == 0
    ):
        return
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) > 2 and os.get_inheritable(int(name)):
                os.set_inheritable(int(name), False)
        except OSError:
            continue  # closed since the listing (it was the listing's own descriptor)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        _runner._write(2, "usage: _keeper.py WORK_DIR\n")
        return 2
    work_dir = argv[0]
    os.chdir(work_dir)  # each job's child enters its own working directory before its exec
    lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper keeps this work directory
    _not_dumpable()
    _cloexec_inherited()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # each running job holds four descriptors here: as many as the host lets us
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass
    Keeper(work_dir).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
