"""llamalaunch's public Python API: the pipeline's entry points, for scripts and benchmarks.

    from llamalaunch import api

    request = api.build_request(ctx="max")
    inputs = api.PlanInputs.gather(model="model.gguf", demo=False, llama_server=None, rpc=[],
                                   assume=["CUDA0=24GiB"], overhead=[], request=request)
    plan = inputs.plan()        # plan.ctx_tokens, plan.devices, plan.argv

Stage by stage: probe devices (`probe_devices`), read a model's GGUF header (`load_profile`), estimate
its memory on a placement (`estimate`), plan (`make_plan`, or `PlanInputs` for probe → model → plan
in one step), estimate speed (`estimate_plan`; `RunSpeedCalibration` folds llama-server's timings of
served requests, `ServedTokens`, into the speed calibration as serve does; `fit` and `run_sample` refit
recorded runs, as bench/replay_speed_calibration.py does), and measure what a real
llama-server load allocates (`measure_load`) to compare with the estimate (`compare`). Sizes are int bytes. Errors a user can
fix are `LaunchError`s with a hint. Everything else in the package is internal and may change.
"""

from __future__ import annotations

from llamalaunch.errors import LaunchError
from llamalaunch.launch.calibrate import RunSpeedCalibration, ServedTokens
from llamalaunch.launch.logparse import BreakdownRow, BufferSize, buffer_device, parse_events
from llamalaunch.launch.measure import measure_fit_params, measure_load
from llamalaunch.model.compare import ComponentRow, compare, within_tolerance
from llamalaunch.model.estimate import Placement, SlotRange, estimate
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.paths import cache_dir
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.choose import estimate_plan
from llamalaunch.plan.parse import build_request
from llamalaunch.plan.pipeline import PlanInputs
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.speed import DeviceTime, SpeedEstimate
from llamalaunch.plan.speed_args import SpeedArgs
from llamalaunch.plan.speed_calibration import (
    HOST_KEY,
    SpeedFactor,
    SpeedRun,
    calibrated,
    fit,
    load_speed_factors,
    record_speed,
    run_sample,
)
from llamalaunch.plan.types import Plan
from llamalaunch.probe.device import Device
from llamalaunch.probe.host import cpu_model, probe_host
from llamalaunch.probe.inventory import probe_devices
from llamalaunch.probe.rpc import probe_worker
from llamalaunch.probe.speed import host_speed, speed_figures
from llamalaunch.toolchain.demo import demo_model_path
from llamalaunch.toolchain.discover import cached_bin_dir
from llamalaunch.units import GIB, MIB

__all__ = [  # the stages they belong to: see the imports above
    "GIB",
    "HOST_KEY",
    "MIB",
    "ArgvOptions",
    "BreakdownRow",
    "BufferSize",
    "ComponentRow",
    "Device",
    "DeviceTime",
    "LaunchError",
    "ModelProfile",
    "Placement",
    "Plan",
    "PlanInputs",
    "Request",
    "RunSpeedCalibration",
    "ServedTokens",
    "SlotRange",
    "SpeedArgs",
    "SpeedEstimate",
    "SpeedFactor",
    "SpeedRun",
    "buffer_device",
    "build_request",
    "cache_dir",
    "cached_bin_dir",
    "calibrated",
    "compare",
    "cpu_model",
    "demo_model_path",
    "estimate",
    "estimate_plan",
    "fit",
    "host_speed",
    "load_profile",
    "load_speed_factors",
    "make_plan",
    "measure_fit_params",
    "measure_load",
    "parse_events",
    "probe_devices",
    "probe_host",
    "probe_worker",
    "record_speed",
    "run_sample",
    "speed_figures",
    "within_tolerance",
]
