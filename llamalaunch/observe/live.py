"""Live views: `serve` in the foreground and `status` without --once. Reads events and snapshots only.

On a terminal, a rich Live view of the status snapshot refreshes about once a second; keys: q (serve:
stop the server; status: quit the view) and l (log pane on/off). Elsewhere (systemd, pipes) `serve`
prints plain timestamped lines, one per phase, plan, attempt or warning.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llamalaunch.errors import LaunchError
from llamalaunch.launch.state import list_states, read_state, state_path

if TYPE_CHECKING:  # serve's plain lines need none of the live view: it is imported when it starts
    from rich.console import Console, RenderableType
    from rich.text import Text

    from llamalaunch.launch.supervisor import Supervisor, SupervisorEvent
    from llamalaunch.observe.collector import StatusCollector
    from llamalaunch.observe.snapshot import StatusSnapshot

REFRESH_S = 1.0
_PHASE_STYLE = {"ready": "bold green", "failed": "bold red", "restarting": "yellow", "stopping": "yellow"}


class KeyReader:
    """Single key presses from a terminal, in cbreak mode (no Enter needed; Ctrl-C still interrupts)."""

    def __init__(self, on_key: Callable[[str], None], stream: IO[str] | None = None) -> None:
        self.on_key = on_key
        self.stream = stream if stream is not None else sys.stdin
        self._saved: list[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """False (and nothing started) when the stream is not a terminal."""
        try:
            fd = self.stream.fileno()
            if not os.isatty(fd):
                return False
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        except (OSError, ValueError, termios.error):
            return False
        self._thread = threading.Thread(target=self._read, args=(fd,), daemon=True, name="keys")
        self._thread.start()
        return True

    def _read(self, fd: int) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if ready:
                    data = os.read(fd, 16)
                    if not data:
                        return
                    for char in data.decode(errors="ignore"):
                        self.on_key(char)
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
        if self._saved is not None:
            with contextlib.suppress(OSError, ValueError, termios.error):
                termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None


class StatusLive:
    """A rich Live view of `collect()`, refreshed every `refresh_s` seconds and on `refresh_now()`.

    The log pane is fitted to the terminal's height; `q` calls `on_quit`, `l` toggles the log pane.
    """

    def __init__(self, console: Console, collect: Callable[[], StatusSnapshot], on_quit: Callable[[], None],
                 quit_hint: str = "q quit", refresh_s: float = REFRESH_S,
                 extra: Callable[[], list[RenderableType]] | None = None, keys: bool = True) -> None:
        self.console = console
        self.collect = collect
        self.on_quit = on_quit
        self.quit_hint = quit_hint
        self.refresh_s = refresh_s
        self.extra = extra or (list)
        self.show_log = True
        self.last: StatusSnapshot | None = None
        self._final = False  # the last frame: no footer (no keys, no refreshing)
        self._error: str | None = None
        from rich.live import Live

        self._live = Live(console=console, auto_refresh=False, transient=False)
        self._keys = KeyReader(self._on_key) if keys else None
        self._has_keys = False
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="status-live")

    def start(self) -> None:
        self._has_keys = self._keys.start() if self._keys is not None else False
        self._live.start()
        self._thread.start()

    def refresh_now(self) -> None:
        self._wake.set()

    def stop(self, final_refresh: bool = True) -> None:
        """Stop refreshing; the last frame stays on the screen (taken afresh with `final_refresh`)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self._keys is not None:
            self._keys.stop()
        with self._lock:
            self._final = True
            if final_refresh:
                self._update()
            else:
                self._live.update(self.frame(), refresh=True)
            self._live.stop()

    def _on_key(self, key: str) -> None:
        if key in ("q", "Q"):
            self.on_quit()
        elif key in ("l", "L"):
            self.show_log = not self.show_log
            self.refresh_now()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                if not self._stopped.is_set():
                    self._update()
            self._wake.wait(self.refresh_s)
            self._wake.clear()

    def _update(self) -> None:
        try:
            self.last = self.collect()
            self._error = None
        except LaunchError as error:
            self._error = str(error)
        self._live.update(self.frame(), refresh=True)

    def footer(self) -> str | None:
        if self._final:
            return None
        keys = f"{self.quit_hint} · l log pane {'off' if self.show_log else 'on'}" if self._has_keys else \
            "Ctrl-C to quit"
        return f"{time.strftime('%H:%M:%S')} · refreshes every {self.refresh_s:g} s · {keys}"

    def frame(self) -> RenderableType:
        from rich.text import Text

        from llamalaunch.observe.view import status_view

        if self.last is None:
            return Text(self._error or "collecting ...", style="red" if self._error else "dim")
        extra = [*self.extra(), *([Text(self._error, style="red")] if self._error else [])]
        if self._final:  # the frame left on the screen: a fixed few log lines, it scrolls with what follows
            return status_view(self.last, show_log=self.show_log, log_lines=8, extra=extra)
        without_log = status_view(self.last, show_log=False, footer=self.footer(), extra=extra)
        if not self.show_log:
            return without_log
        height = len(self.console.render_lines(without_log, self.console.options, pad=False))
        room = self.console.height - height - 3  # the pane's two borders, and the cursor's line
        if room < 1:
            return without_log
        return status_view(self.last, show_log=True, log_lines=room, footer=self.footer(), extra=extra)


def run_status_view(console: Console, collector: StatusCollector,
                    refresh_s: float = REFRESH_S) -> StatusSnapshot | None:
    """`status` without --once: the live view until q or Ctrl-C; the last snapshot shown."""
    done = threading.Event()
    view = StatusLive(console, collector.collect, done.set, quit_hint="q quit", refresh_s=refresh_s)
    view.start()
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        view.stop(final_refresh=False)
    return view.last


def interrupt_self() -> None:
    """`q` in serve: the same clean stop as Ctrl-C (serve's signal handler asks the supervisor)."""
    os.kill(os.getpid(), signal.SIGINT)


def find_own_state(name: str | None = None) -> Path | None:
    """The run state file this process (a running `serve`) writes."""
    if name is not None:
        path = state_path(name)
        return path if path.exists() else None
    for path in list_states():
        with contextlib.suppress(LaunchError):
            if read_state(path).launcher_pid == os.getpid():
                return path
    return None


class ServeConsole:
    """What `serve` shows: on a terminal the live status view; elsewhere plain timestamped lines.

    `handle(event)` takes every SupervisorEvent (the child's own lines go to its log file, which the
    view reads). `stop` is what `q` does (default: SIGINT to this process, as Ctrl-C; `attach` a
    supervisor for a stop said as "q pressed"); `name` is the run's name (default: the state file whose
    launcher is this process).
    """

    def __init__(self, console: Console, tui: bool, stop: Callable[[], None] | None = None,
                 name: str | None = None, refresh_s: float = REFRESH_S) -> None:
        self.console = console
        self.tui = tui
        self.stop = stop or interrupt_self
        self.name = name
        self.refresh_s = refresh_s
        self.recent: deque[Text] = deque(maxlen=4)
        self._live: StatusLive | None = None
        self._ended = False

    def attach(self, supervisor: Supervisor) -> None:
        """`q` asks `supervisor` to stop, said as "q pressed" and with exit status 0, not as a SIGINT."""
        self.stop = lambda: supervisor.request_quit("q pressed")

    def handle(self, event: SupervisorEvent) -> None:
        if event.kind == "line":
            return
        if event.phase == "failed":
            # The failure ends serve with its `error:` line (and hint) on stderr: said once, not twice.
            if self._live is not None:
                self.close()
            return
        if not self.tui:
            self._plain(event)
            return
        self.recent.append(_event_text(event))
        if self._live is None and not self._ended:
            self._start_live()
        if self._live is None:
            self._rich(event)  # no state file yet: say it the old way
        elif event.phase in ("stopped", "failed"):
            self.close()
        else:
            self._live.refresh_now()

    def close(self) -> None:
        """Stop the live view, leaving its last frame on the screen."""
        self._ended = True
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    def _start_live(self) -> None:
        path = find_own_state(self.name)
        if path is None:
            return
        from llamalaunch.observe.collector import StatusCollector
        from llamalaunch.observe.target import StatusTarget

        collector = StatusCollector(StatusTarget(path, None))
        self._live = StatusLive(self.console, collector.collect, self.stop, quit_hint="q stop the server",
                                refresh_s=self.refresh_s, extra=lambda: list(self.recent))
        self._live.start()
        atexit.register(self.close)  # an error that ends serve early must not leave the terminal in cbreak

    def _plain(self, event: SupervisorEvent) -> None:
        """One line as it is (no rich markup: a message is text; and serve under systemd never loads rich)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(event.time))
        label = event.phase or event.kind
        sys.stdout.write(f"{stamp} {label}: {event.message}\n")
        sys.stdout.flush()

    def _rich(self, event: SupervisorEvent) -> None:
        if event.plan is not None:
            from llamalaunch.observe.render import plan_table

            self.console.print(plan_table(event.plan))
        self.console.print(_event_text(event), highlight=False, soft_wrap=True)


def _event_text(event: SupervisorEvent) -> Text:
    from rich.text import Text

    style = _PHASE_STYLE.get(event.phase or "", "cyan" if event.kind == "phase" else "yellow")
    text = Text(time.strftime("%H:%M:%S ", time.localtime(event.time)), style="dim")
    text.append(event.phase or event.kind, style=style)
    text.append(f" {event.message}")
    return text

