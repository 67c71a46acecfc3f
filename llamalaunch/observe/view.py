"""Rich renderables for a StatusSnapshot: the `status` frame and the foreground view of `serve`.

Reads snapshots only; whoever holds the console prints (or lives) them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llamalaunch.observe.console import TITLE_LEFT
from llamalaunch.observe.snapshot import DeviceStatus, HostStatus, LogEntry, ServerStats, StatusSnapshot
from llamalaunch.units import GIB, MIB

PHASE_STYLE = {"ready": "bold green", "loading": "bold cyan", "starting": "bold cyan", "restarting": "bold yellow",
               "stopping": "bold yellow", "stopped": "bold", "failed": "bold red", "not answering": "bold red"}
BAR_WIDTH = 12
LOG_LEVEL_STYLE = {"W": "yellow", "E": "bold red"}
SOURCE_NOTES = {
    "nvml": "used/free from NVML now (all processes)",
    "rpc probe": "used/free from the RPC probe now (the worker was idle)",
    "log": "used = llama.cpp's buffers from the log, free = free at plan time − used",
    "plan": "used = the plan, free = free at plan time − the plan",
}


def format_duration(seconds: float) -> str:
    """'42s', '5m 03s', '2h 07m', '3d 04h'."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


# --- header --------------------------------------------------------------------------------------------


def header(snapshot: StatusSnapshot) -> Text:
    text = Text()
    if snapshot.running:
        phase = snapshot.phase
        text.append(f"● {phase}", style=PHASE_STYLE.get(phase, "bold"))
    else:
        text.append("○ server gone", style="bold red")
        text.append(f" (last phase {snapshot.recorded_phase or snapshot.phase})", style="red")
    if snapshot.name:
        text.append(f"  {snapshot.name}", style="bold")
    if snapshot.url:
        text.append(f"  {snapshot.url}")
    if (uptime := snapshot.uptime_s) is not None:
        text.append(f"  up {format_duration(uptime)}")
    elif snapshot.running and snapshot.started_at:
        text.append(f"  started {format_duration(snapshot.taken_at - snapshot.started_at)} ago")
    if snapshot.source == "state":
        text.append(f"  restarts {snapshot.restarts}", style="yellow" if snapshot.restarts else "")
        if snapshot.restarts and snapshot.last_restart_reason:
            text.append(f" (last: {snapshot.last_restart_reason})", style="yellow")
        text.append(f"  attempt {len(snapshot.attempts) + 1}", style="yellow" if snapshot.attempts else "")
    return text


def gone_banner(snapshot: StatusSnapshot) -> Text | None:
    if snapshot.running:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.updated_at)) if snapshot.updated_at else "?"
    text = Text(f"{snapshot.gone_reason or 'the server is not running'}.", style="red")
    if snapshot.source == "state":
        detail = f" — {snapshot.phase_detail}" if snapshot.phase_detail else ""
        text.append(f"\nLast state, recorded {when}: phase {snapshot.recorded_phase or snapshot.phase}{detail}",
                    style="dim")
    return text


def model_line(snapshot: StatusSnapshot) -> Text:
    text = Text("model ", style="dim")
    text.append(snapshot.model_name or snapshot.model_path or "unknown", style="bold")
    if snapshot.model_arch:
        text.append(f" ({snapshot.model_arch}, {snapshot.n_layer} blocks + output)")
    if snapshot.ctx_tokens:
        text.append("  ctx ", style="dim")
        text.append(f"{snapshot.ctx_tokens}", style="bold")
    if snapshot.n_gpu_layers is not None and snapshot.n_slots:
        text.append("  layers on devices ", style="dim")
        text.append(f"{snapshot.n_gpu_layers}/{snapshot.n_slots}", style="bold")
    return text


# --- devices -------------------------------------------------------------------------------------------


def memory_bar(ours_bytes: int, used_bytes: int | None, total_bytes: int, width: int = BAR_WIDTH) -> Text:
    """█ llama-server's share, ▒ the rest in use, ░ free; a non-zero share shows at least one cell."""
    if total_bytes <= 0:
        return Text("")
    used = max(used_bytes if used_bytes is not None else ours_bytes, ours_bytes)
    if width == 0:
        return Text(f"{100 * used / total_bytes:3.0f}%")
    ours_cells = min(width, max(1 if ours_bytes > 0 else 0, round(width * ours_bytes / total_bytes)))
    used_cells = min(width, max(ours_cells + (1 if used > ours_bytes else 0), round(width * used / total_bytes)))
    bar = Text()
    bar.append("█" * ours_cells, style="cyan")
    bar.append("▒" * (used_cells - ours_cells), style="magenta")
    bar.append("░" * (width - used_cells), style="dim")
    bar.append(f" {100 * used / total_bytes:3.0f}%")
    return bar


def short_bytes(size: int | None) -> str:
    """At most 8 characters: '35.9 MiB', '187 MiB', '23.5 GiB'."""
    if size is None:
        return "-"
    if abs(size) >= GIB:
        return f"{size / GIB:.1f} GiB"
    return f"{size / MIB:.0f} MiB" if abs(size) >= 100 * MIB else f"{size / MIB:.1f} MiB"


def _ours(device: DeviceStatus, serving: bool) -> int:
    """What llama-server holds there now: its own figures when known, else the plan; nothing once gone."""
    if not serving:
        return 0
    return device.actual_bytes if device.actual_bytes is not None else device.planned_bytes


WIDE_COLUMNS = 106  # below this many columns the bar gives way to a plain percentage (106: a MoE layers cell)


def devices_table(snapshot: StatusSnapshot, bar_width: int = BAR_WIDTH) -> Table:
    """Per device: planned weights/KV/compute, llama.cpp's own total, used/free now; `bar_width` 0: no bar."""
    table = Table(title="memory per device: planned · llama.cpp's own figures · in use now", title_justify=TITLE_LEFT,
                  title_style="bold", box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, collapse_padding=True,
                  show_edge=False)
    for column in ("device", "layers", "weights", "KV", "compute", "planned", "llama.cpp", "used", "free",
                   "memory" if bar_width else "use"):
        table.add_column(column, justify="left" if column in ("device", "memory") else "right", no_wrap=True)
    serving = snapshot.running or snapshot.server_alive
    for device in snapshot.devices:
        if device.excluded:
            table.add_row(device.name, "0", *(["-"] * 7), f"left out: {device.reason}", style="yellow")
            continue
        table.add_row(
            Text(device.name, style="bold"), Text(device.layers_text, style="bold"),
            short_bytes(device.planned_weights_bytes), short_bytes(device.planned_kv_bytes),
            short_bytes(device.planned_compute_bytes), short_bytes(device.planned_bytes),
            short_bytes(device.actual_bytes), short_bytes(device.used_bytes), short_bytes(device.free_bytes),
            memory_bar(_ours(device, serving), device.used_bytes, device.total_bytes or 0, bar_width))
    if snapshot.host is not None:
        table.add_row(*_host_row(snapshot, snapshot.host, bar_width), style="dim")
    return table


class DevicesTable:
    """The devices table, with the bar only where the terminal is wide enough for it."""

    def __init__(self, snapshot: StatusSnapshot) -> None:
        self.snapshot = snapshot

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield devices_table(self.snapshot, BAR_WIDTH if options.max_width >= WIDE_COLUMNS else 0)


def _host_row(snapshot: StatusSnapshot, host: HostStatus, bar_width: int) -> list[RenderableType]:
    spilled = (snapshot.n_slots or 0) - (snapshot.n_gpu_layers or 0)
    layers = str(spilled)
    if snapshot.host_expert_layers:  # as the plan's table: split blocks count as the host's
        layers += f" ({snapshot.host_expert_layers}/{snapshot.moe_layers} experts)"
    ours = host.server_rss_bytes or 0
    return ["host", layers, short_bytes(host.planned_weights_bytes), short_bytes(host.planned_kv_bytes),
            short_bytes(host.planned_compute_bytes), short_bytes(host.planned_bytes), short_bytes(host.actual_bytes),
            short_bytes(host.server_rss_bytes), short_bytes(host.free_bytes),
            memory_bar(ours, host.total_bytes - host.free_bytes, host.total_bytes, bar_width)]


def device_notes(snapshot: StatusSnapshot) -> list[Text]:
    """Where "used" and "free" come from, one line per distinct source ('RPC0, RPC1: ...')."""
    by_note: dict[str, list[str]] = {}
    for device in snapshot.devices:
        if device.excluded:
            continue
        note = SOURCE_NOTES.get(device.memory_source, device.memory_source)
        if device.memory_note:
            note = f"{note} ({device.memory_note})" if device.memory_source in SOURCE_NOTES else device.memory_note
        by_note.setdefault(note, []).append(device.name)
    lines = [Text(f"{', '.join(names)}: {note}", style="dim") for note, names in by_note.items()]
    if snapshot.host is not None:
        used = "used = llama-server's resident memory, " if snapshot.host.server_rss_bytes is not None else ""
        lines.append(Text(f"host: {used}free = available RAM now", style="dim"))
    return lines


# --- server --------------------------------------------------------------------------------------------


def _pair(prompt: float | None, generation: float | None) -> str:
    def one(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    return f"{one(prompt)} / {one(generation)}"


def server_line(stats: ServerStats) -> Text:
    text = Text("slots ", style="dim")
    if stats.slots_total is not None:
        busy = stats.slots_busy or 0
        text.append(f"{busy} busy", style="bold yellow" if busy else "bold")
        text.append(f" / {stats.slots_total - busy} idle")
    else:
        text.append("-")
    text.append("   tok/s prompt / generation: ", style="dim")
    text.append("average ", style="dim")
    text.append(_pair(stats.prompt_tokens_per_s, stats.generation_tokens_per_s), style="bold")
    text.append("  last request ", style="dim")
    text.append(_pair(stats.last_prompt_tokens_per_s, stats.last_generation_tokens_per_s), style="bold")
    if stats.recent_prompt_tokens_per_s is not None or stats.recent_generation_tokens_per_s is not None:
        text.append("  now ", style="dim")
        text.append(_pair(stats.recent_prompt_tokens_per_s, stats.recent_generation_tokens_per_s), style="bold")
    text.append("\nrequests ", style="dim")
    text.append("-" if stats.requests_served is None else f"{stats.requests_served} served", style="bold")
    if stats.requests_processing is not None:
        text.append(f", {stats.requests_processing} processing, {stats.requests_deferred or 0} deferred")
    if stats.generated_tokens_total is not None:
        text.append("   tokens ", style="dim")
        text.append(f"{stats.prompt_tokens_total or 0} prompt, {stats.generated_tokens_total} generated")
        if stats.decoding_tokens:
            text.append(f" (+{stats.decoding_tokens} in the requests running)")
    text.append("   health ", style="dim")
    text.append(stats.health, style="green" if stats.health == "ok" else "yellow")
    return text


def attempts_table(snapshot: StatusSnapshot) -> Table | None:
    if not snapshot.attempts:
        return None
    table = Table(title="OOM ladder: loads that ran out of memory, and what was learnt", title_justify=TITLE_LEFT,
                  title_style="bold yellow")
    for column in ("#", "ctx", "ngl", "layers", "outcome"):
        table.add_column(column, justify="right" if column in ("#", "ctx", "ngl") else "left")
    for attempt in snapshot.attempts:
        table.add_row(str(attempt.number), str(attempt.ctx_tokens), str(attempt.n_gpu_layers), attempt.layers,
                      attempt.outcome)
    return table


def argv_line(argv: Sequence[str]) -> Text:
    import shlex

    text = Text("argv ", style="dim")
    text.append(shlex.join(argv) if argv else "-")
    return text


def log_panel(snapshot: StatusSnapshot, max_lines: int | None = None) -> Panel:
    entries: Sequence[LogEntry] = snapshot.log_lines
    if max_lines is not None:
        entries = entries[-max_lines:] if max_lines > 0 else ()
    body = Text()
    for index, entry in enumerate(entries):
        body.append(("\n" if index else "") + entry.text, style=LOG_LEVEL_STYLE.get(entry.level or "", ""))
        if entry.repeat > 1:
            body.append(f" (×{entry.repeat})", style="dim")
    body.no_wrap = True
    body.overflow = "ellipsis"
    counts = f"{snapshot.log_warnings} warning{'s' * (snapshot.log_warnings != 1)}, " \
             f"{snapshot.log_errors} error{'s' * (snapshot.log_errors != 1)}"
    title = f"log {snapshot.log_path or ''} · {counts} this run"
    return Panel(body if entries else Text("(no lines)", style="dim"), title=title, title_align="left",
                 border_style="red" if snapshot.log_errors else "yellow" if snapshot.log_warnings else "dim")


class FittedPanel:
    """A panel as wide as the terminal; elsewhere (a pipe: no width to fill) as wide as its lines."""

    def __init__(self, panel: Panel) -> None:
        self.panel = panel

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        self.panel.expand = console.is_terminal
        yield self.panel


# --- the frame -----------------------------------------------------------------------------------------


def status_view(snapshot: StatusSnapshot, show_log: bool = True, log_lines: int | None = None,
                footer: str | None = None, extra: Sequence[RenderableType] = ()) -> Group:
    """The whole frame; `log_lines` caps the log pane (the live view fits it to the terminal); `extra`
    goes above the log pane (serve's recent events)."""
    parts: list[RenderableType] = [header(snapshot)]
    if (banner := gone_banner(snapshot)) is not None:
        parts.append(banner)
    parts.append(model_line(snapshot))
    if snapshot.devices or snapshot.host is not None:
        parts.append(DevicesTable(snapshot))
        parts += device_notes(snapshot)
    parts.append(server_line(snapshot.stats))
    if snapshot.estimated_tps is not None:
        parts.append(Text(f"estimated before launch, tok/s prompt / generation: {_pair(*snapshot.estimated_tps)} "
                          "(one sequence)", style="dim"))
    if (attempts := attempts_table(snapshot)) is not None:
        parts.append(attempts)
    parts.append(argv_line(snapshot.argv))
    parts += [Text(note, style="yellow") for note in snapshot.notes]
    parts += list(extra)
    if show_log and snapshot.source == "state":
        parts.append(FittedPanel(log_panel(snapshot, log_lines)))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)
