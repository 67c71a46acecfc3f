"""What-if devices (`--assume CUDA0=24GiB`, `--assume RPC0=6GiB/8GiB`) and per-device sizes (`--budget`,
`--reserve`), parsed from the command line into llama.cpp's device names and order."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from llamalaunch.errors import BadInputError
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.units import parse_size

# llama.cpp's device-name prefixes (lower-cased spelling → (llama.cpp's spelling, backend)), in the order
# its backend registry lists GPU backends (ggml-backend-reg.cpp); RPC devices go before all of them
# (llama.cpp puts RPC servers at the front of the device list, src/llama.cpp).
_PREFIXES: dict[str, tuple[str, str]] = {
    "rpc": ("RPC", "RPC"),
    "cuda": ("CUDA", "CUDA"),
    "rocm": ("ROCm", "ROCm"),  # the CUDA backend built for HIP
    "mtl": ("MTL", "Metal"),
    "metal": ("MTL", "Metal"),
    "sycl": ("SYCL", "SYCL"),
    "vulkan": ("Vulkan", "Vulkan"),
    "cann": ("CANN", "CANN"),
}
_BACKENDS = {**{prefix: backend for prefix, (_spelling, backend) in _PREFIXES.items()}, "cpu": "CPU"}
_BACKEND_RANK = {"RPC": 0, "CUDA": 1, "ROCm": 1, "Metal": 2, "SYCL": 3, "Vulkan": 4, "CANN": 5}
HOST_NAME = "CPU"
_DEVICE_NAME = re.compile(r"^([A-Za-z]+)(\d+)$")
_NAME_HINT = "use llama.cpp's names: CUDA0, ROCm0, Vulkan0, SYCL0, MTL0, CANN0, RPC0, or CPU for host RAM"


def canonical_device_name(text: str, what: str) -> tuple[str, str]:
    """('CUDA0', 'CUDA') from 'cuda0'; ('CPU', 'CPU') for the host; BadInputError naming `what` otherwise."""
    name = text.strip()
    if name.upper() == HOST_NAME:
        return HOST_NAME, "CPU"
    match = _DEVICE_NAME.match(name)
    prefix = _PREFIXES.get(match.group(1).lower()) if match else None
    if match is None or prefix is None:
        raise BadInputError(f"{what}: {text!r} is not a llama.cpp device name", _NAME_HINT)
    spelling, backend = prefix
    return f"{spelling}{int(match.group(2))}", backend


def canonical_overhead_name(text: str) -> str:
    """--overhead's key: a backend ('cuda' → 'CUDA', 'rocm' → 'ROCm') or a device ('cuda1' → 'CUDA1')."""
    backend = _BACKENDS.get(text.strip().lower())
    return backend if backend is not None else canonical_device_name(text, "--overhead")[0]


def unknown_device(option: str, name: str, names: Iterable[str]) -> BadInputError:
    """`option` names a device that is not among `names` (the probed or assumed ones): how to add it."""
    if name == "CPU":  # the host holds what the devices do not: its RAM is what plans check, not a budget
        return BadInputError(f"{option} CPU: the host is not a device the plan fills",
                             "to plan for less host memory, give --assume CPU=SIZE")
    add = f"--rpc HOST:PORT or --assume {name}=SIZE" if name.startswith("RPC") else f"--assume {name}=SIZE"
    return BadInputError(f"{option} {name}: no such device here (devices here: {', '.join(names) or 'none'})",
                         f"add it with {add}, or drop {option} {name}")


def _split_values(values: Sequence[str]) -> list[str]:
    """Each option may be given again or hold a comma-separated list: `--assume CUDA0=24GiB,CUDA1=6GiB`."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_device_sizes(values: Sequence[str], what: str) -> dict[str, int]:
    """{'RPC0': 1073741824} from ['RPC0=1GiB'] for `--budget` / `--reserve` (`what` names the option)."""
    sizes: dict[str, int] = {}
    for item in _split_values(values):
        name_text, sep, size_text = item.partition("=")
        if not sep or not size_text.strip():
            raise BadInputError(f"{what} value {item!r} is not NAME=SIZE",
                                f"write it like {what} RPC0=1.5GiB")
        name, _backend = canonical_device_name(name_text, what)
        if name in sizes:
            raise BadInputError(f"{what} gives {name} twice", "give each device once")
        sizes[name] = parse_size(size_text, f"{what} {name}")
    return sizes


def _parse_assumption(item: str) -> tuple[str, str, int, int]:
    """(name, backend, free, total) from 'RPC0=6GiB/8GiB'."""
    name_text, sep, sizes_text = item.partition("=")
    free_text, _slash, total_text = sizes_text.partition("/")
    if not sep or not free_text.strip() or (_slash and not total_text.strip()):
        raise BadInputError(f"--assume value {item!r} is not NAME=FREE[/TOTAL]",
                            "write it like --assume CUDA0=24GiB or --assume RPC0=6GiB/8GiB")
    name, backend = canonical_device_name(name_text, "--assume")
    free = parse_size(free_text, f"--assume {name} free size")
    total = parse_size(total_text, f"--assume {name} total size") if total_text.strip() else free
    if free > total:
        raise BadInputError(f"--assume {item!r}: free is larger than total",
                            "write FREE/TOTAL with FREE no larger than TOTAL")
    return name, backend, free, total


def _llama_order_key(name: str, backend: str) -> tuple[int, int]:
    index = int(_DEVICE_NAME.match(name).group(2))  # type: ignore[union-attr]  # names are canonical here
    return _BACKEND_RANK[backend], index


def parse_assumptions(values: Sequence[str],
                      host: HostMemory | None = None) -> tuple[tuple[Device, ...], HostMemory | None]:
    """What-if devices in llama.cpp's order (RPC first, by index; then GPU backends), and the host's
    memory when `CPU=FREE[/TOTAL]` is among them (`host` gives its cpu count and model)."""
    parsed: dict[str, tuple[str, int, int]] = {}
    for item in _split_values(values):
        name, backend, free, total = _parse_assumption(item)
        if name in parsed:
            raise BadInputError(f"--assume gives {name} twice", "give each device once")
        parsed[name] = (backend, free, total)
    assumed_host = None
    if HOST_NAME in parsed:
        _backend, free, total = parsed.pop(HOST_NAME)
        assumed_host = HostMemory(free, total, host.cpu_count if host else 1,
                                  host.cpu_description if host else "assumed host")
    names = sorted(parsed, key=lambda name: _llama_order_key(name, parsed[name][0]))
    devices = tuple(
        Device(name=name, backend=parsed[name][0], description=f"assumed {parsed[name][0]} device",
               free_bytes=parsed[name][1], total_bytes=parsed[name][2], order=order, assumed=True)
        for order, name in enumerate(names))
    return devices, assumed_host


def read_inventory(path: Path) -> list[str]:
    """What-if devices from a file: one NAME=FREE[/TOTAL] a line (as --assume takes), # for comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"cannot read the inventory {path}: {getattr(error, 'strerror', None) or error}",
                            "give a text file with one NAME=FREE[/TOTAL] a line, e.g. CUDA0=24GiB") from None
    values = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    first_line: dict[str, int] = {}
    for number, value in enumerate(values, start=1):
        for item in _split_values([value]):
            name = _inventory_line(path, number, item)
            if name in first_line:
                raise BadInputError(f"the inventory {path}, line {number}: {name} again (first on line "
                                    f"{first_line[name]})", "give each device once")
            first_line[name] = number
    values = [value for value in values if value]
    if not values:
        raise BadInputError(f"the inventory {path} names no device", "add lines like CUDA0=24GiB or RPC0=6GiB/8GiB")
    return values


def _inventory_line(path: Path, number: int, item: str) -> str:
    """The device one inventory line names; its errors name the file and the line, not --assume."""
    try:
        return _parse_assumption(item)[0]
    except BadInputError as error:
        message = error.message.removeprefix("--assume").removeprefix(":").strip().removeprefix("value ")
        hint = error.hint if error.hint and "--assume" not in error.hint else \
            "write one NAME=FREE[/TOTAL] a line, like CUDA0=24GiB or RPC0=6GiB/8GiB"
        raise BadInputError(f"the inventory {path}, line {number}: {message}", hint) from None
