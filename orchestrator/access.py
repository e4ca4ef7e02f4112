"""Who may do what: which peers are admins, which jobs a peer may see and control, and
whose local jobs this daemon accepts.

A peer sees and controls the jobs it submitted (by uid); an admin (`server.admin_uids` /
`server.admin_gids`) sees and controls every job, including the jobs that have no recorded
submitter. To anyone else a job does not exist: asking for it answers `not_found`, exactly as
for an id that was never used, so a job's existence is not revealed either. Pure: the daemon's
uid is given, nothing here does I/O.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

from orchestrator import errors, models

RunAs = Literal["daemon", "submitter"]


def admits(
    peer: models.Peer, uids: Collection[int], gids: Collection[int], daemon_uid: int
) -> bool:
    """With neither list set: the daemon's own uid and root. Otherwise either list admits,
    the gid list by the peer's primary or any supplementary group."""
    if not uids and not gids:
        return peer.uid in (daemon_uid, 0)
    return peer.uid in uids or not {peer.gid, *peer.groups}.isdisjoint(gids)


@dataclass(frozen=True, slots=True)
class Policy:
    admin_uids: frozenset[int] = frozenset()
    admin_gids: frozenset[int] = frozenset()
    run_as: RunAs = "daemon"
    daemon_uid: int = field(default_factory=os.getuid)

    def is_admin(self, peer: models.Peer) -> bool:
        return admits(peer, self.admin_uids, self.admin_gids, self.daemon_uid)

    def owner(self, peer: models.Peer) -> int | None:
        """The submitter whose jobs alone `peer` may see, or None for an admin (every job)."""
        return None if self.is_admin(peer) else peer.uid

    def check_visible(self, peer: models.Peer, job: models.Job) -> None:
        """Raise `JobNotFound` for a job that `peer` may not see (its existence is not ours
        to tell)."""
        owner = self.owner(peer)
        if owner is not None and (job.peer is None or job.peer.uid != owner):
            raise errors.JobNotFound(job.id)

    def check_local(self, peer: models.Peer) -> None:
        """Refuse a local job that would run with the daemon's powers on behalf of another
        uid (root included, unless the daemon is root)."""
        if self.run_as == "daemon" and peer.uid != self.daemon_uid:
            raise errors.Forbidden(
                f"local jobs of uid {peer.uid} would run as uid {self.daemon_uid} (the "
                'daemon\'s); set local.run_as = "submitter" to run them as their submitter'
            )
