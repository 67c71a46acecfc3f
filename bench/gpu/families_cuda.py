"""The 2026 families on one CUDA device: planned weights, KV and compute against the real load.

    python3 -m bench.gpu.families_cuda BIN_DIR OUT_DIR [FAMILY,...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.bench_accuracy import FAMILIES
from llamalaunch.api import (
    MIB,
    LaunchError,
    Placement,
    Request,
    SlotRange,
    compare,
    estimate,
    load_profile,
    measure_load,
)
from tests.synthetic import write_preset

NEW = ("qwen3next", "qwen35", "qwen35moe", "gpt-oss", "glm4moe", "llama4", "mistral3", "gemma4", "gemma4-shared",
       "gemma4-moe", "gemma4-ple", "minimax-m2", "nemotron_h", "nemotron_h_moe", "deepseek4")
CASES = ((16384, 1, 512, "f16"), (65536, 4, 2048, "q8_0"))  # ctx, -np, -ub, K/V type


def main(bin_dir: Path, out: Path, families: tuple[str, ...] = NEW) -> int:
    out.mkdir(parents=True, exist_ok=True)
    worst = 0.0
    for family in families:
        preset, changes = FAMILIES[family]
        path = str(write_preset(out / f"{family}.gguf", preset, **changes))
        profile = load_profile(path)
        placement = Placement((SlotRange("CUDA0", "CUDA", 0, profile.n_slots),))
        for ctx, parallel, ubatch, cache in CASES:
            request = Request(n_parallel=parallel, n_ubatch=ubatch, cache_type_k=cache, cache_type_v=cache)
            try:
                measured = measure_load(bin_dir, path, placement, request, ctx, log_dir=out / "logs")
            except LaunchError as error:
                print(f"{family} ctx={ctx} FAILED {error}", flush=True)
                continue
            for row in compare(estimate(profile, placement, request, ctx), measured.estimate):
                if row.measured_bytes or row.planned_bytes:
                    worst = max(worst, abs(row.error_bytes) / MIB)
                    print(f"{family:15} ctx={ctx:<6} np={parallel} ub={ubatch:<4} {cache:5} {row.device:6} "
                          f"{row.component:8} planned {row.planned_bytes / MIB:10.2f} measured "
                          f"{row.measured_bytes / MIB:10.2f} error {row.error_bytes / MIB:+8.3f} MiB", flush=True)
    print(f"worst {worst:.3f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else NEW))
