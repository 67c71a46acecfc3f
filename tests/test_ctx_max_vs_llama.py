"""`--ctx max` checked against llama.cpp at the context it picks, for the families whose KV is not linear
in the context: sliding-window layers (gemma2, gemma3) and hybrid recurrent models (lfm2, granitehybrid,
qwen3next, qwen35), on a real ggml-rpc-server worker (splits: test_plan_vs_llama.py). Budgets hold the largest context to a few
thousand tokens, well past the sliding window (n_swa 128 x 4 slots + ubatch 512 = 1024 cells)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.launch.logparse import ContextParam, parse_events
from llamalaunch.units import MIB
from tests.support import RpcWorker, run_llama_server
from tests.synthetic import write_preset
from tests.test_plan_vs_llama import assert_buffers_match, plan_json

pytestmark = pytest.mark.llama

FAMILIES = ("tiny-gemma2", "tiny-gemma3", "tiny-lfm2", "tiny-granitehybrid", "tiny-qwen3next", "tiny-qwen35")
TARGET_CTX = 3072


@pytest.mark.parametrize("family", FAMILIES)
def test_the_largest_context_allocates_what_the_plan_says(family: str, tmp_path: Path, llama_bin_dir: Path,
                                                          rpc_workers: Callable[..., RpcWorker]) -> None:
    model = write_preset(tmp_path / "m.gguf", family, n_layer=16, n_ctx_train=65536)
    common = ["--rpc", rpc_workers().endpoint, "--margin", "0"]
    sized = plan_json(model, [*common, "--ctx", str(TARGET_CTX)], llama_bin_dir)
    budgets = [f"--budget={d['name']}={d['planned_bytes'] + MIB // 2}B" for d in sized["devices"]]
    plan = plan_json(model, [*common, "--ctx", "max", *budgets], llama_bin_dir)
    assert TARGET_CTX <= plan["ctx"] < 65536, plan["ctx"]
    run = run_llama_server(llama_bin_dir, plan["argv"])
    assert run.served, "\n".join(run.lines[-30:])
    events = list(parse_events(run.lines))
    assert any(isinstance(e, ContextParam) and e.name == "n_ctx" and int(e.value) == plan["ctx"] for e in events)
    assert_buffers_match(plan, events)
