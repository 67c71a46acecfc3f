"""Speed figures for the estimate in plan/speed.py: GPUs from NVML and their class, the host from a short
measured probe (cached on disk), RPC links from the probe's round trips or `--link`, what-ifs from
`--device-speed`. A figure that cannot be had stays None: the plan says "unknown", never fails."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llamalaunch.paths import cache_dir, read_json_dict, write_json_atomic
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.probe.speed_figures import DeviceSpeed, Link, SpeedFigures

# Dense FP16 tensor FLOP/s of a GPU class: by name first, else by compute capability (the common part).
_GPU_FLOPS_BY_NAME = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                      ("L40S", 362e12), ("4090", 165e12), ("3090", 71e12), ("3080", 60e12), ("3060", 25e12),
                      ("4060", 44e12), ("5090", 209e12), ("A10", 125e12), ("T4", 65e12), ("V100", 125e12))
_GPU_FLOPS_BY_CC = {"7.0": 125e12, "7.5": 60e12, "8.0": 312e12, "8.6": 70e12, "8.9": 160e12, "9.0": 800e12,
                    "10.0": 2250e12, "12.0": 200e12}
LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")
# A worker's link without a throughput figure: the probe measures only round trips (bulk transfers to a
# worker allocate its memory); a LAN is taken as 1 Gbit/s, loopback as the host's memory bandwidth.
ASSUMED_LINK_BYTES_S = 1e9 / 8
# Larger than the last-level cache of big server CPUs (up to 384 MB), read by one thread per usable core as
# llama.cpp's CPU backend reads weights: one thread reached a tenth of what llama-server did on an H100 host
# (bench/results/h100-2026-12-07c). Each thread reads its slice a few times per pass, so that starting the
# threads is not what is timed.
HOST_PROBE_BYTES = 384 * 1024 * 1024
HOST_PROBE_READS = 2
HOST_PROBE_VERSION = 2  # in the cache key: figures of an older probe are measured again
# A GPU's total as its CUDA runtime reports it (a worker on it) is NVML's less the driver's reserve (470 MiB
# on an H100); a CPU worker reports the host's RAM, which may sit as close to a GPU's total.
TWIN_RESERVED_BYTES = 1024 ** 3


def gpu_speed(device: Device) -> DeviceSpeed:
    """Bandwidth = bus width × memory clock × 2 (double data rate); compute from the card's class."""
    bandwidth = None
    if device.memory_bus_width_bits and device.memory_clock_mhz:
        bandwidth = device.memory_bus_width_bits / 8 * device.memory_clock_mhz * 1e6 * 2
    flops = next((value for name, value in _GPU_FLOPS_BY_NAME if name in device.description), None)
    if flops is None and device.compute_capability:
        flops = _GPU_FLOPS_BY_CC.get(device.compute_capability)
    return DeviceSpeed("CUDA", bandwidth, flops, "NVML and class" if bandwidth and flops else "unknown")


def host_probe_path() -> Path:
    return cache_dir() / "host_speed.json"


def host_speed(host: HostMemory | None, path: Path | None = None, measure: bool = True) -> DeviceSpeed:
    """The host's read bandwidth and FLOP/s: measured once per CPU model and count, then read from disk."""
    target = path or host_probe_path()
    key = f"v{HOST_PROBE_VERSION}|{host.cpu_description}|{host.cpu_count}" if host is not None else "unknown"
    try:
        cached = json.loads(target.read_text()).get(key)
        if cached:
            return DeviceSpeed("CPU", float(cached["bandwidth_bytes_s"]), float(cached["flops"]), "probe (cached)")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    if not measure:
        return DeviceSpeed("CPU", None, None, "unknown")
    figures = measure_host()
    if figures is None:
        return DeviceSpeed("CPU", None, None, "unknown: the host probe could not measure")
    _store(target, key, {"bandwidth_bytes_s": figures[0], "flops": figures[1]})
    return DeviceSpeed("CPU", figures[0], figures[1], "probe")


def measure_host(size_bytes: int = HOST_PROBE_BYTES, repeats: int = 3) -> tuple[float, float] | None:
    """(read bytes/s, FLOP/s): sums over a buffer larger than the caches, a slice per core at once (numpy
    leaves the GIL while it sums), and an f32 matrix product on every core; best of `repeats` after a
    warm-up. None when numpy is missing or a timing is not usable."""
    try:
        import numpy
    except ImportError:
        return None
    from concurrent.futures import ThreadPoolExecutor

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    a = numpy.ones((512, 512), dtype=numpy.float32)

    def read_slice(part: numpy.ndarray) -> None:
        for _ in range(HOST_PROBE_READS):
            part.sum()

    with ThreadPoolExecutor(threads) as pool:
        # each thread writes its own slice first: the page faults in parallel, the memory near its core
        slices = list(pool.map(lambda _: numpy.ones(size_bytes // 4 // threads, dtype=numpy.float32), range(threads)))

        def read_all() -> None:
            list(pool.map(read_slice, slices))

        read_all()  # warm-up: page faults, threads
        read = min(_timed(read_all) for _ in range(repeats))
    a @ a  # warm-up: BLAS threads
    compute = min(_timed(lambda: a @ a) for _ in range(3 * repeats))  # cheap: more tries against noise
    if not (0 < read < 60 and 0 < compute < 60):
        return None
    return sum(part.nbytes for part in slices) * HOST_PROBE_READS / read, 2 * 512 ** 3 / compute


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _store(target: Path, key: str, value: Mapping[str, float]) -> None:
    data = read_json_dict(target)
    data[key] = dict(value)
    write_json_atomic(target, data)  # when it fails, the next plan measures again


def is_loopback(endpoint: str | None) -> bool:
    return bool(endpoint) and endpoint.startswith(LOOPBACK_HOSTS)  # type: ignore[union-attr]


def rpc_speed(device: Device, local: Sequence[Device], host: DeviceSpeed,
              host_ram_bytes: int | None = None) -> DeviceSpeed:
    """A worker's device on this machine: the local GPU it runs on (by its total memory), else the host's
    CPU. Elsewhere: unknown (give --device-speed)."""
    if not is_loopback(device.endpoint):
        return DeviceSpeed("CPU", None, None, "unknown: a remote worker (give --device-speed)")
    twin = _local_twin(device, local, host_ram_bytes)
    if twin is not None:
        return dataclass_replace(gpu_speed(twin), source=f"{twin.name} (same machine)")
    return dataclass_replace(host, source="host CPU (loopback worker)")


def _local_twin(worker: Device, local: Sequence[Device], host_ram_bytes: int | None) -> Device | None:
    """The local GPU a loopback worker serves: the nearest total at or just above the worker's (see
    TWIN_RESERVED_BYTES); none when the worker reports about the host's RAM (a CPU worker)."""
    if host_ram_bytes is not None and abs(worker.total_bytes - host_ram_bytes) <= TWIN_RESERVED_BYTES:
        return None

    def gap(gpu: Device) -> int:
        return gpu.total_bytes - worker.total_bytes

    candidates = [d for d in local if d.backend == "CUDA" and 0 <= gap(d) <= TWIN_RESERVED_BYTES]
    return min(candidates, key=gap, default=None)


def dataclass_replace(speed: DeviceSpeed, **changes: object) -> DeviceSpeed:
    import dataclasses

    return dataclasses.replace(speed, **changes)  # type: ignore[arg-type]


def rpc_link(device: Device, host: DeviceSpeed) -> Link | None:
    """From the probe's measured round trip; throughput assumed (see ASSUMED_LINK_BYTES_S)."""
    if device.rpc_round_trip_s is None:
        return None
    if is_loopback(device.endpoint):
        return Link(device.rpc_round_trip_s, host.bandwidth_bytes_s or 1e9, "probe (loopback)")
    return Link(device.rpc_round_trip_s, ASSUMED_LINK_BYTES_S, "probe; 1 Gbit/s assumed")


def speed_figures(devices: Sequence[Device], host: DeviceSpeed, given: Mapping[str, DeviceSpeed] | None = None,
                  links: Mapping[str, Link] | None = None, fill_tokens: int | None = None,
                  host_ram_bytes: int | None = None) -> SpeedFigures:
    """Every device's figures: given ones (--device-speed, --link) win over probed ones. `host_ram_bytes`:
    the host's total RAM, which tells a loopback CPU worker from one on a local GPU."""
    given = dict(given or {})
    found: dict[str, DeviceSpeed] = {}
    found_links: dict[str, Link] = {}
    for device in devices:
        if device.backend == "CUDA":
            found[device.name] = gpu_speed(device)
        elif device.backend == "RPC":
            found[device.name] = rpc_speed(device, devices, host, host_ram_bytes)
            link = rpc_link(device, host)
            if link is not None:
                found_links[device.name] = link
        elif not device.is_host:
            found[device.name] = DeviceSpeed("CUDA", None, None, "unknown")
    found.update(given)
    found_links.update(links or {})
    return SpeedFigures(given.get("CPU", host), found, found_links, fill_tokens)
