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

OOM kills. Whether the kernel's OOM killer killed a process of an attempt is read from its
cgroup when the attempt is over, before the directory is removed (`oom_kills`):

- cgroup v2: `memory.events`, field `oom_kill` (counted for the cgroup and those below it). The
  file exists only where the memory controller is enabled for the attempt's cgroup: with
  `create`, `probe` enables it (`+memory` in `cgroup.subtree_control`) in the root and, for a
  root derived from our own cgroup, in the one above it, where those list it as available
  (systemd's `Delegate=yes` does); that failing, OOM kills are not known.
- cgroup v1 (a hybrid or legacy host: the memory controller on a v1 hierarchy, the v2 one
  without it): `probe_memory_v1` finds our own cgroup in the v1 memory hierarchy and makes
  `<it>/orchestrator-jobs`; each attempt gets `<that>/<job id>-<attempt>` too, which the
  runner joins beside its v2 cgroup (best effort: a job is never failed for it), and
  `memory.oom_control`'s `oom_kill` line (kernel ≥ 4.13) is read at the end
  (`oom_kills_v1`). The directory is removed then, any process left in it moved up first
  (`remove_v1`): v1 cgroups only count here, they contain nothing.

A count that cannot be found (no such file, no `oom_kill` line) is None: not known, which the
local backend takes as "not OOM-killed".
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from orchestrator import errors

JOBS = "jobs"  # under the root of our own cgroup: one cgroup per attempt below it
DAEMON_LEAF = "daemon"  # where the daemon moves itself, beside `jobs`
HOST_ROOT_DIR = "orchestrator"  # in the hierarchy's root: <mount>/orchestrator/jobs
JOBS_V1 = "orchestrator-jobs"  # in our own cgroup of the v1 memory hierarchy: attempts below


@dataclass(frozen=True, slots=True)
class Containment:
    """What `probe` found: where job cgroups are made (None: process groups only) and why."""

    root: Path | None
    detail: str
    kill_file: bool = False  # `cgroup.kill` exists (kernel ≥ 5.14); else each member is killed
    memory: str = "no memory controller"  # whether job cgroups get `memory.events`, and why
    cpu: str = "no cpu controller"  # whether job cgroups get `cpu.max` ("cpu.max"), and why

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
            ours = own / HOST_ROOT_DIR
            return _usable(ours / JOBS, leaf=None, create=create, above=ours)
        if own.name == DAEMON_LEAF:  # moved there by an earlier run: the jobs are beside it
            own = own.parent
        return _usable(own / JOBS, leaf=own / DAEMON_LEAF, create=create, above=own)
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


@dataclass(frozen=True, slots=True)
class MemoryV1:
    """What `probe_memory_v1` found: where attempts get a cgroup of the v1 memory hierarchy
    (None: they do not) and why."""

    root: Path | None
    detail: str

    @property
    def enabled(self) -> bool:
        return self.root is not None


def probe_memory_v1(*, enabled: bool, create: bool) -> MemoryV1:
    """Where this process would make attempts' v1 memory cgroups: `<own>/orchestrator-jobs`,
    `<own>` being our cgroup in the v1 memory hierarchy. With `create`, make that directory;
    without, change nothing. Never raises: what is missing is said in `detail`."""
    if not enabled:
        return MemoryV1(None, 'off (local.cgroup = "off")')
    try:
        own = own_memory_v1()
        control = own / "memory.oom_control"
        if parse_oom_kill(control.read_bytes()) is None:
            raise errors.CgroupUnusable(f"{control} counts no oom_kill (kernel < 4.13)")
        root = own / JOBS_V1
        if not os.access(root if root.exists() else own, os.W_OK):
            raise errors.CgroupUnusable(f"{own} is not writable by uid {os.geteuid()}")
        if create:
            root.mkdir(exist_ok=True)
            if not (root / "memory.oom_control").is_file():
                raise errors.CgroupUnusable(f"{root} is not a cgroup of the memory hierarchy")
    except errors.CgroupUnusable as exc:
        return MemoryV1(None, str(exc))
    except OSError as exc:
        return MemoryV1(None, f"{exc.filename or 'cgroup'}: {exc.strerror}")
    return MemoryV1(root, f"each job in a memory cgroup (v1) of its own under {root}")


def oom_detection(containment: Containment, memory: MemoryV1) -> str:
    """How OOM kills of local jobs are known with what `probe` and `probe_memory_v1` found."""
    if memory.enabled:
        return f"memory.oom_control of each job's memory cgroup (v1) under {memory.root}"
    if containment.enabled and containment.memory == "memory.events":
        return "memory.events of each job's cgroup"
    why = containment.memory if containment.enabled else "no job cgroups"
    return f"not known ({why}; cgroup v1 memory: {memory.detail})"


def probe_cpu_v1(*, enabled: bool, create: bool) -> MemoryV1:
    """`probe_memory_v1` for the v1 cpu hierarchy: where an attempt with `resources.cpu` gets a
    cpu cgroup (v1) of its own whose CFS quota is its limit, on a host whose v2 job cgroups have
    no cpu controller (hybrid, legacy)."""
    if not enabled:
        return MemoryV1(None, 'off (local.cgroup = "off")')
    try:
        own = own_memory_v1("cpu")
        root = own / JOBS_V1
        if not (own / "cpu.cfs_quota_us").is_file():
            raise errors.CgroupUnusable(f"{own} has no cpu.cfs_quota_us (no CFS bandwidth control)")
        if not os.access(root if root.exists() else own, os.W_OK):
            raise errors.CgroupUnusable(f"{own} is not writable by uid {os.geteuid()}")
        if create:
            root.mkdir(exist_ok=True)
    except errors.CgroupUnusable as exc:
        return MemoryV1(None, str(exc))
    except OSError as exc:
        return MemoryV1(None, f"{exc.filename or 'cgroup'}: {exc.strerror}")
    return MemoryV1(root, f"each job with a cpu limit in a cpu cgroup (v1) of its own under {root}")


def own_memory_v1(controller: str = "memory") -> Path:
    """This process's cgroup directory in the v1 hierarchy of `controller` (its line of
    /proc/self/cgroup naming it, under the mount of that hierarchy that shows it)."""
    own = None
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if number != "0" and controller in controllers.split(","):
                own = path
    if own is None:
        raise errors.CgroupUnusable(
            f"no cgroup v1 {controller} hierarchy (cgroup v2 only, or none)"
        )
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "cgroup":
                continue
            if controller not in fields[separator + 3].split(","):
                continue
            mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
            if own == mount_root or own.startswith(mount_root.rstrip("/") + "/"):
                return Path(mount_point, own[len(mount_root) :].lstrip("/"))
    raise errors.CgroupUnusable(
        f"no v1 {controller} hierarchy mounted shows this process's cgroup {own}"
    )


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _is_cgroup2(directory: Path) -> bool:
    return (directory / "cgroup.procs").is_file() and (directory / "cgroup.controllers").is_file()


def _usable(
    root: Path, *, leaf: Path | None, create: bool, above: Path | None = None
) -> Containment:
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
    levels = [root] if above is None else [above, root]
    return Containment(
        root,
        f"each job in a cgroup of its own under {root}",
        kill_file=_has_kill_file(root if root.exists() else existing),
        memory=enable_memory(levels, create=create),
        cpu=enable_cpu(levels, create=create),
    )


def enable_cpu(levels: list[Path], *, create: bool) -> str:
    """`enable_memory` for the cpu controller (a job's `resources.cpu` is its `cpu.max`):
    "cpu.max" once enabled, else why not."""
    found = enable_memory(levels, create=create, controller="cpu")
    return "cpu.max" if found == "memory.events" else found


def enable_memory(levels: list[Path], *, create: bool, controller: str = "memory") -> str:
    """Have the memory controller enabled for the cgroups below the last of `levels` (each
    one's child): `+memory` in each one's `cgroup.subtree_control`, top down, where its
    `cgroup.controllers` lists it. What came of it, as said at start-up: "memory.events" once
    enabled (or, without `create`, where it would be), else why not. Never raises."""
    for level in levels:
        try:
            if controller in _words(level / "cgroup.subtree_control"):
                continue
            if controller not in _words(level / "cgroup.controllers"):
                return f"no {controller} controller in {level}{_UNKNOWN[controller]}"
            if not create:
                continue
            (level / "cgroup.subtree_control").write_text(f"+{controller}")
        except FileNotFoundError:
            if create or level is levels[0]:
                return f"{level} does not exist{_UNKNOWN[controller]}"
            break  # not made yet (probed without making anything): the level above decides
        except OSError as exc:
            return (
                f"cannot enable the {controller} controller in {level} ({exc.strerror})"
                f"{_UNKNOWN[controller]}"
            )
    return "memory.events"


_UNKNOWN = {"memory": ": OOM kills are not known", "cpu": ""}  # what follows from it


def _words(path: Path) -> list[str]:
    return path.read_text().split()


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


def oom_kills(cgroup: Path) -> int | None:
    """How many processes of the (v2) cgroup and those below it the kernel OOM-killed
    (`memory.events`); None if not known (no memory controller there, or the cgroup is gone).
    Raises OSError when the file is there but cannot be read now (EMFILE, EIO)."""
    try:
        return parse_oom_kill((cgroup / "memory.events").read_bytes())
    except FileNotFoundError:
        return None


def oom_kills_v1(cgroup: Path) -> int | None:
    """The same for a cgroup of the v1 memory hierarchy (`memory.oom_control`, which counts
    the cgroup's own victims only): summed over it and any the job made below it."""
    found: int | None = None
    for directory, _, _ in os.walk(cgroup):
        try:
            count = parse_oom_kill(Path(directory, "memory.oom_control").read_bytes())
        except FileNotFoundError:
            continue
        if count is not None:
            found = (found or 0) + count
    return found


def parse_oom_kill(data: bytes) -> int | None:
    """The `oom_kill N` line of `memory.events` (v2) or `memory.oom_control` (v1, kernel ≥
    4.13); None without one, or with one that is not a count."""
    for line in data.splitlines():
        key, _, value = line.partition(b" ")
        if key == b"oom_kill":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def remove_v1(cgroup: Path, *, tries: int = 3) -> None:
    """Remove an attempt's v1 memory cgroup and any below it, deepest first, once any process
    left in them (what the job left running, where no v2 cgroup stopped it) is moved to the
    cgroup above the attempt's: a v1 cgroup only counts here. Raises OSError (EBUSY) if one
    still holds a process after `tries` rounds (a process forking meanwhile); one that is gone
    is fine."""
    parent = cgroup.parent / "cgroup.procs"
    for attempt in range(tries):
        try:
            for directory, _, _ in os.walk(cgroup, topdown=False):
                _move_all(Path(directory, "cgroup.procs"), parent)
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(directory)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == tries - 1:
                raise


def _move_all(procs: Path, to: Path) -> None:
    try:
        pids = procs.read_text().split()
    except FileNotFoundError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ESRCH: it has ended since
            to.write_text(pid)


def remove(cgroup: Path) -> None:
    """Remove the cgroup and any the job made below it, deepest first. Raises OSError (EBUSY)
    if one still holds a process; one that is gone is fine."""
    for directory, _, _ in os.walk(cgroup, topdown=False):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)
