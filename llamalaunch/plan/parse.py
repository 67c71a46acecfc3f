"""Command-line text → Request: human units and llama-server's option vocabulary, parsed once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from llamalaunch.errors import BadInputError
from llamalaunch.model.kv import CACHE_TYPES, check_cache_types
from llamalaunch.options import DEFAULTS, checked
from llamalaunch.plan.request import FLASH_ATTN, HOST_WEIGHTS, Request
from llamalaunch.probe.assume import canonical_device_name, parse_device_sizes
from llamalaunch.units import parse_size, parse_tokens


def parse_ctx(text: str) -> int | None:
    """'16k', '16384' → tokens; 'max' → None (the largest that fits)."""
    return None if text.strip().lower() == "max" else parse_tokens(text, "context")


def parse_choice(value: str, allowed: Sequence[str], option: str) -> str:
    """One of `allowed`, in its spelling (llama-server takes q8_0, not Q8_0): PINNED is pinned."""
    found = next((choice for choice in allowed if choice.lower() == value.strip().lower()), None)
    if found is None:
        raise BadInputError(f"{option} {value!r} is not allowed", f"use one of {', '.join(allowed)}")
    return found


def parse_listen_host(host: str) -> str:
    """--host for llama-server: an address or a name that resolves (llama-server binds it by getaddrinfo)."""
    import socket  # here: serve's check; plans need no sockets

    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise BadInputError(f"--host {host!r} is not an address", "give an IP address of this machine, like "
                            "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    return host


def split_names(value: str | None) -> tuple[str, ...] | None:
    """-dev's list in llama.cpp's spelling (it matches names in any case); `none` (no device: the CPU) is ()."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    names = device_names(name for name in value.split(",") if name.strip())
    if not names:
        raise BadInputError(f"-dev {value!r} names no device", "list devices in order, like -dev CUDA0,RPC0")
    if len(set(names)) != len(names):
        raise BadInputError(f"-dev {value!r} lists a device twice", "name each device once")
    return names


def device_names(names: Iterable[str]) -> tuple[str, ...]:
    """cuda0 → CUDA0, as llama.cpp reads -dev; a name that is no device's stays as typed (select_devices says so)."""
    return tuple(_device_name(name.strip()) for name in names)


def _device_name(name: str) -> str:
    try:
        return canonical_device_name(name, "-dev")[0]
    except BadInputError:
        return name


def build_request(*, ctx: str, ctx_min: str = DEFAULTS["ctx_min"], parallel: int = DEFAULTS["parallel"],
                  kv_unified: bool = DEFAULTS["kv_unified"], batch: int = DEFAULTS["batch"],
                  ubatch: int = DEFAULTS["ubatch"], cache_type_k: str = DEFAULTS["cache_type_k"],
                  cache_type_v: str = DEFAULTS["cache_type_v"], flash_attn: str = DEFAULTS["flash_attn"],
                  swa_full: bool = DEFAULTS["swa_full"], margin: str | None = DEFAULTS["margin"],
                  reserve: Sequence[str] = (), budget: Sequence[str] = (), devices: str | None = None,
                  exclude: Sequence[str] = (), cpu_spill: bool = DEFAULTS["cpu_spill"],
                  gpu_layers: str | None = DEFAULTS["gpu_layers"], cpu_experts: int | None = DEFAULTS["cpu_experts"],
                  prefer: str = DEFAULTS["prefer"], host_weights: str = DEFAULTS["host_weights"],
                  ctx_is_target: bool = False) -> Request:
    request = Request(
        ctx_tokens=parse_ctx(ctx),
        ctx_min_tokens=parse_tokens(ctx_min, "--ctx-min"),
        ctx_is_target=ctx_is_target,
        n_parallel=checked("parallel", parallel),
        kv_unified=kv_unified,
        n_batch=checked("batch", batch),
        n_ubatch=checked("ubatch", ubatch),
        cache_type_k=parse_choice(cache_type_k, CACHE_TYPES, "-ctk/--cache-type-k"),
        cache_type_v=parse_choice(cache_type_v, CACHE_TYPES, "-ctv/--cache-type-v"),
        flash_attn=parse_choice(flash_attn, FLASH_ATTN, "-fa/--flash-attn"),
        swa_full=swa_full,
        margin_bytes=None if margin is None else parse_margin(margin),
        reserve_bytes=parse_device_sizes(reserve, "--reserve"),
        budget_bytes=parse_device_sizes(budget, "--budget"),
        devices=split_names(devices),
        exclude=device_names(exclude),
        cpu_spill=cpu_spill,
        n_gpu_layers=parse_gpu_layers(gpu_layers),
        cpu_experts=checked("cpu_experts", cpu_experts),
        prefer=parse_choice(prefer, ("context", "speed"), "--prefer"),
        host_weights=parse_choice(host_weights, HOST_WEIGHTS, "--host-weights"),
    )
    if request.ctx_tokens is not None and request.ctx_tokens < request.ctx_min_tokens:
        raise BadInputError(f"--ctx {request.ctx_tokens} is below --ctx-min {request.ctx_min_tokens}",
                            "raise --ctx or lower --ctx-min")
    check_cache_types(request)  # a quantized V cache needs flash attention: said before any model is read
    return request


ALL_LAYERS = 100_000  # -ngl all: more slots than any model has (the planner takes every one)


def parse_gpu_layers(text: str | None) -> int | None:
    """-ngl as llama.cpp takes it: a layer count, `all`, or `auto` (as many as fit, the default: None)."""
    word = "auto" if text is None else text.strip().lower()
    if word in ("auto", "all"):
        return None if word == "auto" else ALL_LAYERS
    try:
        count = int(word)
    except ValueError:
        raise BadInputError(f"-ngl/--gpu-layers {text!r} is not a layer count", "give a count, all or auto") from None
    if count < 0:  # llama.cpp reads -1 as auto, llama-cpp-python as every layer: neither is guessed
        raise BadInputError(f"-ngl/--gpu-layers {count} is not a layer count",
                            "give auto (as many as fit), all, or a count from 0")
    return count


def parse_margin(text: str) -> int:
    return 0 if text.strip() in ("0", "0MiB", "0B") else parse_size(text, "--margin")
