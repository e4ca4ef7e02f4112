"""What has the local backend look at a job at once instead of at its next poll, besides the
keeper's own word: the exit of an orphaned job's process (pidfd), and a change of a job's
cgroup (`cgroup.events`, flagged by the kernel with EPOLLPRI). Each calls `wake(job_id)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable
from pathlib import Path


class Watches:
    def __init__(self, wake: Callable[[str], None]) -> None:
        self._wake = wake
        self._pidfds: dict[str, int] = {}  # external id → a pidfd of the job's process
        self._epoll: select.epoll | None = None
        self._cgroup_fds: dict[str, int] = {}  # external id → its cgroup.events
        self._cgroup_jobs: dict[int, str] = {}  # that descriptor → job id

    def close(self) -> None:
        for external_id in list(self._pidfds):
            self.forget(external_id)
        for external_id in list(self._cgroup_fds):
            self.forget(external_id)
        if self._epoll is not None:
            asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def exit_of(self, external_id: str, job_id: str, pid: int) -> None:
        """Have the job polled as soon as process `pid` exits: for jobs whose keeper has gone
        (else the keeper tells). One descriptor each."""
        if external_id in self._pidfds:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone already, or no pidfd: polling still finds the end
        self._pidfds[external_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, external_id, job_id)

    def _exited(self, external_id: str, job_id: str) -> None:
        self._forget_exit(external_id)
        self._wake(job_id)

    def cgroup_of(self, external_id: str, job_id: str, cgroup: Path) -> None:
        """Have the job polled as soon as its cgroup's `populated` changes: for jobs whose own
        process has ended (or whose keeper has gone) while others remain. One descriptor each."""
        if external_id in self._cgroup_fds:
            return
        try:
            if self._epoll is None:
                self._epoll = select.epoll()
                asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._cgroups_changed)
            fd = os.open(cgroup / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # gone already, or out of descriptors: polling still finds the end
        try:
            os.pread(fd, 4096, 0)  # read once, so that only a later change is reported
            self._epoll.register(fd, select.EPOLLPRI | select.EPOLLET)
        except OSError:
            os.close(fd)
            return
        self._cgroup_fds[external_id] = fd
        self._cgroup_jobs[fd] = job_id

    def _cgroups_changed(self) -> None:
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            if (job_id := self._cgroup_jobs.get(fd)) is not None:
                self._wake(job_id)

    def forget(self, external_id: str) -> None:
        """Drop every watch of the job."""
        self._forget_exit(external_id)
        fd = self._cgroup_fds.pop(external_id, None)
        if fd is not None:
            self._cgroup_jobs.pop(fd, None)
            if self._epoll is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
            os.close(fd)

    def _forget_exit(self, external_id: str) -> None:
        fd = self._pidfds.pop(external_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
