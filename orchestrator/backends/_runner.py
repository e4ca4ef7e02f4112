"""The local backend's job runner: a tiny parent that outlives the daemon.

Run as `python -I _runner.py ATTEMPT_DIR CWD -- ARGV...` in its own session (process group),
with stdout/stderr already pointing at the job's log files. It

1. claims the attempt by hard-linking a file that names its pid and start time (if the claim is
   taken, a restarted daemon has declared this attempt never launched, so it exits at once);
2. runs ARGV directly (no shell) in CWD, passing on its own environment;
3. ignores the signals the daemon sends to the group (the job gets them and decides), waits, and
4. writes the job's exit status atomically beside its logs, so a daemon that was down when the
   job ended still learns its true outcome.

Standard library only, and nothing imported from the package: it starts in ~15 ms.
"""

import json
import os
import signal
import subprocess
import sys
import time


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def write_atomically(path: str, payload: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def claim(attempt_dir: str) -> bool:
    pid = os.getpid()
    tmp = os.path.join(attempt_dir, f"claim.{pid}")
    with open(tmp, "w") as fh:
        json.dump({"pid": pid, "start_time": start_time(pid)}, fh)
    try:
        os.link(tmp, os.path.join(attempt_dir, "claim"))
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def main(argv: list[str]) -> int:
    attempt_dir, cwd, separator, command = argv[0], argv[1], argv[2], argv[3:]
    if separator != "--" or not command:
        print("usage: _runner.py ATTEMPT_DIR CWD -- ARGV...", file=sys.stderr)
        return 2
    if not claim(attempt_dir):
        return 0
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # A handler (not SIG_IGN, which children would inherit) keeps the runner alive to
        # record the outcome while the job, in the same group, receives the signal.
        signal.signal(signum, lambda *_: None)
    started = time.time()
    try:
        os.chdir(cwd)
    except OSError as exc:
        message = f"cannot enter working directory {cwd!r}: {exc.strerror}"
        print(f"orchestrator: {message}", file=sys.stderr)
        result: dict[str, object] = {"exit_code": 126, "signal": None, "error": message}
        write_atomically(os.path.join(attempt_dir, "exit"), result)
        return 0
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        message = f"cannot run {command[0]!r}: {exc.strerror}"
        print(f"orchestrator: {message}", file=sys.stderr)
        result = {"exit_code": code, "signal": None, "error": message}
    else:
        returncode = child.wait()
        killed_by = -returncode if returncode < 0 else None
        result = {
            "exit_code": 128 + killed_by if killed_by else returncode,
            "signal": killed_by,
            "error": None,
        }
    result.update(started_at=started, finished_at=time.time())
    write_atomically(os.path.join(attempt_dir, "exit"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
