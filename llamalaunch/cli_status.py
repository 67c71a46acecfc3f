"""`llamalaunch status`: what a running `serve` (or any llama-server by --url) is doing, and where every MiB went."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llamalaunch.cli_common import print_error
from llamalaunch.errors import BadInputError, LaunchError, NotRunningError
from llamalaunch.observe.console import cli_console, escape

if TYPE_CHECKING:
    from llamalaunch.observe.snapshot import StatusSnapshot

EXIT_GONE = NotRunningError.exit_code  # the server is not running (its last state is shown, if any)


def status(name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="Which serve run (see `serve --name`).")]
           = None,
           url: Annotated[str | None, typer.Option("--url", metavar="URL", help="Any llama-server, e.g. http://127.0.0.1:8080.")]
           = None,
           once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="Print the same data as JSON and exit.")] = False,
           api_key_file: Annotated[Path | None, typer.Option("--api-key-file", metavar="FILE", help="File with the server's "
                                                                                      "API key.")] = None,
           log_lines: Annotated[int, typer.Option("--log-lines", metavar="N", min=0, help="Log lines in a --once frame.")] = 12,
           ) -> None:
    """Show a running server: memory per device (planned, llama.cpp's, live), slots, tokens/s, log.

    Live until q or Ctrl-C on a terminal; one frame when the output is not a terminal (as --once);
    exit status 3 when no server is running (with --once/--json: its last state is shown).
    """
    out = cli_console()
    err = cli_console(stderr=True)
    try:
        from llamalaunch.launch.http import read_api_key
        from llamalaunch.observe.collector import StatusCollector
        from llamalaunch.observe.snapshot import snapshot_to_dict
        from llamalaunch.observe.target import resolve_target
        from llamalaunch.observe.view import status_view

        api_key = read_api_key(api_key_file) if api_key_file is not None else None
        collector = StatusCollector(resolve_target(name, url), api_key=api_key)
        snapshot = collector.collect()  # a wrong target is one error line, before any live view starts
        if not as_json:  # JSON says running: false for scripts; people get the reason, not an empty frame
            refuse_nothing_there(snapshot)
        if as_json:
            sys.stdout.write(json.dumps(snapshot_to_dict(snapshot), indent=2) + "\n")
        elif once or not out.is_terminal:  # a pipe or a file gets one frame, not a live view's escapes
            out.print(status_view(snapshot, log_lines=log_lines))
        else:
            from llamalaunch.observe.live import run_status_view

            run_status_view(out, collector)
            return
    except LaunchError as error:
        print_error(error, as_json, err)
        raise typer.Exit(error.exit_code) from None
    if not snapshot.running:
        raise typer.Exit(EXIT_GONE)


class NothingAnswersError(NotRunningError):
    """A bare --url where nothing answers."""


def refuse_nothing_there(snapshot: StatusSnapshot) -> None:
    """A bare --url where nothing answers has no run state to show: one line, not a frame of dashes."""
    if snapshot.source == "url" and not snapshot.running:
        plain = snapshot.url.replace("https://", "http://", 1)
        raise NothingAnswersError(f"nothing answers at {snapshot.url}", (
            f"llama-server speaks plain HTTP unless built with SSL: try --url {plain}" if plain != snapshot.url else
            "is the server running? `llamalaunch status --name NAME` for a local run"))


def stop(name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="Which serve run (see `serve --name`).")]
         = None,
         timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", min=0,
                                                help="How long to wait for it to stop (0: send and return).")] = 60.0) -> None:
    """Stop a running `serve` (the only one, or --name) as Ctrl-C would: llama-server first, then the launcher.

    Exit status 3 when no server is running.
    """
    out = cli_console()
    err = cli_console(stderr=True)
    try:
        from llamalaunch.launch.state import find_state, is_live, is_system_run
        from llamalaunch.launch.stop import stop_run
        from llamalaunch.launch.systemd import SERVER_UNIT
        from llamalaunch.observe.target import resolve_target

        if name is not None and find_state(name) is None:
            raise NotRunningError(f"no server named {name!r} has run here",
                                  "`llamalaunch status` shows the run there is, if any")
        target = resolve_target(name, takes_url=False)
        if target.state_path is None:  # resolve_target gives a state file whenever no --url is given
            raise NotRunningError("no server to stop", "start one with `llamalaunch serve`")
        if is_system_run(target.state_path) and is_live(target.state_path):  # systemd would not know why it ended
            raise BadInputError(f"server {target.state_path.stem!r} runs as the systemd service "
                                f"{SERVER_UNIT.removesuffix('.service')}",
                                f"stop it with `sudo systemctl stop {SERVER_UNIT.removesuffix('.service')}`")
        state = stop_run(target.state_path, timeout)
    except LaunchError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    done = "stopped" if timeout > 0 else "asked to stop (SIGTERM sent, not waited for)"
    out.print(f"{done} {escape(state.name)} ({escape(state.url)}, launcher pid {state.launcher_pid})",
              highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the `status` and `stop` commands to the llamalaunch app."""
    app.command("status")(status)
    app.command("stop")(stop)
