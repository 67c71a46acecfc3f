"""What a failed load teaches the next plan: a smaller budget on the device that ran out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llamalaunch.plan.request import Request
from llamalaunch.plan.types import Plan
from llamalaunch.units import MIB

# After a run-time OOM (the CUDA pool grew past what was free) each device keeps this much more.
RUNTIME_OOM_MARGIN_STEP = 256 * MIB


@dataclass
class Lessons:
    """Per-device budgets learned from out-of-memory failures, and extra margin after run-time OOM."""

    budgets: dict[str, int] = field(default_factory=dict)
    extra_margin_bytes: int = 0

    def apply(self, request: Request) -> Request:
        budgets = dict(request.budget_bytes)
        for name, learned in self.budgets.items():
            budgets[name] = min(learned, budgets.get(name, learned))
        return replace(request, budget_bytes=budgets,
                       extra_margin_bytes=request.extra_margin_bytes + self.extra_margin_bytes)

    def learn_allocation_failure(self, plan: Plan, device: str, kind: str, size_bytes: int | None) -> str:
        """The allocation of `size_bytes` for `kind` failed on `device` after its earlier buffers.

        llama.cpp allocates weights, then KV, then compute: what was allocated before the failing
        buffer is a proven lower bound of the device's real capacity, the failing size an upper
        bound past it; the next budget sits halfway, and always below what was planned there.
        """
        planned = next((p for p in plan.devices if p.device.name == device), None)
        if planned is None:
            self.extra_margin_bytes += RUNTIME_OOM_MARGIN_STEP
            return f"out of memory on {device} (not in the plan): keeping {self.margin_text()} more everywhere"
        memory = planned.memory
        before = {"weights": 0, "kv": memory.weights_bytes,
                  "compute": memory.weights_bytes + memory.kv_bytes}.get(kind, memory.weights_bytes)
        failing = size_bytes if size_bytes is not None else planned.planned_bytes - before
        budget = memory.overhead_bytes + before + failing // 2 + planned.reserved_bytes
        budget = min(budget, planned.planned_bytes + planned.reserved_bytes - 64 * MIB)
        self.budgets[device] = min(budget, self.budgets.get(device, budget))
        return f"out of memory on {device} allocating {kind}: budget there now {self.budgets[device] // MIB} MiB"

    def learn_runtime_oom(self) -> str:
        self.extra_margin_bytes += RUNTIME_OOM_MARGIN_STEP
        return f"out of memory while serving: keeping {self.margin_text()} more free on every device"

    def margin_text(self) -> str:
        return f"{self.extra_margin_bytes // MIB} MiB"
