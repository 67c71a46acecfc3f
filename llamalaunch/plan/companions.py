"""Models llama-server loads beside the main one (--mmproj, --draft): reserved and pinned to a device."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from llamalaunch.errors import BadInputError
from llamalaunch.model.estimate import Placement, SlotRange, estimate
from llamalaunch.model.gguf_header import GGUF_MAGIC
from llamalaunch.model.load import load_profile
from llamalaunch.plan.request import Request
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB

# A projector's compute buffer depends on the image size it is warmed up with; this covers the
# common encoders (a quarter of the weights, at least 256 MiB). An estimate, said so in the plan.
MMPROJ_COMPUTE_SHARE = 4
MMPROJ_COMPUTE_MIN = 256 * MIB


@dataclass(frozen=True)
class Companion:
    """A second model, its llama-server flags, and what it needs on the device it is pinned to."""

    kind: str  # "mmproj" or "draft"
    path: str
    reserve_bytes: int
    file_flag: str
    device_flag: str
    extra_args: tuple[str, ...] = ()

    def argv(self, device_name: str) -> list[str]:
        return [self.file_flag, self.path, self.device_flag, device_name, *self.extra_args]


def check_companion_file(path: str, option: str) -> int:
    """The file's size, once its first bytes say GGUF; BadInputError naming `option` otherwise."""
    try:
        with open(path, "rb") as stream:
            magic = stream.read(len(GGUF_MAGIC))
            size = os.fstat(stream.fileno()).st_size
    except IsADirectoryError:
        raise BadInputError(f"{option} {path} is a directory", f"give {option} the .gguf file") from None
    except OSError as error:
        raise BadInputError(f"{option} {path}: {error.strerror}", f"give an existing file to {option}") from None
    if magic != GGUF_MAGIC:
        raise BadInputError(f"{option} {path} is not a GGUF file (it starts with {magic!r})",
                            f"give {option} the .gguf file llama.cpp loads")
    return size


def mmproj_companion(path: str) -> Companion:
    """A multimodal projector: its weights (the file) and an encoder compute buffer."""
    size = check_companion_file(path, "--mmproj")
    reserve = size + max(size // MMPROJ_COMPUTE_SHARE, MMPROJ_COMPUTE_MIN)
    return Companion("mmproj", path, reserve, "--mmproj", "-mmdev")


def draft_companion(path: str, request: Request, ctx_tokens: int, backend: str) -> Companion:
    """A draft model wholly on one device: weights, KV and compute from our own estimator."""
    check_companion_file(path, "--draft")
    profile = load_profile(path)
    placement = Placement((SlotRange("draft", backend, 0, profile.n_slots),))
    use = estimate(profile, placement, request, ctx_tokens, {"draft": 0}).devices["draft"]
    return Companion("draft", path, use.total_bytes, "-md", "-devd", ("-ngld", str(profile.n_slots)))


def pin_device(devices: Sequence[Device], request: Request) -> Device | None:
    """Where llama-server puts companions by default: the first device it is given."""
    names = request.devices or tuple(d.name for d in devices if not d.is_host and d.name not in request.exclude)
    by_name = {d.name: d for d in devices}
    return next((by_name[name] for name in names if name in by_name), None)


def with_reservations(request: Request, device: Device, companions: Sequence[Companion]) -> Request:
    reserve = dict(request.reserve_bytes)
    reserve[device.name] = reserve.get(device.name, 0) + sum(c.reserve_bytes for c in companions)
    return replace(request, reserve_bytes=reserve)
