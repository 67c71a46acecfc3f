"""The frozen StatusSnapshot of one server (devices, host, server stats, log lines) and its `status --json` form.

Nothing here reads or prints: `observe.collector` builds snapshots, `observe.view` renders them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SNAPSHOT_SCHEMA = 1


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
    free_at_plan_bytes: int | None  # free when the plan was made; None: unknown (a worker that was down)
    total_bytes: int | None
    actual_weights_bytes: int | None  # llama.cpp's own buffer sizes, from the server log
    actual_kv_bytes: int | None
    actual_compute_bytes: int | None
    used_bytes: int | None  # in use on the device now (see memory_source)
    free_bytes: int | None
    memory_source: str  # "nvml", "rpc probe", "log", "plan", "none"
    memory_note: str | None = None
    expert_layers: int = 0  # MoE blocks whose routed experts this device holds
    moe_layers: int = 0  # MoE blocks on this device
    uuid: str | None = None  # the GPU's, from NVML

    @property
    def layers_text(self) -> str:
        """`49`, or `49 (21/48 experts)` when some of its MoE blocks keep their experts in host memory."""
        if self.moe_layers and self.expert_layers < self.moe_layers:
            return f"{self.n_layers} ({self.expert_layers}/{self.moe_layers} experts)"
        return str(self.n_layers)

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
    requests_served: int | None = None  # completed requests in the log (serve's readiness check not counted)
    last_prompt_tokens_per_s: float | None = None  # the last request's timings, from the log
    last_generation_tokens_per_s: float | None = None
    ctx_tokens: int | None = None  # /props, for --url
    model_path: str | None = None  # /props, for --url
    counters: tuple[float, ...] | None = None  # the raw /metrics counters the rates come from
    decoding_tokens: int | None = None  # generated so far by the requests running now (/slots), not yet counted:
    # llama-server's counters move only when a request ends
    metrics_text: str | None = None  # /metrics as llama-server wrote it (relayed by `serve --metrics-port`)


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
    phase: str  # the run's phase ("ready", ...; "gone" when its launcher died mid-run); for --url: from /health
    phase_detail: str = ""
    recorded_phase: str = ""  # the phase its state file last recorded (a gone run's "ready" stays here)
    launcher_pid: int | None = None
    server_pid: int | None = None
    server_alive: bool = False
    started_at: float | None = None
    ready_at: float | None = None
    updated_at: float | None = None
    restarts: int = 0
    restarts_total: int = 0
    last_exit_code: int | None = None  # llama-server's last exit status (negative: a signal)
    last_restart_reason: str = ""  # why llama-server was last restarted
    attempts: tuple[AttemptStatus, ...] = ()
    model_name: str | None = None
    model_arch: str | None = None
    model_path: str | None = None
    n_layer: int | None = None
    n_slots: int | None = None
    ctx_tokens: int | None = None
    n_gpu_layers: int | None = None
    host_expert_layers: int = 0  # MoE blocks whose experts stay in host memory, whole or split (as the plan counts)
    moe_layers: int = 0  # MoE blocks the plan places (plan_devices.moe_blocks): devices' plus host's expert layers
    devices: tuple[DeviceStatus, ...] = ()
    host: HostStatus | None = None
    argv: tuple[str, ...] = ()
    stats: ServerStats = field(default_factory=lambda: ServerStats("not asked"))
    log_path: str | None = None
    log_lines: tuple[LogEntry, ...] = ()
    log_warnings: int = 0
    log_errors: int = 0
    notes: tuple[str, ...] = ()
    estimated_tps: tuple[float | None, float | None] | None = None  # the plan's (prompt, generation) estimate

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
    del data["stats"]["metrics_text"]  # /metrics relays it; in JSON it would repeat the counters above
    for device, raw in zip(snapshot.devices, data["devices"], strict=True):
        raw["actual_bytes"] = device.actual_bytes
    if snapshot.host is not None:
        data["host"]["planned_bytes"] = snapshot.host.planned_bytes
    return data
