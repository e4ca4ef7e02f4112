"""The local backend's job runner: a tiny parent that outlives the daemon.

Run as `python -I -S _runner.py [--cgroup DIR] [--user UID:GID:G1,G2] ATTEMPT_DIR CWD
MAX_OUTPUT_BYTES -- ARGV...` in its own session (process group), with stdout/stderr already
pointing at the job's log files. It

0. with `--cgroup`, moves itself into that cgroup (made by the daemon) before anything else, so
   the job and all it starts are in it; if it cannot, it exits with `SETUP_FAILED + errno`, as
   below, and the job does not run (it joins as the daemon's user: a job running as its
   submitter cannot write `cgroup.procs`, and must not be able to);
1. claims the attempt by hard-linking a file that names its pid and start time (if the claim is
   taken, a restarted daemon has declared this attempt never launched, so it exits at once; if
   the claim cannot be written at all — disk full, I/O error — it exits with status
   `SETUP_FAILED + errno`, which the daemon, its parent, records as the job's failure);
2. runs ARGV directly (no shell) in CWD, passing on its own environment, in a forked child that,
   with `--user`, first becomes that user (supplementary groups, gid, uid, then no capability
   left: each checked), then enters CWD as that user (so a CWD the user may not enter fails the
   job, 126), then execs. The runner itself keeps the daemon's uid: it writes the attempt's
   files, which the job cannot reach. The job's stdout and stderr are pipes that the runner
   copies to the log files with splice(2) (the bytes never pass
   through this process), each up to MAX_OUTPUT_BYTES: past that a marker line is written and
   the rest is discarded, so no job can fill the disk with output, and the job keeps running;
   output the disk refuses (ENOSPC, EIO) is dropped, never left to block the job;
3. ignores the signals the daemon sends to the group (the job gets them and decides), and once
   the job's own process has exited copies what is left in the pipes and moves on (a background
   grandchild holding them open does not hold up the outcome; its later writes get SIGPIPE);
4. writes the job's exit status atomically beside its logs, so a daemon that was down when the
   job ended still learns its true outcome. While the disk refuses the file, it retries with
   back-off and stays alive, so the job is seen running, never lost.

`--check-user UID:GID:G1,G2` only becomes that user (as the job's child would) and exits 0, or 1
saying on stderr what failed: the daemon's check, at start-up, that it can run jobs as their
submitters.

Only modules the interpreter loads anyway (no subprocess, no json) plus `select`, nothing from
the package, and run with `-I -S`: it costs about as much as a bare interpreter start (~15 ms).
(`ctypes` is imported only in a job's child about to drop capabilities, and is gone at its exec.)
"""

import errno
import os
import select
import signal
import sys
import time

SETUP_FAILED = 100  # exit status SETUP_FAILED + errno: the attempt could not even be claimed
_SPLICE_MAX = 1 << 20  # bytes asked of one splice call (a pipe holds 64 KiB by default)
_DRAIN_MAX = 16 << 20  # once the job has exited, copy at most this much more per stream
_RETRY_FIRST_S = 0.1
_RETRY_CAP_S = 5.0


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def setup_failure(status: int) -> int | None:
    """The errno a runner's exit status reports (None: not a set-up failure)."""
    return status - SETUP_FAILED if SETUP_FAILED < status <= 255 else None


def truncation_marker(limit: int) -> bytes:
    return (
        f"\n[orchestrator: output truncated at {limit} bytes; further output discarded]\n".encode()
    )


def _json(value: object) -> str:
    """Enough JSON for flat objects of numbers, None and strings (repr escapes what JSON would
    not read back, so strings go through an explicit escape)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        escaped = "".join(
            c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else f"\\u{ord(c):04x}" for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json(k)}: {_json(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_atomically(path: str, payload: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as fh:
            fh.write(_json(payload))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)  # give back what a half-written file holds
        except OSError:
            pass
        raise


def record(path: str, payload: dict[str, object]) -> None:
    """`write_atomically`, retried with back-off while the disk refuses it: meanwhile this
    process lives on, and the daemon sees the job running rather than lost. Only a vanished
    attempt directory ends the retries (nobody will look there)."""
    delay_s = _RETRY_FIRST_S
    while True:
        try:
            write_atomically(path, payload)
            return
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError:
            time.sleep(delay_s)
            delay_s = min(_RETRY_CAP_S, delay_s * 2)


def claim(attempt_dir: str) -> bool:
    pid = os.getpid()
    tmp = os.path.join(attempt_dir, f"claim.{pid}")
    try:
        with open(tmp, "w") as fh:
            fh.write(_json({"pid": pid, "start_time": start_time(pid)}))
        os.link(tmp, os.path.join(attempt_dir, "claim"))
    except FileExistsError:
        return False
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return True


class Output:
    """One of the job's output pipes, copied to its log file up to `limit` bytes."""

    def __init__(self, pipe: int, file: int, limit: int) -> None:
        self.pipe = pipe
        self.file = file
        self.limit = limit
        self.room = max(0, limit - os.lseek(file, 0, os.SEEK_END))
        self.lost = 0  # bytes the disk refused since the last successful write
        self.lost_why = ""
        self._splice = True  # False once the log file's filesystem refuses splice
        self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # where the excess goes

    def pump(self) -> int:
        """Move what the pipe holds now: bytes moved, 0 if none is waiting, -1 at end of file
        (every writer has closed it)."""
        try:
            if self.room == 0:
                return self._discard()
            if self.lost:  # say so before what follows the gap, as soon as the disk takes it
                note = f"\n[orchestrator: {self.lost} bytes of output lost: {self.lost_why}]\n"
                os.write(self.file, note.encode())
                self.lost = 0
            moved = self._copy(min(self.room, _SPLICE_MAX))
        except BlockingIOError:
            return 0
        except OSError as exc:  # the log file refused it (ENOSPC, EDQUOT, EIO): drop it
            return self._drop(exc, self._discard())
        if moved <= 0:
            return moved
        self.room -= moved
        if self.room == 0:
            _write(self.file, truncation_marker(self.limit).decode())
        return moved

    def _copy(self, size: int) -> int:
        if self._splice:
            try:
                return os.splice(self.pipe, self.file, size) or -1
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self._splice = False  # e.g. a FUSE log directory: copy through this process
        data = os.read(self.pipe, size)
        if not data:
            return -1
        try:
            os.write(self.file, data)
        except OSError as exc:
            return self._drop(exc, len(data))
        return len(data)

    def _drop(self, exc: OSError, size: int) -> int:
        self.lost += max(0, size)
        self.lost_why = exc.strerror or str(exc)
        return size

    def _discard(self) -> int:
        try:
            return os.splice(self.pipe, self._null, _SPLICE_MAX) or -1
        except BlockingIOError:
            return 0

    def drain(self) -> None:
        """Copy what the pipe holds, within a bound (a writer may still be at it)."""
        moved = 0
        while moved < _DRAIN_MAX:
            n = self.pump()
            if n <= 0:
                return
            moved += n

    def close(self) -> None:
        os.close(self.pipe)
        os.close(self._null)


def _write(fd: int, text: str) -> None:
    """A note of ours in a log file; if the disk refuses it too, the output says less."""
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


class User:
    """Whom the job runs as (`--user UID:GID:G1,G2`): uid, primary gid, supplementary groups."""

    def __init__(self, spec: str) -> None:
        uid, gid, groups = spec.split(":")
        self.uid = int(uid)
        self.gid = int(gid)
        self.groups = [int(group) for group in groups.split(",") if group]

    def __str__(self) -> str:
        groups = ",".join(map(str, self.groups)) or "none"
        return f"uid {self.uid} (gid {self.gid}, supplementary groups {groups})"


_CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capabilities() -> dict[str, int]:
    """This process's capability sets, but the bounding set (/proc/self/status)."""
    found = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in _CAPABILITY_SETS:
                found[name] = int(value, 16)
    return found


class _EmptyCapabilities:
    """Calling it empties the permitted, effective and inheritable sets (and with them the
    ambient one). Made before the switch: `ctypes` is imported here, and once switched this
    process may not be able to read the interpreter's files."""

    def __init__(self) -> None:
        import ctypes  # only here: in a job's child, gone at its exec

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [
                (set_, ctypes.c_uint32) for set_ in ("effective", "permitted", "inheritable")
            ]

        self._ctypes = ctypes
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._header = Header(_LINUX_CAPABILITY_VERSION_3, 0)
        self._empty = (Data * 2)()  # version 3: two 32-bit words of each set

    def __call__(self) -> None:
        if self._libc.capset(self._ctypes.byref(self._header), self._empty) != 0:
            code = self._ctypes.get_errno()
            raise OSError(code, os.strerror(code))


def become(user: User) -> None:
    """Become `user` for good: supplementary groups, gid, uid (in that order: each needs the
    privileges that the next takes away), then no capabilities left. Every step is checked;
    OSError if any did not take. Imports nothing once switched (see `_EmptyCapabilities`)."""
    # From root, the uid change itself empties every set but the inheritable one. From a user
    # holding capabilities (the daemon's user under systemd, AmbientCapabilities=) it empties
    # none, and the ambient set would survive the exec: the job would hold CAP_SETUID.
    held = capabilities()
    capset = None
    if user.uid != 0 and (held["CapInh"] or (os.geteuid() != 0 and any(held.values()))):
        capset = _EmptyCapabilities()
    what = "setgroups"
    try:
        os.setgroups(user.groups)
        what = "setgid"
        os.setgid(user.gid)
        what = "setuid"
        os.setuid(user.uid)
        if capset is not None:
            what = "capset"
            capset()
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: {exc.strerror}") from exc
    uids, gids, groups = os.getresuid(), os.getresgid(), sorted(set(os.getgroups()))
    if (uids, gids, groups) != ((user.uid,) * 3, (user.gid,) * 3, sorted(set(user.groups))):
        found = f"uids {uids}, gids {gids}, groups {groups}"
        raise OSError(errno.EPERM, f"the switch did not take ({found})")
    left = {name: hex(value) for name, value in capabilities().items() if value and user.uid}
    if left:
        raise OSError(errno.EPERM, f"capabilities are left after the switch: {left}")
    if user.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise OSError(errno.EPERM, "the switch did not take: root could be regained")


def _execvp(command: list[str]) -> None:
    """`os.execvp`, which imports modules to read PATH: after the switch this process may not
    be able to read the interpreter's files. The same search: each PATH entry in turn, the
    first error other than "not there" is the one told."""
    name = command[0]
    if "/" in name:
        os.execv(name, command)
    first: OSError | None = None
    last: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        try:
            os.execv(os.path.join(directory, name), command)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last = exc
        except OSError as exc:
            last = exc
            first = first or exc
    raise first or last


# Why the job's child could not exec, as it reports it (`STAGE errno detail`).
_USER, _CWD, _EXEC = "user", "cwd", "exec"


def _exec_child(
    command: list[str], cwd: str, user: User | None, stdout: int, stderr: int, report: int
) -> None:
    """In the forked child: the job's stdout and stderr on the pipes, default signal
    dispositions (Python ignores SIGPIPE and SIGXFSZ; a job must not inherit that), the job's
    user (with `--user`), its working directory entered as that user, exec."""
    stage = _USER
    try:
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        for signum in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGPIPE,
            signal.SIGXFSZ,
        ):
            signal.signal(signum, signal.SIG_DFL)
        if user is not None:
            become(user)
        stage = _CWD
        os.chdir(cwd)
        stage = _EXEC
        _execvp(command)
    except OSError as exc:
        detail = exc.strerror if stage == _USER else ""
        os.write(report, f"{stage} {exc.errno or errno.EIO} {detail or ''}".encode())
    except Exception as exc:  # whatever it is, told: never a bare 127 with no reason
        os.write(report, f"{stage} {errno.EIO} {exc!r}".encode())
    finally:
        os._exit(127)


class Unstarted:
    """Why the job's own process could not be started: at which stage, and the errno."""

    def __init__(self, report: bytes) -> None:
        stage, code, detail = report.decode(errors="replace").split(" ", 2)
        self.stage = stage
        self.errno = int(code)
        self.detail = detail or os.strerror(self.errno)

    def outcome(self, command: list[str], cwd: str, user: User | None) -> tuple[int, str]:
        """The job's exit code and the reason recorded for it."""
        if self.stage == _USER:
            return 126, f"cannot run as {user}: {self.detail}"
        if self.stage == _CWD:
            return 126, f"cannot enter working directory {cwd!r}: {self.detail}"
        code = 127 if self.errno == errno.ENOENT else 126
        return code, f"cannot run {command[0]!r}: {self.detail}"


def spawn_and_wait(
    command: list[str], limit: int, cwd: str, user: User | None = None
) -> int | Unstarted | OSError:
    """fork + execvp (PATH from our environment), copying the job's output while it runs; the
    wait status, why the job could not be started (`Unstarted`), or why no child could be made
    (OSError).

    A close-on-exec pipe tells the two apart: it closes empty when exec succeeds and carries
    the stage and errno when it fails, the way `subprocess` does it.
    """
    try:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        outputs = [Output(out_r, 1, limit), Output(err_r, 2, limit)]
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except OSError as exc:  # EMFILE, EAGAIN, ENOMEM: the host is short of something
        return exc
    if pid == 0:
        _exec_child(command, cwd, user, out_w, err_w, write_end)
    for fd in (out_w, err_w, write_end):
        os.close(fd)
    with os.fdopen(read_end, "rb") as pipe:
        failed = pipe.read()
    if failed:
        os.waitpid(pid, 0)
        for output in outputs:
            output.close()
        return Unstarted(failed)
    status = _copy_until_exit(pid, outputs)
    for output in outputs:
        output.drain()
        output.close()
    return status


def _copy_until_exit(pid: int, outputs: list[Output]) -> int:
    """Copy the job's output until its own process exits; its wait status."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        pidfd = -1  # no pidfd: look for the exit twice a second
    poller = select.poll()
    by_fd = {}
    for output in outputs:
        os.set_blocking(output.pipe, False)
        poller.register(output.pipe, select.POLLIN)
        by_fd[output.pipe] = output
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    try:
        while True:
            ready = poller.poll(None if pidfd >= 0 else 500)
            for fd, _ in ready:
                stream = by_fd.get(fd)
                if stream is not None and stream.pump() < 0:
                    poller.unregister(fd)  # every writer is gone; keep it for the drain
                    del by_fd[fd]
            if pidfd < 0 or any(fd == pidfd for fd, _ in ready):
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    return status
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def join(cgroup: str) -> None:
    """Move this process into `cgroup` (writing 0 to cgroup.procs moves the writer)."""
    fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


_USAGE = (
    "usage: _runner.py [--cgroup DIR] [--user UID:GID:G1,G2] ATTEMPT_DIR CWD MAX_OUTPUT_BYTES "
    "-- ARGV...\n       _runner.py --check-user UID:GID:G1,G2\n"
)


def check_user(user: User) -> int:
    """`--check-user`: become `user` as a job's child would; 0, or 1 saying why not."""
    try:
        become(user)
    except OSError as exc:
        _write(2, f"cannot run as {user}: {exc.strerror}\n")
        return 1
    return 0


def main(argv: list[str]) -> int:
    options: dict[str, str] = {}
    while argv[:1] in (["--cgroup"], ["--user"], ["--check-user"]) and len(argv) > 1:
        options[argv[0]], argv = argv[1], argv[2:]
    try:
        user = User(options["--user"]) if "--user" in options else None
        if "--check-user" in options:
            return check_user(User(options["--check-user"]))
    except ValueError:
        argv = []
    if len(argv) < 5 or argv[3] != "--" or not argv[2].isdigit():
        _write(2, _USAGE)
        return 2
    cgroup = options.get("--cgroup")
    attempt_dir, cwd, limit, command = argv[0], argv[1], int(argv[2]), argv[4:]
    try:
        # Before the claim: a runner that cannot be contained leaves the attempt unclaimed,
        # so a restarted daemon knows for sure that the job never ran.
        if cgroup is not None:
            try:
                join(cgroup)
            except OSError as exc:
                _write(2, f"orchestrator: cannot join the job's cgroup {cgroup}: {exc.strerror}\n")
                raise
        if not claim(attempt_dir):
            return 0
    except OSError as exc:  # nothing can be recorded: our exit status says why
        return SETUP_FAILED + min(exc.errno or errno.EIO, 255 - SETUP_FAILED)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # A handler (not SIG_IGN, which children would inherit) keeps the runner alive to
        # record the outcome while the job, in the same group, receives the signal.
        signal.signal(signum, lambda *_: None)
    started = time.time()
    exit_path = os.path.join(attempt_dir, "exit")
    status = spawn_and_wait(command, limit, cwd, user)
    result: dict[str, object]
    if isinstance(status, (Unstarted, OSError)):
        if isinstance(status, Unstarted):
            code, message = status.outcome(command, cwd, user)
        else:  # no child at all (EAGAIN, EMFILE, ENOMEM)
            code, message = 126, f"cannot run {command[0]!r}: {status.strerror}"
        _write(2, f"orchestrator: {message}\n")
        result = {"exit_code": code, "signal": None, "error": message}
    else:
        killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        result = {
            "exit_code": 128 + killed_by if killed_by else os.WEXITSTATUS(status),
            "signal": killed_by,
            "error": None,
        }
    result.update(started_at=started, finished_at=time.time())
    record(exit_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
