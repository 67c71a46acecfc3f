"""llama-fit-params as an oracle for archs without an exact family, against real loads (issue 21).

For each long-tail family (synthetic shapes llamalaunch plans with the generic estimate) and a few
placements, print each device's total (weights + KV + compute) from `llama-fit-params --fit-print on`
and from the generic estimate, as an error against what llama-server really allocates.

    python -m bench.bench_oracle --bin-dir DIR [FAMILY ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_accuracy import FAMILIES, device_totals, even_placement, start_workers
from llamalaunch.api import Request, compare, estimate, load_profile, measure_fit_params, measure_load
from tests.synthetic import write_preset

LONG_TAIL = ("smollm3", "exaone", "ernie4_5", "granite", "seed_oss", "olmo2")
CASES = ((4096, 1, 512, 2), (32768, 4, 2048, 3))  # ctx, -np, -ub, devices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(LONG_TAIL))
    parser.add_argument("--bin-dir", default=os.environ.get("LLAMALAUNCH_BIN_DIR", "/tmp/llbuild/bin"))
    args = parser.parse_args(argv)
    bin_dir, work = Path(args.bin_dir), Path(tempfile.mkdtemp(prefix="bench-oracle-"))
    (work / "logs").mkdir()
    workers, endpoints = start_workers(bin_dir, max(c[3] for c in CASES), work)
    try:
        for family in args.families:
            preset, changes = FAMILIES[family]
            path = str(write_preset(work / f"{family}.gguf", preset, **changes))
            profile = load_profile(path, allow_unknown_arch=True)
            for ctx, parallel, ubatch, devices in CASES:
                request = Request(n_parallel=parallel, n_ubatch=ubatch)
                placement = even_placement(profile.n_slots, devices)
                started = time.perf_counter()
                fit = measure_fit_params(bin_dir, path, placement, request, ctx, endpoints[:devices])
                seconds = time.perf_counter() - started
                real = measure_load(bin_dir, path, placement, request, ctx, endpoints[:devices], log_dir=work / "logs")
                for name, projected in (("fit-params", fit.estimate), ("generic", estimate(profile, placement,
                                                                                         request, ctx))):
                    totals = device_totals(tuple(compare(projected, real.estimate)))
                    cells = " ".join(f"{row.device}:{100 * row.relative:+.1f}%" for row in totals)
                    took = f" ({seconds:.2f} s)" if name == "fit-params" else ""
                    head = f"{family:10} ctx={ctx:<6} np={parallel} ub={ubatch:<4} dev={devices}"
                    print(f"{head} {name:10} {cells}{took}", flush=True)
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
