"""The live views in a real terminal: `serve` (TUI on) and `status` inside tmux, read with capture-pane.

tmux runs on its own socket with no config; each command ends with `echo EXIT=$?` so its pane keeps
the exit status on screen. Keys go in with send-keys, as a user would type them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.serve_support import REPO_ROOT, complete, wait_gone
from tests.support import RpcWorker

pytestmark = [pytest.mark.llama, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]

# `status` through the real app; registered here until cli.py registers it itself.
STATUS_SHIM = """\
from llamalaunch.cli import app
from llamalaunch import cli_status
if not any(command.name == "status" for command in app.registered_commands):
    cli_status.register(app)
app(prog_name="llamalaunch")
"""


class Tmux:
    """One private tmux server; windows by name."""

    def __init__(self, env: dict[str, str]) -> None:
        self.socket = f"llamalaunch-test-{uuid.uuid4().hex[:8]}"
        self.env = env
        self.session: str | None = None

    def _tmux(self, *args: str) -> str:
        # The tmux server passes its first client's environment on to the panes; a COLUMNS/LINES there
        # (pytest's) would fix rich's idea of the terminal at 80x24 whatever the pane's real size.
        env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
        result = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                                text=True, timeout=10, check=True, env=env)
        return result.stdout

    def window(self, name: str, command: str) -> None:
        shell = f"cd {shlex.quote(str(REPO_ROOT))} && {command}; echo EXIT=$?; sleep 600"
        env_args = [arg for key, value in self.env.items() for arg in ("-e", f"{key}={value}")]
        if self.session is None:
            self.session = "t"
            self._tmux("new-session", "-d", "-s", self.session, "-n", name, "-x", "140", "-y", "50", *env_args, shell)
        else:
            self._tmux("new-window", "-t", self.session, "-n", name, *env_args, shell)

    def screen(self, name: str) -> str:
        return self._tmux("capture-pane", "-p", "-t", f"{self.session}:{name}")

    def keys(self, name: str, *keys: str) -> None:
        self._tmux("send-keys", "-t", f"{self.session}:{name}", *keys)

    def wait_for(self, name: str, pattern: str, timeout_s: float = 30.0) -> str:
        regex = re.compile(pattern, re.MULTILINE | re.DOTALL)
        deadline = time.monotonic() + timeout_s
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(name)
            if regex.search(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"no /{pattern}/ in window {name} after {timeout_s} s:\n{screen}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False)
        folder = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (folder / self.socket).unlink(missing_ok=True)  # tmux leaves the socket file behind


@pytest.fixture
def tmux(tmp_path: Path, llama_bin_dir: Path) -> Iterator[Tmux]:
    home = Path(os.environ["LLAMALAUNCH_HOME"])
    env = {"LLAMALAUNCH_HOME": str(home), "LLAMALAUNCH_CACHE": os.environ["LLAMALAUNCH_CACHE"],
           "LLAMALAUNCH_LLAMA_SERVER": str(llama_bin_dir / "llama-server"), "TERM": "xterm-256color",
           "PYTHONPATH": str(REPO_ROOT)}
    session = Tmux(env)
    yield session
    session.kill()  # SIGHUP to the panes: serve stops its server
    for path in (home / "state").glob("*.json"):  # whatever a failed test left behind
        _kill_server(json.loads(path.read_text()).get("child_pid"))


def _kill_server(pid: int | None) -> None:
    if pid is None or not wait_gone(pid, 5):
        try:
            process = psutil.Process(pid)
            if process.name() == "llama-server":
                process.kill()
        except (psutil.NoSuchProcess, TypeError, ValueError):
            pass


def _state(name: str) -> dict[str, object]:
    path = Path(os.environ["LLAMALAUNCH_HOME"]) / "state" / f"{name}.json"
    return dict(json.loads(path.read_text()))


def test_serve_and_status_in_a_terminal(tmux: Tmux, rpc_workers: Callable[..., RpcWorker], tmp_path: Path) -> None:
    first, second = rpc_workers(), rpc_workers()
    python = shlex.quote(sys.executable)
    tmux.window("serve", f"{python} -m llamalaunch serve --demo --name tui --ctx 4k --port 0 "
                         f"--rpc {first.endpoint},{second.endpoint}")
    screen = tmux.wait_for("serve", r"● ready.*RPC1.*q stop the server", timeout_s=60)
    state = _state("tui")
    layers = {d["name"]: d["n_layers"] for d in state["plan"]["devices"]}  # type: ignore[index]
    for name, count in layers.items():
        assert re.search(rf"^{name}\s+{count}\s", screen, re.MULTILINE), screen

    complete(str(state["url"]), n_predict=16)
    shim = tmp_path / "status_shim.py"
    shim.write_text(STATUS_SHIM)
    tmux.window("status", f"{python} {shim} status --name tui")
    screen = tmux.wait_for("status", r"last request [\d.,]+ / [\d.,]+.*q quit")
    assert "● ready" in screen and "tui" in screen and "tok/s" in screen
    for name, count in layers.items():
        assert re.search(rf"^{name}\s+{count}\s", screen, re.MULTILINE), screen
    assert "╭─ log" in screen

    tmux.keys("status", "l")
    screen = tmux.wait_for("status", r"l log pane on")
    assert "╭─ log" not in screen
    tmux.keys("status", "q")
    tmux.wait_for("status", r"^EXIT=0$", timeout_s=10)

    server_pid = int(str(state["child_pid"]))
    tmux.keys("serve", "q")  # a stop the user asked for: said as such, and a success (not 130, as Ctrl-C)
    screen = tmux.wait_for("serve", r"^EXIT=0$", timeout_s=30)
    assert "stopped" in screen and "server gone" in screen  # its last frame stays on the screen
    assert "stopping q pressed" in screen and "SIGINT" not in screen, screen
    assert wait_gone(server_pid, 5)
    assert _state("tui")["phase"] == "stopped"
