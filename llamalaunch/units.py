"""Human units at the edges: parse '16k', '6GiB', '1.5G'; print bytes as MiB/GiB."""

from __future__ import annotations

import re

from llamalaunch.errors import BadInputError

MIB = 1024 * 1024
GIB = 1024 * MIB

_SIZE_UNITS = {
    "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": MIB, "mb": 1000**2, "mib": MIB,
    "g": GIB, "gb": 1000**3, "gib": GIB,
    "t": 1024 * GIB, "tb": 1000**4, "tib": 1024 * GIB,
}
_COUNT_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# Nothing planned here is larger than a petabyte or a billion tokens: bigger values are typos.
MAX_SIZE_BYTES = 1 << 50
MAX_TOKENS = 1 << 30


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from '6GiB', '6144MiB', '6G' (binary), '6GB' (decimal) or '512B'.

    A bare number is refused: `--assume CUDA0=24` meant 24 GiB far more often than 24 bytes.
    """
    match = _NUMBER.match(text)
    unit = match.group(2).lower() if match else ""
    if match and not unit and float(match.group(1)) > 0:  # 0 is refused below as out of range
        number = match.group(1)
        raise BadInputError(f"{what} {text.strip()!r} has no unit", f"write {number}GiB or {number}MiB")
    if not match or (unit and unit not in _SIZE_UNITS):
        raise BadInputError(f"{what} {text!r} is not a size", "write it like 6GiB, 6144MiB, 1.5G or 512M")
    value = int(float(match.group(1)) * _SIZE_UNITS.get(unit, 0))  # a bare 0 is 0 in any unit
    if value <= 0 or value > MAX_SIZE_BYTES:
        raise BadInputError(f"{what} {text!r} is out of range", "give a positive size below 1 PiB")
    return value


def parse_tokens(text: str, what: str = "context") -> int:
    """Token count from '16k' (16384), '16384' or '1.5k'."""
    match = _NUMBER.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _COUNT_UNITS:
        raise BadInputError(f"{what} {text!r} is not a token count", "write it like 16k, 16384 or 128k")
    value = int(float(match.group(1)) * _COUNT_UNITS[unit])
    if value <= 0 or value > MAX_TOKENS:
        raise BadInputError(f"{what} {text!r} is out of range", "give a positive count up to 1024m")
    return value


def format_bytes(size: int) -> str:
    """'512.0 MiB', '23.54 GiB'."""
    if abs(size) >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB"


def format_mib(size: int) -> str:
    """Whole MiB, as llama.cpp's memory breakdown prints them."""
    return f"{size / MIB:,.0f} MiB"
