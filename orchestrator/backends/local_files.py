"""What the local backend reads about a job, apart from the keeper: its external id, its
process in /proc, its attempt's claim, its logs, whether the kernel OOM-killed a process of it
(its cgroups' counts), and the files a runner from before the keeper left (an `exit` file).
Reads that fail without proving anything raise `errors.ReadUnsure`: the job keeps its state
until a later read tells.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from orchestrator import errors, failures, models
from orchestrator.backends import _runner, base, cgroups

_READ_CHUNK = 64 * 1024


class JobId(NamedTuple):
    """An external id: `PID:START_TIME` of the job's own process (of its runner, for attempts
    from before the keeper; `0:0` when a keeper that has gone launched it), then `:CGROUP` (its
    directory) when the attempt runs in a cgroup of its own. The pid and start time name the
    process while it lives; the cgroup names all of the job's processes."""

    pid: int
    start: int
    cgroup: Path | None


def parse_external_id(external_id: str) -> JobId:
    pid, start, *cgroup = external_id.split(":", 2)
    return JobId(int(pid), int(start), Path(cgroup[0]) if cgroup else None)


def alive(pid: int, start: int) -> bool:
    """Whether the process `pid` runs and is the one started at `start` (not a reused pid; a
    zombie has ended); `errors.ReadUnsure` when /proc cannot tell right now."""
    try:
        state, started = _runner.stat(pid)
        return started == start and state != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, ValueError, IndexError) as exc:
        raise errors.ReadUnsure(f"/proc/{pid}/stat", exc) from exc


def utf8_prefix(data: bytes) -> bytes:
    """`data` less a trailing incomplete UTF-8 sequence (read it next time, whole)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        if byte & 0x80 == 0:
            return data
        needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
        return data if back >= needed else data[:-back]
    return data


def read_exit(external_id: str, path: Path, *, runner_gone: bool) -> base.Observation | None:
    """The outcome a runner from before the keeper recorded; None while there is none. A
    file that cannot be read now raises `errors.ReadUnsure`. One that does not parse is waited on
    while the runner lives; once it is gone, the outcome cannot be established: LOST."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise errors.ReadUnsure("exit file", exc) from exc
    try:
        result: dict[str, Any] = orjson.loads(data)
        int(result["exit_code"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if not runner_gone:
            return None
        return base.Observation(
            external_id,
            models.JobState.LOST,
            "unreadable",
            reason=f"the exit file is corrupt ({exc!r}) and its runner has ended",
        )
    return outcome(external_id, result)


def claim_or_read(attempt_dir: Path) -> base.Located:
    try:
        os.stat(attempt_dir)
    except FileNotFoundError:
        return base.Located(None, launched=False)
    except OSError as exc:
        raise errors.ReadUnsure("attempt directory", exc) from exc
    tmp = attempt_dir / f"claim.recovery.{os.getpid()}"
    try:
        tmp.write_bytes(orjson.dumps({"pid": None, "by": "recovery"}))
        try:
            os.link(tmp, attempt_dir / "claim")
        except FileExistsError:
            pass
        else:
            return base.Located(None, launched=False)
    except OSError as exc:
        raise errors.ReadUnsure("claim file", exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    claim = read_claim(attempt_dir)
    if claim is None or claim.get("by") == "recovery":
        return base.Located(None, launched=False)
    # Launched by a keeper that has gone since (or a claim the job wrote itself: it is in
    # the job's directory): launched, its outcome unknowable but from its cgroup.
    return base.Located("0:0", launched=True)


def read_logs(attempt_dir: Path, cursor: Any) -> base.LogPage:
    offsets: dict[str, int] = dict(cursor or {"stdout": 0, "stderr": 0})
    chunks = []
    for stream in ("stdout", "stderr"):
        try:
            with open(attempt_dir / stream, "rb") as fh:
                fh.seek(offsets[stream])
                data = utf8_prefix(fh.read(_READ_CHUNK))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise errors.ReadUnsure(stream, exc) from exc
        if data:
            offsets[stream] += len(data)
            chunks.append(base.LogChunk(stream, data.decode("utf-8", errors="replace")))
    return base.LogPage(chunks, offsets)


def read_claim(attempt_dir: Path) -> dict[str, Any] | None:
    """The attempt's claim (None: there is none); `errors.ReadUnsure` if it cannot be read now."""
    try:
        claim = orjson.loads((attempt_dir / "claim").read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise errors.ReadUnsure("claim file", exc) from exc
    except orjson.JSONDecodeError as exc:
        raise errors.ReadUnsure("claim file", exc) from exc
    if not isinstance(claim, dict):
        raise errors.ReadUnsure("claim file", ValueError(f"not an object: {claim!r}"))
    return claim


def oom_killed(cgroup: Path | None, memory: Path | None) -> bool:
    """Whether the kernel OOM-killed a process of the attempt: its v2 cgroup's `memory.events`
    (`cgroup`), its v1 memory cgroup's `memory.oom_control` (`memory`). A count that is not
    there (no memory controller, no such cgroup) is not known: False. One that is there but
    cannot be read now raises `errors.ReadUnsure` (read before the cgroups are removed, it is
    read again next round)."""
    try:
        v2 = cgroups.oom_kills(cgroup) if cgroup is not None else None
    except OSError as exc:
        raise errors.ReadUnsure("memory.events", exc) from exc
    try:
        v1 = cgroups.oom_kills_v1(memory) if memory is not None else None
    except OSError as exc:
        raise errors.ReadUnsure("memory.oom_control", exc) from exc
    return bool(v2) or bool(v1)


def outcome(
    external_id: str, result: Mapping[str, Any], *, oom_killed: bool = False
) -> base.Observation:
    """The observation of a job whose own process has ended, from what the keeper (or a runner
    from before it) recorded: exit code, signal, why it could not start; its failure class
    from `failures.local_exit` (`oom_killed`: the kernel OOM-killed a process of the job)."""
    code = int(result["exit_code"])
    killed_by = int(result["signal"]) if result.get("signal") else None
    error = str(result["error"]) if result.get("error") else None
    classified = failures.local_exit(code, killed_by, error, oom_killed)
    state = models.JobState.SUCCEEDED if code == 0 else models.JobState.FAILED
    info: dict[str, Any] = {k: result[k] for k in ("started_at", "finished_at") if k in result}
    return base.Observation(
        external_id,
        state,
        "exited",
        reason=None if classified is None else classified.reason,
        exit_code=code,
        info=info,
        failure=None if classified is None else classified.failure,
    )
