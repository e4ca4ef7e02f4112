"""The socket's directory: whoever can write it can put their own socket in place of ours.

A daemon that binds in a directory another user made (`/tmp/orchestrator-0`, pre-created mode
0777) can have its socket renamed away and replaced, and the next client hands its `submit`,
secrets and all, to that user. So the daemon (before it binds) and a client using the per-user
default path (before it connects) require, of the directory and without following a symlink:

- a real directory, not a symlink to one;
- owned by the process's effective uid or by root;
- writable by no one else: neither group nor others may write it;

and of every directory above it (symlinks resolved): owned by root or that uid, and not
writable by group or others unless sticky (as `/tmp` is: there others cannot rename or remove
what is ours). A missing directory is created 0700 by `ensure` (the daemon) and checked after
the `mkdir` like any other, so a directory someone slips in first is refused too.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from orchestrator import errors

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def ensure(directory: Path) -> None:
    """Create `directory` mode 0700 if it is missing, then `check` it: the daemon's side,
    before it binds its socket there. Missing parents are made as `mkdir -p` would, but never
    writable by group or others, whatever the umask."""
    for above in reversed([p for p in directory.parents if not os.path.lexists(p)]):
        with contextlib.suppress(FileExistsError):  # made meanwhile: checked below all the same
            os.mkdir(above)
            if (mode := stat.S_IMODE(os.lstat(above).st_mode)) & _WRITABLE_BY_OTHERS:
                os.chmod(above, mode & ~_WRITABLE_BY_OTHERS)
    with contextlib.suppress(FileExistsError):  # whoever made it, it is checked below
        os.mkdir(directory, 0o700)
    check(directory)


def check(directory: Path) -> None:
    """Raise `UnsafeSocketDirectory` unless `directory` may hold our socket (see the module);
    `FileNotFoundError` if it does not exist."""
    uid = os.geteuid()
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        why = f"it is a symlink (to {os.readlink(directory)}), not a directory"
        raise errors.UnsafeSocketDirectory(str(directory), why, uid)
    if not stat.S_ISDIR(st.st_mode):
        raise errors.UnsafeSocketDirectory(str(directory), "it is not a directory", uid)
    if st.st_uid not in (uid, 0):
        why = f"it belongs to someone else ({_owner_mode(st)})"
        raise errors.UnsafeSocketDirectory(str(directory), why, uid)
    if st.st_mode & _WRITABLE_BY_OTHERS:
        why = f"group or others can write it ({_owner_mode(st)})"
        raise errors.UnsafeSocketDirectory(str(directory), why, uid)
    resolved = Path(os.path.realpath(directory.parent))
    for above in (resolved, *resolved.parents):
        st = os.lstat(above)
        if st.st_uid not in (uid, 0):
            why = f"{above}, above it, belongs to someone else ({_owner_mode(st)})"
            raise errors.UnsafeSocketDirectory(str(directory), why, uid)
        if st.st_mode & _WRITABLE_BY_OTHERS and not st.st_mode & stat.S_ISVTX:
            why = (
                f"group or others can write {above}, above it, and it is not sticky "
                f"({_owner_mode(st)}): they can rename the directory away"
            )
            raise errors.UnsafeSocketDirectory(str(directory), why, uid)


def _owner_mode(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
