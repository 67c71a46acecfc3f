"""Find the llama.cpp binaries llamalaunch will run and read what they can do from their own output.

Order: `--llama-server` option > LLAMALAUNCH_LLAMA_SERVER > config file > PATH > llamalaunch's build
cache (CUDA build before CPU build). The sibling binaries (ggml-rpc-server, llama-fit-params) are taken
from llama-server's folder first, so the three always come from one build when they can.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamalaunch.errors import ToolchainError
from llamalaunch.paths import cache_dir
from llamalaunch.toolchain.pin import FIT_PARAMS_BINARY, LLAMA_CPP_SDIST, RPC_SERVER_BINARY, SERVER_BINARY

SERVER_ENV = "LLAMALAUNCH_LLAMA_SERVER"
# Flags whose presence changes what llamalaunch passes to llama-server (`--fit off`, `-lv 4`, ...).
CAPABILITY_FLAGS = ("--fit", "-lv", "--rpc", "-dev", "--list-devices", "--metrics", "--log-file", "--load-mode",
                    "--no-mmap", "--no-host")
# Options every llama-server lists in --help (and llamalaunch passes it): what tells it from another program.
SERVER_FLAGS = ("--model", "--port")
# Older llama.cpp builds named the RPC worker `rpc-server`.
RPC_SERVER_NAMES = (RPC_SERVER_BINARY, "rpc-server")
CACHE_BACKENDS = ("cuda", "cpu")  # a CUDA build in the cache wins over a CPU one
INSTALL_HINT = (f"run `llamalaunch toolchain install` (or pass `--llama-server PATH` / set {SERVER_ENV})")


def given_hint(where: str) -> str:
    """The fix for a path the user gave that is wrong: that path, not another way to give one."""
    return (f"fix the path given by {where}, or drop it to use the one found on PATH or built by "
            "`llamalaunch toolchain install`")


def given_by(value: str | None, option: str, env: str) -> str:
    """Which of `option` and `env` gave `value`: the CLI hands an environment variable's value in as the
    option's (options.py), so the variable is named when it holds that very value."""
    return env if value is not None and value == os.environ.get(env) else option

# Shared-library stem -> backend name, for builds that link their GPU backend as a library.
_BACKEND_LIBRARIES = {
    "libggml-cuda": "CUDA", "libggml-hip": "ROCm", "libggml-vulkan": "Vulkan", "libggml-metal": "Metal",
    "libggml-sycl": "SYCL", "libggml-musa": "MUSA", "libggml-cann": "CANN", "libggml-opencl": "OpenCL",
}
# Symbol prefixes for the same backends linked statically into the binary.
_BACKEND_SYMBOLS = {
    b"ggml_backend_cuda_reg": "CUDA", b"ggml_backend_hip_reg": "ROCm", b"ggml_backend_vk_reg": "Vulkan",
    b"ggml_backend_metal_reg": "Metal", b"ggml_backend_sycl_reg": "SYCL", b"ggml_backend_musa_reg": "MUSA",
}
_PROBE_TIMEOUT_S = 20.0
_VERSION_LINE = re.compile(r"^version:\s*(.+)$", re.MULTILINE)
# Start of an option line in `--help`: the option column ends at 2+ spaces before the description.
_OPTION_COLUMN = re.compile(r"^\s{0,7}(-\S.*?)(?:\s{2,}(?=[^\s-])|$)", re.MULTILINE)
_OPTION_NAME = re.compile(r"(?<![\w-])-{1,2}[A-Za-z][\w-]*")
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(not found|\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Binary:
    """One llama.cpp executable, described by what it says about itself."""

    name: str
    path: Path
    version: str  # e.g. "0.5.0-dev (build 1, commit 0c1e570)"; "unknown" where it has no --version
    backend: str  # "CPU", "CUDA", "Vulkan", ... ("CUDA+Vulkan" when several)
    capabilities: frozenset[str]  # the subset of CAPABILITY_FLAGS its --help lists
    options: frozenset[str] = frozenset()  # every option name its --help lists

    def knows(self, flag: str) -> bool:
        return flag in self.options


@dataclass(frozen=True)
class Toolchain:
    """The binaries one launch will use and where llama-server was found."""

    server: Binary
    rpc_server: Binary | None
    fit_params: Binary | None
    source: str  # "option", "env", "config", "PATH" or "cache"


def cached_bin_dir(cache: Path, backend: str = "cpu") -> Path:
    """Folder of llamalaunch's own build: one per pinned version and backend."""
    return cache / "llama.cpp" / f"{LLAMA_CPP_SDIST.build_name}-{backend}" / "bin"


def find_toolchain(server_option: str | None = None, config_server: str | None = None,
                   cache: Path | None = None) -> Toolchain:
    """Locate llama-server and its siblings, and read each one's version, backend and capabilities.

    Raises:
        ToolchainError: llama-server is nowhere, or a path given for it is missing or does not run.
    """
    server_path, source = _locate_server(server_option, config_server, cache or cache_dir())
    server = _answers_like_server(inspect_binary(server_path, SERVER_BINARY))
    rpc_path = _find_sibling(server_path, RPC_SERVER_NAMES)
    fit_path = _find_sibling(server_path, (FIT_PARAMS_BINARY,))
    rpc_server = inspect_binary(rpc_path, RPC_SERVER_BINARY) if rpc_path else None
    return Toolchain(
        server=server,
        rpc_server=_same_build_version(rpc_server, server) if rpc_server else None,
        fit_params=inspect_binary(fit_path, FIT_PARAMS_BINARY) if fit_path else None,
        source=source,
    )


def _answers_like_server(binary: Binary) -> Binary:
    """Any program answers --help; llama-server's lists the options llamalaunch passes it."""
    missing = [flag for flag in SERVER_FLAGS if not binary.knows(flag)]
    if missing:
        raise ToolchainError(f"{binary.path} does not answer like llama-server (its --help lists no "
                             f"{' or '.join(missing)})", "give --llama-server (or $LLAMALAUNCH_LLAMA_SERVER) the "
                             "path of llama.cpp's llama-server, or run `llamalaunch toolchain install`")
    return binary


def _same_build_version(binary: Binary, server: Binary) -> Binary:
    """ggml-rpc-server prints no version; one lying beside llama-server comes from the same build."""
    if binary.version == "unknown" and binary.path.parent == server.path.parent:
        return replace(binary, version=server.version)
    return binary


def _locate_server(server_option: str | None, config_server: str | None, cache: Path) -> tuple[Path, str]:
    given = [("option", server_option, given_by(server_option, "--llama-server", SERVER_ENV)),
             ("env", os.environ.get(SERVER_ENV), SERVER_ENV),
             ("config", config_server, "the config file's llama_server")]
    for source, value, where in given:
        if value:
            return _given_server(value, where), source
    if on_path := shutil.which(SERVER_BINARY):
        return Path(on_path), "PATH"
    for backend in CACHE_BACKENDS:
        candidate = cached_bin_dir(cache, backend) / SERVER_BINARY
        if _is_executable_file(candidate):
            return candidate, "cache"
    raise ToolchainError(
        f"{SERVER_BINARY} not found (searched --llama-server, {SERVER_ENV}, the config file, PATH and "
        f"{cache / 'llama.cpp'})", INSTALL_HINT)


def _given_server(value: str, where: str) -> Path:
    """A path (or bare command name, or the folder holding it) the user named explicitly: no fallback."""
    path = Path(value).expanduser()
    if "/" not in value and not path.exists():
        found = shutil.which(value)
        if not found:
            raise ToolchainError(f"{value!r} given by {where} is not a file and not on PATH", given_hint(where))
        path = Path(found)
    if path.is_dir():
        if not (path / SERVER_BINARY).exists():
            raise ToolchainError(f"{path} given by {where} is a folder with no {SERVER_BINARY} in it",
                                 f"give the path of the {SERVER_BINARY} binary, or of the folder that holds it")
        path = path / SERVER_BINARY
    if not path.exists():
        raise ToolchainError(f"{path} given by {where} does not exist", given_hint(where))
    if not _is_executable_file(path):
        raise ToolchainError(f"{path} given by {where} is not an executable file",
                             f"check the path, or make it executable: chmod +x {path}")
    return path


def _find_sibling(server_path: Path, names: tuple[str, ...]) -> Path | None:
    """Same folder as llama-server (also the symlink target's folder), then PATH."""
    folders = [server_path.parent, server_path.resolve().parent]
    for folder in folders:
        for name in names:
            if _is_executable_file(folder / name):
                return folder / name
    for name in names:
        if found := shutil.which(name):
            return Path(found)
    return None


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


_inspected: dict[tuple[str, str, int, int], Binary] = {}
_inspected_lock = threading.Lock()


def inspect_binary(path: Path, name: str) -> Binary:
    """Run `--version` and `--help` once per (path, mtime, size) in this process and describe the binary.

    Raises:
        ToolchainError: the binary does not start (missing shared libraries, wrong architecture).
    """
    stat = path.stat()
    key = (str(path), name, stat.st_mtime_ns, stat.st_size)
    with _inspected_lock:
        if key in _inspected:
            return _inspected[key]
    binary = _read_inspection(key)
    if binary is None:
        binary = _inspect_now(path, name)
        _write_inspection(key, binary)
    with _inspected_lock:
        _inspected[key] = binary
    return binary


def _inspection_file() -> Path:
    return cache_dir() / "inspected-binaries.json"


def _read_inspection(key: tuple[str, str, int, int]) -> Binary | None:
    """The on-disk record of an earlier inspection: a CUDA build's --help costs seconds to start."""
    try:
        record = _inspection_records().get(repr(key))
        if record is None:
            return None
        options = frozenset(record["options"])
        return Binary(name=record["name"], path=Path(record["path"]), version=record["version"],
                      backend=record["backend"], capabilities=_capabilities(options), options=options)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


_records_read: tuple[tuple[str, int, int], dict[str, Any]] | None = None


def _inspection_records() -> dict[str, Any]:
    """The records file, parsed once per process while it stays unchanged (plan reads three records)."""
    global _records_read
    path = _inspection_file()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (str(path), stat.st_mtime_ns, stat.st_size)
    if _records_read is None or _records_read[0] != stamp:
        records = json.loads(path.read_text())
        _records_read = (stamp, records if isinstance(records, dict) else {})
    return _records_read[1]


def _write_inspection(key: tuple[str, str, int, int], binary: Binary) -> None:
    """Add one record; records of binaries that are gone (tests' stand-ins) are dropped, so the file
    stays a few records long instead of growing with every temporary build."""
    path = _inspection_file()
    try:
        try:
            records = _inspection_records()
        except ValueError:
            records = {}
        records = {k: v for k, v in records.items() if isinstance(v, dict) and Path(str(v.get("path"))).exists()}
        records[repr(key)] = {"name": binary.name, "path": str(binary.path), "version": binary.version,
                              "backend": binary.backend, "capabilities": sorted(binary.capabilities),
                              "options": sorted(binary.options)}
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(records))
        os.replace(temp, path)
    except (OSError, ValueError):
        pass  # a cache that cannot be written only costs time


def _inspect_now(path: Path, name: str) -> Binary:
    help_text = _run_for_output(path, "--help")
    options = frozenset(parse_help_options(help_text))
    # ggml-rpc-server has no --version (it rejects the flag); it is built from the same tree.
    version = parse_version(_run_for_output(path, "--version")) if "--version" in options else "unknown"
    return Binary(name=name, path=path, version=version, backend=detect_backend(path),
                  capabilities=_capabilities(options), options=options)


def _capabilities(options: frozenset[str]) -> frozenset[str]:
    """The flags llamalaunch's argv depends on, of those this binary lists (a new entry in
    CAPABILITY_FLAGS applies to binaries inspected before it)."""
    return frozenset(flag for flag in CAPABILITY_FLAGS if flag in options)


def _run_for_output(path: Path, flag: str) -> str:
    # No GPU is needed to print help; hiding them keeps a CUDA build from initialising every card.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run([str(path), flag], capture_output=True, text=True, errors="replace",
                              timeout=_PROBE_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"`{path} {flag}` did not finish in {_PROBE_TIMEOUT_S:.0f} s",
                             f"check that {path} is a llama.cpp binary") from None
    except OSError as error:
        raise ToolchainError(f"{path} does not start: {error.strerror}", INSTALL_HINT) from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-2:]) or f"exit status {done.returncode}"
        raise ToolchainError(f"`{path} {flag}` failed: {tail}", INSTALL_HINT)
    return output


def parse_help_options(help_text: str) -> set[str]:
    """Option names from llama.cpp's `--help` (option column only, not flags named in descriptions)."""
    names: set[str] = set()
    for column in _OPTION_COLUMN.findall(help_text):
        names.update(_OPTION_NAME.findall(column))
    return names


def parse_version(version_text: str) -> str:
    match = _VERSION_LINE.search(version_text)
    return match.group(1).strip() if match else "unknown"


def linked_libraries(path: Path) -> dict[str, str | None]:
    """Shared libraries the dynamic loader resolves for `path` (name -> file, None when not found)."""
    try:
        done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = _LDD_LINE.findall(done.stdout)
    return {name: None if target == "not found" else target for name, target in found}


def detect_backend(path: Path) -> str:
    """GPU backends the build carries: linked libraries, backend plug-ins beside it, or static symbols."""
    names = set(linked_libraries(path)) | {entry.name for entry in path.parent.glob("libggml-*.so*")}
    found = {backend for stem, backend in _BACKEND_LIBRARIES.items()
             if any(name.startswith(stem + ".") for name in names)}
    if not any(name.startswith("libggml") for name in names):
        found = _backends_in_binary(path)
    return "+".join(sorted(found)) or "CPU"


def _backends_in_binary(path: Path) -> set[str]:
    """A build with BUILD_SHARED_LIBS=OFF carries its backend's registration symbol in the executable."""
    try:
        with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return {backend for symbol, backend in _BACKEND_SYMBOLS.items() if data.find(symbol) >= 0}
    except (OSError, ValueError):
        return set()
