"""`orchestrator.access.Policy`: who is an admin, which jobs a peer may see, whose local jobs
the daemon runs."""

from __future__ import annotations

import pytest

from orchestrator import access, errors, models

SERVICE_UID = 998  # a daemon running as a service user


def _peer(uid: int, gid: int | None = None, groups: frozenset[int] = frozenset()) -> models.Peer:
    return models.Peer(uid=uid, gid=uid if gid is None else gid, pid=1, groups=groups)


def _job(peer: models.Peer | None) -> models.Job:
    return models.Job(
        id="01m7zsrfzp6t93sdfcf6qxak7s",
        spec=models.JobSpec(command=["true"]),
        backend="local",
        state=models.JobState.QUEUED,
        created_at=1.0,
        updated_at=1.0,
        state_times={},
        peer=peer,
    )


@pytest.mark.parametrize(
    ("uid", "admin"), [(SERVICE_UID, True), (0, True), (1000, False), (65534, False)]
)
def test_by_default_the_daemons_own_uid_and_root_are_admins(uid: int, admin: bool) -> None:
    policy = access.Policy(daemon_uid=SERVICE_UID)
    assert policy.is_admin(_peer(uid)) is admin
    assert policy.owner(_peer(uid)) == (None if admin else uid)


@pytest.mark.parametrize(
    ("peer", "admin"),
    [
        (_peer(1000), True),  # listed uid
        (_peer(1001, gid=50), True),  # primary group
        (_peer(1002, groups=frozenset({7, 50})), True),  # supplementary group
        (_peer(1003, groups=frozenset({7})), False),
        (_peer(SERVICE_UID), False),  # lists set: they alone count
        (_peer(0), False),
    ],
)
def test_configured_admin_lists_admit_by_uid_or_any_group(peer: models.Peer, admin: bool) -> None:
    policy = access.Policy(
        admin_uids=frozenset({1000}), admin_gids=frozenset({50}), daemon_uid=SERVICE_UID
    )
    assert policy.is_admin(peer) is admin


def test_a_peer_sees_its_own_jobs_and_no_one_elses() -> None:
    policy = access.Policy(daemon_uid=SERVICE_UID)
    alice, bob = _peer(1000), _peer(1001)
    policy.check_visible(alice, _job(alice))
    policy.check_visible(alice, _job(_peer(1000, gid=7)))  # same uid, another group: hers
    for job in (_job(bob), _job(None)):
        with pytest.raises(errors.JobNotFound) as info:
            policy.check_visible(alice, job)
        # word for word what an unknown id gets
        assert info.value.message == errors.JobNotFound(job.id).message


def test_an_admin_sees_every_job_even_one_with_no_recorded_submitter() -> None:
    policy = access.Policy(daemon_uid=SERVICE_UID)
    for job in (_job(_peer(1000)), _job(None)):
        policy.check_visible(_peer(0), job)
        policy.check_visible(_peer(SERVICE_UID), job)


def test_local_jobs_of_another_uid_are_refused_when_they_would_run_as_the_daemon() -> None:
    policy = access.Policy(daemon_uid=SERVICE_UID)
    policy.check_local(_peer(SERVICE_UID))
    for uid in (1000, 0):  # root too: it is another uid than the daemon's
        with pytest.raises(errors.Forbidden) as info:
            policy.check_local(_peer(uid))
        assert info.value.message == (
            f"local jobs of uid {uid} would run as uid {SERVICE_UID} (the daemon's); "
            'set local.run_as = "submitter" to run them as their submitter'
        )


def test_root_is_the_daemons_own_uid_when_the_daemon_runs_as_root() -> None:
    access.Policy(daemon_uid=0).check_local(_peer(0))


def test_with_run_as_submitter_every_peers_local_jobs_are_accepted() -> None:
    policy = access.Policy(run_as="submitter", daemon_uid=SERVICE_UID)
    for uid in (SERVICE_UID, 1000, 0):
        policy.check_local(_peer(uid))
