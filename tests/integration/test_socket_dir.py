"""The socket's directory on a shared host: another user who made it first, or who can write
it, must get neither the daemon's socket nor a client's request (issue 11, item 1).

The squatter is real: a directory made by uid 65534 (`setpriv`). The default path is steered
into the test's own directory with TMPDIR (XDG_RUNTIME_DIR unset), which is made sticky and
world-writable like /tmp.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from orchestrator import errors, socketdir
from orchestrator.client import Client, SyncClient
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
SECRET = "AWS_SECRET_ACCESS_KEY=hunter2-do-not-leak"
as_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as another uid",
)


@pytest.fixture
def tmp_like(short_tmp: Path) -> Path:
    """A directory like /tmp: root's, sticky, writable by everyone."""
    os.chmod(short_tmp, 0o1777)
    return short_tmp


def default_dir(base: Path) -> Path:
    return base / f"orchestrator-{os.geteuid()}"


def default_path_env(base: Path, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` changed so that the per-user default socket path is under `base`."""
    unset = ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY", "ORCHESTRATOR__SERVER__SOCKET_PATH")
    return {**{k: v for k, v in env.items() if k not in unset}, "TMPDIR": str(base)}


def as_nobody(*argv: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        check=True,
        timeout=30,
    )


def serve_on_default_path(base: Path) -> DaemonProcess:
    """`orchestrator serve` with no socket configured (its store under `base`/state)."""
    proc = DaemonProcess(base)
    proc.env = default_path_env(base, proc.env)
    proc.socket_path = default_dir(base) / "orchestrator.sock"
    return proc


def refused_start(proc: DaemonProcess) -> str:
    """Start the daemon, expect exit 2, return its log."""
    proc.start(wait=False)
    try:
        assert proc.wait_exit(timeout_s=30) == 2, proc.log()
    finally:
        proc.close()
    return proc.log()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


# -- the daemon --------------------------------------------------------------------------------


@as_root
def test_serve_refuses_a_default_directory_squatted_by_another_user(tmp_like: Path) -> None:
    squatted = default_dir(tmp_like)
    as_nobody("mkdir", "-m", "0777", str(squatted))
    proc = serve_on_default_path(tmp_like)
    log = refused_start(proc)
    assert f"refusing the socket directory {squatted}" in log
    assert f"owner uid {NOBODY}, mode 0777" in log
    assert os.listdir(squatted) == []  # nothing bound there, not even for an instant
    assert not proc.store_path.exists()  # refused before the store (or any job) was touched


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o702])
def test_serve_refuses_its_own_directory_when_others_can_write_it(
    tmp_like: Path, mode: int
) -> None:
    own = default_dir(tmp_like)
    own.mkdir()
    os.chmod(own, mode)
    log = refused_start(serve_on_default_path(tmp_like))
    assert f"refusing the socket directory {own}: group or others can write it" in log
    assert f"owner uid {os.geteuid()}, mode {mode:04o}" in log
    assert os.listdir(own) == []


def test_serve_refuses_a_world_writable_sticky_directory_like_tmp_as_the_sockets_own(
    tmp_like: Path,
) -> None:
    proc = DaemonProcess(tmp_like)  # socket_path = tmp_like/o.sock: directly in a /tmp
    log = refused_start(proc)
    assert f"refusing the socket directory {tmp_like}: group or others can write it" in log
    assert not proc.socket_path.exists()


def test_serve_refuses_a_symlink_as_the_socket_directory(tmp_like: Path) -> None:
    good = tmp_like / "good"
    good.mkdir(mode=0o700)
    default_dir(tmp_like).symlink_to(good)
    log = refused_start(serve_on_default_path(tmp_like))
    assert f"refusing the socket directory {default_dir(tmp_like)}: it is a symlink" in log
    assert os.listdir(good) == []


def test_serve_creates_a_missing_default_directory_0700_and_clients_use_it(
    tmp_like: Path,
) -> None:
    proc = serve_on_default_path(tmp_like)
    proc.start()
    try:
        st = os.lstat(default_dir(tmp_like))
        assert (stat.S_ISDIR(st.st_mode), st.st_uid, stat.S_IMODE(st.st_mode)) == (
            True,
            os.geteuid(),
            0o700,
        )
        ping = cli(default_path_env(tmp_like), "ping")
        assert ping.returncode == 0, ping.stderr
    finally:
        proc.stop()


@pytest.mark.parametrize("mode", [0o750, 0o755])
def test_serve_accepts_an_operator_directory_others_can_read_but_not_write(
    short_tmp: Path, mode: int
) -> None:
    run_dir = short_tmp / "run"
    run_dir.mkdir()
    os.chmod(run_dir, mode)
    proc = DaemonProcess(short_tmp, {"ORCHESTRATOR__SERVER__SOCKET_PATH": str(run_dir / "o.sock")})
    proc.socket_path = run_dir / "o.sock"
    proc.start()
    try:
        with proc.client() as client:
            assert client.call("ping")["pong"] is True
    finally:
        proc.stop()


# -- a client on the default path --------------------------------------------------------------


class Squatter:
    """A listening socket planted in a squatted directory; records every byte it is sent."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.connections = 0
        self.received = bytearray()
        self._thread = threading.Thread(target=self._serve, name="squatter", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # shut down
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    while b"\n" not in self.received and (data := conn.recv(65536)):
                        self.received += data
                except OSError:
                    pass
                # Then hang up, as a squatter who got what it wanted (a fake id, here: nothing).

    def close(self) -> None:
        """Stop listening and wait for the thread (again: a no-op)."""
        if self.sock.fileno() < 0:
            return
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._thread.join(10)
        self.sock.close()


@pytest.fixture
def squatter(tmp_like: Path) -> Iterator[Squatter]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another uid")
    squatted = default_dir(tmp_like)
    as_nobody("mkdir", "-m", "0777", str(squatted))
    planted = Squatter(squatted / "orchestrator.sock")
    yield planted
    planted.close()


@pytest.mark.parametrize("args", [("submit", "--env", SECRET, "--", "true"), ("ping",)])
def test_the_cli_refuses_a_squatted_default_directory_before_sending_anything(
    tmp_like: Path, squatter: Squatter, args: tuple[str, ...]
) -> None:
    result = cli(default_path_env(tmp_like), *args)
    squatter.close()
    assert (squatter.connections, bytes(squatter.received)) == (0, b"")
    assert result.returncode == 2, result.stderr
    assert f"refusing the socket directory {default_dir(tmp_like)}" in result.stderr
    assert f"owner uid {NOBODY}, mode 0777" in result.stderr


async def test_python_clients_refuse_a_squatted_default_directory(
    tmp_like: Path, squatter: Squatter, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY", "ORCHESTRATOR__SERVER__SOCKET_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_like))
    with pytest.raises(errors.UnsafeSocketDirectory, match=str(default_dir(tmp_like))):
        SyncClient(timeout_s=5).connect()
    with pytest.raises(errors.UnsafeSocketDirectory, match=str(default_dir(tmp_like))):
        await Client().connect()
    squatter.close()
    assert (squatter.connections, bytes(squatter.received)) == (0, b"")


# -- the rule itself ---------------------------------------------------------------------------


def test_ensure_creates_a_missing_directory_0700_whatever_the_umask(short_tmp: Path) -> None:
    old = os.umask(0)
    try:
        socketdir.ensure(short_tmp / "a" / "run")
    finally:
        os.umask(old)
    st = os.lstat(short_tmp / "a" / "run")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o700)
    assert stat.S_IMODE(os.lstat(short_tmp / "a").st_mode) == 0o755  # not 0777: group, others


def test_check_refuses_what_is_not_a_directory_and_a_missing_one(short_tmp: Path) -> None:
    (short_tmp / "file").write_text("")
    with pytest.raises(errors.UnsafeSocketDirectory, match="not a directory"):
        socketdir.check(short_tmp / "file")
    with pytest.raises(FileNotFoundError):
        socketdir.check(short_tmp / "missing")


@as_root
def test_check_refuses_a_directory_owned_by_another_user_even_0700(short_tmp: Path) -> None:
    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(errors.UnsafeSocketDirectory, match=f"owner uid {NOBODY}, mode 0700"):
        socketdir.check(theirs)


def test_check_refuses_a_directory_under_one_others_can_write_unless_sticky(
    short_tmp: Path,
) -> None:
    above = short_tmp / "shared"
    (above / "run").mkdir(parents=True, mode=0o700)
    os.chmod(above, 0o777)
    with pytest.raises(errors.UnsafeSocketDirectory, match="they can rename the directory away"):
        socketdir.check(above / "run")
    os.chmod(above, 0o1777)  # sticky: others cannot rename or remove what is ours
    socketdir.check(above / "run")


@as_root
def test_check_refuses_a_directory_under_one_another_user_owns(short_tmp: Path) -> None:
    above = short_tmp / "theirs"
    (above / "run").mkdir(parents=True, mode=0o700)
    os.chown(above, NOBODY, NOBODY)
    with pytest.raises(errors.UnsafeSocketDirectory, match=f"{above}, above it, belongs"):
        socketdir.check(above / "run")
