"""What `serve` shows in the foreground: phases, the plan, attempts. Reads events only."""

from __future__ import annotations

import time

from rich.console import Console

from llamalaunch.launch.supervisor import SupervisorEvent
from llamalaunch.observe.render import plan_table

_PHASE_STYLE = {"ready": "bold green", "failed": "bold red", "restarting": "yellow", "stopping": "yellow"}


class ServeConsole:
    """On a terminal: coloured phases and the plan table. Elsewhere (systemd, pipes): plain timestamped lines."""

    def __init__(self, console: Console, tui: bool) -> None:
        self.console = console
        self.tui = tui

    def handle(self, event: SupervisorEvent) -> None:
        if event.kind == "line":
            return  # the child's own lines go to its log file
        if self.tui:
            self._rich(event)
        else:
            self._plain(event)

    def _plain(self, event: SupervisorEvent) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(event.time))
        label = event.phase or event.kind
        self.console.print(f"{stamp} {label}: {event.message}", highlight=False, soft_wrap=True)

    def _rich(self, event: SupervisorEvent) -> None:
        if event.plan is not None:
            self.console.print(plan_table(event.plan))
        style = _PHASE_STYLE.get(event.phase or "", "cyan" if event.kind == "phase" else "yellow")
        label = event.phase or event.kind
        self.console.print(f"[{style}]{label}[/{style}] {event.message}", highlight=False, soft_wrap=True)
