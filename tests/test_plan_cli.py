"""`llamalaunch plan` as a user runs it: the table, the JSON schema, --verify against a real load."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import RpcWorker

SCHEMA_DEVICE_KEYS = {"name", "backend", "free_bytes", "total_bytes", "excluded", "reason", "n_layers", "first_slot",
                      "weights_bytes", "kv_bytes", "compute_bytes", "reserved_bytes", "planned_bytes",
                      "headroom_bytes"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "150"})


def test_json_keeps_the_documented_schema(demo_model: Path) -> None:
    result = run_cli("plan", str(demo_model), "--assume", "CUDA0=24GiB", "--assume", "CUDA1=100MiB", "--ctx", "8k",
                     "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == 1
    assert {"path", "arch", "n_layer", "n_slots"} <= set(data["model"])
    assert data["ctx"] == 8192
    assert [d["name"] for d in data["devices"]] == ["CUDA0", "CUDA1"]
    for device in data["devices"]:
        assert SCHEMA_DEVICE_KEYS <= set(device)
    small = data["devices"][1]
    assert small["excluded"] and small["reason"].startswith("cannot hold one layer")
    assert {"weights_bytes", "kv_bytes", "compute_bytes"} <= set(data["host"])
    assert data["argv"][:2] == ["-m", str(demo_model)]
    # the host's memory as the planner checked it, like a device's free and spare
    host = json.loads(run_cli("plan", str(demo_model), "--assume", "CUDA0=24GiB", "--assume", "CPU=16GiB", "--ctx",
                              "8k", "--json").stdout)["host"]
    used = host["weights_bytes"] + host["kv_bytes"] + host["compute_bytes"]
    assert host["free_bytes"] == 16 * 1024 ** 3 and host["spare_bytes"] == host["free_bytes"] - used


def test_table_names_devices_layers_and_the_command_line(demo_model: Path) -> None:
    result = run_cli("plan", str(demo_model), "--assume", "CUDA0=24GiB", "--ctx", "4k")
    assert result.returncode == 0, result.stderr
    assert "ctx 4096  layers on devices 31/31" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line != line.rstrip()]  # piped: no padded lines
    assert "│ CUDA0  │ 24.00 GiB │ 0-30  │     31 │" in result.stdout
    assert "-c 4096 -ngl 31" in result.stdout


@pytest.mark.llama
def test_verify_compares_the_plan_with_a_real_load(demo_model: Path, llama_bin_dir: Path,
                                                   rpc_workers: Callable[..., RpcWorker]) -> None:
    workers = [rpc_workers(), rpc_workers()]
    result = run_cli("plan", str(demo_model), "--ctx", "6k", "--rpc", ",".join(w.endpoint for w in workers),
                     "--budget", "RPC0=150MiB", "--budget", "RPC1=300MiB", "--verify",
                     "--llama-server", str(llama_bin_dir / "llama-server"))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("│ RPC", "│ host"))]
    verify_rows = [row for row in rows if "weights" in row or " kv " in row or "compute" in row]
    assert len(verify_rows) == 9
    assert all(row.rstrip(" │").endswith("yes") for row in verify_rows), "\n".join(verify_rows)
    as_json = run_cli("plan", str(demo_model), "--ctx", "6k", "--rpc", ",".join(w.endpoint for w in workers),
                      "--budget", "RPC0=150MiB", "--budget", "RPC1=300MiB", "--verify", "--json",
                      "--llama-server", str(llama_bin_dir / "llama-server"))
    checked = json.loads(as_json.stdout)["verify"]
    assert len(checked) == 9 and all(row["within_tolerance"] for row in checked)


def test_an_inventory_file_plans_like_the_same_assume_options(demo_model: Path, tmp_path: Path) -> None:
    inventory = tmp_path / "box.txt"
    inventory.write_text("# the seed's box\nCUDA0=24GiB\nCUDA1=6GiB  # the small card\nCPU=16GiB\n")
    from_file = run_cli("plan", str(demo_model), "--inventory", str(inventory), "--ctx", "8k", "--json")
    typed = run_cli("plan", str(demo_model), "--assume", "CUDA0=24GiB", "--assume", "CUDA1=6GiB", "--assume",
                    "CPU=16GiB", "--ctx", "8k", "--json")  # the host's too: its free memory is in the plan
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout) == json.loads(typed.stdout)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    refused = run_cli("plan", str(demo_model), "--inventory", str(empty))
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: the inventory") and "names no device" in refused.stderr


def test_an_unknown_architecture_is_named_unless_a_generic_estimate_is_asked_for(tmp_path: Path) -> None:
    from tests.synthetic import write_preset
    from tests.test_gguf_header import rewrite_gguf

    model = rewrite_gguf(write_preset(tmp_path / "m.gguf", "tiny-llama"), tmp_path / "x", 1, arch="frobnicator")[0]
    refused = run_cli("plan", str(model), "--assume", "CUDA0=2GiB")
    assert refused.returncode == 2
    assert "'frobnicator' is not supported" in refused.stderr and "Traceback" not in refused.stderr
    assert "--generic-arch gives a generic estimate" in refused.stderr  # the flag that exists
    generic = run_cli("plan", str(model), "--assume", "CUDA0=2GiB", "--ctx", "2k", "--generic-arch", "--json")
    assert generic.returncode == 0, generic.stderr
    assert any("generic, conservative estimate" in note for note in json.loads(generic.stdout)["notes"])


def test_a_plan_beyond_host_memory_is_refused_with_the_numbers(tmp_path: Path) -> None:
    """CPU only: weights, KV cache and buffers all in host RAM. A 70B whose weights alone exceed it is refused
    (no context helps); an 8B gets the largest context its RAM holds under --ctx max, and a --ctx beyond it is
    refused naming that context. Before, each planned the whole context with a note and llama-server was
    OOM-killed."""
    from tests.synthetic import write_preset

    big = write_preset(tmp_path / "70b.gguf", "llama-70b")
    refused = run_cli("plan", str(big), "--assume", "CPU=8GiB", "--ctx", "32k", "--json")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: synthetic llama 80x8192 at ctx 32768 needs 47.22 GiB of host memory")
    assert "(weights 36.97 GiB, KV cache 10.00 GiB, buffers 264.0 MiB); 8.00 GiB is available (the weights " \
           "alone do not fit: add devices, free host memory, or use a smaller quantization)" in refused.stderr
    small = write_preset(tmp_path / "8b.gguf", "llama-8b")
    fitted = run_cli("plan", str(small), "--assume", "CPU=8GiB", "--json")
    assert fitted.returncode == 0, fitted.stderr
    plan = json.loads(fitted.stdout)
    assert 256 <= plan["ctx"] < 131072
    assert not any(note.startswith("host: the plan needs") for note in plan["notes"])
    beyond = run_cli("plan", str(small), "--assume", "CPU=8GiB", "--ctx", "128k")
    assert beyond.returncode == 1
    assert f"the largest context that fits is {plan['ctx']}: use --ctx {plan['ctx']} or --ctx max" in beyond.stderr


def test_a_model_without_a_trained_context_needs_a_ctx(tmp_path: Path) -> None:
    """context_length 0: --ctx max planned 256 tokens without a word; now it asks for --ctx."""
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "no-ctx.gguf", "llama-8b", n_ctx_train=0)
    refused = run_cli("plan", str(model), "--assume", "CUDA0=24GiB")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: synthetic llama 32x4096 does not say the context it was trained for "
                                      "(llama.context_length is 0 or missing), so --ctx max has no ceiling "
                                      "(give --ctx N)")
    given = run_cli("plan", str(model), "--assume", "CUDA0=24GiB", "--ctx", "4k", "--json")
    assert given.returncode == 0 and json.loads(given.stdout)["ctx"] == 4096


@pytest.mark.llama
def test_verify_names_the_devices_of_a_worker_that_exposes_two(demo_model: Path, llama_bin_dir: Path,
                                                             rpc_workers: Callable[..., RpcWorker]) -> None:
    workers = [rpc_workers(devices="CPU,CPU"), rpc_workers()]
    result = run_cli("plan", str(demo_model), "--ctx", "4k", "--rpc", ",".join(w.endpoint for w in workers),
                     "--budget", "RPC0=150MiB", "--budget", "RPC1=150MiB", "--budget", "RPC2=200MiB", "--verify",
                     "--json", "--llama-server", str(llama_bin_dir / "llama-server"))
    assert result.returncode == 0, result.stderr
    checked = json.loads(result.stdout)["verify"]
    assert {row["device"] for row in checked} == {"RPC0", "RPC1", "RPC2", "host"}
    assert all(row["within_tolerance"] for row in checked), checked


def test_does_not_fit_names_what_took_the_memory(demo_model: Path) -> None:
    """A 300 MiB card: the default CUDA overhead takes it all; --ctx max names no context it never asked for."""
    refused = run_cli("plan", str(demo_model), "--assume", "CUDA0=300MiB")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        "error: Smollm2 135M 8k Lc100K Mix1 Ep2 at any context down to --ctx-min 256 (--ctx max) does not fit on "
        "CUDA0: 300.0 MiB free - 640.0 MiB CUDA overhead (--overhead) - 15.0 MiB margin (--margin) = nothing left "
        "(no layer fits even at the smallest context: free memory, add devices, or lower --overhead or --margin)\n")
    fits = run_cli("plan", str(demo_model), "--assume", "CUDA0=300MiB", "--overhead", "CUDA=100MiB", "--json")
    assert fits.returncode == 0, fits.stderr


def test_the_plan_says_when_it_does_other_than_asked(demo_model: Path) -> None:
    """--ctx 8193 runs as 8448, past the demo model's 8192 trained tokens: both said, in the table and the JSON."""
    args = ("plan", str(demo_model), "--assume", "CUDA0=24GiB", "--ctx", "8193", "--budget", "CUDA0=32GiB")
    notes = ["--ctx 8193 becomes 8448: llama.cpp sizes the context in steps of 256",
             "ctx 8448 is beyond the 8192 tokens the model was trained on: llama-server uses 8448, but output past "
             "8192 tokens may degrade",
             "--budget CUDA0=32.00 GiB is above its 24.00 GiB free: the plan uses at most the free memory"]
    as_json = run_cli(*args, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["notes"] == notes
    table = run_cli(*args)
    assert table.returncode == 0, table.stderr
    for note in notes:
        assert note in table.stdout


def test_ctx_max_says_when_the_trained_context_stopped_it(demo_model: Path) -> None:
    """24 GiB holds far more than the demo model's 8192 trained tokens: --ctx max says the ceiling was the model's."""
    plan = json.loads(run_cli("plan", str(demo_model), "--assume", "CUDA0=24GiB", "--ctx", "max", "--json").stdout)
    assert plan["ctx"] == 8192
    assert "--ctx max stops at the 8192 tokens the model was trained on, not at the memory: --ctx N plans a larger " \
        "one (output past the trained length may degrade)" in plan["notes"]
    small = json.loads(run_cli("plan", str(demo_model), "--assume", "CUDA0=850MiB", "--ctx", "max", "--json").stdout)
    assert small["ctx"] < 8192 and not any(note.startswith("--ctx max stops") for note in small["notes"])


def test_what_if_workers_that_do_not_match_rpc_say_that_rpc_is_left_out(demo_model: Path) -> None:
    """--assume RPC0/RPC1 with one --rpc worker: the command line cannot name them, and the plan says so (the
    note used to be dropped, and --rpc silently went missing from the command line)."""
    done = run_cli("plan", str(demo_model), "--assume", "RPC0=1GiB", "--assume", "RPC1=1GiB",
                   "--rpc", "127.0.0.1:50052")
    assert done.returncode == 0, done.stderr
    assert "--rpc" not in done.stdout
    assert done.stderr == ("note: --rpc lists 1 worker(s) but --assume gives RPC0, RPC1: the command line leaves "
                           "--rpc out (assume RPC0, one device per worker in --rpc order, to match them)\n")
    matched = run_cli("plan", str(demo_model), "--assume", "RPC0=1GiB", "--rpc", "127.0.0.1:50052")
    assert (matched.returncode, matched.stderr) == (0, "")
    assert "--rpc 127.0.0.1:50052" in matched.stdout
    unnamed = run_cli("plan", str(demo_model), "--assume", "RPC0=100MiB", "--assume", "CUDA0=8GiB", "--ctx", "2k")
    assert unnamed.returncode == 0 and "--rpc" not in unnamed.stdout and "-ts " in unnamed.stdout
    assert unnamed.stderr == ("note: --assume gives RPC0 but no --rpc names their worker: the command line leaves "
                              "--rpc out (add --rpc HOST:PORT for each, in order)\n")


def test_a_what_if_gpu_numbered_past_0_gets_its_dev(demo_model: Path) -> None:
    """--assume CUDA1 alone: llama-server would offload to the machine's CUDA0 too without -dev CUDA1."""
    alone = json.loads(run_cli("plan", str(demo_model), "--assume", "CUDA1=8GiB", "--ctx", "2k", "--json").stdout)
    assert alone["argv"][alone["argv"].index("-dev") + 1] == "CUDA1"
    both = json.loads(run_cli("plan", str(demo_model), "--assume", "CUDA0=8GiB", "--assume", "CUDA1=8GiB", "--ctx",
                              "2k", "--json").stdout)
    assert "-dev" not in both["argv"]


def test_dev_reads_names_as_llama_cpp_does(demo_model: Path) -> None:
    """-dev none (the CPU, as llama.cpp reads it and as our own CPU-only argv writes it) and cuda0 for CUDA0 plan;
    a device both listed by -dev and left out by --exclude is named as the clash it is."""
    base = ("plan", str(demo_model), "--assume", "CUDA0=8GiB", "--ctx", "2k", "--json")
    none = json.loads(run_cli(*base, "-dev", "none").stdout)
    assert none["n_gpu_layers"] == 0 and none["argv"][none["argv"].index("-dev") + 1] == "none"
    lower = json.loads(run_cli(*base, "-dev", "cuda0").stdout)
    assert lower["n_gpu_layers"] > 0 and [d["name"] for d in lower["devices"] if not d["excluded"]] == ["CUDA0"]
    assert json.loads(run_cli(*base, "--exclude", "cuda0").stdout)["n_gpu_layers"] == 0
    clash = run_cli(*base[:-1], "-dev", "CUDA0", "--exclude", "CUDA0")
    assert (clash.returncode, clash.stdout, clash.stderr) == (
        2, "", "error: -dev lists CUDA0, which --exclude leaves out (drop it from -dev or from --exclude)\n")


@pytest.mark.llama
def test_verify_of_a_cpu_only_plan_measures_what_the_host_holds(tmp_path: Path, llama_bin_dir: Path) -> None:
    """Mapped, a host buffer prints the file range it maps, padding between tensors included: the project's own
    tiny model read 0.2 MiB against 0.1 planned, NO, exit 1. --verify loads such plans (-lm none) as it does
    --host-weights mapped ones."""
    from tests.synthetic import write_preset

    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    done = run_cli("plan", str(model), "--verify", "--json", "--llama-server", str(llama_bin_dir / "llama-server"))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(done.stdout)["verify"]
    assert {row["component"] for row in rows if row["device"] == "host"} == {"weights", "kv", "compute"}
