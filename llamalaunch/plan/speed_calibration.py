"""Speed calibration: how far llama-server's own timings were from the estimate, per kind of device.

Per device key (as the memory calibration keys it: backend and description; the host is `CPU:host`), a
factor for generation and one for prompts; later plans multiply that device's efficiency by it. The store
keeps the last runs: per run and metric the measured seconds per token, each device's share of the
estimate as if uncalibrated (factor 1), and the part no factor scales (hops, slot overheads). After every
run each key's factor is refitted over them by least squares on the relative error, so a run whose time
is mostly one device's moves mostly that device, and runs of different mixes tell devices apart; a weak
pull toward the prior (1, or the factors of a store written before runs were kept) decides what the runs
leave open: one run alone spreads its error over its devices by their shares. A GPU's streaming of host
weights for prompts (op offload) is a third factor of its own, fitted in the prompt rows beside the GPU's
compute as if it were another device (one factor for the link, whichever --host-weights mode was streamed).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalaunch.paths import write_json_atomic
from llamalaunch.plan.overheads import calibration_key, calibration_path
from llamalaunch.plan.speed import SpeedEstimate
from llamalaunch.probe.device import Device
from llamalaunch.probe.speed_figures import DeviceSpeed, SpeedFigures

HOST_KEY = "CPU:host"
PLAUSIBLE_FACTOR = (0.02, 50.0)  # outside: a broken measurement, not a device
HISTORY_RUNS = 32  # runs kept for the fit: recent ones, so a changed machine is followed
# A run whose fixed part (hops, slot overheads) the estimate puts at over 90% of the measured time says that
# part is wrong, not a factor: fitted, such a run drove the H100's prompt factor to its bound when streamed
# weights still counted as fixed (bench/results/h100-2026-12-07c).
MIN_SCALED_SHARE = 0.1
RIDGE = 1e-4  # weight of the pull of each 1/factor toward its prior, against rows of relative error
# 4: streamed host weights are a factor of their own (3 counted them as fixed): a store of another version is
# dropped, its runs' raw figures were another model's; the next served run refits.
STORE_VERSION = 4
STREAMING = " streaming"  # a GPU key plus this: the unknown its streaming's factor is fitted as


@dataclass(frozen=True)
class SpeedFactor:
    generation: float = 1.0
    prompt: float = 1.0
    stream: float = 1.0  # a GPU's streaming of host weights for prompts


@dataclass(frozen=True)
class Sample:
    """One run's one metric, in seconds per token: measured; what no factor scales; per device key, its
    estimated share at factor 1 (a factor f makes it raw / f)."""

    measured_s: float
    fixed_s: float
    raw_s: Mapping[str, float]


@dataclass(frozen=True)
class SpeedRun:
    generation: Sample | None
    prompt: Sample | None


@dataclass(frozen=True)
class SpeedStore:
    factors: Mapping[str, SpeedFactor]  # the fit, what plans use
    prior: Mapping[str, SpeedFactor] = dataclasses.field(default_factory=dict)
    runs: tuple[SpeedRun, ...] = ()


def speed_calibration_path() -> Path:
    """Beside the overhead store (plan/overheads.py), under LLAMALAUNCH_HOME when set."""
    return calibration_path().with_name("speed_calibration.json")


def load_speed_factors(path: Path | None = None) -> dict[str, SpeedFactor]:
    return dict(load_speed_store(path).factors)


def load_speed_store(path: Path | None = None) -> SpeedStore:
    """The store; a file of the first format (key -> factors, no runs) gives its factors as the prior, one of
    another version nothing."""
    try:
        data = json.loads((path or speed_calibration_path()).read_text())
        if "version" in data and data["version"] != STORE_VERSION:
            return SpeedStore({})
        if data.get("version") != STORE_VERSION:
            factors = _factors(data)
            return SpeedStore(factors, factors)
        return SpeedStore(_factors(data["factors"]), _factors(data["prior"]),
                          tuple(SpeedRun(_sample(run["generation"]), _sample(run["prompt"])) for run in data["runs"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return SpeedStore({})


def _factors(data: Mapping[str, Any]) -> dict[str, SpeedFactor]:
    return {str(key): SpeedFactor(float(value["generation"]), float(value["prompt"]), float(value.get("stream", 1.0)))
            for key, value in data.items()}


def _sample(data: Mapping[str, Any] | None) -> Sample | None:
    if data is None:
        return None
    return Sample(float(data["measured_s"]), float(data["fixed_s"]),
                  {str(key): float(value) for key, value in data["raw_s"].items()})


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
                               stream_efficiency=speed.stream_efficiency * factor.stream,
                               source=f"{speed.source}, calibrated", calibrated=True)


def record_speed(devices: Iterable[Device], used_host: bool, estimate: SpeedEstimate,
                 generation_tps: float | None, prompt_tps: float | None,
                 path: Path | None = None) -> dict[str, SpeedFactor]:
    """Keep one run's measured speeds (llama-server's `timings`) beside its estimate and refit every factor;
    nothing when neither speed is a usable measurement (a device is then not called calibrated).
    `estimate` was made with this store's factors for its `calibrated` parts (as serve and plan make it)."""
    target = path or speed_calibration_path()
    store = load_speed_store(target)
    keys = {d.name: calibration_key(d) for d in devices} | ({"host": HOST_KEY} if used_host else {})
    run = SpeedRun(run_sample(estimate, keys, store.factors, generation_tps, "generation"),
                   run_sample(estimate, keys, store.factors, prompt_tps, "prompt"))
    if run.generation is None and run.prompt is None:
        return {}
    runs = (*store.runs, run)[-HISTORY_RUNS:]
    factors = fit(store.prior, runs)
    write_json_atomic(target, _store_json(SpeedStore(factors, store.prior, runs)))  # a failed write is no error
    used = {key.removesuffix(STREAMING) for sample in (run.generation, run.prompt)
            if sample is not None and _informative(sample) for key in sample.raw_s}
    return {key: factors[key] for key in keys.values() if key in used}


def run_sample(estimate: SpeedEstimate, keys: Mapping[str, str], factors: Mapping[str, SpeedFactor],
               measured_tps: float | None, metric: str) -> Sample | None:
    """The run's `metric` per token; its parts' calibration undone (a part whose device is not among `keys`
    counts as fixed); None when the measurement is missing or implausible."""
    generation = metric == "generation"
    estimated_tps = estimate.generation_tps if generation else estimate.prompt_tps
    if _ratio(measured_tps, estimated_tps) is None or not measured_tps:
        return None
    tokens = 1 if generation else estimate.ubatch_tokens
    fixed = estimate.hop_generation_s if generation else estimate.hop_prompt_s
    raw: dict[str, float] = {}
    for part in estimate.parts:
        total, unscaled = ((part.generation_s, part.generation_fixed_s) if generation
                           else (part.prompt_s, part.prompt_fixed_s))
        streamed = 0.0 if generation else part.prompt_streamed_s
        key = keys.get(part.name)
        if key is None:
            fixed += total
            continue
        in_force = factors.get(key, SpeedFactor()) if part.name in estimate.calibrated else SpeedFactor()
        raw[key] = raw.get(key, 0.0) + (total - unscaled - streamed) * getattr(in_force, metric) / tokens
        if streamed:
            raw[key + STREAMING] = raw.get(key + STREAMING, 0.0) + streamed * in_force.stream / tokens
        fixed += unscaled
    return Sample(1 / measured_tps, fixed / tokens, raw)


def fit(prior: Mapping[str, SpeedFactor], runs: Sequence[SpeedRun]) -> dict[str, SpeedFactor]:
    """Every key's factors, fitted over `runs` (see the module's docstring), within PLAUSIBLE_FACTOR."""
    keys = sorted({*prior, *(key.removesuffix(STREAMING) for run in runs for s in (run.generation, run.prompt) if s
                             for key in s.raw_s)})
    default = SpeedFactor()
    generation = _fit_metric(keys, [prior.get(k, default).generation for k in keys],
                             [run.generation for run in runs if run.generation is not None])
    # the prompt rows' unknowns: each key's compute, then each key's streaming
    prompt = _fit_metric([*keys, *(key + STREAMING for key in keys)],
                         [*(prior.get(k, default).prompt for k in keys), *(prior.get(k, default).stream for k in keys)],
                         [run.prompt for run in runs if run.prompt is not None])
    return {key: SpeedFactor(g, p, s) for key, g, p, s in zip(keys, generation, prompt, prompt[len(keys):])}


def _fit_metric(keys: Sequence[str], prior: Sequence[float], samples: Sequence[Sample]) -> list[float]:
    """measured ≈ fixed + Σ raw_k·x_k with x_k = 1/factor_k, rows weighted by 1/measured, ridge toward the prior."""
    n = len(keys)
    matrix = [[RIDGE if i == j else 0.0 for j in range(n)] for i in range(n)]
    vector = [RIDGE / factor for factor in prior]
    for sample in filter(_informative, samples):
        row = [sample.raw_s.get(key, 0.0) / sample.measured_s for key in keys]
        target = (sample.measured_s - sample.fixed_s) / sample.measured_s
        for i in range(n):
            vector[i] += row[i] * target
            for j in range(n):
                matrix[i][j] += row[i] * row[j]
    low, high = PLAUSIBLE_FACTOR
    return [min(max(1 / x, low), high) if x > 0 else high for x in _solve(matrix, vector)]


def _informative(sample: Sample) -> bool:
    """False when the unscaled part alone is (nearly) the whole measurement: no factor can explain it."""
    return sample.measured_s - sample.fixed_s >= MIN_SCALED_SHARE * sample.measured_s


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the ridge keeps the matrix positive definite)."""
    n = len(vector)
    a = [[*row, value] for row, value in zip(matrix, vector)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            scale = a[r][col] / a[col][col]
            a[r] = [x - scale * y for x, y in zip(a[r], a[col])]
    solution = [0.0] * n
    for r in reversed(range(n)):
        solution[r] = (a[r][n] - sum(a[r][c] * solution[c] for c in range(r + 1, n))) / a[r][r]
    return solution


def _ratio(measured: float | None, estimated: float | None) -> float | None:
    if not measured or not estimated:
        return None
    ratio = measured / estimated
    low, high = PLAUSIBLE_FACTOR
    return ratio if low <= ratio <= high else None


def _store_json(store: SpeedStore) -> dict[str, Any]:
    def factors(found: Mapping[str, SpeedFactor]) -> dict[str, dict[str, float]]:
        return {key: {"generation": f.generation, "prompt": f.prompt, "stream": f.stream} for key, f in found.items()}

    def sample(found: Sample | None) -> dict[str, Any] | None:
        return None if found is None else {"measured_s": found.measured_s, "fixed_s": found.fixed_s,
                                           "raw_s": dict(found.raw_s)}

    return {"version": STORE_VERSION, "factors": factors(store.factors), "prior": factors(store.prior),
            "runs": [{"generation": sample(run.generation), "prompt": sample(run.prompt)} for run in store.runs]}
