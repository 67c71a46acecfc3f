"""Host RAM bounds every plan that leaves weights on the host (plan/search.py): CPU spill, -ngl, --ctx max,
and the refusals name what is short and the lever that helps."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalaunch.errors import PlanError
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.units import GIB, MIB
from tests.synthetic import write_preset
from tests.test_planner import OPTIONS, cuda


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(str(write_preset(tmp_path_factory.mktemp("70b") / "70b.gguf", "llama-70b")))


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(str(write_preset(tmp_path_factory.mktemp("8b") / "8b.gguf", "llama-8b")))


def test_cpu_spill_keeps_the_most_layers_on_the_gpu_when_the_host_is_tight(llama_70b: ModelProfile) -> None:
    """Fewer layers on the GPU only add to the host: a bisection that checked the host at each step turned
    back at the first midpoint whose host share was too big and found nothing (reviewed: 47 of 81 fit both)."""
    plan = make_plan(llama_70b, [cuda(0, 24 * GIB)], Request(ctx_tokens=8192, cpu_spill=True), OPTIONS,
                     host_free_bytes=int(19.4 * GIB))
    assert plan.n_gpu_layers == 47
    assert plan.host.total_bytes <= int(19.4 * GIB)
    with pytest.raises(PlanError) as refused:  # the most layers the GPU holds still leave the host too much
        make_plan(llama_70b, [cuda(0, 24 * GIB)], Request(ctx_tokens=8192, cpu_spill=True), OPTIONS,
                  host_free_bytes=10 * GIB)
    assert "of host memory for what does not fit on the devices" in str(refused.value)


def test_ngl_0_is_refused_for_the_host_with_the_lever_named(llama_8b: ModelProfile) -> None:
    """-ngl 0 puts every layer on the host: the refusal counts them all (it read 0 as every layer on the GPU
    and proposed the very context that failed) and says -ngl helps."""
    with pytest.raises(PlanError) as refused:
        make_plan(llama_8b, [cuda(0, 24 * GIB)], Request(ctx_tokens=8192, n_gpu_layers=0), OPTIONS,
                  host_free_bytes=3 * GIB)
    message = str(refused.value)
    assert "the largest context that fits" not in message
    assert "(the weights alone do not fit: add devices, raise -ngl, free host memory, or use a smaller " \
           "quantization)" in message


def test_ctx_max_short_of_host_memory_says_the_host_not_the_gpu(llama_8b: ModelProfile) -> None:
    """The GPU holds the model at small contexts, the host has 200 MiB: the refusal is about the host at the
    smallest context, not "does not fit on CUDA0"."""
    with pytest.raises(PlanError) as refused:
        make_plan(llama_8b, [cuda(0, 5024 * MIB)], Request(ctx_tokens=None), OPTIONS, host_free_bytes=200 * MIB)
    message = str(refused.value)
    assert message.startswith("synthetic llama 32x4096 at ctx 256 needs ")
    assert "of host memory for what does not fit on the devices" in message and "does not fit on CUDA0" not in message


def test_a_draft_under_ctx_max_needs_the_trained_context_too(tmp_path: Path) -> None:
    from tests.test_plan_cli import run_cli

    model = write_preset(tmp_path / "no-ctx.gguf", "llama-8b", n_ctx_train=0)
    draft = write_preset(tmp_path / "draft.gguf", "llama-8b", n_layer=2)
    refused = run_cli("plan", str(model), "--assume", "CUDA0=24GiB", "--draft", str(draft))
    assert refused.returncode == 2 and "so --ctx max has no ceiling (give --ctx N)" in refused.stderr
