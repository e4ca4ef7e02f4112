"""What the local backend reads about cgroups, without touching any: `cgroup.events`, mountinfo
escapes, the external id that names an attempt's cgroup, and a root that is not a cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import models
from orchestrator.backends import cgroups
from orchestrator.backends.local import LocalBackend
from orchestrator.backends.local_files import parse_external_id as _parse_external_id


@pytest.mark.parametrize(
    ("events", "populated"),
    [
        (b"populated 1\nfrozen 0\n", True),
        (b"populated 0\nfrozen 1\n", False),
        (b"frozen 0\npopulated 0\n", False),
    ],
)
def test_populated_is_read_from_cgroup_events(events: bytes, populated: bool) -> None:
    assert cgroups.parse_populated(events) is populated


def test_cgroup_events_without_a_populated_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="populated"):
        cgroups.parse_populated(b"frozen 0\n")


def test_mountinfo_escapes_are_undone() -> None:
    assert cgroups._unescape(r"/sys/fs/cgroup/a\040b\011c\134d") == "/sys/fs/cgroup/a b\tc\\d"


def test_off_means_process_groups() -> None:
    found = cgroups.probe(enabled=False, root=None, create=True)
    assert (found.enabled, found.root) == (False, None)
    assert found.detail.startswith("off")


def test_a_root_that_is_not_a_cgroup_is_refused_saying_why(tmp_path: Path) -> None:
    found = cgroups.probe(enabled=True, root=tmp_path / "jobs", create=True)
    assert not found.enabled
    assert found.detail == f"{tmp_path} is not a cgroup v2 directory"
    assert not (tmp_path / "jobs").exists()  # nothing made where it would not be a cgroup


def test_the_external_id_names_the_runner_and_the_cgroup() -> None:
    old = _parse_external_id("123:456")
    assert (old.pid, old.start, old.cgroup) == (123, 456, None)
    new = _parse_external_id("123:456:/sys/fs/cgroup/a:b/jobs/01abc-2")
    assert (new.pid, new.start, new.cgroup) == (123, 456, Path("/sys/fs/cgroup/a:b/jobs/01abc-2"))


def job(external_id: str, attempt: int = 2) -> models.Job:
    return models.Job(
        id="01abc",
        spec=models.JobSpec.model_validate({"command": ["true"]}),
        backend="local",
        state=models.JobState.RUNNING,
        created_at=0.0,
        updated_at=0.0,
        state_times={},
        attempt=attempt,
        external_id=external_id,
    )


def test_only_a_cgroup_named_for_the_job_and_its_attempt_is_acted_on() -> None:
    ours = job("1:2:/sys/fs/cgroup/jobs/01abc-2")
    assert ours.external_id is not None
    assert LocalBackend._cgroup_of(ours, _parse_external_id(ours.external_id)) == Path(
        "/sys/fs/cgroup/jobs/01abc-2"
    )
    for external_id in ("1:2:/sys/fs/cgroup/jobs/01abc-1", "1:2:/sys/fs/cgroup", "1:2"):
        other = job(external_id)
        assert LocalBackend._cgroup_of(other, _parse_external_id(external_id)) is None
