"""The command line: `orchestrator serve` runs the daemon, every other command is a client.

Exit codes: 0 ok; 1 failure (or the job failed); 2 usage or configuration error; 3 the daemon
could not be reached. `submit --wait` and `wait` exit with the job's own exit code.

About 600 lines: one short function per command, and their shared printing; issue #14 reworks
the CLI and will split it by command.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
import orjson

from orchestrator import __version__, errors, logs, settings

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_LOG_FLUSH_S = 2.0  # at exit, how long `serve` waits for queued log lines to reach stdout

_SOCKET_ENV = f"{settings.ENV_PREFIX}SERVER__SOCKET_PATH"
_STATES = [
    "QUEUED",
    "SUBMITTED",
    "PENDING",
    "RUNNABLE",
    "STARTING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "LOST",
]

socket_option = click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=_SOCKET_ENV,
    help=f"The daemon's socket (default: ${_SOCKET_ENV}, else the per-user default).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"TOML config file (default: ${settings.CONFIG_ENV}).",
)


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"orchestrator: {message}", err=True)
    sys.exit(code)


# What a string from the daemon (a job's name, command or reason, a vendor's status, an error
# message) could use to forge output: C0 controls (newline, carriage return, ESC…), DEL, C1
# controls, Unicode line separators and bidirectional overrides. Human output shows them
# escaped, as Python writes them (`\n`, `\x1b`, `\u202e`); JSON output escapes by its own rules.
_UNSAFE_CHARS = [
    *range(0x20),
    *range(0x7F, 0xA0),
    0x061C,
    0x200E,
    0x200F,
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]


def _escaped(code: int) -> str:
    short = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code)
    return short or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


_ESCAPES = str.maketrans({code: _escaped(code) for code in _UNSAFE_CHARS})


def _safe(text: str) -> str:
    """`text` with every character that could move the cursor or start a line escaped."""
    return text.translate(_ESCAPES)


def _echo(text: str, *, err: bool = False) -> None:
    """One line of human output: whatever came from the daemon in it cannot forge another."""
    click.echo(_safe(text), err=err)


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a client coroutine, mapping errors to one line on stderr and an exit code."""

    async def main() -> T:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except errors.DaemonUnreachable as exc:
        _fail(exc.message, EXIT_UNREACHABLE)
    except errors.UnsafeSocketDirectory as exc:  # nothing was sent; fix the directory or path
        _fail(_safe(exc.message), EXIT_USAGE)  # a squatter's symlink may point anywhere
    except errors.RemoteError as exc:  # the daemon's words, which may quote a job's
        _fail(_safe(exc.message))
    except errors.OrchestratorError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        sys.exit(130)


def _client(socket_path: Path | None) -> Any:
    from orchestrator.client import Client

    return Client(socket_path)


def _print_json(obj: Any, out: IO[str] | None = None) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode(), file=out)


def _job_exit_code(job: dict[str, Any]) -> int:
    if job.get("exit_code") is not None:
        return int(job["exit_code"])
    return EXIT_OK if job["state"] == "SUCCEEDED" else EXIT_FAILURE


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orchestrator")
def main() -> None:
    """Launch and track jobs on AWS ECS, AWS Batch or local subprocesses."""


# -- the daemon --------------------------------------------------------------------------------


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the daemon in the foreground (systemd or a container runs this)."""
    try:
        loaded = settings.load(config_path)
    except errors.ConfigError as exc:
        _fail(exc.message, EXIT_USAGE)
    logs.configure(loaded.settings.logging)
    from orchestrator.daemon import Daemon

    daemon = Daemon(loaded.settings, inherited_socket=_inherited_socket())
    _not_dumpable()
    # What imports and configuration built lives as long as the process: keep it out of every
    # garbage collection from now on (the recovery scan of 10,000 jobs runs ~30% faster).
    gc.freeze()
    try:
        _event_loop_runner(daemon.run)
    except (
        errors.StoreUnusable,
        errors.UnsafeSocketDirectory,
        errors.CannotRunAsSubmitter,
    ) as exc:
        # Held by another daemon, not a store, or a newer version's; a socket directory others
        # can write; jobs to run as their submitters by a daemon that cannot: restarting
        # cannot help.
        logs.log.error("daemon.failed", error=exc.message, code=exc.code)
        sys.exit(EXIT_USAGE)
    except errors.OrchestratorError as exc:
        logs.log.error("daemon.failed", error=exc.message, code=exc.code)
        sys.exit(EXIT_FAILURE)
    finally:
        # The last lines (daemon.stopped) are still queued for stdout; a stdout nobody reads
        # must not keep the process from exiting, so the wait is bounded.
        logs.flush(_LOG_FLUSH_S)


def _not_dumpable() -> None:
    """No core dump and no ptrace, /proc/PID/environ or /proc/PID/mem of the daemon by other
    processes of its uid (local jobs run as it by default): its memory and environment hold
    every job's secrets and the AWS credentials."""
    import ctypes

    pr_set_dumpable = 4
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def _event_loop_runner(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await fn()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _inherited_socket() -> socket.socket | None:
    """A listening socket passed by systemd socket activation (LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=3)
    sock.setblocking(False)
    return sock


@main.command()
@config_option
@json_option
def check(config_path: Path | None, as_json: bool) -> None:
    """Check that this configuration can run jobs: store, backends, AWS resources."""
    from orchestrator import preflight

    try:
        loaded = settings.load(config_path)
    except errors.ConfigError as exc:
        _fail(exc.message, EXIT_USAGE)
    checks = asyncio.run(preflight.run(loaded.settings))
    failed = [c for c in checks if not c.ok]
    if as_json:
        _print_json({"ok": not failed, "checks": [c.to_dict() for c in checks]})
    else:
        click.echo(f"config: {loaded.config_path or 'none (defaults and environment)'}")
        click.echo(preflight.environment_summary())
        for c in checks:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<22} {c.detail}")
        click.echo(f"checks: {len(checks) - len(failed)} ok, {len(failed)} failing")
    sys.exit(EXIT_FAILURE if failed else EXIT_OK)


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@config_option
@json_option
def config_show(config_path: Path | None, as_json: bool) -> None:
    """Print the effective settings and where each value came from."""
    try:
        loaded = settings.load(config_path)
    except errors.ConfigError as exc:
        _fail(exc.message, EXIT_USAGE)
    flat = settings.flatten(loaded.settings)
    if as_json:
        _print_json(
            {key: {"value": value, "source": loaded.source_of(key)} for key, value in flat.items()}
        )
        return
    width = max(len(key) for key in flat)
    for key, value in flat.items():
        rendered = orjson.dumps(value).decode()
        click.echo(f"{key:<{width}} = {rendered}  # {loaded.source_of(key)}")


# -- client commands ---------------------------------------------------------------------------


@main.command()
@socket_option
@click.option(
    "--wait-s",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Keep trying this long while the daemon is not up yet (scripts, healthchecks).",
)
@json_option
def ping(socket_path: Path | None, wait_s: float, as_json: bool) -> None:
    """Check that the daemon answers (and that its store does).

    A degraded daemon (its store cannot commit, or is short of space) still exits 0, with one
    warning line per problem on stderr: it still serves, and a restart would not help.
    """

    async def go() -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                async with _client(socket_path) as client:
                    reply: dict[str, Any] = await client.ping()
                    return reply
            except errors.DaemonUnreachable:
                if time.monotonic() >= deadline:
                    raise
            # Polled: nothing tells a process that another one started listening (a socket file
            # can be there, stale, long before); trying to connect is the only way to know.
            await asyncio.sleep(0.1)

    reply = _run(go)
    if as_json:
        _print_json({k: v for k, v in reply.items() if k not in ("v", "id", "ok")})
    else:
        jobs = ", ".join(f"{state.lower()} {n}" for state, n in sorted(reply["jobs"].items()))
        _echo(
            f"orchestrator {reply['version']} pid {reply['pid']} up {reply['uptime_s']:.0f}s; "
            f"{reply.get('status', 'ok')}; "
            f"backends: {', '.join(reply['backends'])}; jobs: {jobs or 'none'}"
        )
    for problem in reply.get("problems", []):
        _echo(f"orchestrator: degraded: {problem['message']}", err=True)


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--env")
        env[name] = value
    return env


@main.command(context_settings={"allow_interspersed_args": False})
@socket_option
@click.option("--backend", type=click.Choice(["local", "ecs", "batch"]), help="Where to run.")
@click.option("--name", help="A name for the job (letters, digits, . _ -).")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="Set an env variable.")
@click.option("--cwd", type=click.Path(path_type=Path), help="Working directory (local).")
@click.option("--timeout-s", type=float, help="Fail the job after it has run this long.")
@click.option("--queue-timeout-s", type=float, help="Fail the job if not running by then.")
@click.option("--idempotency-key", help="Resubmitting with the same key returns the same job.")
@click.option(
    "--file",
    "spec_file",
    type=click.File("r"),
    help="Submit one JSON job spec per line from FILE ('-' for stdin).",
)
@click.option("--wait", is_flag=True, help="Wait for the job and exit with its exit code.")
@json_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def submit(
    socket_path: Path | None,
    backend: str | None,
    name: str | None,
    env: tuple[str, ...],
    cwd: Path | None,
    timeout_s: float | None,
    queue_timeout_s: float | None,
    idempotency_key: str | None,
    spec_file: IO[str] | None,
    wait: bool,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Submit a job: `orchestrator submit [OPTIONS] -- CMD [ARGS...]`."""
    if spec_file is not None:
        if command:
            raise click.UsageError("give either --file or a command, not both")
        _submit_file(socket_path, spec_file, as_json)
        return
    if not command:
        raise click.UsageError("no command given: orchestrator submit -- CMD [ARGS...]")
    spec: dict[str, Any] = {
        "command": list(command),
        "env": _parse_env(env),
        "cwd": str((cwd or Path.cwd()).absolute()),
    }
    for key, value in (
        ("backend", backend),
        ("name", name),
        ("timeout_s", timeout_s),
        ("queue_timeout_s", queue_timeout_s),
        ("idempotency_key", idempotency_key),
    ):
        if value is not None:
            spec[key] = value

    async def go() -> dict[str, Any]:
        async with _client(socket_path) as client:
            job: dict[str, Any] = await client.submit(spec)
            if not wait:
                return job
            if not as_json:
                _echo(job["id"], err=True)
            final: dict[str, Any] = await client.wait(job["id"])
            return final

    job = _run(go)
    if as_json:
        _print_json(job)
    elif not wait:
        _echo(job["id"])
    if wait:
        if not as_json:
            _echo_outcome(job)
        sys.exit(_job_exit_code(job))


def _echo_outcome(job: dict[str, Any]) -> None:
    reason = f" ({job['reason']})" if job.get("reason") else ""
    failure = f" failure={job['failure']}" if job.get("failure") else ""
    attempt = f" attempt={_attempt(job)}" if job.get("attempt", 0) > 1 else ""
    _echo(
        f"{job['id']} {job['state']} exit_code={job['exit_code']}{failure}{attempt}{reason}",
        err=True,
    )


def _submit_file(socket_path: Path | None, spec_file: IO[str], as_json: bool) -> None:
    failures = 0
    numbers: list[int] = []  # the line number of each spec sent, in order

    def specs() -> Iterator[dict[str, Any]]:
        nonlocal failures
        for number, line in enumerate(spec_file, 1):
            if not line.strip():
                continue
            try:
                spec = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                failures += 1
                _echo(f"orchestrator: line {number}: invalid JSON: {exc}", err=True)
                continue
            if not isinstance(spec, dict):
                failures += 1
                click.echo(f"orchestrator: line {number}: not a JSON object", err=True)
                continue
            numbers.append(number)
            yield spec

    async def go() -> None:
        nonlocal failures
        async with _client(socket_path) as client:
            index = 0
            async for result in client.submit_many(specs()):
                number, index = numbers[index], index + 1
                if isinstance(result, errors.RemoteError):
                    failures += 1
                    _echo(f"orchestrator: line {number}: {result.message}", err=True)
                elif as_json:
                    click.echo(orjson.dumps(result).decode())
                else:
                    _echo(result["id"])

    _run(go)
    if failures:
        _fail(f"{failures} job spec(s) were rejected")


@main.command()
@socket_option
@json_option
@click.argument("job_id")
def status(socket_path: Path | None, as_json: bool, job_id: str) -> None:
    """Show one job, with its history."""

    async def go() -> dict[str, Any]:
        async with _client(socket_path) as client:
            job: dict[str, Any] = await client.get(job_id, history=True)
            return job

    job = _run(go)
    if as_json:
        _print_json(job)
        return
    for key in (
        "id",
        "name",
        "backend",
        "state",
        "exit_code",
        "failure",
        "reason",
        "vendor_status",
    ):
        _echo(f"{key + ':':<15}{_show(job.get(key))}")
    _echo(f"{'command:':<15}{' '.join(job['command'])}")
    _echo(f"{'attempt:':<15}{_attempt(job)} {_show(job.get('external_id'))}")
    previous = ((job.get("info") or {}).get("retry") or {}).get("previous")
    if isinstance(previous, dict):
        said = previous.get("reason")
        _echo(f"{'previous:':<15}{previous.get('failure')}{f' — {said}' if said else ''}")
    for event in job.get("history", []):
        reason = f"  ({event['reason']})" if event.get("reason") else ""
        _echo(f"  {event['at']}  {event['from'] or '-':<10} → {event['to']}{reason}")


def _attempt(job: Mapping[str, Any]) -> str:
    """`2/3`: the job's attempt of the most its retry policy gives (`2` without a policy)."""
    most = (job.get("retry") or {}).get("attempts")
    return f"{job['attempt']}/{most}" if most else str(job["attempt"])


def _show(value: Any) -> str:
    return "-" if value is None else str(value)


def _age(iso: str) -> str:
    seconds = time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@main.command("ls")
@socket_option
@click.option("--state", "states", multiple=True, type=click.Choice(_STATES, case_sensitive=False))
@click.option("--backend", type=click.Choice(["local", "ecs", "batch"]))
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@json_option
def list_jobs(
    socket_path: Path | None,
    states: tuple[str, ...],
    backend: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first (printed a page at a time as they arrive)."""

    async def go() -> None:
        first = True
        if not as_json:
            click.echo(f"{'ID':<26}  {'STATE':<9}  {'BACKEND':<7}  {'EXIT':>4}  {'AGE':>4}  NAME")
        async with _client(socket_path) as client:
            async for job in client.iter_jobs([s.upper() for s in states] or None, backend, limit):
                if as_json:  # one JSON array, written as it streams
                    text = orjson.dumps(job, option=orjson.OPT_INDENT_2).decode()
                    click.echo(("[\n" if first else ",\n") + _indent(text), nl=False)
                else:
                    _echo(
                        f"{job['id']:<26}  {job['state']:<9}  {job['backend']:<7}  "
                        f"{_show(job['exit_code']):>4}  {_age(job['created_at']):>4}  {job['name']}"
                    )
                first = False
        if as_json:
            click.echo("[]" if first else "\n]")

    _run(go)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


@main.command()
@socket_option
@json_option
@click.argument("job_id")
def cancel(socket_path: Path | None, as_json: bool, job_id: str) -> None:
    """Cancel a job (recorded first, then re-issued until the backend confirms)."""

    async def go() -> dict[str, Any]:
        async with _client(socket_path) as client:
            reply: dict[str, Any] = await client.call("cancel", job_id=job_id)
            return reply

    reply = _run(go)
    job = reply["job"]
    if as_json:
        _print_json(job)
    else:
        _echo(f"{job['id']} {job['state']} (cancel requested)")
    if reply.get("recorded") is False:
        click.echo(
            "orchestrator: the store cannot write now: the job was signalled and will not be "
            "launched; the cancel is recorded once the store can write",
            err=True,
        )


@main.command()
@socket_option
@json_option
@click.argument("job_id")
def wait(socket_path: Path | None, as_json: bool, job_id: str) -> None:
    """Wait for a job to end; exit with its exit code."""

    async def go() -> dict[str, Any]:
        async with _client(socket_path) as client:
            job: dict[str, Any] = await client.wait(job_id)
            return job

    job = _run(go)
    if as_json:
        _print_json(job)
    else:
        _echo_outcome(job)
    sys.exit(_job_exit_code(job))


@main.command("logs")
@socket_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@click.argument("job_id")
def show_logs(socket_path: Path | None, follow: bool, job_id: str) -> None:
    """Print a job's own output (stdout to stdout, stderr to stderr)."""

    async def go() -> None:
        async with _client(socket_path) as client:
            async for reply in client.logs(job_id, follow=follow):
                if "data" in reply:
                    out = sys.stderr if reply["stream"] == "stderr" else sys.stdout
                    out.write(reply["data"])
                    out.flush()

    _run(go)


@main.command()
@socket_option
@json_option
@click.argument("job_id", required=False)
def watch(socket_path: Path | None, as_json: bool, job_id: str | None) -> None:
    """Stream state changes as they happen (of one job, or of all)."""

    async def go() -> None:
        async with _client(socket_path) as client:
            async for reply in client.watch(job_id):
                event = reply.get("event")
                if event is None:
                    continue
                if as_json:
                    click.echo(orjson.dumps(event).decode())
                    continue
                reason = f"  ({event['reason']})" if event.get("reason") else ""
                _echo(
                    f"{event['at']}  {event['job_id']}  {event['name']}  "
                    f"{event['from'] or '-'} → {event['to']}{reason}"
                )

    _run(go)
