"""The speed estimate (plan/speed.py), the choice by it (plan/choose.py), its figures and its calibration."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.model.estimate import Placement, SlotRange
from llamalaunch.model.kv import kv_bytes_per_layer
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.choose import estimate_plan
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.speed import HOST_TO_GPU_BYTES_S, bits_per_weight, estimate_speed
from llamalaunch.plan.speed_calibration import PLAUSIBLE_FACTOR, calibrated, load_speed_factors, record_speed
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.probe.rpc import probe_worker
from llamalaunch.probe.speed import gpu_speed, host_speed, rpc_speed, speed_figures
from llamalaunch.probe.speed_figures import DeviceSpeed, Link, SpeedFigures
from llamalaunch.units import GIB
from tests.serve_support import ServeRun, complete
from tests.support import RpcWorker
from tests.synthetic import write_preset, write_synthetic
from tests.test_experts import QWEN3_30B_A3B

OPTIONS = ArgvOptions("m.gguf")
FAST_GPU = DeviceSpeed("CUDA", 1e12, 100e12, "test")
HOST = DeviceSpeed("CPU", 50e9, 1e12, "test")


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(write_preset(tmp_path_factory.mktemp("m") / "8b.gguf", "llama-8b"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(write_synthetic(tmp_path_factory.mktemp("m") / "a3b.gguf", "qwen3moe", QWEN3_30B_A3B, "Q4_K"))


def cuda(index: int, free: int) -> Device:
    return Device(f"CUDA{index}", "CUDA", "what-if", free, free, index, assumed=True)


def rpc(index: int, free: int) -> Device:
    return Device(f"RPC{index}", "RPC", f"10.0.0.{index}:50052", free, free, index, endpoint=f"10.0.0.{index}:50052")


def whole(profile: ModelProfile, name: str = "CUDA0", backend: str = "CUDA") -> Placement:
    return Placement((SlotRange(name, backend, 0, profile.n_slots),))


def one_sequence_kv(profile: ModelProfile, fill: int, backend: str) -> int:
    return sum(kv_bytes_per_layer(profile, Request(n_parallel=1), fill, backend))


def test_a_token_reads_every_weight_and_the_kv_at_the_fill(llama_8b: ModelProfile) -> None:
    figures = SpeedFigures(HOST, {"CUDA0": FAST_GPU}, fill_tokens=4096)
    speed = estimate_speed(llama_8b, Request(), 16384, whole(llama_8b), figures)
    (gpu,) = speed.parts
    weights = sum(slot.full_bytes("CUDA") for slot in llama_8b.slots)
    assert gpu.read_bytes == weights + one_sequence_kv(llama_8b, 4096, "CUDA")
    # bandwidth-bound: bytes over bandwidth x efficiency, plus the per-slot cost, plus the two host hops
    expected = gpu.read_bytes / (1e12 * FAST_GPU.gen_efficiency) + llama_8b.n_slots * FAST_GPU.slot_overhead_s
    assert gpu.generation_s == pytest.approx(expected)
    assert speed.generation_tps == pytest.approx(1 / (expected + speed.hop_generation_s))
    assert speed.fill_tokens == 4096 and speed.unknown == ()
    # default fill: half the context; a fuller context reads more KV and is slower
    assert estimate_speed(llama_8b, Request(), 16384, whole(llama_8b), SpeedFigures(HOST, {"CUDA0": FAST_GPU})
                          ).fill_tokens == 8192
    full = estimate_speed(llama_8b, Request(), 16384, whole(llama_8b), dataclasses.replace(figures, fill_tokens=16384))
    assert full.generation_tps < speed.generation_tps


# The figures plan/speed.py held in its own table before it read ggml/types.py (Q6_K rounded to 6.56).
OLD_SINGLE_TYPE_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_0": 5.5, "Q5_1": 6.0,
                        "Q4_0": 4.5, "Q4_1": 5.0, "IQ4_NL": 4.5, "IQ4_XS": 4.25}


@pytest.mark.parametrize(("file_type", "bits"), sorted(OLD_SINGLE_TYPE_BITS.items()))
def test_a_file_of_one_type_has_its_blocks_bits_per_weight(llama_8b: ModelProfile, file_type: str,
                                                           bits: float) -> None:
    assert bits_per_weight(dataclasses.replace(llama_8b, file_type=file_type)) == pytest.approx(bits, abs=0.005)


@pytest.mark.parametrize(("file_type", "bits"), [
    ("MXFP4_MOE", 4.25),  # gpt-oss: its MXFP4 experts (the old table's "MXFP4" named no file type: 4.5)
    ("IQ2_XXS", 2.0625), ("TQ1_0", 1.6875),  # named by the one type table, no longer the default
    ("Q4_K_M", 4.85), ("Q2_K", 3.35),  # K-quant mixes: their average, not their blocks' 4.5 and 2.625
    ("IQ3_M", 4.5), ("GUESSED", 4.5), ("unknown", 4.5)])  # no one type: the default
def test_mixes_keep_their_average_and_others_come_from_the_type_table(llama_8b: ModelProfile, file_type: str,
                                                                       bits: float) -> None:
    assert bits_per_weight(dataclasses.replace(llama_8b, file_type=file_type)) == bits


def test_moe_reads_only_the_active_experts_and_the_host_reads_its_own(moe: ModelProfile) -> None:
    figures = SpeedFigures(HOST, {"CUDA0": FAST_GPU}, fill_tokens=256)
    kv = one_sequence_kv(moe, 256, "CUDA")
    on_gpu = estimate_speed(moe, Request(), 4096, whole(moe), figures)
    experts = sum(s.expert_bytes + s.expert_cuda_extra_bytes for s in moe.slots)
    dense = sum(s.full_bytes("CUDA") for s in moe.slots) - experts
    assert on_gpu.parts[0].read_bytes == pytest.approx(dense + experts * 8 / 128 + kv, abs=len(moe.slots))
    spilled = dataclasses.replace(whole(moe), host_expert_layers=frozenset(range(24)))
    split = estimate_speed(moe, Request(), 4096, spilled, figures)
    parts = {p.name: p for p in split.parts}
    host_experts = sum(moe.slots[il].expert_bytes for il in range(24))
    assert parts["host"].read_bytes == pytest.approx(host_experts * 8 / 128, abs=24)
    assert split.generation_tps < on_gpu.generation_tps  # the host's 50 GB/s is slower than the GPU's
    assert split.prompt_tps < on_gpu.prompt_tps  # the experts are streamed to the GPU for every ubatch


def test_every_rpc_hop_costs_a_round_trip(llama_8b: ModelProfile) -> None:
    placement = Placement((SlotRange("RPC0", "RPC", 0, 16), SlotRange("RPC1", "RPC", 16, llama_8b.n_slots - 16)))
    speeds = {"RPC0": HOST, "RPC1": HOST}

    def seconds(round_trip: float) -> float:
        links = {name: Link(round_trip, 1e9, "test") for name in speeds}
        speed = estimate_speed(llama_8b, Request(), 4096, placement, SpeedFigures(HOST, speeds, links))
        return 1 / speed.generation_tps

    # host -> RPC0 -> RPC1 -> host: three hops, each an RPC round trip
    assert seconds(0.010) - seconds(0.0) == pytest.approx(0.030)


def test_an_unknown_figure_says_so_and_the_plan_is_made_by_memory(llama_8b: ModelProfile) -> None:
    devices = [rpc(0, 3 * GIB), rpc(1, 6 * GIB)]
    by_memory = make_plan(llama_8b, devices, Request(ctx_tokens=4096), OPTIONS)
    unknown = make_plan(llama_8b, devices, Request(ctx_tokens=4096), OPTIONS,
                        speed=SpeedFigures(HOST, {"RPC0": HOST}))  # RPC1's speed and both links unknown
    assert unknown.speed is not None and unknown.speed.generation_tps is None
    assert set(unknown.speed.unknown) == {"RPC1 speed", "RPC0 link", "RPC1 link"}
    assert unknown.argv == by_memory.argv


def two_workers(slow: float, fast: float) -> SpeedFigures:
    links = {"RPC0": Link(1e-4, 1e9, "test"), "RPC1": Link(1e-4, 1e9, "test")}
    return SpeedFigures(HOST, {"RPC0": DeviceSpeed("CPU", slow, slow * 25, "test"),
                               "RPC1": DeviceSpeed("CPU", fast, fast * 25, "test")}, links)


def test_more_layers_go_to_the_faster_device_when_both_fit(llama_8b: ModelProfile) -> None:
    devices = [rpc(0, 5 * GIB), rpc(1, 5 * GIB)]
    even = make_plan(llama_8b, devices, Request(ctx_tokens=4096), OPTIONS)
    fast = make_plan(llama_8b, devices, Request(ctx_tokens=4096), OPTIONS, speed=two_workers(10e9, 40e9))
    layers = {p.device.name: p.n_layers for p in fast.devices}
    even_layers = {p.device.name: p.n_layers for p in even.devices}
    assert layers["RPC1"] > even_layers["RPC1"] and layers["RPC0"] < even_layers["RPC0"]
    assert fast.ctx_tokens == even.ctx_tokens == 4096
    assert all(p.planned_bytes <= p.limit_bytes for p in fast.devices)
    assert fast.speed.generation_tps > estimate_plan(even, two_workers(10e9, 40e9)).generation_tps
    assert fast.alternatives[0].chosen and "faster devices filled" in fast.alternatives[0].label
    assert any("even spare" in a.label for a in fast.alternatives[1:])
    # equal speeds: the even-spare split stays
    same = make_plan(llama_8b, devices, Request(ctx_tokens=4096), OPTIONS, speed=two_workers(20e9, 20e9))
    assert same.argv == even.argv


def test_prefer_speed_trades_context_for_a_faster_plan(llama_8b: ModelProfile) -> None:
    devices = [rpc(0, 4 * GIB), rpc(1, 8 * GIB)]
    figures = two_workers(1e9, 40e9)
    wide = make_plan(llama_8b, devices, Request(ctx_tokens=None), OPTIONS, speed=figures)
    quick = make_plan(llama_8b, devices, Request(ctx_tokens=None, prefer="speed"), OPTIONS, speed=figures)
    assert [p.device.name for p in wide.devices if not p.excluded] == ["RPC0", "RPC1"]
    assert [p.device.name for p in quick.devices if not p.excluded] == ["RPC1"]
    assert quick.ctx_tokens < wide.ctx_tokens
    assert quick.speed.generation_tps > wide.speed.generation_tps
    left_out = next(p for p in quick.devices if p.device.name == "RPC0")
    assert left_out.reason == "the plan is faster without it (--prefer speed)"


def test_calibration_scales_the_estimate_to_what_llama_server_measured(llama_8b: ModelProfile,
                                                                       tmp_path: Path) -> None:
    device = cuda(0, 24 * GIB)
    figures = SpeedFigures(HOST, {"CUDA0": FAST_GPU})
    before = estimate_speed(llama_8b, Request(), 4096, whole(llama_8b), figures)
    path = tmp_path / "speed.json"
    record_speed([device], False, before, before.generation_tps / 2, before.prompt_tps * 2, path)
    factors = load_speed_factors(path)
    # a little under 0.5: the fixed cost per slot is not scaled, the rest takes all of the difference
    assert 0.45 < factors["CUDA:what-if"].generation < 0.5
    after = estimate_speed(llama_8b, Request(), 4096, whole(llama_8b), calibrated(figures, [device], factors))
    assert after.generation_tps == pytest.approx(before.generation_tps / 2, rel=1e-3)
    assert after.prompt_tps == pytest.approx(before.prompt_tps * 2, rel=1e-3)
    # a broken measurement (a thousandfold off) is not recorded
    record_speed([device], False, after, after.generation_tps * 1000, None, path)
    assert load_speed_factors(path)["CUDA:what-if"] == factors["CUDA:what-if"]
    # and the host, with only a broken measurement, is not called calibrated
    assert record_speed([], True, after, after.generation_tps * 1000, None, path) == {}
    assert set(load_speed_factors(path)) == {"CUDA:what-if"}


def test_served_tokens_count_real_requests_not_the_readiness_check() -> None:
    """The 8B log: the readiness check (4 prompt tokens, 1 generated) is left out; the full prompt counts."""
    from llamalaunch.launch.calibrate import ServedTokens

    served = ServedTokens()
    log = Path(__file__).parent / "fixtures" / "llama-server-logs" / "cuda-h100-8b-ctx42752-filled.log"
    for line in log.read_text().splitlines():
        served.feed(line)
    assert served.prompt_tokens == 42720 and served.prompt_tps() == pytest.approx(42720 / 5.20041)
    assert served.mean_prompt() == 42720
    assert served.generation_tps() is None  # one generated token each: too few to time
    lines = ["I slot print_timing: id  0 | task 5 |        eval time =     100.00 ms /    10 tokens "
             "(   10.00 ms per token,   100.00 tokens per second)",
             "I slot      release: id  0 | task 5 | stop processing: n_tokens = 110, truncated = 0"]
    for line in lines:
        served.feed(line)
    assert served.generation_tps() == pytest.approx(100.0)
    assert served.mean_fill() == 105  # from 100 to 110 tokens in the context while generating


def plan_cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", *args], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.llama
def test_serve_calibrates_the_next_plans_speed_from_the_requests_it_served(
        serve: Callable[..., ServeRun], demo_model: Path, home: Path, llama_bin_dir: Path) -> None:
    """llama-server's own timings of what it served (not the readiness check) become the host's factor."""
    server = str(llama_bin_dir / "llama-server")
    plan_args = (str(demo_model), "--ctx", "2k", "-np", "1", "--llama-server", server)
    before = json.loads(plan_cli(*plan_args, "--json").stdout)["speed"]
    assert before["calibrated"] == [] and before["generation_tps"]

    run = serve(demo_model, "--ctx", "2k", "-np", "1")
    _, url, _ = run.wait_ready(timeout_s=120)
    for word in ("alpha", "beta", "gamma"):  # other prompts each time: a cached prompt is not evaluated again
        answer = complete(url, prompt=" ".join([word] * 60), n_predict=16, timeout_s=120)
        assert answer["tokens_predicted"] == 16
    run.send(signal.SIGTERM)
    assert run.wait_exit(timeout_s=60) == 128 + signal.SIGTERM

    factors = load_speed_factors(home / "speed_calibration.json")
    assert set(factors) == {"CPU:host"}
    after = json.loads(plan_cli(*plan_args, "--json").stdout)["speed"]
    assert after["calibrated"] == ["host"]
    # the host's share of a token is scaled by its factor; its fixed cost per slot (under 6% of it) is not
    assert after["generation_tps"] == pytest.approx(before["generation_tps"] * factors["CPU:host"].generation,
                                                    rel=0.1)
    table = plan_cli(*plan_args).stdout
    assert "tokens in context; calibrated by earlier runs on host)" in table
    # the calibrated estimate for the requests served (their fill and prompt size) is what llama-server timed
    from llamalaunch.launch.calibrate import ServedTokens
    from llamalaunch.plan.parse import build_request
    from llamalaunch.plan.pipeline import PlanInputs

    served = ServedTokens()
    for line in run.log_path.read_text().splitlines():
        served.feed(line)
    inputs = PlanInputs.gather(model=str(demo_model), demo=False, llama_server=server, rpc=[], assume=[],
                               overhead=[], request=build_request(ctx="2k", parallel=1, ctx_is_target=True))
    estimate = inputs.speed_at(inputs.plan(), served.mean_fill() or 1, served.mean_prompt())
    assert estimate is not None and estimate.calibrated == ("host",)
    low, high = PLAUSIBLE_FACTOR
    factor = factors["CPU:host"]
    for measured, calibrated_tps, recorded in ((served.generation_tps(), estimate.generation_tps, factor.generation),
                                               (served.prompt_tps(), estimate.prompt_tps, factor.prompt)):
        assert measured and calibrated_tps
        if recorded == 1.0 and not low <= measured / calibrated_tps <= high:
            continue  # so far off (a machine loaded by other jobs) that record_speed took it for a broken figure
        assert calibrated_tps == pytest.approx(measured, rel=0.1)


def test_gpu_figures_come_from_nvml_bus_width_and_clock() -> None:
    h100 = Device("CUDA0", "CUDA", "NVIDIA H100 80GB HBM3", GIB, GIB, 0, compute_capability="9.0",
                  memory_bus_width_bits=5120, memory_clock_mhz=2619)
    speed = gpu_speed(h100)
    assert speed.bandwidth_bytes_s == pytest.approx(3.35e12, rel=0.01)
    assert speed.flops == 989e12
    assert not gpu_speed(cuda(0, GIB)).known  # a what-if GPU: no NVML figures


def test_the_host_probe_measures_once_and_is_read_from_disk(tmp_path: Path) -> None:
    host = HostMemory(GIB, GIB, 2, "test CPU")
    path = tmp_path / "host_speed.json"
    assert host_speed(host, path, measure=False).source == "unknown"
    measured = host_speed(host, path)
    assert measured.known and measured.source == "probe"
    cached = host_speed(host, path)
    assert cached.source == "probe (cached)" and cached.bandwidth_bytes_s == measured.bandwidth_bytes_s
    assert json.loads(path.read_text())["v2|test CPU|2"]["flops"] > 0


def test_figures_of_the_single_threaded_probe_are_measured_again(tmp_path: Path) -> None:
    """The first probe read memory with one thread: a tenth of the host's bandwidth on a 16-core machine."""
    path = tmp_path / "host_speed.json"
    path.write_text(json.dumps({"test CPU|2": {"bandwidth_bytes_s": 1e9, "flops": 1e9}}))
    host = HostMemory(GIB, GIB, 2, "test CPU")
    assert host_speed(host, path, measure=False).source == "unknown"
    assert host_speed(host, path).source == "probe"


def test_a_loopback_worker_on_a_local_gpu_gets_that_gpus_figures() -> None:
    """On the H100 the worker reported the CUDA runtime's total, 470 MiB under NVML's: it was taken for the
    host's CPU and estimated at 3 tok/s for 224 measured (bench/results/h100-2026-12-07c)."""
    mib = 1024 * 1024
    h100 = Device("CUDA0", "CUDA", "NVIDIA H100 80GB HBM3", 80_000 * mib, 81_559 * mib, 1, compute_capability="9.0",
                  memory_bus_width_bits=5120, memory_clock_mhz=2619)
    small = dataclasses.replace(h100, name="CUDA1", description="NVIDIA RTX A2000", total_bytes=6_138 * mib)
    worker = Device("RPC0", "RPC", "127.0.0.1:50052", 3 * GIB, 81_089 * mib, 0, endpoint="127.0.0.1:50052")
    found = rpc_speed(worker, [small, h100], HOST)
    assert found.bandwidth_bytes_s == gpu_speed(h100).bandwidth_bytes_s and found.source == "CUDA0 (same machine)"
    cpu_worker = dataclasses.replace(worker, total_bytes=64 * GIB)  # the host's RAM: no GPU that size
    assert rpc_speed(cpu_worker, [small, h100], HOST).source == "host CPU (loopback worker)"
    # a host whose RAM total sits just under a GPU's (48 GB beside an RTX A6000): the worker is the CPU
    a6000 = dataclasses.replace(h100, description="NVIDIA RTX A6000", total_bytes=49_140 * mib)
    ram = dataclasses.replace(worker, total_bytes=48_900 * mib)
    assert rpc_speed(ram, [a6000], HOST, host_ram_bytes=48_900 * mib).source == "host CPU (loopback worker)"
    assert rpc_speed(ram, [a6000], HOST).source == "CUDA0 (same machine)"  # without the host's total: a guess


def test_given_figures_win_over_probed_ones() -> None:
    devices = [rpc(0, GIB)]
    figures = speed_figures(devices, HOST)
    assert not figures.devices["RPC0"].known and "remote worker" in figures.devices["RPC0"].source
    given = speed_figures(devices, HOST, {"RPC0": HOST}, {"RPC0": Link(3e-4, 1.25e8, "--link")})
    assert given.devices["RPC0"] is HOST and given.links["RPC0"].round_trip_s == 3e-4


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "150"})


LINK = "write it like --link RPC0=1Gbit/0.3ms: a rate in bit or B per second, a round trip in s, ms or us"


@pytest.mark.parametrize(("args", "message"), [
    (["--link", "RPC0=1Gbt/0.3ms"], f"error: --link RPC0: '1Gbt' is not a rate ({LINK})"),
    (["--link", "RPC0=1Gbit"], f"error: --link value 'RPC0=1Gbit' is not NAME=RATE/ROUNDTRIP ({LINK})"),
    (["--link", "RPC0=1Gbit/fast"], f"error: --link RPC0: 'fast' is not a round-trip time ({LINK})"),
    (["--link", "CUDA0=1Gbit/1ms"], "error: --link CUDA0: only RPC devices have a network link (name an RPC device)"),
    (["--link", "RPC7=1Gbit/1ms"], "error: --link RPC7: no such device here (devices here: RPC0) (add it with --rpc "
                                   "HOST:PORT or --assume RPC7=SIZE, or drop --link RPC7)"),
    (["--device-speed", "RPC0=quick"], "error: --device-speed RPC0: 'quick' is not a bandwidth (write it like "
     "--device-speed RPC0=20GB or RPC0=20GB:500GFLOPS, memory bandwidth per second)"),
    (["--prefer", "fast"], "error: --prefer 'fast' is not allowed (use one of context, speed)"),
])
def test_bad_speed_options_get_one_line(demo_model: Path, args: list[str], message: str) -> None:
    result = run_cli("plan", str(demo_model), "--assume", "RPC0=1GiB", *args)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stderr


def test_plan_shows_the_estimate_and_compare_lists_the_candidates(demo_model: Path) -> None:
    common = ["plan", str(demo_model), "--ctx", "4k", "--assume", "RPC0=100MiB,RPC1=200MiB",
              "--link", "RPC0=10Gbit/0.1ms,RPC1=10Gbit/0.1ms", "--device-speed", "RPC0=5GB,RPC1=40GB"]
    table = run_cli(*common, "--compare")
    assert table.returncode == 0, table.stderr
    assert "est. tok/s: generation " in table.stdout and "(one sequence, 2048 tokens in context)" in table.stdout
    assert "placements that fit" in table.stdout and "(faster devices filled)" in table.stdout
    data = json.loads(run_cli(*common, "--json").stdout)
    assert data["speed"]["generation_tps"] > 0 and data["speed"]["fill_tokens"] == 2048
    assert {"prompt_tps", "unknown", "parts", "ubatch_tokens"} <= set(data["speed"])
    assert data["alternatives"][0]["chosen"] is True
    unknown = run_cli("plan", str(demo_model), "--ctx", "4k", "--assume", "RPC0=100MiB,RPC1=200MiB")
    assert unknown.returncode == 0
    assert "est. tok/s: unknown (RPC0 speed, RPC1 speed, RPC0 link, RPC1 link not known" in " ".join(
        unknown.stdout.split())


def test_a_loopback_worker_gets_a_measured_round_trip_and_a_known_estimate(
        rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    worker = rpc_workers()
    report = probe_worker(worker.endpoint)
    assert report.round_trip_s is not None and 0 < report.round_trip_s < 0.5
    result = run_cli("plan", str(demo_model), "--ctx", "2k", "--rpc", worker.endpoint, "--json")
    assert result.returncode == 0, result.stderr
    speed = json.loads(result.stdout)["speed"]
    assert speed["unknown"] == [] and speed["generation_tps"] > 0


def test_status_shows_the_plans_estimate_beside_the_measured_speeds() -> None:
    from rich.console import Console

    from llamalaunch.observe.collector import _estimated_tps
    from llamalaunch.observe.snapshot import StatusSnapshot
    from llamalaunch.observe.view import status_view

    assert _estimated_tps({"speed": {"prompt_tps": 812.0, "generation_tps": 45.25}}) == (812.0, 45.25)
    assert _estimated_tps({}) is None  # a plan from before the estimate existed
    snapshot = StatusSnapshot(taken_at=0.0, source="url", name=None, url="http://127.0.0.1:8080", running=True,
                              gone_reason=None, phase="ready", estimated_tps=(812.0, 45.25))
    console = Console(record=True, width=150)
    console.print(status_view(snapshot, show_log=False))
    text = console.export_text()
    assert "tok/s prompt / generation: average" in text
    assert "estimated before launch, tok/s prompt / generation: 812.0 / 45.2 (one sequence)" in text


def test_compare_lists_smaller_contexts_that_would_be_faster(llama_8b: ModelProfile) -> None:
    devices = [rpc(0, 4 * GIB), rpc(1, 8 * GIB)]
    plan = make_plan(llama_8b, devices, Request(ctx_tokens=None), OPTIONS, speed=two_workers(1e9, 40e9), compare=True)
    assert plan.alternatives[0].chosen and plan.alternatives[0].ctx_tokens == plan.ctx_tokens
    without = [a for a in plan.alternatives if "without RPC0" in a.label]
    assert without and without[0].ctx_tokens < plan.ctx_tokens
    assert without[0].speed.generation_tps > plan.speed.generation_tps  # the trade a user sees
    plain = make_plan(llama_8b, devices, Request(ctx_tokens=None), OPTIONS, speed=two_workers(1e9, 40e9))
    assert [a.label for a in plain.alternatives] == [plan.alternatives[0].label]  # not searched without --compare


def test_whole_slots_in_host_memory_are_streamed_to_the_gpu_for_prompts(llama_8b: ModelProfile) -> None:
    """llama.cpp's op offload multiplies host weights on the GPU for a large batch: on the H100, 18 of 33
    slots of an 8B on the host prompted at 4,333 tok/s, which the host alone was estimated at 34."""
    on_gpu = llama_8b.n_slots - 18
    placement = Placement((SlotRange("CUDA0", "CUDA", 18, on_gpu),))
    figures = SpeedFigures(HOST, {"CUDA0": FAST_GPU})
    modes = {mode: estimate_speed(llama_8b, Request(host_weights=mode), 4096, placement, figures)
             for mode in ("pinned", "mapped", "repacked")}
    parts = {mode: {p.name: p for p in estimate.parts} for mode, estimate in modes.items()}
    host_bytes = sum(slot.full_bytes("CPU") for slot in llama_8b.slots[:18])
    assert parts["pinned"]["CUDA0"].prompt_streamed_s >= host_bytes / HOST_TO_GPU_BYTES_S
    assert parts["repacked"]["CUDA0"].prompt_streamed_s < host_bytes / HOST_TO_GPU_BYTES_S / 100  # never streamed
    assert parts["pinned"]["host"].prompt_s < parts["repacked"]["host"].prompt_s / 10  # only the attention
    assert modes["pinned"].prompt_tps > modes["mapped"].prompt_tps > modes["repacked"].prompt_tps  # type: ignore[operator]
    assert len({estimate.generation_tps for estimate in modes.values()}) == 1  # one token: the host computes
    # the GPU that streams them may hold no slot itself: its streaming is still counted
    idle_first = Placement((SlotRange("CUDA0", "CUDA", 0, 0), SlotRange("CUDA1", "CUDA", 18, on_gpu)))
    both = SpeedFigures(HOST, {"CUDA0": FAST_GPU, "CUDA1": FAST_GPU})
    streamed = estimate_speed(llama_8b, Request(host_weights="pinned"), 4096, idle_first, both)
    assert {p.name: p for p in streamed.parts}["CUDA0"].prompt_streamed_s >= host_bytes / HOST_TO_GPU_BYTES_S
    # a calibrated stream efficiency scales the streaming alone
    slow_link = SpeedFigures(HOST, {"CUDA0": dataclasses.replace(FAST_GPU, stream_efficiency=0.5)})
    slow = {p.name: p for p in estimate_speed(llama_8b, Request(host_weights="pinned"), 4096, placement,
                                              slow_link).parts}["CUDA0"]
    assert slow.prompt_streamed_s == pytest.approx(2 * parts["pinned"]["CUDA0"].prompt_streamed_s)
    assert slow.prompt_s - slow.prompt_streamed_s == pytest.approx(parts["pinned"]["CUDA0"].prompt_s
                                                                    - parts["pinned"]["CUDA0"].prompt_streamed_s)
