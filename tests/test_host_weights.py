"""--host-weights: how llama.cpp keeps the weights a plan leaves in host memory (pinned, mapped, repacked).

Pure planning on what-if devices (the flags, the note, the JSON, the speed estimate), then real llama-server
loads on ggml-rpc-server workers: each mode's argv reaches llama-server and its log names the host buffers
llama.cpp chose. With RPC workers only there is no pinned host buffer (the RPC backend has no host buffer
type), so nothing comes before the CPU's repack buffer: CPU_REPACK takes the expert matrices it has kernels
for (Q4_0 on AVX2) in every mode, `-lm none` loads the rest into plain memory ("CPU model buffer size") and
mapped and repacked both map it ("CPU_Mapped"). The repacked copies are exactly the file's tensor bytes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.errors import BadInputError
from llamalaunch.launch.logparse import HOST as HOST_BUFFERS
from llamalaunch.launch.logparse import parse_events
from llamalaunch.launch.serve import check_extra_args
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import HOST_WEIGHTS, HOST_WEIGHTS_AUTO, Request
from llamalaunch.plan.schema import plan_to_dict
from llamalaunch.plan.speed import HOST_TO_GPU_BYTES_S, estimate_speed
from llamalaunch.probe.speed_figures import SpeedFigures
from llamalaunch.units import GIB, MIB, format_bytes
from tests.serve_support import ServeRun
from tests.support import RpcWorker, run_llama_server
from tests.synthetic import write_preset, write_synthetic
from tests.test_experts import QWEN3_30B_A3B
from tests.test_plan_vs_llama import buffer_sums, plan_json
from tests.test_planner import OPTIONS, cuda, rpc
from tests.test_speed import FAST_GPU, HOST, whole

FLAGS = {"pinned": ["-lm", "none"], "mapped": [], "repacked": ["--no-host"]}
MODES = tuple(FLAGS)  # HOST_WEIGHTS less auto, which stands for one of them
WITH_GPU = {
    "pinned": "host weights pinned (-lm none): loaded into pinned memory, which prompts stream to the GPU 4-6x as "
              "fast as from the file mapping; a slower load, the host memory stays locked while it runs, and on some "
              "hosts generation is up to 16% slower; "
              "--host-weights chooses auto, pinned, mapped or repacked",
    "mapped": "host weights mapped (no flag): read through the file mapping: the fastest load; prompts stream them "
              "to the GPU at a quarter to a sixth of the speed of pinned memory; --host-weights chooses auto, "
              "pinned, mapped or repacked",
    "repacked": "host weights repacked (--no-host): repacked into the CPU's own layout (the types its kernels "
                "take; the rest mapped): the host computes them, prompts included, never streaming them to the "
                "GPU; --host-weights chooses auto, pinned, mapped or repacked",
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(write_synthetic(tmp_path_factory.mktemp("m") / "a3b.gguf", "qwen3moe", QWEN3_30B_A3B, "Q4_K"))


def flags_after_ot(argv: tuple[str, ...]) -> list[str]:
    """What follows the -ot pattern, up to --fit off."""
    rest = list(argv[argv.index("-ot") + 2:])
    return rest[:rest.index("--fit")]


# --- the plan: flags, note, JSON ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_plan_with_host_experts_states_its_mode_in_the_argv_a_note_and_the_json(moe: ModelProfile,
                                                                                  mode: str) -> None:
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, host_weights=mode), OPTIONS)
    assert plan.host_expert_layers
    assert flags_after_ot(plan.argv) == FLAGS[mode]
    assert plan.notes[-1] == WITH_GPU[mode]
    assert plan_to_dict(plan)["host_weights"] == mode
    # the memory is the same in every mode: repacked copies and pinned buffers are the file's tensor bytes
    default = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384), OPTIONS)
    assert (plan.host, plan.devices) == (default.host, default.devices)


def test_auto_pins_for_a_gpu_and_maps_for_workers(moe: ModelProfile) -> None:
    """Pinned prompts were 4-6x the mapped ones on an H100 at the same generation (a GPU streams every host expert
    per prompt ubatch); workers compute host experts on the host, where pinning only slows the load."""
    with_gpu = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384), OPTIONS)
    assert Request().host_weights == "auto" and with_gpu.host_weights == HOST_WEIGHTS_AUTO[True] == "pinned"
    assert flags_after_ot(with_gpu.argv) == FLAGS["pinned"]
    assert with_gpu.notes[-1] == WITH_GPU["pinned"]
    workers = make_plan(moe, [rpc(0, 10 * GIB, "127.0.0.1:1")], Request(ctx_tokens=16384), OPTIONS)
    assert workers.host_weights == "mapped" and flags_after_ot(workers.argv) == []
    assert workers.notes[-1] == ("host weights mapped (no flag): read through the file mapping (the CPU repacks "
                                 "the types its kernels take into memory, as in every mode without a GPU): the "
                                 "fastest load; the host computes them; --host-weights chooses auto, pinned, mapped "
                                 "or repacked")


def test_pinned_weights_taking_most_of_the_ram_get_a_note(moe: ModelProfile) -> None:
    """A 12 GiB host with 11.9 GiB of experts pinned: locked, nothing else on the machine can have it back."""
    tight = make_plan(moe, [cuda(0, 6 * GIB)], Request(ctx_tokens=8192), OPTIONS, host_free_bytes=12 * GIB)
    assert tight.host_weights == "pinned"
    assert tight.notes[-1].startswith(f"pinned host weights lock {format_bytes(tight.host.weights_bytes)} of the "
                                      "12.00 GiB of RAM available")
    roomy = make_plan(moe, [cuda(0, 6 * GIB)], Request(ctx_tokens=8192), OPTIONS, host_free_bytes=64 * GIB)
    mapped = make_plan(moe, [cuda(0, 6 * GIB)], Request(ctx_tokens=8192, host_weights="mapped"), OPTIONS,
                       host_free_bytes=12 * GIB)
    assert not [note for note in (*roomy.notes, *mapped.notes) if note.startswith("pinned host weights lock")]


def test_nothing_on_the_host_states_no_mode(moe: ModelProfile) -> None:
    fits = make_plan(moe, [cuda(0, 40 * GIB)], Request(ctx_tokens=16384, host_weights="repacked"), OPTIONS)
    assert fits.host_weights is None and plan_to_dict(fits)["host_weights"] is None
    assert not {"-lm", "--no-host"} & set(fits.argv) and fits.notes == ()


def test_a_machine_without_devices_spills_nothing_and_keeps_llama_cpps_default(demo_model: Path) -> None:
    """Every weight on the host of a CPU-only machine is not a spill: no mode, no flag, no note (the mapping)."""
    result = run_cli("plan", str(demo_model), "--assume", "CPU=8GiB", "--host-weights", "pinned", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["n_gpu_layers"], data["host_weights"]) == (0, None)
    assert not [note for note in data["notes"] if "host weights" in note]
    assert not {"-lm", "--no-host"} & set(data["argv"])


def test_workers_only_have_no_pinned_memory_and_the_note_says_so(moe: ModelProfile) -> None:
    plan = make_plan(moe, [rpc(0, 10 * GIB, "127.0.0.1:1")], Request(ctx_tokens=16384, host_weights="pinned"), OPTIONS)
    assert flags_after_ot(plan.argv) == ["-lm", "none"]
    assert plan.notes[-1] == ("host weights pinned (-lm none): loaded into memory (no GPU of this plan has pinned "
                              "memory); the host computes them; --host-weights chooses auto, pinned, mapped or repacked")


def test_layers_left_on_the_host_get_the_mode_too(tmp_path: Path) -> None:
    profile = load_profile(write_preset(tmp_path / "8b.gguf", "llama-8b"))
    plan = make_plan(profile, [cuda(0, 2 * GIB)], Request(ctx_tokens=4096, cpu_spill=True, host_weights="repacked"),
                     OPTIONS)
    assert 0 < plan.n_gpu_layers < profile.n_slots and plan.host_weights == "repacked"
    assert plan.argv[-3:] == ("--no-host", "--fit", "off") and plan.notes == (WITH_GPU["repacked"],)


# --- the speed estimate ---------------------------------------------------------------------------------


def test_prompts_stream_host_experts_at_the_modes_rate_and_generation_is_the_same(moe: ModelProfile) -> None:
    figures = SpeedFigures(HOST, {"CUDA0": FAST_GPU}, fill_tokens=256)
    spilled = dataclasses.replace(whole(moe), host_expert_layers=frozenset(range(24)))
    speeds = {mode: estimate_speed(moe, Request(host_weights=mode), 4096, spilled, figures) for mode in HOST_WEIGHTS}
    parts = {mode: {p.name: p for p in speed.parts} for mode, speed in speeds.items()}
    streamed = sum(moe.slots[il].expert_bytes for il in range(24))
    gpu = {mode: parts[mode]["CUDA0"].prompt_s for mode in HOST_WEIGHTS}
    # pinned at the bus's rate, mapped at a quarter of it (the GPU computes the same in both), repacked not at all
    assert gpu["mapped"] - gpu["pinned"] == pytest.approx(3 * streamed / HOST_TO_GPU_BYTES_S)
    assert gpu["auto"] == gpu["pinned"]  # a GPU streams: auto pins
    assert gpu["repacked"] < gpu["pinned"] - streamed / HOST_TO_GPU_BYTES_S
    # repacked: the host reads every spilled expert once per ubatch and computes the prompt itself
    assert parts["repacked"]["host"].prompt_s > parts["pinned"]["host"].prompt_s
    assert speeds["pinned"].prompt_tps > speeds["mapped"].prompt_tps  # type: ignore[operator]
    assert len({speed.generation_tps for speed in speeds.values()}) == 1


# --- the command line: option, profile, environment ---------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "150", **(env or {})})


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preset(tmp_path_factory.mktemp("m") / "moe.gguf", "tiny-qwen3moe", n_layer=8, n_embd=256,
                        n_expert=16, n_ff_exp=512, n_vocab=2048)


SPILLS = ("--assume", "RPC0=48MiB", "--ctx", "4096", "-np", "1")


def test_the_option_a_profile_and_the_environment_choose_the_mode(moe_path: Path, tmp_path: Path) -> None:
    given = run_cli("plan", str(moe_path), *SPILLS, "--host-weights", "repacked", "--json")
    assert given.returncode == 0, given.stderr
    data = json.loads(given.stdout)
    assert data["host_weights"] == "repacked" and "--no-host" in data["argv"]
    profile = tmp_path / "p.toml"
    profile.write_text('host_weights = "mapped"\n')
    from_profile = json.loads(run_cli("--config", str(profile), "plan", str(moe_path), *SPILLS, "--json").stdout)
    assert from_profile["host_weights"] == "mapped" and "-lm" not in from_profile["argv"]
    from_env = run_cli("plan", str(moe_path), *SPILLS, "--json", env={"LLAMALAUNCH_HOST_WEIGHTS": "repacked"})
    assert json.loads(from_env.stdout)["host_weights"] == "repacked"
    table = run_cli("plan", str(moe_path), *SPILLS, "--host-weights", "mapped")
    assert "host weights mapped (no flag): read through the file mapping" in table.stdout
    # any case, as a user may type it; the plan and the argv spell it as llama-server does
    shouted = run_cli("plan", str(moe_path), *SPILLS, "--host-weights", "PINNED", "-ctk", "Q8_0", "-fa", "On",
                      "--json")
    assert shouted.returncode == 0, shouted.stderr
    data = json.loads(shouted.stdout)
    assert data["host_weights"] == "pinned" and ["-ctk", "q8_0"] == data["argv"][data["argv"].index("-ctk"):][:2]
    shouting_profile = tmp_path / "loud.toml"
    shouting_profile.write_text('host_weights = "Repacked"\n')
    loud = run_cli("--config", str(shouting_profile), "plan", str(moe_path), *SPILLS, "--json")
    assert loud.returncode == 0, loud.stderr
    assert json.loads(loud.stdout)["host_weights"] == "repacked"


def test_an_unknown_mode_is_one_line(moe_path: Path) -> None:
    bad = run_cli("plan", str(moe_path), *SPILLS, "--host-weights", "pined")
    assert (bad.returncode, bad.stdout, bad.stderr) == (
        2, "", "error: --host-weights 'pined' is not allowed (use one of auto, pinned, mapped, repacked)\n")


# --- real loads on workers ----------------------------------------------------------------------------------


def repacks_q4_0() -> bool:
    """ggml's CPU backend repacks Q4_0 matrices (rows a multiple of 8) on AVX2 (ggml-cpu/repack.cpp)."""
    return "avx2" in Path("/proc/cpuinfo").read_text().split()


def host_buffers(lines: list[str]) -> dict[str, float]:
    """`load_tensors:   CPU_REPACK model buffer size =     7.88 MiB` lines of the host's buffers."""
    found = {}
    for line in lines:
        match = re.search(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", line)
        if match and not match.group(1).startswith("RPC"):
            found[match.group(1)] = float(match.group(2))
    return found


# the host's buffers and load mode per mode, on RPC workers only (see the module's docstring)
EXPECTED = {"pinned": ({"CPU", "CPU_REPACK"}, "none"), "mapped": ({"CPU_Mapped", "CPU_REPACK"}, "mmap"),
            "repacked": ({"CPU_Mapped", "CPU_REPACK"}, "mmap")}


@pytest.mark.llama
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_reaches_llama_server_which_names_the_host_buffers(
        mode: str, moe_path: Path, llama_bin_dir: Path, rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    plan = plan_json(moe_path, ["--rpc", worker.endpoint, "--budget", "RPC0=48MiB", "--ctx", "4096", "-np", "1",
                                "--host-weights", mode], llama_bin_dir)
    assert plan["host_weights"] == mode and plan["host_expert_layers"]
    ot = plan["argv"].index("-ot")
    assert plan["argv"][ot + 2:ot + 2 + len(FLAGS[mode])] == FLAGS[mode]
    run = run_llama_server(llama_bin_dir, plan["argv"], prompt=[7] * 512)  # a whole ubatch uses the host's experts
    assert run.served, "\n".join(run.lines[-30:])
    buffers, load_mode = EXPECTED[mode]
    if not repacks_q4_0():
        buffers = buffers - {"CPU_REPACK"}
    assert set(host_buffers(run.lines)) == buffers
    assert any(f"(load_mode = {load_mode})" in line for line in run.lines)
    # exact: repacked copies are the file's bytes, and the mapping holds token_embd alone (the experts repack)
    seen = buffer_sums(list(parse_events(run.lines)), [worker.endpoint])
    assert abs(seen[(HOST_BUFFERS, "model")] - plan["host"]["weights_bytes"]) <= 0.02 * MIB


@pytest.mark.llama
@pytest.mark.parametrize("mode", MODES)
def test_layers_spilled_to_the_host_load_as_the_mode_says_and_verify_holds(
        mode: str, tmp_path: Path, llama_bin_dir: Path, rpc_workers: Callable[..., RpcWorker]) -> None:
    """The host's layers: a mapped buffer prints the file range it maps (here 2.79 MiB, the repacked matrices
    between token_embd and the last norm included), so --verify measures such plans loaded (-lm none)."""
    model = write_preset(tmp_path / "dense.gguf", "tiny-llama", n_layer=8, n_embd=256, n_ff=512, n_vocab=2048)
    worker = rpc_workers()
    args = ["--rpc", worker.endpoint, "--budget", "RPC0=12MiB", "--ctx", "4096", "-np", "1", "--cpu-spill",
            "--host-weights", mode]
    plan = plan_json(model, args, llama_bin_dir)
    assert 0 < plan["n_gpu_layers"] < plan["model"]["n_slots"] and plan["host_weights"] == mode
    assert plan["argv"][-2 - len(FLAGS[mode]):-2] == FLAGS[mode]
    run = run_llama_server(llama_bin_dir, plan["argv"], prompt=[7] * 64)
    assert run.served, "\n".join(run.lines[-30:])
    buffers, load_mode = EXPECTED[mode]
    assert set(host_buffers(run.lines)) == (buffers if repacks_q4_0() else buffers - {"CPU_REPACK"})
    assert any(f"(load_mode = {load_mode})" in line for line in run.lines)
    verified = run_cli("plan", str(model), *args, "--verify", "--json", "--llama-server",
                       str(llama_bin_dir / "llama-server"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    rows = json.loads(verified.stdout)["verify"]
    host = next(row for row in rows if (row["device"], row["component"]) == ("host", "weights"))
    assert host["planned_bytes"] == plan["host"]["weights_bytes"] and host["within_tolerance"], host


@pytest.mark.llama
def test_a_load_mode_after_the_separator_is_refused_unless_forced(
        moe_path: Path, serve: Callable[..., ServeRun], rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    args = ("--rpc", worker.endpoint, "--budget", "RPC0=48MiB", "--ctx", "4096", "-np", "1", "--host-weights", "pinned")
    refused = serve(moe_path, *args, extra=["-lm", "mmap"])
    assert refused.wait_exit() == 2
    assert refused.stderr == ["error: -lm after -- would contradict the plan (use llamalaunch's own options "
                              "(--host-weights auto, pinned, mapped or repacked) or add --force)"], refused.output
    assert not refused.servers_seen

    forced = serve(moe_path, *args, "--force", extra=["-lm", "mmap"])
    forced.wait_ready(120)
    argv = forced.server().cmdline()
    assert argv[argv.index("-lm") + 1] == "none" and argv[-2:] == ["-lm", "mmap"]  # the last one is llama.cpp's
    assert "(load_mode = mmap)" in forced.log_path.read_text()
    assert "--force: -lm after -- override the plan: llama-server may place and size things unlike the plan and " \
        "status show" in forced.output
    forced.send(signal.SIGTERM)
    assert forced.wait_exit() == 128 + signal.SIGTERM


@pytest.mark.parametrize(("extra", "message"), [
    (["--mlock"], "--mlock after -- would contradict the plan (use llamalaunch's own options (--host-weights "
                  "auto, pinned, mapped or repacked) or add --force)"),
    (["--load-mode=mmap", "-ngl", "3"], "--load-mode, -ngl after -- would contradict the plan (use llamalaunch's own "
                                        "options (-ngl before --; --host-weights auto, pinned, mapped or "
                                        "repacked) or add --force)"),
])
def test_load_flags_are_planned_flags_named_with_their_option(extra: list[str], message: str) -> None:
    with pytest.raises(BadInputError) as refused:
        check_extra_args(extra, force=False)
    assert str(refused.value) == message
    check_extra_args(extra, force=True)



@pytest.mark.parametrize(("request_args", "lever"), [
    ({}, "-ub 2048 streams them 4x less often"),
    ({"host_weights": "mapped", "n_ubatch": 1024}, "-ub 2048 streams them 2x less often"),
    ({"n_batch": 512}, "once per ubatch: -b 2048 -ub 2048 streams them 4x less often"),
    ({"n_ubatch": 2048}, None),  # already
    ({"host_weights": "repacked"}, None),  # never streamed
])
def test_a_streaming_plan_names_the_ubatch_lever(moe: ModelProfile, request_args: dict, lever: str | None) -> None:
    plan = make_plan(moe, [cuda(0, 10 * GIB)], Request(ctx_tokens=16384, **request_args), OPTIONS)
    streaming = [note for note in plan.notes if note.startswith("prompts stream the host's weights")]
    assert [lever in note for note in streaming] == ([True] if lever else [])
    workers = make_plan(moe, [rpc(0, 10 * GIB, "127.0.0.1:1")], Request(ctx_tokens=16384, **request_args), OPTIONS)
    assert not any(note.startswith("prompts stream") for note in workers.notes)  # workers stream nothing
