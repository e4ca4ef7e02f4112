"""`orchestrator top` as a person sees it: in a real terminal (a tmux pane on a tmux server of
the test's own, its socket in the test's directory: `-S`), against `orchestrator serve`, read
off the screen (`capture-pane`). And without a terminal: refused, with the way to follow jobs
from a script."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.timeout(120)
needs_tmux = pytest.mark.skipif(
    TMUX is None, reason="tmux is not installed (apt-get install tmux): top needs a terminal"
)
SCREEN_TIMEOUT_S = 20.0
HINT = (
    'orchestrator top needs a terminal; use "orchestrator watch --json" to follow jobs from a '
    "script"
)


class Terminal:
    """A 160x45 tmux pane, on a tmux server of its own (never anyone else's tmux; its socket
    goes with the test's directory)."""

    def __init__(self, root: Path) -> None:
        assert TMUX is not None
        self.tmux = TMUX
        self.server = str(root / "tmux.sock")

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [self.tmux, "-S", self.server, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-s", "top", "-x", "160", "-y", "45", command)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def press(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def until(self, what: str, ready: Callable[[str], bool]) -> str:
        """The screen, once `ready` says it shows `what` (polled, with a deadline)."""
        deadline = time.monotonic() + SCREEN_TIMEOUT_S
        while True:
            screen = self.screen()
            if ready(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {what}; it shows:\n{screen}")
            time.sleep(0.05)

    def showing(self, *texts: str) -> str:
        return self.until(repr(texts), lambda screen: all(t in screen for t in texts))

    def pane_pid(self) -> int:
        return int(self.run("display-message", "-p", "-t", "top", "#{pane_pid}").strip())

    def kill(self) -> None:
        subprocess.run(
            [self.tmux, "-S", self.server, "kill-server"], capture_output=True, check=False
        )


@pytest.fixture
def jobs(daemon: DaemonProcess) -> Iterator[dict[str, str]]:
    """`sleeper` RUNNING, `breaks` FAILED (exit 3); the sleeper is cancelled at the end."""
    with daemon.client() as client:
        sleeper = client.submit({"command": ["sleep", "60"], "name": "sleeper", "cwd": "/"})
        breaks = client.submit({"command": ["sh", "-c", "exit 3"], "name": "breaks", "cwd": "/"})
        assert client.wait(breaks["id"])["state"] == "FAILED"
        deadline = time.monotonic() + SCREEN_TIMEOUT_S
        while client.get(sleeper["id"])["state"] != "RUNNING":
            assert time.monotonic() < deadline, "the sleeper never ran"
            time.sleep(0.05)
    yield {"sleeper": sleeper["id"], "breaks": breaks["id"]}
    if daemon.proc is not None and daemon.proc.poll() is None:
        with daemon.client() as client:
            client.cancel(sleeper["id"])
            client.wait(sleeper["id"])


@pytest.fixture
def terminal(short_tmp: Path) -> Iterator[Terminal]:
    term = Terminal(short_tmp)
    yield term
    term.kill()


def _top_script(root: Path, daemon: DaemonProcess) -> str:
    """A shell in the pane: the terminal's modes before and after `top`, and its exit status
    (left on the screen: the pane stays until the test ends)."""
    script = root / "run-top.sh"
    q = shlex.quote
    script.write_text(
        f"stty -a > {q(str(root / 'before.txt'))}\n"
        f"{q(sys.executable)} -m orchestrator top --socket {q(str(daemon.socket_path))}\n"
        'echo "top exited $?"\n'
        f"stty -a > {q(str(root / 'after.tmp'))}\n"
        f"mv {q(str(root / 'after.tmp'))} {q(str(root / 'after.txt'))}\n"
        "exec sleep 600\n"
    )
    return f"sh {q(str(script))}"


def _line_with(screen: str, text: str) -> str:
    (line,) = [line for line in screen.splitlines() if text in line]
    return line


@needs_tmux
def test_top_shows_the_daemon_filters_on_keys_and_gives_the_terminal_back(
    daemon: DaemonProcess, jobs: dict[str, str], terminal: Terminal, short_tmp: Path
) -> None:
    terminal.start(_top_script(short_tmp, daemon))
    screen = terminal.showing("sleeper", "breaks", "health: ok")
    # The counts, the running job, the failure with its class and reason, the lanes, the keys.
    assert "RUNNING 1" in screen
    assert "FAILED 1" in screen
    assert "SUCCEEDED 0" in screen
    sleeper = _line_with(screen, "sleeper")
    assert jobs["sleeper"] in sleeper
    assert "RUNNING" in sleeper
    assert "local" in sleeper
    breaks = _line_with(screen, "breaks")
    assert jobs["breaks"] in breaks
    assert breaks.split()[2:5] == ["FAILED", "user", "3"]  # │ id state class exit ...
    assert "exit code 3" in breaks
    assert "local  1 in flight  0 queued" in screen
    assert "unfinished jobs, newest first: 1" in screen
    assert "AWS: 0.0 calls/s" in screen
    assert " q  quit " in screen
    assert "s  state: unfinished" in screen

    # `s` cycles the state filter: QUEUED first (none), ..., RUNNING (the sleeper).
    terminal.press("s")
    screen = terminal.showing("QUEUED jobs, newest first: 0", "s  state: QUEUED")
    assert "sleeper" not in screen
    assert "breaks" in screen  # the failures are not filtered by state
    terminal.press("s", "s", "s", "s", "s")
    screen = terminal.showing("RUNNING jobs, newest first: 1", "sleeper")
    terminal.press("b")
    terminal.showing("RUNNING jobs on local", "b  backend: local")
    terminal.press("a")
    terminal.showing("unfinished jobs, newest first: 1", "b  backend: all")

    # The daemon goes away (its local jobs keep running): said, retried, and back.
    assert daemon.stop() == 0
    screen = terminal.showing("daemon unreachable — retrying")
    assert str(daemon.socket_path) in screen
    daemon.start()
    terminal.showing("sleeper", "health: ok")

    terminal.press("q")
    screen = terminal.showing("top exited 0")
    assert "sleeper" not in screen  # the full screen is gone
    before = (short_tmp / "before.txt").read_text()
    terminal.until("the modes after", lambda _: (short_tmp / "after.txt").exists())
    assert (short_tmp / "after.txt").read_text() == before  # echo, icanon: all as they were


@needs_tmux
def test_sigterm_ends_top_with_the_terminal_given_back(
    daemon: DaemonProcess, jobs: dict[str, str], terminal: Terminal, short_tmp: Path
) -> None:
    terminal.start(_top_script(short_tmp, daemon))
    terminal.showing("sleeper", "health: ok")
    shell = terminal.pane_pid()
    (top_pid,) = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
    os.kill(int(top_pid), signal.SIGTERM)
    terminal.showing("top exited 143")
    terminal.until("the modes after", lambda _: (short_tmp / "after.txt").exists())
    assert (short_tmp / "after.txt").read_text() == (short_tmp / "before.txt").read_text()


def test_without_a_terminal_top_refuses_and_points_to_watch_json(short_tmp: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "top", "--socket", str(short_tmp / "o.sock")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (2, "", HINT + "\n")
