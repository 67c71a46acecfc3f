"""The analytic estimate against real llama-server loads on real ggml-rpc-server workers (a small sample).

Weights and KV must equal what llama-server prints (to its 0.01 MiB); compute buffers must be within
max(5%, 16 MiB) — they are in fact exact on these families. bench/bench_accuracy.py runs the whole matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.bench_accuracy import FAMILIES, device_totals, even_placement, generic_within
from llamalaunch.launch.measure import measure_load
from llamalaunch.model.compare import compare, within_tolerance
from llamalaunch.model.estimate import estimate
from llamalaunch.model.load import load_profile
from llamalaunch.plan.request import Request
from llamalaunch.units import MIB
from tests.support import RpcWorker
from tests.synthetic import write_preset
from tests.test_plan_vs_llama import buffer_sums, cache_tolerance

pytestmark = pytest.mark.llama

# (family, ctx, -np, -ub, K/V type, devices): every family once, each axis value at least once
CASES = [
    ("llama", 16384, 4, 512, "q8_0", 3),
    ("gemma3", 65536, 1, 2048, "f16", 2),
    ("qwen3moe", 4096, 4, 2048, "q4_0", 1),
    ("deepseek2", 8192, 1, 512, "f16", 2),
]
# the 2026 families (issue 21), each at two context sizes
CASES += [
    ("qwen3next", 4096, 4, 512, "q8_0", 2), ("qwen3next", 65536, 1, 2048, "f16", 1),
    ("qwen35", 8192, 1, 512, "f16", 3), ("qwen35", 131072, 4, 2048, "q4_0", 2),
    ("qwen35moe", 16384, 4, 2048, "q8_0", 2), ("qwen35moe", 4096, 1, 512, "f16", 1),
    ("gpt-oss", 4096, 4, 512, "f16", 2), ("gpt-oss", 65536, 1, 2048, "q8_0", 3),
    ("glm4moe", 8192, 1, 2048, "q4_0", 2), ("glm4moe", 32768, 4, 512, "f16", 3),
    ("glm4moe-nextn", 8192, 4, 512, "f16", 2),  # the MTP block's weights are never loaded
    ("llama4", 4096, 4, 512, "q8_0", 3), ("llama4", 65536, 1, 2048, "f16", 2),
    ("mistral3", 16384, 4, 512, "f16", 2), ("mistral3", 131072, 1, 2048, "q8_0", 1),
    ("gemma4", 4096, 4, 512, "q8_0", 3), ("gemma4", 65536, 1, 2048, "f16", 2),
    ("gemma4-shared", 16384, 4, 512, "f16", 2), ("gemma4-shared", 131072, 1, 2048, "q4_0", 1),
    ("gemma4-moe", 8192, 4, 512, "q8_0", 2), ("gemma4-ple", 16384, 1, 2048, "f16", 3),
    ("nemotron_h", 8192, 4, 512, "q8_0", 2), ("nemotron_h", 131072, 1, 2048, "f16", 3),
    ("nemotron_h_moe", 4096, 1, 2048, "q4_0", 3), ("nemotron_h_moe", 65536, 4, 512, "f16", 2),
    ("minimax-m2", 8192, 4, 512, "q8_0", 2), ("minimax-m2", 65536, 1, 2048, "f16", 3),
]


@pytest.mark.parametrize(("family", "ctx", "parallel", "ubatch", "cache", "devices"), CASES)
def test_estimate_equals_llama_server(family: str, ctx: int, parallel: int, ubatch: int, cache: str, devices: int,
                                      tmp_path: Path, llama_bin_dir: Path,
                                      rpc_workers: Callable[..., RpcWorker]) -> None:
    preset, changes = FAMILIES[family]
    path = str(write_preset(tmp_path / f"{family}.gguf", preset, **changes))
    profile = load_profile(path)
    request = Request(n_parallel=parallel, n_ubatch=ubatch, cache_type_k=cache, cache_type_v=cache)
    placement = even_placement(profile.n_slots, devices)
    endpoints = [rpc_workers().endpoint for _ in range(devices)]
    measured = measure_load(llama_bin_dir, path, placement, request, ctx, endpoints, log_dir=tmp_path)
    rows = compare(estimate(profile, placement, request, ctx), measured.estimate)
    bad = [row for row in rows if not within_tolerance(row)]
    assert not bad, bad
    assert any(row.component == "compute" and row.measured_bytes > 0 for row in rows)


# long-tail archs (no exact family): the generic estimate, each device's total within +25% / -0%
GENERIC_CASES = [
    ("smollm3", 4096, 4, 512, "f16", 2), ("exaone", 65536, 1, 2048, "q8_0", 3),
    ("ernie4_5", 16384, 4, 2048, "q4_0", 1), ("granite", 131072, 1, 512, "f16", 2),
    ("seed_oss", 8192, 1, 2048, "q8_0", 3), ("olmo2", 32768, 4, 512, "f16", 2),
]


@pytest.mark.parametrize(("family", "ctx", "parallel", "ubatch", "cache", "devices"), GENERIC_CASES)
def test_generic_estimate_never_under(family: str, ctx: int, parallel: int, ubatch: int, cache: str, devices: int,
                                      tmp_path: Path, llama_bin_dir: Path,
                                      rpc_workers: Callable[..., RpcWorker]) -> None:
    preset, changes = FAMILIES[family]
    path = str(write_preset(tmp_path / f"{family}.gguf", preset, **changes))
    profile = load_profile(path, allow_unknown_arch=True)
    assert profile.generic_estimate
    request = Request(n_parallel=parallel, n_ubatch=ubatch, cache_type_k=cache, cache_type_v=cache)
    placement = even_placement(profile.n_slots, devices)
    endpoints = [rpc_workers().endpoint for _ in range(devices)]
    measured = measure_load(llama_bin_dir, path, placement, request, ctx, endpoints, log_dir=tmp_path)
    totals = device_totals(tuple(compare(estimate(profile, placement, request, ctx), measured.estimate)))
    assert len(totals) == devices + 1
    assert all(generic_within(row) for row in totals), totals


def test_fit_params_projection_runs(tmp_path: Path, llama_bin_dir: Path,
                                    rpc_workers: Callable[..., RpcWorker]) -> None:
    """llama-fit-params' dry run: same weights (whole MiB), a larger compute figure on the output device."""
    from llamalaunch.launch.measure import measure_fit_params

    if not (llama_bin_dir / "llama-fit-params").exists():
        pytest.skip("llama-fit-params not built")
    preset, changes = FAMILIES["llama"]
    path = str(write_preset(tmp_path / "llama.gguf", preset, **changes))
    profile = load_profile(path)
    placement = even_placement(profile.n_slots, 2)
    endpoints = [rpc_workers().endpoint for _ in range(2)]
    projected = measure_fit_params(llama_bin_dir, path, placement, Request(n_parallel=1), 4096, endpoints)
    ours = estimate(profile, placement, Request(n_parallel=1), 4096)
    for name in ("RPC0", "RPC1"):
        assert projected.estimate.devices[name].weights_bytes // (1 << 20) == ours.devices[name].weights_bytes // (1 << 20)
        assert projected.estimate.devices[name].compute_bytes > 0


# deepseek4 (issue 21): every device's cache is seven printed buffers (raw, CSA, HCA and indexer caches, three
# compressor states), each rounded to 0.01 MiB; the compute buffer is replayed op for op
DEEPSEEK4_CASES = [(4096, 4, 512, "f16", 2, "auto"), (65536, 1, 2048, "q8_0", 3, "auto"),
                   (131072, 4, 2048, "q4_0", 1, "auto"), (16384, 1, 512, "f16", 2, "off")]


@pytest.mark.parametrize(("ctx", "parallel", "ubatch", "cache", "devices", "flash_attn"), DEEPSEEK4_CASES)
def test_deepseek4_estimate_equals_llama_server(ctx: int, parallel: int, ubatch: int, cache: str, devices: int,
                                                flash_attn: str, tmp_path: Path, llama_bin_dir: Path,
                                                rpc_workers: Callable[..., RpcWorker]) -> None:
    preset, changes = FAMILIES["deepseek4"]
    path = str(write_preset(tmp_path / "deepseek4.gguf", preset, **changes))
    profile = load_profile(path)
    request = Request(n_parallel=parallel, n_ubatch=ubatch, cache_type_k=cache, cache_type_v=cache,
                      flash_attn=flash_attn)
    placement = even_placement(profile.n_slots, devices)
    endpoints = [rpc_workers().endpoint for _ in range(devices)]
    measured = measure_load(llama_bin_dir, path, placement, request, ctx, endpoints, log_dir=tmp_path)
    seen = buffer_sums(list(measured.events), endpoints)
    rows = compare(estimate(profile, placement, request, ctx), measured.estimate)
    for row in rows:
        if row.component == "kv":
            assert abs(row.error_bytes) <= cache_tolerance(seen, row.device), row
        else:
            assert within_tolerance(row), row
    for total in device_totals(tuple(rows)):
        assert abs(total.error_bytes) <= max(total.measured_bytes // 100, 32 * MIB), total
    assert any(row.component == "compute" and row.measured_bytes > 100 * MIB for row in rows)
