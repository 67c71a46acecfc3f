"""A bounded reader of a GGUF file's header and tensor table; it never reads or maps tensor data.

Hostile files are expected: every count and length is checked against the bytes left in the file and
against sane caps *before* anything is allocated, so memory stays bounded whatever the file claims.
Large arrays (the tokenizer's tokens, merges, scores) are walked, not kept: only their length and
element type survive, which is all the planner needs. The checks follow ggml's own gguf.cpp, so a
file we accept is one llama.cpp accepts.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llamalaunch.errors import ModelError
from llamalaunch.model.ggml import types as ggml_types
from llamalaunch.paths import cache_dir, read_json_dict, write_json_atomic

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME (64) with its terminating zero
# Caps far above any real model; together with the bytes-left checks they bound what we allocate.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 16 << 20  # a chat template is tens of KiB; ggml's own cap is 1 GiB
MAX_STRING_ARRAY = 1 << 24  # the largest vocabularies and merge lists have under a million entries
MAX_KEPT_ARRAY = 4096  # arrays longer than this keep their length only (tokens, merges, scores)
_CHUNK = 1 << 20


# GGUF value types: id -> (struct format, size in bytes); 8 = string, 9 = array.
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GgufArray:
    """An array value. `values` is None when the array was too long to keep (only its length matters)."""

    element_type: int
    count: int
    values: tuple[object, ...] | None


GgufValue = int | float | bool | str | GgufArray


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ne0 first, as ggml counts dimensions
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_types.type_name(self.ggml_type)

    @property
    def is_quantized(self) -> bool:
        return ggml_types.is_quantized(self.ggml_type)


@dataclass(frozen=True)
class GgufHeader:
    path: str
    version: int
    kv: dict[str, GgufValue]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int

    def get(self, key: str, default: GgufValue | None = None) -> GgufValue | None:
        return self.kv.get(key, default)


def file_type_name(file_type: int) -> str:
    """general.file_type as llama.cpp names it in logs: 'Q4_0', 'Q4_K_M', 'F16'."""
    name = ggml_types.FILE_TYPES.get(file_type)
    if name is None:
        return f"type {file_type}"
    return name.replace("MOSTLY_", "").replace("ALL_", "")


def pad(size: int, alignment: int) -> int:
    """GGML_PAD: round up to a multiple of a power-of-two alignment."""
    return (size + alignment - 1) & ~(alignment - 1)


class _Reader:
    """Reads a file through a window of at most max(_CHUNK, one string) bytes; never past the end."""

    def __init__(self, stream: BinaryIO, file_size: int, path: str) -> None:
        self.stream = stream
        self.file_size = file_size
        self.path = path
        self.pos = 0
        self.window = b""
        self.window_start = 0
        # Where string arrays starting at an offset end, from an earlier read of this very file (see
        # read_header), and those found now: a 128k vocabulary and its merges take ~40 ms to walk.
        self.known_ends: dict[int, int] = {}
        self.found_ends: dict[int, int] = {}

    def fail(self, problem: str) -> ModelError:
        return ModelError(
            f"{self.path}: {problem}", "the file is damaged or not a GGUF model; download it again"
        )

    def left(self) -> int:
        return self.file_size - self.pos

    def _view(self, n: int, what: str) -> int:
        """Make bytes [pos, pos+n) available in the window; return their index in it."""
        if n > self.left():
            raise self.fail(
                f"truncated header: {what} needs {n} bytes at offset {self.pos}, "
                f"{self.left()} left in the file"
            )
        index = self.pos - self.window_start
        if index < 0 or index + n > len(self.window):
            self.stream.seek(self.pos)
            self.window = self.stream.read(max(n, _CHUNK))
            self.window_start = self.pos
            index = 0
            if len(self.window) < n:
                raise self.fail(f"truncated header: file shrank while reading {what}")
        return index

    def unpack(self, fmt: str, size: int, what: str) -> object:
        index = self._view(size, what)
        self.pos += size
        return struct.unpack_from(fmt, self.window, index)[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))  # type: ignore[call-overload]

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))  # type: ignore[call-overload]

    def string(self, what: str, cap: int = MAX_STRING_BYTES) -> str:
        length = self.u64(f"{what} length")
        if length > cap:
            raise self.fail(f"{what} claims {length} bytes, more than the {cap} allowed")
        index = self._view(length, what)
        self.pos += length
        return self.window[index : index + length].decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Walk `count` strings without keeping them (tokenizer vocabularies)."""
        start = self.pos
        if start in self.known_ends and start < self.known_ends[start] <= self.file_size:
            self.pos = self.known_ends[start]
            return
        self._walk_strings(count, what)
        self.found_ends[start] = self.pos

    def _walk_strings(self, count: int, what: str) -> None:
        unpack_from = _U64.unpack_from
        remaining = count
        while remaining:
            index = self._view(8, what)
            window, last = self.window, len(self.window) - 8
            # Fast path inside the window: read each length and jump over the string (a for loop over
            # a range: half the time of a while loop counting down, 10 ms a plan for a 49k vocabulary).
            walked = remaining
            for done in range(remaining):
                if index > last:
                    walked = done
                    break
                length = unpack_from(window, index)[0]
                if length > MAX_STRING_BYTES:
                    raise self.fail(f"an element of {what} claims {length} bytes")
                index += 8 + length
            remaining -= walked
            self.pos = self.window_start + index
            if self.pos > self.file_size:
                raise self.fail(f"truncated header: {what} runs past the end of the file")

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(
                f"truncated header: {what} needs {n} bytes at offset {self.pos}, "
                f"{self.left()} left in the file"
            )
        self.pos += n




def read_header(path: str | Path) -> GgufHeader:
    """Read the header and tensor table of one GGUF file; ModelError (one line) for anything wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            stat = os.fstat(stream.fileno())
            stamp = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            return _read_with_known_ends(stream, stat.st_size, str(path), repr(stamp))
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file", "check the model path") from None
    except IsADirectoryError:
        raise ModelError(
            f"{path} is a directory, not a GGUF file", "give the path of the .gguf file"
        ) from None
    except PermissionError:
        raise ModelError(f"{path}: permission denied", "make the file readable by this user") from None
    except OSError as error:
        raise ModelError(
            f"{path}: cannot read ({error.strerror or error})", "check the file and the disk"
        ) from None


_ENDS_FILE = "gguf-string-arrays.json"  # {file stamp: {offset: end}} of the files read last
_ENDS_FILES_KEPT = 32


def _read_with_known_ends(stream: BinaryIO, file_size: int, name: str, stamp: str) -> GgufHeader:
    """parse_header, jumping over the string arrays an earlier read of this unchanged file walked; the ends
    it finds are kept for the next read (best effort: a cache that cannot be written only costs time)."""
    path = cache_dir() / _ENDS_FILE
    records = read_json_dict(path)
    reader = _Reader(stream, file_size, name)
    known = records.get(stamp)
    if isinstance(known, dict):
        reader.known_ends = {int(k): v for k, v in known.items() if k.isdigit() and isinstance(v, int)}
    try:
        header = _read(reader)
    except ModelError:
        if not reader.known_ends:
            raise
        reader = _Reader(stream, file_size, name)  # a record that does not fit the file: walk it all again
        header = _read(reader)
    if reader.found_ends:
        records.pop(stamp, None)
        kept = dict(list(records.items())[-(_ENDS_FILES_KEPT - 1):])
        write_json_atomic(path, {**kept, stamp: {**reader.known_ends, **reader.found_ends}})
    return header


def parse_header(stream: BinaryIO, file_size: int, name: str) -> GgufHeader:
    """Parse from an open binary stream of `file_size` bytes (tests and fuzzing use io.BytesIO)."""
    return _read(_Reader(stream, file_size, name))


def _read(reader: _Reader) -> GgufHeader:
    version = _read_preamble(reader)
    n_tensors = reader.u64("tensor count")
    n_kv = reader.u64("key/value count")
    # The smallest tensor entry is 24 bytes (empty name, no dims), the smallest KV 13 bytes.
    _check_count(reader, n_tensors, "tensors", MAX_TENSORS, 24)
    _check_count(reader, n_kv, "key/value pairs", MAX_KV, 13)
    kv = _read_kv(reader, n_kv)
    alignment = _alignment(reader, kv)
    infos = [_read_tensor_info(reader) for _ in range(n_tensors)]
    data_offset = pad(reader.pos, alignment) if n_tensors else reader.pos
    tensors = _place_tensors(reader, infos, alignment, data_offset)
    return GgufHeader(reader.path, version, kv, tensors, alignment, data_offset, reader.file_size)


def _check_count(reader: _Reader, count: int, what: str, cap: int, min_entry_bytes: int) -> None:
    if count > cap:
        raise reader.fail(f"header claims {count} {what}, more than the {cap} allowed")
    if count * min_entry_bytes > reader.left():
        raise reader.fail(
            f"truncated header: it claims {count} {what}, more than the {reader.left()} bytes left can hold"
        )


def _read_preamble(reader: _Reader) -> int:
    if reader.file_size < 4:
        raise reader.fail("not a GGUF file (too short)")
    magic = reader.unpack("4s", 4, "magic")
    if magic != GGUF_MAGIC:
        raise reader.fail(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    version = reader.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version == 1:
            raise reader.fail("unsupported GGUF version 1 (llama.cpp reads only v2 and v3)")
        if version & 0xFFFF == 0:
            raise reader.fail(f"unsupported GGUF version {version}: a big-endian file")
        raise reader.fail(f"unsupported GGUF version {version} (llamalaunch reads v2 and v3)")
    return version


def _read_kv(reader: _Reader, n_kv: int) -> dict[str, GgufValue]:
    kv: dict[str, GgufValue] = {}
    for index in range(n_kv):
        key = reader.string(f"key {index}", MAX_KEY_BYTES)
        if not key:
            raise reader.fail(f"key {index} is empty")
        if key in kv:
            raise reader.fail(f"duplicate key {key!r}")
        value_type = reader.u32(f"type of {key!r}")
        kv[key] = _read_value(reader, key, value_type)
    return kv


def _read_value(reader: _Reader, key: str, value_type: int) -> GgufValue:
    if value_type in _SCALARS:
        fmt, size = _SCALARS[value_type]
        return reader.unpack(fmt, size, repr(key))  # type: ignore[return-value]
    if value_type == _STRING:
        return reader.string(repr(key))
    if value_type == _ARRAY:
        return _read_array(reader, key)
    raise reader.fail(f"key {key!r} has unknown value type {value_type}")


def _read_array(reader: _Reader, key: str) -> GgufArray:
    element_type = reader.u32(f"element type of {key!r}")
    count = reader.u64(f"length of {key!r}")
    if element_type == _STRING:
        element_size = 8  # at least its length field
    elif element_type in _SCALARS:
        element_size = _SCALARS[element_type][1]
    else:
        raise reader.fail(f"array {key!r} has unsupported element type {element_type}")
    if count * element_size > reader.left():
        raise reader.fail(
            f"truncated header: array {key!r} claims {count} elements, more than the file holds"
        )
    if element_type == _STRING and count > MAX_STRING_ARRAY:
        raise reader.fail(f"array {key!r} claims {count} strings, more than the {MAX_STRING_ARRAY} allowed")
    if count > MAX_KEPT_ARRAY:
        if element_type == _STRING:
            reader.skip_strings(count, repr(key))
        else:
            reader.skip(count * element_size, repr(key))
        return GgufArray(element_type, count, None)
    values = tuple(_read_value(reader, key, element_type) for _ in range(count))
    return GgufArray(element_type, count, values)


def _alignment(reader: _Reader, kv: dict[str, GgufValue]) -> int:
    value = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int):
        raise reader.fail("general.alignment is not an integer")
    if value <= 0 or value & (value - 1) or value > (1 << 30):
        raise reader.fail(f"general.alignment {value} is not a power of two")
    return value


@dataclass(frozen=True)
class _RawTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


def _read_tensor_info(reader: _Reader) -> _RawTensor:
    name = reader.string("tensor name", MAX_TENSOR_NAME)
    n_dims = reader.u32(f"dimension count of {name!r}")
    if n_dims > MAX_DIMS:
        raise reader.fail(f"tensor {name!r} has {n_dims} dimensions, more than {MAX_DIMS}")
    shape = tuple(reader.u64(f"shape of {name!r}") for _ in range(n_dims))
    ggml_type = reader.u32(f"type of {name!r}")
    offset = reader.u64(f"offset of {name!r}")
    return _RawTensor(name, shape, ggml_type, offset)


def _tensor_nbytes(reader: _Reader, raw: _RawTensor) -> int:
    if not ggml_types.is_known(raw.ggml_type):
        raise reader.fail(f"tensor {raw.name!r} has unknown ggml type {raw.ggml_type}")
    block_size, type_size = ggml_types.type_block(raw.ggml_type)
    if any(ne >= 1 << 63 for ne in raw.shape):
        raise reader.fail(f"tensor {raw.name!r} has a negative dimension")
    ne0 = raw.shape[0] if raw.shape else 1
    if ne0 % block_size:
        raise reader.fail(
            f"tensor {raw.name!r} of type {ggml_types.type_name(raw.ggml_type)} has {ne0} elements "
            f"per row, not a multiple of its block size {block_size}"
        )
    n_elements = 1
    for ne in raw.shape:
        n_elements *= ne
    return n_elements // block_size * type_size


def _place_tensors(
    reader: _Reader, raws: list[_RawTensor], alignment: int, data_offset: int
) -> tuple[TensorInfo, ...]:
    """Check names and offsets as llama.cpp does: unique, in file order, each after the last, padded."""
    data_bytes = reader.file_size - data_offset
    seen: set[str] = set()
    expected_offset = 0
    tensors = []
    for raw in raws:
        if raw.name in seen:
            raise reader.fail(f"duplicate tensor name {raw.name!r}")
        seen.add(raw.name)
        nbytes = _tensor_nbytes(reader, raw)
        if raw.offset != expected_offset:
            raise reader.fail(f"tensor {raw.name!r} has offset {raw.offset}, expected {expected_offset}")
        if raw.offset + nbytes > data_bytes:
            raise reader.fail(
                f"truncated file: tensor {raw.name!r} ends at byte "
                f"{data_offset + raw.offset + nbytes}, the file has {reader.file_size}"
            )
        tensors.append(TensorInfo(raw.name, raw.shape, raw.ggml_type, raw.offset, nbytes))
        expected_offset += pad(nbytes, alignment)
    return tuple(tensors)
