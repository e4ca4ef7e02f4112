"""The local backend's part of `orchestrator check`: a writable work directory, whether jobs get
cgroups of their own (where they cannot, the daemon falls back to process groups: said, not
failed) and how their OOM kills would be known (said in the same line), and with
`local.run_as = "submitter"` whether this process can switch users as the daemon must.

`LocalBackend.check()` returns `check`, with its line on `local.hide_state`. Apart from
`local.py` to keep it short; `writable` also serves the store's check.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from orchestrator import errors
from orchestrator.backends import _runner, base, cgroups, users
from orchestrator.settings import LocalSettings


async def check(settings: LocalSettings, work_dir: Path) -> list[base.Check]:
    checks = [
        await base.checked("local", lambda: writable(work_dir)),
        await base.checked("local.cgroup", lambda: _cgroup(settings)),
    ]
    if settings.run_as == "submitter":
        checks.append(await base.checked("local.run_as", _run_as_submitter))
    return checks


async def writable(directory: Path) -> str:
    """A `base.Probe` body: `directory` exists (made if need be) and a file can be made in it."""

    def probe() -> str:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".check-"):
            pass
        return f"{directory} is writable"

    try:
        return await asyncio.to_thread(probe)
    except OSError as exc:
        raise errors.CheckFailed(f"{directory}: {exc.strerror}") from exc


async def _cgroup(settings: LocalSettings) -> str:
    """What the daemon would find, as seen from this process's cgroup (so run it where the
    daemon runs): nothing is made or moved."""
    enabled = settings.cgroup == "auto"
    found = cgroups.probe(enabled=enabled, root=settings.cgroup_root, create=False)
    if settings.cgroup == "off":
        return found.detail
    oom = cgroups.oom_detection(found, cgroups.probe_memory_v1(enabled=enabled, create=False))
    if found.enabled:
        kill = "cgroup.kill" if found.kill_file else "no cgroup.kill: each member is killed"
        return f"{found.detail} ({kill}); OOM kills: {oom}"
    return (
        f"unavailable, jobs fall back to process groups (what a job starts outside its group "
        f"survives cancel and timeouts): {found.detail}; OOM kills: {oom}"
    )


async def _run_as_submitter() -> str:
    """Whether this process could run jobs as their submitters, as the daemon checks at start-up
    (so run it as the daemon runs: its user, its capabilities)."""
    why = await users.check(Path(_runner.__file__))
    if why is not None:
        raise errors.CheckFailed(errors.CannotRunAsSubmitter(why).message)
    return "submitter: this process can run jobs as other users (CAP_SETUID, CAP_SETGID, CAP_KILL)"
