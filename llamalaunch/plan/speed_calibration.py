"""Speed calibration: how far llama-server's own timings were from the estimate, per kind of device.

A record holds, per device key (as the memory calibration keys it: backend and description; the host
is `CPU:host`), a factor for generation and one for prompts. Later plans multiply that device's
efficiency by it. A run over several devices moves every device it used by the run's ratio, so the
estimate of that configuration converges even when the shares of the devices are not known apart.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llamalaunch.paths import write_json_atomic
from llamalaunch.plan.overheads import calibration_key, calibration_path
from llamalaunch.plan.speed import SpeedEstimate
from llamalaunch.probe.device import Device
from llamalaunch.probe.speed_figures import DeviceSpeed, SpeedFigures

HOST_KEY = "CPU:host"
PLAUSIBLE_FACTOR = (0.02, 50.0)  # outside: a broken measurement, not a device


@dataclass(frozen=True)
class SpeedFactor:
    generation: float = 1.0
    prompt: float = 1.0


def speed_calibration_path() -> Path:
    """Beside the overhead store (plan/overheads.py), under LLAMALAUNCH_HOME when set."""
    return calibration_path().with_name("speed_calibration.json")


def load_speed_factors(path: Path | None = None) -> dict[str, SpeedFactor]:
    try:
        data = json.loads((path or speed_calibration_path()).read_text())
        return {str(key): SpeedFactor(float(value["generation"]), float(value["prompt"]))
                for key, value in data.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def calibrated(figures: SpeedFigures, devices: Iterable[Device],
               factors: Mapping[str, SpeedFactor]) -> SpeedFigures:
    """The figures with each device's efficiencies scaled by its recorded factors."""
    by_name = {d.name: factors[calibration_key(d)] for d in devices if calibration_key(d) in factors}
    scaled = {name: _scale(speed, by_name[name]) if name in by_name else speed
              for name, speed in figures.devices.items()}
    host = _scale(figures.host, factors[HOST_KEY]) if HOST_KEY in factors else figures.host
    return dataclasses.replace(figures, host=host, devices=scaled)


def _scale(speed: DeviceSpeed, factor: SpeedFactor) -> DeviceSpeed:
    return dataclasses.replace(speed, gen_efficiency=speed.gen_efficiency * factor.generation,
                               prompt_efficiency=speed.prompt_efficiency * factor.prompt,
                               source=f"{speed.source}, calibrated", calibrated=True)


def record_speed(devices: Iterable[Device], used_host: bool, estimate: SpeedEstimate,
                 generation_tps: float | None, prompt_tps: float | None,
                 path: Path | None = None) -> dict[str, SpeedFactor]:
    """Fold one run's measured speeds (llama-server's `timings`) into the factors of the devices it used;
    nothing when neither speed is a usable measurement (a device is then not called calibrated)."""
    target = path or speed_calibration_path()
    factors = load_speed_factors(target)
    gen = _ratio(generation_tps, estimate.generation_tps)
    prompt = _ratio(prompt_tps, estimate.prompt_tps)
    if gen is None and prompt is None:
        return {}
    keys = [calibration_key(d) for d in devices] + ([HOST_KEY] if used_host else [])
    for key in keys:
        old = factors.get(key, SpeedFactor())
        factors[key] = SpeedFactor(old.generation * (gen or 1.0), old.prompt * (prompt or 1.0))
    _write(target, factors)
    return {key: factors[key] for key in keys}


def _ratio(measured: float | None, estimated: float | None) -> float | None:
    if not measured or not estimated:
        return None
    ratio = measured / estimated
    low, high = PLAUSIBLE_FACTOR
    return ratio if low <= ratio <= high else None


def _write(target: Path, factors: Mapping[str, SpeedFactor]) -> None:
    data = {key: {"generation": f.generation, "prompt": f.prompt} for key, f in factors.items()}
    write_json_atomic(target, data)  # calibration only sharpens later plans: a failed write is no error
