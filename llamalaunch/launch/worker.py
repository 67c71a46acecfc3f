"""`llamalaunch worker`: one ggml-rpc-server per local GPU (or one CPU worker), kept running.

Each GPU worker sees only its own GPU (CUDA_VISIBLE_DEVICES=<uuid>, `-d CUDA0`), so it neither
creates a CUDA context on the other cards nor depends on CUDA's enumeration order. GPU `i` (llama.cpp's
CUDAi on this host) listens on `port_base + i`, whatever `--gpus` selects, so a port always means the
same card. A worker that dies is started again after a doubling delay (reset once it ran a minute).
ggml-rpc-server has no authentication: binding anything but loopback is the caller's explicit choice.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from llamalaunch.errors import BadInputError, LaunchError, ToolchainError
from llamalaunch.launch.failures import describe_exit
from llamalaunch.launch.notify import Notifier
from llamalaunch.launch.process import (
    Child,
    ChildEvent,
    ChildExit,
    ChildLine,
    PopenFactory,
    StopFlag,
    stop_on_signals,
)
from llamalaunch.launch.restart import RestartPolicy, Restarts
from llamalaunch.options import DEFAULTS
from llamalaunch.probe.device import Device

DEFAULT_PORT_BASE: int = DEFAULTS["worker.port_base"]
DEFAULT_HOST: str = DEFAULTS["worker.host"]
RPC_SERVER_ENV = "LLAMALAUNCH_RPC_SERVER"
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")  # older builds named it rpc-server
READY_TIMEOUT_S = 30.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a worker up this long starts its next backoff from the beginning
_POLL_S = 0.05
_TAIL_LINES = 8


class WorkerStartError(LaunchError):
    """A worker exited or never listened while starting: its own last lines say why."""


class WorkerGaveUpError(LaunchError):
    """A worker crashed more often than --max-restarts allows."""


@dataclass(frozen=True)
class WorkerSpec:
    """One ggml-rpc-server to run: its label (CUDA0, CPU), where it listens, its argv and extra env."""

    label: str
    description: str
    host: str
    port: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class WorkerEvent:
    kind: str  # "started", "ready", "all-ready", "line", "exited", "restarting", "stopping", "stopped"
    worker: str  # the label; "" for the whole pool
    message: str
    pid: int | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class WorkerState:
    """One worker as the pool sees it now (for `worker --metrics-port`)."""

    label: str
    description: str
    endpoint: str
    host: str
    port: int
    pid: int | None  # while it runs
    alive: bool  # running and listening
    restarts: int


@dataclass(frozen=True)
class WorkerRequest:
    """`llamalaunch worker`'s options; the defaults are the option table's (options.py)."""

    gpus: str = DEFAULTS["worker.gpus"]
    port_base: int = DEFAULTS["worker.port_base"]
    host: str = DEFAULTS["worker.host"]
    threads: int | None = DEFAULTS["worker.threads"]
    rpc_server: str | None = DEFAULTS["worker.rpc_server"]
    llama_server: str | None = DEFAULTS["llama_server"]
    max_restarts: int | None = DEFAULTS["worker.max_restarts"]


def prepare_workers(request: WorkerRequest, on_message: Callable[[str, str], None]) -> tuple[WorkerSpec, ...]:
    """The workers `request` asks for, checked (host, binary, GPUs, free ports) before any starts.

    `on_message(kind, text)` gets a "warning" (listening beyond loopback) and "note"s as they arise.
    """
    from llamalaunch.probe.gpus import GpuProbe, probe_local_gpus

    bind = check_host(request.host)
    if warning := exposure_warning(bind):
        on_message("warning", warning)
    binary = find_rpc_server(request.rpc_server, request.llama_server)
    cpu_only = request.gpus.strip().lower() == "cpu"
    probe = GpuProbe(()) if cpu_only else probe_local_gpus()
    selected = select_gpus(request.gpus, probe.devices, probe.reason)
    if not selected and probe.reason and not cpu_only:
        on_message("note", f"no GPU ({probe.reason}); serving the CPU")
    specs = worker_specs(binary, selected, bind, request.port_base, request.threads)
    check_ports_free(specs)
    return specs


def run_workers(specs: Sequence[WorkerSpec], on_event: Callable[[WorkerEvent], None],
                max_restarts: int | None = None,
                attach: Callable[[WorkerPool], AbstractContextManager[object]] | None = None) -> int:
    """Run the workers until SIGINT/SIGTERM; returns 128 + the signal. `attach` wraps the run with what
    watches the pool (the CLI's /metrics server)."""
    pool = WorkerPool(specs, on_event, max_restarts=max_restarts)
    with attach(pool) if attach is not None else contextlib.nullcontext(), stop_on_signals(pool.request_stop):
        return pool.run()


# --- what to run ---------------------------------------------------------------------------------


def find_rpc_server(option: str | None = None, llama_server: str | None = None) -> Path:
    """--rpc-server > $LLAMALAUNCH_RPC_SERVER > beside llama-server (toolchain discovery) > PATH.

    Raises:
        ToolchainError: none found, or a given path is not an executable file.
    """
    from llamalaunch.toolchain.discover import INSTALL_HINT, SERVER_ENV, find_toolchain, given_by, given_hint

    given = option or os.environ.get(RPC_SERVER_ENV)
    if given:
        path = Path(given).expanduser()
        if "/" not in given and not path.exists():
            path = Path(shutil.which(given) or given)
        where = given_by(option, "--rpc-server", RPC_SERVER_ENV) if option else RPC_SERVER_ENV
        if path.is_dir():
            inside = next((path / name for name in RPC_SERVER_NAMES if (path / name).exists()), None)
            if inside is None:
                raise ToolchainError(f"{path} (from {where}) is a folder with no {RPC_SERVER_NAMES[0]} in it",
                                     f"give the path of the {RPC_SERVER_NAMES[0]} binary, or of the folder that "
                                     "holds it")
            path = inside
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"{path} (from {where}) is not an executable ggml-rpc-server", given_hint(where))
        return path
    beside: ToolchainError | None = None
    try:
        toolchain = find_toolchain(llama_server)
        if toolchain.rpc_server is not None:
            return toolchain.rpc_server.path
    except ToolchainError as error:
        beside = error
    for name in RPC_SERVER_NAMES:
        if found := shutil.which(name):
            return Path(found)
    if beside is not None and (llama_server or os.environ.get(SERVER_ENV)):
        raise beside  # the llama-server given is wrong: that is what to fix, not a variable to set
    raise ToolchainError("ggml-rpc-server not found (searched --rpc-server, LLAMALAUNCH_RPC_SERVER, beside "
                         "llama-server and PATH)", f"pass --rpc-server PATH, or {INSTALL_HINT}")


def check_host(host: str) -> str:
    """The IPv4 address ggml-rpc-server can bind (it parses the host with inet_addr: no names, no IPv6)."""
    text = "127.0.0.1" if host.strip() == "localhost" else host.strip()
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise BadInputError(f"--host {host!r} is not an IPv4 address", "ggml-rpc-server binds an IPv4 "
                            "address: 127.0.0.1, a LAN address, or 0.0.0.0") from None


def is_loopback(host: str) -> bool:
    return ipaddress.IPv4Address(host).is_loopback


def exposure_warning(host: str) -> str | None:
    """The warning to print when workers listen beyond this machine; None on loopback."""
    if is_loopback(host):
        return None
    return (f"ggml-rpc-server on {host} has no authentication: anyone who can reach these ports can run "
            "code on this machine's GPUs and read or overwrite their memory; bind only on a trusted "
            "network (or use a firewall or an SSH tunnel)")


def select_gpus(selection: str, gpus: Sequence[Device], reason: str | None = None) -> tuple[Device, ...]:
    """The GPUs `--gpus` names (all, cpu, or CUDA indices like 0,2); () means one CPU worker.

    Raises:
        BadInputError: an index names no GPU here, or the selection is not all/cpu/indices.
    """
    text = selection.strip().lower().replace(" ", "")
    if text == "cpu":
        return ()
    if text == "all":
        return tuple(gpus)
    parts = text.split(",")
    if not all(part.isdigit() for part in parts) or len(set(parts)) != len(parts):
        raise BadInputError(f"--gpus {selection!r} is not all, cpu or GPU indices",
                            "write it like --gpus 0,2")
    by_name = {gpu.name: gpu for gpu in gpus}
    missing = [part for part in parts if f"CUDA{int(part)}" not in by_name]
    if missing:
        have = ", ".join(sorted(gpu.name.removeprefix("CUDA") for gpu in gpus)) or "none"
        raise BadInputError(f"--gpus names GPU {', '.join(missing)}, which this machine does not have "
                            f"(GPUs: {have}{'; ' + reason if reason and not gpus else ''})",
                            "use --gpus all, --gpus cpu, or indices from `llamalaunch devices`")
    return tuple(by_name[f"CUDA{int(part)}"] for part in parts)


def worker_specs(rpc_server: Path, gpus: Sequence[Device], host: str, port_base: int,
                 threads: int | None = None) -> tuple[WorkerSpec, ...]:
    """One spec per GPU (port = port_base + CUDA index), or one CPU worker on port_base when none."""
    if not gpus:
        cpu_threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
        argv = (str(rpc_server), "-H", host, "-p", str(port_base), "-d", "CPU", "-t", str(cpu_threads))
        # Hidden GPUs: a GPU build would otherwise serve every card instead of the CPU.
        return (WorkerSpec("CPU", "host CPU and RAM", host, _port(port_base, 0), argv,
                           (("CUDA_VISIBLE_DEVICES", ""), ("HIP_VISIBLE_DEVICES", ""))),)
    specs = []
    for gpu in gpus:
        port = _port(port_base, gpu.order)
        # The UUID pins the card whatever the order; without one, PCI order matches our numbering.
        env: tuple[tuple[str, str], ...] = (("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),)
        if gpu.uuid:
            env += (("CUDA_VISIBLE_DEVICES", gpu.uuid),)
        device = "CUDA0" if gpu.uuid else gpu.name
        argv = (str(rpc_server), "-H", host, "-p", str(port), "-d", device,
                *(("-t", str(threads)) if threads else ()))
        specs.append(WorkerSpec(gpu.name, gpu.description, host, port, argv, env))
    return tuple(specs)


def _port(port_base: int, offset: int) -> int:
    port = port_base + offset
    if not 0 < port < 65536:
        raise BadInputError(f"--port-base {port_base} gives port {port}, outside 1-65535",
                            "lower --port-base")
    return port


def check_ports_free(specs: Sequence[WorkerSpec]) -> None:
    """Refuse before starting anything when a port is taken (ggml-rpc-server would exit 0 silently)."""
    for spec in specs:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Like ggml-rpc-server itself: a TIME_WAIT left by an earlier run is no conflict.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((spec.host, spec.port))
            except OSError as error:
                owner = _port_owner(spec.port)
                raise BadInputError(
                    f"cannot listen on {spec.endpoint} for {spec.label}: {error.strerror}"
                    + (f" ({owner} listens there)" if owner else ""),
                    "choose another --port-base, or stop what listens there") from None


def _port_owner(port: int) -> str | None:
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f"pid {conn.pid} {psutil.Process(conn.pid).name()}"
    return None


def rpc_option(specs: Sequence[WorkerSpec]) -> str:
    """The `--rpc` value for the main host: these workers' endpoints as the main host should dial them."""
    return ",".join(f"{_advertised_host(spec.host)}:{spec.port}" for spec in specs)


def _advertised_host(host: str) -> str:
    if host != "0.0.0.0":
        return host
    # The address of the interface holding the default route; a UDP connect sends nothing.
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        return str(probe.getsockname()[0])
    return socket.gethostname()


# --- supervision ---------------------------------------------------------------------------------


def _listening(spec: WorkerSpec) -> bool:
    """Connect and close without sending: harmless to a ggml-rpc-server (DESIGN.md §3)."""
    dial = "127.0.0.1" if spec.host == "0.0.0.0" else spec.host
    try:
        with socket.create_connection((dial, spec.port), timeout=0.2):
            return True
    except OSError:
        return False


def worker_exit(returncode: int) -> str:
    return describe_exit(returncode, "ggml-rpc-server")


class _Slot:
    """One worker's running child and its restart bookkeeping."""

    def __init__(self, spec: WorkerSpec, policy: RestartPolicy) -> None:
        self.spec = spec
        self.child: Child | None = None
        self.events: queue.Queue[ChildEvent] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.listening = False
        self.restart_at: float | None = None
        self.restarts = Restarts(policy)


class WorkerPool:
    """Runs the workers until `request_stop`; restarts any that dies, with a bounded backoff."""

    def __init__(self, specs: Sequence[WorkerSpec], on_event: Callable[[WorkerEvent], None],
                 notifier: Notifier | None = None, max_restarts: int | None = None,
                 backoff_initial_s: float = BACKOFF_INITIAL_S, backoff_max_s: float = BACKOFF_MAX_S,
                 stable_after_s: float = STABLE_AFTER_S, ready_timeout_s: float = READY_TIMEOUT_S,
                 popen: PopenFactory = subprocess.Popen) -> None:
        # --max-restarts counts every restart of a worker, however long it ran
        policy = RestartPolicy(backoff_initial_s, backoff_max_s, stable_after_s, max_restarts, limit_counts_all=True)
        self.slots = [_Slot(spec, policy) for spec in specs]
        self.on_event = on_event
        self.notifier = notifier or Notifier()
        self.ready_timeout_s = ready_timeout_s
        self.popen = popen
        self._stop = StopFlag()
        self._signum = 0

    @property
    def rpc(self) -> str:
        return rpc_option([slot.spec for slot in self.slots])

    def request_stop(self, signum: int) -> None:
        """Safe from a signal handler: the loop does the stopping."""
        self._signum = signum
        self._stop.set()

    def states(self) -> tuple[WorkerState, ...]:
        """Each worker now; safe from another thread (it only reads)."""
        found = []
        for slot in self.slots:
            child = slot.child
            running = child is not None and child.running()
            found.append(WorkerState(slot.spec.label, slot.spec.description, slot.spec.endpoint,
                                     "127.0.0.1" if slot.spec.host == "0.0.0.0" else slot.spec.host,
                                     slot.spec.port, child.pid if child is not None and running else None,
                                     running and slot.listening, slot.restarts.total))
        return tuple(found)

    def run(self) -> int:
        """Start all, supervise until a stop request; returns 128 + the signal number.

        Raises:
            WorkerStartError: a worker did not come up the first time (nothing is left running).
            WorkerGaveUpError: a worker crashed more than `max_restarts` times.
        """
        try:
            if not self._start_all():
                return 128 + self._signum
            self.on_event(WorkerEvent("all-ready", "", self.rpc))
            self.notifier.ready(f"{len(self.slots)} RPC worker(s): --rpc {self.rpc}")
            while not self._stop.wait(_POLL_S):
                for slot in self.slots:
                    self._tend(slot)
            return 128 + self._signum
        finally:
            self._stop_all()

    def _start(self, slot: _Slot) -> None:
        env = {**os.environ, **dict(slot.spec.env)}
        slot.events = queue.Queue()
        # Started from the loop's own (main) thread: the parent-death signal follows the thread that forked.
        slot.child = Child(slot.spec.argv, env, slot.events, popen=self.popen)
        slot.restarts.up()  # up stable_after_s before it dies: the next backoff starts from the first delay
        slot.listening = False
        slot.restart_at = None
        where = f"{slot.spec.description} on {slot.spec.endpoint}"
        self.on_event(WorkerEvent("started", slot.spec.label, where, slot.child.pid))

    def _start_all(self) -> bool:
        for slot in self.slots:
            self._start(slot)
        deadline = time.monotonic() + self.ready_timeout_s
        while not all(slot.listening for slot in self.slots):
            if self._stop.wait(_POLL_S):
                return False
            for slot in self.slots:
                exited = self._drain(slot)
                if exited is None and slot.child is not None and not slot.child.running():
                    exited = self._drain(slot, wait_exit=True)  # its last lines come before its exit
                if exited is not None:
                    raise WorkerStartError(f"{slot.spec.label} worker ({slot.spec.endpoint}) stopped while "
                                           f"starting, {worker_exit(exited.returncode)}: "
                                           + (" | ".join(slot.tail) or "no output"), _start_hint(slot.tail))
                if not slot.listening and _listening(slot.spec):
                    slot.listening = True
                    self.on_event(WorkerEvent("ready", slot.spec.label, slot.spec.endpoint, slot.child.pid
                                              if slot.child else None))
            if time.monotonic() > deadline:
                late = [slot.spec.label for slot in self.slots if not slot.listening]
                raise WorkerStartError(f"{', '.join(late)} did not listen within "
                                       f"{self.ready_timeout_s:.0f} s", "look at the worker's output above")
        return True

    def _drain(self, slot: _Slot, wait_exit: bool = False) -> ChildExit | None:
        """Pass the child's lines on; return its exit when it has come (wait for it with wait_exit)."""
        while True:
            try:
                event = slot.events.get(timeout=2.0) if wait_exit else slot.events.get_nowait()
            except queue.Empty:
                return None
            if isinstance(event, ChildLine):
                if event.text.strip():
                    slot.tail.append(event.text.strip())
                    pid = slot.child.pid if slot.child else None
                    self.on_event(WorkerEvent("line", slot.spec.label, event.text, pid))
            else:
                return event

    def _tend(self, slot: _Slot) -> None:
        now = time.monotonic()
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                self._start(slot)
            return
        exit_event = self._drain(slot)
        if exit_event is not None:
            self._schedule_restart(slot, exit_event, now)
        elif not slot.listening and slot.child is not None and _listening(slot.spec):
            slot.listening = True
            where = f"{slot.spec.endpoint} (restart {slot.restarts.total})"
            self.on_event(WorkerEvent("ready", slot.spec.label, where, slot.child.pid))
            self.notifier.status(f"{len(self.slots)} RPC worker(s): --rpc {self.rpc}; {slot.spec.label} "
                                 f"restarted {slot.restarts.total}x")

    def _schedule_restart(self, slot: _Slot, exit_event: ChildExit, now: float) -> None:
        pid = slot.child.pid if slot.child else None
        self.on_event(WorkerEvent("exited", slot.spec.label, worker_exit(exit_event.returncode), pid))
        restart = slot.restarts.died()
        if restart.delay_s is None:
            raise WorkerGaveUpError(f"{slot.spec.label} worker ({slot.spec.endpoint}) died "
                                    f"{restart.number} times; last: {worker_exit(exit_event.returncode)}",
                                    "its own output above says why (run without -q to see it); raise "
                                    "--max-restarts to keep trying")
        delay = restart.delay_s
        slot.child = None
        slot.restart_at = now + delay
        when = f"in {delay:.1f} s (restart {restart.number})"
        self.on_event(WorkerEvent("restarting", slot.spec.label, when))
        self.notifier.status(f"{slot.spec.label} worker died ({worker_exit(exit_event.returncode)}); "
                             f"restarting in {delay:.0f} s")

    def _stop_all(self) -> None:
        running = [slot for slot in self.slots if slot.child is not None and slot.child.running()]
        if running or self._stop.is_set():
            self.notifier.stopping()
            self.on_event(WorkerEvent("stopping", "", f"{len(running)} worker(s)"))
        for slot in running:  # TERM to all first: they stop together, not one after another
            assert slot.child is not None
            slot.child.signal_group(signal.SIGTERM)
        for slot in running:
            assert slot.child is not None
            slot.child.stop()
            self._drain(slot)
        if running:
            self.on_event(WorkerEvent("stopped", "", f"{len(running)} worker(s)"))


def _start_hint(tail: Sequence[str]) -> str:
    text = " ".join(tail)
    if "unknown device" in text:
        return "this ggml-rpc-server was built without that backend: build it with CUDA, or use --gpus cpu"
    if "Failed to create server socket" in text:
        return "the port is taken or the address is not this machine's: choose another --port-base or --host"
    return "run the worker's command by hand to see more"


