"""Synthetic models: cheap to write, sparse on disk, and real llama.cpp loads and serves every family."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llamalaunch.model.gguf_header import read_header
from llamalaunch.model.load import load_profile
from tests.synthetic import SHAPES, SyntheticShape, write_preset, write_synthetic
from tests.test_model_profile import assert_buffers_match, serve_once

TINY = sorted(name for name in SHAPES if name.startswith("tiny-"))


def test_70b_writes_fast_and_sparse(tmp_path: Path) -> None:
    write_preset(tmp_path / "warm.gguf", "llama-70b")  # builds the 128k-token vocabulary once
    start = time.perf_counter()
    path = write_preset(tmp_path / "m.gguf", "llama-70b")
    elapsed = time.perf_counter() - start
    stat = path.stat()
    assert elapsed < 1.0
    assert stat.st_size > 36 << 30  # the full Q4_0 size of a 70B
    assert stat.st_blocks * 512 < 16 << 20  # on disk: the header only


def test_first_write_of_a_big_vocab_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_preset(tmp_path / "m.gguf", "llama-8b", n_vocab=128_000 + 7)  # a size no other test cached
    assert time.perf_counter() - start < 1.0


def test_presets_have_the_asked_shape(tmp_path: Path) -> None:
    profile = load_profile(write_preset(tmp_path / "m.gguf", "llama-8b"))
    assert (profile.n_layer, profile.n_embd, profile.n_vocab, profile.n_head_kv[0]) == (32, 4096, 128256, 8)
    assert profile.file_type == "Q4_0"
    big = load_profile(write_preset(tmp_path / "b.gguf", "llama-70b"))
    assert (big.n_layer, big.n_embd, big.n_head_kv[0], big.n_ff) == (80, 8192, 8, 28672)


def test_scaling_a_shape(tmp_path: Path) -> None:
    shape = SyntheticShape(n_layer=6, n_embd=256, n_ff=512, n_head=8, n_head_kv=4, n_vocab=1000)
    profile = load_profile(write_synthetic(tmp_path / "m.gguf", "qwen3", shape, "Q8_0"))
    assert (profile.arch, profile.n_layer, profile.n_embd, profile.n_vocab) == ("qwen3", 6, 256, 1000)
    assert profile.file_type == "Q8_0"
    scaled = load_profile(write_preset(tmp_path / "s.gguf", "tiny-qwen3moe", n_expert=16, n_layer=3))
    assert (scaled.n_expert, scaled.n_layer) == (16, 3)


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path: Path) -> None:
    header = read_header(write_preset(tmp_path / "m.gguf", "tiny-llama", file_type="Q4_K"))  # 256-wide blocks
    types = {t.name: t.type_name for t in header.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    big = read_header(write_preset(tmp_path / "b.gguf", "tiny-llama", n_embd=256, n_head=8, file_type="Q4_K"))
    assert {t.name: t.type_name for t in big.tensors}["blk.0.attn_q.weight"] == "Q4_K"


def test_no_tensor_that_poisons_logits(tmp_path: Path) -> None:
    """Zero rope_freqs / rope factors make every logit NaN (DESIGN.md §4): never written as zeros
    (gemma4 requires rope_freqs: it is written as ones)."""
    for name in TINY:
        header = read_header(write_preset(tmp_path / f"{name}.gguf", name))
        for tensor in header.tensors:
            if tensor.name in {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}:
                assert name == "tiny-gemma4" and tensor.name == "rope_freqs.weight", name
                with open(tmp_path / f"{name}.gguf", "rb") as stream:
                    stream.seek(header.data_offset + tensor.offset)
                    assert set(stream.read(tensor.nbytes)) != {0}, name


def test_gemma_is_always_tied(tmp_path: Path) -> None:
    for name in ("tiny-gemma2", "tiny-gemma3"):
        profile = load_profile(write_preset(tmp_path / f"{name}.gguf", name, tied=False))
        assert profile.output_is_token_embd


def test_small_vocab_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="below 260"):
        write_preset(tmp_path / "m.gguf", "tiny-llama", n_vocab=100)


@pytest.mark.llama
@pytest.mark.parametrize("name", TINY)
def test_family_loads_serves_and_matches(llama_bin_dir: Path, rpc_workers, tmp_path: Path, name: str) -> None:
    """Across two RPC workers with -ts 1,3: one token served, and every model buffer llama-server
    reports equals the sum of our slot bytes on that device (within its 0.01 MiB print precision)."""
    # a larger vocab and FFN than the preset, so that a misplaced tensor moves a total by > 0.01 MiB
    wider = {"n_vocab": 4096} | ({"n_ff": 1024} if SHAPES[name].shape.n_ff else {})
    path = write_preset(tmp_path / f"{name}.gguf", name, **wider)
    profile = load_profile(path, allow_unknown_arch=True)  # long-tail presets get the generic estimate
    workers = [rpc_workers(), rpc_workers()]
    served = serve_once(llama_bin_dir, path, workers, "1,3", tmp_path / "server.log")
    assert served.completion["tokens_predicted"] == 1
    assert len(served.model_buffers_mib) == 3  # the host's mapped token_embd and one per worker
    assert_buffers_match(profile, served, workers, (1, 3))


@pytest.mark.llama
def test_rope_freqs_is_copied_to_every_device(llama_bin_dir: Path, rpc_workers, tmp_path: Path) -> None:
    """rope_freqs has no block number: llama.cpp duplicates it into each device that holds a block."""
    path = write_preset(
        tmp_path / "m.gguf", "tiny-llama", rope_freqs=True, head_dim=16384, n_head=1, n_head_kv=1
    )
    profile = load_profile(path)
    assert profile.per_device_bytes == 8192 * 4
    workers = [rpc_workers(), rpc_workers()]
    served = serve_once(llama_bin_dir, path, workers, "1,3", tmp_path / "server.log")
    assert_buffers_match(profile, served, workers, (1, 3))


@pytest.mark.llama
@pytest.mark.skipif(
    not os.environ.get("LLAMALAUNCH_SLOW"), reason="loads 4 GiB of zero pages; set LLAMALAUNCH_SLOW=1"
)
def test_8b_loads(llama_bin_dir: Path, rpc_workers, tmp_path: Path) -> None:
    path = write_preset(tmp_path / "m.gguf", "llama-8b")
    workers = [rpc_workers(), rpc_workers()]
    served = serve_once(llama_bin_dir, path, workers, "1,3", tmp_path / "server.log", timeout_s=300)
    assert_buffers_match(load_profile(path), served, workers, (1, 3))


def _experts_picked(path: Path, tokens: range, layer: int, used: int) -> set[tuple[int, ...]]:
    """The experts each token's router picks in `layer`, computed as llama.cpp does for a block whose
    attention and FFN are zeros: top-k of router · rmsnorm(embedding) · ffn_norm."""
    import gguf
    import numpy

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    blocks = numpy.asarray(tensors["token_embd.weight"].data, dtype=numpy.uint8).reshape(-1, 18)  # Q4_0
    scale = blocks[:, :2].copy().view(numpy.float16).astype(numpy.float32)
    low, high = blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4
    embeddings = (numpy.concatenate([low, high], axis=1).astype(numpy.float32) - 8) * scale
    n_embd = tensors["blk.0.ffn_norm.weight"].data.size
    embeddings = embeddings.reshape(-1, n_embd)
    router = numpy.asarray(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data).reshape(-1, n_embd)
    norm = numpy.asarray(tensors[f"blk.{layer}.ffn_norm.weight"].data)
    picked = set()
    for token in tokens:
        hidden = embeddings[token] / numpy.sqrt(numpy.mean(embeddings[token] ** 2) + 1e-5) * norm
        picked.add(tuple(sorted(numpy.argsort(router @ hidden)[-used:].tolist())))
    return picked


def test_varied_routing_spreads_tokens_over_the_experts(tmp_path: Path, llama_bin_dir: Path) -> None:
    """Zeros route every token to the same experts, which makes a GPU benchmark of expert placement unlike a
    real model (a prompt's ubatch streams only the experts it uses): with varied routing tokens spread out."""
    from tests.support import run_llama_server

    shape = replace(SHAPES["tiny-qwen3moe"].shape, n_expert=16, n_expert_used=2)
    varied = write_synthetic(tmp_path / "varied.gguf", "qwen3moe", shape, "Q4_0", varied_routing=True)
    picks = _experts_picked(varied, range(100, 164), layer=1, used=2)
    assert len(picks) > 16 and len({e for pick in picks for e in pick}) == 16  # 64 tokens: every expert used
    zeros = write_synthetic(tmp_path / "zeros.gguf", "qwen3moe", shape, "Q4_0")
    assert len(_experts_picked(zeros, range(100, 164), layer=1, used=2)) == 1  # zeros: one set for all
    assert zeros.stat().st_size == varied.stat().st_size  # the same tensors, types and sizes
    run = run_llama_server(llama_bin_dir, ["-m", str(varied), "-c", "256", "-np", "1"], prompt=list(range(100, 164)))
    assert run.served, run.lines[-20:]
