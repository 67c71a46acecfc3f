"""Host RAM and CPU, through psutil (the only module here that imports it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from llamalaunch.probe.device import HostMemory


def probe_host() -> HostMemory:
    """Available and total RAM (bytes), logical CPU count and the CPU model."""
    free_bytes, total_bytes = linux_memory() or psutil_memory()
    return HostMemory(free_bytes=free_bytes, total_bytes=total_bytes, cpu_count=os.cpu_count() or 1,
                      cpu_description=cpu_model())


def linux_memory(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int] | None:
    """(MemAvailable, MemTotal) in bytes, the figures psutil reports on Linux, without importing it
    (a what-if `plan` needs nothing else from psutil). None where the kernel does not say them."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("MemAvailable", "MemTotal") and value.split():
            fields[key] = int(value.split()[0]) * 1024  # always in kB
    if len(fields) < 2:
        return None
    return fields["MemAvailable"], fields["MemTotal"]


def psutil_memory() -> tuple[int, int]:
    import psutil  # ~20 ms to import: only where /proc/meminfo does not answer

    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'AMD EPYC 7763 64-Core Processor' from /proc/cpuinfo; platform's word for it elsewhere."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        # x86 says "model name"; some ARM kernels only give "Hardware" or "Processor".
        if sep and key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"
