"""--mmproj and --draft: reserved on the device they are pinned to, and passed to llama-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.units import MIB
from tests.support import RpcWorker, run_llama_server


def plan_json(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", *args, "--json"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def plan_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamalaunch", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def write_projector(path: Path, size_bytes: int = 8 * MIB) -> Path:
    """A header-only multimodal projector as llama.cpp's converters write one (GGUFWriter, arch "clip"), its
    tensor data a sparse hole up to `size_bytes`."""
    import numpy
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_tensor("mm.0.weight", numpy.zeros((256, 256), dtype=numpy.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.truncate(path, size_bytes)
    return path


def test_mmproj_is_reserved_on_the_first_device_and_pinned_there(demo_model: Path, tmp_path: Path) -> None:
    projector = write_projector(tmp_path / "mmproj.gguf")
    plan = plan_json(str(demo_model), "--assume", "CUDA0=2GiB", "--assume", "CUDA1=2GiB", "--ctx", "4k",
                     "--mmproj", str(projector))
    first = plan["devices"][0] if plan["devices"][0]["name"] == "CUDA0" else plan["devices"][1]
    assert first["name"] == "CUDA0"
    assert first["reserved_bytes"] == 8 * MIB + 256 * MIB
    argv = plan["argv"]
    assert argv[argv.index("--mmproj") + 1:argv.index("--mmproj") + 4] == [str(projector), "-mmdev", "CUDA0"]
    assert any(note.startswith(f"mmproj {projector}: 264.0 MiB reserved on CUDA0") for note in plan["notes"])


def test_a_missing_companion_file_is_one_line(demo_model: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", str(demo_model), "--assume", "CUDA0=2GiB",
                             "--draft", "/nonexistent/draft.gguf"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --draft /nonexistent/draft.gguf: No such file or directory")


@pytest.mark.parametrize("option", ["--mmproj", "--draft"])
def test_a_companion_that_is_not_gguf_is_one_line(demo_model: Path, tmp_path: Path, option: str) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a projector\n")
    for where in ("CUDA0=2GiB", "CPU=8GiB"):  # also where no device gets the companion
        result = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", str(demo_model), "--assume", where,
                                 option, str(notes)], capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (f"error: {option} {notes} is not a GGUF file (it starts with b'my n') (give "
                                 f"{option} the .gguf file llama.cpp loads)\n")


NO_DEVICE = {"cpu-only": ["--assume", "CPU=8GiB"], "all-excluded": ["--assume", "CUDA0=8GiB", "--exclude", "CUDA0"],
             "dev-none": ["--assume", "CUDA0=8GiB", "-dev", "none"]}


@pytest.mark.parametrize("where", NO_DEVICE.values(), ids=NO_DEVICE.keys())
def test_companions_of_a_plan_without_devices_stay_in_host_memory(tmp_path: Path, where: list[str]) -> None:
    """llama-server still gets them, told not to offload them (llama.cpp's `none`), and the plan says so."""
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    draft = write_preset(tmp_path / "draft.gguf", "tiny-llama", n_layer=2)
    projector = write_projector(tmp_path / "mmproj.gguf")
    plan = plan_json(str(model), *where, "--ctx", "2k", "--mmproj", str(projector), "--draft", str(draft))
    argv = plan["argv"]
    assert argv[argv.index("--mmproj"):argv.index("--mmproj") + 4] == ["--mmproj", str(projector), "-mmdev", "none"]
    assert argv[argv.index("-md"):argv.index("-md") + 6] == ["-md", str(draft), "-devd", "none", "-ngld", "0"]
    assert argv[-2:] == ["--fit", "off"]
    assert f"mmproj {projector}: 264.0 MiB reserved in host memory (estimate)" in plan["notes"]
    assert any(note.startswith(f"draft {draft}: ") and note.endswith(" reserved in host memory (estimate)")
               for note in plan["notes"])


def test_companions_in_host_memory_count_against_it(tmp_path: Path) -> None:
    """A host with room for the model alone refuses it with a projector beside it, and says what that took."""
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    projector = write_projector(tmp_path / "mmproj.gguf")
    assert plan_json(str(model), "--assume", "CPU=200MiB", "--ctx", "2k")["ctx"] == 2048
    result = plan_fails(str(model), "--assume", "CPU=200MiB", "--ctx", "2k", "--mmproj", str(projector))
    assert (result.returncode, result.stdout) == (1, "")
    assert "of host memory for what does not fit on the devices" in result.stderr
    assert f"is available, after 264.0 MiB of host memory for --mmproj {projector} (" in result.stderr


def test_a_truncated_mmproj_is_refused_as_a_truncated_draft_is(tmp_path: Path) -> None:
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(model.read_bytes()[:1000])
    for option in ("--mmproj", "--draft"):
        for where in ("CUDA0=2GiB", "CPU=8GiB"):
            result = plan_fails(str(model), "--assume", where, option, str(bad))
            assert (result.returncode, result.stdout) == (2, "")
            assert result.stderr.startswith(f"error: {bad}: truncated header: ")
            assert result.stderr.endswith("(the file is damaged or not a GGUF model; download it again)\n")
            assert result.stderr.count("\n") == 1


def test_a_language_model_given_as_mmproj_is_one_line(tmp_path: Path) -> None:
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    for where in ("CUDA0=2GiB", "CPU=8GiB"):
        result = plan_fails(str(model), "--assume", where, "--mmproj", str(model))
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (f"error: --mmproj {model} is not a multimodal projector (its general.architecture "
                                 "is 'llama'; a projector's is 'clip') (give --mmproj the mmproj .gguf file made for "
                                 "this model)\n")


@pytest.mark.llama
def test_a_draft_in_host_memory_loads_and_serves(demo_model: Path, llama_bin_dir: Path) -> None:
    plan = plan_json(str(demo_model), "--assume", "CPU=8GiB", "--ctx", "2k", "--draft", str(demo_model),
                     "--llama-server", str(llama_bin_dir / "llama-server"))
    argv = plan["argv"]
    assert argv[argv.index("-md"):argv.index("-md") + 6] == ["-md", str(demo_model), "-devd", "none", "-ngld", "0"]
    run = run_llama_server(llama_bin_dir, argv)
    assert run.served, "\n".join(run.lines[-20:])
    assert any("loading draft model" in line for line in run.lines)


@pytest.mark.llama
def test_draft_loads_where_planned_and_serves(demo_model: Path, llama_bin_dir: Path,
                                              rpc_workers: Callable[..., RpcWorker]) -> None:
    workers = [rpc_workers(), rpc_workers()]
    plan = plan_json(str(demo_model), "--rpc", ",".join(w.endpoint for w in workers), "--ctx", "2k",
                     "--budget", "RPC0=600MiB", "--budget", "RPC1=600MiB", "--draft", str(demo_model),
                     "--llama-server", str(llama_bin_dir / "llama-server"))
    argv = plan["argv"]
    assert argv[argv.index("-devd") + 1] == "RPC0"
    draft = next(n for n in plan["notes"] if n.startswith("draft"))
    assert "reserved on RPC0" in draft
    run = run_llama_server(llama_bin_dir, argv)
    assert run.served, "\n".join(run.lines[-20:])
    assert any("draft" in line.lower() for line in run.lines)


def test_a_companion_keeps_its_worker_on_the_rpc_list_when_no_layer_went_there(demo_model: Path) -> None:
    """Otherwise llama.cpp renumbers the workers and -devd would name another one."""
    from llamalaunch.model.load import load_profile
    from llamalaunch.plan.argv import ArgvOptions
    from llamalaunch.plan.companions import Companion
    from llamalaunch.plan.planner import make_plan
    from llamalaunch.plan.request import Request
    from llamalaunch.probe.device import Device

    small = Device("RPC0", "RPC", "a", 60 * MIB, 60 * MIB, 0, endpoint="10.0.0.5:50052", worker_index=0)
    large = Device("RPC1", "RPC", "b", 8192 * MIB, 8192 * MIB, 1, endpoint="10.0.0.6:50052", worker_index=0)
    draft = Companion("draft", "d.gguf", 40 * MIB, "-md", "-devd", ("-ngld", "31"))
    request = Request(ctx_tokens=2048, reserve_bytes={"RPC0": 40 * MIB})
    plan = make_plan(load_profile(demo_model), [small, large], request,
                     ArgvOptions(str(demo_model), None, ((draft, "RPC0"),)))
    argv = list(plan.argv)
    assert next(p for p in plan.devices if p.device.name == "RPC0").excluded
    assert argv[argv.index("--rpc") + 1] == "10.0.0.5:50052,10.0.0.6:50052"
    assert argv[argv.index("-dev") + 1] == "RPC1"
    assert argv[argv.index("-devd") + 1] == "RPC0"


def test_ctx_max_with_a_draft_sizes_the_draft_for_the_context_it_gets(demo_model: Path, tmp_path: Path) -> None:
    """The draft shares -c: the largest context is the one where model and draft both fit, not less."""
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "8b.gguf", "llama-8b")
    common = (str(model), "--assume", "CUDA0=12GiB", "--draft", str(demo_model))
    best = plan_json(*common)
    assert best["ctx"] > 40000
    one_more = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", *common, "--ctx", str(best["ctx"] + 256)],
                              capture_output=True, text=True, timeout=120)
    assert one_more.returncode == 1 and "does not fit" in one_more.stderr


def test_serve_sizes_the_draft_for_the_context_it_gets_as_plan_does(demo_model: Path, tmp_path: Path) -> None:
    """serve's request shrinks to fit (ctx_is_target); the draft search must not let that hide a misfit."""
    from llamalaunch.plan.parse import build_request
    from llamalaunch.plan.pipeline import PlanInputs
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "8b.gguf", "llama-8b")

    def largest(ctx_is_target: bool) -> int:
        inputs = PlanInputs.gather(model=str(model), demo=False, llama_server=None, rpc=[],
                                   assume=["CUDA0=12GiB"], overhead=[], draft=str(demo_model),
                                   request=build_request(ctx="max", ctx_is_target=ctx_is_target))
        return inputs.plan().ctx_tokens

    assert largest(ctx_is_target=True) == largest(ctx_is_target=False) > 40000
