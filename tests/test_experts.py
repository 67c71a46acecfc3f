"""Expert spill for MoE models on what-if devices: pure planning, no processes.

The real-load checks (llama-server reproduces the -ot placement and its buffers) are in
test_experts_vs_llama.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llamalaunch.errors import BadInputError, PlanError
from llamalaunch.model.gguf_header import read_header
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.parse import ALL_LAYERS
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.schema import plan_to_dict
from llamalaunch.plan.types import Plan
from llamalaunch.units import GIB, MIB
from tests.synthetic import SyntheticShape, write_synthetic
from tests.test_planner import OPTIONS, assert_consistent, cuda, rpc

# Qwen3-30B-A3B's shape (issue 17 case a)
QWEN3_30B_A3B = SyntheticShape(n_layer=48, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4, n_vocab=151936,
                               head_dim=128, n_ctx_train=40960, n_expert=128, n_expert_used=8, n_ff_exp=768)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("m") / "a3b.gguf", "qwen3moe", QWEN3_30B_A3B, "Q4_K")


@pytest.fixture(scope="module")
def moe(moe_path: Path) -> ModelProfile:
    return load_profile(moe_path)


def ot_value(plan: Plan) -> str | None:
    argv = list(plan.argv)
    return argv[argv.index("-ot") + 1] if "-ot" in argv else None


def test_profile_splits_each_block_into_dense_part_and_experts(moe: ModelProfile) -> None:
    assert moe.expert_layers == tuple(range(48))
    block = moe.slots[0]
    # 3 expert matrices of 128 x 768 x 2048 Q4_K (144 bytes per 256 weights)
    assert block.expert_bytes == 3 * 128 * 768 * 2048 * 144 // 256
    assert 0 < block.dense_bytes("CPU") < block.bytes
    assert block.dense_bytes("CUDA") - block.dense_bytes("CPU") == \
        block.cuda_extra_bytes - block.expert_cuda_extra_bytes
    assert moe.slots[moe.output_slot].expert_bytes == 0


def test_cpu_spill_keeps_the_ngl_given(moe: ModelProfile) -> None:
    """-ngl 30 that does not fit whole: the hint said "49 of 49 layers fit: add --cpu-spill", and with it the
    plan put 49 layers on the GPU, -ngl 30 dropped without a word. Now at most the -ngl given."""
    request = Request(ctx_tokens=16384, n_gpu_layers=30)
    with pytest.raises(PlanError) as refused:
        make_plan(moe, [cuda(0, 10 * GIB)], request, OPTIONS, host_free_bytes=64 * GIB)
    assert refused.value.hint == "30 of 49 layers fit at ctx 16384: add --cpu-spill"
    spilled = make_plan(moe, [cuda(0, 10 * GIB)], replace(request, cpu_spill=True), OPTIONS,
                        host_free_bytes=64 * GIB)
    assert spilled.n_gpu_layers == 30 and "-ngl" in spilled.argv and spilled.argv[spilled.argv.index("-ngl") + 1] == "30"
    # the JSON says how many MoE layers keep their experts on the host, whole layers (-ngl) included
    assert plan_to_dict(spilled)["host"]["expert_layers"] == 48 - spilled.devices[0].expert_layers > 19


def test_a_small_second_gpu_that_keeps_the_plan_from_fitting_is_left_out(moe: ModelProfile) -> None:
    """A 1 GiB card beside a 10 GiB one could hold only the output layer, and with it the dense parts no longer
    fitted past ctx 14080 (40960 on the big card alone): --ctx max and --ctx 16k are what the big card gives."""
    alone = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=None), OPTIONS, host_free_bytes=64 * GIB)
    both = make_plan(moe, [cuda(0, 10 * GIB), cuda(1, 1 * GIB)], Request(ctx_tokens=None), OPTIONS,
                     host_free_bytes=64 * GIB)
    assert both.ctx_tokens == alone.ctx_tokens == 40960
    small = next(p for p in both.devices if p.device.name == "CUDA1")
    assert small.excluded and small.reason == "the plan fits without it, not with it"
    target = make_plan(moe, [cuda(0, 10 * GIB), cuda(1, 1 * GIB)], Request(ctx_tokens=16384), OPTIONS,
                       host_free_bytes=64 * GIB)
    assert target.ctx_tokens == 16384 and target.n_gpu_layers == moe.n_slots


def test_a_moe_model_that_does_not_fit_keeps_every_layer_and_spills_experts(moe: ModelProfile) -> None:
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384), OPTIONS)
    assert_consistent(plan)
    assert plan.n_gpu_layers == moe.n_slots  # every layer's attention and KV on the GPU
    device = plan.devices[0]
    assert 0 < device.expert_layers < 48 and device.moe_layers == 48
    split = {il for il, _ in plan.host_expert_parts}
    assert len(plan.host_expert_layers) + len(split) == 48 - device.expert_layers
    # the experts of the first blocks stay on the host, in one run; the next block is split: its largest
    # expert tensor kinds came back to the GPU while it had room (as --fit's partial layers)
    assert plan.host_expert_layers == frozenset(range(len(plan.host_expert_layers)))
    assert split == {len(plan.host_expert_layers)}
    kinds = {kind for _, kind in plan.host_expert_parts}
    assert 0 < len(kinds) < 3
    assert plan.host.weights_bytes >= len(plan.host_expert_layers) * moe.slots[0].expert_bytes
    # maximal: the whole split block's experts on the host frees less than another block needs
    with pytest.raises(PlanError):
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, cpu_experts=len(plan.host_expert_layers)),
                  OPTIONS)


def test_the_override_pattern_matches_exactly_the_spilled_expert_tensors(moe: ModelProfile, moe_path: Path) -> None:
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384), OPTIONS)
    overrides = [item.rsplit("=", 1) for item in (ot_value(plan) or "").split(",")]
    assert {buffer_type for _, buffer_type in overrides} == {"CPU"} and len(overrides) == 2
    names = [t.name for t in read_header(moe_path).tensors]
    # llama.cpp: std::regex_search of each pattern on every tensor name, the first match wins
    matched = {name for name in names if any(re.search(pattern, name) for pattern, _ in overrides)}
    expected = {name for name in names if "_exps." in name and
                (int(name.split(".")[1]) in plan.host_expert_layers
                 or (int(name.split(".")[1]), name.split(".")[2]) in plan.host_expert_parts)}
    assert matched == expected and expected


def test_a_model_that_fits_spills_nothing(moe: ModelProfile) -> None:
    plan = make_plan(moe, [cuda(0, 40 * GIB)], Request(ctx_tokens=16384), OPTIONS)
    assert plan.host_expert_layers == frozenset() and ot_value(plan) is None
    assert plan.devices[0].expert_layers == 48


def test_ctx_max_takes_the_largest_context_with_dense_parts_on_the_gpu(moe: ModelProfile) -> None:
    spilled = make_plan(moe, [cuda(0, 20 * GIB)], Request(ctx_tokens=None), OPTIONS)
    assert spilled.ctx_tokens == 40960  # the trained context: dense parts + KV fit easily
    assert spilled.host_expert_layers  # paid for with experts on the host
    assert_consistent(spilled)


def test_cpu_experts_forces_the_first_n_moe_layers_to_the_host(moe: ModelProfile) -> None:
    plan = make_plan(moe, [cuda(0, 40 * GIB)], Request(ctx_tokens=4096, cpu_experts=5), OPTIONS)
    assert plan.host_expert_layers == frozenset(range(5))
    assert ot_value(plan) == r"blk\.(0|1|2|3|4)\.[^.]*_exps\.=CPU"


def test_a_forced_layer_count_spills_layers_not_experts(moe: ModelProfile) -> None:
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, n_gpu_layers=20), OPTIONS)
    assert plan.n_gpu_layers == 20 and plan.host_expert_layers == frozenset()


@pytest.mark.parametrize("layers", [ALL_LAYERS, 999])
def test_every_layer_forced_on_the_devices_still_spills_experts(moe: ModelProfile, layers: int) -> None:
    """-ngl all (or llama.cpp users' -ngl 999) keeps no layer on the host: the experts still move, as with
    llama.cpp's -ngl 999 --n-cpu-moe N, and the plan is the one without -ngl."""
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, n_gpu_layers=layers), OPTIONS)
    default = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384), OPTIONS)
    assert plan.n_gpu_layers == moe.n_slots and plan.host_expert_layers
    assert plan.argv == default.argv


def test_two_devices_each_fill_with_the_experts_of_their_own_layers(moe: ModelProfile) -> None:
    devices = [rpc(0, 4 * GIB, "127.0.0.1:1"), cuda(0, 10 * GIB, order=1)]
    plan = make_plan(moe, devices, Request(ctx_tokens=16384), OPTIONS)
    assert_consistent(plan)
    assert plan.n_gpu_layers == moe.n_slots
    active = [d for d in plan.devices if not d.excluded]
    assert len(active) == 2 and all(0 < d.expert_layers < d.moe_layers for d in active)
    for device in active:  # what stays on the host is the first blocks of each device's range
        mine = range(device.first_slot or 0, (device.first_slot or 0) + device.n_layers)
        spilled = sorted(il for il in plan.host_expert_layers if il in mine)
        assert spilled == list(mine)[:len(spilled)]
    # and no pipeline-parallel copies: llama.cpp turns them off with tensor overrides
    assert max(d.memory.compute_bytes for d in active) < 512 * MIB


def test_host_memory_too_small_for_the_spilled_experts_is_refused_with_the_numbers(moe: ModelProfile) -> None:
    with pytest.raises(PlanError) as refusal:
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384), OPTIONS, host_free_bytes=2 * GIB)
    message = str(refusal.value)
    assert "host memory" in message and "2.00 GiB is available" in message


def test_ctx_max_takes_the_largest_context_whose_host_experts_fit_host_memory(moe: ModelProfile) -> None:
    """At the trained 40960 the host would need 10.86 GiB; 8 GiB holds the experts of a smaller context."""
    host = 8 * GIB
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=None), OPTIONS, host_free_bytes=host)
    assert_consistent(plan)
    assert 4096 < plan.ctx_tokens < 40960 and plan.host.total_bytes <= host - 64 * MIB
    with pytest.raises(PlanError):  # one step more does not fit
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=plan.ctx_tokens + 256), OPTIONS,
                  host_free_bytes=host)
    # no context is small enough: the smallest is named, and no --ctx hint
    with pytest.raises(PlanError) as refusal:
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=None), OPTIONS, host_free_bytes=4 * GIB)
    assert str(refusal.value) == (
        "synthetic qwen3moe 48x2048 at ctx 256 needs 7.02 GiB of host memory for what does not fit on the devices "
        "(weights 7.02 GiB, KV cache 2.3 MiB, buffers 4.1 MiB); 4.00 GiB is available (the weights alone do not "
        "fit: add devices, free host memory, or use a smaller quantization)")


def test_plan_cli_shows_experts_per_device_and_refuses_a_small_host(moe_path: Path) -> None:
    base = [sys.executable, "-m", "llamalaunch", "plan", str(moe_path), "--ctx", "16k", "--assume", "CUDA0=10GiB"]
    shown = subprocess.run([*base, "--assume", "CPU=64GiB"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "experts" in shown.stdout and "/48" in shown.stdout and "-ot" in shown.stdout
    refused = subprocess.run([*base, "--assume", "CPU=4GiB"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "host memory" in refused.stderr and "Traceback" not in refused.stderr


def test_dense_lead_layers_have_no_experts_to_spill(tmp_path: Path) -> None:
    shape = SyntheticShape(n_layer=6, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8, n_vocab=4096, head_dim=64,
                           n_expert=16, n_expert_used=2, n_ff_exp=256, n_expert_shared=1, n_layer_dense_lead=1,
                           q_lora_rank=64, kv_lora_rank=128, rope_dim=32)
    profile = load_profile(write_synthetic(tmp_path / "ds.gguf", "deepseek2", shape))
    assert profile.expert_layers == (1, 2, 3, 4, 5)
    full = make_plan(profile, [cuda(0, 8 * GIB)], Request(ctx_tokens=4096), OPTIONS).devices[0].planned_bytes
    squeezed = make_plan(profile, [cuda(0, full - 8 * MIB)], Request(ctx_tokens=4096, margin_bytes=0), OPTIONS)
    assert squeezed.host_expert_layers and 0 not in squeezed.host_expert_layers
    assert_consistent(replace(squeezed))


def test_a_context_too_large_names_the_largest_with_experts_on_the_host(moe: ModelProfile) -> None:
    """The hint once searched whole layers only (78,080 on 24 GiB) while moving experts to the host fits far
    more; beyond the trained context it says that --ctx max stops there."""
    with pytest.raises(PlanError) as refused:
        make_plan(moe, [cuda(0, 24 * GIB)], Request(ctx_tokens=1 << 20), OPTIONS)
    found = re.search(r"the largest context that fits is (\d+): use --ctx \1 \(--ctx max stops at the 40960 the "
                      r"model was trained for\)", str(refused.value))
    assert found is not None, str(refused.value)
    largest = int(found.group(1))
    assert largest > 200_000
    plan = make_plan(moe, [cuda(0, 24 * GIB)], Request(ctx_tokens=largest), OPTIONS)
    assert plan.ctx_tokens == largest and plan.host_expert_layers


def test_a_host_short_of_ram_at_this_context_names_the_smaller_one_that_fits(moe: ModelProfile) -> None:
    """A smaller context leaves the GPU room for more experts, so less for the host: the refusal said "the weights
    alone do not fit" where --ctx max planned a context."""
    with pytest.raises(PlanError) as refused:
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384), OPTIONS, host_free_bytes=8 * GIB)
    message = str(refused.value)
    found = re.search(r"\(the largest context that fits is (\d+): use --ctx \1 or --ctx max\)$", message)
    assert found is not None and "weights alone" not in message, message
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=int(found.group(1))), OPTIONS,
                     host_free_bytes=8 * GIB)
    assert plan.host.total_bytes <= 8 * GIB


def test_too_few_cpu_experts_name_the_count_that_fits(moe: ModelProfile) -> None:
    """--cpu-experts 5 leaves too many experts on the GPU: the fix is a larger count (it said add --cpu-spill)."""
    with pytest.raises(PlanError) as refused:
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, cpu_experts=5), OPTIONS)
    found = re.search(r"\(--cpu-experts (\d+) fits at ctx 16384 \(more experts on the host\), or leave out "
                      r"--cpu-experts and the plan chooses\)$", str(refused.value))
    assert found is not None, str(refused.value)
    count = int(found.group(1))
    assert make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, cpu_experts=count), OPTIONS).n_gpu_layers \
        == moe.n_slots
    with pytest.raises(PlanError):
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, cpu_experts=count - 1), OPTIONS)


def test_cpu_experts_beyond_the_moe_layers_is_a_bad_input(moe: ModelProfile) -> None:
    with pytest.raises(BadInputError) as refused:
        make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, cpu_experts=100), OPTIONS)
    assert str(refused.value) == "--cpu-experts 100: synthetic qwen3moe 48x2048 has 48 MoE layers (give " \
        "--cpu-experts 0 to 48)"


def test_the_expert_note_says_when_whole_layers_are_on_the_host_too(moe: ModelProfile) -> None:
    """--cpu-experts with --cpu-spill: the note claimed every layer's attention and KV were on the devices."""
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, cpu_experts=5, cpu_spill=True), OPTIONS)
    assert plan.n_gpu_layers < moe.n_slots
    assert plan.notes[0] == (f"experts of 5 of 48 MoE layers stay in host memory; {moe.n_slots - plan.n_gpu_layers} "
                             f"of {moe.n_slots} layers are on the host whole (-ngl {plan.n_gpu_layers})")


def test_a_cpu_spill_the_host_cannot_hold_is_refused_for_the_host(moe: ModelProfile) -> None:
    """Some layers fit the device, the rest not the host's RAM: the refusal said no layer fits at all."""
    with pytest.raises(PlanError) as refused:
        make_plan(moe, [rpc(0, 1 * GIB, "127.0.0.1:1")], Request(ctx_tokens=8192), OPTIONS, host_free_bytes=4 * GIB)
    message = str(refused.value)
    assert re.search(r"\(\d+ of 49 layers fit with --cpu-spill, but the host would need [\d.]+ GiB for the rest "
                     r"and 4\.00 GiB is available: add devices, free host memory, or use a smaller quantization\)$",
                     message), message


def test_every_device_takes_experts_in_proportion_to_its_room(moe: ModelProfile) -> None:
    """Each device takes back only its own blocks' experts: the even spare of the dense parts alone gave a 4 GiB
    last device 2 blocks and left it 2.27 GiB free while the host held experts of 21 blocks and part of another."""
    devices = [rpc(0, 3 * GIB, "127.0.0.1:1"), cuda(0, 8 * GIB), cuda(1, 4 * GIB)]
    plan = make_plan(moe, devices, Request(ctx_tokens=16384), OPTIONS, overhead={"CUDA": 768 * MIB})
    assert_consistent(plan)
    spare = {p.device.name: p.device.free_bytes - p.planned_bytes for p in plan.devices}
    assert max(spare.values()) < 512 * MIB, spare
    assert plan.host.weights_bytes < 5.5 * GIB  # 7.02 GiB from the even split
