"""The consoles the CLI prints to: sized by the terminal on a terminal, never cutting anything elsewhere."""

from __future__ import annotations

import copy
import errno
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console, ConsoleOptions, RenderableType
    from rich.segment import Segment
    from rich.table import Table

# Piped or redirected output (a file, `less`, journald, grep) has no width to fit: rich would take 80
# columns (or the terminal's, via stdin) and cut names and numbers with "…". Wide enough for any table.
PIPE_WIDTH = 10_000
T = TypeVar("T")


@functools.cache
def _console_class() -> type[Console]:
    """CliConsole, made on first use: rich costs ~50 ms to import and `--json` output never needs it."""
    from rich.console import Console, ConsoleDimensions
    from rich.table import Table

    class CliConsole(Console):
        """A rich Console whose width, when its output is not a terminal, is PIPE_WIDTH whatever COLUMNS says,
        and whose tables, at whatever depth they are rendered, never cut a cell to fit a terminal (fitted_table)."""

        def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
            if isinstance(renderable, Table):
                renderable = fitted_table(self, renderable, options or self.options)
            return super().render(renderable, options)

        @property  # type: ignore[override]
        def size(self) -> ConsoleDimensions:
            size = Console.size.fget(self)  # type: ignore[attr-defined]
            return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

        @size.setter
        def size(self, new_size: tuple[int, int]) -> None:
            Console.size.fset(self, new_size)  # type: ignore[attr-defined]

        def on_broken_pipe(self) -> None:
            # rich would exit(1) here, a long-running serve or worker too: the caller decides (outliving_readers)
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return CliConsole


def _natural_width(console: Console, table: Table, options: ConsoleOptions) -> int:
    """How wide `table` is when nothing constrains it."""
    return table.__rich_measure__(console, options.update_width(PIPE_WIDTH)).maximum


def _compact(table: Table, gap: int) -> Table:
    """A copy of `table` with `gap` columns between cells, no outer frame and a plain rule under the header."""
    from rich import box

    compact = copy.copy(table)
    if table.box is not None:
        compact.box, compact.show_edge = box.SIMPLE_HEAD, False  # its divider is one blank column
        gap -= 1
    compact.padding, compact.collapse_padding, compact.pad_edge = (0, gap), True, False
    return compact


def _narrowed(console: Console, table: Table, options: ConsoleOptions, fold: bool) -> Table | None:
    """`table` with cells that wrap at spaces, the widest column narrowed first, each down to its longest word
    (with `fold`, then down to one character). Rich narrows every column alike: it folds a header like
    "overhead", cuts words with "…", or leaves a column out. None where even that is too wide."""
    from dataclasses import replace

    measured = [table._measure_column(console, options, column) for column in table.columns]
    widths = [measure.maximum for measure in measured]
    words = [measure.minimum for measure in measured]
    letters = [min(word, 1 + table._get_padding_width(i)) for i, word in enumerate(words)]
    excess = sum(widths) + table._extra_width - options.max_width
    for floors in (words, letters) if fold else (words,):
        while excess > 0 and (narrowable := [i for i, floor in enumerate(floors) if widths[i] > floor]):
            widths[max(narrowable, key=lambda i: widths[i])] -= 1
            excess -= 1
    if excess > 0:
        return None
    narrowed = copy.copy(table)
    narrowed.columns = [replace(column, no_wrap=False, overflow="fold", width=width - table._get_padding_width(i))
                        for i, (column, width) in enumerate(zip(table.columns, widths, strict=True))]
    return narrowed


def _records(console: Console, table: Table) -> RenderableType:
    """`table` one row after another, each cell a line beside its column's header (a blank line between
    rows), under the title wrapped to the terminal: for a terminal too narrow for the columns side by side."""
    from rich.console import Group
    from rich.style import Style
    from rich.table import Table

    records = Table(box=None, show_header=False, padding=(0, 1), pad_edge=False, collapse_padding=True)
    records.add_column(style=table.header_style)
    records.add_column()
    cells = [list(column.cells) for column in table.columns]
    for index, row in enumerate(table.rows):
        if index:
            records.add_row()
        for column, column_cells in zip(table.columns, cells, strict=True):
            records.add_row(column.header, column_cells[index], style=row.style)
    if table.title is None:
        return records
    title = table.title
    if isinstance(title, str):  # as rich renders a title
        title = console.render_str(title, style=Style.pick_first(table.title_style, "table.title"), highlight=False)
    return Group(title, records)


def fitted_table(console: Console, table: Table, options: ConsoleOptions) -> RenderableType:
    """What CliConsole prints for `table`, so that no cell is cut whatever `options.max_width` (the terminal's
    width): rich would cut cells with "…" to fit, and a line wider than the terminal would be cropped or
    wrapped by the terminal, table and all. The one place that decides this for every table the CLI prints.

    `table` as built where it fits (always on a pipe: PIPE_WIDTH); else the first that fits of the layouts
    more compact than it (_compact: two blanks between columns, then one); else the most compact with its
    cells wrapped at spaces, every word whole (_narrowed); else one row after another (_records), whose two
    columns fit most any terminal, folding a word only where it is longer than the line."""
    width = _natural_width(console, table, options)
    if width <= options.max_width:
        return table
    layout = table
    for gap in (2, 1):
        compact = _compact(table, gap)
        if (compact_width := _natural_width(console, compact, options)) < width:  # only ever more compact
            if compact_width <= options.max_width:
                return compact
            layout, width = compact, compact_width
    # words whole (a path or a binary name split in two cannot be copied), else one row after another
    if (narrowed := _narrowed(console, layout, options, fold=False)):
        return narrowed
    if len(table.columns) > 2:
        return _records(console, table)  # fitted in turn, as every table rendered through CliConsole
    return _narrowed(console, layout, options, fold=True) or layout


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


def outliving_readers(show: Callable[[T], None]) -> Callable[[T], None]:
    """`show` for a long-running command (serve, worker), which must not die with whatever reads its output:
    `serve | tee log` and Ctrl-C (tee goes first), `worker | head -1`. A write into a pipe whose reader is
    gone (or a terminal hung up) points that stream at /dev/null and the command goes on: its run state and
    logs still say everything."""

    def guarded(event: T) -> None:
        try:
            show(event)
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.EIO):
                raise
            silence_gone_readers()

    return guarded


def silence_gone_readers() -> None:
    """Standard output and error whose reader has gone (poll says error or hang-up) now write to /dev/null."""
    import select

    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, select.POLLOUT)
    gone = [fd for fd, mask in poller.poll(0) if mask & (select.POLLERR | select.POLLHUP)]
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in gone:
            os.dup2(devnull, fd)
        os.close(devnull)
