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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_rpc_worker(bin_dir: Path, log_dir: Path, address_space_bytes: int | None = None,
                     threads: int = 1) -> RpcWorker:
    """Start one CPU ggml-rpc-server on a free loopback port; under `prlimit --as` when asked."""
    port = free_port()
    argv = [str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
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
