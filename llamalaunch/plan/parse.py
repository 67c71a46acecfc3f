"""Command-line text → Request: human units and llama-server's option vocabulary, parsed once."""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence
from pathlib import Path

from llamalaunch.errors import BadInputError
from llamalaunch.model.kv import CACHE_TYPES
from llamalaunch.plan.request import FLASH_ATTN, Request
from llamalaunch.probe.assume import parse_device_sizes
from llamalaunch.units import parse_size, parse_tokens


def parse_ctx(text: str) -> int | None:
    """'16k', '16384' → tokens; 'max' → None (the largest that fits)."""
    return None if text.strip().lower() == "max" else parse_tokens(text, "context")


def parse_choice(value: str, allowed: Sequence[str], option: str) -> str:
    if value not in allowed:
        raise BadInputError(f"{option} {value!r} is not allowed", f"use one of {', '.join(allowed)}")
    return value


def parse_count(value: int, option: str, minimum: int = 1, maximum: int = 1 << 20) -> int:
    if not minimum <= value <= maximum:
        raise BadInputError(f"{option} {value} is out of range", f"give a value from {minimum} to {maximum}")
    return value


def parse_seconds(value: float, option: str, minimum: float, maximum: float) -> float:
    """A duration option; NaN and infinity are out of range too (they would disable the timer)."""
    if math.isnan(value) or not minimum <= value <= maximum:
        raise BadInputError(f"{option} {value:g} is out of range", f"give seconds from {minimum:g} to {maximum:g}")
    return value


def parse_listen_host(host: str) -> str:
    """--host for llama-server: an address or a name that resolves (llama-server binds it by getaddrinfo)."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise BadInputError(f"--host {host!r} is not an address", "give an IP address of this machine, like "
                            "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    return host


def check_api_key_file(path: Path) -> Path:
    """--api-key-file as llama-server reads it (a key per line, `#` comments). A file without a key would
    start a server that answers anyone: refused, as is one that cannot be read."""
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # as llama-server reads it: \r stays
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not a text file"
        raise BadInputError(f"cannot read the API key file {path}: {why}", "check the path and its permissions"
                            ) from None
    keys = [line for line in lines if line and not line.startswith("#")]
    if not any(key.strip() for key in keys):
        raise BadInputError(f"the API key file {path} holds no key", "write the key on a line of its own")
    if any(key != key.strip() for key in keys):
        raise BadInputError(f"a key in {path} has spaces or a carriage return around it (Windows line endings?)",
                            "llama-server would expect them in every request: save the file with plain \\n endings")
    return path


def split_names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise BadInputError(f"-dev {value!r} names no device", "list devices in order, like -dev CUDA0,RPC0")
    if len(set(names)) != len(names):
        raise BadInputError(f"-dev {value!r} lists a device twice", "name each device once")
    return names


def build_request(*, ctx: str, ctx_min: str = "256", parallel: int = 4, kv_unified: bool = True,
                  batch: int = 2048, ubatch: int = 512, cache_type_k: str = "f16", cache_type_v: str = "f16",
                  flash_attn: str = "auto", swa_full: bool = False, margin: str | None = None,
                  reserve: Sequence[str] = (), budget: Sequence[str] = (), devices: str | None = None,
                  exclude: Sequence[str] = (), cpu_spill: bool = False, gpu_layers: int | None = None,
                  cpu_experts: int | None = None, prefer: str = "context",
                  ctx_is_target: bool = False) -> Request:
    request = Request(
        ctx_tokens=parse_ctx(ctx),
        ctx_min_tokens=parse_tokens(ctx_min, "--ctx-min"),
        ctx_is_target=ctx_is_target,
        n_parallel=parse_count(parallel, "-np/--parallel", 1, 256),
        kv_unified=kv_unified,
        n_batch=parse_count(batch, "-b/--batch-size", 1),
        n_ubatch=parse_count(ubatch, "-ub/--ubatch-size", 1),
        cache_type_k=parse_choice(cache_type_k, CACHE_TYPES, "-ctk/--cache-type-k"),
        cache_type_v=parse_choice(cache_type_v, CACHE_TYPES, "-ctv/--cache-type-v"),
        flash_attn=parse_choice(flash_attn, FLASH_ATTN, "-fa/--flash-attn"),
        swa_full=swa_full,
        margin_bytes=None if margin is None else parse_margin(margin),
        reserve_bytes=parse_device_sizes(reserve, "--reserve"),
        budget_bytes=parse_device_sizes(budget, "--budget"),
        devices=split_names(devices),
        exclude=tuple(exclude),
        cpu_spill=cpu_spill,
        n_gpu_layers=None if gpu_layers is None else parse_count(gpu_layers, "-ngl", 0, 100_000),
        cpu_experts=None if cpu_experts is None else parse_count(cpu_experts, "--cpu-experts", 0, 100_000),
        prefer=parse_choice(prefer, ("context", "speed"), "--prefer"),
    )
    if request.ctx_tokens is not None and request.ctx_tokens < request.ctx_min_tokens:
        raise BadInputError(f"--ctx {request.ctx_tokens} is below --ctx-min {request.ctx_min_tokens}",
                            "raise --ctx or lower --ctx-min")
    if request.cache_type_v not in ("f16", "f32", "bf16") and request.flash_attn == "off":
        raise BadInputError(f"a {request.cache_type_v} V cache needs flash attention", "drop -fa off")
    return request


def parse_margin(text: str) -> int:
    return 0 if text.strip() in ("0", "0MiB", "0B") else parse_size(text, "--margin")
