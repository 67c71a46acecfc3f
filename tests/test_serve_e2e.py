"""`llamalaunch serve` end to end: a real launcher process, real llama-server, real ggml-rpc-server workers.

Each test runs `python -m llamalaunch serve ...` as a user would (output piped, so plain lines) and checks
what a user or systemd would see: the lines, the exit code, the run state file, the server log, and
which processes are left (psutil).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from llamalaunch.launch.state import RunState, write_state
from llamalaunch.probe.inventory import BUSY_NOTE, probe_devices
from llamalaunch.units import MIB
from tests.serve_support import (
    ServeRun,
    StartServe,
    complete,
    is_alive,
    layer_devices_in_log,
    layer_devices_in_plan,
    servers_on_port,
    wait_gone,
)
from tests.support import RpcWorker, free_port

pytestmark = pytest.mark.llama

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
    assert wait_gone(server.pid, 5) and not run.leftover_servers()
    assert " stopped: " in run.output and "Traceback" not in run.output


def test_serve_shows_the_plan_notes_once(serve: StartServe, demo_model: Path) -> None:
    """What the plan does other than asked (--ctx 8193 runs as 8448, past the trained 8192) is said while serving."""
    run = serve(demo_model, "--ctx", "8193")
    _, _url, ctx = run.wait_ready()
    assert ctx == 8448
    notes = [line.split(" note: ", 1)[1] for line in run.stdout if " note: " in line]
    assert notes == ["--ctx 8193 becomes 8448: llama.cpp sizes the context in steps of 256",
                     "ctx 8448 is beyond the 8192 tokens the model was trained on: llama-server uses 8448, but "
                     "output past 8192 tokens may degrade"]
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM


# --- 2. the launcher killed outright ----------------------------------------------------------------


def test_sigkill_of_the_launcher_takes_llama_server_with_it(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k")
    run.wait_ready()
    server = run.server()

    run.send(signal.SIGKILL)
    run.wait_exit()
    assert wait_gone(server.pid, 5), "llama-server outlived a SIGKILLed launcher (PR_SET_PDEATHSIG)"
    assert not run.leftover_servers()


# --- 3. crashes after ready -------------------------------------------------------------------------


def test_restarts_after_each_crash_then_gives_up_past_max_restarts(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k", "--backoff", "0.2",
                "--max-restarts", "5")
    after = 0
    for crash in range(1, 6):
        ready_index, _, _ = run.wait_ready(after=after)
        victim = run.server()
        victim.kill()
        assert wait_gone(victim.pid, 5)
        after, match = run.wait_for_line(r" restarting: .*restart (\d+) of 5", after=ready_index + 1)
        assert int(match.group(1)) == crash

    _, url, _ = run.wait_ready(after=after, timeout_s=30)
    assert complete(url, n_predict=2)["tokens_predicted"] == 2
    assert run.state()["restarts"] == 5
    assert len(run.servers_seen) == 6  # a fresh llama-server each time

    run.server().kill()  # the sixth crash is one too many
    code = run.wait_exit()
    assert code != 0 and code != 128 + signal.SIGTERM
    assert run.stderr == [line for line in run.stderr if line.startswith("error:")] and len(run.stderr) == 1
    assert "crashed 6 times" in run.stderr[0] and "--max-restarts" in run.stderr[0]
    assert run.state()["phase"] == "failed"
    assert not run.leftover_servers()


def test_sigterm_during_the_backoff_stops_at_once(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k", "--backoff", "20")
    run.wait_ready()
    run.server().kill()
    run.wait_for_line(r" restarting: .* in 20 s")
    asked = time.monotonic()
    run.send(signal.SIGTERM)
    assert run.wait_exit(timeout_s=10) == 128 + signal.SIGTERM
    assert time.monotonic() - asked < 3
    assert run.output.count(" loading: ") == 1 and not run.leftover_servers()


def test_a_worker_lost_while_serving_ends_the_run_with_one_line(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """llama-server aborts on its next RPC call; each restart's re-probe finds the worker gone (it may come
    back: test_worker_faults) and loads nothing, until --max-restarts: then one line."""
    worker = rpc_workers()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "2k", "--backoff", "0.2", "--max-restarts", "2")
    _, url, _ = run.wait_ready()
    worker.process.kill()
    worker.process.wait()
    with pytest.raises(OSError):  # urllib's errors are OSErrors: the server dies under the request
        complete(url, n_predict=2)
    assert run.wait_exit(timeout_s=30) == 1
    assert len(run.stderr) == 1 and worker.endpoint in run.stderr[0], run.output
    assert "giving up after 2 restarts" in run.stderr[0]
    assert run.output.count(" restarting: ") == 2 and run.output.count(" loading: ") == 1
    assert run.state()["phase"] == "failed" and not run.leftover_servers()


def test_a_worker_gone_while_idle_is_noticed_before_any_request(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """/health stays ok after a worker dies (llama-server aborts only on its next request): the health watch
    finds llama-server's connection to it closed, restarts llama-server, and names the worker when it is not
    back."""
    worker = rpc_workers()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "2k", "--backoff", "0.2", "--max-restarts", "1",
                "--health-interval", "0.5")
    run.wait_ready()
    worker.process.kill()
    worker.process.wait()
    run.wait_for_line(rf" warning: RPC worker {re.escape(worker.endpoint)} is gone "
                      r"\(llama-server's connection to it closed\): killing pid \d+ to restart it$", timeout_s=10)
    assert run.wait_exit(timeout_s=30) == 1
    assert len(run.stderr) == 1 and worker.endpoint in run.stderr[0], run.output
    assert "giving up after 1 restart" in run.stderr[0]
    assert run.state()["phase"] == "failed" and not run.leftover_servers()
    # status says why it restarted: its last exit code is -9, llamalaunch's own kill, not an OOM killer's
    assert run.state()["last_restart_reason"] == (f"RPC worker {worker.endpoint} is gone (llama-server's connection "
                                                  "to it closed)"), run.state()


def test_the_health_watch_leaves_a_busy_worker_serving(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """The watch reads llama-server's own connections and leaves the worker alone: a worker serving llama-server
    (one client at a time) is never taken for a gone one, its accept queue stays free (a probe still finds it
    busy, not down: connections of the watch's own would fill it) and llama-server keeps answering."""
    worker = rpc_workers()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "2k", "--health-interval", "0.2")
    _, url, _ = run.wait_ready()
    for _ in range(5):
        time.sleep(0.5)
        assert complete(url, n_predict=2)["tokens_predicted"] == 2
    assert "is gone" not in run.output and " restarting: " not in run.output
    found = probe_devices(rpc=[worker.endpoint], local_gpus=False)
    assert (found.devices[0].note or "").startswith(BUSY_NOTE), found.devices[0]


# --- 4. out of memory: the ladder --------------------------------------------------------------------

# SmolLM2 on one worker at ctx 8192 asks it for weights 92 MiB, then KV 180 MiB, then compute ~20 MiB
# (seen). A CPU worker reports host RAM as free, so only its address-space limit stops it: with 230 MiB
# above the worker's own start-up size (~9 MiB VSZ), the weights fit, the KV cache does not, and the
# retried plan (~120 MiB at the smallest context) fits. Measured: the pattern holds from ~130 to ~280 MiB.
WORKER_ROOM_BYTES = 230 * MIB


def small_worker(rpc_workers: Callable[..., RpcWorker], llama_bin_dir: Path,
                 room_bytes: int = WORKER_ROOM_BYTES) -> RpcWorker:
    """A worker whose address space holds the weights but not an 8k KV cache."""
    probe = subprocess.Popen([str(llama_bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(free_port())],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        baseline_vsz = psutil.Process(probe.pid).memory_info().vms
    finally:
        probe.kill()
        probe.wait()
    return rpc_workers(address_space_bytes=baseline_vsz + room_bytes)


def test_out_of_memory_replans_smaller_and_serves(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, llama_bin_dir: Path) -> None:
    worker = small_worker(rpc_workers, llama_bin_dir)
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "8k", "--max-attempts", "3")

    _, url, ctx = run.wait_ready(timeout_s=60)
    assert ctx < 8192
    assert complete(url, n_predict=2)["tokens_predicted"] == 2
    server_log = run.log_path.read_text()
    assert f"failed to allocate RPC0[{worker.endpoint}] buffer of size" in server_log
    assert worker.process.poll() is None  # an allocation past the limit fails; the worker stays up

    attempts = run.state()["attempts"]
    assert [a["ctx_tokens"] for a in attempts] == [8192]
    assert "out of memory on RPC0" in attempts[0]["outcome"]
    lines = run.output
    assert "attempt 1: ctx 8192" in lines and f"attempt 2: ctx {ctx}" in lines
    assert "attempt 1 failed: out of memory on RPC0" in lines
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM
    assert not run.leftover_servers()


def test_out_of_memory_on_the_second_worker_moves_its_layers(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, llama_bin_dir: Path) -> None:
    """The worker names its buffer `RPC0[endpoint]` (its own index); the lesson must land on our RPC1."""
    roomy, small = rpc_workers(), small_worker(rpc_workers, llama_bin_dir, room_bytes=100 * MIB)
    run = serve(demo_model, "--rpc", rpc_option(roomy, small), "--ctx", "8k")

    _, url, _ = run.wait_ready(timeout_s=60)
    assert f"failed to allocate RPC0[{small.endpoint}] buffer" in run.log_path.read_text()
    assert "attempt 1 failed: out of memory on RPC1" in run.output, run.output
    first = run.state()["attempts"][0]["layers"]
    now = {d["name"]: d["n_layers"] for d in run.state()["plan"]["devices"] if not d["excluded"]}
    assert now.get("RPC1", 0) < int(first.split("RPC1=")[1].split()[0])
    assert complete(url, n_predict=2)["tokens_predicted"] == 2
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM


def test_out_of_memory_with_no_attempts_left_fails_clearly(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, llama_bin_dir: Path) -> None:
    worker = small_worker(rpc_workers, llama_bin_dir)
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "8k", "--max-attempts", "1")

    code = run.wait_exit(timeout_s=60)
    assert code == 1
    assert len(run.stderr) == 1 and "out of memory" in run.stderr[0] and "RPC0" in run.stderr[0]
    assert run.output.count(" loading: ") == 1  # no retry beyond --max-attempts
    assert len(run.state()["attempts"]) == 1 and run.state()["phase"] == "failed"
    assert not run.leftover_servers()


def test_a_replan_that_cannot_fit_fails_as_the_ladder_running_out(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, llama_bin_dir: Path) -> None:
    """--ctx-min above what the lesson leaves: the second plan is impossible, and says so as a failure."""
    worker = small_worker(rpc_workers, llama_bin_dir)
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "8k", "--ctx-min", "4k")

    assert run.wait_exit(timeout_s=60) != 0
    assert len(run.stderr) == 1 and "out of memory" in run.stderr[0], run.output
    assert run.output.count(" loading: ") == 1
    assert run.state()["phase"] == "failed"


# --- 5. failures that retrying cannot mend ------------------------------------------------------------


def assert_one_line_error(run: ServeRun, code: int, *words: str) -> None:
    assert run.wait_exit() == code, run.output
    assert len(run.stderr) == 1 and run.stderr[0].startswith("error:"), run.output
    assert "Traceback" not in run.output
    for word in words:
        assert word in run.stderr[0]
    assert " loading: " not in run.output and not run.servers_seen  # llama-server never started


def test_port_in_use_is_one_line_and_starts_nothing(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k", "--port", str(port))
        assert_one_line_error(run, 1, str(port))
        assert not servers_on_port(port)


def test_missing_model_is_one_line_exit_2(serve: StartServe, tmp_path: Path) -> None:
    run = serve(tmp_path / "no-such-model.gguf", "--ctx", "2k")
    assert_one_line_error(run, 2, "no-such-model.gguf")


def test_corrupt_model_is_one_line_exit_2(serve: StartServe, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(os.urandom(1 << 20))
    run = serve(corrupt, "--ctx", "2k")
    assert_one_line_error(run, 2, "corrupt.gguf")


def test_pass_through_that_contradicts_the_plan_is_refused_unless_forced(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    worker = rpc_workers()
    refused = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "2k", extra=["-ngl", "5"])
    assert_one_line_error(refused, 2, "-ngl", "--force")

    forced = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "2k", "--force", extra=["-ngl", "5"])
    forced.wait_ready()
    assert forced.state()["argv"][-2:] == ["-ngl", "5"]
    assert forced.server().cmdline()[-2:] == ["-ngl", "5"]
    forced.send(signal.SIGTERM)
    assert forced.wait_exit() == 128 + signal.SIGTERM


def test_unknown_pass_through_argument_is_one_line_and_not_retried(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k", extra=["--no-such-flag"])
    assert run.wait_exit() == 1
    assert len(run.stderr) == 1 and "--no-such-flag" in run.stderr[0], run.output
    assert run.output.count(" loading: ") == 1 and "Traceback" not in run.output


# --- 6. sd_notify --------------------------------------------------------------------------------------


def receive_until(sock: socket.socket, done: Callable[[str], bool], timeout_s: float) -> list[str]:
    """Datagrams up to and including the first for which `done` is true; WATCHDOG=1 pings left out."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        if message != "WATCHDOG=1":
            messages.append(message)
        if done(message):
            return messages
    raise AssertionError(f"notifications so far: {messages}")


def count_watchdogs_while(sock: socket.socket, busy: threading.Thread) -> int:
    count = 0
    sock.settimeout(0.1)
    while busy.is_alive():
        try:
            count += sock.recv(4096) == b"WATCHDOG=1"
        except TimeoutError:
            continue
    return count


def test_sd_notify_ready_only_when_ready_status_on_phases_stopping_on_sigterm(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    folder = tempfile.mkdtemp(prefix="ll-notify-")  # AF_UNIX paths are short: keep it out of tmp_path
    address = os.path.join(folder, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k",
                    env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})

        before = receive_until(sock, lambda m: "READY=1" in m, timeout_s=30)
        ready = before.pop().split("\n")
        url = next(f for f in ready if f.startswith("STATUS=")).split()[1]
        # At the moment READY=1 arrives the server already answers: it was sent after a completion worked.
        assert complete(url, n_predict=1)["tokens_predicted"] == 1
        assert "STATUS=ready: " + url in "\n".join(ready)
        phases = [m.removeprefix("STATUS=").split(":")[0] for m in before]
        assert all(m.startswith("STATUS=") for m in before)  # no READY=1 before the one above
        assert phases[0] == "starting" and "loading" in phases and "ready" not in phases[:-1]

        # A busy server floods the launcher with -lv 5 lines (~17 a token); the watchdog (every 0.2 s) goes on.
        busy = threading.Thread(target=complete, args=(url,), kwargs={"n_predict": 200})
        started = time.monotonic()
        busy.start()
        pings = count_watchdogs_while(sock, busy)
        assert pings >= (time.monotonic() - started) / 0.2 / 2, pings

        run.send(signal.SIGTERM)
        after = receive_until(sock, lambda m: m.startswith("STATUS=stopped"), timeout_s=15)
        assert after.index("STOPPING=1") > after.index(next(m for m in after if m.startswith("STATUS=stopping")))
        assert run.wait_exit() == 128 + signal.SIGTERM
    os.unlink(address)
    os.rmdir(folder)


# --- 7. stale run state ----------------------------------------------------------------------------------


def test_stale_state_naming_a_reused_pid_neither_blocks_nor_kills_it(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        started = psutil.Process(bystander.pid).create_time()
        # What a crashed launcher leaves behind, its pid since reused by an unrelated process.
        write_state(RunState(name="t", launcher_pid=bystander.pid, launcher_started_at=started - 3600,
                             url="http://127.0.0.1:1", model_path=str(demo_model), log_path="",
                             phase="ready", child_pid=bystander.pid, started_at=started - 3600))
        run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k", name="t")
        run.wait_ready()
        assert run.state()["launcher_pid"] == run.process.pid
        run.send(signal.SIGTERM)
        assert run.wait_exit() == 128 + signal.SIGTERM
        assert bystander.poll() is None and is_alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_unreadable_state_does_not_block_serve(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, home: Path) -> None:
    """A state file from another llamalaunch version (or damaged): serve replaces it, as its hint says."""
    (home / "state").mkdir(parents=True, exist_ok=True)
    (home / "state" / "t.json").write_text('{"name": "t", "launcher_pid": 1, "field_of_a_newer_version": 3}')
    run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k", name="t")
    run.wait_ready()
    assert run.state()["launcher_pid"] == run.process.pid
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM


def test_state_of_a_live_launcher_with_the_same_name_refuses(serve: StartServe, demo_model: Path) -> None:
    """The other side of the same check: the pid is alive and started when the file says."""
    alive = psutil.Process()
    write_state(RunState(name="t", launcher_pid=alive.pid, launcher_started_at=alive.create_time(),
                         url="http://127.0.0.1:1", model_path=str(demo_model), log_path="", phase="ready"))
    run = serve(demo_model, "--ctx", "2k", name="t")
    assert_one_line_error(run, 1, "already running", "--name")


# --- stalls and signals while loading ----------------------------------------------------------------


def test_a_load_that_stalls_fails_after_the_load_timeout(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """A worker stopped while llama-server starts on it accepts connections (kernel backlog) but never
    answers: llama-server hangs silently. (A worker found stopped before is refused as busy.)"""
    worker = rpc_workers()
    try:
        run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "2k", "--load-timeout", "2")
        run.wait_for_line(" loading: ", timeout_s=30)
        worker.process.send_signal(signal.SIGSTOP)
        server = run.server()
        assert run.wait_exit(timeout_s=30) == 1
        assert len(run.stderr) == 1 and "no progress for 2 s while loading" in run.stderr[0], run.output
        assert " failed: " not in run.output and run.state()["phase"] == "failed"  # said once: the error line
        assert wait_gone(server.pid, 5)
    finally:
        worker.process.send_signal(signal.SIGKILL)  # continuing it could answer a probe long closed


def test_sigint_while_loading_stops_with_130_and_leaves_nothing(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_option(rpc_workers()), "--ctx", "2k")
    run.wait_for_line(" loading: ")
    server = run.server()
    run.send(signal.SIGINT)
    assert run.wait_exit() == 128 + signal.SIGINT
    assert wait_gone(server.pid, 5) and not run.leftover_servers()
    assert run.state()["phase"] == "stopped"
