"""Real llama-server loads for benchmarks: start, wait for a real answer, fill the context, stop.

Shared by the capacity benchmarks (GPU with a ballast, CPU with RPC workers under prlimit).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

N_CTX = re.compile(r"llama_context: n_ctx\s+= (\d+)")
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(port: int, path: str, payload: dict, timeout_s: float) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except (OSError, ValueError) as error:
        return 0, str(error)


@dataclass
class Trial:
    """One load: did it get ready, did a prompt filling the context complete, what llama.cpp printed."""

    argv: list[str]
    ready: bool = False
    filled: bool = False
    load_s: float = 0.0
    n_ctx: int | None = None
    offloaded: int | None = None
    returncode: int | None = None
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ready and self.filled and self.returncode in (None, 0, -15, 143)


def run_trial(server: Path, argv: list[str], fill_tokens: int | None, log_path: Path,
              ready_timeout_s: float = 300.0, fill_timeout_s: float = 600.0, token_id: int = 100) -> Trial:
    """Start llama-server with `argv`, wait for a one-token completion, then send a prompt of
    `fill_tokens` tokens (the context filled: run-time allocations happen there), then stop it."""
    port = free_port()
    trial = Trial(argv)
    started = time.monotonic()
    with open(log_path, "w+b") as log:
        process = subprocess.Popen([str(server), *argv, "--host", "127.0.0.1", "--port", str(port), "-lv", "5"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = started + ready_timeout_s
            while time.monotonic() < deadline and process.poll() is None:
                status, _ = post(port, "/completion", {"prompt": "Hi", "n_predict": 1}, 30)
                if status == 200:
                    trial.ready = True
                    break
                time.sleep(0.2)
            trial.load_s = time.monotonic() - started
            if trial.ready and fill_tokens:
                payload = {"prompt": [token_id] * fill_tokens, "n_predict": 1, "cache_prompt": False}
                status, _ = post(port, "/completion", payload, fill_timeout_s)
                trial.filled = status == 200 and process.poll() is None
            elif trial.ready:
                trial.filled = True
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            trial.returncode = process.returncode
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").splitlines()
    contexts = [int(m.group(1)) for line in lines if (m := N_CTX.search(line))]
    trial.n_ctx = contexts[-1] if contexts else None
    offloads = [int(m.group(1)) for line in lines if (m := OFFLOADED.search(line))]
    trial.offloaded = offloads[-1] if offloads else None
    trial.tail = [line for line in lines if " E " in line or "error" in line.lower()][-8:]
    return trial


def largest_passing(check: "callable[[int], bool]", low: int, high: int, step: int) -> int:
    """Largest value in [low, high] (multiples of step) for which check passes; `low` is known to pass.
    `high` need not fail: the search widens past it while it passes."""
    while check(high):
        low, high = high, high + max(high - low, step) * 2
    while high - low > step:
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        if check(middle):
            low = middle
        else:
            high = middle
    return low
