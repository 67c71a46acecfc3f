"""Every device llama-server would use, under its llama.cpp name and in llama.cpp's order.

Order (src/llama.cpp): RPC devices first, in `--rpc` order, numbered RPC0, RPC1, … across all workers
(a worker may expose several); then the local GPUs (CUDA0, …). `-ts` and `-mg` index this order.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from llamalaunch.errors import BadInputError, ProbeError, ToolchainError
from llamalaunch.probe.assume import parse_assumptions
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.probe.host import probe_host
from llamalaunch.units import MIB

if TYPE_CHECKING:  # NVML and the RPC protocol are imported where a real probe needs them (not what-if plans)
    from llamalaunch.probe.nvml import NvmlGpu
    from llamalaunch.probe.rpc import RpcProbeError, WorkerReport

BUSY_NOTE = "busy serving another client"
DOWN_NOTE = "down"


@dataclass(frozen=True)
class DownWorker:
    """A worker that could not be probed (refused, unreachable, not a worker: anything but busy)."""

    name: str  # its device's name: one device assumed, its count being unknown
    endpoint: str
    error: RpcProbeError  # what the probe raised, its hint naming `--exclude name` too


@dataclass(frozen=True)
class Inventory:
    devices: tuple[Device, ...]  # llama.cpp's order; Device.order is the index here
    host: HostMemory
    problems: tuple[str, ...] = ()  # what planning must know (a busy worker; names after a down one)
    notes: tuple[str, ...] = ()  # informative (no NVIDIA driver here)
    unknown_memory: tuple[str, ...] = ()  # devices whose free/total are unknown (busy or down workers): 0 in
    # Device, "?" in tables, null in JSON
    down: tuple[DownWorker, ...] = ()  # workers that could not be probed, each one device of unknown memory

    @property
    def busy(self) -> tuple[str, ...]:
        """Devices of unknown memory whose worker is up, serving another client."""
        down = {worker.name for worker in self.down}
        return tuple(name for name in self.unknown_memory if name not in down)

    def device(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        raise BadInputError(f"no device named {name!r}",
                            f"the devices are {', '.join(d.name for d in self.devices) or 'none'}")


def split_endpoints(rpc: Sequence[str]) -> tuple[str, ...]:
    """Endpoints from repeated and/or comma-separated --rpc values; syntax checked, repeats refused."""
    for value in rpc:
        if not value.replace(",", "").strip():
            raise BadInputError(f"--rpc {value!r} names no worker", "give HOST:PORT, like --rpc 127.0.0.1:50052")
    endpoints = tuple(part.strip() for value in rpc for part in value.split(",") if part.strip())
    if endpoints:
        from llamalaunch.probe.rpc import parse_endpoint
    for endpoint in endpoints:
        parse_endpoint(endpoint)
    repeated = sorted({endpoint for endpoint in endpoints if endpoints.count(endpoint) > 1})
    if repeated:
        raise BadInputError(f"--rpc lists {', '.join(repeated)} more than once", "give each worker once")
    return endpoints


def probe_devices(rpc: Sequence[str] = (), assume: Sequence[str] = (), local_gpus: bool = True,
                  connect_timeout_s: float = 1.0, reply_timeout_s: float = 2.0,
                  read_gpus: Callable[[], Sequence[NvmlGpu]] | None = None, keep_down: bool = False) -> Inventory:
    """Probe RPC workers, local GPUs and host RAM; with `assume`, probe nothing but host RAM (what-if).

    Raises the RpcProbeError of the first worker that is down or broken (named, with the fix) unless
    `keep_down`: then each shows as one device of unknown memory, listed in `down` and `unknown_memory`
    (`refuse_down_workers` decides later). A busy worker is not an error: it shows with unknown memory,
    listed in `unknown_memory` and `problems`.
    """
    endpoints = split_endpoints(rpc)
    if assume:  # what-if plans import neither the RPC protocol nor sockets (start-up time)
        return _assumed_inventory(assume, endpoints)
    _refuse_one_worker_twice(endpoints)
    outcomes = _probe_workers(endpoints, connect_timeout_s, reply_timeout_s)
    devices, problems, down = _rpc_devices(endpoints, outcomes)
    notes: list[str] = []
    if local_gpus:
        from llamalaunch.probe.gpus import probe_local_gpus
        from llamalaunch.probe.nvml import read_nvml_gpus

        gpus = probe_local_gpus(read_gpus or read_nvml_gpus)
        devices += [dataclasses.replace(gpu, order=len(devices) + gpu.order) for gpu in gpus.devices]
        if gpus.reason:
            notes.append(f"local GPUs: {gpus.reason}")
    unknown = tuple(device.name for device in devices
                    if device.error is not None or (device.note or "").startswith(BUSY_NOTE))
    inventory = Inventory(tuple(devices), probe_host(), tuple(problems), tuple(notes), unknown, tuple(down))
    if not keep_down:
        refuse_down_workers(inventory)
    return inventory


def _refuse_one_worker_twice(endpoints: Sequence[str]) -> None:
    """One worker under two spellings (localhost:50052 and 127.0.0.1:50052) would be planned as two devices,
    and llama-server would wait for ever on its second connection (a worker serves one client at a time)."""
    from llamalaunch.probe.rpc import resolve_endpoint

    by_address: dict[tuple[str, int], str] = {}
    for endpoint in endpoints:
        address = resolve_endpoint(endpoint)
        if address is None:  # the probe reports it
            continue
        if address in by_address:
            raise BadInputError(f"--rpc lists {by_address[address]} and {endpoint}: both are the worker at "
                                f"{address[0]}:{address[1]}", "give each worker once")
        by_address[address] = endpoint


def refuse_down_workers(inventory: Inventory, exclude: Collection[str] = ()) -> None:
    """For planning: a worker that is down is an error (its probe's, naming `--exclude`) unless `exclude`
    leaves it out."""
    for worker in inventory.down:
        if worker.name not in exclude:
            raise worker.error


def _assumed_inventory(assume: Sequence[str], endpoints: Sequence[str]) -> Inventory:
    local_host = probe_host()
    devices, assumed_host = parse_assumptions(assume, local_host)
    rpc_names = [device.name for device in devices if device.backend == "RPC"]
    notes = ["what-if: no device was probed"]
    problems: tuple[str, ...] = ()
    expected = [f"RPC{i}" for i in range(len(endpoints))]
    if endpoints and rpc_names == expected:
        # One device per worker is the only reading of the names we can make without asking them.
        devices = tuple(dataclasses.replace(device, endpoint=endpoints[device.order], worker_index=0)
                        if device.backend == "RPC" else device for device in devices)
    elif endpoints:  # a problem, not a note: plan shows it, and its command line has no --rpc
        assumed = ", ".join(rpc_names) or "no RPC device"
        problems = (f"--rpc lists {len(endpoints)} worker(s) but --assume gives {assumed}: the command line leaves "
                    f"--rpc out (assume {', '.join(expected)}, one device per worker in --rpc order, to match them)",)
    elif rpc_names:  # the plan places layers on workers the command line cannot reach
        problems = (f"--assume gives {', '.join(rpc_names)} but no --rpc names their worker: the command line "
                    "leaves --rpc out (add --rpc HOST:PORT for each, in order)",)
    return Inventory(devices, assumed_host or local_host, problems, tuple(notes))


def _probe_workers(endpoints: Sequence[str], connect_timeout_s: float,
                   reply_timeout_s: float) -> list[WorkerReport | RpcProbeError]:
    """Probe all workers at once (a busy or unreachable one costs its whole timeout): a report or the error."""
    if not endpoints:
        return []
    from concurrent.futures import ThreadPoolExecutor  # here: what-if planning probes no worker

    from llamalaunch.probe.rpc import RpcProbeError, probe_worker

    def probe(endpoint: str) -> WorkerReport | RpcProbeError:
        try:
            return probe_worker(endpoint, connect_timeout_s, reply_timeout_s)
        except RpcProbeError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(len(endpoints), 1)) as pool:
        return list(pool.map(probe, endpoints))


def _rpc_devices(endpoints: Sequence[str], outcomes: Sequence[WorkerReport | RpcProbeError]
                 ) -> tuple[list[Device], list[str], list[DownWorker]]:
    from llamalaunch.probe.rpc import RpcProbeError, WorkerBusyError

    devices: list[Device] = []
    problems: list[str] = []
    down: list[DownWorker] = []
    for position, (endpoint, outcome) in enumerate(zip(endpoints, outcomes, strict=True)):
        name = f"RPC{len(devices)}"
        later = "; later RPC names assume it has one device" if position < len(endpoints) - 1 else ""
        if isinstance(outcome, WorkerBusyError):
            devices.append(Device(name, "RPC", endpoint, 0, 0, len(devices), endpoint=endpoint,
                                  worker_index=0, note=f"{BUSY_NOTE} ({outcome.holder}): memory unknown"))
            problems.append(f"{name} {endpoint} is serving another client ({outcome.holder}): memory unknown; "
                            f"give --budget {name}=SIZE to plan for it anyway{later}")
            continue
        if isinstance(outcome, RpcProbeError):
            devices.append(_down_device(name, endpoint, outcome, len(devices)))
            down.append(DownWorker(name, endpoint, outcome))
            if later:  # said only where it matters: the names of the workers after it
                problems.append(f"{name} {endpoint} is down: its device count is unknown{later}")
            continue
        for worker_device in outcome.devices:
            devices.append(Device(f"RPC{len(devices)}", "RPC", endpoint, worker_device.free_bytes,
                                  worker_device.total_bytes, len(devices), endpoint=endpoint,
                                  worker_index=worker_device.index, rpc_round_trip_s=outcome.round_trip_s))
    return devices, problems, down


def _down_device(name: str, endpoint: str, error: RpcProbeError, order: int) -> Device:
    """The one device a down worker is taken to have; its probe's error names `--exclude` as a lever."""
    lever = f"plan/serve --exclude {name} to go without it"  # devices has no --exclude: name the command
    error.hint = f"{error.hint}, or {lever}" if error.hint else lever
    return Device(name, "RPC", endpoint, 0, 0, order, endpoint=endpoint, worker_index=0,
                  note=f"{DOWN_NOTE}: {error.reason}", error=error.reason)


def fill_unknown_memory(inventory: Inventory, budgets: Mapping[str, int]) -> Inventory:
    """For planning: a device of unknown memory on a busy worker takes its --budget as free and total; without
    one, ProbeError naming it and the fix. Down workers' devices stay unknown (only --exclude plans past them)."""
    busy = inventory.busy
    missing = [name for name in busy if name not in budgets]
    if missing:
        device = inventory.device(missing[0])
        raise ProbeError(f"{', '.join(missing)} {device.endpoint}: {device.note}",
                         f"stop the other client, or give --budget {missing[0]}=SIZE to plan for it anyway; "
                         "serve will not start llama-server on a busy worker")
    devices = tuple(
        dataclasses.replace(device, free_bytes=budgets[device.name], total_bytes=budgets[device.name],
                            note=f"{device.note}; size from --budget")
        if device.name in busy else device for device in inventory.devices)
    return dataclasses.replace(inventory, devices=devices,
                               unknown_memory=tuple(name for name in inventory.unknown_memory if name not in busy))


def refuse_busy_workers(inventory: Inventory) -> None:
    """For serving: a busy worker is an error whatever --budget says.

    llama-server's HELLO would wait in the worker's queue, and its load hang; stopping it then closes a
    connection with a request pending, which kills the worker later (SIGPIPE).
    """
    if not inventory.busy:
        return
    from llamalaunch.probe.rpc import WorkerBusyError, describe_holder

    device = inventory.device(inventory.busy[0])
    assert device.endpoint is not None
    raise WorkerBusyError(device.endpoint, f"{device.name} is serving another client "
                          f"({describe_holder(device.endpoint)}); serve does not start llama-server on a busy "
                          "worker", f"stop that client and serve again, or leave {device.endpoint} out of --rpc; "
                          f"`llamalaunch plan --budget {device.name}=SIZE` plans for it as a what-if", None)


def held_elsewhere(devices: Sequence[Device], ignore_pids: Collection[int]) -> str:
    """"RPC0 127.0.0.1:50052 is serving another client (python3, pid 4242)" for each worker this machine
    sees held by a client not in `ignore_pids` (joined by "; "); "" when none is."""
    from llamalaunch.probe.rpc import holder_of

    said: dict[str, str] = {}
    for device in devices:
        if device.endpoint and device.endpoint not in said:
            holder = holder_of(device.endpoint, ignore_pids)
            said[device.endpoint] = f"{device.name} {device.endpoint} is serving another client ({holder})" \
                if holder else ""
    return "; ".join(text for text in said.values() if text)


class ListedDevice(NamedTuple):
    name: str
    description: str
    total_bytes: int  # whole MiB as llama-server prints them
    free_bytes: int


_LISTED_LINE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")


def parse_list_devices(output: str) -> list[ListedDevice]:
    """Devices from `llama-server --list-devices` ("  RPC0: 127.0.0.1:50052 (24105 MiB, 24105 MiB free)")."""
    listed = []
    for line in output.splitlines():
        if match := _LISTED_LINE.match(line):
            name, description, total, free = match.groups()
            listed.append(ListedDevice(name, description, int(total) * MIB, int(free) * MIB))
    return listed


def list_devices_from_binary(server: Path, rpc: Sequence[str], timeout_s: float = 60.0,
                             reply_timeout_s: float = 2.0) -> list[ListedDevice]:
    """What llama-server itself lists (`--rpc … --list-devices`): llama.cpp's names and order.

    Each worker is probed first: llama-server would hang on a busy worker, and killing it then would
    close a socket with a pending HELLO, which kills the worker (SIGPIPE).
    """
    from llamalaunch.probe.rpc import probe_worker

    endpoints = split_endpoints(rpc)
    for endpoint in endpoints:
        probe_worker(endpoint, reply_timeout_s=reply_timeout_s)  # raises WorkerBusyError before we risk it
    argv = [str(server), *(["--rpc", ",".join(endpoints)] if endpoints else []), "--list-devices"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL, env=_child_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolchainError(f"{server} --list-devices failed: {exc}", "check the llama.cpp build") from None
    if done.returncode != 0:
        failed = re.search(r"Failed to connect to (\S+)", done.stdout + done.stderr)
        reason = f"cannot connect to {failed.group(1)}" if failed else f"exit status {done.returncode}"
        raise ToolchainError(f"{server.name} --list-devices failed: {reason}",
                             "check the RPC workers with `llamalaunch devices --rpc …`")
    return parse_list_devices(done.stdout)


def _child_env() -> dict[str, str]:
    return {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def disagreements(devices: Sequence[Device], listed: Sequence[ListedDevice]) -> list[str]:
    """Where our names and order differ from llama-server's list (empty: they agree)."""
    ours = [(device.name, device.endpoint or device.description) for device in devices]
    theirs = [(item.name, item.description) for item in listed]
    if ours == theirs:
        return []
    return [f"we list {', '.join(f'{n} ({d})' for n, d in ours) or 'nothing'}; llama-server lists "
            f"{', '.join(f'{n} ({d})' for n, d in theirs) or 'nothing'}"]
