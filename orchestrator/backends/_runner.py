"""The local backend's job runner: a tiny parent that outlives the daemon.

Run as `python -I _runner.py ATTEMPT_DIR CWD -- ARGV...` in its own session (process group),
with stdout/stderr already pointing at the job's log files. It

1. claims the attempt by hard-linking a file that names its pid and start time (if the claim is
   taken, a restarted daemon has declared this attempt never launched, so it exits at once);
2. runs ARGV directly (no shell) in CWD, passing on its own environment;
3. ignores the signals the daemon sends to the group (the job gets them and decides), waits, and
4. writes the job's exit status atomically beside its logs, so a daemon that was down when the
   job ended still learns its true outcome.

Only modules the interpreter loads anyway (no subprocess, no json), nothing from the package,
and run with `-I -S`: it costs about as much as a bare interpreter start (~15 ms).
"""

import os
import signal
import sys
import time


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _json(value: object) -> str:
    """Enough JSON for flat objects of numbers, None and strings (repr escapes what JSON would
    not read back, so strings go through an explicit escape)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        escaped = "".join(
            c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else f"\\u{ord(c):04x}" for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json(k)}: {_json(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_atomically(path: str, payload: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(_json(payload))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def claim(attempt_dir: str) -> bool:
    pid = os.getpid()
    tmp = os.path.join(attempt_dir, f"claim.{pid}")
    with open(tmp, "w") as fh:
        fh.write(_json({"pid": pid, "start_time": start_time(pid)}))
    try:
        os.link(tmp, os.path.join(attempt_dir, "claim"))
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def spawn_and_wait(command: list[str]) -> int | OSError:
    """fork + execvp (PATH from our environment); the wait status, or why exec failed.

    A close-on-exec pipe tells the two apart: it closes empty when exec succeeds and carries
    the errno when it fails, the way `subprocess` does it.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(write_end, str(exc.errno).encode())
        finally:
            os._exit(127)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        failed = pipe.read()
    if failed:
        os.waitpid(pid, 0)
        errno = int(failed)
        return OSError(errno, os.strerror(errno))  # OSError(ENOENT, …) is a FileNotFoundError
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


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
        failure: dict[str, object] = {"exit_code": 126, "signal": None, "error": message}
        write_atomically(os.path.join(attempt_dir, "exit"), failure)
        return 0
    error = spawn_and_wait(command)
    if isinstance(error, OSError):
        code = 127 if isinstance(error, FileNotFoundError) else 126
        message = f"cannot run {command[0]!r}: {error.strerror}"
        print(f"orchestrator: {message}", file=sys.stderr)
        result: dict[str, object] = {"exit_code": code, "signal": None, "error": message}
    else:
        killed_by = os.WTERMSIG(error) if os.WIFSIGNALED(error) else None
        result = {
            "exit_code": 128 + killed_by if killed_by else os.WEXITSTATUS(error),
            "signal": killed_by,
            "error": None,
        }
    result.update(started_at=started, finished_at=time.time())
    write_atomically(os.path.join(attempt_dir, "exit"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
