"""The measured estimator: ask the local llama.cpp build what it allocates for the same placement.

model/compare.py compares the two; this module runs llama.cpp and reads what it printed.

Two projections, not equally true (DESIGN.md §3):
- `load` (default): start llama-server with the exact argv (`--fit off`, explicit -dev/-ngl/-ts), wait
  until the model is loaded, stop it, and read the buffer lines it printed. These are the real
  allocations, the figures the analytic estimator must match.
- `fit-params`: `llama-fit-params --fit-print on`, a dry run with no allocation. Its KV lines print
  0.00 MiB (only the breakdown table has them, in whole MiB) and it reserves logits for a whole batch,
  so its compute figure for the output device is larger than llama-server's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from llamalaunch.errors import ServeError, ToolchainError
from llamalaunch.launch.logparse import (
    HOST,
    BreakdownRow,
    BufferSize,
    Event,
    Listening,
    LoadFailed,
    ModelLoaded,
    OutOfMemory,
    buffer_device,
    parse_events,
)
from llamalaunch.model.compare import ComponentRow, compare
from llamalaunch.model.estimate import Estimate, MemoryUse, Placement, SlotRange, host_experts_override
from llamalaunch.plan.argv import child_names
from llamalaunch.plan.request import Request
from llamalaunch.plan.types import Plan
from llamalaunch.units import MIB

if TYPE_CHECKING:
    from llamalaunch.plan.pipeline import PlanInputs
    from llamalaunch.toolchain.discover import Binary

LOAD_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Measurement:
    estimate: Estimate
    events: tuple[Event, ...]
    argv: tuple[str, ...]
    log_path: str


def request_args(request: Request, ctx_tokens: int) -> list[str]:
    args = ["-c", str(ctx_tokens), "-np", str(request.n_parallel), "-kvu" if request.kv_unified else "-no-kvu",
            "-b", str(request.n_batch), "-ub", str(request.n_ubatch), "-ctk", request.cache_type_k,
            "-ctv", request.cache_type_v, "-fa", request.flash_attn]
    if request.swa_full:
        args.append("--swa-full")
    return args


def placement_args(placement: Placement) -> list[str]:
    """-dev, -ngl and integer -ts: llama.cpp reproduces integer per-device layer counts exactly."""
    ranges = [r for r in placement.ranges]
    if not ranges or placement.n_gpu_layers == 0:
        return ["-ngl", "0"]
    args = ["-dev", ",".join(r.device for r in ranges), "-ngl", str(placement.n_gpu_layers)]
    if len(ranges) > 1:
        args += ["-ts", ",".join(str(r.n_slots) for r in ranges)]
    if placement.host_expert_layers or placement.host_expert_parts:
        args += ["-ot", host_experts_override(placement)]
    return args


def server_argv(bin_dir: Path, model_path: str, placement: Placement, request: Request, ctx_tokens: int,
                rpc_endpoints: Sequence[str], port: int) -> list[str]:
    argv = [str(bin_dir / "llama-server"), "-m", model_path, "--host", "127.0.0.1", "--port", str(port),
            "--fit", "off", "--no-warmup", "-v"]
    if rpc_endpoints:
        argv += ["--rpc", ",".join(rpc_endpoints)]
    return argv + placement_args(placement) + request_args(request, ctx_tokens)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_load(bin_dir: Path, model_path: str, placement: Placement, request: Request, ctx_tokens: int,
                 rpc_endpoints: Sequence[str] = (), log_dir: Path | None = None,
                 timeout_s: float = LOAD_TIMEOUT_S) -> Measurement:
    """Load the model in a real llama-server, stop it once loaded, and return what it allocated."""
    if not (bin_dir / "llama-server").exists():
        raise ToolchainError(f"llama-server not found in {bin_dir}", "run scripts/setup or pass the bin directory")
    argv = server_argv(bin_dir, model_path, placement, request, ctx_tokens, rpc_endpoints, _free_port())
    return measure_argv(argv, placement, rpc_endpoints, log_dir, timeout_s)


def measure_plan(server: Path, plan_argv: Sequence[str], placement: Placement, rpc_endpoints: Sequence[str],
                 devices_per_endpoint: Mapping[str, int] | None = None,
                 timeout_s: float = LOAD_TIMEOUT_S, warmup: bool = False) -> Measurement:
    """A plan's own argv, loaded for real (`plan --verify`; with `warmup`, as a server starts by default)."""
    argv = [str(server), *plan_argv, "--host", "127.0.0.1", "--port", str(_free_port()),
            *([] if warmup else ["--no-warmup"]), "-lv", "5"]
    return measure_argv(argv, placement, rpc_endpoints, None, timeout_s, devices_per_endpoint)


def measure_argv(argv: list[str], placement: Placement, rpc_endpoints: Sequence[str], log_dir: Path | None,
                 timeout_s: float, devices_per_endpoint: Mapping[str, int] | None = None) -> Measurement:
    scratch = log_dir is None  # a folder of our own: removed unless a failure names the log in it
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="llamalaunch-measure-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        _wait_loaded(process, log_path, timeout_s)
    finally:
        _stop(process, rpc_endpoints)
    with open(log_path, errors="replace") as lines:
        events = tuple(parse_events(lines))
    if not any(isinstance(e, ModelLoaded) for e in events):
        failure = next((e for e in events if isinstance(e, (LoadFailed, OutOfMemory))), None)
        reason = failure.text if failure is not None else _last_error_line(log_path)
        raise ServeError(f"llama-server did not load the model: {reason}", f"see {log_path}")
    estimate = estimate_from_events(events, placement, rpc_endpoints, devices_per_endpoint)
    # a run without the exit breakdown keeps its log: calibration reports it by this path
    if scratch and breakdown_rows(events):
        shutil.rmtree(log_dir, ignore_errors=True)
    return Measurement(estimate, events, tuple(argv), str(log_path))


def measure_fit_params(bin_dir: Path, model_path: str, placement: Placement, request: Request, ctx_tokens: int,
                       rpc_endpoints: Sequence[str] = (), timeout_s: float = LOAD_TIMEOUT_S) -> Measurement:
    """llama-fit-params' own projection (dry run, nothing allocated): weights and KV in whole MiB from
    its `--fit-print on` table, compute from its `sched_reserve` lines. Not what llama-server allocates:
    it reserves logits for a whole batch and does not use pipeline parallelism."""
    binary = bin_dir / "llama-fit-params"
    if not binary.exists():
        raise ToolchainError(f"llama-fit-params not found in {bin_dir}", "rebuild llama.cpp with its tools")
    argv = [str(binary), "-m", model_path, "--fit", "off", "--fit-print", "on", "-v"]
    if rpc_endpoints:
        argv += ["--rpc", ",".join(rpc_endpoints)]
    # llama-fit-params has no -kvu: with -np > 1 it sizes a split (not unified) cache
    argv += placement_args(placement) + [a for a in request_args(request, ctx_tokens) if a not in ("-kvu", "-no-kvu")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ServeError(f"llama-fit-params failed ({result.returncode})", result.stderr.strip()[-300:] or None)
    events = tuple(parse_events(result.stderr.splitlines()))
    table = _fit_print_table(result.stdout)
    compute = estimate_from_events(events, placement, rpc_endpoints)
    def use(name: str, fallback: MemoryUse) -> MemoryUse:
        model, context, compute_mib = table.get(name, (0, 0, 0))
        return MemoryUse(model * MIB, context * MIB, fallback.compute_bytes or compute_mib * MIB, 0)
    devices = {r.device: use(r.device, compute.devices[r.device]) for r in placement.ranges}
    estimate = Estimate(MappingProxyType(devices), use("Host", compute.host))
    return Measurement(estimate, events, tuple(argv), "")


def _fit_print_table(stdout: str) -> dict[str, tuple[int, int, int]]:
    """`RPC0 16 48 24` lines: device, model, context, compute in MiB."""
    table: dict[str, tuple[int, int, int]] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.lstrip("-").isdigit() for p in parts[1:]):
            table[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return table


def _last_error_line(log_path: Path) -> str:
    with open(log_path, errors="replace") as lines:
        errors = [line.strip() for line in lines if " E " in line or "failed" in line or "error" in line]
    return errors[-1] if errors else "it exited without saying why"


def _wait_loaded(process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    offset = 0
    while time.monotonic() < deadline:
        with open(log_path, "rb") as log:
            log.seek(offset)
            chunk = log.read()
        text = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(text)
        for event in parse_events(text.decode(errors="replace").splitlines()):
            if isinstance(event, (Listening, LoadFailed)):
                return
        if process.poll() is not None:
            return
        time.sleep(0.05)
    raise ServeError(f"llama-server did not finish loading in {timeout_s:.0f}s", f"see {log_path}")


def _stop(process: subprocess.Popen[bytes], rpc_endpoints: Sequence[str]) -> None:
    if process.poll() is not None:
        return
    if rpc_endpoints:  # killed with a request pending, a plain close would kill the worker (SIGPIPE)
        from llamalaunch.probe.rpc import reset_when_closed

        reset_when_closed(process.pid, rpc_endpoints)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)


def estimate_from_events(events: Iterable[Event], placement: Placement, rpc_endpoints: Sequence[str] = (),
                         devices_per_endpoint: Mapping[str, int] | None = None) -> Estimate:
    """Sum the buffer lines of one load per device (model → weights, KV/RS → kv, compute) and host.

    The output (logits) buffer counts as host kv, as the analytic estimator books it. Only the last
    load in the log counts (a `--fit on` dry run before it prints zeros).
    """
    parts: dict[str, dict[str, int]] = {}
    for event in _last_load(list(events)):
        if not isinstance(event, BufferSize) or event.at_exit:
            continue
        device = buffer_device(event.buffer, rpc_endpoints, devices_per_endpoint)
        field = {"model": "weights", "kv": "kv", "rs": "kv", "output": "kv", "compute": "compute"}[event.kind]
        parts.setdefault(device, {}).setdefault(field, 0)
        parts[device][field] += event.bytes
    def use(device: str) -> MemoryUse:
        found = parts.get(device, {})
        return MemoryUse(found.get("weights", 0), found.get("kv", 0), found.get("compute", 0), 0)
    devices = {r.device: use(r.device) for r in placement.ranges}
    return Estimate(MappingProxyType(devices), use(HOST))


def _last_load(events: list[Event]) -> list[Event]:
    """Events from the last `model` buffer line group on: the real load follows any dry runs."""
    def is_model(event: Event) -> bool:
        return isinstance(event, BufferSize) and event.kind == "model"

    starts = [i for i, e in enumerate(events) if is_model(e) and (i == 0 or not is_model(events[i - 1]))]
    return events[starts[-1]:] if starts else events


def breakdown_rows(events: Iterable[Event]) -> list[BreakdownRow]:
    """The memory breakdown printed at exit (the last table in the log), in whole MiB."""
    rows = [e for e in events if isinstance(e, BreakdownRow)]
    last: list[BreakdownRow] = []
    for row in rows:
        if last and row.name in {r.name for r in last}:
            last = []
        last.append(row)
    return last


def allocated_host_args(plan: Plan, server: Binary) -> list[str]:
    """`-lm none` for a plan whose host weights are mapped (--host-weights mapped or repacked, or a plan with no
    device: llama.cpp's default): a mapped buffer prints the file range it maps, the padding between tensors and
    tensors loaded elsewhere (devices, CPU_REPACK) included, not what it holds. Loaded, each host buffer is
    exactly its tensors; the devices' buffers are the same either way."""
    mapped = plan.host_weights in ("mapped", "repacked") or not any(p.n_layers for p in plan.devices if not p.excluded)
    return ["-lm", "none"] if mapped and server.knows("--load-mode") else []


def verify_plan(inputs: PlanInputs, plan: Plan) -> list[ComponentRow]:
    """plan --verify: load the plan's argv in the real llama-server and compare, per device and component."""
    from llamalaunch.probe.inventory import BUSY_NOTE
    from llamalaunch.probe.rpc import WorkerBusyError
    from llamalaunch.toolchain.discover import INSTALL_HINT

    if inputs.toolchain is None:
        raise ToolchainError("--verify needs llama-server", INSTALL_HINT)
    busy = next((d for d in inputs.devices if d.note and d.note.startswith(BUSY_NOTE)), None)
    if busy is not None and busy.endpoint is not None:
        raise WorkerBusyError(busy.endpoint, f"{busy.name} is {busy.note}: --verify does not start "
                              "llama-server on a busy worker", "stop that client first, or plan without "
                              "--verify", None)
    argv = list(plan.argv)
    endpoints = argv[argv.index("--rpc") + 1].split(",") if "--rpc" in argv else []
    names = child_names(inputs.devices, endpoints)
    ranges = tuple(SlotRange(names[p.device.name], p.device.backend, p.first_slot or 0, p.n_layers)
                   for p in plan.devices if not p.excluded)
    per_worker = {endpoint: sum(1 for d in inputs.devices if d.endpoint == endpoint)
                  for endpoint in endpoints}
    measured = measure_plan(inputs.toolchain.server.path, [*argv, *allocated_host_args(plan, inputs.toolchain.server)],
                            Placement(ranges), endpoints, per_worker)
    used = {names[p.device.name]: p.memory for p in plan.devices if not p.excluded}
    planned = Estimate(MappingProxyType(used), plan.host)
    # rows under the plan table's names: llama-server renumbers the workers after one left out of --rpc
    ours = {names[p.device.name]: p.device.name for p in plan.devices if not p.excluded} | {HOST: "host"}
    return [dataclasses.replace(row, device=ours.get(row.device, row.device))
            for row in compare(planned, measured.estimate)]
