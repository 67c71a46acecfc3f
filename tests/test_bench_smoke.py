"""The CPU benchmarks run end to end with their smallest settings (`--quick`), so they do not rot.

Real llama.cpp processes, tiny synthetic models; the figures are not checked, only that each script
measures every side it compares and writes its JSON and table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import (
    bench_capacity_cpu,
    bench_capacity_gpu,
    bench_launch,
    bench_plan_speed,
    bench_speed_gpu,
    host_pages,
)
from tests.support import RpcWorker

pytestmark = pytest.mark.llama


def written(out: Path, stem: str) -> dict:
    assert (out / f"{stem}.txt").read_text().strip()
    return dict(json.loads((out / f"{stem}.json").read_text()))


def test_plan_speed_times_ours_and_fit_params(llama_bin_dir: Path, tmp_path: Path) -> None:
    assert bench_plan_speed.main(["--quick", "--runs", "1", "--bin-dir", str(llama_bin_dir),
                                  "--out", str(tmp_path)]) == 0
    real, what_if = written(tmp_path, "plan_speed")["cases"]
    assert all(real["median_s"][key] > 0 for key in ("in_process_s", "planner_s", "cli_s", "fit_params_s"))
    assert real["fit_params"]["printed"].startswith("-c ") and real["ratio_fit_params_over_cli"] > 0
    assert what_if["assume"] and what_if["ratio_fit_params_over_cli"] is None
    assert real["ours"]["ctx"] >= 256 and what_if["ours"]["ctx"] >= 256


def test_launch_times_serve_against_bare_llama_server(llama_bin_dir: Path, tmp_path: Path) -> None:
    assert bench_launch.main(["--quick", "--runs", "1", "--bin-dir", str(llama_bin_dir),
                              "--out", str(tmp_path)]) == 0
    (model,) = written(tmp_path, "launch")["models"]
    median = model["median"]
    assert median["bare_s"] > 0 and median["serve_s"] > 0 and median["ratio_serve_over_bare"] > 0
    assert all(value is not None and value >= 0 for value in median["serve_phases_s"].values())
    assert model["argv"][model["argv"].index("-c") + 1] == "4096"


def test_capacity_cpu_loads_ours_fit_and_bisects(llama_bin_dir: Path, tmp_path: Path) -> None:
    assert bench_capacity_cpu.main(["--quick", "--bin-dir", str(llama_bin_dir), "--out", str(tmp_path),
                                    "--logs", str(tmp_path / "logs")]) == 0
    (config,) = written(tmp_path, "capacity")["configs"]
    loads = {load["label"]: load for load in config["loads"]}
    assert loads["ours"]["ok"] and loads["ours"]["ctx"] >= 256
    # --fit sees host RAM as the worker's free memory: it takes the whole trained context and fails
    assert loads["fit"]["ctx"] == bench_capacity_cpu.MODEL_SHAPE["n_ctx_train"] and not loads["fit"]["ok"]
    assert config["checks"] and config["true_ctx"] >= loads["ours"]["ctx"]


def test_first_serve_capacity_runs_on_rpc_workers(llama_bin_dir: Path, tmp_path: Path,
                                                  rpc_workers: Callable[..., RpcWorker]) -> None:
    """bench/gpu/7-capacity-first-serve.sh's benchmark, on a CPU worker with tiny shapes: each case plans in
    a new home with the default assumed, then calibrates on first sight, loads and fills both, and finds
    the true maximum."""
    cases = ["gqa", "qkv", "moe"]
    assert bench_capacity_gpu.main(["--first-serve", "--quick", "--server", str(llama_bin_dir / "llama-server"),
                                    "--out", str(tmp_path), "--logs", str(tmp_path / "logs"),
                                    "--rpc", rpc_workers().endpoint, "--cases", *cases]) == 0
    records = json.loads((tmp_path / "first_serve.json").read_text())
    assert [r["case"] for r in records] == cases
    for record in records:
        assert record["assumed"]["ok"] and record["first"]["ok"], record
        assert record["assumed"]["overhead_sources"] == {"RPC0": "assumed"}
        assert record["first"]["overhead_sources"]["RPC0"].startswith("measured ")
        assert any(note.startswith("RPC0: overhead calibrated:") for note in record["first"]["notes"])
        assert record["calibrated_same_ctx"] and record["true_ctx"] >= record["first"]["ctx"]
    table = (tmp_path / "first_serve.txt").read_text()
    assert "failed loads or fills: 0" in table


def test_speed_proof_runs_on_rpc_workers(llama_bin_dir: Path, tmp_path: Path) -> None:
    """bench/gpu/9-speed.sh's benchmark with --cpu: each configuration planned uncalibrated, measured, folded
    into the shared and the other configurations' leave-one-out homes as serve does, planned again in both."""
    configs = ["dense-partial", "moe-spill", "rpc-same-gpu"]
    assert bench_speed_gpu.main(["--cpu", "--server", str(llama_bin_dir / "llama-server"), "--out", str(tmp_path),
                                 "--work", str(tmp_path / "work"), "--configs", *configs]) == 0
    records = written(tmp_path, "speed")["configs"]
    assert [r["config"] for r in records] == configs
    for record in records:
        assert record["measured"]["gen_tps"] > 0 and record["measured"]["prompt_tps"] > 0, record
        assert record["before"]["gen_tps"] > 0 and record["before"]["calibrated"] == []
        # what the estimate is made of, so a wrong one can be traced (the host's figures above all)
        assert record["before"]["figures"]["host"]["bandwidth_bytes_s"] > 0 and record["before"]["estimate"]["parts"]
        prompt = record["setting"]["prompt_tokens"]  # serve's own reading of the log agrees on what was served
        assert record["served"]["mean_prompt"] == prompt and abs(record["served"]["mean_fill"] - (prompt + 64)) <= 1
        assert record["served"]["gen_tps"] > 0
        assert set(record["recorded"]) == {"shared", *(f"loo-{c}" for c in configs if c != record["config"])}
        after, loo = record["pass2"]["after"], record["pass2"]["loo"]
        # the same argv is recorded, not required: a calibrated speed may rightly choose another split
        assert after["gen_tps"] > 0 and after["calibrated"] and record["pass2"]["after_same_argv"] in (True, False)
        assert loo["gen_tps"] > 0 and loo["calibrated"]
    partial, moe, two = records
    assert partial["before_plan"]["devices"]["RPC0"] < 9 and moe["before_plan"]["host_expert_layers"] > 0
    assert set(two["before_plan"]["devices"]) == {"RPC0", "RPC1"} and all(two["before_plan"]["devices"].values())
    keys = set(partial["recorded"]["shared"])  # an RPC device's key names its worker's endpoint
    assert "CPU:host" in keys and any(key.startswith("RPC:") for key in keys)
    table = (tmp_path / "speed.txt").read_text()
    assert "generation: before " in table and "leave-one-out" in table


def test_host_pages_reads_both_page_sizes(tmp_path: Path) -> None:
    assert host_pages.main(["--gib", "0.25", "--out", str(tmp_path / "pages.json")]) == 0
    result = json.loads((tmp_path / "pages.json").read_text())
    assert result["gbps_4k"] > 0 and result["gbps_2m"] > 0 and result["huge_mib_4k_mapping"] == 0
