"""Command-line speed figures: `--link RPC0=1Gbit/0.3ms`, `--device-speed RPC0=20GB:500GFLOPS`, `--fill 8k`,
`--prefer context|speed`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llamalaunch.errors import BadInputError
from llamalaunch.probe.assume import canonical_device_name, unknown_device
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.probe.speed_figures import DeviceSpeed, Link, SpeedFigures
from llamalaunch.units import parse_tokens

_NUMBER = r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
_RATE = re.compile(_NUMBER + r"\s*([kmgt]?)(i?)(bit|bps|b)(?:/s)?$", re.IGNORECASE)
_LATENCY = re.compile(_NUMBER + r"\s*(s|ms|us|µs)$", re.IGNORECASE)
# The unit is required, as a rate's is: "500" alone would be 500 FLOP/s, an estimate of 0.0 tok/s.
_FLOPS = re.compile(_NUMBER + r"\s*([kmgtp]?)(?:flops|flop/s)$", re.IGNORECASE)
# RATE/ROUNDTRIP, the rate perhaps spelled per second ("1Gbit/s/0.3ms"): a third part is a typo, not a rate.
_LINK = re.compile(r"^([^/]+(?:/s)?)/([^/]+)$", re.IGNORECASE)
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_LATENCY_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
LINK_HINT = "write it like --link RPC0=1Gbit/0.3ms: a rate in bit or B per second, a round trip in s, ms or us"
SPEED_HINT = "write it like --device-speed RPC0=20GB or RPC0=20GB:500GFLOPS, memory bandwidth per second"
FLOPS_HINT = "give FLOP/s with a unit, like --device-speed RPC0=20GB:500GFLOPS or RPC0=20GB:2TFLOPS"


def _items(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_rate(text: str) -> float | None:
    """Bytes per second from '1Gbit', '100Mbps', '20GB', '1.5GiB'; None when it is not a rate."""
    match = _RATE.match(text.strip())
    if match is None:
        return None
    number, prefix, binary, unit = float(match.group(1)), match.group(2).lower(), match.group(3), match.group(4)
    scale = 1024.0 ** "kmgt".index(prefix) * 1024 if binary and prefix else _SCALE[prefix]
    value = number * scale
    bits = unit.lower() in ("bit", "bps") or unit == "b"  # 1Gb is a gigabit, 1GB a gigabyte
    return value / 8 if bits else value


def parse_flops(text: str) -> float | None:
    """FLOP/s from '500GFLOPS', '2TFLOP/s'; None when it is not a FLOP/s figure (a bare number is not)."""
    match = _FLOPS.match(text.strip())
    return None if match is None else float(match.group(1)) * _SCALE[match.group(2).lower()]


def _positive(value: float | None, what: str, text: str, noun: str, hint: str) -> float:
    """`value` parsed from `text`; a BadInputError naming `what` when it is not a `noun`, or not above zero."""
    if value is None:
        raise BadInputError(f"{what}: {text!r} is not a {noun}", hint)
    if value <= 0:
        raise BadInputError(f"{what}: the {noun} {text!r} must be positive", hint)
    return value


def parse_links(values: Sequence[str]) -> dict[str, Link]:
    """{'RPC0': Link} from ['RPC0=1Gbit/0.3ms']."""
    links: dict[str, Link] = {}
    for item in _items(values):
        name_text, sep, rest = item.partition("=")
        form = _LINK.match(rest.strip())
        if not sep or form is None:
            raise BadInputError(f"--link value {item!r} is not NAME=RATE/ROUNDTRIP", LINK_HINT)
        rate_text, latency_text = form.groups()
        name, backend = canonical_device_name(name_text, "--link")
        if backend != "RPC":
            raise BadInputError(f"--link {name}: only RPC devices have a network link", "name an RPC device")
        rate = _positive(parse_rate(rate_text), f"--link {name}", rate_text, "rate", LINK_HINT)
        latency = _LATENCY.match(latency_text.strip())
        if latency is None:
            raise BadInputError(f"--link {name}: {latency_text!r} is not a round-trip time", LINK_HINT)
        if name in links:
            raise BadInputError(f"--link gives {name} twice", "give each device once")
        seconds = float(latency.group(1)) * _LATENCY_SCALE[latency.group(2).lower()]
        links[name] = Link(seconds, rate, "--link")
    return links


def parse_device_speeds(values: Sequence[str]) -> dict[str, DeviceSpeed]:
    """{'RPC0': DeviceSpeed} from ['RPC0=20GB:500GFLOPS']; FLOP/s default to 25 per byte of bandwidth."""
    speeds: dict[str, DeviceSpeed] = {}
    for item in _items(values):
        name_text, sep, rest = item.partition("=")
        bandwidth_text, _colon, flops_text = rest.partition(":")
        if not sep or not bandwidth_text.strip():
            raise BadInputError(f"--device-speed value {item!r} is not NAME=BANDWIDTH[:FLOPS]", SPEED_HINT)
        name, backend = canonical_device_name(name_text, "--device-speed")
        what = f"--device-speed {name}"
        bandwidth = _positive(parse_rate(bandwidth_text), what, bandwidth_text, "bandwidth", SPEED_HINT)
        flops = bandwidth * 25  # a GPU's or a CPU's usual balance: compute-bound only for large batches
        if flops_text.strip():
            flops = _positive(parse_flops(flops_text), what, flops_text, "FLOP/s figure", FLOPS_HINT)
        if name in speeds:
            raise BadInputError(f"--device-speed gives {name} twice", "give each device once")
        kind = "CPU" if backend in ("CPU", "RPC") else "CUDA"
        speeds[name] = DeviceSpeed(kind, bandwidth, flops, "--device-speed")
    return speeds


def parse_fill(text: str | None) -> int | None:
    """--fill: tokens already in the context for the estimate ('8k', '8192'); None: half the context."""
    return None if text is None or text.strip().lower() in ("", "half") else parse_tokens(text, "--fill")


@dataclass(frozen=True)
class SpeedArgs:
    """The speed options of plan and serve, parsed; `figures` adds what the probes and calibration know."""

    links: Mapping[str, Link] = field(default_factory=dict)
    device_speeds: Mapping[str, DeviceSpeed] = field(default_factory=dict)
    fill_tokens: int | None = None
    enabled: bool = True  # False: plan by memory alone, no estimate (benchmarks compare against it)
    compare: bool = False  # plan --compare: list smaller contexts among the alternatives too

    @classmethod
    def parse(cls, link: Sequence[str] = (), device_speed: Sequence[str] = (), fill: str | None = None,
              compare: bool = False) -> SpeedArgs:
        return cls(parse_links(link), parse_device_speeds(device_speed), parse_fill(fill), compare=compare)

    def figures(self, devices: Sequence[Device], host: HostMemory | None) -> SpeedFigures | None:
        if not self.enabled:
            return None
        from llamalaunch.plan.speed_calibration import calibrated, load_speed_factors
        from llamalaunch.probe.speed import host_speed, speed_figures

        names = {d.name for d in devices}
        for option, given in (("--link", self.links), ("--device-speed", self.device_speeds)):
            for name in given:
                if name != "CPU" and name not in names:
                    raise unknown_device(option, name, sorted(names))
        figures = speed_figures(devices, host_speed(host), self.device_speeds, self.links, self.fill_tokens,
                                host.total_bytes if host is not None else None)
        return calibrated(figures, devices, load_speed_factors())
