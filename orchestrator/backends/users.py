"""As whom a local job runs with `local.run_as = "submitter"`: the user who submitted it.

The submitter's uid and primary gid are the peer credentials stored with the job
(`SO_PEERCRED` at submit). Its supplementary groups, home, name and shell come from the user
database when the job is launched (`getpwuid`, `getgrouplist`), as `at`, `cron` and Slurm do: a
job started tomorrow has the groups its user has tomorrow. A uid with no passwd entry runs with
its gid alone (no supplementary groups), and neither HOME, USER, LOGNAME nor SHELL is set for
it; a job without a `cwd` starts in its user's home directory, or in `/` without one.

The daemon computes the identity and hands it to the keeper (`UID:GID:G1,G2`); the keeper's
forked child takes it on (`_runner.become`), after it has joined the job's cgroup and before it
enters the job's working directory and execs. For that the keeper needs CAP_SETUID and
CAP_SETGID (root has them; a service user gets them as ambient capabilities, which survive the
daemon's exec of the keeper), and the daemon and keeper need CAP_KILL to stop the processes of
jobs that are not their own uid's. `check` tells, at start-up, whether this daemon has what it
takes, by having a process started as the keeper is (`_runner.py --check-user`) do the switch to
a uid that is not its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path

CAP_KILL = 5  # bit numbers in /proc/PID/status, from <linux/capability.h>
# Set in the job's environment from the passwd entry, in place of the daemon's own.
PASSWD_VARIABLES = ("HOME", "USER", "LOGNAME", "SHELL")
CHECK_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Identity:
    """The user a job runs as; `name`, `home` and `shell` are None without a passwd entry."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    name: str | None = None
    home: str | None = None
    shell: str | None = None

    def runner_arg(self) -> str:
        """What the runner's `--user` takes: `UID:GID:G1,G2`."""
        return f"{self.uid}:{self.gid}:{','.join(map(str, self.groups))}"

    def environment(self) -> dict[str, str]:
        """HOME, USER, LOGNAME and SHELL of the passwd entry (those it has)."""
        if self.name is None:
            return {}
        env = {"USER": self.name, "LOGNAME": self.name}
        if self.home:
            env["HOME"] = self.home
        if self.shell:
            env["SHELL"] = self.shell
        return env

    @property
    def default_cwd(self) -> str:
        """Where a job that names no `cwd` starts."""
        return self.home or "/"


def lookup(uid: int, gid: int) -> Identity:
    """The identity of a job submitted by `uid` with primary gid `gid` (blocking: the user
    database may be remote, LDAP or sssd; call it in a thread)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Identity(uid, gid)
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    return Identity(uid, gid, groups, entry.pw_name, entry.pw_dir, entry.pw_shell)


def _effective_capabilities() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


async def check(runner: Path) -> str | None:
    """Why this daemon cannot run jobs as their submitters; None if it can. A runner started as
    the local backend starts them switches to a uid not the daemon's (as a job's child would:
    groups, gid, uid, no capabilities left), so what stands in the way is found, whatever it is
    (no capabilities, a seccomp filter refusing setuid, a bounding set); and the daemon itself
    must hold CAP_KILL."""
    nobody = 65534 if os.getuid() != 65534 else 65533  # any uid but ours: a real switch
    probe = Identity(nobody, nobody)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        str(runner),
        "--check-user",
        probe.runner_arg(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            _, stderr = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return f"the check of the switch did not answer within {CHECK_TIMEOUT_S:g} s"
    if proc.returncode != 0:
        said = stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        return f"a job's process {said}"
    if not _effective_capabilities() & (1 << CAP_KILL):
        return "the daemon lacks CAP_KILL (to stop jobs of other users)"
    return None
