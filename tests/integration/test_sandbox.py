"""`_sandbox.hide` with real processes and real namespaces, no mocks.

A script (`python -I -S`, importing the module by path as the job keeper does) forks; its child
calls `hide` as a job's child would and reports what it can then see and do; its parent, the
same uid and not hidden, stays alive as a process the job might try to look through. The script
runs as root (a mount namespace alone: hidden, but a root job can undo it) and as uid 65534
(`setpriv`; as the test's own uid when not root): a user namespace whose mounts are locked, so
the job cannot undo them although it holds every capability in its namespace until it execs.
Either way the host's mount table is unchanged: the root case hides on a *shared* tmpfs, where
any mount made without first making propagation slave would reach the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backends import _sandbox
from tests.support import tmpfs

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
MODULE_DIR = str(Path(_sandbox.__file__).parent)
SECRET = "the daemon's state"

# argv: MODULE_DIR BASE. Prints what the hidden child saw and did, as JSON.
JOB = r"""
import ctypes, errno, json, os, sys
sys.path.insert(0, sys.argv[1])
import _sandbox

base = sys.argv[2]
state, work = f"{base}/state", f"{base}/work"
keep = f"{work}/job-1/1"
libc = ctypes.CDLL(None, use_errno=True)


def attempt(fn):
    try:
        return fn()
    except OSError as e:
        return errno.errorcode[e.errno]


def syscall(result):
    return "ok" if result == 0 else errno.errorcode[ctypes.get_errno()]


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text):
    with open(path, "x") as f:
        f.write(text)
    return "ok"


parent = os.getpid()
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    _sandbox.hide([state, work, f"{work}/job-1", f"{base}/missing"], keep)
    seen = {
        "ids": [os.getuid(), os.getgid()],
        "read": {
            p: attempt(lambda: read(f"{base}/{p}"))
            for p in ("state/db", "work/job-1/0/log", "work/job-2/1/out", "outside/file")
        },
        "write_keep": attempt(lambda: write(f"{keep}/out", "from the job")),
        "list": {
            p: attempt(lambda: sorted(os.listdir(f"{base}/{p}")))
            for p in (".", "state", "work", "work/job-1", "work/job-1/1")
        },
        "create": {
            p: attempt(lambda: write(f"{base}/{p}", "x"))
            for p in ("state/new", "work/new", "work/job-1/new")
        },
        "mkdir": attempt(lambda: os.mkdir(f"{work}/new-dir")),
        "via_parent": attempt(lambda: read(f"/proc/{parent}/root{state}/db")),
        "remount_rw": syscall(libc.mount(None, state.encode(), None, ctypes.c_ulong(32), None)),
        "umount": {
            p: syscall(libc.umount2(f"{base}/{p}".encode(), 0)) for p in ("state", "work/job-1/1")
        },
    }
    seen["read_after_umount"] = attempt(lambda: read(f"{state}/db"))
    os.write(w, json.dumps(seen).encode())
    os._exit(0)
os.close(w)
with os.fdopen(r) as f:
    out = f.read()
_, status = os.wait()
print(out)
sys.exit(os.waitstatus_to_exitcode(status))
"""

# argv: MODULE_DIR HIDDEN KEEP. Prints probe's answer as JSON.
PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import _sandbox
print(json.dumps(_sandbox.probe([sys.argv[2]], sys.argv[3])))
"""


def make_tree(base: Path, owner: int | None = None) -> None:
    """The daemon's state and work directories under `base`: attempt 1 of job-1 is the job's."""
    files = {
        "state/db": SECRET,
        "work/job-1/0/log": "job-1's earlier attempt",
        "work/job-2/1/out": "another job's output",
        "outside/file": "visible",
    }
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    (base / "work/job-1/1").mkdir()
    if owner is not None:
        for path in [base, *base.rglob("*")]:
            os.chown(path, owner, owner)


def mount_points_under(base: Path) -> list[str]:
    """Mount points at or under `base` in this (the host's) mount namespace."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p == str(base) or p.startswith(f"{base}/")]


def unprivileged() -> list[str]:
    """argv prefix running a command as an ordinary uid: 65534 when root, else the test's own."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run as another uid")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def require_user_namespaces(prefix: list[str] | None) -> None:
    """Skip unless what `prefix` runs may make a user namespace (None: root, needs none)."""
    if prefix is None:
        return
    check = "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare(0x10000000) != 0)"
    argv = [*prefix, sys.executable, "-I", "-S", "-c", check]
    if subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode != 0:
        pytest.skip("unprivileged user namespaces are not available here")


def run_json(argv: list[str]) -> Any:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_hidden(seen: dict[str, Any], base: Path, uid: int) -> None:
    """What any job sees after `hide`, and that its output landed in the real keep."""
    assert seen["read"] == {
        "state/db": "ENOENT",
        "work/job-1/0/log": "ENOENT",
        "work/job-2/1/out": "ENOENT",
        "outside/file": "visible",
    }
    assert seen["list"] == {
        ".": ["outside", "state", "work"],
        "state": [],
        "work": ["job-1"],  # only keep's parents, made in the tmpfs
        "work/job-1": ["1"],
        "work/job-1/1": ["out"],
    }
    assert seen["create"] == dict.fromkeys(("state/new", "work/new", "work/job-1/new"), "EROFS")
    assert seen["mkdir"] == "EROFS"
    assert seen["write_keep"] == "ok"
    out = base / "work/job-1/1/out"
    assert out.read_text() == "from the job"
    assert out.stat().st_uid == uid
    # The host's own view: nothing hidden, nothing written.
    assert (base / "state/db").read_text() == SECRET
    assert sorted(p.name for p in (base / "work").iterdir()) == ["job-1", "job-2"]
    assert not (base / "state/new").exists()


@pytest.fixture
def shared_tmpfs(short_tmp: Path) -> Iterator[Path]:
    """A tmpfs of the test's own, with shared propagation (as systemd mounts /)."""
    with tmpfs.mounted(short_tmp / "fs", "4m") as base:
        subprocess.run(["mount", "--make-shared", str(base)], check=True, timeout=30)
        yield base


def test_root_hides_but_a_root_job_can_undo_it(shared_tmpfs: Path) -> None:
    base = shared_tmpfs
    make_tree(base)
    (line,) = [
        ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f" {base} " in ln
    ]
    assert " shared:" in line  # without making propagation slave first, mounts would leak here
    before = mount_points_under(base)

    seen = run_json([sys.executable, "-I", "-S", "-c", JOB, MODULE_DIR, str(base)])

    assert mount_points_under(base) == before == [str(base)]  # nothing leaked to the host
    assert seen["ids"] == [0, 0]
    assert_hidden(seen, base, uid=0)
    # Documented, not hidden from: root is root.
    assert seen["via_parent"] == SECRET
    assert seen["umount"] == {"state": "ok", "work/job-1/1": "ok"}
    assert seen["read_after_umount"] == SECRET


def test_unprivileged_hides_and_the_job_cannot_undo_it(short_tmp: Path) -> None:
    prefix = unprivileged()
    require_user_namespaces(prefix)
    uid, gid = (NOBODY, NOBODY) if prefix else (os.getuid(), os.getgid())
    make_tree(short_tmp, owner=NOBODY if prefix else None)

    seen = run_json([*prefix, sys.executable, "-I", "-S", "-c", JOB, MODULE_DIR, str(short_tmp)])

    assert mount_points_under(short_tmp) == []
    assert seen["ids"] == [uid, gid]  # the same ids inside as outside
    assert_hidden(seen, short_tmp, uid=uid)
    # Locked: made in a more privileged mount namespace than the job's, whose capabilities (all,
    # in its own user namespace, until exec) do not reach them.
    assert seen["umount"] == {"state": "EINVAL", "work/job-1/1": "EINVAL"}
    assert seen["remount_rw"] == "EPERM"
    assert seen["read_after_umount"] == "ENOENT"
    # Its unhidden parent, same uid, is in another user namespace: no way in through its /proc.
    assert seen["via_parent"] == "EACCES"


def test_probe_says_it_works_here(short_tmp: Path) -> None:
    """In this (the test's) process: forks, hides in the child, reports."""
    require_user_namespaces([] if os.geteuid() != 0 else None)
    make_tree(short_tmp)
    keep = short_tmp / "work/job-1/1"
    assert _sandbox.probe([str(short_tmp / "state"), str(short_tmp / "work")], str(keep)) is None
    assert mount_points_under(short_tmp) == []
    assert (short_tmp / "state/db").read_text() == SECRET


def test_probe_names_the_step_that_failed(short_tmp: Path) -> None:
    require_user_namespaces([] if os.geteuid() != 0 else None)
    make_tree(short_tmp)
    missing = short_tmp / "work/job-1/2"  # an attempt directory that was never made
    error = _sandbox.probe([str(short_tmp / "work")], str(missing))
    assert error == f"[Errno 2] open keep {missing}: No such file or directory"


def test_probe_fails_for_a_chrooted_ordinary_user(short_tmp: Path) -> None:
    """The kernel refuses a user namespace to a chrooted process (it could escape the chroot
    with one), and without CAP_SYS_ADMIN a mount namespace needs one: `hide` cannot work, and
    `probe` says which step failed. (The chroot is a recursive bind of / in a mount namespace of
    the test's own, so every path is the same inside.)"""
    if os.geteuid() != 0 or not all(map(shutil.which, ("unshare", "chroot"))):
        pytest.skip("needs root, unshare and chroot")
    prefix = unprivileged()
    require_user_namespaces(prefix)
    make_tree(short_tmp, owner=NOBODY)
    root = short_tmp / "root"
    root.mkdir()
    work, keep = short_tmp / "work", short_tmp / "work/job-1/1"
    probe = [sys.executable, "-I", "-S", "-c", PROBE, MODULE_DIR, str(work), str(keep)]
    chrooted = 'mount --rbind / "$0" && exec chroot "$0" "$@"'
    argv = ["unshare", "--mount", "--propagation=private", "sh", "-c", chrooted, str(root)]

    error = run_json([*argv, *prefix, *probe])

    assert error == "[Errno 1] unshare(CLONE_NEWUSER|CLONE_NEWNS): Operation not permitted"
    assert run_json([*prefix, *probe]) is None  # the same, not chrooted
