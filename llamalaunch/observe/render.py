"""Rich renderables for plans, devices and the toolchain. Builds tables; the CLI prints them."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from llamalaunch.model.compare import ComponentRow, within_tolerance
from llamalaunch.observe.console import TITLE_LEFT
from llamalaunch.plan.types import DevicePlan, Plan
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.toolchain.discover import Binary, Toolchain
from llamalaunch.units import MIB, format_bytes


def _slots(plan: DevicePlan) -> str:
    if plan.first_slot is None or plan.n_layers == 0:
        return "-"
    return f"{plan.first_slot}-{plan.first_slot + plan.n_layers - 1}"


def plan_table(plan: Plan) -> Table:
    model = plan.model
    title = (f"{model.name or model.arch} ({model.arch}, {model.n_layer} blocks + output)  "
             f"ctx {plan.ctx_tokens}  layers on devices {plan.n_gpu_layers}/{model.n_slots}")
    table = Table(title=title, title_justify=TITLE_LEFT)
    reserved = any(device.reserved_bytes for device in plan.devices)
    moe = bool(model.expert_layers)
    columns = ["device", "free", "slots", "layers", *(["experts"] if moe else []), "weights", "KV", "compute",
               "overhead", *(["reserved"] if reserved else []), "planned", "spare"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("device", "slots") else "right", no_wrap=True)
    for device in plan.devices:
        if device.excluded:
            free = "?" if device.device.error is not None else format_bytes(device.device.free_bytes)  # down
            table.add_row(device.device.name, free, "-", "0",
                          *(["-"] * (len(columns) - 4)), style="yellow")
            continue
        memory = device.memory
        table.add_row(device.device.name, format_bytes(device.device.free_bytes), _slots(device),
                      str(device.n_layers), *([f"{device.expert_layers}/{device.moe_layers}"] if moe else []),
                      format_bytes(memory.weights_bytes), format_bytes(memory.kv_bytes),
                      format_bytes(memory.compute_bytes), format_bytes(memory.overhead_bytes),
                      *([format_bytes(device.reserved_bytes)] if reserved else []),
                      format_bytes(device.planned_bytes), format_bytes(device.headroom_bytes))
    host = plan.host
    spilled = model.n_slots - plan.n_gpu_layers
    host_free, host_spare = plan.host_free_bytes, plan.host_spare_bytes
    table.add_row("host", format_bytes(host_free) if host_free is not None else "",
                  f"0-{spilled - 1}" if spilled else "-", str(spilled),
                  *([f"{plan.host_moe_layers}/{len(model.expert_layers)}"] if moe else []),
                  format_bytes(host.weights_bytes), format_bytes(host.kv_bytes), format_bytes(host.compute_bytes), "",
                  *([""] if reserved else []), format_bytes(host.total_bytes),
                  format_bytes(host_spare) if host_spare is not None else "", style="dim")
    return table


def command_line(server: str, argv: Sequence[str]) -> str:
    return shlex.join([server, *argv])


def format_tps(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def speed_line(plan: Plan) -> Text | None:
    """est. tok/s under the table: the figures, or which figure is unknown (the plan is by memory then)."""
    speed = plan.speed
    if speed is None:
        return None
    if speed.generation_tps is None:
        return Text(f"est. tok/s: unknown ({', '.join(speed.unknown)} not known: give --device-speed or "
                    "--link); placed by memory", style="dim")
    calibrated = f"; calibrated by earlier runs on {', '.join(speed.calibrated)}" if speed.calibrated else ""
    return Text(f"est. tok/s: generation {format_tps(speed.generation_tps)}, prompt {format_tps(speed.prompt_tps)} "
                f"(one sequence, {speed.fill_tokens} tokens in context{calibrated})")


def alternatives_table(plan: Plan) -> Table:
    """`plan --compare`: the placements that fit, the chosen one first."""
    table = Table(title="placements that fit (est. tok/s, one sequence)", title_justify=TITLE_LEFT)
    for column in ("", "placement", "ctx", "generation", "prompt"):
        table.add_column(column, justify="left" if column in ("", "placement") else "right")
    for alternative in plan.alternatives:
        table.add_row("*" if alternative.chosen else "", alternative.label, str(alternative.ctx_tokens),
                      format_tps(alternative.speed.generation_tps), format_tps(alternative.speed.prompt_tps))
    return table


def plan_view(plan: Plan) -> Group:
    """The table and why devices were left out; the command line is printed unwrapped by the caller."""
    parts: list[Table | Text] = [plan_table(plan)]
    line = speed_line(plan)
    parts += [line] if line is not None else []
    parts += [Text(f"{d.device.name} left out: {d.reason}", style="yellow") for d in plan.devices if d.excluded]
    parts += [Text(note, style="yellow") for note in plan.notes]
    return Group(*parts)


def devices_table(devices: Sequence[Device], host: HostMemory | None, unknown: Sequence[str] = ()) -> Table:
    """`unknown`: names of devices whose memory could not be read (a busy or down worker): "?" rather than 0."""
    table = Table(title="devices in llama.cpp order", title_justify=TITLE_LEFT)
    for column in ("#", "name", "backend", "description", "free", "total", "where"):
        table.add_column(column, justify="right" if column in ("#", "free", "total") else "left")
    for device in devices:
        where = device.endpoint or device.pci_bus_id or ("what-if" if device.assumed else "")
        description = device.description + (f" ({device.note})" if device.note else "")
        free, total = (("?", "?") if device.name in unknown
                       else (format_bytes(device.free_bytes), format_bytes(device.total_bytes)))
        table.add_row(str(device.order), device.name, device.backend, description, free, total, where)
    if host is not None:
        table.add_row("", "host", "CPU", f"{host.cpu_description} ({host.cpu_count} CPUs)",
                      format_bytes(host.free_bytes), format_bytes(host.total_bytes), "", style="dim")
    return table


def toolchain_table(toolchain: Toolchain) -> Table:
    table = Table(title=f"llama.cpp toolchain (llama-server found via {toolchain.source})", title_justify=TITLE_LEFT)
    for column in ("binary", "path", "version", "backend", "knows"):
        table.add_column(column, overflow="fold")
    binaries: list[tuple[str, Binary | None]] = [
        ("llama-server", toolchain.server), ("ggml-rpc-server", toolchain.rpc_server),
        ("llama-fit-params", toolchain.fit_params)]
    for name, binary in binaries:
        if binary is None:
            table.add_row(name, Text("not found", style="yellow"), "", "", "")
        else:
            table.add_row(name, str(binary.path), binary.version, binary.backend,
                          " ".join(sorted(binary.capabilities)))
    return table


def verify_table(rows: Sequence[ComponentRow]) -> Table:
    """`plan --verify`: what the plan said against what llama-server allocated, per device and component."""
    table = Table(title="planned vs llama-server's own buffers (a real load of the plan's argv)", title_justify=TITLE_LEFT)
    for column in ("device", "component", "planned", "llama-server", "difference", "within tolerance"):
        table.add_column(column, justify="left" if column in ("device", "component") else "right", no_wrap=True)
    for row in rows:
        ok = within_tolerance(row)
        table.add_row(row.device, row.component, format_bytes(row.planned_bytes), format_bytes(row.measured_bytes),
                      f"{row.error_bytes / MIB:+.2f} MiB", Text("yes" if ok else "NO", style="green" if ok else "red"))
    return table
