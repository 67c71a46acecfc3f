"""load_profile against what llama-server itself allocates, and its handling of shards and bad models."""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from llamalaunch.errors import ModelError
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.units import MIB
from tests.support import RpcWorker, free_port, stop_process
from tests.synthetic import SHAPES, write_preset

_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
# llama.cpp prints MiB with two decimals: a value within half a hundredth of a MiB prints the same.
MIB_PRINT_TOLERANCE = 0.01


@dataclass(frozen=True)
class ServedModel:
    log: str
    model_buffers_mib: dict[str, float]  # buffer name (`CPU_Mapped`, `RPC0[127.0.0.1:port]`) -> MiB
    completion: dict[str, object]


def serve_once(
    bin_dir: Path,
    model: Path,
    workers: Sequence[RpcWorker],
    tensor_split: str,
    log_path: Path,
    timeout_s: float = 60.0,
) -> ServedModel:
    """Start llama-server on the model across the workers, wait for /health, ask one token, stop it."""
    port = free_port()
    argv = [
        str(bin_dir / "llama-server"),
        "-m",
        str(model),
        "-ngl",
        "99",
        "--fit",
        "off",
        "-lv",
        "4",
        "-c",
        "512",
        "-t",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if workers:
        argv += ["--rpc", ",".join(w.endpoint for w in workers), "-ts", tensor_split]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
    try:
        _wait_healthy(process, port, timeout_s, log_path)
        completion = _post(port, "/completion", {"prompt": "hi", "n_predict": 1})
    finally:
        stop_process(process)
    text = log_path.read_text(errors="replace")
    buffers = {m.group(1): float(m.group(2)) for m in _BUFFER_LINE.finditer(text)}
    return ServedModel(text, buffers, completion)


def _wait_healthy(process: subprocess.Popen[bytes], port: int, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"llama-server exited with {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"llama-server not healthy after {timeout_s}s")


def _post(port: int, route: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def device_weight_bytes(profile: ModelProfile, tensor_split: Sequence[float]) -> list[int]:
    """Weights per device for -ngl all and -ts, by llama.cpp's rule: slot il goes to the first device
    whose cumulative share exceeds il / n_slots (llama-model.cpp get_layer_buft_list)."""
    total = sum(tensor_split)
    cumulative = []
    running = 0.0
    for share in tensor_split:
        running += share
        cumulative.append(running / total)
    per_device = [0] * len(tensor_split)
    holds_block = [False] * len(tensor_split)
    for slot, weights in enumerate(profile.slots):
        device = bisect.bisect_right(cumulative, slot / profile.n_slots)
        per_device[device] += weights.bytes
        holds_block[device] |= slot < profile.n_layer
    return [b + (profile.per_device_bytes if held else 0) for b, held in zip(per_device, holds_block)]


def assert_buffers_match(
    profile: ModelProfile, served: ServedModel, workers: Sequence[RpcWorker], tensor_split: Sequence[float]
) -> None:
    expected = device_weight_bytes(profile, tensor_split)
    for worker, expected_bytes in zip(workers, expected):
        name = next(n for n in served.model_buffers_mib if n.endswith(f"[{worker.endpoint}]"))
        assert served.model_buffers_mib[name] == pytest.approx(
            expected_bytes / MIB, abs=MIB_PRINT_TOLERANCE
        ), name
    host = served.model_buffers_mib["CPU_Mapped"]
    assert host == pytest.approx(profile.host_bytes / MIB, abs=MIB_PRINT_TOLERANCE)


@pytest.mark.llama
def test_demo_model_matches_llama_server(
    llama_bin_dir: Path, demo_model: Path, rpc_workers, tmp_path: Path
) -> None:
    profile = load_profile(demo_model)
    workers = [rpc_workers(), rpc_workers()]
    served = serve_once(llama_bin_dir, demo_model, workers, "1,3", tmp_path / "server.log")
    assert_buffers_match(profile, served, workers, (1, 3))
    assert served.completion["tokens_predicted"] == 1


def test_demo_model_profile(demo_model: Path) -> None:
    profile = load_profile(demo_model)
    assert (profile.arch, profile.n_layer, profile.n_slots, profile.n_vocab) == ("llama", 30, 31, 49152)
    assert (profile.n_embd, profile.n_ff, profile.n_ctx_train) == (576, 1536, 8192)
    assert profile.n_head == (9,) * 30 and profile.n_head_kv == (3,) * 30
    assert (profile.head_dim_k, profile.head_dim_v, profile.rope_dim) == (64, 64, 64)
    assert profile.file_type == "Q4_1" and profile.file_bytes == demo_model.stat().st_size
    # tied: the output slot holds output_norm and a copy of token_embd (Q8_0, 576 x 49152)
    assert profile.output_is_token_embd
    assert profile.host_bytes == 576 * 49152 // 32 * 34
    assert profile.slots[-1].bytes == profile.host_bytes + 576 * 4
    assert not any(profile.swa_layers) and not any(profile.recurrent_layers)
    assert not profile.generic_estimate


def test_load_profile_takes_milliseconds(demo_model: Path, tmp_path: Path) -> None:
    model_70b = write_preset(tmp_path / "llama-70b.gguf", "llama-70b")
    for path, budget_s in ((demo_model, 0.2), (model_70b, 0.2)):
        start = time.perf_counter()
        load_profile(path)
        assert time.perf_counter() - start < budget_s, path


def test_llama_70b_slot_bytes(tmp_path: Path) -> None:
    """Hand-computed Q4_0 sizes (18 bytes per 32 weights) of one 70B block and the output slot."""
    profile = load_profile(write_preset(tmp_path / "m.gguf", "llama-70b"))
    q4 = lambda ne0, ne1: ne0 * ne1 // 32 * 18
    block = 2 * 8192 * 4 + q4(8192, 8192) * 2 + q4(8192, 1024) * 2 + q4(8192, 28672) * 2 + q4(28672, 8192)
    assert profile.slots[0].bytes == block
    assert profile.slots[-1].bytes == q4(8192, 128256) + 8192 * 4
    assert profile.host_bytes == q4(8192, 128256)
    assert not profile.output_is_token_embd
    # CUDA: every ne0 here is a multiple of 512, so only the 128-byte alignment adds anything
    assert profile.slots[0].cuda_extra_bytes == 0


def test_cuda_padding_rule(tmp_path: Path) -> None:
    """ne0 = 576 (demo): each quantized matrix gets 512 - 576 % 512 = 448 more elements of one row."""
    profile = load_profile(
        write_preset(
            tmp_path / "m.gguf", "tiny-llama", n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, file_type="Q4_1"
        )
    )
    # per block: q, k, v, o, gate, up have ne0 = 576 -> +448 elements = 14 Q4_1 blocks = 280 bytes each;
    # down has ne0 = 1536 (a multiple of 512); norms are F32 and padded to 128 instead of 32.
    q4_1 = lambda ne0, ne1: ne0 * ne1 // 32 * 20
    matrices = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536)]
    cuda = sum(-(-(q4_1(*m) + 280) // 128) * 128 for m in matrices) + q4_1(1536, 576) + 2 * 2304
    assert profile.slots[0].bytes + profile.slots[0].cuda_extra_bytes == cuda


@pytest.mark.parametrize(
    "name, swa, recurrent",
    [
        ("tiny-gemma2", (True, False, True, False), (False,) * 4),
        ("tiny-gemma3", (True, True, True, True, True, False, True), (False,) * 7),
        ("tiny-mamba2", (False,) * 4, (True,) * 4),
        ("tiny-granitehybrid", (False,) * 4, (True, False, True, False)),
        ("tiny-lfm2", (False,) * 4, (True, False, True, False)),
    ],
)
def test_layer_patterns(
    tmp_path: Path, name: str, swa: tuple[bool, ...], recurrent: tuple[bool, ...]
) -> None:
    profile = load_profile(write_preset(tmp_path / "m.gguf", name))
    assert profile.swa_layers == swa
    assert profile.recurrent_layers == recurrent


def test_recurrent_state_sizes(tmp_path: Path) -> None:
    """mamba2: conv (d_conv-1)*(d_inner + 2*n_group*d_state), ssm d_state*d_inner, both f32."""
    profile = load_profile(write_preset(tmp_path / "m.gguf", "tiny-mamba2"))
    assert profile.recurrent_r_bytes_per_seq == 3 * (128 + 2 * 16) * 4
    assert profile.recurrent_s_bytes_per_seq == 16 * 128 * 4
    lfm2 = load_profile(write_preset(tmp_path / "l.gguf", "tiny-lfm2"))
    assert lfm2.recurrent_r_bytes_per_seq == 64 * 2 * 4 and lfm2.recurrent_s_bytes_per_seq == 0


def test_mla_layouts(tmp_path: Path) -> None:
    mla = load_profile(write_preset(tmp_path / "a.gguf", "tiny-deepseek2"))
    assert (mla.kv_lora_rank, mla.rope_dim, mla.n_head_kv[0], mla.head_dim_k) == (64, 32, 1, 96)
    plain = load_profile(write_preset(tmp_path / "b.gguf", "tiny-deepseek2-nomla"))
    assert (plain.kv_lora_rank, plain.rope_dim, plain.n_head_kv[0], plain.head_dim_k) == (0, 32, 4, 64)


def test_experts_counted_apart(tmp_path: Path) -> None:
    profile = load_profile(write_preset(tmp_path / "m.gguf", "tiny-qwen3moe"))
    assert (profile.n_expert, profile.n_expert_used, profile.n_ff_exp) == (8, 2, 64)
    slot = profile.slots[0]
    assert 0 < slot.expert_bytes < slot.bytes
    assert slot.expert_bytes == 3 * (64 * 64 * 8 // 32 * 18)
    assert profile.slots[-1].expert_bytes == 0


@pytest.mark.parametrize(
    ("preset", "moe_blocks"),
    [("tiny-qwen3next", (0, 1, 2, 3)), ("tiny-qwen35moe", (0, 1, 2, 3)), ("tiny-gpt-oss", (0, 1, 2, 3)),
     ("tiny-glm4moe", (1, 2, 3)), ("tiny-llama4", (1, 3)), ("tiny-minimax-m2", (0, 1, 2, 3)),
     ("tiny-nemotron_h_moe", (1, 3))],
)
def test_experts_of_the_2026_families(tmp_path: Path, preset: str, moe_blocks: tuple[int, ...]) -> None:
    """Every routed-expert tensor (`ffn_*_exps`, and gpt-oss's `ffn_*_exps.bias`) counts as expert bytes;
    routers, shared experts and dense blocks do not."""
    from llamalaunch.model.gguf_header import read_header
    from llamalaunch.model.load import tensor_sizes

    path = write_preset(tmp_path / "m.gguf", preset)
    profile = load_profile(path)
    experts = [0] * profile.n_layer
    for tensor in read_header(path).tensors:
        block, _, rest = tensor.name.removeprefix("blk.").partition(".")
        if rest.startswith(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")):
            experts[int(block)] += tensor_sizes(tensor).cpu
    assert tuple(slot.expert_bytes for slot in profile.slots[:-1]) == tuple(experts)
    assert tuple(il for il, n in enumerate(experts) if n) == moe_blocks
    if preset == "tiny-gpt-oss":  # the expert biases are part of what `-ot exps=CPU` moves
        bias = sum(tensor_sizes(t).cpu for t in read_header(path).tensors if t.name.endswith("_exps.bias")
                   and t.name.startswith("blk.0."))
        assert bias > 0 and profile.slots[0].expert_bytes == 3 * (64 * 64 * 4 // 32 * 18) + bias


def test_nextn_blocks_weigh_nothing(tmp_path: Path) -> None:
    """llama.cpp creates NextN/MTP blocks with TENSOR_SKIP unless a draft uses them: no weights, no cache."""
    profile = load_profile(write_preset(tmp_path / "m.gguf", "tiny-glm4moe", n_nextn=1))
    assert profile.n_nextn_layers == 1 and profile.slots[3].bytes == 0 and profile.slots[2].bytes > 0


# --- shards ----------------------------------------------------------------------------------------


def _split(source: Path, directory: Path, parts: int) -> list[Path]:
    """Split a model into parts as llama-gguf-split does (tensors spread across files, split.* keys)."""
    from tests.test_gguf_header import rewrite_gguf

    return rewrite_gguf(source, directory, parts)


def test_split_model_reads_as_one(tmp_path: Path) -> None:
    whole = load_profile(write_preset(tmp_path / "whole.gguf", "tiny-llama"))
    parts = _split(Path(whole.path), tmp_path / "split", 3)
    for part in parts:  # any part names the set
        split = load_profile(part)
        assert split.shard_paths == tuple(str(p) for p in parts)
        assert split.slots == whole.slots and split.host_bytes == whole.host_bytes
        assert split.graph == whole.graph  # the replay sees every part's tensors, as llama.cpp does


@pytest.mark.llama
def test_split_model_matches_llama_server(llama_bin_dir: Path, rpc_workers, tmp_path: Path) -> None:
    parts = _split(write_preset(tmp_path / "whole.gguf", "tiny-llama"), tmp_path / "split", 3)
    profile = load_profile(parts[0])
    workers = [rpc_workers(), rpc_workers()]
    served = serve_once(llama_bin_dir, parts[0], workers, "1,3", tmp_path / "server.log")
    expected = device_weight_bytes(profile, (1, 3))
    for worker, expected_bytes in zip(workers, expected):
        name = next(n for n in served.model_buffers_mib if n.endswith(f"[{worker.endpoint}]"))
        assert served.model_buffers_mib[name] == pytest.approx(expected_bytes / MIB, abs=MIB_PRINT_TOLERANCE)
    assert served.completion["tokens_predicted"] == 1


def test_missing_shard_is_named(tmp_path: Path) -> None:
    parts = _split(write_preset(tmp_path / "whole.gguf", "tiny-llama"), tmp_path / "split", 3)
    parts[1].unlink()
    with pytest.raises(ModelError, match=re.escape(parts[1].name)):
        load_profile(parts[0])


def test_extra_shard_is_named(tmp_path: Path) -> None:
    parts = _split(write_preset(tmp_path / "whole.gguf", "tiny-llama"), tmp_path / "split", 3)
    stray = parts[0].with_name(parts[0].name.replace("-of-00003", "-of-00004"))
    shutil.copy(parts[0], stray)
    with pytest.raises(ModelError, match=re.escape(stray.name)):
        load_profile(parts[0])


def test_shard_from_another_set(tmp_path: Path) -> None:
    parts = _split(write_preset(tmp_path / "a.gguf", "tiny-llama"), tmp_path / "split", 3)
    other = _split(write_preset(tmp_path / "b.gguf", "tiny-llama", n_layer=6), tmp_path / "other", 3)
    shutil.copy(other[2], parts[2])
    with pytest.raises(ModelError):
        load_profile(parts[0])


# --- architectures ---------------------------------------------------------------------------------


def test_unknown_arch_is_named(tmp_path: Path) -> None:
    from tests.test_gguf_header import rewrite_gguf

    path = rewrite_gguf(
        write_preset(tmp_path / "m.gguf", "tiny-llama"), tmp_path / "x", 1, arch="frobnicator"
    )[0]
    with pytest.raises(ModelError, match="'frobnicator' is not supported"):
        load_profile(path)
    profile = load_profile(path, allow_unknown_arch=True)
    assert profile.generic_estimate and profile.arch == "frobnicator"
    assert profile.slots == load_profile(tmp_path / "m.gguf").slots


@pytest.mark.parametrize(("preset", "names_window"), [("tiny-gemma3", True), ("tiny-smollm3", False)])
def test_graph_details_come_from_the_header(tmp_path: Path, preset: str, names_window: bool) -> None:
    """What the compute-buffer replay reads besides the hparams is read once, with the profile."""
    profile = load_profile(write_preset(tmp_path / "m.gguf", preset), allow_unknown_arch=True, generic=True)
    assert profile.graph.names_sliding_window == names_window  # a generic estimate plans a second mask
    assert "blk.0.attn_q.weight" in profile.graph.tensors and "token_embd.weight" in profile.graph.tensors
    moe = load_profile(write_preset(tmp_path / "moe.gguf", "tiny-qwen3moe"))
    assert moe.graph.expert_types == ("q4_0", "q4_0", "q4_0")
    assert load_profile(write_preset(tmp_path / "l.gguf", "tiny-llama")).graph.expert_types is None


@pytest.mark.parametrize(
    "key", ["llama.block_count", "llama.embedding_length", "llama.context_length", "general.architecture"]
)
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    from tests.test_gguf_header import rewrite_gguf

    path = rewrite_gguf(write_preset(tmp_path / "m.gguf", "tiny-llama"), tmp_path / "x", 1, drop_keys=(key,))[
        0
    ]
    with pytest.raises(ModelError, match=re.escape(key)):
        load_profile(path)


def test_zero_layers(tmp_path: Path) -> None:
    from tests.test_gguf_header import rewrite_gguf

    path = rewrite_gguf(
        write_preset(tmp_path / "m.gguf", "tiny-llama"), tmp_path / "x", 1, set_u32={"llama.block_count": 0}
    )[0]
    with pytest.raises(ModelError, match="block_count is 0"):
        load_profile(path)


def test_every_preset_profiles(tmp_path: Path) -> None:
    for name in SHAPES:
        profile = load_profile(write_preset(tmp_path / f"{name}.gguf", name), allow_unknown_arch=True)
        assert len(profile.slots) == profile.n_slots and all(s.bytes > 0 for s in profile.slots), name


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("llama.attention.head_count", 0, "key 'llama.attention.head_count' is 0: layer 0 has attention"),
        ("llama.attention.head_count_kv", 0, "key 'llama.attention.head_count_kv' is 0: layer 0 has attention"),
        ("llama.embedding_length", 0, "key 'llama.embedding_length' is 0: a model needs a positive"),
        ("llama.attention.head_count_kv", 3, "key 'llama.attention.head_count_kv' is 3: 4 heads are not a "
                                             "multiple of 3 KV heads"),
    ],
)
def test_impossible_attention_header_is_rejected(tmp_path: Path, key: str, value: int, message: str) -> None:
    """Headers llama.cpp would divide by zero with (or split heads unevenly) are refused, naming the key."""
    from tests.test_gguf_header import rewrite_gguf

    path = rewrite_gguf(write_preset(tmp_path / "m.gguf", "tiny-llama"), tmp_path / "x", 1, set_u32={key: value})[0]
    with pytest.raises(ModelError, match=re.escape(message)) as raised:
        load_profile(path)
    assert "\n" not in str(raised.value)


def test_impossible_header_plan_exits_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llamalaunch.cli import app
    from tests.test_gguf_header import rewrite_gguf

    path = rewrite_gguf(write_preset(tmp_path / "m.gguf", "tiny-llama"), tmp_path / "x", 1,
                        set_u32={"llama.attention.head_count_kv": 3})[0]
    result = CliRunner().invoke(app, ["plan", str(path), "--ctx", "4096", "--assume", "CUDA0=8GiB"])
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and "head_count_kv' is 3" in result.output, result.output
    assert "Traceback" not in result.output


# --- expert counts llama.cpp aborts on: refused while reading the header, for plan and serve alike ----------

MOE_8 = "but the model has 8 experts per layer (ffn_gate_exps holds 8)"
INCONSISTENT_EXPERTS = {  # preset, keys set, keys dropped, the problem named
    "none used": ("tiny-qwen3moe", {"qwen3moe.expert_used_count": 0}, (), f"qwen3moe.expert_used_count is 0 {MOE_8}"),
    "more used than there are": ("tiny-qwen3moe", {"qwen3moe.expert_used_count": 99}, (),
                                 f"qwen3moe.expert_used_count is 99 {MOE_8}"),
    "one expert short": ("tiny-qwen3moe", {"qwen3moe.expert_count": 7}, (), f"qwen3moe.expert_count is 7 {MOE_8}"),
    "no experts said": ("tiny-qwen3moe", {"qwen3moe.expert_count": 0}, (), f"qwen3moe.expert_count is 0 {MOE_8}"),
    "expert count missing": ("tiny-qwen3moe", {}, ("qwen3moe.expert_count",),
                             f"qwen3moe.expert_count is missing {MOE_8}"),
    "a dense model routing": ("tiny-llama", {"llama.expert_used_count": 2}, (),
                              "llama.expert_used_count is 2 but llama.expert_count is missing: the model has no "
                              "experts to route to"),
}


def inconsistent_experts(tmp_path: Path, case: str) -> tuple[Path, str]:
    """The model of `case` and the error line plan and serve print for it."""
    from tests.test_gguf_header import rewrite_gguf

    preset, set_u32, drop_keys, problem = INCONSISTENT_EXPERTS[case]
    path = rewrite_gguf(write_preset(tmp_path / "m.gguf", preset), tmp_path / "x", 1, set_u32=set_u32,
                        drop_keys=drop_keys)[0]
    return path, (f"error: {path}: {problem}: the GGUF header is inconsistent (re-convert or re-download the "
                  "model)")


@pytest.mark.parametrize("case", sorted(INCONSISTENT_EXPERTS))
def test_expert_counts_that_contradict_the_model_are_refused(tmp_path: Path, case: str) -> None:
    """expert_used_count 0 crashed the compute-buffer replay (IndexError); 99, or an expert_count other than the
    experts the tensors hold, planned a load llama-server then aborted with GGML_ASSERT."""
    path, line = inconsistent_experts(tmp_path, case)
    with pytest.raises(ModelError) as raised:
        load_profile(path)
    assert f"error: {raised.value}" == line


@pytest.mark.llama
@pytest.mark.parametrize("case", sorted(INCONSISTENT_EXPERTS))
def test_llama_server_refuses_the_same_expert_counts(llama_bin_dir: Path, tmp_path: Path, case: str) -> None:
    """What the header check refuses, llama.cpp aborts on (GGML_ASSERT in load_hparams) or refuses to load."""
    path, _ = inconsistent_experts(tmp_path, case)
    argv = [str(llama_bin_dir / "llama-server"), "-m", str(path), "--port", str(free_port()), "-c", "512"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "GGML_NO_BACKTRACE": "1", "CUDA_VISIBLE_DEVICES": ""})
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        stop_process(process)
    text = output.decode(errors="replace")
    assert process.returncode != 0 and ("GGML_ASSERT" in text or "error loading model" in text), text[-2000:]


@pytest.mark.parametrize("command", ["plan", "serve"])
def test_plan_and_serve_refuse_contradicting_expert_counts_in_one_line(tmp_path: Path, llama_bin_dir: Path,
                                                                       command: str) -> None:
    """As a user runs them: one line naming the file, the key and the fix, exit 2, nothing written."""
    path, line = inconsistent_experts(tmp_path, "none used")
    args = ["--assume", "CUDA0=1GiB"] if command == "plan" else ["--no-tui"]
    done = subprocess.run([sys.executable, "-m", "llamalaunch", command, str(path), *args, "--llama-server",
                           str(llama_bin_dir / "llama-server")], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "80"})
    assert (done.returncode, done.stdout, done.stderr) == (2, "", line + "\n")
    home = Path(os.environ["LLAMALAUNCH_HOME"])
    assert not [p for p in home.rglob("*") if p.is_file() and "cache" not in p.relative_to(home).parts]
