"""The consoles the CLI prints to: sized by the terminal on a terminal, never cutting anything elsewhere."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from rich.console import Console

# Piped or redirected output (a file, `less`, journald, grep) has no width to fit: rich would take 80
# columns (or the terminal's, via stdin) and cut names and numbers with "…". Wide enough for any table.
PIPE_WIDTH = 10_000


@functools.cache
def _console_class() -> type[Console]:
    """CliConsole, made on first use: rich costs ~50 ms to import and `--json` output never needs it."""
    from rich.console import Console, ConsoleDimensions

    class CliConsole(Console):
        """A rich Console whose width, when its output is not a terminal, is PIPE_WIDTH whatever COLUMNS says."""

        @property  # type: ignore[override]
        def size(self) -> ConsoleDimensions:
            size = Console.size.fget(self)  # type: ignore[attr-defined]
            return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

        @size.setter
        def size(self, new_size: tuple[int, int]) -> None:
            Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    return CliConsole


def cli_console(**kwargs: Any) -> Console:
    return _console_class()(**kwargs)


class _LazyConsole:
    """Stands for a cli_console(**kwargs) made when it is first used (printed to, asked is_terminal)."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self._kwargs = kwargs
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            self._console = cli_console(**self._kwargs)
        return getattr(self._console, name)


def lazy_console(**kwargs: Any) -> Console:
    """A module-level console that imports rich only when something is printed through it."""
    return cast("Console", _LazyConsole(kwargs))


def real_console(console: Console) -> Console:
    """The rich Console itself (made now if still lazy): for rich's own classes (Live) that set its attributes."""
    if isinstance(console, _LazyConsole):
        console.is_terminal  # noqa: B018  # makes it
        assert console._console is not None
        return console._console
    return console


def escape(text: str) -> str:
    """rich.markup.escape, imported when an error is printed rather than at start-up."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def surely_not_a_terminal(stream: Any) -> bool:
    """True when rich would call `stream` no terminal, found without importing rich: not a tty, and
    neither TTY_COMPATIBLE nor FORCE_COLOR (which rich obeys) says otherwise."""
    if os.environ.get("TTY_COMPATIBLE", "") in ("0", "1") or os.environ.get("FORCE_COLOR") is not None:
        return os.environ.get("TTY_COMPATIBLE") == "0"
    isatty = getattr(stream, "isatty", None)
    return isatty is None or not isatty()


# A table title at the left, unpadded: rich's "left" pads its line to the table's width with trailing spaces.
TITLE_LEFT: Literal["default"] = "default"
