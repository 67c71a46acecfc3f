"""Every storable option of plan, serve, devices, toolchain and worker, defined once: its name, the command
line's spellings, its kind, its bounds, its default and its help.

The CLI declares its typer options from this table, config.py reads profiles and LLAMALAUNCH_* variables
with it, and ServeRequest/ServeOptions take their defaults from it, so the three cannot disagree. Light on
purpose (no typer, no parsers; the bottom layer): the CLI reads it at import, plan/ and launch/ read its
bounds and defaults; the value checks beyond kind and bounds are config.py's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamalaunch.errors import BadInputError

ENV_PREFIX = "LLAMALAUNCH_"
# LLAMALAUNCH_* variables that are not options (folders, binaries, the setup script's CUDA switch): not typos
OTHER_ENV_VARS = frozenset(ENV_PREFIX + name for name in (
    "HOME", "CACHE", "CONFIG", "LLAMA_SERVER", "CUDA_ARCH", "SYSTEMD_DIR", "CUDA"))
WORKER_SECTION = "worker"
LLAMA_SERVER_PORT = 8080  # llama-server's own default: the URL stays the same from run to run
MAX_COUNT = 1 << 20  # a count nobody means beyond: restarts, batch sizes

PLAN_SERVE = ("plan", "serve")
PROBING = ("plan", "serve", "devices")
COMMANDS = ("serve", "plan", "devices", "toolchain", "worker")


@dataclass(frozen=True)
class Option:
    """One option: `param` is the command function's parameter (click's default_map key)."""

    param: str
    kind: str  # how a TOML or environment value becomes the command line's value (config.py's converters)
    commands: tuple[str, ...]
    allowed: str  # what a value may be, for error messages (bounded numbers: the noun; the range is added)
    default: Any = None
    flags: tuple[str, ...] = ()  # the command line's spellings; () for the model argument and extra_args
    help: str = ""
    bounds: tuple[float, float] | None = None  # numbers: inclusive range
    section: str = ""  # "" (top level) or "worker"
    env: str | None = None  # the environment variable, where it is not LLAMALAUNCH_<SECTION>_<KEY>

    @property
    def name(self) -> str:
        return f"{self.section}.{self.param}" if self.section else self.param

    @property
    def env_var(self) -> str:
        return self.env or ENV_PREFIX + self.name.replace(".", "_").upper()

    @property
    def label(self) -> str:
        """How error messages name it on the command line: `-np/--parallel`."""
        return "/".join(flag.split("/")[0] for flag in self.flags) or self.param

    @property
    def description(self) -> str:
        """`allowed`, with the range for a bounded number: "a slot count from 1 to 256"."""
        if self.bounds is None:
            return self.allowed
        return f"{self.allowed} from {show_number(self.bounds[0])} to {show_number(self.bounds[1])}"

    @property
    def metavar(self) -> str:
        """How --help shows the option's value: `--budget NAME=SIZE`, `-ngl N|all|auto`."""
        return METAVARS.get(self.name) or KIND_METAVARS.get(self.kind, "TEXT")

    def out_of_bounds(self, value: float) -> bool:
        return self.bounds is not None and (math.isnan(value) or not self.bounds[0] <= value <= self.bounds[1])


def show_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else str(int(value))


_SIZE = "a size like 1.5GiB, 512MiB or 0"
_TABLE = 'a table of device names to sizes, like { CUDA1 = "1GiB" }'
_BOOL = "true or false"
_CACHE_TYPE = "a cache type llama.cpp knows, like f16, q8_0 or q4_0"
_W = WORKER_SECTION
# --help's names for values (typer's own would be <str>, <list[str]>): by kind, then by option where it says more
KIND_METAVARS = {"tokens": "TOKENS", "int": "N", "float": "SECONDS", "size": "SIZE", "sizes": "NAME=SIZE",
                 "path": "FILE", "program": "PATH", "names": "NAME,...", "list": "NAME", "layers": "N|all|auto",
                 "switch": "on|off|auto", "gpus": "all|cpu|0,2", "str": "TEXT"}
METAVARS = {"model": "MODEL", "ctx": "TOKENS|max", "rpc": "HOST:PORT", "assume": "NAME=FREE[/TOTAL]",
            "link": "NAME=RATE/ROUNDTRIP", "device_speed": "NAME=SPEED", "cache_type_k": "TYPE",
            "cache_type_v": "TYPE", "host_weights": "auto|pinned|mapped|repacked", "prefer": "context|speed",
            "host": "ADDRESS", "metrics_host": "ADDRESS", "worker.host": "ADDRESS", "port": "PORT",
            "metrics_port": "PORT", "worker.port_base": "PORT", "worker.metrics_port": "PORT",
            "worker.metrics_host": "ADDRESS", "name": "NAME"}
# No square brackets in help texts: typer renders them as rich markup ("[/TOTAL]" is a closing tag).
OPTIONS: tuple[Option, ...] = (
    Option("model", "path", PLAN_SERVE, "a GGUF file path (relative to the profile's folder)",
           help="GGUF model (first shard of a split model)."),
    Option("demo", "bool", PLAN_SERVE, _BOOL, False, ("--demo",),
           "Use the bundled demo model (SmolLM2-135M-Instruct)."),
    Option("ctx", "tokens", PLAN_SERVE, 'a context like "16k", 16384 or "max"', "max",
           ("-c", "--ctx-size", "--ctx"), "Context: 16k, 16384 or max."),
    Option("ctx_min", "tokens", PLAN_SERVE, 'a token count like "2k" or 2048', "256", ("--ctx-min",),
           "Smallest context to accept when shrinking."),
    Option("parallel", "int", PLAN_SERVE, "a slot count", 4, ("-np", "--parallel"),
           "Server slots (llama-server's default: 4).", bounds=(1, 256)),
    Option("kv_unified", "bool", PLAN_SERVE, _BOOL, True, ("-kvu/-no-kvu", "--kv-unified/--no-kv-unified"),
           "Unified KV cache."),
    Option("batch", "int", PLAN_SERVE, "a batch size", 2048, ("-b", "--batch-size"), "Logical batch size.",
           bounds=(1, MAX_COUNT)),
    Option("ubatch", "int", PLAN_SERVE, "a batch size", 512, ("-ub", "--ubatch-size"), "Physical batch size.",
           bounds=(1, MAX_COUNT)),
    Option("cache_type_k", "str", PLAN_SERVE, _CACHE_TYPE, "f16",
           ("-ctk", "--cache-type-k"), "K cache type (f16, q8_0, q4_0, ...)."),
    Option("cache_type_v", "str", PLAN_SERVE, _CACHE_TYPE, "f16",
           ("-ctv", "--cache-type-v"), "V cache type (quantized needs -fa)."),
    Option("flash_attn", "switch", PLAN_SERVE, "on, off, auto (or true/false)", "auto",
           ("-fa", "--flash-attn"), "Flash attention: on, off or auto."),
    Option("swa_full", "bool", PLAN_SERVE, _BOOL, False, ("--swa-full",),
           "Full-size cache for sliding-window layers."),
    Option("rpc", "list", PROBING, 'a list of workers like ["10.0.0.5:50052"]', (), ("--rpc",),
           "RPC workers HOST:PORT (comma-separated or repeated)."),
    Option("assume", "sizes", PROBING, 'a table of what-if devices, like { CUDA0 = "24GiB" }', (), ("--assume",),
           "What-if device NAME=FREE or NAME=FREE/TOTAL, e.g. CUDA0=24GiB (CPU=SIZE: the host's RAM); no probe runs."),
    Option("generic_arch", "bool", PLAN_SERVE, f"{_BOOL}: plan unknown architectures with a generic estimate",
           False, ("--generic-arch",),
           "Plan an architecture llamalaunch does not know with a conservative generic estimate."),
    Option("mmproj", "path", PLAN_SERVE, "a multimodal projector GGUF, reserved on the first device", None,
           ("--mmproj",), "Multimodal projector: reserved and pinned to the first device."),
    Option("draft", "path", PLAN_SERVE, "a draft model GGUF for speculative decoding, reserved on the first device",
           None, ("--draft",), "Draft model for speculative decoding: reserved and pinned to the first device."),
    Option("inventory", "path", PROBING, "a file of what-if devices, one NAME=FREE[/TOTAL] a line", None,
           ("--inventory",), "File of what-if devices, one NAME=FREE or NAME=FREE/TOTAL a line."),
    Option("device", "names", PLAN_SERVE, 'a list of devices in order, like ["CUDA0", "RPC0"]', None,
           ("-dev", "--device"), "Devices to use, in order: CUDA0,RPC0 (none: the CPU only)."),
    Option("exclude", "list", PLAN_SERVE, 'a list of device names, like ["CUDA1"]', (), ("--exclude",),
           "Leave a device out (repeatable)."),
    Option("reserve", "sizes", PLAN_SERVE, _TABLE, (), ("--reserve",),
           "Keep NAME=SIZE free on a device, e.g. CUDA1=1.5GiB."),
    Option("budget", "sizes", PLAN_SERVE, _TABLE, (), ("--budget",), "Never plan more than NAME=SIZE on a device."),
    Option("margin", "size", PLAN_SERVE, _SIZE, None, ("--margin",),
           "Free memory kept on every device (default 64MiB; 5% of a device with less than 1.25GiB, at least "
           "8MiB)."),
    Option("cpu_spill", "bool", PLAN_SERVE, _BOOL, False, ("--cpu-spill",),
           "Keep the first layers on the CPU when the model does not fit."),
    Option("gpu_layers", "layers", PLAN_SERVE, "a layer count, all or auto", "auto", ("-ngl", "--gpu-layers"),
           "Layers on the devices, as llama.cpp's -ngl counts them (the output layer included): a count, all, "
           "or auto: as many as fit."),
    Option("cpu_experts", "int", PLAN_SERVE, "a MoE layer count", None, ("--cpu-experts",),
           "MoE: keep the routed experts of the first N MoE layers in host memory (default: as many on the "
           "devices as fit).", bounds=(0, 100_000)),
    Option("host_weights", "str", PLAN_SERVE, "auto, pinned, mapped or repacked", "auto", ("--host-weights",),
           "Weights left in host memory: pinned (-lm none: prompts stream them to a GPU 4-6x as fast, slower "
           "load), mapped (the file mapped: fastest load) or repacked (--no-host: the CPU's own layout, prompts "
           "on the CPU); auto: pinned with a GPU in the plan, mapped without."),
    Option("prefer", "str", PLAN_SERVE, "context or speed", "context", ("--prefer",),
           "When placements differ: context (the largest context, then the fastest) or speed (the fastest, then "
           "the largest context)."),
    Option("link", "sizes", PLAN_SERVE, 'a table of RPC devices to links, like { RPC0 = "1Gbit/0.3ms" }', (),
           ("--link",), "What-if network to an RPC worker NAME=RATE/ROUNDTRIP, e.g. RPC0=1Gbit/0.3ms (default: "
                        "measured by the probe)."),
    Option("device_speed", "sizes", PLAN_SERVE, 'a table of devices to speeds, like { RPC0 = "20GB:500GFLOPS" }',
           (), ("--device-speed",), "What-if speed NAME=BANDWIDTH or NAME=BANDWIDTH:FLOPS, e.g. "
                                    "RPC0=20GB:500GFLOPS (per second; CPU for the host)."),
    Option("fill", "tokens", ("plan",), 'a context fill for the speed estimate, like "8k"', None, ("--fill",),
           "Context fill for the speed estimate, e.g. 8k (default: half the context)."),
    Option("compare", "bool", ("plan",), f"{_BOOL}: list the placements that fit with their estimated speed",
           False, ("--compare",), "Also list the best placements that fit, with context and estimated speed."),
    Option("overhead", "sizes", PLAN_SERVE, 'a table of device names to sizes, like { CUDA0 = "600MiB" }', (),
           ("--overhead",), "Memory outside llama.cpp's accounting, NAME=SIZE or BACKEND=SIZE (CUDA context)."),
    Option("calibrate", "bool", PLAN_SERVE, f"{_BOOL}: measure the overhead of devices seen for the first time",
           True, ("--calibrate/--no-calibrate",),
           "Measure the overhead of a device seen for the first time (a second's load of a small model)."),
    Option("llama_server", "program", (*PLAN_SERVE, "toolchain", "worker"),
           "a path to llama-server (or its folder), or a command on PATH", None, ("--llama-server",),
           "Path of llama-server to use (worker: the ggml-rpc-server of its build)."),
    Option("host", "str", ("serve",), "an address to listen on, like 127.0.0.1", "127.0.0.1", ("--host",),
           "Address to listen on."),
    Option("port", "int", ("serve",), "a port", LLAMA_SERVER_PORT, ("--port",),
           "Port (llama-server's default; 0: any free one).", bounds=(0, 65535)),
    Option("name", "str", ("serve",), "a run name", "default", ("--name",), "Run name, for `status --name`."),
    Option("api_key_file", "path", ("serve",), "a path to a file holding the API key", None, ("--api-key-file",),
           "File with the API key."),
    Option("max_attempts", "int", ("serve",), "a count", 3, ("--max-attempts",), "Loads tried on out-of-memory.",
           bounds=(1, 100)),
    Option("max_restarts", "int", ("serve",), "a count", 5, ("--max-restarts",), "Restarts after crashes.",
           bounds=(0, MAX_COUNT)),
    Option("backoff", "float", ("serve",), "seconds", 1.0, ("--backoff",),
           "First restart delay in seconds (doubles, at most 30).", bounds=(0, 3600)),
    Option("load_timeout", "float", ("serve",), "seconds", 600.0, ("--load-timeout",),
           "Seconds without progress before a load counts as stalled.", bounds=(0.1, 7 * 86400)),
    Option("health_interval", "float", ("serve",), "seconds", 5.0, ("--health-interval",),
           "Once ready, ask /health this often (seconds; each answer may take as long); 0: no liveness checks.",
           bounds=(0, 3600)),
    Option("health_misses", "int", ("serve",), "a count", 3, ("--health-misses",),
           "Unanswered /health checks in a row after which a hung llama-server is killed and restarted.",
           bounds=(1, 1000)),
    Option("extra_args", "args", ("serve",), 'a list of llama-server arguments, like ["--metrics"]', ()),
    Option("metrics_port", "int", ("serve",), "a port for /metrics", None, ("--metrics-port",),
           "Serve Prometheus metrics on this port (/metrics).", bounds=(1, 65535)),
    Option("metrics_host", "str", ("serve",), "an address for /metrics, like 127.0.0.1", "127.0.0.1",
           ("--metrics-host",), "Address for --metrics-port (default loopback)."),
    Option("gpus", "gpus", ("worker",), 'all, cpu, or GPU indices like "0,2" or [0, 2]', "all", ("--gpus",),
           "GPUs to serve: all, cpu, or CUDA indices like 0,2 (no GPU: one CPU worker).", section=_W),
    Option("port_base", "int", ("worker",), "a port", 50052, ("--port-base",),
           "GPU i listens on port-base + i; the CPU worker on port-base.", bounds=(1, 65535), section=_W),
    Option("host", "str", ("worker",), "an IPv4 address to bind, like 127.0.0.1", "127.0.0.1", ("--host",),
           "IPv4 address to bind. Anything but loopback is reachable without authentication.", section=_W),
    Option("threads", "int", ("worker",), "a thread count", None, ("-t", "--threads"),
           "CPU threads (CPU worker default: physical cores).", bounds=(1, 4096), section=_W),
    Option("rpc_server", "program", ("worker",), "a path to ggml-rpc-server", None, ("--rpc-server",),
           "Path of ggml-rpc-server.", section=_W, env="LLAMALAUNCH_RPC_SERVER"),  # like LLAMALAUNCH_LLAMA_SERVER
    Option("max_restarts", "int", ("worker",), "a count", None, ("--max-restarts",),
           "Give up after this many restarts of a worker (default: never).", bounds=(0, MAX_COUNT), section=_W),
    Option("metrics_port", "int", ("worker",), "a port for /metrics", None, ("--metrics-port",),
           "Serve Prometheus metrics of the workers on this port (/metrics).", bounds=(1, 65535), section=_W),
    Option("metrics_host", "str", ("worker",), "an address for /metrics, like 127.0.0.1", "127.0.0.1",
           ("--metrics-host",), "Address for --metrics-port (default loopback).", section=_W),
)
OPTIONS_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}
DEFAULTS: Mapping[str, Any] = {option.name: option.default for option in OPTIONS}  # for dataclass fields


def section_of(command: str) -> str:
    """The profile section whose keys are `command`'s own: "worker" for worker, "" for the others."""
    return WORKER_SECTION if command == WORKER_SECTION else ""


def option_for(command: str, param: str) -> Option:
    """`command`'s option `param` (worker's max_restarts is not serve's)."""
    own = OPTIONS_BY_NAME.get(f"{section_of(command)}.{param}".lstrip("."))
    return own if own is not None and command in own.commands else OPTIONS_BY_NAME[param]


def options_of(command: str) -> tuple[Option, ...]:
    return tuple(option for option in OPTIONS if command in option.commands)


def check_bounds(option: Option, value: float) -> float:
    """A number the command line gave, within the option's bounds (NaN never is: it would disable a timer).

    Raises:
        BadInputError: "--port 70000 is out of range (give a value from 0 to 65535)".
    """
    if option.bounds is not None and option.out_of_bounds(value):
        low, high = (show_number(bound) for bound in option.bounds)
        unit = "seconds" if option.kind == "float" else "a value"
        raise BadInputError(f"{option.label} {show_number(value) if not math.isnan(value) else 'nan'} is out of "
                            f"range", f"give {unit} from {low} to {high}")
    return value


def checked(name: str, value: Any) -> Any:
    """check_bounds for option `name`; None (not given) passes."""
    return value if value is None else check_bounds(OPTIONS_BY_NAME[name], value)


def check_params(command: str, params: Mapping[str, Any]) -> None:
    """Every bounded option of `command` among its parsed parameters, in the table's order; then that /metrics
    does not take the port of what it watches."""
    for option in options_of(command):
        value = params.get(option.param)
        if option.bounds is not None and value is not None:
            check_bounds(option, value)
    own = {"serve": ("port", "serve's --port"), "worker": ("port_base", "a worker's port (--port-base)")}.get(command)
    if own is not None and same_address(params.get("host"), params.get("metrics_host")):
        check_metrics_port(params.get("metrics_port"), [params.get(own[0])], own[1])


def same_address(host: str | None, other: str | None) -> bool:
    """Whether two listen addresses can clash on one port: the same, either every interface, or unknown."""
    return host is None or other is None or host == other or "0.0.0.0" in (host, other)


def check_metrics_port(metrics_port: int | None, ports: Sequence[int | None], whose: str) -> None:
    """--metrics-port on a port the server or a worker listens on would fail only once it starts."""
    if metrics_port and metrics_port in ports:
        raise BadInputError(f"--metrics-port {metrics_port} is {whose} too", "give /metrics a port of its own")
