"""Compute buffers from the replayed reservation, against what llama-server printed for the same argv.

The numbers below were printed by this llama.cpp build (CPU, RPC workers on loopback, SmolLM2 shape,
`--fit off -ngl 99`): `sched_reserve: <buffer> compute buffer size = X MiB`.
"""

from __future__ import annotations

import pytest

from llamalaunch.model.compute import replayed_layers
from llamalaunch.model.estimate import Placement, SlotRange, estimate
from llamalaunch.model.ggml.graphs import ModelSpec, Reserve
from llamalaunch.model.ggml.graphs.llama import LlamaGraph
from llamalaunch.model.ggml.sched import Backend, reserve
from llamalaunch.plan.request import Request
from llamalaunch.units import MIB
from tests.synthetic import SHAPES
from tests.test_kv import smollm2_shape

ONE = Placement((SlotRange("RPC0", "RPC", 0, 31),))
TS_1_3 = Placement((SlotRange("RPC0", "RPC", 0, 8), SlotRange("RPC1", "RPC", 8, 23)))

# (placement, request, ctx, compute MiB per device in order, host compute MiB)
SEEN = [
    (ONE, Request(), 8192, (20.38,), 10.26),
    (TS_1_3, Request(), 8192, (48.91, 48.91), 37.67),
    (TS_1_3, Request(cache_type_k="q8_0", cache_type_v="q8_0"), 5000, (35.91, 35.91), 25.80),
    (TS_1_3, Request(kv_unified=False, cache_type_k="q4_0", cache_type_v="q4_1"), 8192, (23.91, 23.91), 13.80),
    (TS_1_3, Request(n_parallel=3, kv_unified=False, cache_type_k="f32"), 10000, (30.97, 30.97), 19.71),
    (TS_1_3, Request(n_parallel=2, cache_type_k="bf16", cache_type_v="iq4_nl"), 3000, (28.98, 28.98), 17.73),
    (TS_1_3, Request(flash_attn="off", cache_type_k="q5_0"), 4096, (114.96, 114.96), 40.72),
]


@pytest.mark.parametrize(("placement", "request_", "ctx", "devices_mib", "host_mib"), SEEN)
def test_compute_matches_llama_server(placement: Placement, request_: Request, ctx: int,
                                      devices_mib: tuple[float, ...], host_mib: float) -> None:
    result = estimate(smollm2_shape(), placement, request_, ctx)
    for slot_range, mib in zip(placement.ranges, devices_mib):
        assert abs(result.devices[slot_range.device].compute_bytes - mib * MIB) <= MIB // 100
    assert abs(result.host.compute_bytes - host_mib * MIB) <= MIB // 100


def _spec(n_layer: int) -> ModelSpec:
    return ModelSpec(arch="llama", n_layer=n_layer, n_embd=576, n_head=(9,) * n_layer, n_head_kv=(3,) * n_layer,
                     head_dim_k=64, head_dim_v=64, n_rot=64, n_ff=(1536,) * n_layer, n_vocab=49152,
                     swa_layers=(False,) * n_layer, recurrent_layers=(False,) * n_layer, tied_output=True)


@pytest.mark.parametrize(("counts", "n_kv", "flash_attn"), [
    ((26, 2, 3), 2048, False), ((8, 17, 6), 8192, False), ((14, 17), 32768, True), ((10, 10), 4096, True),
])
def test_replaying_a_few_layers_changes_nothing(counts: tuple[int, ...], n_kv: int, flash_attn: bool) -> None:
    """Skipping repeated layers must give exactly the sizes of the full replay."""
    n_layer = 30 if sum(counts) <= 31 else 40
    spec = _spec(n_layer)
    first = n_layer + 1 - sum(counts)
    owners = [len(counts)] * (n_layer + 1)
    slot = first
    for device, count in enumerate(counts):
        owners[slot:slot + count] = [device] * count
        slot += count
    backends = [Backend(f"RPC{i}", "RPC", f"RPC{i}", 32) for i in range(len(counts))]
    backends.append(Backend("CPU", "CPU", "CPU", 32))
    res = Reserve(512, 4, 4, n_kv, n_kv, 1, flash_attn, "f16", "f16", tuple(owners[:n_layer]), owners[-1],
                  len(counts), first == 0)
    sizes = []
    for layers in (None, replayed_layers(spec, owners[:n_layer])):
        builder = LlamaGraph(spec, res)
        if layers is not None:
            builder.layers = layers
        builder.build()
        sizes.append(reserve(builder.gf, backends, len(counts) > 1 and first == 0, assigned=builder.assigned))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize(("preset", "changes", "periodic"), [
    ("tiny-qwen35moe", {"n_layer": 40}, True),  # attention every 4th layer
    ("tiny-glm4moe", {"n_layer": 46, "n_layer_dense_lead": 3}, True),  # a dense prefix, then all MoE
    ("tiny-gemma4", {"n_layer": 30, "n_kv_shared": 10, "swa_pattern": 5}, False),  # shared KV from another device
    ("tiny-nemotron_h", {"n_layer": 24, "attention_layers": (5, 12, 19), "ffn_layers": tuple(range(1, 24, 2))},
     False),
])
@pytest.mark.parametrize("devices", [1, 3])
def test_periodic_layers_replay_like_all_layers(tmp_path, preset: str, changes: dict, periodic: bool,
                                                devices: int) -> None:
    """Hybrid and interleaved layer patterns skip whole periods only: exactly the full replay's sizes
    (skipping one layer inside a period was seen to move a device by 0.75 MiB)."""
    from bench.bench_accuracy import even_placement
    from llamalaunch.model import compute
    from llamalaunch.model.load import load_profile
    from tests.synthetic import write_preset

    profile = load_profile(write_preset(tmp_path / "m.gguf", preset, **changes))
    placement, request = even_placement(profile.n_slots, devices), Request(n_parallel=4, n_ubatch=2048)
    compute._pieces.clear()
    skipped = estimate(profile, placement, request, 8192)
    real_replayed = compute.replayed_layers
    try:
        compute.replayed_layers = lambda spec, owners, host_experts: tuple(range(spec.n_layer))
        compute._pieces.clear()
        everything = estimate(profile, placement, request, 8192)
    finally:
        compute.replayed_layers = real_replayed
        compute._pieces.clear()
    assert skipped == everything
    replayed = real_replayed(compute.model_spec(profile), [0] * profile.n_layer)
    assert (len(replayed) < profile.n_layer) == periodic  # irregular patterns replay every layer


def test_compute_grows_with_context_without_flash_attention() -> None:
    small = estimate(smollm2_shape(), ONE, Request(flash_attn="off"), 4096).devices["RPC0"].compute_bytes
    large = estimate(smollm2_shape(), ONE, Request(flash_attn="off"), 16384).devices["RPC0"].compute_bytes
    # the KQ matrix of one layer (n_kv x n_ubatch x n_head f32) dominates
    assert large - small >= 12288 * 512 * 9 * 4


@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_one_replay_answers_a_range_of_contexts_exactly(flash_attn: str) -> None:
    """Sizes read off a replayed range (base + slope · cells) equal a fresh replay at that context."""
    from llamalaunch.model import compute
    from llamalaunch.model.kv import context_shape

    profile = smollm2_shape()
    request = Request(flash_attn=flash_attn)
    for ctx in (4096, 20480, 65536, 131072, 8192, 40960):
        shape = context_shape(request, ctx)
        ranges = tuple((r.device, r.backend, r.first_slot, r.n_slots) for r in TS_1_3.ranges)
        via_ranges = compute._cached(compute._ProfileKey(profile), ranges, (frozenset(), frozenset()), compute._spec_key(request), shape)
        compute._pieces.clear()
        fresh = compute._cached(compute._ProfileKey(profile), ranges, (frozenset(), frozenset()), compute._spec_key(request), shape)
        assert via_ranges == fresh


@pytest.mark.parametrize(("preset", "generic"), [(name, False) for name in SHAPES]
                         + [("tiny-smollm3", True), ("tiny-gemma3", True)])
def test_an_estimate_never_reads_the_model_file(tmp_path, preset: str, generic: bool) -> None:
    """The profile carries every header field the replay reads: once loaded, a deleted file estimates
    exactly as before (the replay used to re-read the header and plan without it when it was gone)."""
    from llamalaunch.model.load import load_profile
    from tests.synthetic import write_preset

    path = write_preset(tmp_path / "m.gguf", preset)
    before, after = (load_profile(path, allow_unknown_arch=True, generic=generic) for _ in range(2))
    n_slots, experts = before.n_slots, before.expert_layers
    placement = Placement((SlotRange("CUDA0", "CUDA", 0, n_slots // 2),
                           SlotRange("CUDA1", "CUDA", n_slots // 2, n_slots - n_slots // 2)),
                          host_expert_layers=frozenset(experts[::2]))  # op offload copies the host's experts
    request = Request(n_parallel=2, cache_type_k="f32")
    expected = estimate(before, placement, request, 8192)  # `after` is a second object: nothing cached for it
    path.unlink()
    assert estimate(after, placement, request, 8192) == expected
