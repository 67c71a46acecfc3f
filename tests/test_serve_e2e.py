"""`llamalaunch serve` end to end: a real launcher process, real llama-server, real ggml-rpc-server workers.

Each test runs `python -m llamalaunch serve ...` as a user would (output piped, so plain lines) and checks
what a user or systemd would see: the lines, the exit code, the run state file, the server log, and
which processes are left (psutil).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.serve_support import (
    ServeRun,
    complete,
    is_alive,
    layer_devices_in_log,
    layer_devices_in_plan,
    start_serve,
    wait_gone,
)
from tests.support import RpcWorker

pytestmark = pytest.mark.llama

StartServe = Callable[..., ServeRun]


@pytest.fixture
def serve(llama_bin_dir: Path, tmp_path: Path) -> Iterator[StartServe]:
    """Factory: start `llamalaunch serve` with this test's LLAMALAUNCH_HOME; all cleaned up at teardown."""
    runs: list[ServeRun] = []

    def start(model: Path | str, *args: str, **kwargs: object) -> ServeRun:
        run = start_serve(model, *args, home=tmp_path / "home", llama_server=llama_bin_dir / "llama-server",
                          **kwargs)  # type: ignore[arg-type]
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


def rpc_option(*workers: RpcWorker) -> str:
    return ",".join(worker.endpoint for worker in workers)


# --- 1. happy path ----------------------------------------------------------------------------------


def test_serves_on_two_workers_as_planned_and_stops_on_sigterm(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    first, second = rpc_workers(), rpc_workers()
    run = serve(demo_model, "--rpc", rpc_option(first, second), "--ctx", "8k")

    _, url, ctx = run.wait_ready()
    assert ctx == 8192
    state = run.state()
    assert state["phase"] == "ready" and state["url"] == url
    answer = complete(url)
    assert answer["tokens_predicted"] == 8 and answer["content"]

    plan = state["plan"]
    log_layers = layer_devices_in_log(run.log_path.read_text(), plan["model"]["n_slots"])
    assert log_layers == layer_devices_in_plan(plan)
    assert {device for device in log_layers.values()} == {"RPC0", "RPC1"}

    server = run.server()
    assert state["child_pid"] == server.pid
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM
    assert wait_gone(server.pid, 5)
    assert "stopped" in run.output and "Traceback" not in run.output


# --- 2. the launcher killed outright ----------------------------------------------------------------


def test_sigkill_of_the_launcher_takes_llama_server_with_it(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k")
    run.wait_ready()
    server = run.server()

    run.send(signal.SIGKILL)
    run.wait_exit()
    assert wait_gone(server.pid, 5), "llama-server outlived a SIGKILLed launcher (PR_SET_PDEATHSIG)"
