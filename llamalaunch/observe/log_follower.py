"""Follow llama-server's log: the last lines, llama.cpp's own buffer sizes, request timings."""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from llamalaunch.launch.logparse import (
    READINESS_MARK,
    BufferSize,
    buffer_device,
    parse_event,
    parse_line,
    parse_timing,
)
from llamalaunch.observe.snapshot import LogEntry

LOG_TAIL_LINES = 200

_LEVEL = re.compile(r"^\d+\.\d{2}\.\d{3}\.\d{3} ([IWED]) ")
_RUN_START = "llama_server: initializing"
# llama.cpp's threads sometimes print a line without its newline: the next line's prefix is glued on (seen).
_GLUED = re.compile(r"(?<=\S)(?=\d+\.\d{2}\.\d{3}\.\d{3} [IWED] )")


class LogFollower:
    """Reads the server log incrementally: the last lines, llama.cpp's buffer sizes, request timings.

    Counters start again at each llama-server start in the log (`serve` appends every run to one file).
    A rotated or truncated log is read again from its start.
    """

    def __init__(self, path: Path, keep_lines: int = LOG_TAIL_LINES) -> None:
        self.path = path
        self.lines: deque[LogEntry] = deque(maxlen=keep_lines)
        self._offset = 0
        self._inode: int | None = None
        self._partial = ""
        self._level: str | None = None  # of the last line with a prefix
        self._reset_run()

    def _reset_run(self) -> None:
        self.buffers: dict[tuple[str, str], int] = {}  # (buffer name, kind) → bytes
        self.requests_served = 0
        self.last_prompt_tokens_per_s: float | None = None
        self.last_generation_tokens_per_s: float | None = None
        self.warnings = 0
        self.errors = 0

    def update(self) -> None:
        try:
            stat = self.path.stat()
        except OSError:
            return
        if self._inode is None:
            rotated = self.path.with_name(self.path.name + ".1")
            if rotated.exists():  # the start of this run may be in the rotated file
                self._read(rotated, 0)
        elif stat.st_ino != self._inode or stat.st_size < self._offset:
            self._offset, self._partial = 0, ""
        self._inode = stat.st_ino
        self._offset = self._read(self.path, self._offset)

    def _read(self, path: Path, offset: int) -> int:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except OSError:
            return offset
        text = self._partial + data.decode("utf-8", "replace")
        *complete, self._partial = text.split("\n")
        for raw in complete:
            for line in _GLUED.split(raw):
                self._feed(line)
        return offset + len(data)

    def _feed(self, raw: str) -> None:
        if raw.startswith(READINESS_MARK):
            # serve's own check: not served. The mark may come before that request's line (they race to
            # the file), so the count can dip below zero for a moment; readers show max(0, count).
            self.requests_served -= 1
            self.last_prompt_tokens_per_s = self.last_generation_tokens_per_s = None
            self._level = None
            return
        match = _LEVEL.match(raw)
        level = match.group(1) if match else None
        continued = self._level if level is None else None  # a message's later lines belong to its level
        self._level = level or self._level
        if level == "D" or continued == "D" or (level is None and raw[:1] in ("", " ", "\t")):
            return  # debug lines and indented continuations: too many to show
        if _RUN_START in raw:
            self._reset_run()
        entry = LogEntry(level, raw[match.end():] if match else raw)
        if self.lines and self.lines[-1].text == entry.text and self.lines[-1].level == level:
            entry = dataclasses.replace(entry, repeat=self.lines.pop().repeat + 1)
        self.lines.append(entry)
        self.warnings += level == "W"
        self.errors += level == "E"
        if "buffer size" in raw:
            event = parse_event(parse_line(raw))
            if isinstance(event, BufferSize) and not event.at_exit:
                self.buffers[(event.buffer, event.kind)] = event.bytes
        elif (timing := parse_timing(raw)) is not None:
            speed = timing.tokens_per_s
            if timing.kind == "generation":
                # a one-token request (the readiness check) samples from the prompt: no generation timing
                self.last_generation_tokens_per_s = speed or self.last_generation_tokens_per_s
            else:
                self.last_prompt_tokens_per_s = speed
        elif "stop processing" in raw:
            self.requests_served += 1

    def device_bytes(self, endpoints: Sequence[str], per_endpoint: Mapping[str, int]) -> dict[str, dict[str, int]]:
        """Device name (RPC0, CUDA0, HOST) → buffer kind (model, kv, compute, output) → bytes."""
        found: dict[str, dict[str, int]] = {}
        for (buffer, kind), size in self.buffers.items():
            device = buffer_device(buffer, endpoints, per_endpoint)
            kinds = found.setdefault(device, {})
            kinds[kind] = kinds.get(kind, 0) + size
        return found
