from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve_support import ServeRun, start_serve
from tests.support import RpcWorker, start_rpc_worker


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own LLAMALAUNCH_HOME; the build cache stays shared (LLAMALAUNCH_CACHE)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LLAMALAUNCH_HOME", str(home))
    monkeypatch.setenv("LLAMALAUNCH_CACHE", os.environ.get("LLAMALAUNCH_CACHE", str(_default_cache())))
    # Calibration on first sight adds a short load per new worker: only the tests about it turn it on.
    monkeypatch.setenv("LLAMALAUNCH_CALIBRATE", "false")


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamalaunch"


@pytest.fixture(scope="session")
def llama_bin_dir() -> Path:
    """Directory holding llama-server, ggml-rpc-server and llama-fit-params (built by scripts/setup)."""
    from llamalaunch.toolchain.discover import cached_bin_dir

    candidates = [os.environ.get("LLAMALAUNCH_BIN_DIR"), cached_bin_dir(_default_cache())]
    for candidate in candidates:
        if candidate and (Path(candidate) / "llama-server").exists():
            return Path(candidate)
    pytest.skip("llama.cpp binaries not built: run scripts/setup (or set LLAMALAUNCH_BIN_DIR)")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from llamalaunch.toolchain.demo import demo_model_path

    return demo_model_path(_default_cache())


@pytest.fixture
def rpc_workers(llama_bin_dir: Path, tmp_path: Path) -> Iterator[Callable[..., RpcWorker]]:
    """Factory: start real ggml-rpc-server workers on loopback; all stopped at teardown."""
    started: list[RpcWorker] = []

    def start(address_space_bytes: int | None = None, devices: str | None = None) -> RpcWorker:
        worker = start_rpc_worker(llama_bin_dir, tmp_path, address_space_bytes, devices=devices)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def home() -> Path:
    """This test's LLAMALAUNCH_HOME (set above), shared by the launcher and the test's own state calls."""
    return Path(os.environ["LLAMALAUNCH_HOME"])


@pytest.fixture
def serve(llama_bin_dir: Path, home: Path) -> Iterator[Callable[..., ServeRun]]:
    """Factory: `llamalaunch serve` with this test's LLAMALAUNCH_HOME (or `home=`); all cleaned up."""
    runs: list[ServeRun] = []

    def start(model: Path | str, *args: str, **kwargs: object) -> ServeRun:
        kwargs.setdefault("home", home)
        run = start_serve(model, *args, llama_server=llama_bin_dir / "llama-server", **kwargs)  # type: ignore[arg-type]
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


@pytest.fixture
def http_server() -> Iterator[str]:
    """HOST:PORT of a real HTTP server that is neither llama-server nor a worker (python's http.server)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
