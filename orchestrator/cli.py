"""The command line: `orchestrator serve` runs the daemon, every other command is a client.

Exit codes: 0 ok; 1 failure (or the job failed); 2 usage or configuration error; 3 the daemon
could not be reached. `submit --wait` and `wait` exit with the job's own exit code.

About 600 lines: one short function per command, and their shared printing; issue #14 reworks
the CLI and will split it by command.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
import orjson

from orchestrator import __version__, errors, logs, models, protocol, settings
from orchestrator.client import RECONNECT_S
from orchestrator.engine import arrays
from orchestrator.escaping import safe as _safe

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
# `wait` and `submit --wait` exit with the job's own code; their own failures (the daemon not
# reachable within --reconnect-s, the job unknown, a refused submit) with this one, as ssh does.
EXIT_OUTCOME_UNKNOWN = 255

_LOG_FLUSH_S = 2.0  # at exit, how long `serve` waits for queued log lines to reach stdout

_SOCKET_ENV = f"{settings.ENV_PREFIX}SERVER__SOCKET_PATH"
_STATES = [state.value for state in models.JobState]


def socket_option(command: Callable[..., T]) -> Callable[..., T]:
    """`--socket` and `--config` of a client command, resolved into its `socket_path`: the
    socket given, else $ORCHESTRATOR__SERVER__SOCKET_PATH, else the one the configuration
    (`--config`, else $ORCHESTRATOR_CONFIG) sets for its daemon, else the per-user default."""

    @functools.wraps(command)
    def resolved(*args: Any, socket_path: Path | None, config_path: Path | None, **kw: Any) -> T:
        return command(*args, socket_path=_socket_of(socket_path, config_path), **kw)

    with_socket = click.option(
        "--socket",
        "socket_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar=_SOCKET_ENV,
        help=f"The daemon's socket (default: ${_SOCKET_ENV}, else the one --config sets, "
        "else the per-user default).",
    )
    with_config = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"The daemon's TOML config, for its socket (default: ${settings.CONFIG_ENV}).",
    )
    return with_socket(with_config(resolved))


def _socket_of(socket_path: Path | None, config_path: Path | None) -> Path | None:
    if socket_path is not None:
        return socket_path
    path = settings.config_path_from(config_path, os.environ)
    if path is None:
        return None
    try:
        loaded = settings.load(path)
    except errors.ConfigError as exc:
        _fail(exc.message, EXIT_USAGE)
    if loaded.source_of("server.socket_path") == "default":
        return None  # the per-user default, with its directory check
    return loaded.settings.server.socket_path


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
reconnect_option = click.option(
    "--reconnect-s",
    type=click.FloatRange(min=0),
    default=RECONNECT_S,
    show_default=True,
    help="If the daemon goes away (a restart), wait this long for it and go on; 0: give up.",
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"TOML config file (default: ${settings.CONFIG_ENV}).",
)


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"orchestrator: {message}", err=True)
    sys.exit(code)


def _echo(text: str, *, err: bool = False) -> None:
    """One line of human output: whatever came from the daemon in it cannot forge another."""
    click.echo(_safe(text), err=err)


def _run(coro_fn: Callable[[], Awaitable[T]], *, outcome: bool = False) -> T:
    """Run a client coroutine, mapping errors to one line on stderr and an exit code — with
    `outcome` (the command exits with a job's code), always `EXIT_OUTCOME_UNKNOWN`."""

    async def main() -> T:
        return await coro_fn()

    def code(usual: int) -> int:
        return EXIT_OUTCOME_UNKNOWN if outcome else usual

    try:
        return asyncio.run(main())
    except errors.DaemonUnreachable as exc:
        _fail(exc.message, code(EXIT_UNREACHABLE))
    except errors.UnsafeSocketDirectory as exc:  # nothing was sent; fix the directory or path
        _fail(_safe(exc.message), code(EXIT_USAGE))  # a squatter's symlink may point anywhere
    except errors.RemoteError as exc:  # the daemon's words, which may quote a job's
        _fail(_safe(exc.message), code(EXIT_FAILURE))
    except errors.OrchestratorError as exc:
        _fail(exc.message, code(EXIT_FAILURE))
    except KeyboardInterrupt:
        sys.exit(130)


def _client(socket_path: Path | None) -> Any:
    from orchestrator.client import Client

    return Client(socket_path)


def _following_notice(exc: BaseException, within_s: float) -> None:
    why = exc.message if isinstance(exc, errors.OrchestratorError) else str(exc)
    _echo(f"orchestrator: {why}; trying again for up to {within_s:g} s", err=True)


@contextlib.asynccontextmanager
async def _following(socket_path: Path | None) -> AsyncIterator[Any]:
    """A client for a command that outlives the daemon (`wait`, `watch`, `logs -f`): it
    connects on its first request, and says on stderr when it has lost the daemon and waits
    for it (`--reconnect-s`)."""

    client = _client(socket_path)
    client.on_lost = _following_notice
    try:
        yield client
    finally:
        await client.close()


def _print_json(obj: Any, out: IO[str] | None = None) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode(), file=out)


def _job_exit_code(job: dict[str, Any]) -> int:
    """What `wait` exits with: 0 for a job that SUCCEEDED; else its own non-zero exit code,
    and 1 for one that failed without one (never ran, timed out, cancelled, lost — a job
    stopped by us may well have exited 0 on its SIGTERM: it did not succeed)."""
    if job["state"] == "SUCCEEDED":
        return EXIT_OK
    code = job.get("exit_code")
    return int(code) if isinstance(code, int) and 0 < code < EXIT_OUTCOME_UNKNOWN else EXIT_FAILURE


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


@main.group("store")
def store_group() -> None:
    """Manage the job store."""


@store_group.command("move")
@config_option
@click.option(
    "--from",
    "from_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The SQLite store to move (default: the configured store.path).",
)
@click.option(
    "--to",
    "to_url",
    metavar="URL",
    help="The PostgreSQL database to move it into, which must hold no jobs "
    "(default: the configured store.url).",
)
@click.option(
    "--node",
    metavar="NAME",
    help="The daemon the store's unfinished local jobs belong to from now on (default: the "
    "configured cluster.node, else this host's name).",
)
def store_move(
    config_path: Path | None, from_path: Path | None, to_url: str | None, node: str | None
) -> None:
    """Move an SQLite store into PostgreSQL: every job, with its history, into a database that
    holds none yet, all or nothing. Stop the daemon serving the store first; the SQLite file
    is left as it was (keep it as a backup). Then run the daemon with store.url set."""
    from orchestrator.store import move

    try:
        loaded = settings.load(config_path)
    except errors.ConfigError as exc:
        _fail(exc.message, EXIT_USAGE)
    url = to_url or loaded.settings.store.url
    if url is None:
        raise click.UsageError("no database to move into: --to postgresql://USER@HOST/DB")
    if not url.startswith(("postgresql://", "postgres://")):
        raise click.BadParameter(
            f"{settings.without_password(url)!r} is not a postgresql:// URL", param_hint="--to"
        )
    if node is not None:
        import pydantic

        try:
            settings.ClusterSettings(node=node)  # as a daemon's cluster.node must be
        except pydantic.ValidationError as exc:
            said = "; ".join(e["msg"] for e in exc.errors(include_url=False))
            raise click.BadParameter(f"{node!r}: {said}", param_hint="--node") from None
    source = from_path or loaded.settings.store.path
    # The stores' own log lines: only warnings, and on stderr (stdout says what was moved).
    logs.configure(loaded.settings.logging.model_copy(update={"level": "WARNING"}), sys.stderr)
    report: move.MoveReport | None = None
    try:
        report = asyncio.run(move.move(source, url, node=node or loaded.settings.cluster.node))
    except errors.OrchestratorError as exc:
        failure = exc.message
    except KeyboardInterrupt:
        logs.flush(_LOG_FLUSH_S)
        sys.exit(130)
    logs.flush(_LOG_FLUSH_S)
    if report is None:
        _fail(f"not moved: {failure}")
    click.echo(
        f"moved {report.jobs} jobs ({report.events} events, {report.attempts} attempts, "
        f"{report.definitions} definitions, {report.dependencies} dependencies) "
        f"from {source} to {settings.without_password(url)}"
    )


@main.group("events")
def events_group() -> None:
    """Event-driven tracking: EventBridge state changes read from an SQS queue."""


@events_group.command("setup")
@config_option
@click.option(
    "--backend",
    type=click.Choice(["ecs", "batch"]),
    required=True,
    help="Whose state changes: the section's and every target's clusters or job queues.",
)
@click.option(
    "--queue-name", metavar="NAME", help="The SQS queue (default: orchestrator-<backend>-events)."
)
@click.option(
    "--rule-name",
    metavar="NAME",
    help="The EventBridge rule (default: orchestrator-<backend>-state-changes).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be done; only read from AWS.")
@json_option
def events_setup(
    config_path: Path | None,
    backend: str,
    queue_name: str | None,
    rule_name: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Create or update the SQS queue, its policy and the EventBridge rule that sends the
    backend's state changes to it; print the queue_url setting to add. Running it again
    changes nothing that is already right."""
    from orchestrator.backends import events_setup as setup

    try:
        loaded = settings.load(config_path)
    except errors.ConfigError as exc:
        _fail(exc.message, EXIT_USAGE)
    if queue_name is not None and (why := setup.bad_name("queue", queue_name)):
        raise click.BadParameter(f"{queue_name!r}: {why}", param_hint="--queue-name")
    if rule_name is not None and (why := setup.bad_name("rule", rule_name)):
        raise click.BadParameter(f"{rule_name!r}: {why}", param_hint="--rule-name")
    # AWS's log lines (throttling): warnings only, on stderr (stdout is the report).
    logs.configure(loaded.settings.logging.model_copy(update={"level": "WARNING"}), sys.stderr)

    async def go() -> setup.Outcome:
        plan = await setup.plan(backend, loaded.settings, queue_name, rule_name)
        return setup.dry_run(plan) if dry_run else await setup.apply(plan)

    try:
        outcome = _run(go)
    finally:
        logs.flush(_LOG_FLUSH_S)
    if as_json:
        _print_json(setup.to_dict(outcome))
    else:
        for line in setup.render(outcome):
            click.echo(line)


# -- client commands ---------------------------------------------------------------------------


@main.command()
@socket_option
@click.option(
    "--wait-s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="How long to wait for the daemon to be gone.",
)
def shutdown(socket_path: Path | None, wait_s: float) -> None:
    """Stop the daemon serving this socket (as SIGTERM does; admins only) and wait until it
    is gone. Running local jobs keep running and are adopted by the next start."""

    async def go() -> int:
        async with _client(socket_path) as client:
            reply = await client.call("shutdown")
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:  # until the daemon closes our connection
                try:
                    await client.call("ping")
                except errors.DaemonUnreachable:
                    return int(reply["pid"])
                except errors.RemoteError:  # shutting down: not gone yet
                    await client.close()
                await asyncio.sleep(0.1)
            _fail(f"the daemon (pid {reply['pid']}) is still up after {wait_s:g} s")

    pid = _run(go)
    _echo(f"orchestrator: stopped (pid {pid})", err=True)


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
        counts = reply["jobs"]
        jobs = (
            ", ".join(f"{state.lower()} {n}" for state, n in sorted(counts.items()))
            if counts is not None
            else "unknown (the store cannot be read)"
        )
        _echo(
            f"orchestrator {reply['version']} pid {reply['pid']} up {reply['uptime_s']:.0f}s; "
            f"{reply.get('status', 'ok')}; "
            f"backends: {', '.join(reply['backends'])}; jobs: {jobs or 'none'}"
            + _cluster_line(reply.get("cluster"))
            + _events_line(reply.get("events"))
        )
    for problem in reply.get("problems", []):
        _echo(f"orchestrator: degraded: {problem['message']}", err=True)


def _events_line(feeds: dict[str, Any] | None) -> str:
    """`ping`'s words on the backends with an events queue: tracked by events or polled."""
    if not feeds:
        return ""
    return "; tracking: " + ", ".join(
        f"{name} by {feed.get('tracking', '?')}" for name, feed in sorted(feeds.items())
    )


def _cluster_line(cluster: dict[str, Any] | None) -> str:
    """`ping`'s words on a shared PostgreSQL: this node, and who leads the AWS backends."""
    if not cluster:
        return ""
    leader = cluster.get("leader")
    if cluster.get("leading"):
        led = f"leading since {leader['since']} (token {leader['token']})" if leader else "leading"
    elif leader:
        led = f"leader {leader['node']} since {leader['since']}"
    else:
        led = "no leader now"
    return f"; node {cluster['node']}, {led}"


@main.command()
@socket_option
def top(socket_path: Path | None) -> None:
    """A full-screen live view: jobs by state, the unfinished jobs, the last failures, AWS
    calls, health. Keys: q quits, s and b cycle the state and backend filters, a clears them.

    Needs a terminal; from a script, follow jobs with `orchestrator watch --json`. With --config
    (and no --socket), the socket is the one that configuration's daemon listens on.
    """
    from orchestrator import top as live_view

    try:
        sys.exit(live_view.run(socket_path))
    except errors.UnsafeSocketDirectory as exc:  # nothing was sent; fix the directory or path
        _fail(_safe(exc.message), EXIT_USAGE)


def _mebibytes(text: str | None) -> int | None:
    """`--memory`: MiB (`512`), or with a unit (`512m`, `4g`, `1.5g`)."""
    if text is None:
        return None
    number, unit = text.strip().lower(), 1.0
    if number[-1:] in ("m", "g"):
        number, unit = number[:-1], 1024.0 if number.endswith("g") else 1.0
    try:
        mib = float(number) * unit
    except ValueError:
        mib = -1.0
    if not math.isfinite(mib) or mib <= 0 or mib != int(mib):
        raise click.BadParameter(
            f"{text!r} is not a size: MiB (512), or 512m, 4g", param_hint="--memory"
        )
    return int(mib)


def _pairs(values: tuple[str, ...], hint: str, form: str = "KEY=VALUE") -> dict[str, str]:
    """Repeated `KEY=VALUE` options (`--env`, `--label`) as a dict; a later key wins."""
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not {form}", param_hint=hint)
        pairs[key] = value
    return pairs


class _Duration(click.ParamType[float]):
    """Seconds: a positive, finite number ("-1", "0", "nan" and "inf" are usage errors)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a positive, finite number of seconds", param, ctx)
        return seconds


def _override(value: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--override") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--override")
    return parsed


@main.command(context_settings={"allow_interspersed_args": False})
@socket_option
@click.option("--backend", type=click.Choice(["local", "ecs", "batch"]), help="Where to run.")
@click.option("--name", help="A name for the job (letters, digits, . _ -).")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="Set an env variable.")
@click.option("--cwd", type=click.Path(path_type=Path), help="Working directory (local).")
@click.option("--timeout-s", type=_Duration(), help="Fail the job after it has run this long.")
@click.option("--queue-timeout-s", type=_Duration(), help="Fail the job if not running by then.")
@click.option("--idempotency-key", help="Resubmitting with the same key returns the same job.")
@click.option(
    "--priority",
    type=click.IntRange(-1000, 1000),
    help="Higher first (default 0); waiting long enough beats any priority.",
)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label the job.")
@click.option("--target", help="A named target of the backend ([ecs.targets.NAME]).")
@click.option("--cpu", type=click.FloatRange(min=0, min_open=True), help="vCPUs (ECS, Batch).")
@click.option("--memory", metavar="SIZE", help="Memory: MiB, or with m/g (512m, 4g).")
@click.option("--gpus", type=click.IntRange(1, 64), help="GPUs (ECS on EC2, Batch).")
@click.option("--image", help="Run this container image (ECS, Batch).")
@click.option(
    "--array",
    "array_size",
    type=click.IntRange(2, 10_000),
    help="Run N copies, each told its index (ORCHESTRATOR_ARRAY_INDEX).",
)
@click.option(
    "--depends-on",
    "depends_on",
    multiple=True,
    metavar="JOB",
    help="Start only after this job (id, unique prefix or name; repeatable).",
)
@click.option(
    "--after",
    type=click.Choice(["success", "finished"]),
    help="With --depends-on: after each SUCCEEDED (default), or after each ended however.",
)
@click.option(
    "--override",
    "overrides",
    multiple=True,
    metavar="JSON",
    help="A JSON object merged into the job's ECS/Batch API arguments (repeatable, in order).",
)
@click.option(
    "--file",
    "spec_file",
    type=click.File("r"),
    help="Submit one JSON job spec per line from FILE ('-' for stdin); --backend, --env, "
    "--cwd, --timeout-s, --queue-timeout-s and --override apply to every line that does not "
    "set its own.",
)
@click.option("--wait", is_flag=True, help="Wait for the job and exit with its exit code.")
@reconnect_option
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
    priority: int | None,
    labels: tuple[str, ...],
    target: str | None,
    cpu: float | None,
    memory: str | None,
    gpus: int | None,
    image: str | None,
    array_size: int | None,
    depends_on: tuple[str, ...],
    after: str | None,
    overrides: tuple[str, ...],
    spec_file: IO[str] | None,
    wait: bool,
    reconnect_s: float,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Submit a job: `orchestrator submit [OPTIONS] -- CMD [ARGS...]`. With --wait, the job's id
    is printed on stdout at once, its outcome on stderr when it ends, and the exit code is the
    job's (255: its outcome could not be learned)."""
    defaults: dict[str, Any] = {"env": _pairs(env, "--env", "NAME=VALUE")}
    wanted = {"cpu": cpu, "memory_mib": _mebibytes(memory), "gpus": gpus}
    if resources := {key: value for key, value in wanted.items() if value is not None}:
        defaults["resources"] = resources
    if labels:
        defaults["labels"] = _pairs(labels, "--label")
    if overrides:
        merged: dict[str, Any] = {}
        for text in overrides:
            merged = settings.deep_merge(merged, _override(text))
        defaults["overrides"] = merged
    given: tuple[tuple[str, object], ...] = (
        ("backend", backend),
        ("timeout_s", timeout_s),
        ("queue_timeout_s", queue_timeout_s),
        ("cwd", None if cwd is None else str(cwd.absolute())),
        ("priority", priority),
        ("target", target),
        ("image", image),
        ("array_size", array_size),
        ("depends_on", list(depends_on) or None),
        ("after", after),
    )
    for key, value in given:
        if value is not None:
            defaults[key] = value
    # The caller's directory: where a local job that names no cwd runs (not part of the job's
    # identity: resubmitting its idempotency key from elsewhere is the same job).
    defaults["default_cwd"] = str(Path.cwd())
    if spec_file is not None:
        clash = [
            flag
            for flag, set_ in (
                ("a command", bool(command)),
                ("--name", name is not None),
                ("--idempotency-key", idempotency_key is not None),
                ("--wait", wait),
            )
            if set_
        ]
        if clash:
            raise click.UsageError(
                "--file takes each job's own spec from its line; it cannot go with "
                f"{', '.join(clash)}"
            )
        _submit_file(socket_path, spec_file, as_json, defaults)
        return
    if not command:
        raise click.UsageError("no command given: orchestrator submit -- CMD [ARGS...]")
    spec: dict[str, Any] = {"command": list(command), **defaults}
    for key, one in (("name", name), ("idempotency_key", idempotency_key)):
        if one is not None:
            spec[key] = one

    async def go() -> dict[str, Any]:
        async with _client(socket_path) as client:
            job: dict[str, Any] = await client.submit(spec)
            if not wait:
                return job
            if not as_json:  # at once, on stdout: `ID=$(orchestrator submit --wait …)`
                _echo(job["id"])
                sys.stdout.flush()
            client.on_lost = _following_notice
            final: dict[str, Any] = await client.wait(job["id"], reconnect_s=reconnect_s)
            return final

    job = _run(go, outcome=wait)
    if as_json:
        _print_json(job)
    elif not wait:
        _echo(job["id"])
    if wait:
        if not as_json:
            _echo_outcome(job)
        sys.exit(_job_exit_code(job))


def _with_defaults(spec: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A spec read from a --file line, with the command line's options under what it sets: its
    own keys win, its `env` and `overrides` are merged over theirs."""
    out = {**defaults, **spec}
    for key in ("env", "overrides", "labels", "resources"):
        if isinstance(spec.get(key), dict) and isinstance(defaults.get(key), dict):
            out[key] = settings.deep_merge(defaults[key], spec[key])
    if not out.get("env"):
        out.pop("env", None)
    return out


def _echo_outcome(job: dict[str, Any]) -> None:
    reason = f" ({job['reason']})" if job.get("reason") else ""
    failure = f" failure={job['failure']}" if job.get("failure") else ""
    attempt = f" attempt={_attempt(job)}" if job.get("attempt", 0) > 1 else ""
    code = "" if job.get("exit_code") is None else f" exit_code={job['exit_code']}"
    _echo(
        f"{job['id']} {job['state']}{code}{failure}{attempt}{reason}",
        err=True,
    )


def _submit_file(
    socket_path: Path | None, spec_file: IO[str], as_json: bool, defaults: Mapping[str, Any]
) -> None:
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
            yield _with_defaults(spec, defaults)

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

    async def go() -> tuple[dict[str, Any], dict[str, str]]:
        async with _client(socket_path) as client:
            job: dict[str, Any] = await client.get(job_id, history=True)
            states = {}
            around = [*job.get("depends_on", ()), *job.get("dependents", ())]
            for dep in around if not as_json else ():
                try:
                    states[dep] = (await client.get(dep))["state"]
                except errors.RemoteError:  # purged, or not this user's to see
                    states[dep] = "unknown"
            return job, states

    job, states = _run(go)
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
    if job.get("cwd"):
        _echo(f"{'cwd:':<15}{job['cwd']}")
    _echo(f"{'attempt:':<15}{_attempt(job)} {_show(job.get('external_id'))}")
    if job.get("image"):
        _echo(f"{'image:':<15}{job['image']}")
    if progress := _array_progress(job).strip(" []"):
        _echo(f"{'array:':<15}{progress} (children: `ls --children {job['id']}`)")
    if (child := arrays.split(job["id"])) is not None:
        _echo(f"{'array:':<15}child {child[1]} of {child[0]}")
    for dep in job.get("depends_on") or ():  # what it waits for, and how each stands
        _echo(f"{'after:':<15}{dep} {states.get(dep, '?')} ({job.get('after', 'success')})")
    for dependent in job.get("dependents") or ():  # what waits for it
        _echo(f"{'needed by:':<15}{dependent} {states.get(dependent, '?')}")
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


def _since(text: str | None) -> float | None:
    """`--since`: an age (`90s`, `15m`, `2h`, `3d`) or an RFC 3339 time, as Unix time."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an age (90s, 15m, 2h, 3d) nor a time (2026-11-29T10:00:00Z)",
            param_hint="--since",
        ) from None
    return (when if when.tzinfo else when.astimezone()).timestamp()


@main.command("ls")
@socket_option
@click.option("--state", "states", multiple=True, type=click.Choice(_STATES, case_sensitive=False))
@click.option("--backend", type=click.Choice(["local", "ecs", "batch"]))
@click.option(
    "--name", "name_glob", metavar="GLOB", help="Only jobs whose name matches (*, ?, […])."
)
@click.option(
    "--since", "since_text", metavar="AGE|TIME", help="Only jobs accepted since (2h, or a time)."
)
@click.option(
    "--label", "label_pairs", multiple=True, metavar="KEY=VALUE", help="Only jobs so labelled."
)
@click.option("--target", help="Only jobs of this target (ECS, Batch).")
@click.option(
    "--children", "parent", metavar="ID", help="The child jobs of this array job (ECS, local)."
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--all", "everything", is_flag=True, help="Every matching job (no --limit).")
@click.option("--cursor", metavar="ID", help="Go on after this job (the cursor `ls` printed).")
@json_option
def list_jobs(
    socket_path: Path | None,
    states: tuple[str, ...],
    backend: str | None,
    name_glob: str | None,
    since_text: str | None,
    label_pairs: tuple[str, ...],
    target: str | None,
    parent: str | None,
    limit: int,
    everything: bool,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List jobs, newest first (printed a page at a time as they arrive); filtered by the
    daemon. When there are more than --limit, says so on stderr with the cursor to go on."""
    since = _since(since_text)
    wanted = [s.upper() for s in states]
    labels = _pairs(label_pairs, "--label") or None

    async def go() -> str | None:
        first, left, at = True, None if everything else limit, cursor
        if not as_json:
            click.echo(f"{'ID':<26}  {'STATE':<9}  {'BACKEND':<7}  {'EXIT':>4}  {'AGE':>4}  NAME")
        async with _client(socket_path) as client:
            while left is None or left > 0:
                size = protocol.MAX_PAGE if left is None else left
                jobs, at = await client.list_page(
                    wanted,
                    backend,
                    size,
                    cursor=at,
                    name=name_glob,
                    since=since,
                    labels=labels,
                    target=target,
                    parent=parent,
                )
                for job in jobs:
                    if as_json:  # one JSON array, written as it streams
                        text = orjson.dumps(job, option=orjson.OPT_INDENT_2).decode()
                        click.echo(("[\n" if first else ",\n") + _indent(text), nl=False)
                    else:
                        _echo(
                            f"{job['id']:<26}  {job['state']:<9}  {job['backend']:<7}  "
                            f"{_show(job['exit_code']):>4}  {_age(job['created_at']):>4}  "
                            f"{job['name']}{_array_progress(job)}"
                        )
                    first = False
                if left is not None:
                    left -= len(jobs)
                if at is None:
                    break
        if as_json:
            click.echo("[]" if first else "\n]")
        return at

    more = _run(go)
    if more is not None:
        _echo(
            f"orchestrator: more jobs match: --limit N, --all, or --cursor {more} to go on",
            err=True,
        )


def _array_progress(job: Mapping[str, Any]) -> str:
    """`  [37/100 succeeded, 2 failed]` for an array job, else nothing."""
    size, counts = job.get("array_size"), job["info"].get("array_status")
    if not size:
        return ""
    return f"  [{arrays.progress(counts or {}, size)}]"


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
    elif reply.get("already_ended"):
        _echo(f"orchestrator: {job['id']} had already ended ({job['state']})", err=True)
    else:
        _echo(f"{job['id']} {job['state']} (cancel requested)")
    if reply.get("already_ended"):
        sys.exit(EXIT_FAILURE)
    if reply.get("recorded") is False:
        click.echo(
            "orchestrator: the store cannot write now: the job was signalled and will not be "
            "launched; the cancel is recorded once the store can write",
            err=True,
        )


@main.command()
@socket_option
@reconnect_option
@json_option
@click.argument("job_id")
def wait(socket_path: Path | None, reconnect_s: float, as_json: bool, job_id: str) -> None:
    """Wait for a job to end; exit with its exit code (255: its outcome could not be
    learned)."""

    async def go() -> dict[str, Any]:
        async with _following(socket_path) as client:
            job: dict[str, Any] = await client.wait(job_id, reconnect_s=reconnect_s)
            return job

    job = _run(go, outcome=True)
    if as_json:
        _print_json(job)
    else:
        _echo_outcome(job)
    sys.exit(_job_exit_code(job))


@main.command("logs")
@socket_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@reconnect_option
@click.argument("job_id")
def show_logs(socket_path: Path | None, follow: bool, reconnect_s: float, job_id: str) -> None:
    """Print a job's own output (stdout to stdout, stderr to stderr)."""

    async def go() -> None:
        async with _following(socket_path) as client:
            async for reply in client.logs(job_id, follow=follow, reconnect_s=reconnect_s):
                if "data" in reply:
                    out = sys.stderr if reply["stream"] == "stderr" else sys.stdout
                    out.write(reply["data"])
                    out.flush()

    _run(go)


@main.command()
@socket_option
@reconnect_option
@click.option(
    "--since",
    type=click.IntRange(min=0),
    help="First the changes after this one (an event's seq, as --json prints it).",
)
@json_option
@click.argument("job_id", required=False)
def watch(
    socket_path: Path | None,
    reconnect_s: float,
    since: int | None,
    as_json: bool,
    job_id: str | None,
) -> None:
    """Stream state changes as they happen (of one job, or of all)."""

    async def go() -> None:
        async with _following(socket_path) as client:
            async for reply in client.watch(job_id, since=since, reconnect_s=reconnect_s):
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
