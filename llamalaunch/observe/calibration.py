"""Calibration: the memory a GPU backend uses outside llama.cpp's own accounting, measured per GPU.

llama.cpp's memory breakdown at exit says how much was still free and how much llama.cpp itself
held; what the device had free before the launch, less both, is what the CUDA context, cuBLAS
and the memory pool took. `serve` records it after every run; plans for the same kind of GPU use
the latest figure instead of the conservative default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from llamalaunch.launch.logparse import BreakdownRow, parse_event, parse_line
from llamalaunch.launch.supervisor import SupervisorEvent
from llamalaunch.paths import cache_dir
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB

# A figure outside this range is another process's doing (memory freed or taken meanwhile).
PLAUSIBLE_OVERHEAD = (64 * MIB, 4096 * MIB)


def calibration_path() -> Path:
    return cache_dir() / "calibration.json"


def calibration_key(device: Device) -> str:
    return f"{device.backend}:{device.description}"


def load_overheads(path: Path | None = None) -> dict[str, int]:
    try:
        data = json.loads((path or calibration_path()).read_text())
        return {str(key): int(value["overhead_bytes"]) for key, value in data.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def overheads_for(devices: Iterable[Device], known: Mapping[str, int]) -> dict[str, int]:
    """Per device name: the calibrated overhead of its kind of GPU, where one was measured."""
    return {d.name: known[calibration_key(d)] for d in devices if calibration_key(d) in known}


def measured_overhead(device: Device, row: BreakdownRow) -> int | None:
    """Free before launch - free at exit - llama.cpp's own (all in MiB as printed)."""
    if row.free_mib is None:
        return None
    overhead = device.free_bytes - (row.free_mib + row.self_mib) * MIB
    low, high = PLAUSIBLE_OVERHEAD
    return overhead if low <= overhead <= high else None


def record_overhead(device: Device, overhead_bytes: int, path: Path | None = None) -> None:
    target = path or calibration_path()
    try:
        data = json.loads(target.read_text()) if target.exists() else {}
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[calibration_key(device)] = {"overhead_bytes": overhead_bytes, "device": device.name}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(data, indent=1))
        os.replace(temp, target)
    except OSError:
        pass  # calibration only sharpens later plans


class Calibrator:
    """Watches one run's lines for the exit breakdown of its local GPUs and records their overhead."""

    def __init__(self, devices: Iterable[Device]) -> None:
        self.devices = {d.name: d for d in devices if d.backend not in ("RPC", "CPU") and not d.assumed}
        self.rows: dict[str, BreakdownRow] = {}

    def feed(self, line: str) -> None:
        if not self.devices or "memory_breakdown_print" not in line:
            return
        event = parse_event(parse_line(line))
        if isinstance(event, BreakdownRow) and event.name in self.devices:
            self.rows[event.name] = event  # the last table printed is the one at exit

    def record(self, path: Path | None = None) -> dict[str, int]:
        recorded: dict[str, int] = {}
        for name, row in self.rows.items():
            overhead = measured_overhead(self.devices[name], row)
            if overhead is not None:
                record_overhead(self.devices[name], overhead, path)
                recorded[name] = overhead
        return recorded


class RunCalibration:
    """Feeds a serve run's events to a Calibrator: a new one per plan, recorded when the child ends."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.calibrator: Calibrator | None = None
        self.recorded: dict[str, int] = {}

    def on_event(self, event: SupervisorEvent) -> None:
        if event.plan is not None:
            self.calibrator = Calibrator(p.device for p in event.plan.devices if not p.excluded)
        elif self.calibrator is not None and event.kind == "line":
            self.calibrator.feed(event.message)
        elif self.calibrator is not None and event.phase in ("stopped", "restarting", "failed"):
            self.recorded.update(self.calibrator.record(self.path))
            self.calibrator = None
