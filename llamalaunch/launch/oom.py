"""Out-of-memory lines llama-server prints (DESIGN.md §3), and which device each one hit. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamalaunch.plan.types import Plan

# `failed to allocate CUDA0 buffer of size 8858370048`, `failed to allocate RPC0[127.0.0.1:50071] buffer ...`
_BUFFER = re.compile(r"failed to allocate (?P<buffer>\S+?) buffer of size (?P<size>\d+)")
_KV = re.compile(r"failed to allocate buffer for (?:kv|rs) cache|failed to initialize the context: .*(?:kv|rs) cache")
_COMPUTE = re.compile(r"failed to allocate compute (?:pp )?buffers|graph_reserve: failed to allocate")
_RUNTIME = re.compile(r"CUDA error: out of memory|ggml_backend_cuda_.*out of memory during")
_RPC_BUFFER = re.compile(r"^RPC(?P<index>\d+)\[(?P<endpoint>[^\]]+)\]$")


@dataclass(frozen=True)
class OutOfMemory:
    """One allocation failure: `kind` is weights, kv, compute or runtime; `buffer` as llama.cpp named it."""

    kind: str
    buffer: str | None = None
    size_bytes: int | None = None

    def device_name(self, plan: Plan) -> str:
        """Our name for the device the buffer was on (RPC buffers carry the worker's local index)."""
        if self.buffer is None:
            return ""
        match = _RPC_BUFFER.match(self.buffer)
        if match is None:
            return self.buffer
        index = int(match.group("index"))
        for device_plan in plan.devices:
            device = device_plan.device
            if device.endpoint == match.group("endpoint") and (device.worker_index or 0) == index:
                return device.name
        return self.buffer


class OomTracker:
    """Folds the OOM lines of one load into one OutOfMemory (the buffer line, then what it was for)."""

    def __init__(self) -> None:
        self.found: OutOfMemory | None = None

    def feed(self, line: str) -> OutOfMemory | None:
        """The failure as known so far, once the line shows one; None for unrelated lines."""
        buffer = _BUFFER.search(line)
        if buffer:
            self.found = OutOfMemory("weights", buffer.group("buffer"), int(buffer.group("size")))
            return self.found
        for pattern, kind in ((_KV, "kv"), (_COMPUTE, "compute"), (_RUNTIME, "runtime")):
            if pattern.search(line):
                previous = self.found or OutOfMemory(kind)
                self.found = OutOfMemory(kind, previous.buffer, previous.size_bytes)
                return self.found
        return None
