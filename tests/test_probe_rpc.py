"""The RPC probe against real ggml-rpc-server workers, and against a fake worker for what a real one
cannot be made to do (garbage, stalls, absurd sizes, other versions)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from llamalaunch.errors import BadInputError
from llamalaunch.probe import rpc
from llamalaunch.probe.rpc import (
    WorkerBusyError,
    WorkerClosedError,
    WorkerNotRpcError,
    WorkerRefusedError,
    WorkerReplyError,
    WorkerResetError,
    WorkerSilentError,
    WorkerStalledError,
    WorkerUnreachableError,
    WorkerVersionError,
    probe_worker,
)
from tests.fake_rpc_worker import BusyRpcWorker, FakeRpcWorker, FullBacklog
from tests.support import RpcWorker, free_port, stop_process, wait_for_port

HELLO = bytes([14]) + struct.pack("<Q", 24) + bytes(24)
PHYSICAL_RAM_BYTES = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- helpers shared with test_probe_inventory -------------------------------------------------------

def start_worker_with_args(bin_dir: Path, log_dir: Path, *args: str) -> RpcWorker:
    """A CPU worker with extra options, e.g. `-d CPU,CPU` for a worker exposing two devices."""
    port = free_port()
    log_path = log_dir / f"rpc-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1", *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    worker = RpcWorker(process, port, log_path)
    wait_for_port(port)
    return worker


@contextmanager
def holding_worker(endpoint: str) -> Iterator[socket.socket]:
    """Be the worker's current client (HELLO answered), so that every other client waits."""
    host, port = rpc.parse_endpoint(endpoint)
    with socket.create_connection((host, port), timeout=5) as client:
        client.sendall(HELLO)
        reply = b""
        while len(reply) < 36:  # the worker writes the size and the payload separately
            chunk = client.recv(36 - len(reply))
            assert chunk, "worker hung up"
            reply += chunk
        yield client


@contextmanager
def llama_server_on(bin_dir: Path, model: Path, endpoints: list[str], log_path: Path) -> Iterator[str]:
    """A real llama-server with every layer on the RPC workers; yields its base URL once loaded."""
    port = free_port()
    argv = [str(bin_dir / "llama-server"), "--rpc", ",".join(endpoints), "-m", str(model), "-ngl", "99",
            "-c", "512", "-np", "1", "-t", "1", "--fit", "off", "--host", "127.0.0.1", "--port", str(port),
            "-lv", "4"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path)
        yield url
    finally:
        stop_process(process)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"llama-server exited:\n{log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"llama-server not ready after {timeout_s}s:\n{log_path.read_text()[-3000:]}")


def complete(url: str) -> str:
    body = json.dumps({"prompt": "The capital of France is", "n_predict": 4}).encode()
    request = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return str(json.load(reply)["content"])


@pytest.fixture
def model_path(demo_model: Path) -> Path:
    return demo_model


# --- real workers ---------------------------------------------------------------------------------------

@pytest.mark.llama
def test_probe_real_worker_reports_version_and_host_ram(rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    report = probe_worker(worker.endpoint)
    assert report.endpoint == worker.endpoint
    assert report.version == "7.0.0"
    # A CPU worker reports all physical RAM as both free and total (ggml-cpu: "free is ill-defined").
    assert [(d.index, d.free_bytes, d.total_bytes) for d in report.devices] == [
        (0, PHYSICAL_RAM_BYTES, PHYSICAL_RAM_BYTES)]


@pytest.mark.llama
def test_probe_of_an_idle_worker_takes_milliseconds(rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    times = sorted(probe_worker(worker.endpoint).elapsed_s for _ in range(30))
    median_ms = times[len(times) // 2] * 1000
    print(f"idle probe: median {median_ms:.2f} ms, min {times[0] * 1000:.2f} ms")
    assert median_ms < 50  # seen: ~0.2-0.6 ms on loopback


@pytest.mark.llama
def test_prlimit_does_not_change_what_a_cpu_worker_reports(rpc_workers: Callable[..., RpcWorker]) -> None:
    """An address-space limit is invisible to the worker's memory report: use --budget to describe it."""
    limited = rpc_workers(address_space_bytes=2 << 30)
    report = probe_worker(limited.endpoint)
    reported = [(d.free_bytes, d.total_bytes) for d in report.devices]
    assert reported == [(PHYSICAL_RAM_BYTES, PHYSICAL_RAM_BYTES)]


@pytest.mark.llama
def test_worker_with_two_devices(llama_bin_dir: Path, tmp_path: Path) -> None:
    worker = start_worker_with_args(llama_bin_dir, tmp_path, "-d", "CPU,CPU")
    try:
        report = probe_worker(worker.endpoint)
    finally:
        worker.stop()
    assert [d.index for d in report.devices] == [0, 1]


@pytest.mark.llama
def test_dead_worker_is_refused(rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    worker.stop()
    with pytest.raises(WorkerRefusedError) as caught:
        probe_worker(worker.endpoint)
    assert worker.endpoint in str(caught.value)
    assert caught.value.hint == (f"start one with `llamalaunch worker --port-base {worker.port}` (on loopback), "
                                 "or fix the port in --rpc")


@pytest.mark.llama
def test_busy_worker_is_reported_busy_and_survives(rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    with holding_worker(worker.endpoint):
        started = time.monotonic()
        with pytest.raises(WorkerBusyError) as caught:
            probe_worker(worker.endpoint, reply_timeout_s=0.3)
        assert time.monotonic() - started < 3.0  # the reply timeout, plus starting the waiter process
        assert caught.value.keeper_pid is not None
        assert "busy" in str(caught.value) and "\n" not in str(caught.value)
        time.sleep(0.2)
        assert worker.process.poll() is None
    # The first client left: the worker answers the keeper's HELLO, the keeper closes, nobody dies.
    assert rpc.wait_for_keepers(10)
    time.sleep(0.3)
    assert worker.process.poll() is None, worker.log_path.read_text()
    assert probe_worker(worker.endpoint).version == "7.0.0"


@pytest.mark.llama
def test_busy_probe_from_a_process_that_exits_at_once(rpc_workers: Callable[..., RpcWorker]) -> None:
    """The CLI may exit (even abruptly) long before the worker answers: the keeper outlives it."""
    worker = rpc_workers()
    code = ("import os, sys\nfrom llamalaunch.probe.rpc import probe_worker, WorkerBusyError\n"
            f"try:\n    probe_worker({worker.endpoint!r}, reply_timeout_s=0.3)\n"
            "except WorkerBusyError as exc:\n    print(exc.keeper_pid, flush=True)\n    os._exit(0)\n"
            "os._exit(3)\n")
    with holding_worker(worker.endpoint):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                              cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr
        keeper_pid = int(done.stdout)
        time.sleep(0.3)
        assert psutil.pid_exists(keeper_pid)  # still holding our pending HELLO
    _wait_gone(keeper_pid, 10)
    time.sleep(0.3)
    assert worker.process.poll() is None, worker.log_path.read_text()
    assert probe_worker(worker.endpoint).version == "7.0.0"


@pytest.mark.llama
def test_runs_probing_a_busy_worker_share_one_waiter(rpc_workers: Callable[..., RpcWorker]) -> None:
    """Three CLI runs against a held worker: each says busy and names the holder, one waiter in all;
    the worker survives the holder leaving and answers again."""
    worker = rpc_workers()
    code = ("from llamalaunch.probe.rpc import probe_worker, WorkerBusyError\n"
            f"try:\n    probe_worker({worker.endpoint!r}, connect_timeout_s=0.3, reply_timeout_s=0.3)\n"
            "except WorkerBusyError as exc:\n    print(exc.keeper_pid, exc.message)\n")
    with holding_worker(worker.endpoint):
        said = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                               cwd=Path(__file__).parents[1]).stdout for _ in range(3)]
        assert all("busy serving another client (python" in line and f", pid {os.getpid()})" in line
                   for line in said), said  # this test's own process holds it
        assert len({line.split()[0] for line in said}) == 1, said
        assert len(rpc.keeper_pids(worker.endpoint)) == 1
    deadline = time.monotonic() + 10
    while rpc.keeper_pids(worker.endpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rpc.keeper_pids(worker.endpoint) == []
    time.sleep(0.3)
    assert worker.process.poll() is None, worker.log_path.read_text()
    assert probe_worker(worker.endpoint).version == "7.0.0"


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"keeper {pid} still waiting after {timeout_s}s")


@pytest.mark.llama
def test_probe_leaves_worker_usable_and_busy_probe_does_not_kill_it(
        rpc_workers: Callable[..., RpcWorker], llama_bin_dir: Path, model_path: Path, tmp_path: Path) -> None:
    """Idle probe, then llama-server loads on the worker; a probe while it is attached says busy; the
    worker survives llama-server leaving and serves a second llama-server."""
    worker = rpc_workers()
    probe_worker(worker.endpoint)
    with llama_server_on(llama_bin_dir, model_path, [worker.endpoint], tmp_path / "server1.log") as url:
        assert complete(url)
        with pytest.raises(WorkerBusyError):
            probe_worker(worker.endpoint, reply_timeout_s=0.5)
        assert complete(url)
    assert "RPC0[" in (tmp_path / "server1.log").read_text()  # the layers really were on the worker
    assert rpc.wait_for_keepers(15)
    assert worker.process.poll() is None, worker.log_path.read_text()
    with llama_server_on(llama_bin_dir, model_path, [worker.endpoint], tmp_path / "server2.log") as url:
        assert complete(url)
    assert worker.process.poll() is None


# --- fake workers -------------------------------------------------------------------------------------

def test_fake_good_worker() -> None:
    with FakeRpcWorker("good") as fake:
        report = probe_worker(fake.endpoint)
    assert report.version == "7.0.0"
    assert [(d.index, d.free_bytes, d.total_bytes) for d in report.devices] == [(0, 6 << 30, 8 << 30)]


def test_fake_worker_with_two_devices() -> None:
    with FakeRpcWorker("two_devices") as fake:
        assert len(probe_worker(fake.endpoint).devices) == 2


def test_newer_patch_version_is_accepted() -> None:
    with FakeRpcWorker("patch_9") as fake:
        assert probe_worker(fake.endpoint).version == "7.0.9"


@pytest.mark.parametrize(("behaviour", "error", "words"), [
    ("garbage", WorkerReplyError, "byte reply to command 14"),
    ("oversized", WorkerReplyError, "1099511627776-byte reply"),
    ("short_reply", WorkerClosedError, "short reply"),
    ("close_after_hello", WorkerClosedError, "another RPC protocol version"),
    ("reset", WorkerResetError, "reset the connection at HELLO, before any answer (check that a ggml-rpc-server "
               "of this llama.cpp version listens there, and its log)"),
    ("stall_after_hello", WorkerStalledError, "stopped answering"),
    ("absurd_count", WorkerReplyError, "claims 1000000 devices"),
    ("zero_devices", WorkerReplyError, "no devices"),
    ("absurd_size", WorkerReplyError, "not believable"),
    ("major_8", WorkerVersionError, "v8.0.0, we speak v7.0.0"),
    ("minor_1", WorkerVersionError, "v7.1.0, we speak v7.0.0"),
])
def test_fake_worker_failures_each_have_their_message(behaviour: str, error: type[Exception],
                                                      words: str) -> None:
    with FakeRpcWorker(behaviour) as fake:
        started = time.monotonic()
        with pytest.raises(error) as caught:
            probe_worker(fake.endpoint, reply_timeout_s=0.5)
        assert time.monotonic() - started < 1.5
    message = str(caught.value)
    assert words in message and fake.endpoint in message and "\n" not in message
    assert rpc.wait_for_keepers(5)  # a keeper, if any, gives up when the fake hangs up


def test_slowloris_is_cut_off_at_the_reply_timeout() -> None:
    with FakeRpcWorker("slowloris") as fake:
        started = time.monotonic()
        with pytest.raises(WorkerStalledError):
            probe_worker(fake.endpoint, reply_timeout_s=0.5)
        assert time.monotonic() - started < 1.0
    assert rpc.wait_for_keepers(5)


def test_server_that_accepts_and_never_answers_is_silent_not_busy_and_keeps_the_socket() -> None:
    """It took a second and a third connection: no busy worker does that (its queue holds two)."""
    with FakeRpcWorker("never_answer") as fake:
        with pytest.raises(WorkerSilentError, match="accepts every connection but answered none") as caught:
            probe_worker(fake.endpoint, reply_timeout_s=0.3)
        pid = caught.value.keeper_pid
        assert pid is not None and psutil.pid_exists(pid)  # a hung worker after all? our HELLO stays pending
        time.sleep(0.2)
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # still waiting for our reply
    assert rpc.wait_for_keepers(5)  # the fake hung up: the keeper sees EOF and leaves


def test_busy_worker_keeps_one_waiter_which_leaves_once_answered() -> None:
    busy = BusyRpcWorker()
    try:
        started = time.monotonic()
        with pytest.raises(WorkerBusyError, match="busy serving another client") as first:
            probe_worker(busy.endpoint, reply_timeout_s=0.3)
        assert time.monotonic() - started < 3.0  # reply timeout, a second connection, a third not taken
        started = time.monotonic()
        with pytest.raises(WorkerBusyError, match="an earlier probe from here still waits") as second:
            probe_worker(busy.endpoint, reply_timeout_s=0.3)
        assert time.monotonic() - started < 0.5  # no second connection, no second waiter
        assert second.value.keeper_pid == first.value.keeper_pid
        assert rpc.keeper_pids(busy.endpoint) == [first.value.keeper_pid]
        busy.free()
        assert rpc.wait_for_keepers(5)  # answered: the keeper read the reply and left
        assert busy.hellos == 1
        assert probe_worker(busy.endpoint).version == "7.0.0"
    finally:
        busy.close()


def test_one_waiter_per_worker_across_runs() -> None:
    """Each CLI run is a new process: they share the endpoint's lock, not one waiter per run."""
    busy = BusyRpcWorker()
    code = ("from llamalaunch.probe.rpc import probe_worker, WorkerBusyError\n"
            f"try:\n    probe_worker({busy.endpoint!r}, reply_timeout_s=0.3)\n"
            "except WorkerBusyError as exc:\n    print(exc.keeper_pid, exc)\n")
    try:
        said = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                               cwd=Path(__file__).parents[1]).stdout for _ in range(3)]
        assert all("busy serving another client" in line for line in said), said
        assert len({line.split()[0] for line in said}) == 1, said  # the same keeper each time
        assert "an earlier probe from here still waits" in said[2]
        assert len(rpc.keeper_pids(busy.endpoint)) == 1
    finally:
        busy.free()
        busy.close()


def test_keeper_gives_up_after_its_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc, "KEEP_PENDING_S", 0.5)
    busy = BusyRpcWorker()
    try:
        with pytest.raises(WorkerBusyError) as caught:
            probe_worker(busy.endpoint, reply_timeout_s=0.3)
        _wait_gone(caught.value.keeper_pid or 0, 5)
        # The lock went with the keeper; our reset connections still fill the worker's queue (Linux keeps
        # them there until accepted): the next probe cannot connect, and says busy, not unreachable.
        with pytest.raises(WorkerBusyError, match="still full of earlier probes' connections"):
            probe_worker(busy.endpoint, connect_timeout_s=0.3, reply_timeout_s=0.3)
    finally:
        busy.free()
        busy.close()
    assert rpc.wait_for_keepers(5)


def test_http_server_is_not_an_rpc_server_and_leaves_no_waiter(http_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(WorkerNotRpcError) as caught:
        probe_worker(http_server, reply_timeout_s=0.3)
    assert time.monotonic() - started < 1.5
    assert caught.value.message == (f"RPC worker {http_server}: not a ggml-rpc-server: it answers HTTP "
                                    "(HTTP/1.0 200 OK) and not HELLO")
    assert caught.value.hint == ("check the port in --rpc: that one is a web server's (llama-server's?); "
                                 "start a worker with `llamalaunch worker`")
    assert rpc.keeper_pids(http_server) == [] and rpc.wait_for_keepers(0)


def test_server_that_hangs_up_on_a_second_connection_is_not_an_rpc_server() -> None:
    with FakeRpcWorker("close_after_hello_when_second") as fake, \
            pytest.raises(WorkerNotRpcError, match="hung up on a second connection"):
        probe_worker(fake.endpoint, reply_timeout_s=0.3)
    assert rpc.wait_for_keepers(0)


def test_connect_timeout_when_nobody_accepts() -> None:
    backlog = FullBacklog()
    try:
        started = time.monotonic()
        with pytest.raises(WorkerUnreachableError) as caught:
            probe_worker(backlog.endpoint, connect_timeout_s=0.3)
        assert time.monotonic() - started < 1.0
        assert "no answer to the connection within 0.3 s" in str(caught.value)
    finally:
        backlog.close()


def test_wrong_port_is_refused() -> None:
    with pytest.raises(WorkerRefusedError, match="connection refused"):
        probe_worker(f"127.0.0.1:{free_port()}")


def test_unknown_host() -> None:
    with pytest.raises(WorkerUnreachableError, match="cannot resolve host"):
        probe_worker("no-such-host.invalid:50052")


@pytest.mark.parametrize("endpoint", ["", "localhost", ":50052", "host:", "host:port",
                                      "::1:50052", "[::1]:50052", "host:50052:1", "a b:1", "host: 50052"])
def test_bad_endpoint_syntax(endpoint: str) -> None:
    with pytest.raises(BadInputError, match="is not HOST:PORT"):
        probe_worker(endpoint)


@pytest.mark.parametrize("endpoint", ["host:0", "host:70000"])
def test_endpoint_port_out_of_range_says_so(endpoint: str) -> None:
    with pytest.raises(BadInputError, match=r"port \d+ is out of range \(give a port from 1 to 65535"):
        probe_worker(endpoint)


def test_parse_endpoint() -> None:
    assert rpc.parse_endpoint("10.0.0.5:50052") == ("10.0.0.5", 50052)
    assert rpc.parse_endpoint(" gpu-box:1 ") == ("gpu-box", 1)
