"""RPC workers that are busy, wrong, or die (issue 15), with real ggml-rpc-server workers and the real CLI.

A worker serves one client at a time; a client that leaves with a request pending kills it later
(SIGPIPE). Each test checks what a user sees (exit code, the one error line) and that the worker lives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from llamalaunch.probe import rpc
from tests.serve_support import REPO_ROOT, StartServe, complete, wait_gone
from tests.support import RpcWorker, free_port, wait_for_port
from tests.test_probe_rpc import holding_worker

pytestmark = pytest.mark.llama
ME = f"{psutil.Process().name()}, pid {os.getpid()}"  # what holding_worker looks like to the probe


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "200"})


def assert_worker_lives(worker: RpcWorker) -> None:
    """Every waiter gone, the worker still up and answering (not dead of SIGPIPE, exit status 141)."""
    deadline = time.monotonic() + 10
    while rpc.keeper_pids(worker.endpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a worker killed by a late write dies right after its client leaves
    assert worker.process.poll() is None, worker.log_path.read_text()
    assert rpc.probe_worker(worker.endpoint).version == "7.0.0"


# --- a busy worker -----------------------------------------------------------------------------------


def test_serve_refuses_a_busy_worker_even_with_a_budget(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """Following the plan's advice (--budget) must not start llama-server on the busy worker."""
    worker = rpc_workers()
    with holding_worker(worker.endpoint):
        run = serve(demo_model, "--rpc", worker.endpoint, "--budget", "RPC0=1GiB", "--ctx", "1k")
        assert run.wait_exit(30) == 1
        assert run.stderr == [(
            f"error: RPC worker {worker.endpoint}: RPC0 is serving another client ({ME}); "
            f"serve does not start llama-server on a busy worker (stop that client and serve again, or leave "
            f"{worker.endpoint} out of --rpc; `llamalaunch plan --budget RPC0=SIZE` plans for it as a what-if)")]
        assert not run.servers_seen and "loading:" not in run.output
    assert_worker_lives(worker)


def test_a_load_stuck_behind_a_busy_worker_is_given_up_without_killing_the_worker(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """Another client takes the worker between the probe and llama-server's next connection: the load
    waits there until --load-timeout, and stopping llama-server then must not kill the worker."""
    worker = rpc_workers()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "1k", "--load-timeout", "3")
    run.wait_for_line(r" loading: pid \d+")
    with holding_worker(worker.endpoint):  # llama-server connects a dozen times while starting
        assert run.wait_exit(30) == 1
        assert f"made no progress for 3 s while loading: RPC0 {worker.endpoint} is serving another client " \
               f"({ME})" in run.stderr[0], run.output
    assert_worker_lives(worker)
    assert not run.leftover_servers()


def test_plan_with_a_budget_plans_a_busy_worker_but_verify_does_not_load_on_it(
        rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    with holding_worker(worker.endpoint):
        planned = run_cli("plan", "--demo", "--rpc", worker.endpoint, "--budget", "RPC0=1GiB", "--ctx", "1k")
        verified = run_cli("plan", "--demo", "--rpc", worker.endpoint, "--budget", "RPC0=1GiB", "--ctx", "1k",
                           "--verify")
    assert planned.returncode == 0 and "RPC0" in planned.stdout, planned.stderr  # a what-if
    assert verified.returncode == 1
    assert verified.stderr.startswith(f"error: RPC worker {worker.endpoint}: RPC0 is busy serving another client "
                                      f"({ME}): memory unknown; size from --budget: --verify does not start "
                                      "llama-server on a busy worker"), verified.stderr
    assert_worker_lives(worker)


def test_devices_shows_unknown_memory_of_a_busy_worker_as_unknown(rpc_workers: Callable[..., RpcWorker]) -> None:
    busy, idle = rpc_workers(), rpc_workers()
    endpoints = f"{busy.endpoint},{idle.endpoint}"
    with holding_worker(busy.endpoint):
        table = run_cli("devices", "--rpc", endpoints)
        as_json = run_cli("devices", "--rpc", endpoints, "--json")
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    row = next(line for line in table.stdout.splitlines() if busy.endpoint in line)
    assert [cell.strip() for cell in row.split("│")[5:7]] == ["?", "?"], row  # free, total
    assert "0.0 MiB" not in table.stdout
    assert f"note: RPC0 {busy.endpoint} is serving another client ({ME}): memory " \
           "unknown; give --budget RPC0=SIZE to plan for it anyway" in table.stderr
    data = json.loads(as_json.stdout)
    first = data["devices"][0]
    assert (first["name"], first["free_bytes"], first["total_bytes"]) == ("RPC0", None, None)
    assert data["devices"][1]["free_bytes"] > 0 and data["unknown_memory"] == ["RPC0"]
    assert_worker_lives(busy)


# --- not a worker --------------------------------------------------------------------------------------


def test_plan_at_an_http_server_says_so_at_once_and_leaves_no_waiter(http_server: str) -> None:
    started = time.monotonic()
    done = run_cli("plan", "--demo", "--rpc", http_server)
    took = time.monotonic() - started
    assert done.returncode == 1 and done.stderr == (
        f"error: RPC worker {http_server}: not a ggml-rpc-server: it answers HTTP (HTTP/1.0 200 OK) and not "
        "HELLO (check the port in --rpc: that one is a web server's (llama-server's?); start a worker "
        "with `llamalaunch worker`, or plan/serve --exclude RPC0 to go without it)\n"), done.stderr
    assert took < 6, took  # start-up, the 2 s HELLO timeout and an instant answer on a second connection
    assert rpc.keeper_pids(http_server) == []  # nothing left holding a connection


def test_connection_refused_suggests_llamalaunch_worker_on_loopback() -> None:
    port = free_port()
    done = run_cli("devices", "--rpc", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"error: RPC worker 127.0.0.1:{port}: connection refused: nothing listens on that port (start one with "
        f"`llamalaunch worker --port-base {port}` (on loopback), or fix the port in --rpc, or plan/serve "
        "--exclude RPC0 to go without it)")


def test_refused_hint_keeps_the_address_the_user_chose() -> None:
    assert rpc.start_worker_hint("10.0.0.5", 50052) == (
        "start one on 10.0.0.5 with `llamalaunch worker --port-base 50052 --host 10.0.0.5` (reachable from "
        "the network: keep it on a trusted one), or fix the address in --rpc")


def test_refused_hint_for_a_host_name_gives_worker_an_address() -> None:
    """worker's --host takes an IPv4 address: a name in --rpc gets the address it resolved to, and a name for
    this machine's loopback (/etc/hosts) gets the loopback hint (it said `--host vm`, which worker refuses)."""
    assert rpc.start_worker_hint("vm", 50052, "127.0.0.1") == (
        "start one with `llamalaunch worker --port-base 50052` (on loopback), or fix the port in --rpc")
    assert rpc.start_worker_hint("box", 50052, "192.168.1.5") == (
        "start one on box with `llamalaunch worker --port-base 50052 --host 192.168.1.5` (reachable from the "
        "network: keep it on a trusted one), or fix the address in --rpc")


# --- a worker that dies mid-serve ------------------------------------------------------------------------


def start_worker_on(bin_dir: Path, port: int, log_path: Path) -> RpcWorker:
    with open(log_path, "ab") as log:
        process = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    worker = RpcWorker(process, port, log_path)
    wait_for_port(port)
    return worker


def test_a_worker_that_dies_mid_serve_and_comes_back_on_its_port_is_served_again(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], llama_bin_dir: Path, demo_model: Path) -> None:
    worker = rpc_workers()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "1k", "--backoff", "0.5")
    ready_at, url, _ = run.wait_ready(timeout_s=60)
    worker.process.kill()
    worker.process.wait()
    with contextlib.suppress(OSError):
        complete(url, n_predict=2)  # an idle llama-server notices the lost worker at its next request
    index, _ = run.wait_for_line(r" restarting: .*connection refused", after=ready_at, timeout_s=30)
    time.sleep(3)  # a few refused probes, backing off
    assert run.process.poll() is None, run.output
    back = start_worker_on(llama_bin_dir, worker.port, worker.log_path)
    try:
        _, url, _ = run.wait_ready(timeout_s=60, after=index)
        assert complete(url, n_predict=2)["tokens_predicted"] == 2
        run.send(signal.SIGTERM)
        assert run.wait_exit() == 128 + signal.SIGTERM
        assert not run.leftover_servers()
        assert back.process.poll() is None
    finally:
        back.stop()


def generate(url: str) -> None:
    with contextlib.suppress(OSError):  # the server dies under the request
        complete(url, n_predict=400, timeout_s=60)


def test_a_launcher_killed_mid_generation_does_not_kill_the_worker(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """llama-server dies with its launcher (PDEATHSIG) while the worker owes it an answer: its
    connections were switched to close with a reset once it was ready, so the worker's late write fails
    harmlessly (without that, 3 of 4 tries killed the worker with SIGPIPE)."""
    worker = rpc_workers()
    for attempt in range(2):  # the same worker each time: it goes on to the next client
        run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "1k", name=f"t{attempt}")
        _, url, _ = run.wait_ready(timeout_s=60)
        server = run.server()

        generating = threading.Thread(target=generate, args=(url,), daemon=True)
        generating.start()
        time.sleep(1.0)
        run.send(signal.SIGKILL)
        assert wait_gone(server.pid, 5)
        generating.join(10)
        assert_worker_lives(worker)
