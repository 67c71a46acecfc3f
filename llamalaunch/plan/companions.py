"""Models llama-server loads beside the main one (--mmproj, --draft): reserved and pinned to a device, or kept in
host memory when the plan has no device (llama.cpp's `none`: -mmdev none, -devd none)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from llamalaunch.errors import BadInputError, PlanError
from llamalaunch.model.estimate import Placement, SlotRange, estimate
from llamalaunch.model.gguf_header import GGUF_MAGIC, read_header
from llamalaunch.model.load import load_profile
from llamalaunch.plan.request import Request
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB, format_bytes

# A projector's compute buffer depends on the image size it is warmed up with; this covers the
# common encoders (a quarter of the weights, at least 256 MiB). An estimate, said so in the plan.
MMPROJ_COMPUTE_SHARE = 4
MMPROJ_COMPUTE_MIN = 256 * MIB
# general.architecture of a projector: llama.cpp's converters write "clip" (gguf-py MODEL_ARCH.MMPROJ, "dummy
# arch for clip.cpp"); clip.cpp then wants a vision or audio encoder in it, which a language model has not.
PROJECTOR_ARCH = "clip"
# What -mmdev and -devd take for "do not offload" (llama.cpp common/arg.cpp): the companion stays in host memory.
NO_DEVICE = "none"


@dataclass(frozen=True)
class Companion:
    """A second model, its llama-server flags, and what it needs on the device it is pinned to (or, given
    NO_DEVICE, in host memory)."""

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


def check_projector(path: str) -> int:
    """The projector's size, once its header reads whole (ModelError otherwise, as for a model) and says it is a
    projector; BadInputError naming --mmproj otherwise."""
    size = check_companion_file(path, "--mmproj")
    arch = read_header(path).get("general.architecture")
    if arch != PROJECTOR_ARCH:
        what = f"its general.architecture is {arch!r}" if isinstance(arch, str) else "it has no general.architecture"
        raise BadInputError(f"--mmproj {path} is not a multimodal projector ({what}; a projector's is "
                            f"{PROJECTOR_ARCH!r})", "give --mmproj the mmproj .gguf file made for this model")
    return size


def check_companion_files(mmproj: str | None, draft: str | None) -> None:
    """Before planning: each companion given is a file llama.cpp can load as one (a draft's header is read when
    it is sized)."""
    if mmproj:
        check_projector(mmproj)
    if draft:
        check_companion_file(draft, "--draft")


def mmproj_companion(path: str) -> Companion:
    """A multimodal projector: its weights (the file) and an encoder compute buffer, wherever it goes."""
    size = check_projector(path)
    reserve = size + max(size // MMPROJ_COMPUTE_SHARE, MMPROJ_COMPUTE_MIN)
    return Companion("mmproj", path, reserve, "--mmproj", "-mmdev")


def draft_companion(path: str, request: Request, ctx_tokens: int, backend: str | None) -> Companion:
    """A draft model wholly on one device of `backend`, or wholly in host memory (None): weights, KV and compute
    from our own estimator."""
    check_companion_file(path, "--draft")
    profile = load_profile(path)
    if backend is None:
        use = estimate(profile, Placement(()), request, ctx_tokens).host
        return Companion("draft", path, use.total_bytes, "-md", "-devd", ("-ngld", "0"))
    placement = Placement((SlotRange("draft", backend, 0, profile.n_slots),))
    use = estimate(profile, placement, request, ctx_tokens, {"draft": 0}).devices["draft"]
    return Companion("draft", path, use.total_bytes, "-md", "-devd", ("-ngld", str(profile.n_slots)))


def pin_device(devices: Sequence[Device], request: Request) -> Device | None:
    """Where llama-server puts companions by default: the first device it is given."""
    names = request.devices if request.devices is not None else \
        tuple(d.name for d in devices if not d.is_host and d.name not in request.exclude)  # -dev none: ()
    by_name = {d.name: d for d in devices}
    return next((by_name[name] for name in names if name in by_name), None)


def with_reservations(request: Request, device: Device, companions: Sequence[Companion]) -> Request:
    reserve = dict(request.reserve_bytes)
    reserve[device.name] = reserve.get(device.name, 0) + sum(c.reserve_bytes for c in companions)
    return replace(request, reserve_bytes=reserve)


def host_room(host_free_bytes: int | None, on_host: Sequence[Companion]) -> int | None:
    """Host memory left for the main model once the companions kept there have theirs (None: not known)."""
    if host_free_bytes is None:
        return None
    return max(host_free_bytes - sum(c.reserve_bytes for c in on_host), 0)


def with_host_companions(argv: Sequence[str], on_host: Sequence[Companion]) -> tuple[str, ...]:
    """The plan's argv with the companions kept in host memory, before --fit where it has one (where argv.py puts
    the companions pinned to a device)."""
    flags = [flag for companion in on_host for flag in companion.argv(NO_DEVICE)]
    at = list(argv).index("--fit") if "--fit" in argv else len(argv)
    return (*argv[:at], *flags, *argv[at:])


def companion_notes(companions: Sequence[Companion], pinned: Device | None) -> list[str]:
    where = f"on {pinned.name}" if pinned is not None else "in host memory"
    return [f"{c.kind} {c.path}: {format_bytes(c.reserve_bytes)} reserved {where} (estimate)" for c in companions]


def host_refusal(error: PlanError, on_host: Sequence[Companion]) -> PlanError:
    """The planner's refusal, saying that the host memory it names is what the companions kept there left."""
    names = " and ".join(f"--{c.kind} {c.path}" for c in on_host)
    taken = format_bytes(sum(c.reserve_bytes for c in on_host))
    return PlanError(f"{error.message}, after {taken} of host memory for {names}", error.hint)
