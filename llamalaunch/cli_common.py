"""What every command module of the CLI shares: the consoles, the one error handler, JSON output, options
declared from the one table (options.py), the model-or-demo rule. Imports no other cli module."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.observe.console import escape, lazy_console
from llamalaunch.options import OPTIONS_BY_NAME

out = lazy_console()  # rich is imported when something is printed: never on a --json path
err = lazy_console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
# --help as click prints it: wrapped to the terminal, nothing cut with "…" in 80 columns or a pipe (typer's
# rich panels cut option names and squeeze their help into a narrow column there)
PLAIN_HELP = None


class WholeCommandHelp(TyperGroup):
    """A group whose --help lists each command with its whole first sentence, wrapped (click would cut it
    to fit one line with "...")."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        commands = [(name, command) for name in self.list_commands(ctx)
                    if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if commands:
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit=1_000)) for name, command in commands])


def reports_errors(command: F) -> F:
    """Every LaunchError becomes one line on stderr and its exit code; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LaunchError as error:
            print_error(error, as_json=bool(kwargs["as_json"]) if "as_json" in kwargs else json_asked())
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def json_asked() -> bool:
    """Whether the command line asks for --json: for errors before the command runs (a bad LLAMALAUNCH_* value
    or profile, read by the root), whose own parameters are not parsed yet."""
    words = sys.argv[1:]
    return "--json" in (words[:words.index("--")] if "--" in words else words)


def print_error(error: LaunchError, as_json: bool = False, console: Any = err) -> None:
    """One line on stderr; with --json also the error as JSON on stdout: a script reading it gets JSON either way."""
    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    if as_json:
        print_json({"error": error.message, "hint": error.hint, "exit_code": error.exit_code})


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def opt(name: str, hidden: bool = False) -> Any:
    """The typer declaration of option `name` ("ctx", "worker.port_base"): spellings, default and help from
    the table, so the command line, profiles and the environment agree. `hidden`: parsed (to be refused with
    a reason) but not in --help."""
    option = OPTIONS_BY_NAME[name]
    value = list(option.default) if isinstance(option.default, tuple) else option.default
    if not option.flags:
        return typer.Argument(value, help=option.help, metavar=option.metavar)
    if option.kind == "bool":
        return typer.Option(value, *option.flags, help=option.help, hidden=hidden)
    return typer.Option(value, *option.flags, help=option.help, metavar=option.metavar, hidden=hidden)


def given_program(ctx: Any, name: str = "llama_server") -> tuple[str | None, str | None]:
    """(command line or environment value, profile value) of a program option: a profile's path reaches
    the command as the option's, and goes back to find_toolchain as the config file's, so that an error
    names where the path came from."""
    value, source = ctx.params.get(name), ctx.get_parameter_source(name)
    from_profile = (value is not None and source is not None and source.name == "DEFAULT_MAP"
                    and os.environ.get(OPTIONS_BY_NAME[name].env_var) != value)
    return (None, value) if from_profile else (value, None)


def given_by(ctx: Any, name: str) -> str:
    """How an error names where option `name`'s value came from: `--assume`, `LLAMALAUNCH_ASSUME` or `the
    config file's assume` (the environment and the profile both reach the command as its default map)."""
    option = OPTIONS_BY_NAME[name]
    source = ctx.get_parameter_source(name)
    if source is None or source.name != "DEFAULT_MAP":
        return option.label
    return option.env_var if option.env_var in os.environ else f"the config file's {name}"


WHAT_IF_OPTIONS = ("assume", "inventory")


def refuse_what_if(ctx: Any) -> None:
    """serve, and the systemd unit that runs it, load on the devices probed here: what-if devices would plan
    for memory that is not there (-ngl 31 on a CPU build), wherever they come from."""
    for name in WHAT_IF_OPTIONS:
        if ctx.params.get(name):
            raise what_if_refused(given_by(ctx, name))


def what_if_refused(given: str) -> BadInputError:
    return BadInputError(f"{given} gives what-if devices, for plans only", "drop it to serve on the devices probed here")


def chosen_model(ctx: Any) -> tuple[str | None, bool]:
    """(model, demo) for plan, serve and the systemd unit: a model path or --demo, exactly one.

    Both at the same level (both on the command line, or both from the profile and environment) is an
    error; otherwise the command line wins, as it does for every option (--demo over a profile's model).
    """
    model, demo = ctx.params.get("model"), bool(ctx.params.get("demo"))
    if model is not None and model.startswith("-") and not Path(model).exists():  # `plan --demo -- -nkvo`
        raise BadInputError(f"{model!r} is not a model file: {ctx.info_name} takes no llama-server flags after --",
                            "serve takes them after --; the plan's command line is the same without them")
    if model is None and not demo:
        raise BadInputError("no model given", "pass MODEL.gguf, or --demo for the bundled SmolLM2-135M")
    if model is None or not demo:
        return model, demo
    model_rank, demo_rank = _given_rank(ctx, "model"), _given_rank(ctx, "demo")
    if model_rank == demo_rank:
        raise BadInputError(f"both a model ({model}) and --demo given", "drop one: MODEL.gguf, or --demo for the "
                            "bundled SmolLM2-135M")
    return (model, False) if model_rank > demo_rank else (None, True)


def _given_rank(ctx: Any, name: str) -> int:
    source = ctx.get_parameter_source(name)
    return 2 if source is not None and source.name == "COMMANDLINE" else 1
