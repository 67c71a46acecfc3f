"""The GGUF header reader: real files, every kind of hostile header (issue 11), and fuzzing."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamalaunch.errors import ModelError
from llamalaunch.model.gguf_header import GgufArray, parse_header, read_header
from tests.synthetic import write_preset

CORPUS = Path(__file__).parent / "fuzz_corpus"
FUZZ_EXAMPLES = int(os.environ.get("LLAMALAUNCH_FUZZ_EXAMPLES", "2000"))
STRING, ARRAY, U32, U64 = 8, 9, 4, 10


# --- builders ----------------------------------------------------------------------------------------


def s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", U32, value)


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", STRING) + s(value)


def tensor_info(name: str, dims: Iterable[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    dims = tuple(dims)
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf(
    kvs: list[bytes],
    tensors: list[bytes],
    data_bytes: int = 0,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += b"\0" * (-len(body) % alignment)
    return body + b"\0" * data_bytes


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rewrite_gguf(
    source: Path,
    directory: Path,
    parts: int,
    arch: str | None = None,
    drop_keys: Iterable[str] = (),
    set_u32: Mapping[str, int] | None = None,
) -> list[Path]:
    """Copy a (zero-data) model with keys changed (`set_u32` adds a key the model lacks), optionally split into
    parts as gguf-split does: the first part keeps the metadata, every part gets split.no/split.count/
    split.tensors.count."""
    reader = GGUFReader(source)
    drop, set_u32 = set(drop_keys), dict(set_u32 or {})
    kvs = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in drop:
            continue
        if name in set_u32:
            kvs.append(kv_u32(name, set_u32[name]))
        elif arch and name == "general.architecture":
            kvs.append(kv_str(name, arch))
        elif arch and name.startswith("llama."):
            value = b"".join(bytes(p) for p in field.parts)[8 + len(name) :]
            kvs.append(s(arch + name[len("llama") :]) + value)
        else:
            kvs.append(b"".join(bytes(p) for p in field.parts))
    kvs += [kv_u32(name, value) for name, value in set_u32.items() if name not in reader.fields]
    tensors = list(reader.tensors)
    chunks = [tensors[i::parts] for i in range(parts)] if parts > 1 else [tensors]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, chunk in enumerate(chunks):
        name = source.name if parts == 1 else f"{source.stem}-{index + 1:05d}-of-{parts:05d}.gguf"
        split_keys = (
            [
                s("split.no") + struct.pack("<IH", 2, index),
                s("split.count") + struct.pack("<IH", 2, parts),
                s("split.tensors.count") + struct.pack("<Ii", 5, len(tensors)),
            ]
            if parts > 1
            else []
        )
        infos, offset = [], 0
        for t in chunk:
            infos.append(tensor_info(t.name, [int(d) for d in t.shape], int(t.tensor_type), offset))
            offset += -(-int(t.n_bytes) // 32) * 32
        kv_part = (kvs if index == 0 else []) + split_keys
        path = directory / name
        path.write_bytes(gguf(kv_part, infos))
        with open(path, "r+b") as stream:
            stream.truncate(path.stat().st_size + offset)
        paths.append(path)
    return paths


# --- real files --------------------------------------------------------------------------------------


def test_reads_demo_model(demo_model: Path) -> None:
    header = read_header(demo_model)
    assert header.version == 3 and header.alignment == 32 and len(header.tensors) == 272
    assert header.kv["general.architecture"] == "llama"
    tokens = header.kv["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GgufArray) and tokens.count == 49152 and tokens.values is None
    embd = header.tensors[0]
    assert (embd.name, embd.shape, embd.type_name, embd.offset) == (
        "token_embd.weight",
        (576, 49152),
        "Q8_0",
        0,
    )
    assert embd.nbytes == 576 * 49152 // 32 * 34
    last = header.tensors[-1]
    assert header.data_offset + last.offset + last.nbytes <= header.file_size


def test_version_2_and_custom_alignment(tmp_path: Path) -> None:
    data = gguf(
        [kv_u32("general.alignment", 64)],
        [tensor_info("a", (8,)), tensor_info("b", (8,), offset=64)],
        data_bytes=128,
        version=2,
        alignment=64,
    )
    header = read_header(write(tmp_path, data))
    assert header.version == 2 and header.alignment == 64 and header.data_offset % 64 == 0
    assert [t.nbytes for t in header.tensors] == [32, 32]


def test_matches_gguf_package_reader(tmp_path: Path) -> None:
    """Every tensor's shape, type, offset and size agrees with the gguf package's own reader."""
    path = write_preset(tmp_path / "m.gguf", "tiny-deepseek2")
    ours = read_header(path)
    theirs = GGUFReader(path)
    assert len(ours.tensors) == len(theirs.tensors)
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.name == reference.name and mine.ggml_type == int(reference.tensor_type)
        assert mine.shape == tuple(int(d) for d in reference.shape) and mine.nbytes == int(reference.n_bytes)
        assert ours.data_offset + mine.offset == int(reference.data_offset)


# --- bad input: one clear ModelError each ------------------------------------------------------------

HOSTILE: dict[str, tuple[bytes, str]] = {
    "not gguf": (b"PK\x03\x04 this is a zip file" + b"\0" * 64, "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
    "three bytes": (b"GGU", "not a GGUF file"),
    "magic only": (b"GGUF", "truncated header"),
    "version 1": (b"GGUF" + struct.pack("<III", 1, 0, 0), "unsupported GGUF version 1"),
    "version 4": (gguf([], [], version=4), "unsupported GGUF version 4"),
    "big endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "2^60 tensors": (gguf([], [], n_tensors=1 << 60), "claims 1152921504606846976 tensors"),
    "2^60 keys": (gguf([], [], n_kv=1 << 60), "key/value pairs"),
    "2^40-byte string value": (
        gguf([s("k") + struct.pack("<IQ", STRING, 1 << 40)], []),
        "claims 1099511627776",
    ),
    "2^40-byte key": (gguf([struct.pack("<Q", 1 << 40) + b"\0" * 64], []), "claims 1099511627776"),
    "huge array": (gguf([s("k") + struct.pack("<IIQ", ARRAY, U64, 1 << 50)], []), "more than the file holds"),
    "string array of huge strings": (
        gguf(
            [s("k") + struct.pack("<IIQ", ARRAY, STRING, 5000) + struct.pack("<Q", 1 << 40)]
            + [b"\0" * 40000],
            [],
        ),
        "claims 1099511627776",
    ),
    "string array past the end": (
        gguf([s("k") + struct.pack("<IIQ", ARRAY, STRING, 5000) + s("x") * 4999], []),
        "truncated header",
    ),
    "nested array": (
        gguf([s("k") + struct.pack("<IIQ", ARRAY, ARRAY, 1) + b"\0" * 16], []),
        "unsupported element",
    ),
    "unknown value type": (gguf([s("k") + struct.pack("<I", 99) + b"\0" * 8], []), "unknown value type 99"),
    "empty key": (gguf([kv_u32("", 1)], []), "is empty"),
    "duplicate key": (gguf([kv_u32("a", 1), kv_u32("a", 2)], []), "duplicate key 'a'"),
    "alignment not power of two": (gguf([kv_u32("general.alignment", 48)], []), "not a power of two"),
    "alignment not integer": (gguf([kv_str("general.alignment", "32")], []), "not an integer"),
    "unknown tensor type": (gguf([], [tensor_info("t", (32,), ggml_type=4)], 64), "unknown ggml type 4"),
    "tensor type 2^31": (gguf([], [tensor_info("t", (32,), ggml_type=1 << 31)], 64), "unknown ggml type"),
    "five dimensions": (gguf([], [tensor_info("t", (1, 1, 1, 1, 1))], 64), "5 dimensions"),
    "negative dimension": (gguf([], [tensor_info("t", (2**64 - 1,))], 64), "negative dimension"),
    "row not whole blocks": (
        gguf([], [tensor_info("t", (33, 2), ggml_type=2)], 64),
        "not a multiple of its block",
    ),
    "tensor past the end": (gguf([], [tensor_info("t", (1024,))], 64), "truncated file"),
    "huge tensor": (gguf([], [tensor_info("t", (1 << 40, 1 << 40, 1 << 40))], 64), "truncated file"),
    "offset out of order": (
        gguf([], [tensor_info("a", (8,)), tensor_info("b", (8,), offset=96)], 256),
        "has offset 96, expected 32",
    ),
    "duplicate tensor": (
        gguf([], [tensor_info("a", (8,)), tensor_info("a", (8,), offset=32)], 64),
        "duplicate tensor name 'a'",
    ),
    "long tensor name": (gguf([], [tensor_info("x" * 64, (8,))], 64), "claims 64 bytes"),
    "truncated tensor table": (gguf([], [tensor_info("a", (8,))])[:-40], "truncated header"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header(tmp_path: Path, case: str) -> None:
    data, message = HOSTILE[case]
    path = write(tmp_path, data)
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match=message) as caught:
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{case}: {peak} bytes at peak"
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_sparse_file_claiming_huge_strings_stays_small(tmp_path: Path) -> None:
    """A 2 TiB sparse file may legitimately *hold* a 2^40-byte string: the caps refuse it unread."""
    path = write(tmp_path, gguf([s("k") + struct.pack("<IQ", STRING, 1 << 40)], []))
    with open(path, "r+b") as stream:
        stream.truncate(2 << 40)
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match="more than the 16777216 allowed"):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_truncated_real_header(demo_model: Path, tmp_path: Path) -> None:
    with open(demo_model, "rb") as stream:
        head = stream.read(1 << 20)
    for cut in (10, 24, 100, 5000, 700_000, len(head)):
        with pytest.raises(ModelError, match="truncated header"):
            read_header(write(tmp_path, head[:cut]))


def test_truncated_tensor_data(tmp_path: Path) -> None:
    path = write_preset(tmp_path / "m.gguf", "tiny-llama")
    with open(path, "r+b") as stream:
        stream.truncate(path.stat().st_size - 1)
    with pytest.raises(ModelError, match="truncated file: tensor 'blk.3.ffn_up.weight'"):
        read_header(path)


@pytest.mark.parametrize(
    "path, message", [("/nonexistent/model.gguf", "no such file"), ("/tmp", "is a directory")]
)
def test_unreadable_paths(path: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        read_header(path)


# --- fuzzing: mutated real headers, only ModelError may come out --------------------------------------


def _seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.gguf"))]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Each edit: (kind, position, value). 0: set a byte, 1: write a u64, 2: cut, 3: duplicate a span."""
    buffer = bytearray(data)
    for kind, position, value in edits:
        if not buffer:
            break
        at = position % len(buffer)
        if kind == 0:
            buffer[at] = value & 0xFF
        elif kind == 1:
            buffer[at : at + 8] = struct.pack("<Q", value)
        elif kind == 2:
            del buffer[at:]
        else:
            buffer[at:at] = buffer[at : at + (value % 64)]
    return bytes(buffer)


_EDIT = st.tuples(
    st.integers(0, 3),
    st.integers(0, 1 << 20),
    st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**60, 2**64 - 1])),
)


@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    seed=st.integers(0, 1000),
    edits=st.lists(_EDIT, min_size=1, max_size=6),
    claimed_extra=st.sampled_from([0, 1 << 20, 1 << 40]),
)
def test_fuzz_mutated_headers(seed: int, edits: list[tuple[int, int, int]], claimed_extra: int) -> None:
    seeds = _seeds()
    data = _mutate(seeds[seed % len(seeds)], edits)
    try:
        # the corpus holds headers only; `claimed_extra` stands for tensor data the file would have
        parse_header(io.BytesIO(data), len(data) + claimed_extra, "fuzz.gguf")
    except ModelError as error:
        assert "\n" not in str(error)


def test_corpus_seeds_parse(tmp_path: Path) -> None:
    """The seeds are sound headers (data section cut off), so mutations start from real structure."""
    headers = sorted(CORPUS.glob("*-header.gguf"))
    assert len(headers) >= 4 and len(_seeds()) > len(headers)  # plus the real model's (cut) prefix
    for path in headers:
        data = path.read_bytes()
        parse_header(io.BytesIO(data), len(data) + (1 << 40), path.name)
