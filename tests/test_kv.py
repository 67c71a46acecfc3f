"""KV cache bytes against the figures llama-server printed for the same argv (SmolLM2 shape, -ts 1,3)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from llamalaunch.errors import BadInputError
from llamalaunch.model.estimate import Placement, SlotRange, estimate
from llamalaunch.model.kv import (
    ContextSpec,
    context_shape,
    kv_bytes_per_layer,
    output_buffer_bytes,
    row_size,
    swa_cells,
)
from llamalaunch.model.profile import ModelProfile, SlotWeights
from llamalaunch.plan.request import Request
from llamalaunch.units import MIB

N_LAYER = 30


def smollm2_shape(**changes: object) -> ModelProfile:
    """SmolLM2-135M's hparams (30 blocks, 576 wide, 9 heads, 3 KV heads of 64, vocab 49152)."""
    profile = ModelProfile(
        path="smollm2.gguf", shard_paths=("smollm2.gguf",), arch="llama", name="SmolLM2", file_type="Q4_1",
        file_bytes=0, n_layer=N_LAYER, slots=tuple(SlotWeights(1 << 20) for _ in range(N_LAYER + 1)),
        host_bytes=1 << 20, output_is_token_embd=True, n_vocab=49152, n_ctx_train=8192, n_embd=576,
        n_ff=1536, n_head=(9,) * N_LAYER, n_head_kv=(3,) * N_LAYER, head_dim_k=64, head_dim_v=64, n_swa=0,
        swa_layers=(False,) * N_LAYER, kv_lora_rank=0, rope_dim=64, recurrent_layers=(False,) * N_LAYER,
        recurrent_r_bytes_per_seq=0, recurrent_s_bytes_per_seq=0, n_expert=0, n_expert_used=0)
    return dataclasses.replace(profile, **changes)


TS_1_3 = Placement((SlotRange("RPC0", "RPC", 0, 8), SlotRange("RPC1", "RPC", 8, 23)))


def printed(mib: float) -> int:
    return round(mib * MIB)


# (request, ctx, KV MiB printed for RPC0 and RPC1, output buffer MiB) from real llama-server runs
SEEN = [
    (Request(), 8192, 48.00, 132.00, 0.75),
    (Request(cache_type_k="q8_0", cache_type_v="q8_0"), 5000, 15.94, 43.83, 0.75),
    (Request(n_parallel=4, kv_unified=False, cache_type_k="q4_0", cache_type_v="q4_1"), 8192, 14.25, 39.19, 0.75),
    (Request(n_parallel=3, kv_unified=False, cache_type_k="f32", cache_type_v="f16"), 10000, 94.50, 259.88, 0.56),
    (Request(n_parallel=2, cache_type_k="bf16", cache_type_v="iq4_nl"), 3000, 11.53, 31.71, 0.38),
    (Request(flash_attn="off", cache_type_k="q5_0"), 4096, 16.12, 44.34, 0.75),
]


@pytest.mark.parametrize(("request_", "ctx", "rpc0_mib", "rpc1_mib", "output_mib"), SEEN)
def test_kv_matches_llama_server(request_: Request, ctx: int, rpc0_mib: float, rpc1_mib: float,
                                 output_mib: float) -> None:
    result = estimate(smollm2_shape(), TS_1_3, request_, ctx)
    assert abs(result.devices["RPC0"].kv_bytes - printed(rpc0_mib)) <= MIB // 100
    assert abs(result.devices["RPC1"].kv_bytes - printed(rpc1_mib)) <= MIB // 100
    assert abs(output_buffer_bytes(smollm2_shape(), request_) - printed(output_mib)) <= MIB // 100


def test_context_rounding() -> None:
    assert context_shape(Request(), 5000).n_ctx == 5120
    split = context_shape(Request(n_parallel=3, kv_unified=False), 10000)
    assert (split.n_ctx, split.n_ctx_seq, split.n_stream) == (10752, 3584, 3)
    assert context_shape(Request(n_ubatch=512, n_batch=2048), 256).n_ubatch == 256


def test_row_sizes() -> None:
    assert row_size("f16", 64) == 128
    assert row_size("q8_0", 64) == 68
    assert row_size("q4_0", 64) == 36
    assert row_size("iq4_nl", 64) == 36


def test_sliding_window_cells() -> None:
    profile = smollm2_shape(n_swa=1024, swa_layers=tuple(il % 2 == 0 for il in range(N_LAYER)))
    shape = context_shape(Request(), 32768)
    assert swa_cells(profile, Request(), shape) == 4608  # pad256(1024*4 + 512)
    assert swa_cells(profile, Request(swa_full=True), shape) == 32768
    per_layer = kv_bytes_per_layer(profile, Request(), 32768)
    assert per_layer[0] == 4608 * 2 * 192 * 2 and per_layer[1] == 32768 * 2 * 192 * 2


def test_mla_stores_compressed_k_only() -> None:
    profile = smollm2_shape(kv_lora_rank=512, rope_dim=64, n_head_kv=(1,) * N_LAYER, head_dim_k=576,
                            head_dim_v=512)
    assert kv_bytes_per_layer(profile, Request(), 4096)[0] == 4096 * 576 * 2


def test_recurrent_state_does_not_grow() -> None:
    profile = smollm2_shape(recurrent_layers=(True,) * N_LAYER, recurrent_r_bytes_per_seq=3000,
                            recurrent_s_bytes_per_seq=100000)
    assert kv_bytes_per_layer(profile, Request(), 4096) == kv_bytes_per_layer(profile, Request(), 65536)
    assert kv_bytes_per_layer(profile, Request(n_parallel=2), 4096)[0] == 6016 + 200000


def test_cuda_pads_quantized_rows() -> None:
    cpu = kv_bytes_per_layer(smollm2_shape(), Request(cache_type_k="q8_0"), 4096)[0]
    cuda = kv_bytes_per_layer(smollm2_shape(), Request(cache_type_k="q8_0"), 4096, backend="CUDA")[0]
    assert cuda - cpu == 384  # a 320-element q8_0 row (340 bytes) padded to 128


def test_spilled_layers_keep_their_cache_on_the_host() -> None:
    placement = Placement((SlotRange("RPC0", "RPC", 10, 21),))
    result = estimate(smollm2_shape(), placement, Request(), 8192)
    layer = 8192 * 192 * 2 * 2
    assert result.devices["RPC0"].kv_bytes == 20 * layer
    assert result.host.kv_bytes == 10 * layer + output_buffer_bytes(smollm2_shape(), Request())


def test_bad_cache_type_is_an_error() -> None:
    with pytest.raises(BadInputError):
        estimate(smollm2_shape(), TS_1_3, Request(cache_type_k="q3_k"), 4096)
    with pytest.raises(BadInputError):
        estimate(smollm2_shape(), TS_1_3, Request(flash_attn="off", cache_type_v="q8_0"), 4096)


@pytest.mark.parametrize("flags, line", [
    (["-ctk", "q8_0"], "error: a q8_0 K cache has blocks of 32, which do not divide this model's K head size "
                       "16: llama.cpp refuses it at load (use -ctk f16, bf16 or f32)"),
    (["-ctv", "q4_0", "-fa", "on"], "error: a q4_0 V cache has blocks of 32, which do not divide this "
                                    "model's V head size 16: llama.cpp refuses it at load "
                                    "(use -ctv f16, bf16 or f32)")])
def test_a_quantized_cache_whose_block_does_not_divide_the_head_size_is_refused(
        flags: list[str], line: str, tmp_path: Path, llama_bin_dir: Path) -> None:
    """Head size 16 under blocks of 32: refused in the plan as llama_init_from_model refuses it at load."""
    from typer.testing import CliRunner

    from llamalaunch.cli import app
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "h16.gguf", "tiny-llama", head_dim=16)
    refused = CliRunner().invoke(app, ["plan", str(model), "--assume", "CPU=1GiB", "--ctx", "1k", *flags])
    assert (refused.exit_code, refused.stdout, refused.stderr) == (2, "", line + "\n")
    loaded = subprocess.run([str(llama_bin_dir / "llama-server"), "-m", str(model), "-c", "256", "--port",
                             "0", "--fit", "off", "--no-warmup", *flags],
                            capture_output=True, text=True, timeout=60)
    assert loaded.returncode != 0 and "does not divide n_embd_head" in loaded.stderr + loaded.stdout


@pytest.mark.parametrize("options", [{}, {"n_parallel": 3, "kv_unified": False, "cache_type_k": "q8_0"},
                                     {"flash_attn": "off", "swa_full": True, "n_ubatch": 256}])
def test_the_model_layer_sizes_a_context_spec_as_it_sizes_the_request(options: dict[str, object]) -> None:
    """Issue 16: kv and estimate take the model layer's ContextSpec; a Request is one, plus plan options."""
    spec = ContextSpec(**options)  # type: ignore[arg-type]
    request = Request(ctx_tokens=None, cpu_spill=True, **options)  # type: ignore[arg-type]
    assert isinstance(request, ContextSpec)
    assert kv_bytes_per_layer(smollm2_shape(), spec, 8192) == \
        kv_bytes_per_layer(smollm2_shape(), request, 8192)
    assert estimate(smollm2_shape(), TS_1_3, spec, 8192) == estimate(smollm2_shape(), TS_1_3, request, 8192)


def test_deepseek4_caches_as_llama_server_printed() -> None:
    """tiny-deepseek4 (4 blocks with compress ratios 0, 4, 128, 4; K head 64, indexer head 64, window 128) at
    -c 4096 -np 4 (one stream per sequence even with a unified KV cache), as the pinned llama-server printed:
    raw SWA cache 1.50 MiB, CSA 1.00, HCA 0.12, indexer 1.00, compressor states 0.06 + 0.25 + 0.06."""
    ratios = (0, 4, 128, 4)
    profile = smollm2_shape(n_layer=4, n_head=(4,) * 4, n_head_kv=(1,) * 4, head_dim_k=64, head_dim_v=64,
                            n_swa=128, swa_layers=(True,) * 4, recurrent_layers=(False,) * 4,
                            compress_ratios=ratios, indexer_head_dim=64, arch="deepseek4")
    raw = 768 * 4 * 64 * 2  # pad256(128 + 512) cells x 4 streams
    csa = 1024 * 4 * 64 * 2 + 2 * 128 * 8 * 4 * 4  # pad256(4096 / 4) cells; kv + score state [2·64, 8, 4]
    hca = 256 * 4 * 64 * 2 + 2 * 64 * 128 * 4 * 4  # pad256(4096 / 128) cells; state [64, 128, 4]
    assert kv_bytes_per_layer(profile, Request(), 4096) == (raw, raw + 2 * csa, raw + hca, raw + 2 * csa)
    assert sum(kv_bytes_per_layer(profile, Request(), 4096)) == printed(1.50 + 1.00 + 0.125 + 1.00 + 0.0625
                                                                        + 0.25 + 0.0625)
