"""Hide directories from a job: `hide`, in the job's forked child just before its exec.

`hide(hidden, keep)` gives the calling process, and all it starts, a mount namespace of its own
in which each existing directory of `hidden` is an empty read-only tmpfs (`ro,nosuid,nodev,
noexec`, mode 0755), except `keep`, a directory inside one of them, which stays visible and
writable at its own path (the tmpfs holds its parent directories, the real `keep` is bound onto
them). Every other path, and every other process's view, is unchanged: propagation is made
`slave` before anything is mounted, so no mount made here reaches the host (mounts the host
makes later still show here). `probe` says whether `hide` works on this host.

How, by privilege:
- With CAP_SYS_ADMIN (root): a new mount namespace alone. A job that is root, or keeps
  CAP_SYS_ADMIN, can undo it (umount the tmpfs): root is root. One that switches to another
  uid and drops its capabilities (after `hide`) cannot.
- Without (any other uid): a new user namespace owning the new mount namespace, mapping only the
  caller's uid and gid to themselves, so `id`, file ownership and access checks are as outside
  (setgroups is denied; supplementary groups still grant access, but `id` shows them as 65534).
  The mounts are made there, then a second user and mount namespace is entered, the job's: the
  mounts were made in a more privileged one, so the kernel locks them. Although the job holds
  every capability in its own user namespace (until its exec), it cannot unmount the tmpfs or
  the keep bind (EINVAL), remount them (EPERM), or bind a directory without what is mounted
  under it (EINVAL). Having no capability outside, it can no longer switch users either: call
  `hide` after a setuid, not before.

What it does not do:
- Hide processes. Other processes of the job's uid can still be signalled and their /proc read.
  As root's job (first case) it can also ptrace them and follow their /proc/PID/root and
  /proc/PID/cwd into *their* view, where nothing is hidden, unless they are non-dumpable
  (`prctl(PR_SET_DUMPABLE, 0)`). In its own user namespace (second case) the kernel refuses it
  that for every process outside (ptrace, /proc/PID/{root,cwd,fd,environ,mem}: EACCES), as the
  tests check; /proc/PID/{cmdline,status} stay readable.
- Close files: descriptors already open in the hidden directories stay usable. (The working
  directory is looked up again by its path: seen through the new mounts, or / if now hidden.)
- Work everywhere: without CAP_SYS_ADMIN it needs unprivileged user namespaces, which a sysctl,
  seccomp (systemd's RestrictNamespaces=), or a chroot (the kernel refuses a chrooted process a
  user namespace) may forbid. `hide` then raises OSError and must not be followed by the job.

Standard library only, nothing from the package: imported by the job runner, which runs as
`python -I -S`. Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from collections.abc import Iterator

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_TMPFS_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
_libc: ctypes.CDLL | None = None


def hide(hidden: list[str], keep: str | None) -> None:
    """Hide the directories `hidden` from this process and its descendants, except `keep`.

    Call in a single-threaded process (a fresh fork). A directory of `hidden` that does not exist
    is skipped; one inside another is covered by the outer one. `keep` is None or a directory
    inside one of them (outside them it is visible anyway; ValueError if it is one of them).
    Raises OSError naming the failed step ("mount tmpfs on /x: Permission denied"); the process
    may then be left with only part hidden, so it must not go on to run the job.
    """
    roots = _roots(hidden)
    keep = os.path.realpath(keep) if keep is not None else ""
    if keep in roots:
        raise ValueError(f"keep {keep} is itself a hidden directory")
    keep_in = next((root for root in roots if _inside(keep, root)), None)

    try:
        _check("unshare(CLONE_NEWNS)", _lib().unshare(CLONE_NEWNS))
        user_ns = False
    except OSError:  # no CAP_SYS_ADMIN: a user namespace of its own grants it
        _enter_user_namespace()
        user_ns = True
    _mount(None, "/", None, MS_REC | MS_SLAVE, "make / rslave")

    keep_fd = -1
    if keep_in is not None:
        # Opened in this namespace, before hiding: a bind from another namespace is refused.
        with _step(f"open keep {keep}"):
            keep_fd = os.open(keep, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for root in roots:
            _mount("tmpfs", root, "tmpfs", _TMPFS_FLAGS, f"mount tmpfs on {root}", "mode=0755")
            if root == keep_in:
                umask = os.umask(0o022)  # keep's parents 0755: reachable whatever the job's uid
                try:
                    with _step(f"mkdir {keep} in tmpfs"):
                        os.makedirs(keep)
                finally:
                    os.umask(umask)
                bind = MS_BIND | MS_REC
                _mount(f"/proc/self/fd/{keep_fd}", keep, None, bind, f"bind keep onto {keep}")
            flags = MS_REMOUNT | MS_RDONLY | _TMPFS_FLAGS
            _mount(None, root, None, flags, f"remount tmpfs on {root} read-only")
    finally:
        if keep_fd >= 0:
            os.close(keep_fd)
    if user_ns:
        _enter_user_namespace()  # the job's: the mounts made above are locked in it
    try:
        os.chdir(os.getcwd())  # seen through the new mounts
    except OSError:
        os.chdir("/")


def probe(hidden: list[str], keep: str | None) -> str | None:
    """Whether `hide(hidden, keep)` works here: None if it does, else what failed. Tried in a
    forked child, which exits at once."""
    _lib()  # loaded before the fork: the child only calls it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(read_end)
            hide(hidden, keep)
            status = 0
        except Exception as e:
            os.write(write_end, str(e).encode(errors="replace")[:4096])
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        error = reader.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return error or f"probe: child failed (wait status {status})"


def _roots(hidden: list[str]) -> list[str]:
    """The existing directories of `hidden`, resolved, without those inside another."""
    existing = set()
    for path in hidden:
        real = os.path.realpath(path)
        try:
            mode = os.stat(real).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise OSError(e.errno, f"stat {real}: {e.strerror}") from e
        if stat.S_ISDIR(mode):
            existing.add(real)
    return sorted(p for p in existing if not any(_inside(p, q) for q in existing))


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _enter_user_namespace() -> None:
    """A new user and mount namespace, with this process's uid and gid mapped to themselves."""
    uid, gid = os.geteuid(), os.getegid()
    _check("unshare(CLONE_NEWUSER|CLONE_NEWNS)", _lib().unshare(CLONE_NEWUSER | CLONE_NEWNS))
    # A process that is not dumpable (forked from the keeper or the daemon, which are not) sees
    # its /proc/self files owned by root, and may not write its own maps: dumpable for just
    # the writes. (Its exec makes the job dumpable anyway.)
    dumpable = _lib().prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
    _lib().prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with _step(f"write /proc/self/{name}"):
                fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, text.encode())
                finally:
                    os.close(fd)
    finally:
        _lib().prctl(_PR_SET_DUMPABLE, dumpable, 0, 0, 0)


def _mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    what: str,
    data: str | None = None,
) -> None:
    args = [None if s is None else os.fsencode(s) for s in (source, target, fstype, data)]
    _check(what, _lib().mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]))


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """OSError raised inside say what failed: "what: strerror"."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{what}: {e.strerror}") from e
