"""Containment of local jobs: each attempt in a cgroup (v2) of its own.

Where the daemon may make cgroups, each local attempt runs in `<root>/<job id>-<attempt>`. The
daemon makes that directory before it starts the attempt's runner, and the runner moves itself
into it before it starts the job; everything the job starts then — double-forked, `setsid`,
daemonised — is in it and stays in it. So the daemon can signal the whole of a job (SIGTERM to
each member, then SIGKILL with `cgroup.kill`), knows that a job has ended only once
`cgroup.events` says `populated 0`, and removes the directory then. (Moving a process out takes
write access to the cgroups above: a job running as the daemon's own uid has it, as the daemon
does, so this contains what a job starts, not a job that sets out to escape.)

The root, unless `local.cgroup_root` names one: found from the daemon's own cgroup (the `0::`
line of /proc/self/cgroup) under the cgroup2 mount that shows it (/proc/self/mountinfo):

- in the hierarchy's root (a host without systemd; the root has no `cgroup.events`):
  `<mount>/orchestrator/jobs`, the daemon staying where it is;
- else (a systemd service with `Delegate=yes`: /system.slice/orchestrator.service; a container
  with a cgroup namespace of its own: /): `<own>/jobs`, and the daemon moves itself into the
  leaf `<own>/daemon`, since cgroup v2 lets no process stay in a cgroup whose children get
  controllers ("no internal processes"). A daemon started in a cgroup named `daemon` takes its
  parent as its own, so a restart finds the jobs of the run before.

Without a usable hierarchy (none mounted, cgroup v1 only, not writable: under systemd without
`Delegate=yes`, in a container whose /sys/fs/cgroup is read-only) `probe` says why, and the
local backend falls back to process groups.

Only the daemon uses this module: the runner gets the path of its cgroup and writes its pid to
`cgroup.procs`, nothing more.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from orchestrator import errors

JOBS = "jobs"  # under the root of our own cgroup: one cgroup per attempt below it
DAEMON_LEAF = "daemon"  # where the daemon moves itself, beside `jobs`
HOST_ROOT_DIR = "orchestrator"  # in the hierarchy's root: <mount>/orchestrator/jobs


@dataclass(frozen=True, slots=True)
class Containment:
    """What `probe` found: where job cgroups are made (None: process groups only) and why."""

    root: Path | None
    detail: str
    kill_file: bool = False  # `cgroup.kill` exists (kernel ≥ 5.14); else each member is killed

    @property
    def enabled(self) -> bool:
        return self.root is not None


def probe(*, enabled: bool, root: Path | None, create: bool) -> Containment:
    """Where this process would make job cgroups. With `create`, make the root and (for a
    root derived from our own cgroup, unless that is the hierarchy's root) move this process
    into the leaf beside it: the daemon at start-up. Without, change nothing: `orchestrator
    check`."""
    if not enabled:
        return Containment(None, 'off (local.cgroup = "off"): jobs run in process groups')
    try:
        if root is not None:
            return _usable(root, leaf=None, create=create)
        own = own_cgroup()
        if not (own / "cgroup.events").exists():  # the hierarchy's root: the host's own
            return _usable(own / HOST_ROOT_DIR / JOBS, leaf=None, create=create)
        if own.name == DAEMON_LEAF:  # moved there by an earlier run: the jobs are beside it
            own = own.parent
        return _usable(own / JOBS, leaf=own / DAEMON_LEAF, create=create)
    except errors.CgroupUnusable as exc:
        return Containment(None, str(exc))
    except OSError as exc:
        return Containment(None, f"{exc.filename or 'cgroup'}: {exc.strerror}")


def own_cgroup() -> Path:
    """This process's cgroup v2 directory: its `0::` line of /proc/self/cgroup under the mount
    of a cgroup2 file system that shows it."""
    with open("/proc/self/cgroup") as fh:
        own = next((line[3:].rstrip("\n") for line in fh if line.startswith("0::")), None)
    if own is None:
        raise errors.CgroupUnusable("this process is in no cgroup v2 hierarchy (cgroup v1 only)")
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype != "cgroup2":
                continue
            mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
            if own == mount_root or own.startswith(mount_root.rstrip("/") + "/"):
                return Path(mount_point, own[len(mount_root) :].lstrip("/"))
    raise errors.CgroupUnusable(f"no cgroup2 file system mounted shows this process's cgroup {own}")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _is_cgroup2(directory: Path) -> bool:
    return (directory / "cgroup.procs").is_file() and (directory / "cgroup.controllers").is_file()


def _usable(root: Path, *, leaf: Path | None, create: bool) -> Containment:
    existing = root
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not _is_cgroup2(existing):
        raise errors.CgroupUnusable(f"{existing} is not a cgroup v2 directory")
    if not os.access(existing, os.W_OK):
        raise errors.CgroupUnusable(f"{existing} is not writable by uid {os.geteuid()}")
    # The runner moves itself from the daemon's cgroup to its job's: that takes write access to
    # cgroup.procs of the closest cgroup above both.
    current = own_cgroup() if leaf is None else leaf
    common = Path(os.path.commonpath([current, root]))
    if not _is_cgroup2(common):
        raise errors.CgroupUnusable(
            f"{root} is not in the cgroup2 hierarchy of this process ({current})"
        )
    if not os.access(common / "cgroup.procs", os.W_OK):
        raise errors.CgroupUnusable(
            f"{common / 'cgroup.procs'} is not writable by uid {os.geteuid()}"
        )
    if create:
        root.mkdir(parents=True, exist_ok=True)
        if not _is_cgroup2(root):
            raise errors.CgroupUnusable(f"{root} is not a cgroup v2 directory")
        if leaf is not None:
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
    return Containment(
        root,
        f"each job in a cgroup of its own under {root}",
        kill_file=_has_kill_file(root if root.exists() else existing),
    )


def _has_kill_file(cgroup: Path) -> bool:
    if (cgroup / "cgroup.kill").exists():
        return True
    if (cgroup / "cgroup.events").exists():  # a cgroup that is not a root, without it
        return False
    major, minor = (int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    return (major, minor) >= (5, 14)  # a root has no cgroup.kill: the kernel tells


# -- one job's cgroup ----------------------------------------------------------------------------


def make(cgroup: Path) -> None:
    """The attempt's cgroup (it may exist already: an attempt started again after a crash)."""
    with contextlib.suppress(FileExistsError):
        cgroup.mkdir()


def populated(cgroup: Path) -> bool:
    """Whether a process is left in `cgroup` or below it. One that is gone holds none."""
    try:
        data = (cgroup / "cgroup.events").read_bytes()
    except FileNotFoundError:
        return False
    return parse_populated(data)


def parse_populated(events: bytes) -> bool:
    for line in events.splitlines():
        key, _, value = line.partition(b" ")
        if key == b"populated":
            return value.strip() != b"0"
    raise ValueError(f"cgroup.events without a populated line: {events[:200]!r}")


def members(cgroup: Path) -> list[int]:
    """The pids in `cgroup` and the cgroups below it (a job may make some, if it may)."""
    pids = []
    for directory, _, _ in os.walk(cgroup):
        try:
            pids += [int(pid) for pid in Path(directory, "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue  # removed since the listing
    return pids


def signal_each(cgroup: Path, signum: int) -> int:
    """Send `signum` to every process of the cgroup; how many there were."""
    pids = members(cgroup)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return len(pids)


def kill(cgroup: Path) -> None:
    """SIGKILL every process of the cgroup, those it is forking meanwhile too: `cgroup.kill`,
    or where the kernel has none (< 5.14), freeze the cgroup, kill each member, thaw it."""
    try:
        (cgroup / "cgroup.kill").write_text("1")
        return
    except FileNotFoundError:
        if not cgroup.exists():
            return
    kill_each(cgroup)


def kill_each(cgroup: Path) -> None:
    """`kill` without `cgroup.kill`: frozen (where `cgroup.freeze` exists, kernel ≥ 5.2), no
    member forks between the listing and the signals; a frozen process still dies of SIGKILL.
    The freeze takes a moment to reach every member: one that forked meanwhile is left, and
    is found when this is called again (the local backend does, until the cgroup is empty)."""
    freeze = cgroup / "cgroup.freeze"
    frozen = False
    try:
        freeze.write_text("1")
        frozen = True
    except FileNotFoundError:
        pass
    try:
        signal_each(cgroup, signal.SIGKILL)
    finally:
        if frozen:
            with contextlib.suppress(FileNotFoundError):
                freeze.write_text("0")


def remove(cgroup: Path) -> None:
    """Remove the cgroup and any the job made below it, deepest first. Raises OSError (EBUSY)
    if one still holds a process; one that is gone is fine."""
    for directory, _, _ in os.walk(cgroup, topdown=False):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)
