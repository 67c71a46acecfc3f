"""Plan: where every slot goes, what each device holds, and the llama-server argv."""

from __future__ import annotations

from dataclasses import dataclass

from llamalaunch.model.estimate import MemoryUse
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.request import Request
from llamalaunch.plan.speed import Alternative, SpeedEstimate
from llamalaunch.probe.device import Device


@dataclass(frozen=True)
class DevicePlan:
    device: Device
    excluded: bool
    reason: str | None
    first_slot: int | None
    n_layers: int
    memory: MemoryUse
    reserved_bytes: int
    limit_bytes: int  # what we allow ourselves to use here: min(free, budget) - reserved - margin
    expert_layers: int = 0  # MoE blocks whose routed experts this device holds
    moe_layers: int = 0  # MoE blocks on this device (their experts are elsewhere when expert_layers is less)
    budget_bytes: int | None = None  # --budget: the most of its free memory the plan may use here

    @property
    def usable_bytes(self) -> int:
        """The device's free memory, or the budget where one is below it."""
        free = self.device.free_bytes
        return free if self.budget_bytes is None else min(free, self.budget_bytes)

    @property
    def planned_bytes(self) -> int:
        return self.memory.total_bytes

    @property
    def headroom_bytes(self) -> int:
        """Free memory (within the budget) left after the plan and the reservations (the margin is part of it)."""
        return self.usable_bytes - self.reserved_bytes - self.planned_bytes


@dataclass(frozen=True)
class Plan:
    model: ModelProfile
    request: Request
    ctx_tokens: int
    devices: tuple[DevicePlan, ...]  # llama.cpp's device order
    host: MemoryUse
    n_gpu_layers: int  # slots offloaded (the last ones); n_slots means all
    argv: tuple[str, ...]  # llama-server arguments after the binary
    notes: tuple[str, ...] = ()
    host_expert_layers: frozenset[int] = frozenset()  # blocks on devices whose routed experts are in host memory
    host_expert_parts: frozenset[tuple[int, str]] = frozenset()  # (block, expert kind) in host memory, split blocks
    speed: SpeedEstimate | None = None  # None: no speed figures were given to the planner
    alternatives: tuple[Alternative, ...] = ()  # placements that fit, the chosen one first (plan --compare)
    overhead_sources: tuple[tuple[str, str], ...] = ()  # device name, "measured <when>" / "given" / "assumed"
    host_weights: str | None = None  # --host-weights mode; None: no layer or expert is left in host memory
    host_free_bytes: int | None = None  # host RAM available when planned; None: not known (not checked)

    @property
    def host_moe_layers(self) -> int:
        """MoE layers whose routed experts sit in host memory: those of blocks left there whole (-ngl), those
        spilled from the devices, and split blocks (as the table's experts column counts them)."""
        return len(self.model.expert_layers) - sum(device.expert_layers for device in self.devices)

    @property
    def host_spare_bytes(self) -> int | None:
        """What the host keeps beyond its share, as a device's spare (free less planned)."""
        if self.host_free_bytes is None:
            return None
        return self.host_free_bytes - self.host.total_bytes
