"""Parse llama-server's log lines into typed events (memory, placement, readiness, out-of-memory).

Line shape with `-lv 4`/`-v`: `0.00.035.064 I <module>: text` (minutes.seconds.ms.µs, then the level
letter I/W/E/D). Lines without the prefix (continuations, multi-line messages, a build without
timestamps) still parse: the prefix is optional. Colour escapes are stripped.

Buffer names are llama.cpp's *buffer* names: `CUDA0`, `CUDA_Host`, `CPU`, `CPU_Mapped`,
`RPC0[127.0.0.1:50061]` (the worker-local device index and the worker's endpoint). `buffer_device`
maps them to llama.cpp's *device* names (`RPC1`, …) given the `--rpc` endpoint list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from llamalaunch.model.compare import HOST
from llamalaunch.units import MIB

# half a unit of the last printed digit: "12.34 MiB" is exact to within this
PRINT_2DP_BYTES = MIB // 200
PRINT_4DP_BYTES = MIB // 20000

# serve writes this line into the server log once the readiness completion has answered: `status` does not
# count that completion as a served request.
READINESS_MARK = "llamalaunch: ready; the one-token readiness completion above is not a served request"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^(?:(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) )?([IWED]) (.*)$")
_MODULE = re.compile(r"^(?:(\w{3,4}) +)?([~\w]+): (.*)$")


# A request's own timings, printed when its slot is released (`slot print_timing: id 3 | task 0 | ...`).
_TIMING = re.compile(r"(prompt eval|eval) time = +([\d.]+) ms / +(\d+) tokens "
                     r"\( *[\d.]+ ms per token, +([\d.]+) tokens per second\)")
_RELEASE = re.compile(r"stop processing: n_tokens = (\d+)")


@dataclass(frozen=True)
class RequestTiming:
    """One request's prompt ('prompt eval time') or generation ('eval time') timing, as printed."""

    kind: str  # "prompt" or "generation"
    ms: float
    tokens: int
    tokens_per_s: float


def parse_timing(line: str) -> RequestTiming | None:
    match = _TIMING.search(line) if "print_timing" in line else None
    if match is None:
        return None
    return RequestTiming("prompt" if match.group(1) == "prompt eval" else "generation", float(match.group(2)),
                         int(match.group(3)), float(match.group(4)))


def released_tokens(line: str) -> int | None:
    """The tokens in a slot's context when its request ended (`stop processing: n_tokens = N`)."""
    match = _RELEASE.search(line) if "stop processing" in line else None
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class LogLine:
    time_us: int | None  # since the server started
    level: str | None  # I, W, E, D; None for a bare line
    module: str | None  # the function or short module name before the colon
    text: str  # after "module: " (the whole message when there is no module)
    message: str  # everything after the level letter
    raw: str


@dataclass(frozen=True)
class BufferSize:
    """`<buffer> model|KV|RS|compute|output buffer size = N MiB`."""

    kind: str  # "model", "kv", "rs", "compute", "output"
    buffer: str
    bytes: int  # from the printed MiB, so exact only to within `precision_bytes`
    precision_bytes: int
    at_exit: bool = False  # `~llama_context: ... compute buffer size is X MiB` when the context is freed


@dataclass(frozen=True)
class LayerAssigned:
    layer: int
    device: str
    is_swa: bool


@dataclass(frozen=True)
class LayersOffloaded:
    offloaded: int
    total: int


@dataclass(frozen=True)
class ContextParam:
    """`llama_context: n_ctx = 8192` and the other context parameters llama.cpp prints at start."""

    name: str
    value: str


@dataclass(frozen=True)
class BreakdownRow:
    """One row of the memory breakdown table (common_ or llama_memory_breakdown_print), in MiB.

    Devices: total = free + (self = model + context + compute) + unaccounted. The Host row and rows
    for other buffer types have no total, free or unaccounted (None).
    """

    name: str  # device name (RPC0, CUDA0), "Host", or a buffer type name
    description: str | None
    total_mib: int | None
    free_mib: int | None
    self_mib: int
    model_mib: int
    context_mib: int
    compute_mib: int
    unaccounted_mib: int | None


@dataclass(frozen=True)
class OutOfMemory:
    """An allocation failure. `stage`: weights, kv, compute, output, runtime, or None when unknown."""

    stage: str | None
    buffer: str | None
    bytes: int | None
    text: str


@dataclass(frozen=True)
class Listening:
    url: str


@dataclass(frozen=True)
class ModelLoaded:
    pass


@dataclass(frozen=True)
class LoadFailed:
    text: str


Event = (BufferSize | LayerAssigned | LayersOffloaded | ContextParam | BreakdownRow | OutOfMemory
         | Listening | ModelLoaded | LoadFailed)

# deepseek4's compressor states print as `DSV4 csa state buffer size`: cache memory, booked as rs
_BUFFER = re.compile(r"^\s*(\S+)\s+(model|KV|RS|compute|output|DSV4 \w+ state) +buffer size = +([\d.]+) MiB")
_BUFFER_EXIT = re.compile(r"^\s*(\S+) compute buffer size is +([\d.]+) MiB")
_LAYER = re.compile(r"^layer +(\d+) assigned to device (\S+), is_swa = (\d)")
_OFFLOADED = re.compile(r"^offloaded (\d+)/(\d+) layers to GPU")
_CTX_PARAM = re.compile(r"^(n_ctx|n_ctx_seq|n_seq_max|n_batch|n_ubatch|flash_attn|kv_unified|n_outputs_max|"
                        r"causal_attn|n_rs_seq)\s+= (\S+)$")
_ROW_DEVICE = re.compile(r"^\|\s+- (\S+) \((.*)\)\s*\|\s*(\d+) = +(\d+) \+ \(\s*(\d+) = +(\d+) \+ +(\d+) \+ +(\d+)\) "
                         r"\+ +(-?\d+) \|$")
_ROW_OTHER = re.compile(r"^\|\s+- (\S+)\s*\|\s+(\d+) = +(\d+) \+ +(\d+) \+ +(\d+)\s+\|$")
_FAILED_BUFFER = re.compile(r"failed to allocate (\S+) buffer of size (\d+)")
_LISTENING = re.compile(r"listening on (\S+)")
_OOM_STAGES = (
    ("failed to allocate buffer for kv cache", "kv"), ("failed to allocate buffer for rs cache", "kv"),
    ("failed to allocate compute", "compute"), ("failed to allocate output buffer", "output"),
    ("CUDA error: out of memory", "runtime"), ("failed to load model", "weights"),
)


def parse_line(raw: str) -> LogLine:
    line = _ANSI.sub("", raw.rstrip("\n"))
    match = _PREFIX.match(line)
    if not match:
        return LogLine(None, None, None, line, line, raw)
    minutes, seconds, millis, micros, level, rest = match.groups()
    time_us = None
    if minutes is not None:
        time_us = ((int(minutes) * 60 + int(seconds)) * 1000 + int(millis)) * 1000 + int(micros)
    module_match = _MODULE.match(rest)
    if not module_match:
        return LogLine(time_us, level, None, rest, rest, raw)
    return LogLine(time_us, level, module_match.group(2), module_match.group(3), rest, raw)


def _mib_bytes(text: str) -> int:
    return round(float(text) * MIB)


def _buffer_event(line: LogLine) -> BufferSize | None:
    match = _BUFFER.match(line.text)
    if match:
        buffer, kind, mib = match.groups()
        kind = "rs" if kind.startswith("DSV4") else kind.lower()
        return BufferSize(kind, buffer, _mib_bytes(mib), PRINT_2DP_BYTES)
    match = _BUFFER_EXIT.match(line.text)
    if match and line.module == "~llama_context":
        return BufferSize("compute", match.group(1), _mib_bytes(match.group(2)), PRINT_4DP_BYTES, at_exit=True)
    return None


def _breakdown_event(line: LogLine) -> BreakdownRow | None:
    if line.module not in ("common_memory_breakdown_print", "llama_memory_breakdown_print"):
        return None
    text = line.text.strip()
    match = _ROW_DEVICE.match(text)
    if match:
        name, desc, *numbers = match.groups()
        total, free, self_, model, context, compute, unaccounted = (int(n) for n in numbers)
        return BreakdownRow(name, desc, total, free, self_, model, context, compute, unaccounted)
    match = _ROW_OTHER.match(text)
    if match:
        name, *numbers = match.groups()
        self_, model, context, compute = (int(n) for n in numbers)
        return BreakdownRow(name, None, None, None, self_, model, context, compute, None)
    return None


def _oom_event(line: LogLine) -> OutOfMemory | None:
    message = line.message
    if line.level != "E" and "out of memory" not in message:
        return None
    stage = next((s for needle, s in _OOM_STAGES if needle in message), None)
    match = _FAILED_BUFFER.search(message)
    if match:
        stage = "compute" if line.module == "ggml_gallocr_reserve_n_impl" else None
        return OutOfMemory(stage, match.group(1), int(match.group(2)), message)
    if stage is not None or "out of memory" in message:
        return OutOfMemory(stage, None, None, message)
    return None


def parse_event(line: LogLine) -> Event | None:
    """The event one log line carries, or None."""
    event: Event | None = _buffer_event(line) or _breakdown_event(line)
    if event is not None:
        return event
    text = line.text
    if (match := _LAYER.match(text)) is not None:
        return LayerAssigned(int(match.group(1)), match.group(2), match.group(3) == "1")
    if (match := _OFFLOADED.match(text)) is not None:
        return LayersOffloaded(int(match.group(1)), int(match.group(2)))
    if line.module == "llama_context" and (match := _CTX_PARAM.match(text)) is not None:
        return ContextParam(match.group(1), match.group(2))
    if line.module in ("llama_server", "main") and text.strip() == "model loaded":
        return ModelLoaded()
    if (match := _LISTENING.search(text)) is not None and line.module in ("llama_server", "main", None):
        return Listening(match.group(1))
    if line.level == "E" and "exiting due to model loading error" in text:
        return LoadFailed(text)
    return _oom_event(line)


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    for raw in lines:
        event = parse_event(parse_line(raw))
        if event is not None:
            yield event


_RPC_BUFFER = re.compile(r"^RPC(\d+)\[(.+)\]$")
_HOST_BUFFERS = ("CPU", "CPU_Mapped", "CPU_REPACK", "CPU_AARCH64")


def is_host_buffer(buffer: str) -> bool:
    return buffer in _HOST_BUFFERS or buffer.endswith("_Host") or buffer.startswith("CPU_")


def buffer_device(buffer: str, rpc_endpoints: Sequence[str] = (),
                  devices_per_endpoint: Mapping[str, int] | None = None) -> str:
    """llama.cpp's device name for a buffer name; HOST for host memory.

    `RPC0[127.0.0.1:50062]` is device 0 of the worker at that endpoint; devices are numbered across
    workers in `--rpc` order (`devices_per_endpoint` says how many each worker exposes; default 1).
    """
    if is_host_buffer(buffer):
        return HOST
    match = _RPC_BUFFER.match(buffer)
    if not match:
        return buffer
    local, endpoint = int(match.group(1)), match.group(2)
    counts = devices_per_endpoint or {}
    before = 0
    for known in rpc_endpoints:
        if known == endpoint:
            return f"RPC{before + local}"
        before += counts.get(known, 1)
    return f"RPC{local}" if not rpc_endpoints else buffer
