"""The speed figures of devices and links, as the probe finds them and the estimate in plan/speed.py reads them.

Here, below both, so that the probe does not import the planner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Defaults, per device kind (calibration replaces the efficiencies): the share of the peak bandwidth a
# generated token reaches, the share of the peak FLOP/s a prompt ubatch reaches, and a fixed cost per slot.
# CUDA's from an H100 (bench/results/h100-2026-12-07c): an 8B Q4_K at 264 tok/s generation (0.5 of 3.35 TB/s
# and 30 us per slot: 276) and 9,469 tok/s prompts (0.16 of 989 TFLOP/s: 10,631). Smaller cards reach a larger
# share of the peak; the calibration of a first run corrects both.
DEFAULT_GEN_EFFICIENCY = MappingProxyType({"CUDA": 0.5, "CPU": 0.7})
DEFAULT_PROMPT_EFFICIENCY = MappingProxyType({"CUDA": 0.16, "CPU": 0.5})
DEFAULT_SLOT_OVERHEAD_S = MappingProxyType({"CUDA": 30e-6, "CPU": 15e-6})


@dataclass(frozen=True)
class DeviceSpeed:
    """What one device can do; None: not known."""

    kind: str  # "CUDA" or "CPU": which defaults and calibration apply (an RPC worker's own kind)
    bandwidth_bytes_s: float | None
    flops: float | None
    source: str  # where the figures came from: "NVML", "probe", "--device-speed", "host (loopback)", ...
    gen_efficiency: float = 0.0  # 0: the kind's default
    prompt_efficiency: float = 0.0
    slot_overhead_s: float = -1.0  # <0: the kind's default
    # a GPU: the share of the nominal rate (plan/speed.py's STREAM_BYTES_S) at which it streams host weights in
    stream_efficiency: float = 1.0
    calibrated: bool = False  # the efficiencies were scaled by llama-server's timings of earlier runs

    def __post_init__(self) -> None:
        if not self.gen_efficiency:
            object.__setattr__(self, "gen_efficiency", DEFAULT_GEN_EFFICIENCY.get(self.kind, 0.6))
        if not self.prompt_efficiency:
            object.__setattr__(self, "prompt_efficiency", DEFAULT_PROMPT_EFFICIENCY.get(self.kind, 0.35))
        if self.slot_overhead_s < 0:
            object.__setattr__(self, "slot_overhead_s", DEFAULT_SLOT_OVERHEAD_S.get(self.kind, 15e-6))

    @property
    def known(self) -> bool:
        return self.bandwidth_bytes_s is not None and self.flops is not None


UNKNOWN_CPU = DeviceSpeed("CPU", None, None, "unknown")


@dataclass(frozen=True)
class Link:
    """The network between the host and an RPC worker."""

    round_trip_s: float
    bytes_s: float
    source: str  # "probe", "--link", "assumed"


@dataclass(frozen=True)
class SpeedFigures:
    host: DeviceSpeed = UNKNOWN_CPU
    devices: Mapping[str, DeviceSpeed] = field(default_factory=dict)  # by llama.cpp device name
    links: Mapping[str, Link] = field(default_factory=dict)  # RPC device name → its worker's link
    fill_tokens: int | None = None  # context fill the estimate is for; None: half the context
