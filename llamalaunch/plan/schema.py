"""The stable JSON form of a Plan (`plan --json`, the run state file). Add keys, never rename."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamalaunch.model.compare import ComponentRow, within_tolerance
from llamalaunch.plan.speed import SpeedEstimate
from llamalaunch.plan.types import DevicePlan, MemoryUse, Plan

SCHEMA_VERSION = 1


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    model = plan.model
    return {
        "schema": SCHEMA_VERSION,
        "model": {"path": model.path, "arch": model.arch, "name": model.name, "n_layer": model.n_layer,
                  "n_slots": model.n_slots, "moe_blocks": list(model.expert_layers)},
        "ctx": plan.ctx_tokens,
        "n_gpu_layers": plan.n_gpu_layers,
        "devices": [device_to_dict(device) for device in plan.devices],
        "host": {**memory_to_dict(plan.host), "free_bytes": plan.host_free_bytes,  # free, spare: null if not known
                 "spare_bytes": plan.host_spare_bytes, "expert_layers": plan.host_moe_layers},
        "argv": list(plan.argv),
        "notes": list(plan.notes),
        "host_expert_layers": sorted(plan.host_expert_layers),
        "host_expert_parts": [list(part) for part in sorted(plan.host_expert_parts)],
        "host_weights": plan.host_weights,  # pinned, mapped, repacked (auto resolved); None: nothing left in host memory
        "speed": speed_to_dict(plan.speed) if plan.speed is not None else None,
        "alternatives": [{"label": a.label, "ctx": a.ctx_tokens, "chosen": a.chosen, **speed_to_dict(a.speed)}
                         for a in plan.alternatives],
        "overhead_sources": dict(plan.overhead_sources),
    }


def speed_to_dict(speed: SpeedEstimate) -> dict[str, Any]:
    """est. tok/s (None: a figure was unknown, named in `unknown`), per device seconds of a token."""
    return {"generation_tps": speed.generation_tps, "prompt_tps": speed.prompt_tps,
            "fill_tokens": speed.fill_tokens, "ubatch_tokens": speed.ubatch_tokens, "unknown": list(speed.unknown),
            "parts": [{"device": p.name, "generation_s": p.generation_s, "prompt_s": p.prompt_s,
                       "read_bytes": p.read_bytes} for p in speed.parts],
            "hop_generation_s": speed.hop_generation_s, "hop_prompt_s": speed.hop_prompt_s,
            "calibrated": list(speed.calibrated)}


def memory_to_dict(memory: MemoryUse) -> dict[str, int]:
    return {"weights_bytes": memory.weights_bytes, "kv_bytes": memory.kv_bytes,
            "compute_bytes": memory.compute_bytes, "overhead_bytes": memory.overhead_bytes}


def device_to_dict(plan: DevicePlan) -> dict[str, Any]:
    """A worker that is down (left out by --exclude) has `error` set and `free_bytes`/`total_bytes`/`limit_bytes`
    null."""
    device = plan.device
    down = device.error is not None
    return {
        "name": device.name, "backend": device.backend, "description": device.description,
        "endpoint": device.endpoint, "assumed": device.assumed,
        "free_bytes": None if down else device.free_bytes, "total_bytes": None if down else device.total_bytes,
        "budget_bytes": plan.budget_bytes, "error": device.error,
        "excluded": plan.excluded, "reason": plan.reason,
        "n_layers": plan.n_layers, "first_slot": plan.first_slot,
        "expert_layers": plan.expert_layers, "moe_layers": plan.moe_layers,
        **memory_to_dict(plan.memory),
        "reserved_bytes": plan.reserved_bytes, "limit_bytes": None if down else plan.limit_bytes,
        "planned_bytes": plan.planned_bytes, "headroom_bytes": plan.headroom_bytes,
    }


def verify_to_list(rows: Sequence[ComponentRow]) -> list[dict[str, Any]]:
    """`plan --verify --json`: planned against llama-server's own figures, per device and component."""
    return [{"device": row.device, "component": row.component, "planned_bytes": row.planned_bytes,
             "measured_bytes": row.measured_bytes, "within_tolerance": within_tolerance(row)} for row in rows]
