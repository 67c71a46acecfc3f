"""What a new user meets first: the port serve listens on, the model's name in the API, set-up that is
quick the second time, and a README that says only what is true."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer

from llamalaunch.cli import app
from llamalaunch.errors import ServeError
from llamalaunch.launch.ports import ANY_PORT, DEFAULT_PORT, pick_port
from tests.serve_support import ServeRun, complete
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
IN_USE_HINT = "(stop what listens there, or pass another --port N, or --port 0 for any free one)"


# --- the port -------------------------------------------------------------------------------------


def listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama-server's own listener
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def leave_time_wait() -> int:
    """A port whose listener is gone but whose last connection waits in TIME_WAIT (the server side
    closed first, as llama-server does when it stops)."""
    with listener() as server:
        port = int(server.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()
        client.recv(1)  # the FIN arrived
        client.close()
    return port


def test_a_port_in_time_wait_is_accepted_as_llama_server_accepts_it() -> None:
    port = leave_time_wait()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the TIME_WAIT is real: a bind without SO_REUSEADDR is refused
    assert pick_port("127.0.0.1", port) == port


def test_a_port_really_in_use_is_refused() -> None:
    with listener() as server:
        port = int(server.getsockname()[1])
        for host in ("127.0.0.1", "0.0.0.0", "localhost"):
            with pytest.raises(ServeError) as refused:
                pick_port(host, port)
            assert str(refused.value) == \
                f"cannot listen on {host}:{port}: port {port} is in use {IN_USE_HINT}"


def test_port_0_is_any_free_port() -> None:
    port = pick_port("127.0.0.1", ANY_PORT)
    assert port > 0
    with listener(port):
        pass  # it was free


def test_the_default_port_is_llama_servers_own() -> None:
    from llamalaunch.launch.serve import ServeRequest
    from llamalaunch.options import OPTIONS_BY_NAME

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    assert {p.name: p.default for p in serve.params}["port"] == DEFAULT_PORT == ServeRequest().port == 8080
    assert OPTIONS_BY_NAME["port"].bounds == (0, 65535)  # a profile may say 0 too


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT, env=env)


@pytest.mark.llama
def test_serve_on_a_taken_port_says_so_in_one_line(llama_bin_dir: Path, demo_model: Path) -> None:
    with listener() as server:
        port = int(server.getsockname()[1])
        result = run_cli("serve", "--demo", "--no-tui", "--port", str(port), "--llama-server",
                         str(llama_bin_dir / "llama-server"))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: port {port} is in use {IN_USE_HINT}\n"


@pytest.mark.llama
def test_serve_by_default_wants_8080_and_says_how_to_choose_another(llama_bin_dir: Path,
                                                                   demo_model: Path) -> None:
    try:
        held = listener(DEFAULT_PORT)
    except OSError:
        pytest.skip("something else listens on 8080")
    with held:
        result = run_cli("serve", "--demo", "--no-tui", "--llama-server", str(llama_bin_dir / "llama-server"))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: cannot listen on 127.0.0.1:8080: port 8080 is in use {IN_USE_HINT}\n"


# --- the model's name in the API, and a restart on the same port -------------------------------------


def model_ids(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        return [model["id"] for model in json.loads(response.read())["data"]]


@pytest.mark.llama
def test_the_model_is_named_by_its_file_and_a_restart_gets_the_same_port(
        serve: Callable[..., ServeRun], demo_model: Path) -> None:
    port = free_port()
    first = serve(demo_model, "--ctx", "1k", "--port", str(port), name="first")
    _, url, _ = first.wait_ready(120)
    assert url == f"http://127.0.0.1:{port}"
    assert model_ids(url) == ["SmolLM2-135M-Instruct.Q4_1"]
    complete(url, n_predict=2)  # connections that llama-server closes: TIME_WAIT on its port once it stops
    first.send(2)
    assert first.wait_exit(30) == 130
    # Which side closes first (so which port holds TIME_WAIT) is up to the HTTP stacks: the pre-check's
    # answer to a TIME_WAIT port is tested deterministically in
    # test_a_port_in_time_wait_is_accepted_as_llama_server_accepts_it; here, the restart itself.
    # at once, on the same port; the user's own alias wins
    second = serve(demo_model, "--ctx", "1k", "--port", str(port), name="second", extra=["--alias", "mine"])
    _, url, _ = second.wait_ready(120)
    assert url == f"http://127.0.0.1:{port}"
    assert model_ids(url) == ["mine"]
    second.send(2)
    assert second.wait_exit(30) == 130


# --- set-up ----------------------------------------------------------------------------------------


INSTALL_INPUTS = ("pyproject.toml", "constraints.txt", "llamalaunch/__init__.py")  # a change reinstalls


def fake_venv(tree: Path) -> Path:
    """A venv whose python and llamalaunch only log their arguments: the stamp logic, without pip."""
    log = tree / "calls.log"
    (tree / ".venv" / "bin").mkdir(parents=True)
    for tool in ("python", "llamalaunch"):
        script = tree / ".venv" / "bin" / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >>"{log}"\n')
        script.chmod(0o755)
    return log


@pytest.fixture
def setup_copy(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "llamalaunch").mkdir()
    for name in INSTALL_INPUTS + ("scripts/setup",):
        shutil.copy2(ROOT / name, tmp_path / name)
    yield tmp_path


def run_setup(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tree / "scripts" / "setup")], capture_output=True, text=True, timeout=120)


def pip_calls(log: Path) -> list[str]:
    # installs only: `-m pip --version` is setup's look whether the venv has pip at all
    calls = [line for line in log.read_text().splitlines() if " -m pip install " in line] if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def test_setup_runs_pip_only_when_what_it_installs_changes(setup_copy: Path) -> None:
    if not all(shutil.which(tool) for tool in ("cmake", "c++", "tmux", "prlimit")):
        pytest.skip("the build tools scripts/setup checks for are not installed")
    log = fake_venv(setup_copy)
    first = run_setup(setup_copy)
    assert first.returncode == 0, first.stderr
    assert pip_calls(log) == [
        "python -m pip install --quiet --upgrade --constraint constraints.txt pip",
        "python -m pip install --quiet --constraint constraints.txt --build-constraint constraints.txt "
        "-e .[test]"]
    inputs = b"".join((setup_copy / name).read_bytes() for name in INSTALL_INPUTS)
    stamp = setup_copy / ".venv" / ".llamalaunch-installed"
    assert stamp.read_text() == hashlib.sha256(inputs).hexdigest() + "\n"

    again = run_setup(setup_copy)
    assert (again.returncode, again.stdout, again.stderr, pip_calls(log)) == (0, "", "", [])

    for name in INSTALL_INPUTS:
        with open(setup_copy / name, "a") as changed:
            changed.write("# changed\n")
        assert run_setup(setup_copy).returncode == 0
        assert len(pip_calls(log)) == 2, name


def test_constraints_pin_everything_llamalaunch_needs() -> None:
    """Every package llamalaunch[test] pulls in, however deep, is pinned, and the venv holds that version."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            assert str(requirement.specifier).startswith("=="), f"not pinned: {line}"
            if requirement.marker is None or requirement.marker.evaluate():
                pinned[normal(requirement.name)] = str(requirement.specifier)[2:]
    needed: dict[str, str] = {}
    wanted = [("llamalaunch", frozenset({"test"}))]
    while wanted:
        name, extras = wanted.pop()
        for text in distribution(name).requires or []:
            requirement = Requirement(text)
            if (requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                                  for extra in extras | {""})) \
                    and normal(requirement.name) not in needed:
                needed[normal(requirement.name)] = distribution(requirement.name).version
                wanted.append((requirement.name, frozenset(requirement.extras)))
    assert {"typer", "rich", "numpy", "pytest"} <= needed.keys()
    assert {name: version for name, version in needed.items() if pinned.get(name) != version} == {}
    assert {"pip", "setuptools"} <= pinned.keys()  # the installer and the build backend too


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.llama
def test_a_second_setup_is_quiet_and_quick(llama_bin_dir: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "setup")], capture_output=True, timeout=900, check=True)
    started = time.monotonic()
    again = subprocess.run([str(ROOT / "scripts" / "setup")], capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert took < 30, f"{took:.1f} s"
