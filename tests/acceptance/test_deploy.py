"""The deployment artefacts, checked offline: the systemd units (sandbox score, syntax, the
settings the daemon relies on), the notify protocol and socket activation they use, and the
container image's commands run as written outside a container."""

from __future__ import annotations

import ast
import configparser
import contextlib
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from orchestrator import errors, settings
from orchestrator.client import SyncClient
from tests.support.daemon import STARTUP_TIMEOUT_S, DaemonProcess

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "deploy" / "systemd" / "orchestrator.service"
SOCKET_UNIT = REPO / "deploy" / "systemd" / "orchestrator.socket"
RUN_AS_SUBMITTER = REPO / "deploy" / "systemd" / "run-as-submitter.conf"  # a drop-in for SERVICE
HIDE_STATE = REPO / "deploy" / "systemd" / "hide-state.conf"  # another
SYSUSERS = REPO / "deploy" / "systemd" / "orchestrator.sysusers"
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def environ() -> dict[str, str]:
    """This process's environment without systemd's notify and watchdog variables (the tests
    may themselves run under a service manager)."""
    skip = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    return {name: value for name, value in os.environ.items() if name not in skip}


def run(
    argv: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# -- systemd units -----------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    """A unit file as INI; a key given twice keeps its last value (enough for these checks)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(path.read_text())
    return parser


@needs_systemd_analyze
def test_the_service_sandbox_scores_ok() -> None:
    result = run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(SERVICE)])
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert result.returncode == 0, f"{overall}\n{result.stdout}\n{result.stderr}"
    assert overall, result.stdout


@needs_systemd_analyze
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this environment's entry point.
    entry_point = VENV_BIN / "orchestrator"
    assert entry_point.exists()
    service = SERVICE.read_text().replace("/usr/local/bin/orchestrator", str(entry_point))
    (tmp_path / SERVICE.name).write_text(service)
    shutil.copy(SOCKET_UNIT, tmp_path / SOCKET_UNIT.name)
    result = run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / SERVICE.name),
            str(tmp_path / SOCKET_UNIT.name),
        ]
    )
    # Unknown keys and unparsable values are only warnings: any output at all is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def exposures(output: str) -> set[str]:
    """The settings `systemd-analyze security` finds exposed (its ✗ lines, by name)."""
    return {line.split()[1] for line in output.splitlines() if line.startswith("✗")}


def with_drop_in(root: Path, drop_in: Path = RUN_AS_SUBMITTER) -> Path:
    """The service and a drop-in of ours installed under `root` as under /etc."""
    system = root / "etc" / "systemd" / "system"
    (system / f"{SERVICE.name}.d").mkdir(parents=True)
    shutil.copy(SERVICE, system / SERVICE.name)
    shutil.copy(drop_in, system / f"{SERVICE.name}.d" / drop_in.name)
    return root


@needs_systemd_analyze
def test_the_hide_state_drop_in_scores_ok_and_relaxes_only_what_the_namespaces_need(
    tmp_path: Path,
) -> None:
    root = with_drop_in(tmp_path, HIDE_STATE)
    security = ["systemd-analyze", "security", "--offline=true", "--threshold=25"]
    result = run([*security, f"--root={root}", SERVICE.name])
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert result.returncode == 0, f"{overall}\n{result.stdout}\n{result.stderr}"
    plain = run([*security, str(SERVICE)])
    assert exposures(result.stdout) - exposures(plain.stdout) == {
        "RestrictNamespaces=~user",
        "RestrictNamespaces=~mnt",
        "SystemCallFilter=~@mount",  # mount(2) alone, in fact
    }
    assert exposures(plain.stdout) <= exposures(result.stdout)
    service = shlex.split(read_unit(SERVICE)["Service"]["Environment"])
    assert "ORCHESTRATOR__LOCAL__HIDE_STATE=off" in service  # said, so no warning at each start
    assert read_unit(HIDE_STATE)["Service"]["Environment"] == "ORCHESTRATOR__LOCAL__HIDE_STATE=auto"


@needs_systemd_analyze
def test_the_run_as_submitter_drop_in_scores_ok_and_relaxes_only_what_the_switch_needs(
    tmp_path: Path,
) -> None:
    root = with_drop_in(tmp_path)
    security = ["systemd-analyze", "security", "--offline=true", "--threshold=25"]
    result = run([*security, f"--root={root}", SERVICE.name])
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert result.returncode == 0, f"{overall}\n{result.stdout}\n{result.stderr}"
    assert overall, result.stdout
    plain = run([*security, str(SERVICE)])
    assert exposures(result.stdout) - exposures(plain.stdout) == {
        "AmbientCapabilities=",
        "CapabilityBoundingSet=~CAP_SET(UID|GID|PCAP)",
        "CapabilityBoundingSet=~CAP_KILL",
        "SystemCallFilter=~@privileged",  # setuid, setgroups, capset: nothing else of it
        "ProtectHome=",
    }
    assert exposures(plain.stdout) <= exposures(result.stdout)


@needs_systemd_analyze
def test_the_service_with_the_run_as_submitter_drop_in_passes_verify(tmp_path: Path) -> None:
    # verify reads the drop-ins of `<unit>.d/` beside the unit file it is given.
    service = SERVICE.read_text().replace(
        "/usr/local/bin/orchestrator", str(VENV_BIN / "orchestrator")
    )
    (tmp_path / SERVICE.name).write_text(service)
    (tmp_path / f"{SERVICE.name}.d").mkdir()
    shutil.copy(RUN_AS_SUBMITTER, tmp_path / f"{SERVICE.name}.d" / RUN_AS_SUBMITTER.name)
    result = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / SERVICE.name)])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_run_as_submitter_drop_in_grants_what_the_daemon_checks_for() -> None:
    drop_in = read_unit(RUN_AS_SUBMITTER)["Service"]
    needed = {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
    assert set(drop_in["AmbientCapabilities"].split()) == needed
    assert set(drop_in["CapabilityBoundingSet"].split()) == needed
    environ = dict(pair.split("=", 1) for pair in shlex.split(drop_in["Environment"]))
    assert settings.load(environ=environ).settings.local.run_as == "submitter"
    # The rest of the sandbox is the unit's: no new privileges for jobs, the same user.
    assert {"NoNewPrivileges", "User", "PrivateUsers", "RestrictSUIDSGID"}.isdisjoint(drop_in)
    denied = drop_in["SystemCallFilter"].removeprefix("~").split()
    assert {"setuid", "setgroups", "capset", "@setuid", "@privileged"}.isdisjoint(denied)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_the_sysusers_entry_creates_the_user_and_group_of_the_units(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run(["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(SYSUSERS)])
    assert result.returncode == 0, result.stderr
    service = read_unit(SERVICE)["Service"]
    assert f"Creating user '{service['User']}'" in result.stdout + result.stderr
    assert f"Creating group '{service['Group']}'" in result.stdout + result.stderr


def test_the_service_runs_the_daemon_as_a_notify_service_that_spares_local_jobs() -> None:
    service = read_unit(SERVICE)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "orchestrator"
    assert argv[1:] == ["serve", "--config", "/etc/orchestrator/config.toml"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        # Only the daemon gets SIGTERM: local jobs keep running, to be re-adopted.
        "KillMode": "process",
        "OOMPolicy": "continue",
        "RuntimeDirectory": "orchestrator",
        "RuntimeDirectoryPreserve": "yes",
        "StateDirectory": "orchestrator",
        "UMask": "0077",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert "ORCHESTRATOR__LOGGING__FORMAT=json" in shlex.split(service["Environment"])
    # A user namespace would turn every client's uid into "nobody" for SO_PEERCRED.
    assert service.get("PrivateUsers", "no") == "no"


def test_the_socket_unit_listens_where_the_service_would_bind() -> None:
    service = read_unit(SERVICE)["Service"]
    sock = read_unit(SOCKET_UNIT)["Socket"]
    # What the daemon derives from systemd's RuntimeDirectory= and StateDirectory= (%t = /run).
    environ = {
        "RUNTIME_DIRECTORY": f"/run/{service['RuntimeDirectory']}",
        "STATE_DIRECTORY": f"/var/lib/{service['StateDirectory']}",
    }
    defaults = settings.load(environ=environ).settings
    assert sock["ListenStream"].replace("%t", "/run") == str(defaults.server.socket_path)
    assert defaults.store.path == Path("/var/lib/orchestrator/orchestrator.db")
    assert (sock["SocketGroup"], sock["SocketMode"]) == (service["Group"], "0660")
    assert sock["DirectoryMode"] == service["RuntimeDirectoryMode"]
    assert sock.get("Accept", "no") == "no"


# -- the notify protocol -----------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: a datagram socket collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[list[str]] = []

    def receive(self, timeout_s: float = STARTUP_TIMEOUT_S) -> list[str]:
        """The next message's `KEY=VALUE` lines (fails after `timeout_s`)."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"no notify message in {timeout_s}s; so far: {self.received}")
        lines = data.decode().splitlines()
        self.received.append(lines)
        return lines

    def receive_until(self, line: str, timeout_s: float = STARTUP_TIMEOUT_S) -> list[list[str]]:
        """Every message up to and including the first one holding `line`."""
        deadline = time.monotonic() + timeout_s
        messages = []
        while True:
            messages.append(self.receive(max(deadline - time.monotonic(), 0.01)))
            if line in messages[-1]:
                return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(short_tmp / "notify")
    yield listener
    listener.close()


def notified_daemon(root: Path, notify: NotifySocket, **env: str) -> DaemonProcess:
    daemon = DaemonProcess(root, {"NOTIFY_SOCKET": str(notify.path), **env})
    if "WATCHDOG_PID" not in env:
        daemon.env.pop("WATCHDOG_PID", None)  # the test itself may run under a watchdog
    return daemon


def test_ready_comes_after_the_socket_listens_then_watchdog_pings_then_stopping(
    short_tmp: Path, notify_socket: NotifySocket
) -> None:
    # WATCHDOG_USEC=0.4 s: the daemon pings every 0.2 s.
    daemon = notified_daemon(short_tmp, notify_socket, WATCHDOG_USEC="400000")
    try:
        daemon.start(wait=False)
        first = notify_socket.receive()
        assert "READY=1" in first, notify_socket.received
        # No retry: READY=1 promises that the socket already accepts connections.
        with SyncClient(daemon.socket_path, timeout_s=10) as client:
            assert client.call("ping")["pong"] is True

        watchdog = [m for m in notify_socket.receive_until("WATCHDOG=1") if "WATCHDOG=1" in m]
        while len(watchdog) < 3:
            watchdog.append(notify_socket.receive(timeout_s=10))
            assert "WATCHDOG=1" in watchdog[-1], notify_socket.received
        statuses = [
            line for m in notify_socket.received for line in m if line.startswith("STATUS=")
        ]
        assert len(statuses) >= 4  # one with READY=1, one with each watchdog ping
        assert all(status.startswith("STATUS=ready; local: ") for status in statuses), statuses

        daemon.send_signal(signal.SIGTERM)
        notify_socket.receive_until("STOPPING=1")
        assert daemon.wait_exit() == 0, daemon.log()
    finally:
        daemon.close()


def test_no_watchdog_pings_when_the_watchdog_is_meant_for_another_process(
    short_tmp: Path, notify_socket: NotifySocket
) -> None:
    daemon = notified_daemon(
        short_tmp, notify_socket, WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid())
    )
    try:
        daemon.start(wait=False)
        assert "READY=1" in notify_socket.receive()
        time.sleep(1.0)  # five would-be watchdog intervals: a window, not an assertion
        daemon.send_signal(signal.SIGTERM)
        messages = notify_socket.receive_until("STOPPING=1")
        assert not [m for m in messages if "WATCHDOG=1" in m], messages
        assert daemon.wait_exit() == 0, daemon.log()
    finally:
        daemon.close()


# -- socket activation -------------------------------------------------------------------------

# What systemd (and systemd-socket-activate) does: bind and listen, put the socket on fd 3,
# set LISTEN_FDS=1 and LISTEN_PID to the pid that will run the daemon, exec it.
_FD3_WRAPPER = """\
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
sock.listen(64)
if sock.fileno() == 3:
    os.set_inheritable(3, True)
else:
    os.dup2(sock.fileno(), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "orchestrator", "serve"])
"""


def systemd_socket_activate(sock_path: Path, env: Mapping[str, str]) -> list[str]:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    # It passes on only TERM, PATH, USER and HOME of its own environment: the rest goes in -E.
    setenv = [f"-E{name}={value}" for name, value in env.items()]
    return [tool, "-l", str(sock_path), *setenv, sys.executable, "-m", "orchestrator", "serve"]


def fd3_wrapper(sock_path: Path, env: Mapping[str, str]) -> list[str]:
    return [sys.executable, "-c", _FD3_WRAPPER, str(sock_path)]


@pytest.mark.parametrize("launcher", [systemd_socket_activate, fd3_wrapper])
def test_socket_activation_serves_on_the_inherited_socket_without_rebinding(
    short_tmp: Path, launcher: Callable[[Path, Mapping[str, str]], list[str]]
) -> None:
    sock_path = short_tmp / "o.sock"
    daemon_env = {
        "ORCHESTRATOR__SERVER__SOCKET_PATH": str(sock_path),
        "ORCHESTRATOR__STORE__PATH": str(short_tmp / "state" / "o.db"),
        "ORCHESTRATOR__LOGGING__FORMAT": "json",
    }
    log_path = short_tmp / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            launcher(sock_path, daemon_env),
            env={**environ(), **daemon_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        # Connect as soon as the launcher listens: the connection waits in the backlog while
        # the daemon starts (systemd-socket-activate only execs it on that first connection).
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                client = SyncClient(sock_path, timeout_s=30).connect()
                break
            except errors.DaemonUnreachable:  # not bound yet, or bound but not listening yet
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.02)
        inode = sock_path.stat().st_ino
        try:
            assert client.call("ping")["pong"] is True
            job = client.submit({"command": ["sh", "-c", "exit 0"], "cwd": str(short_tmp)})
            assert client.wait(job["id"])["state"] == "SUCCEEDED"
        finally:
            client.close()

        assert sock_path.stat().st_ino == inode  # the daemon did not bind a socket of its own
        assert [p.name for p in short_tmp.iterdir() if p.is_socket()] == ["o.sock"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log_path.read_text()
        # Nor did it unlink the socket it was given: that belongs to whoever bound it.
        assert sock_path.stat().st_ino == inode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the container image -----------------------------------------------------------------------

DOCKERFILE_INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends with a continuation"
    return instructions


def exec_form(args: str) -> list[str]:
    """An exec-form (JSON array) argument list; shell form is refused."""
    value = json.loads(args)
    assert isinstance(value, list), args
    assert all(isinstance(item, str) for item in value), args
    return value


class Image:
    """What `docker run` would use from the Dockerfile."""

    def __init__(self, path: Path) -> None:
        self.instructions = dockerfile_instructions(path)
        self.env: dict[str, str] = {}
        self.volumes: list[str] = []
        for keyword, args in self.instructions:
            if keyword == "ENV":
                for pair in shlex.split(args):
                    name, sep, value = pair.partition("=")
                    assert sep, f"ENV {args}: use NAME=VALUE"
                    self.env[name] = value
            elif keyword == "VOLUME":
                self.volumes += exec_form(args) if args.startswith("[") else args.split()

    def last(self, keyword: str) -> str:
        found = [args for kw, args in self.instructions if kw == keyword]
        assert found, f"no {keyword} in the Dockerfile"
        return found[-1]

    def command(self) -> list[str]:
        return exec_form(self.last("ENTRYPOINT")) + exec_form(self.last("CMD"))

    def healthcheck(self) -> list[str]:
        options, cmd, args = self.last("HEALTHCHECK").partition("CMD ")
        assert cmd, "HEALTHCHECK without CMD"
        assert all(opt.startswith("--") for opt in options.split()), options
        return exec_form(args)


def test_the_dockerfile_parses() -> None:
    image = Image(DOCKERFILE)
    keywords = [keyword for keyword, _ in image.instructions]
    assert set(keywords) <= DOCKERFILE_INSTRUCTIONS, set(keywords) - DOCKERFILE_INSTRUCTIONS
    assert keywords[0] == "FROM"
    assert image.last("FROM") == "python:3.11-slim"
    assert image.command() == ["tini", "--", "orchestrator", "serve"]
    assert image.healthcheck() == ["orchestrator", "ping"]
    assert image.last("STOPSIGNAL") == "SIGTERM"
    assert image.last("USER").partition(":")[0] not in ("root", "0")
    assert sorted(image.volumes) == ["/run/orchestrator", "/var/lib/orchestrator"]
    assert {
        "ORCHESTRATOR__SERVER__SOCKET_PATH": "/run/orchestrator/orchestrator.sock",
        "ORCHESTRATOR__STORE__PATH": "/var/lib/orchestrator/orchestrator.db",
        "ORCHESTRATOR__LOGGING__FORMAT": "json",
    }.items() <= image.env.items()
    # The sources it copies are in the build context (the repository root).
    for args in (args for keyword, args in image.instructions if keyword == "COPY"):
        for source in shlex.split(args)[:-1]:
            assert (REPO / source).exists(), source
    # Its settings are valid settings.
    settings.load(environ=image.env)


def test_the_image_commands_work_as_written_outside_a_container(short_tmp: Path) -> None:
    image = Image(DOCKERFILE)
    # Adapted to this machine: the image's directories under a temporary one, its socket group
    # (the image's own gid, which the daemon admits) this process's, its PATH this virtualenv's.
    env = environ()
    for name, value in image.env.items():
        value = value.replace("/var/lib/orchestrator", str(short_tmp / "state"))
        value = value.replace("/run/orchestrator", str(short_tmp / "run"))
        env[name] = str(os.getgid()) if name == "ORCHESTRATOR__SERVER__ALLOWED_GIDS" else value
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    command = image.command()
    if command[:2] == ["tini", "--"] and shutil.which("tini", path=env["PATH"]) is None:
        command = command[2:]  # no tini here: the daemon itself gets the signal
    socket_path = Path(env["ORCHESTRATOR__SERVER__SOCKET_PATH"])

    log_path = short_tmp / "container.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=short_tmp, stdout=log, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                with SyncClient(socket_path, timeout_s=10) as client:
                    client.call("ping")
                    break
            except errors.DaemonUnreachable:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.02)

        healthy = run(image.healthcheck(), env=env, cwd=short_tmp)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.startswith("orchestrator ")

        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends, per STOPSIGNAL
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr
        events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
        # Before it only the local backend's lines: how jobs are contained (cgroups, or not),
        # what they cannot see, the keeper it started and connected to.
        before = events[: events.index("daemon.ready")]
        assert {e for e in before if not e.startswith("local.")} == set(), before
        assert "local.keeper_connected" in before
        assert events[-1] == "daemon.stopped"

        unhealthy = run(image.healthcheck(), env=env, cwd=short_tmp)
        assert unhealthy.returncode == 3, unhealthy.stderr
        assert str(socket_path) in unhealthy.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- what a plain `pip install .` brings -------------------------------------------------------


def third_party_imports(package: Path) -> set[str]:
    names: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {package.name}


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions `pip install` brings for `requirements`, as installed here."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += importlib.metadata.distribution(name).requires or []
    return seen


def test_a_plain_install_brings_everything_the_package_imports() -> None:
    with (REPO / "pyproject.toml").open("rb") as fh:
        declared = tomllib.load(fh)["project"]["dependencies"]
    installed = installed_closure(declared)
    providers = importlib.metadata.packages_distributions()
    missing = {
        module
        for module in third_party_imports(REPO / "orchestrator")
        if not {canonicalize_name(dist) for dist in providers.get(module, [])} & installed
    }
    assert not missing, f"imported but not brought by [project].dependencies: {sorted(missing)}"


# -- several hosts on one PostgreSQL (issue #16) -----------------------------------------------

POSTGRESQL_DROP_IN = REPO / "deploy" / "systemd" / "postgresql.conf"
COMPOSE = REPO / "deploy" / "cluster" / "compose.yaml"


@needs_systemd_analyze
def test_the_postgresql_drop_in_passes_verify_and_exposes_nothing_more(tmp_path: Path) -> None:
    service = SERVICE.read_text().replace(
        "/usr/local/bin/orchestrator", str(VENV_BIN / "orchestrator")
    )
    (tmp_path / SERVICE.name).write_text(service)
    (tmp_path / f"{SERVICE.name}.d").mkdir()
    shutil.copy(POSTGRESQL_DROP_IN, tmp_path / f"{SERVICE.name}.d" / POSTGRESQL_DROP_IN.name)
    result = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / SERVICE.name)])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    root = with_drop_in(tmp_path / "root", POSTGRESQL_DROP_IN)
    security = ["systemd-analyze", "security", "--offline=true", "--threshold=20"]
    with_it = run([*security, f"--root={root}", SERVICE.name])
    plain = run([*security, str(SERVICE)])
    assert with_it.returncode == 0, with_it.stdout
    assert exposures(with_it.stdout) == exposures(plain.stdout)
    unit = read_unit(POSTGRESQL_DROP_IN)
    assert unit["Service"]["EnvironmentFile"] == "/etc/orchestrator/store.env"  # 0600, root's
    assert "network-online.target" in unit["Unit"]["After"]


def test_the_compose_file_runs_three_daemons_with_valid_settings_on_one_database() -> None:
    import yaml  # type: ignore[import-untyped]  # (no stubs installed)

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    db = services.pop("db")
    daemons = {name: s for name, s in services.items() if s.get("image") == "orchestrator"}
    assert sorted(daemons) == ["h1", "h2", "h3"]
    nodes, volumes = set(), set()
    for name, service in daemons.items():
        env = {k: str(v) for k, v in service["environment"].items()}
        loaded = settings.load(None, environ=env).settings  # every key a setting, valid
        assert loaded.cluster.node == name
        nodes.add(loaded.cluster.node)
        url = loaded.store.url or ""
        user, password, database = (
            db["environment"][k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")
        )
        assert url == f"postgresql://{user}:{password}@db/{database}"
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
        mounts = dict(volume.split(":") for volume in service["volumes"])
        assert set(mounts.values()) == {"/var/lib/orchestrator", "/run/orchestrator"}
        volumes |= set(mounts)
    assert len(nodes) == 3
    assert len(volumes) == 6  # each daemon its own state and socket: none shared but the database
    assert set(compose["volumes"]) == volumes | {"db"}
