"""The overhead store: the memory a GPU backend uses outside llama.cpp's own accounting, per device.

Read by the planner (plans for a device or a kind of GPU seen before use the latest figure instead of the
conservative default); written by what measures it in launch/calibrate.py (a serve run's exit breakdown, a
short calibrating load of a device seen for the first time). Also the user's own figures (--overhead).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamalaunch.errors import BadInputError
from llamalaunch.paths import cache_dir, home_dir, read_json_dict, write_json_atomic
from llamalaunch.probe.assume import canonical_overhead_name, unknown_device
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB, parse_size

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


def record_overhead(device: Device, overhead_bytes: int, path: Path | None = None) -> None:
    target = path or calibration_path()
    data = read_json_dict(target)
    entry = {"overhead_bytes": overhead_bytes, "device": device.name, "measured_at": time.time()}
    keys = {identity_key(device)} | ({calibration_key(device)} if device.endpoint is None else set())
    data.update({key: entry for key in keys})
    write_json_atomic(target, data)  # calibration only sharpens later plans: a failed write is no error


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
    """Real devices with a backend of their own; what-if devices, the host, busy and down workers are not."""
    from llamalaunch.probe.inventory import BUSY_NOTE

    return not device.assumed and device.backend != "CPU" and device.error is None \
        and not (device.note or "").startswith(BUSY_NOTE)


def sources_for(devices: Iterable[Device], known: Mapping[str, Calibration],
                given: Iterable[str] = ()) -> dict[str, OverheadSource]:
    """Per probed device: measured (when), given by --overhead (a name or backend), or assumed; nothing for
    what-if devices, the host and down workers (left out by --exclude)."""
    named = set(given)
    sources: dict[str, OverheadSource] = {}
    for device in devices:
        if device.assumed or device.backend == "CPU" or device.error is not None:
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
    assumed = [name for name, source in sources.items() if source.kind == "assumed"]
    same_rpc = " with the same --rpc" if any(name.startswith("RPC") for name in assumed) else ""
    return f"overhead outside llama.cpp's accounting: {parts}" + \
        (f" (assumed = the default; `llamalaunch devices --calibrate`{same_rpc} measures it)" if assumed else "")


def parse_overheads(values: Sequence[str]) -> dict[str, int]:
    """--overhead CUDA=600MiB (a backend) or CUDA1=700MiB (one device), in llama.cpp's spelling."""
    sizes: dict[str, int] = {}
    for value in values:
        for item in value.split(","):
            name_text, sep, size = item.partition("=")
            if not sep or not name_text.strip():
                raise BadInputError(f"--overhead {item!r} is not NAME=SIZE",
                                    "write it like --overhead CUDA=600MiB")
            name = canonical_overhead_name(name_text)
            zero = size.strip() in ("0", "0B")
            sizes[name] = 0 if zero else parse_size(size, f"--overhead {name}")
    return sizes


def check_overhead_names(devices: Sequence[Device], given: Mapping[str, int]) -> None:
    """Every --overhead names a device here or the backend of one: a typo would change nothing, silently."""
    names = [d.name for d in devices if not d.is_host]
    known = {"CPU", *names, *(d.backend for d in devices)}  # the host is always here
    for name in given:
        if name in known:
            continue
        if name[-1].isdigit():
            raise unknown_device("--overhead", name, names)
        raise BadInputError(f"--overhead {name}: no {name} device here (devices here: {', '.join(names) or 'none'})",
                            f"drop --overhead {name}")


def planned_overheads(devices: Sequence[Device], given: Mapping[str, int]) -> dict[str, int]:
    """What calibration measured for these devices, then the user's --overhead (`given`) on top."""
    check_overhead_names(devices, given)
    calibrated = overheads_for(devices, load_overheads())
    by_backend = {key for key in given if not key[-1].isdigit()}
    calibrated = {name: size for name, size in calibrated.items()
                  if not any(d.name == name and d.backend in by_backend for d in devices)}
    return {**calibrated, **given}  # the cost model puts the defaults under these
