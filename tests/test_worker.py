"""`llamalaunch worker`: specs per GPU (unit), then real ggml-rpc-server processes supervised by the real
command: probe, kill -9 → restarted, SIGTERM → nothing left, sd_notify on a real NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from llamalaunch.errors import BadInputError, LaunchError, ToolchainError
from llamalaunch.launch.notify import Notifier
from llamalaunch.launch.worker import (
    WorkerEvent,
    WorkerGaveUpError,
    WorkerPool,
    WorkerStartError,
    check_host,
    check_ports_free,
    exposure_warning,
    find_rpc_server,
    rpc_option,
    select_gpus,
    worker_specs,
)
from llamalaunch.probe.device import Device
from llamalaunch.probe.rpc import probe_worker
from tests.support import free_port

CLI = ("from llamalaunch.cli import app; from llamalaunch import cli_ops; cli_ops.register(app); "
       "app(prog_name='llamalaunch')")
GPUS = (Device("CUDA0", "CUDA", "RTX 4090", 24 << 30, 24 << 30, 0, uuid="GPU-aaaa"),
        Device("CUDA1", "CUDA", "RTX 2060", 6 << 30, 6 << 30, 1, uuid="GPU-bbbb"),
        Device("CUDA2", "CUDA", "T4", 15 << 30, 15 << 30, 2, uuid="GPU-cccc"))


# --- what runs where (no processes) -----------------------------------------------------------------------


def test_one_worker_per_gpu_pinned_by_uuid_on_port_base_plus_index() -> None:
    specs = worker_specs(Path("/opt/ggml-rpc-server"), select_gpus("0,2", GPUS), "127.0.0.1", 50052)
    assert [(spec.label, spec.port) for spec in specs] == [("CUDA0", 50052), ("CUDA2", 50054)]
    assert specs[1].argv == ("/opt/ggml-rpc-server", "-H", "127.0.0.1", "-p", "50054", "-d", "CUDA0")
    assert dict(specs[1].env) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-cccc"}
    assert rpc_option(specs) == "127.0.0.1:50052,127.0.0.1:50054"


def test_gpu_without_uuid_is_pinned_by_its_pci_ordered_name() -> None:
    gpu = Device("CUDA1", "CUDA", "old card", 1 << 30, 1 << 30, 1)
    (spec,) = worker_specs(Path("rpc"), [gpu], "127.0.0.1", 50052, threads=2)
    assert spec.argv[-4:] == ("-d", "CUDA1", "-t", "2")
    assert dict(spec.env) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_no_gpu_gives_one_cpu_worker_with_gpus_hidden() -> None:
    assert select_gpus("all", ()) == () and select_gpus("cpu", GPUS) == ()
    (spec,) = worker_specs(Path("rpc"), (), "127.0.0.1", 50060, threads=3)
    assert spec.label == "CPU" and spec.port == 50060
    assert spec.argv[-4:] == ("-d", "CPU", "-t", "3") and dict(spec.env)["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(("selection", "message"), [("3", "does not have"), ("0,0", "not all, cpu"),
                                                    ("first", "not all, cpu")])
def test_bad_gpu_selection_is_refused(selection: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        select_gpus(selection, GPUS)


def test_hosts_are_ipv4_and_only_loopback_is_quiet() -> None:
    assert check_host("localhost") == "127.0.0.1"
    for bad in ("::1", "box.lan", "10.0.0"):
        with pytest.raises(BadInputError, match="IPv4"):
            check_host(bad)
    assert exposure_warning("127.0.0.1") is None
    warning = exposure_warning("0.0.0.0")
    assert warning is not None and "no authentication" in warning
    (spec,) = worker_specs(Path("rpc"), (), "0.0.0.0", 50052)
    assert not rpc_option([spec]).startswith("0.0.0.0")  # the main host needs an address it can dial


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (spec,) = worker_specs(Path("rpc"), (), "127.0.0.1", port)
        expected = rf"cannot listen on 127.0.0.1:{port} for CPU.*pid {os.getpid()}"
        with pytest.raises(BadInputError, match=expected):
            check_ports_free([spec])


def test_missing_rpc_server_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMALAUNCH_RPC_SERVER", raising=False)
    with pytest.raises(ToolchainError, match="--rpc-server"):
        find_rpc_server(str(tmp_path / "nothing"))


# --- real ggml-rpc-server processes -----------------------------------------------------------------------


class WorkerCommand:
    """`llamalaunch worker` as a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", CLI, "worker", *args], text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} in {timeout_s}s; saw: {self.seen}")

    def rpc_servers(self) -> list[psutil.Process]:
        return [child for child in psutil.Process(self.process.pid).children(recursive=True)
                if "rpc-server" in child.name()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def start_worker() -> Iterator[type[WorkerCommand]]:
    started: list[WorkerCommand] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> WorkerCommand:
        command = WorkerCommand(args, env)
        started.append(command)
        return command

    yield start  # type: ignore[misc]
    for command in started:
        command.kill()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A real sd_notify datagram socket, as systemd gives a Type=notify service."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def _notifications(sock: socket.socket, until: str) -> list[str]:
    messages: list[str] = []
    while not any(until in message for message in messages):
        messages.append(sock.recv(4096).decode())
    return messages


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pids: list[int], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.llama
def test_worker_serves_restarts_and_stops_cleanly(llama_bin_dir: Path, start_worker: type[WorkerCommand],
                                                  notify_socket: tuple[str, socket.socket]) -> None:
    port = free_port()
    worker = start_worker(["--rpc-server", str(llama_bin_dir / "ggml-rpc-server"), "--port-base", str(port),
                           "--threads", "1"], env={"NOTIFY_SOCKET": notify_socket[0]})
    ready = worker.wait_for("--rpc ")
    endpoint = ready.split("--rpc ")[1].strip()
    assert endpoint == f"127.0.0.1:{port}"
    report = probe_worker(endpoint)
    assert report.version.startswith("7.") and len(report.devices) == 1
    assert any("READY=1" in message and f"--rpc {endpoint}" in message
               for message in _notifications(notify_socket[1], "READY=1"))

    (first,) = worker.rpc_servers()
    first.kill()  # kill -9 the worker's ggml-rpc-server
    assert worker.wait_for("killed by SIGKILL").strip() == f"CPU: ggml-rpc-server was killed by SIGKILL (pid {first.pid})"
    worker.wait_for("listening on")
    (second,) = worker.rpc_servers()
    assert second.pid != first.pid
    assert len(probe_worker(endpoint).devices) == 1

    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(15) == 128 + signal.SIGTERM
    assert _gone([second.pid])
    assert any("STOPPING=1" in message for message in _notifications(notify_socket[1], "STOPPING=1"))


@pytest.mark.llama
def test_killing_the_launcher_takes_its_workers_along(llama_bin_dir: Path,
                                                      start_worker: type[WorkerCommand]) -> None:
    worker = start_worker(["--rpc-server", str(llama_bin_dir / "ggml-rpc-server"), "--port-base",
                           str(free_port()), "-t", "1", "--quiet"])
    worker.wait_for("--rpc ")
    pids = [process.pid for process in worker.rpc_servers()]
    worker.process.kill()  # SIGKILL: no handler runs; the parent-death signal does the work
    worker.process.wait(10)
    assert pids and _gone(pids)


@pytest.mark.llama
def test_port_in_use_stops_the_command_before_anything_starts(llama_bin_dir: Path,
                                                              start_worker: type[WorkerCommand]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        worker = start_worker(["--rpc-server", str(llama_bin_dir / "ggml-rpc-server"),
                               "--port-base", str(port)])
        assert worker.process.wait(20) == 2
        line = worker.wait_for("error:")
        assert f"cannot listen on 127.0.0.1:{port}" in line and "--port-base" in line


@pytest.mark.llama
def test_non_loopback_host_warns_about_authentication(llama_bin_dir: Path,
                                                      start_worker: type[WorkerCommand]) -> None:
    # A taken port stops it before anything listens on the network; the warning comes first.
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        worker = start_worker(["--rpc-server", str(llama_bin_dir / "ggml-rpc-server"), "--host", "0.0.0.0",
                               "--port-base", str(port)])
        assert worker.process.wait(20) == 2
        assert "no authentication" in worker.wait_for("warning:")


@pytest.mark.llama
def test_a_worker_that_cannot_start_says_why(llama_bin_dir: Path) -> None:
    """A CPU build asked for a GPU: ggml-rpc-server's own words and a hint, nothing left running."""
    specs = worker_specs(llama_bin_dir / "ggml-rpc-server", GPUS[:1], "127.0.0.1", free_port())
    events: list[WorkerEvent] = []
    pool = WorkerPool(specs, events.append, notifier=Notifier({}))
    with pytest.raises(WorkerStartError, match="unknown device: CUDA0.*built without that backend"):
        pool.run()
    started = [event.pid for event in events if event.kind == "started"]
    assert started and _gone([pid for pid in started if pid])


@pytest.mark.llama
def test_pool_gives_up_after_max_restarts(llama_bin_dir: Path) -> None:
    specs = worker_specs(llama_bin_dir / "ggml-rpc-server", (), "127.0.0.1", free_port(), threads=1)
    events: list[WorkerEvent] = []

    def kill_each_new_worker(event: WorkerEvent) -> None:
        events.append(event)
        if event.kind == "ready" and event.pid:
            os.kill(event.pid, signal.SIGKILL)

    pool = WorkerPool(specs, kill_each_new_worker, notifier=Notifier({}), max_restarts=1,
                      backoff_initial_s=0.05)
    with pytest.raises(WorkerGaveUpError, match="CPU worker .* died 2 times; last: ggml-rpc-server was killed by SIGKILL"
                       ) as gave_up:
        pool.run()
    assert gave_up.value.hint is not None and "run without -q to see it" in gave_up.value.hint  # -q hid it
    assert [event.kind for event in events].count("restarting") == 1


@pytest.mark.llama
def test_worker_outlives_the_reader_of_its_output(llama_bin_dir: Path) -> None:
    """`worker | head -1`: the next line hit a closed pipe and worker died (exit 1), its ggml-rpc-servers too."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", CLI, "worker", "--rpc-server",
                                str(llama_bin_dir / "ggml-rpc-server"), "--port-base", str(port), "-t", "1"],
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        process.stdout.close()  # the reader goes away before the --rpc line
        endpoint = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(LaunchError):  # not listening yet
                if probe_worker(endpoint).devices:
                    break
            time.sleep(0.3)
        time.sleep(1)  # the lines after the --rpc one
        assert process.poll() is None
        assert len(probe_worker(endpoint).devices) == 1
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 128 + signal.SIGINT
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
