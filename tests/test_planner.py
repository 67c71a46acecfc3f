"""The planner on what-if devices: pure, no processes (the real-load checks are in test_plan_vs_llama.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalaunch.errors import BadInputError, PlanError
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.schema import device_to_dict
from llamalaunch.plan.types import Plan
from llamalaunch.probe.device import Device
from llamalaunch.units import GIB, MIB
from tests.synthetic import write_preset

OPTIONS = ArgvOptions("m.gguf")


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(write_preset(tmp_path_factory.mktemp("m") / "8b.gguf", "llama-8b"))


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(write_preset(tmp_path_factory.mktemp("m") / "70b.gguf", "llama-70b"))


def cuda(index: int, free: int, order: int | None = None) -> Device:
    return Device(f"CUDA{index}", "CUDA", "what-if", free, free, index if order is None else order, assumed=True)


def rpc(index: int, free: int, endpoint: str, worker_index: int = 0) -> Device:
    return Device(f"RPC{index}", "RPC", endpoint, free, free, index, endpoint=endpoint, worker_index=worker_index)


def used(plan: Plan) -> dict[str, int]:
    return {p.device.name: p.n_layers for p in plan.devices if not p.excluded}


def assert_consistent(plan: Plan) -> None:
    """Layers add up, ranges are contiguous and end at the output slot, nothing exceeds its limit."""
    active = [p for p in plan.devices if not p.excluded]
    assert sum(p.n_layers for p in active) == plan.n_gpu_layers
    first = plan.model.n_slots - plan.n_gpu_layers
    for device_plan in active:
        assert device_plan.first_slot == first
        first += device_plan.n_layers
        assert device_plan.planned_bytes <= device_plan.limit_bytes
    assert first == plan.model.n_slots
    argv = list(plan.argv)
    assert argv[argv.index("-ngl") + 1] == str(plan.n_gpu_layers)
    if len(active) > 1:
        assert argv[argv.index("-ts") + 1] == ",".join(str(p.n_layers) for p in active)
    if "--rpc" in argv and "-dev" in argv:
        assert argv.index("--rpc") < argv.index("-dev")


def test_seed_case_small_card_left_out_exactly_when_it_cannot_hold_a_layer(llama_8b: ModelProfile) -> None:
    devices = [cuda(0, 24 * GIB), cuda(1, 1 * GIB)]
    roomy = make_plan(llama_8b, devices, Request(ctx_tokens=4096), OPTIONS)
    assert_consistent(roomy)
    assert used(roomy)["CUDA1"] >= 1
    tight = make_plan(llama_8b, devices, Request(ctx_tokens=32768), OPTIONS)
    assert_consistent(tight)
    small = next(p for p in tight.devices if p.device.name == "CUDA1")
    assert small.excluded
    assert small.reason is not None and small.reason.startswith("cannot hold one layer with its KV cache and compute")
    assert "-dev" in tight.argv and tight.argv[tight.argv.index("-dev") + 1] == "CUDA0"


def test_reservation_is_kept_free(llama_8b: ModelProfile) -> None:
    devices = [cuda(0, 12 * GIB)]
    plain = make_plan(llama_8b, devices, Request(ctx_tokens=None), OPTIONS)
    reserved = make_plan(llama_8b, devices, Request(ctx_tokens=None, reserve_bytes={"CUDA0": 2 * GIB}), OPTIONS)
    assert_consistent(reserved)
    assert reserved.ctx_tokens < plain.ctx_tokens
    device = reserved.devices[0]
    assert device.reserved_bytes == 2 * GIB
    assert device.planned_bytes + device.reserved_bytes + reserved.request.margin_for(12 * GIB) <= 12 * GIB


def test_ctx_max_grows_with_free_memory(llama_8b: ModelProfile) -> None:
    contexts = [make_plan(llama_8b, [cuda(0, free * GIB)], Request(ctx_tokens=None), OPTIONS).ctx_tokens
                for free in (6, 7, 8, 10, 14)]
    assert contexts == sorted(contexts)
    assert all(ctx % 256 == 0 for ctx in contexts)
    assert contexts[-1] > contexts[0]


def test_ctx_max_is_the_edge(llama_8b: ModelProfile) -> None:
    """One step (256 tokens) more would not fit: the search stops at the edge, not before it."""
    plan = make_plan(llama_8b, [cuda(0, 10 * GIB)], Request(ctx_tokens=None), OPTIONS)
    with pytest.raises(PlanError):
        make_plan(llama_8b, [cuda(0, 10 * GIB)], Request(ctx_tokens=plan.ctx_tokens + 256), OPTIONS)


def test_budget_caps_a_device(llama_8b: ModelProfile) -> None:
    devices = [rpc(0, 20 * GIB, "10.0.0.5:50052"), cuda(0, 20 * GIB, order=1)]
    plan = make_plan(llama_8b, devices, Request(ctx_tokens=8192, budget_bytes={"RPC0": 1 * GIB}), OPTIONS)
    assert_consistent(plan)
    rpc_plan = next(p for p in plan.devices if p.device.name == "RPC0")
    assert rpc_plan.planned_bytes <= 1 * GIB - plan.request.margin_for(1 * GIB)
    # spare is what is left of the budget, not of the 20 GiB free (the plan may use no more); the JSON says both
    assert rpc_plan.headroom_bytes == 1 * GIB - rpc_plan.planned_bytes
    assert device_to_dict(rpc_plan)["budget_bytes"] == 1 * GIB
    assert "--budget RPC0=1.00 GiB of its 20.00 GiB free: its spare is what the plan leaves of the budget" \
        in plan.notes


def test_too_big_says_what_would_fit(llama_70b: ModelProfile) -> None:
    with pytest.raises(PlanError) as raised:
        make_plan(llama_70b, [cuda(0, 24 * GIB)], Request(ctx_tokens=8192), OPTIONS)
    assert "add --cpu-spill" in str(raised.value)
    assert "does not fit on CUDA0" in str(raised.value)


def test_too_long_context_says_the_largest_that_fits(llama_8b: ModelProfile) -> None:
    with pytest.raises(PlanError) as raised:
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(ctx_tokens=131072), OPTIONS)
    assert "the largest context that fits is" in str(raised.value)


def test_a_raised_ctx_min_names_the_largest_context_below_it(llama_8b: ModelProfile) -> None:
    """Nothing fits between --ctx-min and --ctx: the refusal says so and names what fits below --ctx-min (it said
    only "add --cpu-spill", as if no context fitted with every layer on the device)."""
    fits = make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(ctx_tokens=None), OPTIONS).ctx_tokens
    with pytest.raises(PlanError) as raised:
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(ctx_tokens=131072, ctx_min_tokens=fits + 4096), OPTIONS)
    message = str(raised.value)
    assert f"; nor does any context down to --ctx-min {fits + 4096} (the largest context that fits is {fits}: " \
        f"lower --ctx-min to {fits}, or add --cpu-spill)" in message, message


def test_cpu_spill_keeps_the_first_slots_on_the_host(llama_70b: ModelProfile) -> None:
    plan = make_plan(llama_70b, [cuda(0, 24 * GIB)], Request(ctx_tokens=8192, cpu_spill=True), OPTIONS)
    assert_consistent(plan)
    assert 0 < plan.n_gpu_layers < llama_70b.n_slots
    assert plan.host.weights_bytes > llama_70b.host_bytes
    one_more = Request(ctx_tokens=8192, n_gpu_layers=plan.n_gpu_layers + 1)
    with pytest.raises(PlanError):
        make_plan(llama_70b, [cuda(0, 24 * GIB)], one_more, OPTIONS)


def test_dropped_worker_renumbers_the_rest(llama_8b: ModelProfile) -> None:
    """A worker left out is not passed to --rpc, so llama.cpp's names for the next ones shift."""
    devices = [rpc(0, 100 * MIB, "10.0.0.5:50052"), rpc(1, 30 * GIB, "10.0.0.6:50052"), cuda(0, 8 * GIB, order=2)]
    plan = make_plan(llama_8b, devices, Request(ctx_tokens=8192), OPTIONS)
    assert_consistent(plan)
    argv = list(plan.argv)
    assert argv[argv.index("--rpc") + 1] == "10.0.0.6:50052"
    assert next(p for p in plan.devices if p.device.name == "RPC0").excluded
    used_names = [p.device.name for p in plan.devices if not p.excluded]
    renamed = {"RPC1": "RPC0", "CUDA0": "CUDA0"}  # the second worker is llama.cpp's RPC0 now
    if "-dev" in argv:
        assert argv[argv.index("-dev") + 1] == ",".join(renamed[name] for name in used_names)
    else:
        assert used_names == ["RPC1", "CUDA0"]


def test_unknown_device_names_are_refused(llama_8b: ModelProfile) -> None:
    with pytest.raises(BadInputError, match="unknown device 'CUDA7'"):
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(devices=("CUDA7",)), OPTIONS)
    with pytest.raises(BadInputError, match="--budget RPC3: no such device here"):
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(budget_bytes={"RPC3": GIB}), OPTIONS)
    with pytest.raises(BadInputError) as host:  # it said "add it with --assume CPU=SIZE", which changed nothing
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(budget_bytes={"CPU": GIB}), OPTIONS)
    assert str(host.value) == "--budget CPU: the host is not a device the plan fills (to plan for less host " \
        "memory, give --assume CPU=SIZE)"


def test_device_order_and_selection_follow_dev(llama_8b: ModelProfile) -> None:
    devices = [cuda(0, 8 * GIB), cuda(1, 8 * GIB)]
    plan = make_plan(llama_8b, devices, Request(ctx_tokens=4096, devices=("CUDA1",)), OPTIONS)
    assert used(plan) == {"CUDA1": llama_8b.n_slots}
    assert plan.argv[plan.argv.index("-dev") + 1] == "CUDA1"
    left_out = next(p for p in plan.devices if p.device.name == "CUDA0")
    assert left_out.reason == "not listed in -dev"


def test_eight_devices_share_a_70b(llama_70b: ModelProfile) -> None:
    devices = [cuda(i, (4 + 2 * i) * GIB) for i in range(8)]
    plan = make_plan(llama_70b, devices, Request(ctx_tokens=None), OPTIONS)
    assert_consistent(plan)
    assert plan.n_gpu_layers == llama_70b.n_slots
    assert plan.ctx_tokens >= 32768


def test_plans_are_deterministic(tmp_path: Path) -> None:
    """Plans are pure: the same inputs give the same plan."""
    profile = load_profile(write_preset(tmp_path / "t.gguf", "tiny-llama"))
    devices = [cuda(0, 2 * GIB), cuda(1, 1 * GIB)]
    assert make_plan(profile, devices, Request(), OPTIONS) == make_plan(profile, devices, Request(), OPTIONS)


def test_the_default_margin_scales_with_small_devices() -> None:
    request = Request()
    assert request.margin_for(24 * GIB) == 64 * MIB
    assert request.margin_for(300 * MIB) == 15 * MIB
    assert request.margin_for(100 * MIB) == 8 * MIB
    assert Request(margin_bytes=0).margin_for(24 * GIB) == 0
    assert Request(extra_margin_bytes=256 * MIB).margin_for(24 * GIB) == 320 * MIB


def test_ctx_max_with_cpu_spill_keeps_a_useful_context(llama_70b: ModelProfile) -> None:
    plan = make_plan(llama_70b, [cuda(0, 24 * GIB)], Request(ctx_tokens=None, cpu_spill=True), OPTIONS)
    assert plan.ctx_tokens == 4096
    assert 0 < plan.n_gpu_layers < llama_70b.n_slots
    assert "--ctx max with layers on the CPU: ctx 4096 (llama.cpp --fit's floor: a larger context leaves fewer " \
           "layers on the devices); --ctx chooses another" in plan.notes  # said, not done silently
    given = make_plan(llama_70b, [cuda(0, 24 * GIB)], Request(ctx_tokens=4096, cpu_spill=True), OPTIONS)
    assert not [note for note in given.notes if "--ctx max" in note]


def test_the_suggested_context_respects_a_forced_layer_count(llama_8b: ModelProfile) -> None:
    with pytest.raises(PlanError) as raised:
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(ctx_tokens=131072, n_gpu_layers=20), OPTIONS)
    suggested = int(str(raised.value).split("the largest context that fits is ")[1].split(":")[0])
    make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(ctx_tokens=suggested, n_gpu_layers=20), OPTIONS)
    with pytest.raises(PlanError):
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(ctx_tokens=suggested + 256, n_gpu_layers=20), OPTIONS)


# --- what the refusal and the notes say (issue 15) ----------------------------------------------------------


def test_a_refusal_names_what_took_the_memory(llama_8b: ModelProfile) -> None:
    """The CUDA overhead, the reservation, the budget and the margin, each with the option that sets it."""
    devices = [rpc(0, 2 * GIB, "10.0.0.5:50052"), cuda(0, 1 * GIB, order=1)]
    request = Request(ctx_tokens=8192, budget_bytes={"RPC0": 512 * MIB}, reserve_bytes={"CUDA0": 256 * MIB})
    with pytest.raises(PlanError) as raised:
        make_plan(llama_8b, devices, request, OPTIONS)
    assert raised.value.message == (
        "synthetic llama 32x4096 at ctx 8192 does not fit on RPC0: 512.0 MiB budget (--budget) of 2.00 GiB free - "
        "25.6 MiB margin (--margin) = 486.4 MiB left; CUDA0: 1.00 GiB free - 640.0 MiB CUDA overhead (--overhead) "
        "- 256.0 MiB reserved (--reserve, --mmproj, --draft) - 51.2 MiB margin (--margin) = 76.8 MiB left")
    with pytest.raises(PlanError) as raised:
        make_plan(llama_8b, [cuda(0, 600 * MIB)], Request(ctx_tokens=8192), OPTIONS, {"CUDA0": 700 * MIB})
    assert raised.value.message.endswith("CUDA0: 600.0 MiB free - 700.0 MiB CUDA overhead (--overhead) - 30.0 MiB "
                                         "margin (--margin) = nothing left")
    assert raised.value.hint == ("no layer fits even at the smallest context: free memory, add devices, or lower "
                                 "--overhead or --margin")
    with pytest.raises(PlanError) as budgeted:  # a budget below free is the first lever
        make_plan(llama_8b, [cuda(0, 8 * GIB)], Request(ctx_tokens=8192, budget_bytes={"CUDA0": 100 * MIB}), OPTIONS)
    assert budgeted.value.hint == ("no layer fits even at the smallest context: free memory, add devices, raise "
                                   "--budget CUDA0, or lower --overhead or --margin")


def test_a_refusal_at_ctx_max_names_no_context_it_was_not_asked_for(llama_70b: ModelProfile) -> None:
    with pytest.raises(PlanError) as raised:
        make_plan(llama_70b, [cuda(0, 24 * GIB)], Request(ctx_tokens=None, ctx_min_tokens=1024), OPTIONS)
    text = str(raised.value)
    assert text.startswith("synthetic llama 80x8192 at any context down to --ctx-min 1024 (--ctx max) does not "
                           "fit on CUDA0: 24.00 GiB free")
    assert "at ctx 4096 does not fit" not in text


def test_a_context_rounded_up_or_beyond_training_is_noted(llama_8b: ModelProfile) -> None:
    plan = make_plan(llama_8b, [cuda(0, 80 * GIB)], Request(ctx_tokens=8193), OPTIONS)
    assert plan.ctx_tokens == 8448
    assert plan.notes == ("--ctx 8193 becomes 8448: llama.cpp sizes the context in steps of 256",)
    beyond = llama_8b.n_ctx_train + 4096
    plan = make_plan(llama_8b, [cuda(0, 80 * GIB)], Request(ctx_tokens=beyond), OPTIONS)
    assert plan.ctx_tokens == beyond
    assert plan.notes == (f"ctx {beyond} is beyond the {llama_8b.n_ctx_train} tokens the model was trained on: "
                          f"llama-server uses {beyond}, but output past {llama_8b.n_ctx_train} tokens may degrade",)
    assert make_plan(llama_8b, [cuda(0, 80 * GIB)], Request(ctx_tokens=8192), OPTIONS).notes == ()


def test_a_smaller_context_than_asked_and_a_budget_above_free_are_noted(llama_8b: ModelProfile) -> None:
    request = Request(ctx_tokens=131072, ctx_is_target=True, ctx_min_tokens=1024, budget_bytes={"CUDA0": 64 * GIB})
    plan = make_plan(llama_8b, [cuda(0, 8 * GIB)], request, OPTIONS)
    assert 1024 <= plan.ctx_tokens < 131072
    assert plan.notes == (
        f"--ctx 131072 does not fit: ctx {plan.ctx_tokens} is used, the largest that does (--ctx-min 1024)",
        "--budget CUDA0=64.00 GiB is above its 8.00 GiB free: the plan uses at most the free memory")
