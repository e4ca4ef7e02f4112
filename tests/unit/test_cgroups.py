"""What the local backend reads about cgroups, without touching any: `cgroup.events`, mountinfo
escapes, the external id that names an attempt's cgroup, a root that is not a cgroup, and the
OOM-kill counts (`memory.events`, `memory.oom_control`) as files in a scratch directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, models
from orchestrator.backends import cgroups, local_files
from orchestrator.backends.local import LocalBackend
from orchestrator.backends.local_files import parse_external_id as _parse_external_id
from orchestrator.testing import make_settings


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


def job(external_id: str, attempt: int = 2, info: dict[str, Any] | None = None) -> models.Job:
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
        info=info or {},
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


# -- OOM kills ------------------------------------------------------------------------------------

MEMORY_EVENTS = b"low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n"
OOM_CONTROL = b"oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"


@pytest.mark.parametrize(
    ("data", "count"),
    [
        (MEMORY_EVENTS, 2),
        (b"low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n", 0),
        (OOM_CONTROL, 1),
        (b"oom_kill_disable 0\nunder_oom 0\n", None),  # kernel < 4.13: not counted
        (b"oom_group_kill 4\n", None),  # not the count of processes killed
        (b"oom_kill many\n", None),
        (b"", None),
    ],
)
def test_the_oom_kill_count_is_read_from_memory_events_and_oom_control(
    data: bytes, count: int | None
) -> None:
    assert cgroups.parse_oom_kill(data) == count


def test_no_memory_events_means_not_known(tmp_path: Path) -> None:
    assert cgroups.oom_kills(tmp_path) is None  # no memory controller for the cgroup
    assert cgroups.oom_kills(tmp_path / "gone") is None
    (tmp_path / "memory.events").write_bytes(MEMORY_EVENTS)
    assert cgroups.oom_kills(tmp_path) == 2


def test_v1_counts_are_summed_over_the_cgroups_below(tmp_path: Path) -> None:
    assert cgroups.oom_kills_v1(tmp_path / "gone") is None
    assert cgroups.oom_kills_v1(tmp_path) is None
    (tmp_path / "memory.oom_control").write_bytes(OOM_CONTROL)
    (tmp_path / "made-by-the-job").mkdir()
    (tmp_path / "made-by-the-job" / "memory.oom_control").write_bytes(OOM_CONTROL)
    assert cgroups.oom_kills_v1(tmp_path) == 2


def test_oom_killed_is_true_only_for_a_count_above_zero(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    assert local_files.oom_killed(None, None) is False
    assert local_files.oom_killed(v2, v1) is False  # neither known
    (v2 / "memory.events").write_bytes(b"oom_kill 0\n")
    (v1 / "memory.oom_control").write_bytes(b"oom_kill 0\n")
    assert local_files.oom_killed(v2, v1) is False
    (v1 / "memory.oom_control").write_bytes(OOM_CONTROL)
    assert local_files.oom_killed(v2, v1) is True
    assert local_files.oom_killed(v2, None) is False
    (v2 / "memory.events").write_bytes(MEMORY_EVENTS)
    assert local_files.oom_killed(v2, None) is True


def test_a_count_that_cannot_be_read_now_is_read_again_later(tmp_path: Path) -> None:
    (tmp_path / "memory.events").mkdir()  # there, but not readable as a file: EISDIR
    with pytest.raises(errors.ReadUnsure) as caught:
        local_files.oom_killed(tmp_path, None)
    assert caught.value.what == "memory.events"


@pytest.mark.parametrize(
    ("result", "oom", "state", "failure", "reason"),
    [
        ({"exit_code": 137, "signal": 9}, True, "FAILED", "infrastructure", "killed by SIGKILL"),
        ({"exit_code": 137, "signal": 9}, False, "FAILED", "user", "killed by SIGKILL"),
        ({"exit_code": 137, "signal": None}, True, "FAILED", "infrastructure", "exit code 137"),
        ({"exit_code": 3, "signal": None}, False, "FAILED", "user", "exit code 3"),
        ({"exit_code": 0, "signal": None}, True, "SUCCEEDED", None, None),
    ],
)
def test_the_outcome_says_whether_the_kernel_oom_killed_a_process_of_the_job(
    result: dict[str, Any], oom: bool, state: str, failure: str | None, reason: str | None
) -> None:
    observed = local_files.outcome("1:2", {**result, "error": None}, oom_killed=oom)
    assert observed.state is not None
    assert (observed.state.value, observed.failure) == (state, failure)
    if failure == "infrastructure":
        assert observed.reason == f"{reason}; the kernel OOM-killed a process of the job"
    else:
        assert observed.reason == reason
    assert observed.exit_code == result["exit_code"]


def test_an_outcome_with_an_unknown_signal_still_reads() -> None:
    observed = local_files.outcome("1:2", {"exit_code": 128 + 40, "signal": 40})
    assert (observed.failure, observed.reason) == ("user", "killed by signal 40")


def test_the_v1_memory_cgroup_is_the_one_recorded_for_this_attempt(tmp_path: Path) -> None:
    backend = LocalBackend(make_settings(tmp_path).local, tmp_path)
    recorded = f"/sys/fs/cgroup/memory/svc/{cgroups.JOBS_V1}/01abc-2"
    ours = job("1:2", info={"memory_cgroup": recorded})
    assert backend._memory_cgroup_of(ours) == Path(recorded)
    for other in (
        f"/sys/fs/cgroup/memory/svc/{cgroups.JOBS_V1}/01abc-1",  # an attempt before
        "/sys/fs/cgroup/memory/svc/01abc-2",  # not where attempts' memory cgroups are made
        f"{cgroups.JOBS_V1}/01abc-2",  # not absolute
        12,
    ):
        # Not believed; and this backend (not started) makes none, so none at all.
        assert backend._memory_cgroup_of(job("1:2", info={"memory_cgroup": other})) is None


def test_memory_is_enabled_level_by_level_where_offered(tmp_path: Path) -> None:
    above, root = tmp_path / "svc", tmp_path / "svc" / "jobs"
    root.mkdir(parents=True)
    for level, offered in ((above, "cpu memory pids"), (root, "cpu memory pids")):
        (level / "cgroup.controllers").write_text(offered)
        (level / "cgroup.subtree_control").write_text("")
    assert cgroups.enable_memory([above, root], create=False) == "memory.events"
    assert (above / "cgroup.subtree_control").read_text() == ""  # nothing written
    assert cgroups.enable_memory([above, root], create=True) == "memory.events"
    assert (above / "cgroup.subtree_control").read_text() == "+memory"
    assert (root / "cgroup.subtree_control").read_text() == "+memory"


def test_without_a_memory_controller_oom_kills_are_not_known(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu pids")
    (tmp_path / "cgroup.subtree_control").write_text("")
    said = cgroups.enable_memory([tmp_path], create=True)
    assert said == f"no memory controller in {tmp_path}: OOM kills are not known"
    assert (tmp_path / "cgroup.subtree_control").read_text() == ""
    missing = tmp_path / "not-made"
    assert "does not exist" in cgroups.enable_memory([missing], create=False)


def test_oom_detection_says_which_count_is_read(tmp_path: Path) -> None:
    v2 = cgroups.Containment(tmp_path / "jobs", "each job…", memory="memory.events")
    none = cgroups.MemoryV1(None, "no cgroup v1 memory hierarchy")
    v1 = cgroups.MemoryV1(tmp_path / cgroups.JOBS_V1, "each job…")
    assert cgroups.oom_detection(v2, none) == "memory.events of each job's cgroup"
    assert cgroups.oom_detection(v2, v1).startswith("memory.oom_control")
    unknown = cgroups.oom_detection(cgroups.Containment(None, "off"), none)
    assert unknown == (
        "not known (no job cgroups; cgroup v1 memory: no cgroup v1 memory hierarchy)"
    )
