"""`/metrics` for Prometheus: the StatusSnapshot `status` shows, rendered in the Prometheus text format.

One source, three renderings: `status` (a table), `status --json` and this endpoint all read the
snapshot `observe.collector` builds. prometheus-client writes the format and serves it; nothing here
hand-writes exposition text. Scraping must not disturb the server: one snapshot at most every
SNAPSHOT_MAX_AGE_S however many scrapers ask (so NVML and llama-server's own endpoints are asked at most
once a second), a scrape never waits on another longer than SCRAPE_WAIT_S, and serve's collector never
probes a worker (see observe.live_memory); `llamalaunch worker` probes only workers no client holds.
"""

from __future__ import annotations

import errno
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psutil
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.launch.worker import WorkerState
from llamalaunch.observe.live_memory import ProbeWorker, quick_probe
from llamalaunch.observe.snapshot import DeviceStatus, StatusSnapshot
from llamalaunch.probe.rpc import RpcProbeError, WorkerBusyError

PREFIX = "llamalaunch_"
SERVER_PREFIX = "llamalaunch_server_"  # llama-server's own `llamacpp:` metrics, relayed
SNAPSHOT_MAX_AGE_S = 1.0
SCRAPE_WAIT_S = 5.0
# Every phase a serve run reports; "planning" is the supervisor's "starting" (it plans, or re-plans).
PHASES = ("planning", "loading", "ready", "not answering", "restarting", "stopping", "stopped", "failed")
COMPONENTS = ("weights", "kv", "compute", "overhead")
DEVICE_LABELS = ("device", "backend", "id")  # id: the GPU's UUID, or the RPC worker's endpoint
_OOM = re.compile(r"out of memory on (?P<device>\S+) allocating (?P<buffer>\w+)")

T = TypeVar("T")


class SnapshotCache(Generic[T]):
    """One collection shared by every scrape within `max_age_s`; a scrape that would wait longer than
    `wait_s` behind a slow collection gets the last snapshot instead (stale, but bounded in time)."""

    def __init__(self, collect: Callable[[], T], max_age_s: float = SNAPSHOT_MAX_AGE_S,
                 wait_s: float = SCRAPE_WAIT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._collect = collect
        self.max_age_s = max_age_s
        self.wait_s = wait_s
        self.clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._taken_at = float("-inf")  # when the snapshot was collected: its age
        self._tried_at = float("-inf")  # when a collection last ran, failed or not: the rate limit
        self.collections = 0
        self.errors = 0
        self.last_duration_s = 0.0
        self.last_error: str | None = None

    def get(self) -> tuple[T | None, float]:
        """The snapshot and its age in seconds (None before any collection succeeded)."""
        if self._lock.acquire(timeout=self.wait_s):
            try:
                if self.clock() - self._tried_at >= self.max_age_s:
                    self._refresh()
            finally:
                self._lock.release()
        return self._value, self.clock() - self._taken_at

    def _refresh(self) -> None:
        started = self.clock()
        try:
            self._value = self._collect()
            self._taken_at = self.clock()
            self.last_error = None
        except LaunchError as error:  # the state file vanished, ...: the last snapshot stands, its age grows
            self.errors += 1
            self.last_error = error.message
        self.collections += 1
        self._tried_at = self.clock()  # a failing collection (state file gone mid-restart) is not retried per scrape
        self.last_duration_s = self._tried_at - started


def _scrape_families(cache: SnapshotCache[T], age_s: float) -> Iterator[Metric]:
    yield _gauge("snapshot_age_seconds", "Seconds since the figures below were collected (at most one "
                 "collection a second, shared by all scrapers).", age_s if age_s != float("inf") else -1)
    yield _gauge("collect_duration_seconds", "How long the last collection took.", cache.last_duration_s)
    errors = CounterMetricFamily(PREFIX + "collect_errors", "Collections that failed (the last snapshot stood).")
    errors.add_metric([], cache.errors)
    yield errors
    collections = CounterMetricFamily(PREFIX + "collections", "Snapshots collected (scrapes within a second "
                                      "of the last collection share it).")
    collections.add_metric([], cache.collections)
    yield collections


def _gauge(name: str, doc: str, value: float | None, labels: Sequence[str] = (),
           values: Sequence[str] = ()) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    if value is not None:
        family.add_metric(list(values), float(value))
    return family


# --- serve -----------------------------------------------------------------------------------------


class ServeMetrics:
    """A prometheus-client collector over a serve run's snapshots."""

    def __init__(self, cache: SnapshotCache[StatusSnapshot]) -> None:
        self.cache = cache

    def describe(self) -> list[Metric]:
        return []  # nothing is collected at registration

    def collect(self) -> Iterator[Metric]:
        snapshot, age_s = self.cache.get()
        yield from _scrape_families(self.cache, age_s)
        if snapshot is not None:
            yield from snapshot_families(snapshot)


def phase_name(phase: str) -> str:
    return "planning" if phase == "starting" else phase


def snapshot_families(snapshot: StatusSnapshot) -> Iterator[Metric]:
    """Every metric of one serve snapshot: run, plan, devices, host, and llama-server's own."""
    yield from _run_families(snapshot)
    yield from _device_families(snapshot.devices)
    yield from _host_families(snapshot)
    yield from relayed_families(snapshot.stats.metrics_text)


def _run_families(snapshot: StatusSnapshot) -> Iterator[Metric]:
    info = InfoMetricFamily(PREFIX + "run", "The serve run: its name, model and URL.")
    info.add_metric([], {"name": snapshot.name or "", "model": snapshot.model_name or "",
                         "arch": snapshot.model_arch or "", "path": snapshot.model_path or "", "url": snapshot.url})
    yield info
    phase = phase_name(snapshot.phase)
    family = GaugeMetricFamily(PREFIX + "phase", "1 for the phase the server is in (planning, loading, ready, "
                               "restarting, failed, ...), 0 for the others.", labels=["phase"])
    for name in (*PHASES, *(() if phase in PHASES else (phase,))):
        family.add_metric([name], 1.0 if name == phase else 0.0)
    yield family
    yield _gauge("up", "1 while llama-server answers /health with ok.", float(snapshot.stats.health == "ok"))
    yield _gauge("ready_since_timestamp_seconds", "When the server last became ready (Unix time).",
                 snapshot.ready_at if snapshot.phase == "ready" else None)
    yield _gauge("restarts", "Restarts after crashes in the current streak (back to 0 after 10 minutes "
                 "ready).", snapshot.restarts)
    made = CounterMetricFamily(PREFIX + "restarts_made", "Restarts of llama-server in this run, every one (a "
                               "counter: rate() over it counts crashes).")
    made.add_metric([], snapshot.restarts_total)
    yield made
    yield _gauge("last_exit_code", "llama-server's last exit status (negative: killed by that signal).",
                 snapshot.last_exit_code)
    yield from _oom_families(snapshot)
    yield _gauge("context_tokens", "The plan's context (-c).", snapshot.ctx_tokens)
    yield _gauge("gpu_layers", "Slots offloaded (-ngl).", snapshot.n_gpu_layers)
    yield _gauge("model_slots", "The model's slots (blocks + the output layer).", snapshot.n_slots)
    yield _gauge("slots_total", "llama-server's slots (-np).", snapshot.stats.slots_total)
    yield _gauge("host_expert_layers", "MoE layers whose routed experts stay in host memory, all or some of them "
                 "(as the plan counts: with the devices' llamalaunch_device_expert_layers, every MoE layer once).",
                 snapshot.host_expert_layers)
    estimate = GaugeMetricFamily(PREFIX + "estimated_tokens_per_second", "The plan's speed estimate, before "
                                 "launch (compare with llamalaunch_server_*_seconds_total).", labels=["kind"])
    for kind, tps in zip(("prompt", "generation"), snapshot.estimated_tps or (None, None)):
        if tps is not None:
            estimate.add_metric([kind], tps)
    yield estimate


def _oom_families(snapshot: StatusSnapshot) -> Iterator[Metric]:
    counts: dict[tuple[str, str], int] = {}
    for attempt in snapshot.attempts:
        match = _OOM.search(attempt.outcome)
        key = (match.group("device"), match.group("buffer")) if match else ("", "other")
        counts[key] = counts.get(key, 0) + 1
    family = CounterMetricFamily(PREFIX + "oom_replans", "Loads that ran out of memory and were re-planned "
                                 "smaller, by device and the buffer that failed.", labels=["device", "buffer"])
    for (device, buffer), count in sorted(counts.items()):
        family.add_metric([device, buffer], count)
    yield family
    if snapshot.attempts:
        last = snapshot.attempts[-1]
        info = InfoMetricFamily(PREFIX + "last_oom_replan", "Why the last load ran out of memory, and what "
                                "the next plan does about it.")
        info.add_metric([], {"attempt": str(last.number), "ctx": str(last.ctx_tokens), "layers": last.layers,
                             "reason": last.outcome})
        yield info


def _device_labels(device: DeviceStatus) -> list[str]:
    return [device.name, device.backend, device.uuid or device.endpoint or ""]


def _device_families(devices: Sequence[DeviceStatus]) -> Iterator[Metric]:
    def family(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(PREFIX + "device_" + name, doc, labels=[*DEVICE_LABELS, *extra])

    planned = family("planned_bytes", "Bytes the plan puts on the device, by component.", ["component"])
    allocated = family("allocated_bytes", "Bytes llama.cpp allocated there (its own buffer sizes, from the "
                       "server log), by component.", ["component"])
    used = family("used_bytes", "Bytes in use on the device now (see llamalaunch_device_memory_source).")
    free = family("free_bytes", "Bytes free on the device now.")
    total = family("total_bytes", "The device's memory.")
    source = family("memory_source", "Where used/free come from: nvml, rpc probe, log or plan.", ["source"])
    layers = family("layers", "Slots (layers) the plan puts on the device.")
    experts = family("expert_layers", "MoE layers whose routed experts the device holds.")
    moe = family("moe_layers", "MoE layers on the device.")
    excluded = family("excluded", "1 when the plan leaves the device out.")
    for device in devices:
        labels = _device_labels(device)
        for component, value in zip(COMPONENTS, (device.planned_weights_bytes, device.planned_kv_bytes,
                                                 device.planned_compute_bytes, device.planned_overhead_bytes)):
            planned.add_metric([*labels, component], value)
        for component, actual in zip(COMPONENTS, (device.actual_weights_bytes, device.actual_kv_bytes,
                                                  device.actual_compute_bytes)):
            if actual is not None:
                allocated.add_metric([*labels, component], actual)
        if device.used_bytes is not None:
            used.add_metric(labels, device.used_bytes)
        if device.free_bytes is not None:
            free.add_metric(labels, device.free_bytes)
        if device.total_bytes is not None:
            total.add_metric(labels, device.total_bytes)
        source.add_metric([*labels, device.memory_source], 1.0)
        layers.add_metric(labels, device.n_layers)
        experts.add_metric(labels, device.expert_layers)
        moe.add_metric(labels, device.moe_layers)
        excluded.add_metric(labels, float(device.excluded))
    yield from (planned, allocated, used, free, total, source, layers, experts, moe, excluded)


def _host_families(snapshot: StatusSnapshot) -> Iterator[Metric]:
    host = snapshot.host
    if host is None:
        return
    planned = GaugeMetricFamily(PREFIX + "host_planned_bytes", "Host memory the plan needs, by component.",
                                labels=["component"])
    for component, value in zip(COMPONENTS, (host.planned_weights_bytes, host.planned_kv_bytes,
                                             host.planned_compute_bytes)):
        planned.add_metric([component], value)
    yield planned
    yield _gauge("host_allocated_bytes", "Host buffers llama.cpp reported (mapped weights, CPU compute, "
                 "output).", host.actual_bytes)
    yield _gauge("host_server_rss_bytes", "llama-server's resident memory.", host.server_rss_bytes)
    yield _gauge("host_free_bytes", "Host memory available now.", host.free_bytes)
    yield _gauge("host_total_bytes", "Host memory.", host.total_bytes)


def relayed_families(text: str | None) -> Iterator[Metric]:
    """llama-server's `/metrics` (`llamacpp:NAME`) as `llamalaunch_server_NAME`, types and help kept."""
    if not text:
        return
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return  # not the text format: nothing relayed rather than a failed scrape
    for family in families:
        name = _relayed_name(family.name)
        if name is None:
            continue
        copy = Metric(name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            renamed = _relayed_name(sample.name)
            if renamed is not None:
                copy.add_sample(renamed, dict(sample.labels), sample.value, sample.timestamp)
        yield copy


def _relayed_name(name: str) -> str | None:
    bare = name.split(":", 1)[1] if name.startswith("llamacpp:") else None
    return SERVER_PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", bare) if bare else None


# --- llamalaunch worker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerMemory:
    """One device of a worker (its own index), as its last idle probe found it."""

    index: int
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerMetricsRow:
    """One ggml-rpc-server of `llamalaunch worker`."""

    label: str  # CUDA0, CPU
    description: str
    endpoint: str
    alive: bool  # running and listening
    restarts: int
    busy: bool  # a client (a llama-server) holds it: not probed
    memory: tuple[WorkerMemory, ...] = ()
    memory_age_s: float | None = None  # since the probe that found `memory`
    probe_error: str | None = None


def client_connected(pid: int, port: int) -> bool:
    """Whether the worker `pid` has a client on `port` (a ggml-rpc-server serves one at a time)."""
    try:
        process = psutil.Process(pid)
        connections = process.net_connections("tcp") if hasattr(process, "net_connections") \
            else process.connections("tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port for c in connections)


class WorkerProbe:
    """`llamalaunch worker`'s rows: alive and restarts from the pool; memory from a probe of each worker
    no client holds (never of a busy one: see DESIGN.md on SIGPIPE), else the last idle probe's figures."""

    def __init__(self, states: Callable[[], Sequence[WorkerState]], probe: ProbeWorker = quick_probe,
                 has_client: Callable[[int, int], bool] = client_connected,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.states = states
        self.probe = probe
        self.has_client = has_client
        self.clock = clock
        self._memory: dict[str, tuple[tuple[WorkerMemory, ...], float]] = {}

    def rows(self) -> tuple[WorkerMetricsRow, ...]:
        return tuple(self._row(state) for state in self.states())

    def _row(self, state: WorkerState) -> WorkerMetricsRow:
        busy = state.pid is not None and self.has_client(state.pid, state.port)
        error = None
        if state.alive and not busy:
            try:
                report = self.probe(f"{state.host}:{state.port}")
                memory = tuple(WorkerMemory(d.index, d.free_bytes, d.total_bytes) for d in report.devices)
                self._memory[state.endpoint] = (memory, self.clock())
            except RpcProbeError as failure:  # a client came between the look and the probe: busy after all
                busy = isinstance(failure, WorkerBusyError)
                error = failure.message
        memory, probed_at = self._memory.get(state.endpoint, ((), None))
        return WorkerMetricsRow(state.label, state.description, state.endpoint, state.alive, state.restarts, busy,
                                memory, None if probed_at is None else self.clock() - probed_at, error)


class WorkerMetrics:
    """A prometheus-client collector over `llamalaunch worker`'s rows (see launch.worker.WorkerPool)."""

    def __init__(self, cache: SnapshotCache[tuple[WorkerMetricsRow, ...]]) -> None:
        self.cache = cache

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        rows, age_s = self.cache.get()
        yield from _scrape_families(self.cache, age_s)
        yield from worker_families(rows or ())


def worker_families(rows: Iterable[WorkerMetricsRow]) -> Iterator[Metric]:
    labels = ["worker", "endpoint", "description"]
    alive = GaugeMetricFamily(PREFIX + "worker_alive", "1 while the ggml-rpc-server runs and listens.", labels=labels)
    busy = GaugeMetricFamily(PREFIX + "worker_busy", "1 while a client (llama-server) holds the worker: its "
                             "memory is not probed then.", labels=labels)
    restarts = CounterMetricFamily(PREFIX + "worker_restarts", "Times the worker was started again after it "
                                   "died.", labels=labels)
    memory_labels = [*labels, "device"]
    free = GaugeMetricFamily(PREFIX + "worker_free_bytes", "Free memory the worker reported when last idle.",
                             labels=memory_labels)
    total = GaugeMetricFamily(PREFIX + "worker_total_bytes", "The worker device's memory.", labels=memory_labels)
    age = GaugeMetricFamily(PREFIX + "worker_memory_age_seconds", "Seconds since the worker's memory was "
                            "last probed (it is probed only when idle).", labels=labels)
    for row in rows:
        values = [row.label, row.endpoint, row.description]
        alive.add_metric(values, float(row.alive))
        busy.add_metric(values, float(row.busy))
        restarts.add_metric(values, row.restarts)
        for device in row.memory:
            free.add_metric([*values, str(device.index)], device.free_bytes)
            total.add_metric([*values, str(device.index)], device.total_bytes)
        if row.memory_age_s is not None:
            age.add_metric(values, row.memory_age_s)
    yield from (alive, busy, restarts, free, total, age)


# --- the HTTP endpoint -----------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


class MetricsServer:
    """`/metrics` on HOST:PORT, one thread per scrape (daemon threads: they never hold up an exit)."""

    def __init__(self, host: str, port: int, option: str = "--metrics-port") -> None:
        """Bind now, so a taken port is refused before anything starts; serve once `start` is called."""
        self.registry = CollectorRegistry(auto_describe=False)
        self._app = make_wsgi_app(self.registry)
        self._server = _bind(host, port, option, self._app)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        address, port = self._server.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    def start(self, collector: ServeMetrics | WorkerMetrics) -> None:
        self.registry.register(collector)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        daemon=True, name="metrics")
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()


def _bind(host: str, port: int, option: str, app: Callable[..., Iterable[bytes]]) -> WSGIServer:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (OSError, UnicodeError):
        raise BadInputError(f"--metrics-host {host!r} is not an address", "give an IP address of this machine, "
                            "like 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    try:
        return make_server(host, port, app, Server, handler_class=_QuietHandler)
    except OSError as error:
        why = f"port {port} is in use" if error.errno == errno.EADDRINUSE else error.strerror
        raise BadInputError(f"cannot listen on {host}:{port} for {option}: {why}",
                            f"stop what listens there, or pass another {option}") from None
