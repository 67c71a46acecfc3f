"""One load's out-of-memory failure, folded from the lines logparse recognises, and the device it hit."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamalaunch.launch import logparse
from llamalaunch.plan.types import Plan

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
    """Folds the OOM lines of one load into one OutOfMemory: the failing buffer, then what it was for.

    llama.cpp prints the allocator's complaint, then the buffer and its size, then the stage (weights,
    KV, compute) that needed it; a CUDA abort while serving has no buffer line.
    """

    def __init__(self) -> None:
        self.found: OutOfMemory | None = None

    def feed(self, line: str) -> OutOfMemory | None:
        """The failure as known so far once a line shows one; None for unrelated lines."""
        if "alloc" not in line and "out of memory" not in line:
            return None  # most lines: skip the parse
        event = logparse.parse_event(logparse.parse_line(line))
        if not isinstance(event, logparse.OutOfMemory):
            return None
        previous = self.found
        if event.buffer is not None:
            self.found = OutOfMemory(event.stage or "weights", event.buffer, event.bytes)
        elif event.stage in ("kv", "compute", "runtime") and previous is not None and previous.buffer:
            self.found = OutOfMemory(event.stage, previous.buffer, previous.size_bytes)
        elif event.stage in ("kv", "compute", "runtime") or (event.stage is None and previous is None):
            self.found = OutOfMemory(event.stage or "runtime")
        return self.found
