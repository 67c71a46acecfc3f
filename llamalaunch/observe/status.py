"""Collect a frozen StatusSnapshot of one server: run state, HTTP endpoints, live memory, the server log.

Sources, each optional: the run state file `serve` keeps (plan, phase, attempts, pids), llama-server's
`/health`, `/slots`, `/metrics` (serve passes `--metrics`) and `/props`, the server log (llama.cpp's own
buffer sizes, request timings, the last lines), NVML for local GPUs, and the RPC probe for workers —
only when no llama-server of ours holds them: a worker serves one client at a time, so a probe of a busy
worker could only report "busy"; the plan's figures (and the log's) stand in for it then.
Nothing here prints; `observe.view` renders the snapshot.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.launch import http
from llamalaunch.launch.logparse import HOST, BufferSize, buffer_device, parse_event, parse_line
from llamalaunch.launch.state import RunState, launcher_alive, list_states, read_state, state_path
from llamalaunch.paths import state_dir
from llamalaunch.probe.gpus import probe_local_gpus
from llamalaunch.probe.nvml import NvmlGpu, read_nvml_gpus
from llamalaunch.probe.rpc import RpcProbeError, WorkerBusyError, WorkerReport, probe_worker

SNAPSHOT_SCHEMA = 1
ENDED_PHASES = ("stopped", "failed")
LOG_TAIL_LINES = 200


class NoServerError(LaunchError):
    """No run state to show (or several, and no --name to choose)."""


# --- the snapshot -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceStatus:
    """One device of the plan: what was planned, what llama.cpp says it allocated, what is in use now."""

    name: str
    backend: str
    description: str
    endpoint: str | None
    excluded: bool
    reason: str | None
    n_layers: int
    first_slot: int | None
    planned_weights_bytes: int
    planned_kv_bytes: int
    planned_compute_bytes: int
    planned_overhead_bytes: int
    planned_bytes: int
    free_at_plan_bytes: int  # free when the plan was made
    total_bytes: int
    actual_weights_bytes: int | None  # llama.cpp's own buffer sizes, from the server log
    actual_kv_bytes: int | None
    actual_compute_bytes: int | None
    used_bytes: int | None  # in use on the device now (see memory_source)
    free_bytes: int | None
    memory_source: str  # "nvml", "rpc probe", "log", "plan", "none"
    memory_note: str | None = None

    @property
    def actual_bytes(self) -> int | None:
        parts = (self.actual_weights_bytes, self.actual_kv_bytes, self.actual_compute_bytes)
        return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None


@dataclass(frozen=True)
class HostStatus:
    planned_weights_bytes: int
    planned_kv_bytes: int
    planned_compute_bytes: int
    actual_bytes: int | None  # host buffers llama.cpp reported (mapped weights, CPU compute, output)
    server_rss_bytes: int | None  # llama-server's resident memory, while it runs
    free_bytes: int
    total_bytes: int

    @property
    def planned_bytes(self) -> int:
        return self.planned_weights_bytes + self.planned_kv_bytes + self.planned_compute_bytes


@dataclass(frozen=True)
class ServerStats:
    health: str  # "ok", "loading", "unreachable", "not asked" (server gone), or an HTTP error
    slots_total: int | None = None
    slots_busy: int | None = None
    prompt_tokens_per_s: float | None = None  # over the server's life: /metrics counters (tokens / seconds)
    generation_tokens_per_s: float | None = None
    recent_prompt_tokens_per_s: float | None = None  # between this snapshot and the one before, when tokens moved
    recent_generation_tokens_per_s: float | None = None
    prompt_tokens_total: int | None = None
    generated_tokens_total: int | None = None
    requests_processing: int | None = None
    requests_deferred: int | None = None
    requests_served: int | None = None  # completed requests in the log (readiness check included)
    last_prompt_tokens_per_s: float | None = None  # the last request's timings, from the log
    last_generation_tokens_per_s: float | None = None
    ctx_tokens: int | None = None  # /props, for --url
    model_path: str | None = None  # /props, for --url
    counters: tuple[float, ...] | None = None  # the raw /metrics counters the rates come from


@dataclass(frozen=True)
class LogEntry:
    level: str | None  # I, W, E (debug lines are left out)
    text: str
    repeat: int = 1  # the same line this many times in a row (our own polling makes "all slots are idle")


@dataclass(frozen=True)
class AttemptStatus:
    number: int
    ctx_tokens: int
    n_gpu_layers: int
    layers: str
    outcome: str


@dataclass(frozen=True)
class StatusSnapshot:
    taken_at: float
    source: str  # "state" (a serve run) or "url"
    name: str | None
    url: str
    running: bool  # the launcher (or, for --url, the server) is there
    gone_reason: str | None  # why it is not, when it is not
    phase: str  # last phase recorded ("ready", ...); for --url: from /health
    phase_detail: str = ""
    launcher_pid: int | None = None
    server_pid: int | None = None
    server_alive: bool = False
    started_at: float | None = None
    ready_at: float | None = None
    updated_at: float | None = None
    restarts: int = 0
    attempts: tuple[AttemptStatus, ...] = ()
    model_name: str | None = None
    model_arch: str | None = None
    model_path: str | None = None
    n_layer: int | None = None
    n_slots: int | None = None
    ctx_tokens: int | None = None
    n_gpu_layers: int | None = None
    devices: tuple[DeviceStatus, ...] = ()
    host: HostStatus | None = None
    argv: tuple[str, ...] = ()
    stats: ServerStats = field(default_factory=lambda: ServerStats("not asked"))
    log_path: str | None = None
    log_lines: tuple[LogEntry, ...] = ()
    log_warnings: int = 0
    log_errors: int = 0
    notes: tuple[str, ...] = ()

    @property
    def uptime_s(self) -> float | None:
        """Seconds since the server became ready, while it runs."""
        if not self.running or self.ready_at is None or self.phase != "ready":
            return None
        return max(self.taken_at - self.ready_at, 0.0)


def snapshot_to_dict(snapshot: StatusSnapshot) -> dict[str, Any]:
    """The `status --json` form: every field of the snapshot, plus derived figures. Add keys, never rename."""
    data = dataclasses.asdict(snapshot)
    data["schema"] = SNAPSHOT_SCHEMA
    data["uptime_s"] = snapshot.uptime_s
    for device, raw in zip(snapshot.devices, data["devices"], strict=True):
        raw["actual_bytes"] = device.actual_bytes
    if snapshot.host is not None:
        data["host"]["planned_bytes"] = snapshot.host.planned_bytes
    return data


# --- what to look at ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusTarget:
    state_path: Path | None  # a serve run's state file
    url: str | None  # a llama-server by URL (with no state file: HTTP only)


def normalize_url(url: str) -> str:
    text = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+$", text):
        raise BadInputError(f"--url {url!r} is not a server address",
                            "write it like http://127.0.0.1:8080 (scheme, host and port, no path)")
    return text


def resolve_target(name: str | None = None, url: str | None = None) -> StatusTarget:
    """Which run to show: --name, else the run whose URL is --url, else the only (or only live) run."""
    if name is not None:
        path = state_path(name)
        if not path.exists():
            raise NoServerError(f"no server named {name!r} has run here ({path} does not exist)",
                                f"start one with `llamalaunch serve --name {name}`, or pass --url")
        return StatusTarget(path, normalize_url(url) if url else None)
    if url is not None:
        wanted = normalize_url(url)
        for path in list_states():
            try:
                if read_state(path).url.rstrip("/") == wanted:
                    return StatusTarget(path, wanted)
            except BadInputError:
                continue
        return StatusTarget(None, wanted)
    return StatusTarget(_only_run(), None)


def _only_run() -> Path:
    paths = list_states()
    if not paths:
        raise NoServerError(f"no server has run here (no run state in {state_dir()})",
                            "start one with `llamalaunch serve`, or pass --url http://HOST:PORT")
    if len(paths) == 1:
        return paths[0]
    live = [p for p in paths if _is_live(p)]
    if len(live) == 1:
        return live[0]
    names = ", ".join(p.stem for p in (live or paths))
    raise NoServerError(f"several servers have run here: {names}", "choose one with --name NAME")


def _is_live(path: Path) -> bool:
    try:
        state = read_state(path)
    except BadInputError:
        return False
    return launcher_alive(state) and state.phase not in ENDED_PHASES


# --- the server log ------------------------------------------------------------------------------------

_LEVEL = re.compile(r"^\d+\.\d{2}\.\d{3}\.\d{3} ([IWED]) ")
_TIMING = re.compile(r"(prompt eval|eval) time = +[\d.]+ ms / +\d+ tokens \( *[\d.]+ ms per token, +([\d.]+) "
                     r"tokens per second\)")
_RUN_START = "llama_server: initializing"
# llama.cpp's threads sometimes print a line without its newline: the next line's prefix is glued on (seen).
_GLUED = re.compile(r"(?<=\S)(?=\d+\.\d{2}\.\d{3}\.\d{3} [IWED] )")


class LogFollower:
    """Reads the server log incrementally: the last lines, llama.cpp's buffer sizes, request timings.

    Counters start again at each llama-server start in the log (`serve` appends every run to one file).
    A rotated or truncated log is read again from its start.
    """

    def __init__(self, path: Path, keep_lines: int = LOG_TAIL_LINES) -> None:
        self.path = path
        self.lines: deque[LogEntry] = deque(maxlen=keep_lines)
        self._offset = 0
        self._inode: int | None = None
        self._partial = ""
        self._level: str | None = None  # of the last line with a prefix
        self._reset_run()

    def _reset_run(self) -> None:
        self.buffers: dict[tuple[str, str], int] = {}  # (buffer name, kind) → bytes
        self.requests_served = 0
        self.last_prompt_tokens_per_s: float | None = None
        self.last_generation_tokens_per_s: float | None = None
        self.warnings = 0
        self.errors = 0

    def update(self) -> None:
        try:
            stat = self.path.stat()
        except OSError:
            return
        if self._inode is None:
            rotated = self.path.with_name(self.path.name + ".1")
            if rotated.exists():  # the start of this run may be in the rotated file
                self._read(rotated, 0)
        elif stat.st_ino != self._inode or stat.st_size < self._offset:
            self._offset, self._partial = 0, ""
        self._inode = stat.st_ino
        self._offset = self._read(self.path, self._offset)

    def _read(self, path: Path, offset: int) -> int:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except OSError:
            return offset
        text = self._partial + data.decode("utf-8", "replace")
        *complete, self._partial = text.split("\n")
        for raw in complete:
            for line in _GLUED.split(raw):
                self._feed(line)
        return offset + len(data)

    def _feed(self, raw: str) -> None:
        match = _LEVEL.match(raw)
        level = match.group(1) if match else None
        continued = self._level if level is None else None  # a message's later lines belong to its level
        self._level = level or self._level
        if level == "D" or continued == "D" or (level is None and raw[:1] in ("", " ", "\t")):
            return  # debug lines and indented continuations: too many to show
        if _RUN_START in raw:
            self._reset_run()
        entry = LogEntry(level, raw[match.end():] if match else raw)
        if self.lines and self.lines[-1].text == entry.text and self.lines[-1].level == level:
            entry = dataclasses.replace(entry, repeat=self.lines.pop().repeat + 1)
        self.lines.append(entry)
        self.warnings += level == "W"
        self.errors += level == "E"
        if "buffer size" in raw:
            event = parse_event(parse_line(raw))
            if isinstance(event, BufferSize) and not event.at_exit:
                self.buffers[(event.buffer, event.kind)] = event.bytes
        elif "print_timing" in raw and (timing := _TIMING.search(raw)) is not None:
            speed = float(timing.group(2))
            if timing.group(1) == "eval":
                # a one-token request (the readiness check) samples from the prompt: no generation timing
                self.last_generation_tokens_per_s = speed or self.last_generation_tokens_per_s
            else:
                self.last_prompt_tokens_per_s = speed
        elif "stop processing" in raw:
            self.requests_served += 1

    def device_bytes(self, endpoints: Sequence[str], per_endpoint: Mapping[str, int]) -> dict[str, dict[str, int]]:
        """Device name (RPC0, CUDA0, HOST) → buffer kind (model, kv, compute, output) → bytes."""
        found: dict[str, dict[str, int]] = {}
        for (buffer, kind), size in self.buffers.items():
            device = buffer_device(buffer, endpoints, per_endpoint)
            kinds = found.setdefault(device, {})
            kinds[kind] = kinds.get(kind, 0) + size
        return found


# --- HTTP ----------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition → {name: value} (labels dropped; llama-server's metrics have none)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            try:
                values[parts[0].split("{", 1)[0]] = float(parts[1])
            except ValueError:
                continue
    return values


def _as_int(value: float | None) -> int | None:
    return int(value) if value is not None else None


_COUNTERS = ("prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total", "tokens_predicted_seconds_total")


def _rate(metrics: Mapping[str, float], tokens: str, seconds: str) -> float | None:
    """Tokens per second of processing from two counters. Not the `*_tokens_seconds` gauges: those are
    averaged over the window between two scrapes, so every other scraper would shorten ours (and we theirs)."""
    spent = metrics.get(f"llamacpp:{seconds}")
    done = metrics.get(f"llamacpp:{tokens}")
    # Below 10 ms the quotient is noise (the readiness check's one token takes microseconds).
    return done / spent if done is not None and spent is not None and spent >= 0.01 else None


def _counters(metrics: Mapping[str, float]) -> tuple[float, ...] | None:
    values = [metrics.get(f"llamacpp:{name}") for name in _COUNTERS]
    return tuple(v for v in values if v is not None) if all(v is not None for v in values) else None


def with_recent_rates(stats: ServerStats, before: tuple[float, ...] | None) -> ServerStats:
    """Rates over the tokens processed since the `before` counters (None where none were)."""
    if before is None or stats.counters is None:
        return stats
    prompt_tokens, prompt_s, generated, generated_s = (
        now - then for now, then in zip(stats.counters, before, strict=True))
    return dataclasses.replace(
        stats, recent_prompt_tokens_per_s=prompt_tokens / prompt_s if prompt_tokens > 0 and prompt_s > 0 else None,
        recent_generation_tokens_per_s=generated / generated_s if generated > 0 and generated_s > 0 else None)


def ask_server(url: str, api_key: str | None = None, with_props: bool = False,
               slots_total: int | None = None) -> tuple[ServerStats, list[str]]:
    """/health, then (when it answers) /slots and /metrics; the stats and notes on what did not answer.

    With `slots_total` known, /slots is skipped: /metrics' requests_processing is the busy slot count,
    and every request is one more task (and a dozen debug lines in a `-lv 5` log) for the server.
    """
    notes: list[str] = []
    health = http.health(url, api_key)
    if health.status == 0:
        return ServerStats("unreachable"), [f"no answer from {url}: {health.error}"]
    if health.status == 503:
        return ServerStats("loading"), notes
    if health.status != 200:
        return ServerStats(f"HTTP {health.status}"), [f"{url}/health answered HTTP {health.status}"]
    busy = None
    if slots_total is None:
        slots_total, busy = _ask_slots(url, api_key, notes)
    metrics_result = http.get_json(url, "/metrics", api_key)
    metrics = parse_metrics(metrics_result.body) \
        if metrics_result.status == 200 and isinstance(metrics_result.body, str) else {}
    if metrics_result.status != 200:
        notes.append(_endpoint_note(url, "/metrics", metrics_result.status))
    processing = _as_int(metrics.get("llamacpp:requests_processing"))
    stats = ServerStats(
        "ok", slots_total, busy if busy is not None else processing,
        _rate(metrics, "prompt_tokens_total", "prompt_seconds_total"),
        _rate(metrics, "tokens_predicted_total", "tokens_predicted_seconds_total"),
        prompt_tokens_total=_as_int(metrics.get("llamacpp:prompt_tokens_total")),
        generated_tokens_total=_as_int(metrics.get("llamacpp:tokens_predicted_total")),
        requests_processing=processing, requests_deferred=_as_int(metrics.get("llamacpp:requests_deferred")),
        counters=_counters(metrics))
    if with_props:
        stats = _with_props(stats, http.get_json(url, "/props", api_key))
    return stats, notes


def _ask_slots(url: str, api_key: str | None, notes: list[str]) -> tuple[int | None, int | None]:
    slots = http.get_json(url, "/slots", api_key)
    if slots.status == 200 and isinstance(slots.body, list):
        busy = sum(1 for slot in slots.body if isinstance(slot, dict) and slot.get("is_processing"))
        return len(slots.body), busy
    notes.append(_endpoint_note(url, "/slots", slots.status))
    return None, None


def _with_props(stats: ServerStats, props: http.HttpResult) -> ServerStats:
    if props.status != 200 or not isinstance(props.body, dict):
        return stats
    settings = props.body.get("default_generation_settings") or {}
    ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return dataclasses.replace(stats, ctx_tokens=ctx if isinstance(ctx, int) else None,
                               model_path=props.body.get("model_path"),
                               slots_total=stats.slots_total or props.body.get("total_slots"))


def _endpoint_note(url: str, path: str, status: int) -> str:
    if status in (401, 403):
        return f"{url}{path} needs the API key: pass --api-key-file"
    if status == 501:
        return f"{url}{path} is turned off in this llama-server"
    return f"{url}{path} answered {'nothing' if status == 0 else f'HTTP {status}'}"


# --- live memory ---------------------------------------------------------------------------------------

ProbeWorker = Callable[[str], WorkerReport]


def _quick_probe(endpoint: str) -> WorkerReport:
    return probe_worker(endpoint, connect_timeout_s=0.5, reply_timeout_s=1.0)


@dataclass(frozen=True)
class LiveMemory:
    used_bytes: int | None
    free_bytes: int | None
    source: str
    note: str | None = None


class MemoryReader:
    """Live device memory: NVML for CUDA devices, the RPC probe for idle workers; the plan otherwise."""

    def __init__(self, read_gpus: Callable[[], Sequence[NvmlGpu]] = read_nvml_gpus,
                 probe: ProbeWorker = _quick_probe) -> None:
        self.read_gpus = read_gpus
        self.probe = probe

    def read(self, devices: Sequence[dict[str, Any]], actual: Mapping[str, int | None],
             workers_in_use: bool) -> list[LiveMemory]:
        cuda = ({d.name: d for d in probe_local_gpus(self.read_gpus).devices}
                if any(d.get("backend") == "CUDA" for d in devices) else {})
        reports: dict[str, WorkerReport | RpcProbeError] = {}
        worker_index: dict[str, int] = {}
        found = []
        for device in devices:
            endpoint = device.get("endpoint")
            index = 0
            if endpoint:  # the device's index inside its worker: devices of one worker come in its order
                index = worker_index[endpoint] = worker_index.get(endpoint, -1) + 1
            if device.get("backend") == "CUDA":
                found.append(self._cuda(device, cuda))
            elif device.get("backend") == "RPC" and endpoint and not device.get("assumed"):
                if workers_in_use:
                    found.append(_from_plan(device, actual.get(device["name"]),
                                            "worker busy serving our llama-server: not probed"))
                    continue
                if endpoint not in reports:
                    reports[endpoint] = self._probe(endpoint)
                found.append(_rpc(device, index, reports[endpoint], actual.get(device["name"])))
            else:
                found.append(_from_plan(device, actual.get(device["name"]), "not measurable: the plan's figures"))
        return found

    def _probe(self, endpoint: str) -> WorkerReport | RpcProbeError:
        try:
            return self.probe(endpoint)
        except RpcProbeError as error:
            return error

    @staticmethod
    def _cuda(device: dict[str, Any], cuda: Mapping[str, Any]) -> LiveMemory:
        gpu = cuda.get(device["name"])
        if gpu is None:
            return LiveMemory(None, None, "none", f"NVML does not see {device['name']} from here")
        note = None if gpu.description == device.get("description") else \
            f"NVML's {device['name']} here is {gpu.description}, not {device.get('description')}"
        return LiveMemory(gpu.total_bytes - gpu.free_bytes, gpu.free_bytes, "nvml", note)


def _from_plan(device: dict[str, Any], actual_bytes: int | None, why: str) -> LiveMemory:
    used = actual_bytes if actual_bytes is not None else int(device["planned_bytes"])
    source = "log" if actual_bytes is not None else "plan"
    free = int(device["free_bytes"]) - used
    return LiveMemory(used, free, source, why)


def _rpc(device: dict[str, Any], index: int, report: WorkerReport | RpcProbeError,
         actual_bytes: int | None) -> LiveMemory:
    if isinstance(report, WorkerBusyError):
        return _from_plan(device, None, "worker busy serving another client: the plan's figures")
    if isinstance(report, RpcProbeError):
        return LiveMemory(None, None, "none", report.message)
    if index >= len(report.devices):
        return LiveMemory(None, None, "none", f"worker {report.endpoint} has no device {index}")
    memory = report.devices[index]
    return LiveMemory(memory.total_bytes - memory.free_bytes, memory.free_bytes, "rpc probe")


# --- the collector -------------------------------------------------------------------------------------


def _process_alive(pid: int | None, exe_name: str | None = None) -> bool:
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return exe_name is None or exe_name in process.name() or exe_name in " ".join(process.cmdline()[:1])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _process_argv(pid: int) -> tuple[str, ...]:
    try:
        return tuple(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ()


def _process_rss(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def stats_have_busy(stats: ServerStats | None) -> bool:
    """/metrics answered last time with requests_processing, so /slots need not be asked again."""
    return stats is not None and stats.requests_processing is not None


class StatusCollector:
    """Builds one snapshot per `collect()`; keeps what it can between calls (the log read so far)."""

    def __init__(self, target: StatusTarget, api_key: str | None = None, memory: MemoryReader | None = None,
                 clock: Callable[[], float] = time.time, log_lines: int = LOG_TAIL_LINES) -> None:
        self.target = target
        self.api_key = api_key
        self.memory = memory or MemoryReader()
        self.clock = clock
        self.log_lines = log_lines
        self._follower: LogFollower | None = None
        self._last_state: RunState | None = None
        self._counters: tuple[float, ...] | None = None
        self._slots_total: dict[str, int] = {}  # per URL: asked of /slots once, then busy comes from /metrics
        self._last: ServerStats | None = None

    def _ask(self, url: str, with_props: bool = False) -> tuple[ServerStats, list[str]]:
        known = self._slots_total.get(url)
        stats, notes = ask_server(url, self.api_key, with_props, known if stats_have_busy(self._last) else None)
        stats = with_recent_rates(stats, self._counters)
        self._counters = stats.counters or self._counters
        self._last = stats
        if stats.slots_total is not None:
            self._slots_total[url] = stats.slots_total
        return stats, notes

    def collect(self) -> StatusSnapshot:
        if self.target.state_path is None:
            assert self.target.url is not None
            return self._from_url(self.target.url)
        return self._from_state(self.target.state_path)

    def _from_url(self, url: str) -> StatusSnapshot:
        stats, notes = self._ask(url, with_props=True)
        running = stats.health not in ("unreachable",)
        return StatusSnapshot(
            taken_at=self.clock(), source="url", name=None, url=url, running=running,
            gone_reason=None if running else f"nothing answers at {url}", phase=_url_phase(stats.health),
            model_path=stats.model_path, ctx_tokens=stats.ctx_tokens, stats=stats,
            notes=(*notes, "attached by URL: no plan, so no per-device memory (use --name for a serve run)"))

    def _read_state(self, path: Path) -> tuple[RunState | None, str | None]:
        try:
            self._last_state = read_state(path)
        except BadInputError as error:
            if self._last_state is None:
                raise NoServerError(error.message, error.hint) from None
            return self._last_state, f"run state {path} is gone: showing the last one read"
        return self._last_state, None

    def _from_state(self, path: Path) -> StatusSnapshot:
        state, note = self._read_state(path)
        assert state is not None
        notes = [note] if note else []
        launcher_ok = launcher_alive(state)
        running = launcher_ok and state.phase not in ENDED_PHASES and note is None
        exe = Path(state.argv[0]).name if state.argv else None
        server_alive = _process_alive(state.child_pid, exe)
        stats = ServerStats("not asked")
        url = state.url or (self.target.url or "")
        if (running or server_alive) and url:
            stats, http_notes = self._ask(url)
            notes += http_notes
        follower = self._follow(Path(state.log_path)) if state.log_path else None
        plan = state.plan or {}
        devices = [d for d in plan.get("devices", []) if isinstance(d, dict)]
        endpoints, per_endpoint = _rpc_layout(devices)
        actual = follower.device_bytes(endpoints, per_endpoint) if follower else {}
        actual_totals = {name: sum(kinds.get(k, 0) for k in ("model", "kv", "compute"))
                         for name, kinds in actual.items()}
        live = self.memory.read(devices, actual_totals, workers_in_use=running or server_alive)
        stats = _with_log(stats, follower)
        if not running and server_alive:
            notes.append(f"the launcher is gone but llama-server (pid {state.child_pid}) still runs")
        model = plan.get("model", {})
        return StatusSnapshot(
            taken_at=self.clock(), source="state", name=state.name, url=url, running=running,
            gone_reason=None if running else _gone_reason(state, launcher_ok, note),
            phase=state.phase, phase_detail=state.phase_detail, launcher_pid=state.launcher_pid,
            server_pid=state.child_pid, server_alive=server_alive, started_at=state.started_at or None,
            ready_at=state.ready_at, updated_at=state.updated_at or None, restarts=state.restarts,
            attempts=tuple(_attempt(a) for a in state.attempts), model_name=model.get("name"),
            model_arch=model.get("arch"), model_path=model.get("path") or state.model_path,
            n_layer=model.get("n_layer"), n_slots=model.get("n_slots"), ctx_tokens=plan.get("ctx"),
            n_gpu_layers=plan.get("n_gpu_layers"),
            devices=tuple(_device(d, actual.get(d["name"], {}), m) for d, m in zip(devices, live, strict=True)),
            host=_host(plan, actual.get(HOST), _process_rss(state.child_pid) if server_alive and state.child_pid
                       else None),
            argv=_process_argv(state.child_pid) if server_alive and state.child_pid else tuple(state.argv),
            stats=stats, log_path=state.log_path,
            log_lines=tuple(follower.lines)[-self.log_lines:] if follower else (),
            log_warnings=follower.warnings if follower else 0, log_errors=follower.errors if follower else 0,
            notes=tuple(notes))

    def _follow(self, log_path: Path) -> LogFollower:
        if self._follower is None or self._follower.path != log_path:
            self._follower = LogFollower(log_path)
        self._follower.update()
        return self._follower


def _url_phase(health: str) -> str:
    return {"ok": "ready", "loading": "loading", "unreachable": "gone"}.get(health, health)


def _gone_reason(state: RunState, launcher_ok: bool, note: str | None) -> str:
    if note is not None:
        return note
    if state.phase in ENDED_PHASES:
        return f"the server {state.phase}" + (f": {state.phase_detail}" if state.phase_detail else "")
    if not launcher_ok:
        return f"the launcher (pid {state.launcher_pid}) is not running: it was killed or crashed"
    return "the server is not running"


def _rpc_layout(devices: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, int]]:
    """The --rpc endpoints in order, and how many devices each worker exposes (for buffer names)."""
    endpoints: list[str] = []
    counts: dict[str, int] = {}
    for device in devices:
        endpoint = device.get("endpoint")
        if device.get("backend") == "RPC" and endpoint:
            if endpoint not in counts:
                endpoints.append(endpoint)
            counts[endpoint] = counts.get(endpoint, 0) + 1
    return endpoints, counts


def _with_log(stats: ServerStats, follower: LogFollower | None) -> ServerStats:
    if follower is None:
        return stats
    return dataclasses.replace(stats, requests_served=follower.requests_served,
                               last_prompt_tokens_per_s=follower.last_prompt_tokens_per_s,
                               last_generation_tokens_per_s=follower.last_generation_tokens_per_s)


def _attempt(raw: dict[str, Any]) -> AttemptStatus:
    return AttemptStatus(int(raw.get("number", 0)), int(raw.get("ctx_tokens", 0)), int(raw.get("n_gpu_layers", 0)),
                         str(raw.get("layers", "")), str(raw.get("outcome", "")))


def _device(raw: dict[str, Any], actual: Mapping[str, int], live: LiveMemory) -> DeviceStatus:
    return DeviceStatus(
        name=raw["name"], backend=raw.get("backend", ""), description=raw.get("description", ""),
        endpoint=raw.get("endpoint"), excluded=bool(raw.get("excluded")), reason=raw.get("reason"),
        n_layers=int(raw.get("n_layers", 0)), first_slot=raw.get("first_slot"),
        planned_weights_bytes=int(raw.get("weights_bytes", 0)), planned_kv_bytes=int(raw.get("kv_bytes", 0)),
        planned_compute_bytes=int(raw.get("compute_bytes", 0)),
        planned_overhead_bytes=int(raw.get("overhead_bytes", 0)), planned_bytes=int(raw.get("planned_bytes", 0)),
        free_at_plan_bytes=int(raw.get("free_bytes", 0)), total_bytes=int(raw.get("total_bytes", 0)),
        actual_weights_bytes=actual.get("model"), actual_kv_bytes=actual.get("kv"),
        actual_compute_bytes=actual.get("compute"), used_bytes=live.used_bytes, free_bytes=live.free_bytes,
        memory_source=live.source, memory_note=live.note)


def _host(plan: dict[str, Any], actual: Mapping[str, int] | None, rss: int | None) -> HostStatus | None:
    if not plan:
        return None
    host = plan.get("host", {})
    memory = psutil.virtual_memory()
    return HostStatus(int(host.get("weights_bytes", 0)), int(host.get("kv_bytes", 0)),
                      int(host.get("compute_bytes", 0)), sum(actual.values()) if actual else None, rss,
                      int(memory.available), int(memory.total))
