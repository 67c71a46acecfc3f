"""Commands for running llamalaunch as a service: `--config` profiles, `config show`, `worker`, `systemd`.

cli.py calls `register(app)`; the shared helpers come from cli_common, never from cli.py (no cycle).
The work is launch/'s (worker.py, systemd_unit.py): these commands parse, call and print.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from llamalaunch.cli_common import (
    PLAIN_HELP,
    WHAT_IF_OPTIONS,
    WholeCommandHelp,
    chosen_model,
    err,
    json_asked,
    opt,
    out,
    print_error,
    print_json,
    refuse_what_if,
    reports_errors,
    what_if_refused,
)
from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.observe.console import outliving_readers
from llamalaunch.options import COMMANDS, check_metrics_port, check_params, same_address

PROFILE_META = "llamalaunch.profile"  # ctx.meta: (Profile | None, settings) of this invocation
RAW_ARGS_META = "llamalaunch.systemd.raw_args"
_REGISTERED = "_llamalaunch_ops_registered"
TAKES_NO_OPTIONS = ("status", "stop", "demo")  # commands no profile key or LLAMALAUNCH_* option applies to


# --- --config ---------------------------------------------------------------------------------------


def apply_profile(ctx: typer.Context, option: Path | None, command: str | None = None) -> None:
    """Load the profile (--config, $LLAMALAUNCH_CONFIG or the default file) and LLAMALAUNCH_* options
    into ctx.default_map: the whole map at the root, one command's part for `command`."""
    from llamalaunch.config import default_map, load_settings

    profile, settings = load_settings(option)
    ctx.meta[PROFILE_META] = (profile, settings)
    defaults = default_map(settings)
    ctx.default_map = defaults if command is None else defaults.get(command, {})


def _on_version_option(value: bool) -> None:
    if value:
        from llamalaunch import __version__

        out.print(f"llamalaunch {__version__}", highlight=False)
        raise typer.Exit()


def root_callback(ctx: typer.Context,
                  config: Annotated[Path | None, typer.Option(
                      "--config", metavar="FILE", help="TOML profile with option values (see configs/). Precedence: command "
                                       "line > LLAMALAUNCH_<OPTION> > profile > defaults. Default: "
                                       "$LLAMALAUNCH_CONFIG, else ~/.config/llamalaunch/config.toml.")] = None,
                  version: Annotated[bool, typer.Option(
                      "--version", help="Print llamalaunch's version and exit.", is_eager=True,
                      callback=_on_version_option)] = False
                  ) -> None:
    if config is None and ctx.invoked_subcommand in TAKES_NO_OPTIONS:
        return  # a bad LLAMALAUNCH_CTX in the shell must not keep `status` from a running server
    apply_profile(ctx, config)


def _on_config_option(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager --config after a command name: its profile replaces the root's for this command."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        apply_profile(ctx, value, ctx.info_name or "")
    except LaunchError as error:
        print_error(error, json_asked())
        raise typer.Exit(error.exit_code) from None
    return value


# Add `config: ConfigOpt = None` to a command to accept `--config FILE` after its name too.
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", metavar="FILE", is_eager=True, callback=_on_config_option,
    help="TOML profile (see configs/); command line > LLAMALAUNCH_<OPTION> > profile > defaults.")]


def _settings(ctx: typer.Context) -> tuple[Any, dict[str, Any]]:
    from llamalaunch.config import load_settings

    if PROFILE_META in ctx.meta:
        return ctx.meta[PROFILE_META]  # type: ignore[no-any-return]
    return load_settings(None)


def config_show(ctx: typer.Context,
                command: Annotated[str, typer.Option("--for", metavar="COMMAND", help="Whose options: serve, plan, devices, "
                                                                   "toolchain or worker.")] = "serve",
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
                config: ConfigOpt = None) -> None:
    """Show the options a command would run with, and where each came from (default, config, env)."""
    from rich.table import Table

    from llamalaunch.config import resolve

    if command not in COMMANDS:
        raise BadInputError(f"--for {command!r} is not a command", "use serve, plan, devices, toolchain or worker")
    profile, settings = _settings(ctx)
    rows = resolve(command, settings)
    if as_json:
        print_json({"profile": str(profile.path) if profile else None, "command": command,
                        "options": [{"key": row.key, "value": row.value, "source": row.source,
                                     "origin": row.origin} for row in rows]})
        return
    table = Table(box=None, pad_edge=False)
    for column in ("option", "value", "from"):
        table.add_column(column)
    for row in rows:
        where = f"env {row.origin}" if row.source == "env" else row.source
        style = "dim" if row.source == "default" else None
        table.add_row(row.key, _show_value(row.value), where, style=style)
    out.print(f"{command} options; profile: {profile.path if profile else 'none'}", highlight=False,
              soft_wrap=True)
    out.print(table)


def _show_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) or "-"
    return str(value).lower() if isinstance(value, bool) else str(value)


# --- worker -------------------------------------------------------------------------------------------


def worker_command(
        ctx: typer.Context, gpus: str = opt("worker.gpus"), port_base: int = opt("worker.port_base"),
        host: str = opt("worker.host"), threads: int | None = opt("worker.threads"),
        rpc_server: str | None = opt("worker.rpc_server"), llama_server: str | None = opt("llama_server"),
        max_restarts: int | None = opt("worker.max_restarts"),
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Hide the workers' own output.")] = False,
        metrics_port: int | None = opt("worker.metrics_port"), metrics_host: str = opt("worker.metrics_host"),
        config: ConfigOpt = None) -> None:
    """Run one ggml-rpc-server per local GPU (or one on the CPU), restart them if they die, print --rpc."""
    from llamalaunch.launch.worker import WorkerRequest, prepare_workers, run_workers

    check_params("worker", ctx.params)
    request = WorkerRequest(gpus=gpus, port_base=port_base, host=host, threads=threads, rpc_server=rpc_server,
                            llama_server=llama_server, max_restarts=max_restarts)
    specs = prepare_workers(request, _say)
    if same_address(host, metrics_host):
        check_metrics_port(metrics_port, [spec.port for spec in specs], "a worker's port (one per GPU from --port-base)")
    attach = None if metrics_port is None else functools.partial(_worker_metrics, metrics_host, metrics_port)
    raise typer.Exit(run_workers(specs, outliving_readers(_worker_view(out, quiet)), max_restarts, attach))


def _say(kind: str, text: str) -> None:
    prefix = "[yellow]warning:[/yellow] " if kind == "warning" else "note: "
    err.print(f"{prefix}{text}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _worker_metrics(host: str, port: int, pool: Any) -> Iterator[None]:
    """/metrics of the workers while the pool runs."""
    from llamalaunch.observe.metrics import MetricsServer, SnapshotCache, WorkerMetrics, WorkerProbe

    metrics = MetricsServer(host, port)
    try:
        metrics.start(WorkerMetrics(SnapshotCache(WorkerProbe(pool.states).rows)))
        out.print(f"Prometheus metrics on {metrics.url}", highlight=False, soft_wrap=True)
        yield
    finally:
        metrics.close()


def _worker_view(console: Any, quiet: bool) -> Callable[[Any], None]:
    def show(event: Any) -> None:
        label = f"{event.worker}: " if event.worker else ""
        if event.kind == "line":
            text = None if quiet else f"[{event.worker}] {event.message}"
        elif event.kind == "ready":
            text = f"{label}listening on {event.message}"
        elif event.kind == "all-ready":
            text = f"ready; on the main host pass: --rpc {event.message}"
        elif event.kind == "exited":
            text = f"{label}{event.message}" + (f" (pid {event.pid})" if event.pid else "")
        else:
            pid = f" (pid {event.pid})" if event.pid and event.kind == "started" else ""
            text = f"{label}{event.kind} {event.message}{pid}"
        if text is not None:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    return show


# --- systemd ------------------------------------------------------------------------------------------


def systemd_command(
        ctx: typer.Context,
        kind: Annotated[str, typer.Argument(
            metavar="KIND", help="server (llamalaunch serve) or worker (llamalaunch worker, a template unit per GPU).")],
        user: Annotated[bool, typer.Option(
            "--user", help="A user unit (systemctl --user) instead of a system unit.")] = False,
        install_units: Annotated[bool, typer.Option("--install", help="Write the unit instead of printing "
                                                                      "it.")] = False,
        unit_dir: Annotated[Path | None, typer.Option("--unit-dir", metavar="DIR", help="Folder to write it to (default: "
                                                                         "systemd's).")] = None,
        run_as: Annotated[str | None, typer.Option("--run-as", metavar="USER", help="User= of a system unit (default: "
                                                                    "you; root: root).")] = None,
        env: Annotated[list[str], typer.Option("--env", metavar="NAME=VALUE", help="Extra Environment= NAME=VALUE (repeatable).")]
        = [],  # noqa: B006
        config: Annotated[Path | None, typer.Option("--config", metavar="FILE", help="Profile the unit runs with "
                                                                     "(ExecStart gets its absolute "
                                                                     "path).")] = None) -> None:
    """Print (or --install) a systemd unit running `serve` or `worker` with the options that follow."""
    from llamalaunch.launch import systemd
    from llamalaunch.launch.systemd_unit import UnitRequest, build_unit

    request = UnitRequest(kind, tuple(_passthrough_args(ctx)), user, run_as, tuple(env), config)
    unit = build_unit(request, lambda command, args, choose_model: _check_options(ctx, command, args, choose_model),
                      lambda command: _path_options(ctx, command),
                      lambda note: err.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True))
    if not install_units:
        sys.stdout.write(unit.file.content)
        return
    folder = unit_dir or systemd.unit_dir(user)
    for path in systemd.install([unit.file], folder):
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    out.print("next:", highlight=False)
    for step in systemd.next_steps(unit.file, user, folder, unit.instances):
        out.print(f"  {step}", markup=False, highlight=False, soft_wrap=True)


class _KeepsSeparator(TyperCommand):
    """Remembers the raw arguments: click drops `--`, which separates serve's options from llama-server's."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[RAW_ARGS_META] = list(args)
        return super().parse_args(ctx, args)


def _passthrough_args(ctx: typer.Context) -> list[str]:
    """ctx.args with the `--` put back where the user wrote it (everything after it is in ctx.args' tail)."""
    raw: list[str] = ctx.meta.get(RAW_ARGS_META, [])
    args = list(ctx.args)
    if "--" not in raw:
        return args
    after = raw[raw.index("--") + 1:]
    if len(after) > len(args) or args[len(args) - len(after):] != after:
        return args
    return [*args[:len(args) - len(after)], "--", *after]


def _path_options(ctx: typer.Context, command: str) -> Any:
    """Which of `command`'s options take a value, and which of those are paths (from its click table)."""
    from llamalaunch.launch.systemd import PathOptions
    from llamalaunch.launch.systemd_unit import UNIT_PATH_OPTIONS, UNIT_PROGRAM_OPTIONS

    target = getattr(ctx.find_root().command, "commands", {})[command]
    takes_value = {spelling: param.name for param in target.params
                   if param.param_type_name == "option" and not getattr(param, "is_flag", False)
                   and not getattr(param, "count", False) for spelling in (*param.opts, *param.secondary_opts)}
    positional = next((param.name for param in target.params if param.param_type_name == "argument"), None)
    return PathOptions(takes_value, paths=UNIT_PATH_OPTIONS, programs=UNIT_PROGRAM_OPTIONS,
                       positional=positional if positional in UNIT_PATH_OPTIONS else None)


def _check_options(ctx: typer.Context, command: str, args: list[str], choose_model: bool = False
                   ) -> Mapping[str, Any]:
    """Parse the options the unit will pass with the real command, so a typo fails now, not at boot
    (with `choose_model`, serve's model-or-demo rule too)."""
    root = ctx.find_root()
    target = getattr(root.command, "commands", {}).get(command)
    if target is None or "--help" in args or "-h" in args:
        return {}
    try:
        with target.make_context(command, list(args), parent=root) as sub:
            if choose_model:
                chosen_model(sub)
            _check_values(command, sub)
            if command == "serve":
                _refuse_profile_what_if(ctx.params.get("config"))
            return dict(sub.params)
    except typer.Exit:
        return {}
    except LaunchError:
        raise
    except Exception as error:  # noqa: BLE001  # click's UsageError lives in typer's private copy of click
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        raise BadInputError(f"{command} options for the unit: {message}",
                            f"check them with `llamalaunch {command} --help`") from None


def _refuse_profile_what_if(config: Path | None) -> None:
    """The unit's own profile (systemd --config) reaches serve only at boot: its what-if devices, now."""
    if config is None:
        return
    from llamalaunch.config import load_profile

    profile = load_profile(config.expanduser().resolve())
    for key in WHAT_IF_OPTIONS:
        if profile.settings.get(key):
            raise what_if_refused(f"{profile.path}: {key}")


def _check_values(command: str, sub: Any) -> None:
    """What the command checks when it starts (bounds, values, serve's arguments after --): at boot a bad
    value would only show in the journal."""
    from llamalaunch.config import check_values

    check_values(command, sub.params)
    if command == "serve":
        from llamalaunch.launch.serve import check_extra_args
        from llamalaunch.launch.state import state_path
        from llamalaunch.plan.parse import parse_listen_host

        check_extra_args(sub.args, bool(sub.params.get("force")))
        parse_listen_host(sub.params["host"])
        if sub.params.get("model") and Path(sub.params["model"]).is_file():  # a damaged model fails at boot too
            from llamalaunch.model.load import load_profile

            load_profile(sub.params["model"], allow_unknown_arch=bool(sub.params.get("generic_arch")))
        state_path(sub.params["name"])  # the run name must make a file name
        refuse_what_if(sub)
    else:
        from llamalaunch.launch.worker import check_host

        check_host(sub.params["host"])


# --- registration -------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the root --config option and the config/worker/systemd commands to `app` (once)."""
    if getattr(app, _REGISTERED, False):
        return
    setattr(app, _REGISTERED, True)
    if app.registered_callback is None:
        app.callback()(reports_errors(root_callback))
    config_app = typer.Typer(help="Show the options a profile and the environment give each command.",
                             no_args_is_help=True, rich_markup_mode=PLAIN_HELP, cls=WholeCommandHelp)
    config_app.command("show")(reports_errors(config_show))
    app.add_typer(config_app, name="config")
    app.command("worker")(reports_errors(worker_command))
    app.command("systemd", cls=_KeepsSeparator,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        reports_errors(systemd_command))
