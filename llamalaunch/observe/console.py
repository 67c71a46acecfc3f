"""The consoles the CLI prints to: sized by the terminal on a terminal, never cutting anything elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

# Piped or redirected output (a file, `less`, journald, grep) has no width to fit: rich would take 80
# columns (or the terminal's, via stdin) and cut names and numbers with "…". Wide enough for any table.
PIPE_WIDTH = 10_000


class CliConsole(Console):
    """A rich Console whose width, when its output is not a terminal, is PIPE_WIDTH whatever COLUMNS says."""

    @property  # type: ignore[override]
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def cli_console(**kwargs: Any) -> Console:
    return CliConsole(**kwargs)
