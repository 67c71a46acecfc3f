"""Run `python -m llamalaunch serve` as a real subprocess, as a user would, and watch it.

Its output is not a TTY, so it prints plain timestamped lines (`2026-11-25T15:05:25 ready: URL ctx N`);
the run state file and the server log live under the LLAMALAUNCH_HOME each test gets.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_NAME = "llama-server"
_READY = re.compile(r" ready: (?P<url>http://\S+) ctx (?P<ctx>\d+)")
_LAYER = re.compile(r"layer\s+(?P<slot>\d+) assigned to device (?P<device>[^,\s]+)")


@dataclass
class ServeRun:
    """One launcher process; stdout and stderr lines are collected as they come."""

    process: subprocess.Popen[str]
    home: Path
    name: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    servers_seen: set[int] = field(default_factory=set)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            reader = threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _collect(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    # --- output --------------------------------------------------------------------------------

    @property
    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)

    def wait_for_line(self, pattern: str, timeout_s: float = 30.0, after: int = 0) -> tuple[int, re.Match[str]]:
        """The first stdout line from index `after` on that matches; its index and the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for index in range(after, len(self.stdout)):
                    match = regex.search(self.stdout[index])
                    if match:
                        return index, match
                if self._drained():
                    raise AssertionError(f"serve exited ({self.process.returncode}) before /{pattern}/:\n"
                                         f"{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line /{pattern}/ after {timeout_s} s:\n{self.output}")
                self._changed.wait(min(left, 0.2))

    def _drained(self) -> bool:
        """The launcher has exited and every line it wrote has been collected."""
        return self.process.poll() is not None and not any(r.is_alive() for r in self._readers)

    def wait_ready(self, timeout_s: float = 30.0, after: int = 0) -> tuple[int, str, int]:
        """Index of the next `ready` line from `after`, the URL and ctx it names."""
        index, match = self.wait_for_line(_READY.pattern, timeout_s, after)
        self.servers()  # remember it, for cleanup and leftover checks
        return index, match.group("url"), int(match.group("ctx"))

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve still running after {timeout_s} s:\n{self.output}") from None
        for reader in self._readers:
            reader.join(5)  # the last lines
        return code

    # --- files ---------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.home / "state" / f"{self.name}.json"

    @property
    def log_path(self) -> Path:
        return self.home / "state" / f"{self.name}.log"

    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_path.read_text()))

    # --- processes -----------------------------------------------------------------------------

    def servers(self) -> list[psutil.Process]:
        """The launcher's llama-server children (zombies not counted)."""
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        found = [c for c in children if _is_server(c) and is_alive(c.pid)]
        self.servers_seen.update(c.pid for c in found)
        return found

    def server(self, timeout_s: float = 10.0) -> psutil.Process:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.servers()
            if len(found) == 1:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no single llama-server child of {self.process.pid}:\n{self.output}")

    def leftover_servers(self) -> list[int]:
        """llama-server processes of this run still alive: every child seen, and any on the run's port."""
        pids = {pid for pid in self.servers_seen if is_alive(pid)}
        if self.state_path.exists() and (url := self.state().get("url")):
            pids.update(p.pid for p in servers_on_port(int(url.rsplit(":", 1)[1])))
        return sorted(pids)

    def send(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def cleanup(self) -> None:
        """Whatever a failed test left: the launcher, then every llama-server it ever had."""
        stop_process(self.process)
        for pid in self.servers_seen:
            kill_if_server(pid)


def _is_server(process: psutil.Process) -> bool:
    try:
        return process.name() == SERVER_NAME or Path(process.exe()).name == SERVER_NAME
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def is_alive(pid: int) -> bool:
    """A zombie is dead: it only waits for its (possibly non-reaping) parent to collect it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.05)
    return not is_alive(pid)


def kill_if_server(pid: int) -> None:
    try:
        process = psutil.Process(pid)
        if _is_server(process):
            process.kill()
    except psutil.NoSuchProcess:
        pass


def servers_on_port(port: int) -> list[psutil.Process]:
    """Every live llama-server started with `--port PORT`, whoever started it."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            argv = process.info["cmdline"] or []
            if process.info["name"] == SERVER_NAME and is_alive(process.pid) \
                    and any(a == "--port" and b == str(port) for a, b in itertools.pairwise(argv)):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def serve_command(model: Path | str, *args: str, home: Path, llama_server: Path, name: str = "t",
                  env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `python -m llamalaunch serve MODEL --name NAME --no-tui ARGS [-- EXTRA]`."""
    argv = [sys.executable, "-m", "llamalaunch", "serve", str(model), "--name", name, "--no-tui", *args]
    if "--port" not in args:
        argv += ["--port", "0"]  # not the default 8080: tests run side by side
    if extra:
        argv += ["--", *extra]
    environment = {**os.environ, "LLAMALAUNCH_HOME": str(home), "LLAMALAUNCH_LLAMA_SERVER": str(llama_server),
                   "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    if "NOTIFY_SOCKET" not in (env or {}):
        environment.pop("NOTIFY_SOCKET", None)  # a test run under systemd must not notify it
    return argv, environment


def start_serve(model: Path | str, *args: str, name: str = "t", home: Path, **kwargs: Any) -> ServeRun:
    """serve_command's, output piped."""
    argv, environment = serve_command(model, *args, name=name, home=home, **kwargs)
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=environment, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    return ServeRun(process, home, name)


def complete(url: str, prompt: str = "The capital of France is", n_predict: int = 8,
             timeout_s: float = 30.0) -> dict[str, Any]:
    body = json.dumps({"prompt": prompt, "n_predict": n_predict, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/completion", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return dict(json.loads(response.read()))


def layer_devices_in_log(log_text: str, n_slots: int) -> dict[int, str]:
    """Slot → device of the last load in the log (`load_tensors: layer N assigned to device X`)."""
    found = [(int(m.group("slot")), m.group("device")) for m in _LAYER.finditer(log_text)]
    return dict(found[-n_slots:])


def layer_devices_in_plan(plan: dict[str, Any]) -> dict[int, str]:
    """Slot → device as the plan in the run state file says (slots not offloaded stay on the CPU)."""
    n_slots = int(plan["model"]["n_slots"])
    assignment = {slot: "CPU" for slot in range(n_slots - int(plan["n_gpu_layers"]))}
    for device in plan["devices"]:
        if device["excluded"]:
            continue
        for slot in range(device["first_slot"], device["first_slot"] + device["n_layers"]):
            assignment[slot] = device["name"]
    return assignment


StartServe = Callable[..., ServeRun]
