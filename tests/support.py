"""Real llama.cpp processes for tests: ggml-rpc-server workers on loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: what every test does with the processes it started."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    """Connect and close without sending: harmless to a ggml-rpc-server (DESIGN.md §3)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


@dataclass
class RpcWorker:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process, 5)


def start_rpc_worker(bin_dir: Path, log_dir: Path, address_space_bytes: int | None = None,
                     threads: int = 1, devices: str | None = None) -> RpcWorker:
    """Start one CPU ggml-rpc-server on a free loopback port; under `prlimit --as` when asked."""
    port = free_port()
    argv = [str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
    if devices is not None:
        argv += ["-d", devices]  # "CPU,CPU": one worker exposing two devices
    if address_space_bytes is not None:
        argv = ["prlimit", f"--as={address_space_bytes}", *argv]
    log_path = log_dir / f"rpc-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    worker = RpcWorker(process, port, log_path)
    try:
        wait_for_port(port)
    except TimeoutError:
        worker.stop()
        raise
    return worker


@dataclass
class ServerRun:
    """The outcome of one real llama-server load: did it serve a token, and everything it printed."""

    served: bool
    returncode: int | None
    lines: list[str]


def run_llama_server(bin_dir: Path, argv: list[str], timeout_s: float = 120.0,
                     prompt: str | list[int] = "Hi") -> ServerRun:
    """Start llama-server with `argv` (+ port and -lv 5), ask for one token after `prompt`, stop it,
    return its output."""
    import json
    import urllib.request

    port = free_port()
    full = [str(bin_dir / "llama-server"), *argv, "--host", "127.0.0.1", "--port", str(port), "-lv", "5"]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "w+b")  # noqa: SIM115
    process = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    served = False
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/completion",
                                                 data=json.dumps({"prompt": prompt, "n_predict": 1}).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    served = response.status == 200
                    break
            except OSError:
                time.sleep(0.2)
    finally:
        stop_process(process, 15)
        log.seek(0)
        lines = log.read().decode("utf-8", "replace").splitlines()
        log.close()
    return ServerRun(served, process.returncode, lines)
