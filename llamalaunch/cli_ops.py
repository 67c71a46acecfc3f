"""Commands for running llamalaunch as a service: `--config` profiles, `config show`, `worker`, `systemd`.

cli.py calls `register(app)` at its bottom. Nothing here imports cli.py at module level (it imports
this module), so the shared helpers (reports_errors, out, err, print_json) are fetched when needed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from llamalaunch.errors import BadInputError, LaunchError

PROFILE_META = "llamalaunch.profile"  # ctx.meta: (Profile | None, settings) of this invocation
RAW_ARGS_META = "llamalaunch.systemd.raw_args"
# serve's and worker's options that name files: a unit gets them absolute, checked to exist.
UNIT_PATH_OPTIONS = ("model", "api_key_file", "inventory", "mmproj", "draft")
UNIT_PROGRAM_OPTIONS = ("llama_server", "rpc_server")  # a path, or a command name on PATH
_REGISTERED = "_llamalaunch_ops_registered"


def _cli() -> Any:
    from llamalaunch import cli

    return cli


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

        _cli().out.print(f"llamalaunch {__version__}", highlight=False)
        raise typer.Exit()


def root_callback(ctx: typer.Context,
                  config: Annotated[Optional[Path], typer.Option(
                      "--config", help="TOML profile with option values (see configs/). Precedence: command "
                                       "line > LLAMALAUNCH_<OPTION> > profile > defaults. Default: "
                                       "$LLAMALAUNCH_CONFIG, else ~/.config/llamalaunch/config.toml.")] = None,
                  version: Annotated[bool, typer.Option(
                      "--version", help="Print llamalaunch's version and exit.", is_eager=True,
                      callback=_on_version_option)] = False
                  ) -> None:
    apply_profile(ctx, config)


def _on_config_option(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """Eager --config after a command name: its profile replaces the root's for this command."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        apply_profile(ctx, value, ctx.info_name or "")
    except LaunchError as error:
        _cli().err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    return value


# Add `config: ConfigOpt = None` to a command to accept `--config FILE` after its name too.
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", is_eager=True, callback=_on_config_option,
    help="TOML profile (see configs/); command line > LLAMALAUNCH_<OPTION> > profile > defaults.")]


def _settings(ctx: typer.Context) -> tuple[Any, dict[str, Any]]:
    from llamalaunch.config import load_settings

    if PROFILE_META in ctx.meta:
        return ctx.meta[PROFILE_META]  # type: ignore[no-any-return]
    return load_settings(None)


def _command_defaults(ctx: typer.Context, command: str) -> dict[str, Any]:
    root = ctx.find_root().command
    target = getattr(root, "commands", {}).get(command)
    if target is None:
        raise BadInputError(f"--for {command!r} is not a command",
                            "use serve, plan, devices, toolchain or worker")
    return {param.name: param.default for param in target.params if param.name}


def config_show(ctx: typer.Context,
                command: Annotated[str, typer.Option("--for", help="Whose options: serve, plan, devices, "
                                                                   "toolchain or worker.")] = "serve",
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
                config: ConfigOpt = None) -> None:
    """Show the options a command would run with, and where each came from (default, config, env)."""
    from rich.table import Table

    from llamalaunch.config import resolve

    profile, settings = _settings(ctx)
    rows = resolve(command, settings, _command_defaults(ctx, command))
    cli = _cli()
    if as_json:
        cli.print_json({"profile": str(profile.path) if profile else None, "command": command,
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
    cli.out.print(f"{command} options; profile: {profile.path if profile else 'none'}", highlight=False,
                  soft_wrap=True)
    cli.out.print(table)


def _show_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) or "-"
    return str(value).lower() if isinstance(value, bool) else str(value)


# --- worker -------------------------------------------------------------------------------------------


def worker_command(
        gpus: Annotated[str, typer.Option("--gpus", help="GPUs to serve: all, cpu, or CUDA indices like 0,2 "
                                                         "(no GPU: one CPU worker).")] = "all",
        port_base: Annotated[int, typer.Option("--port-base", help="GPU i listens on port-base + i; the CPU "
                                                                   "worker on port-base.")] = 50052,
        host: Annotated[str, typer.Option("--host", help="IPv4 address to bind. Anything but loopback is "
                                                         "reachable without authentication.")] = "127.0.0.1",
        threads: Annotated[Optional[int], typer.Option(
            "-t", "--threads", help="CPU threads (CPU worker default: physical cores).")] = None,
        rpc_server: Annotated[Optional[str], typer.Option(
            "--rpc-server", help="Path of ggml-rpc-server.")] = None,
        llama_server: Annotated[Optional[str], typer.Option(
            "--llama-server", help="llama-server whose build's ggml-rpc-server to use.")] = None,
        max_restarts: Annotated[Optional[int], typer.Option(
            "--max-restarts", help="Give up after this many restarts of a worker (default: never).")] = None,
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Hide the workers' own output.")] = False,
        metrics_port: Annotated[Optional[int], typer.Option(
            "--metrics-port", help="Serve Prometheus metrics of the workers on this port (/metrics).")] = None,
        metrics_host: Annotated[str, typer.Option(
            "--metrics-host", help="Address for --metrics-port (default loopback).")] = "127.0.0.1",
        config: ConfigOpt = None) -> None:
    """Run one ggml-rpc-server per local GPU (or one on the CPU), restart them if they die, print --rpc."""
    from llamalaunch.launch.worker import (
        WorkerPool,
        check_host,
        check_ports_free,
        exposure_warning,
        find_rpc_server,
        select_gpus,
        worker_specs,
    )
    from llamalaunch.launch.process import stop_on_signals
    from llamalaunch.observe.metrics import MetricsServer, SnapshotCache, WorkerMetrics, WorkerProbe
    from llamalaunch.plan.parse import parse_count
    from llamalaunch.probe.gpus import GpuProbe, probe_local_gpus

    cli = _cli()
    bind = check_host(host)
    threads = None if threads is None else parse_count(threads, "-t/--threads", 1, 4096)
    metrics_port = None if metrics_port is None else parse_count(metrics_port, "--metrics-port", 1, 65535)
    if warning := exposure_warning(bind):
        cli.err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    binary = find_rpc_server(rpc_server, llama_server)
    probe = GpuProbe(()) if gpus.strip().lower() == "cpu" else probe_local_gpus()
    selected = select_gpus(gpus, probe.devices, probe.reason)
    if not selected and probe.reason and gpus.strip().lower() != "cpu":
        cli.err.print(f"note: no GPU ({probe.reason}); serving the CPU", highlight=False, soft_wrap=True)
    specs = worker_specs(binary, selected, bind, port_base, threads)
    check_ports_free(specs)
    metrics = MetricsServer(metrics_host, metrics_port) if metrics_port is not None else None
    pool = WorkerPool(specs, _worker_view(cli.out, quiet), max_restarts=max_restarts)
    if metrics is not None:
        metrics.start(WorkerMetrics(SnapshotCache(WorkerProbe(pool.states).rows)))
        cli.out.print(f"Prometheus metrics on {metrics.url}", highlight=False, soft_wrap=True)
    try:
        with stop_on_signals(pool.request_stop):
            code = pool.run()
    finally:
        if metrics is not None:
            metrics.close()
    raise typer.Exit(code)


def _worker_view(console: Any, quiet: bool) -> Callable[[Any], None]:
    def show(event: Any) -> None:
        label = f"{event.worker}: " if event.worker else ""
        if event.kind == "line":
            text = None if quiet else f"[{event.worker}] {event.message}"
        elif event.kind == "ready":
            text = f"{label}listening on {event.message}"
        elif event.kind == "all-ready":
            text = f"ready; on the main host pass: --rpc {event.message}"
        else:
            pid = f" (pid {event.pid})" if event.pid and event.kind in ("started", "exited") else ""
            text = f"{label}{event.kind} {event.message}{pid}"
        if text is not None:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    return show


# --- systemd ------------------------------------------------------------------------------------------


def systemd_command(
        ctx: typer.Context,
        kind: Annotated[str, typer.Argument(
            help="server (llamalaunch serve) or worker (llamalaunch worker, a template unit per GPU).")],
        user: Annotated[bool, typer.Option(
            "--user", help="A user unit (systemctl --user) instead of a system unit.")] = False,
        install_units: Annotated[bool, typer.Option("--install", help="Write the unit instead of printing "
                                                                      "it.")] = False,
        unit_dir: Annotated[Optional[Path], typer.Option("--unit-dir", help="Folder to write it to (default: "
                                                                            "systemd's).")] = None,
        run_as: Annotated[Optional[str], typer.Option("--run-as", help="User= of a system unit (default: "
                                                                       "you; root: root).")] = None,
        env: Annotated[list[str], typer.Option("--env", help="Extra Environment= NAME=VALUE (repeatable).")]
        = [],  # noqa: B006
        config: Annotated[Optional[Path], typer.Option("--config", help="Profile the unit runs with "
                                                                        "(ExecStart gets its absolute "
                                                                        "path).")] = None) -> None:
    """Print (or --install) a systemd unit running `serve` or `worker` with the options that follow."""
    from llamalaunch.launch import systemd

    cli = _cli()
    unit, instances = _build_unit(ctx, kind, user, run_as, env, config, _passthrough_args(ctx))
    if not install_units:
        sys.stdout.write(unit.content)
        return
    folder = unit_dir or systemd.unit_dir(user)
    for path in systemd.install([unit], folder):
        cli.out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    cli.out.print("next:", highlight=False)
    for step in systemd.next_steps(unit, user, folder, instances):
        cli.out.print(f"  {step}", markup=False, highlight=False, soft_wrap=True)


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


def _build_unit(ctx: typer.Context, kind: str, user: bool, run_as: str | None, env: Sequence[str],
                config: Path | None, args: list[str]) -> tuple[Any, list[str]]:
    import os

    from llamalaunch.launch import systemd

    if kind not in ("server", "worker"):
        raise BadInputError(f"unit kind {kind!r} is not known",
                            "use `llamalaunch systemd server` or `... worker`")
    if user and run_as:
        raise BadInputError("--run-as is for system units", "drop --run-as, or drop --user")
    profile_args: list[str] = []
    profile_keys: set[str] = set()
    notes: list[str] = []
    if config is not None:
        from llamalaunch.config import KEYS_BY_NAME, load_profile

        profile = load_profile(config.expanduser().resolve())
        profile_args = ["--config", str(profile.path)]
        profile_keys = set(profile.settings)
        notes += filter(None, [systemd.private_tmp_note("--config", profile.path)])
        notes += filter(None, [systemd.unit_path(str(setting.value), f"{profile.path}: {setting.key} =",
                                                 Path("/"))[1]
                               for setting in profile.settings.values() if KEYS_BY_NAME[setting.key].kind == "path"])
    command = "serve" if kind == "server" else "worker"
    if kind == "worker" and "--" in args:
        raise BadInputError("worker takes no arguments after --", "give worker options only")
    if kind == "worker" and any(arg == "--gpus" or arg.startswith("--gpus=") for arg in args):
        raise BadInputError("--gpus is the unit's instance name", "enable llamalaunch-worker@0 (GPU 0), "
                                                                  "@1, ... or @cpu instead")
    # A profile given here is not in the parse below: then its model or demo key decides at start.
    parsed = _check_options(ctx, command, (["--gpus", "all"] if kind == "worker" else []) + args,
                            choose_model=kind == "server" and not {"model", "demo"} & profile_keys)
    args, path_notes = systemd.absolute_paths(args, _path_options(ctx, command), Path(os.getcwd()))
    for note in [*notes, *path_notes]:
        _cli().err.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    pinned = _pinned_binaries(kind, args, profile_keys)
    options = systemd.UnitOptions(
        launcher=systemd.launcher_argv(),
        args=(*profile_args, command, *(("--gpus", systemd.INSTANCE) if kind == "worker" else ()), *args),
        user_unit=user, run_as=None if user else (run_as or systemd.default_run_as()),
        environment=systemd.unit_environment(kind, user, os.environ, pinned, env),
        read_write_paths=systemd.read_write_paths(kind, user), working_directory=os.getcwd(),
        description=f"llamalaunch: {'llama-server' if kind == 'server' else 'ggml-rpc-server worker'}",
        port_base=int(parsed.get("port_base") or 50052))
    instances = _worker_instances() if kind == "worker" else []
    return systemd.render(kind, options), instances


def _path_options(ctx: typer.Context, command: str) -> Any:
    """Which of `command`'s options take a value, and which of those are paths (from its click table)."""
    from llamalaunch.launch.systemd import PathOptions

    target = getattr(ctx.find_root().command, "commands", {})[command]
    takes_value = {spelling: param.name for param in target.params
                   if param.param_type_name == "option" and not getattr(param, "is_flag", False)
                   and not getattr(param, "count", False) for spelling in (*param.opts, *param.secondary_opts)}
    positional = next((param.name for param in target.params if param.param_type_name == "argument"), None)
    return PathOptions(takes_value, paths=frozenset(UNIT_PATH_OPTIONS), programs=frozenset(UNIT_PROGRAM_OPTIONS),
                       positional=positional if positional in UNIT_PATH_OPTIONS else None)


def _check_options(ctx: typer.Context, command: str, args: list[str], choose_model: bool = False
                   ) -> dict[str, Any]:
    """Parse the options the unit will pass with the real command, so a typo fails now, not at boot
    (with `choose_model`, serve's model-or-demo rule too)."""
    root = ctx.find_root()
    target = getattr(root.command, "commands", {}).get(command)
    if target is None or "--help" in args or "-h" in args:
        return {}
    try:
        with target.make_context(command, list(args), parent=root) as sub:
            if choose_model:
                _cli().chosen_model(sub)
            return dict(sub.params)
    except typer.Exit:
        return {}
    except LaunchError:
        raise
    except Exception as error:  # noqa: BLE001  # click's UsageError lives in typer's private copy of click
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        raise BadInputError(f"{command} options for the unit: {message}",
                            f"check them with `llamalaunch {command} --help`") from None


def _pinned_binaries(kind: str, args: Sequence[str], profile_keys: set[str]) -> dict[str, str]:
    """Binaries found now, pinned with Environment=: the service's PATH is not the user's shell's."""
    from llamalaunch.errors import ToolchainError

    given = {arg.split("=", 1)[0] for arg in args}
    try:
        if kind == "server":
            if "--llama-server" in given or "llama_server" in profile_keys:
                return {}
            from llamalaunch.toolchain.discover import SERVER_ENV, find_toolchain

            return {SERVER_ENV: str(find_toolchain(None).server.path)}
        if {"--rpc-server", "--llama-server"} & given or {"worker.rpc_server", "llama_server"} & profile_keys:
            return {}
        from llamalaunch.launch.worker import RPC_SERVER_ENV, find_rpc_server

        return {RPC_SERVER_ENV: str(find_rpc_server())}
    except ToolchainError as error:
        _cli().err.print(f"[yellow]note:[/yellow] {error}; the unit will search its own PATH",
                         highlight=False, soft_wrap=True)
        return {}


def _worker_instances() -> list[str]:
    from llamalaunch.probe.gpus import probe_local_gpus

    gpus = probe_local_gpus().devices
    return [str(gpu.order) for gpu in gpus] or ["cpu"]


# --- registration -------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the root --config option and the config/worker/systemd commands to `app` (once)."""
    if getattr(app, _REGISTERED, False):
        return
    setattr(app, _REGISTERED, True)
    reports_errors = _cli().reports_errors
    if app.registered_callback is None:
        app.callback()(reports_errors(root_callback))
    config_app = typer.Typer(help="Show the options a profile and the environment give each command.",
                             no_args_is_help=True)
    config_app.command("show")(reports_errors(config_show))
    app.add_typer(config_app, name="config")
    app.command("worker")(reports_errors(worker_command))
    app.command("systemd", cls=_KeepsSeparator,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        reports_errors(systemd_command))
