"""Host RAM and CPU, through psutil (the only module here that imports it)."""

from __future__ import annotations

import platform
from pathlib import Path

import psutil

from llamalaunch.probe.device import HostMemory


def probe_host() -> HostMemory:
    """Available and total RAM (bytes), logical CPU count and the CPU model."""
    memory = psutil.virtual_memory()
    return HostMemory(free_bytes=int(memory.available), total_bytes=int(memory.total),
                      cpu_count=psutil.cpu_count(logical=True) or 1, cpu_description=cpu_model())


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
