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
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.launch.logparse import HOST
from llamalaunch.launch.state import ENDED_PHASES, RunState, launcher_alive, read_state
from llamalaunch.observe.live_memory import LiveMemory, MemoryReader
from llamalaunch.observe.log_follower import LOG_TAIL_LINES, LogFollower
from llamalaunch.observe.plan_devices import host_expert_blocks, moe_blocks, rpc_workers
from llamalaunch.observe.server_stats import NOT_LLAMA_ANSWER, ask_server, with_recent_rates
from llamalaunch.observe.snapshot import AttemptStatus, DeviceStatus, HostStatus, ServerStats, StatusSnapshot
from llamalaunch.observe.target import NoServerError, StatusTarget


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


UNRESPONSIVE = "not answering"  # the phase shown for a ready server whose /health does not answer
GONE = "gone"  # the phase shown for a run whose launcher died mid-run (its state file says otherwise)
LLAMA_HEALTH = ("ok", "loading", "unreachable")  # what /health of a llama-server (or of nothing) answers


class NotLlamaServerError(LaunchError):
    """Something answers at the URL, but not as llama-server does."""


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
        self._decoding: tuple[float, int] | None = None  # when, and how far the running requests had got

    def _ask(self, url: str, with_props: bool = False) -> tuple[ServerStats, list[str]]:
        known = self._slots_total.get(url)
        stats, notes = ask_server(url, self.api_key, with_props, known if stats_have_busy(self._last) else None)
        stats = with_recent_rates(stats, self._counters)
        stats = self._with_running_rate(stats)
        self._counters = stats.counters or self._counters
        self._last = stats
        if stats.slots_total is not None:
            self._slots_total[url] = stats.slots_total
        return stats, notes

    def _with_running_rate(self, stats: ServerStats) -> ServerStats:
        """While a request runs the counters stand still: the "now" generation rate from how far the running
        requests got since the last look (the same requests: their count grew)."""
        now, before = self.clock(), self._decoding
        self._decoding = (now, stats.decoding_tokens) if stats.decoding_tokens else None
        if stats.recent_generation_tokens_per_s is not None or before is None or not stats.decoding_tokens:
            return stats
        grown, elapsed = stats.decoding_tokens - before[1], now - before[0]
        return dataclasses.replace(stats, recent_generation_tokens_per_s=grown / elapsed) \
            if grown > 0 and elapsed > 0 else stats

    def collect(self) -> StatusSnapshot:
        if self.target.state_path is None:
            assert self.target.url is not None
            return self._from_url(self.target.url)
        return self._from_state(self.target.state_path)

    def _from_url(self, url: str) -> StatusSnapshot:
        stats, notes = self._ask(url, with_props=True)
        if stats.health == NOT_LLAMA_ANSWER:
            raise NotLlamaServerError(f"{url} is not a llama-server: /health answered HTTP 200, but not with "
                                      'llama-server\'s {"status": "ok"}',
                                      "give llama-server's own URL, on serve's --port (8080 unless set): "
                                      "not another server's, such as llamalaunch's --metrics-port")
        if stats.health not in LLAMA_HEALTH:
            raise NotLlamaServerError(f"{url} is not a llama-server: /health answered {stats.health}",
                                      "check the address and port: llama-server answers /health with "
                                      "HTTP 200, or 503 while loading")
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
        workers = rpc_workers(devices)
        actual = follower.device_bytes(list(workers), {e: len(names) for e, names in workers.items()}) \
            if follower else {}
        actual_totals = {name: sum(kinds.get(k, 0) for k in ("model", "kv", "compute"))
                         for name, kinds in actual.items()}
        live = self.memory.read(devices, actual_totals, workers_in_use=running or server_alive)
        stats = _with_log(stats, follower)
        if not running and server_alive:
            notes.append(f"the launcher is gone but llama-server (pid {state.child_pid}) still runs")
        phase = state.phase
        if running and phase == "ready" and stats.health != "ok":
            phase = UNRESPONSIVE  # the state file says ready; a server that does not answer is not
        elif not running and phase not in ENDED_PHASES:
            phase = GONE  # a script reading "ready" would take a dead server for a live one
        model = plan.get("model", {})
        return StatusSnapshot(
            taken_at=self.clock(), source="state", name=state.name, url=url, running=running,
            gone_reason=None if running else _gone_reason(state, launcher_ok, note),
            phase=phase, phase_detail=state.phase_detail, recorded_phase=state.phase, launcher_pid=state.launcher_pid,
            server_pid=state.child_pid, server_alive=server_alive, started_at=state.started_at or None,
            ready_at=state.ready_at, updated_at=state.updated_at or None, restarts=state.restarts,
            restarts_total=state.restarts_total,
            last_exit_code=state.last_exit_code, last_restart_reason=state.last_restart_reason,
            attempts=tuple(_attempt(a) for a in state.attempts), model_name=model.get("name"),
            model_arch=model.get("arch"), model_path=model.get("path") or state.model_path,
            n_layer=model.get("n_layer"), n_slots=model.get("n_slots"), ctx_tokens=plan.get("ctx"),
            n_gpu_layers=plan.get("n_gpu_layers"), estimated_tps=_estimated_tps(plan),
            host_expert_layers=len(host_expert_blocks(plan)), moe_layers=moe_blocks(plan),
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
    return {"ok": "ready", "loading": "loading", "unreachable": GONE}.get(health, health)


def _gone_reason(state: RunState, launcher_ok: bool, note: str | None) -> str:
    if note is not None:
        return note
    if state.phase in ENDED_PHASES:
        return f"the server {state.phase}" + (f": {state.phase_detail}" if state.phase_detail else "")
    if not launcher_ok:
        return f"the launcher (pid {state.launcher_pid}) is not running: it was killed or crashed"
    return "the server is not running"


def _with_log(stats: ServerStats, follower: LogFollower | None) -> ServerStats:
    if follower is None:
        return stats
    return dataclasses.replace(stats, requests_served=max(0, follower.requests_served),
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
        free_at_plan_bytes=_bytes_or_none(raw.get("free_bytes")), total_bytes=_bytes_or_none(raw.get("total_bytes")),
        actual_weights_bytes=actual.get("model"), actual_kv_bytes=actual.get("kv"),
        actual_compute_bytes=actual.get("compute"), used_bytes=live.used_bytes, free_bytes=live.free_bytes,
        memory_source=live.source, memory_note=live.note, expert_layers=int(raw.get("expert_layers", 0)),
        moe_layers=int(raw.get("moe_layers", 0)), uuid=live.uuid)


def _bytes_or_none(value: Any) -> int | None:
    """A plan's free or total bytes; None where they are unknown (a worker that was down, left out)."""
    return None if value is None else int(value)


def _estimated_tps(plan: dict[str, Any]) -> tuple[float | None, float | None] | None:
    speed = plan.get("speed")
    return (speed.get("prompt_tps"), speed.get("generation_tps")) if isinstance(speed, dict) else None


def _host(plan: dict[str, Any], actual: Mapping[str, int] | None, rss: int | None) -> HostStatus | None:
    if not plan:
        return None
    host = plan.get("host", {})
    memory = psutil.virtual_memory()
    return HostStatus(int(host.get("weights_bytes", 0)), int(host.get("kv_bytes", 0)),
                      int(host.get("compute_bytes", 0)), sum(actual.values()) if actual else None, rss,
                      int(memory.available), int(memory.total))
