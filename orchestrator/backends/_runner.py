"""What a local job's process does between the keeper's fork and its exec, and the copier of
its output. Used by `_keeper.py`, which forks each job from itself.

In the forked child (`exec_child`), in this order, each step checked:

1. with a cgroup, it joins it (as the daemon's user: a job running as its submitter cannot
   write `cgroup.procs`, and must not be able to), so the job and all it starts are in it;
   with a v1 memory cgroup (a hybrid host's, where OOM kills are counted), it joins that too,
   best-effort: one it cannot join is not a reason to fail the job (its OOM kills are then
   not known);
2. a session of its own (`setsid`): the job's pid is its process group, which stops signal;
3. stdin from /dev/null, stdout and stderr on the keeper's pipes, default signal dispositions
   (Python ignores SIGPIPE and SIGXFSZ; a job must not inherit that);
4. in `daemon` mode where the kernel allows it, the daemon's state (the store's directory, the
   work directory but for the job's own attempt directory) hidden (`_sandbox.hide`);
5. with a user, becomes it (supplementary groups, gid, uid, then no capability left);
6. enters its working directory as that user (one the user may not enter fails the job, 126);
7. execs the command, searched on the job's own PATH.

A step that fails is told to the keeper on a close-on-exec pipe (`STAGE errno detail`, as
`subprocess` does it) and the child exits 127; the keeper records it as the job's outcome
(`Unstarted.outcome`).

`Output` copies one of the job's pipes to its log file with splice(2) (the bytes never pass
through the keeper), up to a limit: past it a marker line is written and the rest discarded,
so no job can fill the disk with output, and the job keeps running; output the disk refuses
(ENOSPC, EIO) is dropped and the gap noted, never left to block the job.

`python -I -S _runner.py --check-user UID:GID:G1,G2` only becomes that user (as a job's child
would) and exits 0, or 1 saying on stderr what failed: the daemon's check, at start-up, that it
can run jobs as their submitters.

Only modules the interpreter loads anyway plus `select`, nothing from the package.
(`ctypes` is imported only in a job's child about to drop capabilities or hide the daemon's
state, and is gone at its exec.)
"""

import errno
import os
import signal
import sys
from collections.abc import Callable

_SPLICE_MAX = 1 << 20  # bytes asked of one splice call (a pipe holds 64 KiB by default)
_DRAIN_MAX = 16 << 20  # once the job has exited, copy at most this much more per stream


def truncation_marker(limit: int) -> bytes:
    return (
        f"\n[orchestrator: output truncated at {limit} bytes; further output discarded]\n".encode()
    )


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    return stat(pid)[1]


def stat(pid: int) -> tuple[str, int]:
    """The process's state (`R`, `S`, `Z`…: field 3 of /proc/PID/stat) and start time."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        line = fh.read()
    fields = line[line.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


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


def _execvp(command: list[str], env: dict[str, str]) -> None:
    """`os.execvpe`, which imports modules to read PATH: after the switch this process may not
    be able to read the interpreter's files. The same search, on the job's own PATH: each
    entry in turn, the first error other than "not there" is the one told."""
    name = command[0]
    if "/" in name:
        os.execve(name, command, env)
    first: OSError | None = None
    last: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        try:
            os.execve(os.path.join(directory, name), command, env)
        except (FileNotFoundError, NotADirectoryError) as exc:
            last = exc
        except OSError as exc:
            last = exc
            first = first or exc
    raise first or last


# Why the job's child could not exec, as it reports it (`STAGE errno detail`).
_CGROUP, _HIDE, _USER, _CWD, _EXEC = "cgroup", "hide", "user", "cwd", "exec"


class Launch:
    """What the keeper's child needs to become the job."""

    __slots__ = (
        "cgroup",
        "command",
        "cpu_cgroup",
        "cwd",
        "env",
        "hidden",
        "hide",
        "keep",
        "memory_cgroup",
        "user",
    )

    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        cwd: str,
        cgroup: str | None = None,
        user: User | None = None,
        hidden: list[str] | None = None,
        keep: str | None = None,
        hide: Callable[[list[str], str | None], None] | None = None,
        memory_cgroup: str | None = None,
        cpu_cgroup: str | None = None,
    ) -> None:
        self.command = command
        self.env = env
        self.cwd = cwd
        self.cgroup = cgroup
        self.user = user
        self.hidden = hidden or []
        self.keep = keep
        self.hide = hide  # `_sandbox.hide`, handed over by the keeper that imported it
        self.memory_cgroup = memory_cgroup  # the attempt's v1 memory cgroup: OOM kills counted
        self.cpu_cgroup = cpu_cgroup  # the attempt's v1 cpu cgroup: its CPU limit


def exec_child(launch: Launch, stdout: int, stderr: int, report: int) -> None:
    """In the keeper's forked child: the steps of the module's docstring, then exec. Never
    returns."""
    stage = _CGROUP
    try:
        if launch.cgroup is not None:
            join(launch.cgroup)
        if launch.cpu_cgroup is not None:
            join(launch.cpu_cgroup)  # its CPU limit: not run without it
        if launch.memory_cgroup is not None:
            try:
                join(launch.memory_cgroup)
            except OSError:
                pass  # best-effort: it only counts OOM kills (the daemon reads no count then)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        for signum in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGPIPE,
            signal.SIGXFSZ,
            signal.SIGCHLD,
        ):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        if launch.hidden and launch.hide is not None:
            stage = _HIDE
            launch.hide(launch.hidden, launch.keep)
        stage = _USER
        if launch.user is not None:
            become(launch.user)
        stage = _CWD
        os.chdir(launch.cwd)
        stage = _EXEC
        _execvp(launch.command, launch.env)
    except OSError as exc:
        detail = exc.strerror if stage in (_CGROUP, _HIDE, _USER) else ""
        os.write(report, f"{stage} {exc.errno or errno.EIO} {detail or ''}".encode())
    except BaseException as exc:  # whatever it is, told: never a bare 127 with no reason
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

    def outcome(self, launch: Launch) -> tuple[int, str]:
        """The job's exit code and the reason recorded for it."""
        if self.stage == _CGROUP:
            return 126, f"cannot join the job's cgroup {launch.cgroup}: {self.detail}; not run"
        if self.stage == _HIDE:
            return 126, f"cannot hide the daemon's state from the job: {self.detail}; not run"
        if self.stage == _USER:
            return 126, f"cannot run as {launch.user}: {self.detail}"
        if self.stage == _CWD:
            return 126, f"cannot enter working directory {launch.cwd!r}: {self.detail}"
        code = 127 if self.errno == errno.ENOENT else 126
        return code, f"cannot run {launch.command[0]!r}: {self.detail}"


def join(cgroup: str) -> None:
    """Move this process into `cgroup` (writing 0 to cgroup.procs moves the writer; v1 and
    v2 alike)."""
    fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def check_user(user: User) -> int:
    """`--check-user`: become `user` as a job's child would; 0, or 1 saying why not."""
    try:
        become(user)
    except OSError as exc:
        _write(2, f"cannot run as {user}: {exc.strerror}\n")
        return 1
    return 0


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "--check-user":
            return check_user(User(argv[1]))
    except ValueError:
        pass
    _write(2, "usage: _runner.py --check-user UID:GID:G1,G2\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
