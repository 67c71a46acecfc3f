"""Faults with real processes (issue 11): a worker killed while llama-server loads onto it, a worker that
accepts and never answers, the log's disk full, SIGHUP, two launchers on one port.

Each test runs `python -m llamalaunch ...` as a user would and checks what a user or systemd would see:
the exit code, one line on stderr, how long it took, and that no process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from llamalaunch.probe import rpc
from tests.serve_support import (
    REPO_ROOT,
    ServeRun,
    StartServe,
    complete,
    serve_command,
    servers_on_port,
    wait_gone,
)
from tests.support import RpcWorker, free_port
from tests.synthetic import write_preset

pytestmark = pytest.mark.llama

def assert_one_error_line(run: ServeRun, *words: str) -> None:
    assert len(run.stderr) == 1 and run.stderr[0].startswith("error:"), run.output
    assert "Traceback" not in run.output
    for word in words:
        assert word in run.stderr[0], run.output


def wait_for_log(path: Path, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if text in path.read_text(errors="replace"):
                return
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} in {path} after {timeout_s} s")


# --- a worker killed while llama-server loads onto it ------------------------------------------------


@pytest.fixture(scope="module")
def slow_loading_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-8B's shape cut to 4 blocks and a 32k vocabulary: a 610 MB sparse file (a few MB on disk);
    sending its 538 MiB of weights to a loopback worker takes about a second (seen: 1.1 s)."""
    return write_preset(tmp_path_factory.mktemp("model") / "slow-load.gguf", "llama-8b", n_layer=4, n_vocab=32000)


def test_a_worker_killed_during_load_fails_the_run_with_one_line_naming_it(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], slow_loading_model: Path) -> None:
    worker = rpc_workers()
    run = serve(slow_loading_model, "--rpc", worker.endpoint, "--ctx", "512", "-np", "1", "--backoff", "0.2",
                "--max-restarts", "2")
    # The weights go to the worker after llama-server prints the buffer it allocated there.
    wait_for_log(run.log_path, f"RPC0[{worker.endpoint}] model buffer size")
    server = run.server()
    worker.process.kill()
    killed_at = time.monotonic()
    assert run.wait_exit(timeout_s=30) == 1
    assert time.monotonic() - killed_at < 10  # detected, not a hang
    # Relaunched as after any crash; each probe finds the worker gone and names it (it may come back,
    # test_worker_faults): no second load, and after --max-restarts one line saying so.
    assert_one_error_line(run, worker.endpoint, "connection refused", "giving up after 2 restarts")
    assert run.output.count(" loading: ") == 1 and run.output.count(" restarting: ") == 2, run.output
    assert "an RPC worker stopped answering while llama-server loaded" in run.output
    assert run.state()["phase"] == "failed"
    assert wait_gone(server.pid, 5) and not run.leftover_servers()


# --- a worker that accepts and never answers ----------------------------------------------------------


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "200"})


def test_devices_on_a_worker_that_never_answers_returns_in_time_saying_why(
        rpc_workers: Callable[..., RpcWorker]) -> None:
    """A stopped ggml-rpc-server: the kernel accepts the connection, nobody ever answers HELLO. On this machine
    its process is seen stopped: down, said so (test_down_workers has the whole message)."""
    frozen, healthy = rpc_workers(), rpc_workers()
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = run_cli("devices", "--rpc", f"{frozen.endpoint},{healthy.endpoint}", timeout_s=30)
        took = time.monotonic() - started
        assert took < 8, took  # the probe's reply timeout (2 s) plus start-up, not a hang
        assert "Traceback" not in done.stderr
        said = done.stdout + done.stderr
        assert frozen.endpoint in said and f"(pid {frozen.process.pid}) is stopped" in said, said
        assert done.returncode == 1  # down, as devices says of any worker that is
        assert healthy.endpoint in done.stdout  # the other worker is still shown
        keepers = rpc.keeper_pids(frozen.endpoint)
        assert len(keepers) == 1  # our HELLO waits there, so the stopped worker is not hit by SIGPIPE later
    finally:
        frozen.process.send_signal(signal.SIGKILL)  # never continued: it would answer a probe long gone
        frozen.process.wait()
    assert all(wait_gone(pid, 5) for pid in keepers)  # the keeper leaves with the worker: no orphans


# --- the log's disk full ------------------------------------------------------------------------------


def assert_keeps_serving_and_says_the_log_failed(run: ServeRun) -> None:
    _, url, _ = run.wait_ready(timeout_s=60)
    index, _ = run.wait_for_line(r" warning: cannot write the server log .*No space left on device", timeout_s=10)
    assert "keeps running" in run.stdout[index]
    assert complete(url, n_predict=2)["tokens_predicted"] == 2
    assert sum("cannot write the server log" in line for line in run.stdout) == 1  # said once
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM
    assert not run.leftover_servers() and "Traceback" not in run.output


def test_a_log_that_cannot_be_written_does_not_stop_the_server(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, home: Path) -> None:
    """The log file is /dev/full: every write fails with ENOSPC, as on a full disk."""
    (home / "state").mkdir(parents=True, mode=0o700)
    (home / "state" / "t.log").symlink_to("/dev/full")
    run = serve(demo_model, "--rpc", rpc_workers().endpoint, "--ctx", "2k")
    assert_keeps_serving_and_says_the_log_failed(run)


@pytest.fixture
def tiny_home(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs as LLAMALAUNCH_HOME: the server log fills it within the first load."""
    mountpoint = tmp_path / "tiny-home"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_under_the_run_state_does_not_stop_the_server(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, tiny_home: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_workers().endpoint, "--ctx", "2k", home=tiny_home)
    assert_keeps_serving_and_says_the_log_failed(run)


# --- signals and ports -----------------------------------------------------------------------------------


def test_sighup_stops_cleanly_with_129(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    run = serve(demo_model, "--rpc", rpc_workers().endpoint, "--ctx", "2k")
    run.wait_ready()
    server = run.server()
    run.send(signal.SIGHUP)
    assert run.wait_exit(timeout_s=20) == 128 + signal.SIGHUP
    assert wait_gone(server.pid, 5) and not run.leftover_servers()
    assert run.state()["phase"] == "stopped" and "Traceback" not in run.output


def test_serve_outlives_the_reader_of_its_output(demo_model: Path, llama_bin_dir: Path, home: Path,
                                                 tmp_path: Path) -> None:
    """`serve | tee log` and Ctrl-C reaches tee first; `serve | head -2`: the next line hit a closed pipe and
    serve died (exit 1, no word), llama-server with it, and status called it a crash. Now it serves on, and
    a later Ctrl-C stops it as one: 130, phase stopped."""
    from llamalaunch.launch.state import read_state, state_path

    argv, env = serve_command(demo_model, "--ctx", "1k", home=home, llama_server=llama_bin_dir / "llama-server",
                              name="piped")
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    try:
        assert " starting: " in process.stdout.readline()  # type: ignore[union-attr]
        process.stdout.close()  # type: ignore[union-attr]  # the reader goes away
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if state_path("piped").exists() and read_state(state_path("piped")).phase == "ready":
                break
            time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "stderr").read_text()
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 128 + signal.SIGINT
        assert read_state(state_path("piped")).phase == "stopped"
        assert "Traceback" not in (tmp_path / "stderr").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_binary_gone_before_a_restart_is_one_line_not_a_traceback(serve: StartServe, demo_model: Path,
                                                                     llama_bin_dir: Path, tmp_path: Path) -> None:
    """A rebuild or reinstall moved llama-server away while serving; then it crashed: the restart raised
    FileNotFoundError through the whole stack."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llama-server").symlink_to(llama_bin_dir / "llama-server")
    run = serve(demo_model, "--ctx", "1k", "--backoff", "0.2",
                env={"LLAMALAUNCH_LLAMA_SERVER": str(bin_dir / "llama-server")})
    run.wait_ready()
    server = run.server()
    (bin_dir / "llama-server").unlink()
    server.kill()
    assert run.wait_exit(timeout_s=20) == 1
    assert run.stderr == [f"error: cannot start {bin_dir / 'llama-server'}: No such file or directory (it was moved "
                          "or removed while serving: put it back, or serve again with --llama-server PATH)"]
    assert run.state()["phase"] == "failed" and not run.leftover_servers()


def test_a_worker_stopped_while_serving_is_said_once(serve: StartServe, rpc_workers: Callable[..., RpcWorker],
                                                    demo_model: Path) -> None:
    """Ctrl-Z on a worker's terminal: its connection stays up and /health says ok, while every request hangs."""
    worker = rpc_workers()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "1k", "--health-interval", "0.5")
    run.wait_ready()
    pid = worker.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        run.wait_for_line(rf"warning: RPC worker {worker.endpoint}: its ggml-rpc-server \(pid {pid}\) is stopped; "
                          rf"requests wait until `kill -CONT {pid}` resumes it", timeout_s=15)
        time.sleep(1.5)  # three more looks: said once
    finally:
        os.kill(pid, signal.SIGCONT)
    assert sum("is stopped; requests wait" in line for line in run.stdout) == 1
    run.send(signal.SIGINT)
    assert run.wait_exit(timeout_s=20) == 128 + signal.SIGINT


def test_a_second_serve_on_the_same_port_fails_and_the_first_keeps_serving(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    port = free_port()
    first = serve(demo_model, "--rpc", rpc_workers().endpoint, "--ctx", "2k", "--port", str(port), name="first")
    _, url, _ = first.wait_ready()
    second = serve(demo_model, "--rpc", rpc_workers().endpoint, "--ctx", "2k", "--port", str(port), name="second")
    assert second.wait_exit(timeout_s=30) != 0
    assert_one_error_line(second, str(port))
    assert not second.servers_seen and " loading: " not in second.output  # refused before starting anything
    assert complete(url, n_predict=2)["tokens_predicted"] == 2
    assert first.process.poll() is None and len(servers_on_port(port)) == 1
    first.send(signal.SIGTERM)
    assert first.wait_exit() == 128 + signal.SIGTERM


# --- safe defaults, seen on a real run ---------------------------------------------------------------


def test_api_key_stays_out_of_argv_logs_and_state_and_the_server_binds_loopback(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, tmp_path: Path) -> None:
    key = "sk-test-4c2f9e1d7b"
    key_file = tmp_path / "api.key"
    key_file.write_text(f"# llama-server key\n{key}\n")
    run = serve(demo_model, "--rpc", rpc_workers().endpoint, "--ctx", "2k", "--api-key-file", str(key_file))
    _, url, _ = run.wait_ready()  # readiness itself needs the key: the launcher read it from the file
    server = run.server()
    with pytest.raises(OSError, match="401"):
        complete(url, n_predict=1)  # no key, no answer
    assert key not in " ".join(server.cmdline()) and str(key_file) in server.cmdline()
    assert key not in run.state_path.read_text() and key not in run.log_path.read_text()
    assert key not in run.output
    for private in (run.state_path, run.log_path):
        assert private.stat().st_mode & 0o077 == 0, oct(private.stat().st_mode)  # 0600
    assert run.state_path.parent.stat().st_mode & 0o077 == 0  # the state folder: 0700
    listening = {c.laddr.ip for c in server.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM


def test_no_process_of_these_tests_is_left(llama_bin_dir: Path) -> None:
    """Run last in this file: no llama-server, worker or keeper started from this test process lives on."""
    me = psutil.Process()
    left = [child for child in me.children(recursive=True) if child.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(c.pid, c.cmdline()) for c in left]
