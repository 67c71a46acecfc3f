"""Does this host read memory in 4 KiB pages slower than in 2 MiB pages?

Issue 17: llama.cpp's pinned host buffer (`cudaMallocHost`, what `--host-weights pinned` gives) sits in 4 KiB
pages, the page cache maps a model file in 2 MiB folios where the filesystem makes them; generation reads the
host's experts every token. This reads one anonymous mapping per page size with a thread per core (numpy
sums leave the GIL), the two in turn, best of seven after a warm-up, and prints a JSON line: GB/s per page
size, the ratio, and how much of the huge-page mapping the kernel really gave in 2 MiB pages.

Usage: python -m bench.host_pages [--gib 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy

GIB = 1 << 30
ROUNDS = 7


def anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def mapped(size: int, advice: int, threads: int, pool: ThreadPoolExecutor) -> tuple[mmap.mmap, list, int]:
    """An anonymous mapping of `size` bytes given `advice`, faulted in by a thread per part: (mapping, parts,
    KiB the kernel gave in huge pages)."""
    before = anon_huge_kib()
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(advice)
    parts = numpy.array_split(numpy.frombuffer(region, dtype=numpy.float32), threads)
    list(pool.map(lambda part: part.fill(1.0), parts))  # each thread faults in its own part
    return region, parts, anon_huge_kib() - before


def timed_read(parts: list, pool: ThreadPoolExecutor) -> float:
    started = time.perf_counter()
    list(pool.map(lambda part: part.sum(), parts))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    size = int(args.gib * GIB) // (2 << 20) * (2 << 20)
    threads = len(os.sched_getaffinity(0))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    with ThreadPoolExecutor(threads) as pool:
        small_map, small_parts, small_huge = mapped(size, mmap.MADV_NOHUGEPAGE, threads, pool)
        large_map, large_parts, large_huge = mapped(size, mmap.MADV_HUGEPAGE, threads, pool)
        best = {"4k": float("inf"), "2m": float("inf")}
        for _ in range(ROUNDS + 1):  # in turn, so a busy moment of the machine hits both alike; the first warms up
            best["4k"] = min(best["4k"], timed_read(small_parts, pool))
            best["2m"] = min(best["2m"], timed_read(large_parts, pool))
        small, large = size / best["4k"], size / best["2m"]
        del small_parts, large_parts
        small_map.close()
        large_map.close()
    result = {"gib": args.gib, "threads": threads, "thp": thp,
              "gbps_4k": round(small / 1e9, 2), "gbps_2m": round(large / 1e9, 2),
              "ratio_4k_to_2m": round(small / large, 3),
              "huge_mib_4k_mapping": small_huge // 1024, "huge_mib_2m_mapping": large_huge // 1024}
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
