"""llama-server log lines into typed events, on every real log in the shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalaunch.launch.failures import crash_reason
from llamalaunch.launch.logparse import (
    HOST,
    BreakdownRow,
    BufferSize,
    ContextParam,
    LayerAssigned,
    LayersOffloaded,
    Listening,
    LoadFailed,
    ModelLoaded,
    OutOfMemory,
    buffer_device,
    parse_events,
    parse_line,
)
from llamalaunch.units import MIB

FIXTURES = Path(__file__).parent / "fixtures" / "llama-server-logs"
RPC_LOG = FIXTURES / "cpu-2rpc-smollm2-ts1-3-verbose.log"
CUDA_8B = FIXTURES / "cuda-h100-excerpts-8b.log"
CUDA_70B = FIXTURES / "cuda-h100-excerpts-70b-partial.log"


def events_of(path: Path) -> list[object]:
    if not path.exists():
        pytest.skip(f"fixture {path} is not here")
    with open(path, errors="replace") as lines:
        return list(parse_events(lines))


def test_line_prefix() -> None:
    line = parse_line("0.01.035.064 I sched_reserve:        CPU compute buffer size =    43.32 MiB\n")
    assert line.time_us == 1_035_064 and line.level == "I" and line.module == "sched_reserve"
    assert parse_line("1.02.003.004 D x: y").time_us == 62_003_004
    bare = parse_line("Sequence(Literal(<|im_start|>assistant")
    assert bare.level is None and bare.module is None
    server = parse_line("0.00.704.362 I srv  llama_server: model loaded")
    assert server.module == "llama_server" and server.text == "model loaded"
    coloured = parse_line("\x1b[34m0.00.000.001\x1b[0m \x1b[32mI \x1b[0mllama_context: n_ctx                 = 8192")
    assert coloured.module == "llama_context" and coloured.time_us == 1


def test_rpc_log_memory_and_placement() -> None:
    events = events_of(RPC_LOG)
    layers = [e for e in events if isinstance(e, LayerAssigned)]
    assert [e.device for e in layers[:31]].count("RPC0") == 8  # -ts 1,3: 8 then 23 (with output)
    assert LayersOffloaded(31, 31) in events
    assert ContextParam("n_ctx", "8192") in events and ContextParam("kv_unified", "true") in events
    buffers = [e for e in events if isinstance(e, BufferSize) and e.bytes > 0]
    kv = {e.buffer: e.bytes for e in buffers if e.kind == "kv"}
    assert kv == {"RPC0[127.0.0.1:50061]": 48 * MIB, "RPC0[127.0.0.1:50062]": 132 * MIB}
    exits = [e for e in buffers if e.at_exit]
    assert [round(e.bytes / MIB, 4) for e in exits] == [59.0547, 48.9142, 43.3204]
    output = [e for e in buffers if e.kind == "output"]
    assert output[0].bytes == 49152 * 4 * 4
    assert ModelLoaded() in events and Listening("http://127.0.0.1:18080") in events


def test_rpc_log_breakdown_rows() -> None:
    rows = [e for e in events_of(RPC_LOG) if isinstance(e, BreakdownRow)]
    assert len(rows) == 6  # the fit dry run and the exit
    final = {row.name: row for row in rows[3:]}
    assert final["RPC1"].description == "127.0.0.1:50062"
    assert (final["RPC1"].self_mib, final["RPC1"].model_mib, final["RPC1"].context_mib,
            final["RPC1"].compute_mib) == (256, 75, 132, 48)
    assert final["Host"].total_mib is None and final["Host"].compute_mib == 43


def test_cuda_log_out_of_memory_stages() -> None:
    events = events_of(CUDA_8B)
    ooms = [e for e in events if isinstance(e, OutOfMemory)]
    kv_buffers = [e for e in ooms if e.buffer == "CUDA0" and e.bytes == 8858370048]
    assert kv_buffers
    assert any(e.stage == "kv" for e in ooms)
    assert any(e.stage == "compute" and e.bytes == 168310912 for e in ooms)
    assert any(e.stage == "runtime" for e in ooms)
    assert sum(isinstance(e, LoadFailed) for e in events) == 4
    rows = [e for e in events if isinstance(e, BreakdownRow) and e.name == "CUDA0"]
    assert (rows[0].total_mib, rows[0].free_mib, rows[0].unaccounted_mib) == (81079, 75822, 597)


def test_cuda_70b_partial_offload() -> None:
    events = events_of(CUDA_70B)
    assert LayersOffloaded(0, 81) in events and LayersOffloaded(17, 81) in events
    host_rows = [e for e in events if isinstance(e, BreakdownRow) and e.name == "Host"]
    assert host_rows and all(row.description is None for row in host_rows)


def test_rpc_out_of_memory_line() -> None:
    line = "0.00.661.286 E alloc_tensor_range: failed to allocate RPC0[127.0.0.1:50909] buffer of size 754974720"
    (event,) = parse_events([line])
    assert event == OutOfMemory(None, "RPC0[127.0.0.1:50909]", 754974720, event.text)


def test_every_fixture_parses() -> None:
    """Each log gives events; one that aborts before loading (GGML_ASSERT on its header) gives its reason."""
    for path in sorted(FIXTURES.glob("*.log")):
        if path.name.endswith("-abort.log"):
            reason = crash_reason(path.read_text(errors="replace").splitlines())
            assert reason is not None and "GGML_ASSERT" in reason, path
        else:
            assert events_of(path), path


@pytest.mark.parametrize(("buffer", "endpoints", "counts", "device"), [
    ("CUDA0", (), None, "CUDA0"),
    ("CUDA_Host", (), None, HOST),
    ("CPU_Mapped", (), None, HOST),
    ("CPU", (), None, HOST),
    ("RPC0[127.0.0.1:50062]", ("127.0.0.1:50061", "127.0.0.1:50062"), None, "RPC1"),
    ("RPC1[10.0.0.5:50052]", ("10.0.0.4:50052", "10.0.0.5:50052"), {"10.0.0.4:50052": 2}, "RPC3"),
])
def test_buffer_device(buffer: str, endpoints: tuple[str, ...], counts: dict[str, int] | None,
                       device: str) -> None:
    assert buffer_device(buffer, endpoints, counts) == device


def test_estimate_from_the_rpc_log() -> None:
    """The measured estimator books the last load's buffer lines per llama.cpp device."""
    from llamalaunch.launch.measure import breakdown_rows, estimate_from_events
    from llamalaunch.model.estimate import Placement, SlotRange

    events = events_of(RPC_LOG)
    placement = Placement((SlotRange("RPC0", "RPC", 0, 8), SlotRange("RPC1", "RPC", 8, 23)))
    measured = estimate_from_events(events, placement, ("127.0.0.1:50061", "127.0.0.1:50062"))
    assert measured.devices["RPC0"].kv_bytes == 48 * MIB and measured.devices["RPC1"].kv_bytes == 132 * MIB
    assert abs(measured.devices["RPC1"].compute_bytes - 48.91 * MIB) < MIB // 100  # the real load, not the dry run
    assert abs(measured.host.weights_bytes - 28.69 * MIB) < MIB // 100
    assert [row.name for row in breakdown_rows(events)] == ["RPC0", "RPC1", "Host"]


def test_deepseek4_compressor_state_is_cache_memory() -> None:
    line = "0.00.348.093 I llama_dsv4_comp_state: RPC0[127.0.0.1:33035] DSV4 csa state buffer size =     0.12 MiB"
    events = list(parse_events([line]))
    assert events == [BufferSize("rs", "RPC0[127.0.0.1:33035]", events[0].bytes, events[0].precision_bytes)]
    assert abs(events[0].bytes - 0.12 * MIB) < 0.01 * MIB
