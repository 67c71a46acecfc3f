"""Live device memory: NVML for local CUDA devices, the RPC probe for idle workers, the plan's figures otherwise."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamalaunch.observe.plan_devices import rpc_workers
from llamalaunch.probe.gpus import probe_local_gpus
from llamalaunch.probe.nvml import NvmlGpu, read_nvml_gpus
from llamalaunch.probe.rpc import RpcProbeError, WorkerBusyError, WorkerReport, probe_worker

ProbeWorker = Callable[[str], WorkerReport]


def quick_probe(endpoint: str) -> WorkerReport:
    return probe_worker(endpoint, connect_timeout_s=0.5, reply_timeout_s=1.0)


@dataclass(frozen=True)
class LiveMemory:
    used_bytes: int | None
    free_bytes: int | None
    source: str
    note: str | None = None
    uuid: str | None = None  # a GPU's, when NVML sees it


class MemoryReader:
    """Live device memory: NVML for CUDA devices, the RPC probe for idle workers; the plan otherwise."""

    def __init__(self, read_gpus: Callable[[], Sequence[NvmlGpu]] = read_nvml_gpus,
                 probe: ProbeWorker = quick_probe) -> None:
        self.read_gpus = read_gpus
        self.probe = probe

    def read(self, devices: Sequence[dict[str, Any]], actual: Mapping[str, int | None],
             workers_in_use: bool) -> list[LiveMemory]:
        cuda = ({d.name: d for d in probe_local_gpus(self.read_gpus).devices}
                if any(d.get("backend") == "CUDA" for d in devices) else {})
        reports: dict[str, WorkerReport | RpcProbeError] = {}
        workers = rpc_workers(devices)
        found = []
        for device in devices:
            endpoint = device.get("endpoint")
            names = workers.get(endpoint, []) if endpoint else []
            index = names.index(device["name"]) if device["name"] in names else 0  # inside its worker
            if device.get("error"):  # a worker that was down when planned, left out: not asked again
                found.append(LiveMemory(None, None, "none", f"down when planned: {device['error']}"))
            elif device.get("backend") == "CUDA":
                found.append(self._cuda(device, cuda))
            elif device.get("backend") == "RPC" and endpoint and not device.get("assumed"):
                if workers_in_use:
                    found.append(_from_plan(device, actual.get(device["name"]),
                                            "worker busy serving our llama-server: not probed"))
                    continue
                if endpoint not in reports:
                    reports[endpoint] = self._probe(endpoint)
                found.append(_rpc(device, index, reports[endpoint], actual.get(device["name"])))
            else:
                found.append(_from_plan(device, actual.get(device["name"]), "not measurable: the plan's figures"))
        return found

    def _probe(self, endpoint: str) -> WorkerReport | RpcProbeError:
        try:
            return self.probe(endpoint)
        except RpcProbeError as error:
            return error

    @staticmethod
    def _cuda(device: dict[str, Any], cuda: Mapping[str, Any]) -> LiveMemory:
        gpu = cuda.get(device["name"])
        if gpu is None:
            return LiveMemory(None, None, "none", f"NVML does not see {device['name']} from here")
        note = None if gpu.description == device.get("description") else \
            f"NVML's {device['name']} here is {gpu.description}, not {device.get('description')}"
        return LiveMemory(gpu.total_bytes - gpu.free_bytes, gpu.free_bytes, "nvml", note, gpu.uuid)


def _from_plan(device: dict[str, Any], actual_bytes: int | None, why: str) -> LiveMemory:
    used = actual_bytes if actual_bytes is not None else int(device["planned_bytes"])
    source = "log" if actual_bytes is not None else "plan"
    free = int(device["free_bytes"]) - used
    return LiveMemory(used, free, source, why)


def _rpc(device: dict[str, Any], index: int, report: WorkerReport | RpcProbeError,
         actual_bytes: int | None) -> LiveMemory:
    if isinstance(report, WorkerBusyError):
        return _from_plan(device, None, "worker busy serving another client: the plan's figures")
    if isinstance(report, RpcProbeError):
        return LiveMemory(None, None, "none", report.message)
    if index >= len(report.devices):
        return LiveMemory(None, None, "none", f"worker {report.endpoint} has no device {index}")
    memory = report.devices[index]
    return LiveMemory(memory.total_bytes - memory.free_bytes, memory.free_bytes, "rpc probe")
