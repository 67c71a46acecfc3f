"""Planned against measured memory, row by row: what the estimate got wrong, and what is close enough.

The measurement itself (running llama-server and reading its log) is launch/measure.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamalaunch.model.estimate import Estimate
from llamalaunch.model.placement import MemoryUse
from llamalaunch.units import MIB

HOST = "Host"  # device name used for host-memory buffers


COMPONENTS = ("weights", "kv", "compute")


@dataclass(frozen=True)
class ComponentRow:
    """Planned minus measured for one component of one device (HOST for the host)."""

    device: str
    component: str  # weights, kv, compute
    planned_bytes: int
    measured_bytes: int

    @property
    def error_bytes(self) -> int:
        return self.planned_bytes - self.measured_bytes

    @property
    def relative(self) -> float:
        return self.error_bytes / self.measured_bytes if self.measured_bytes else 0.0


def compare(planned: Estimate, measured: Estimate) -> list[ComponentRow]:
    """Per device (and the host) and component, what the analytic estimate got wrong."""
    rows: list[ComponentRow] = []
    pairs = [(name, planned.devices[name], measured.devices.get(name, MemoryUse()))
             for name in planned.devices]
    pairs.append((HOST, planned.host, measured.host))
    for name, plan, real in pairs:
        for component in COMPONENTS:
            field = f"{component}_bytes"
            rows.append(ComponentRow(name, component, getattr(plan, field), getattr(real, field)))
    return rows


def within_tolerance(row: ComponentRow) -> bool:
    """Weights and KV: equal to the printed MiB (0.01). Compute: within max(5%, 16 MiB)."""
    if row.component == "compute":
        return abs(row.error_bytes) <= max(row.measured_bytes // 20, 16 * MIB)
    # 0.01 MiB: a device's SWA and full caches print as two buffers that round by 0.005 MiB each; the
    # few bytes on top are the flooring of each parsed "N.NN MiB"
    return abs(row.error_bytes) <= MIB // 100 + 8
