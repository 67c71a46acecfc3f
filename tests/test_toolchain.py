"""Toolchain discovery and install against the real llama.cpp binaries and real cmake/compiler runs."""

from __future__ import annotations

import fcntl
import os
import shutil
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamalaunch.cli import app
from llamalaunch.errors import ToolchainError
from llamalaunch.paths import cache_dir
from llamalaunch.toolchain.discover import (
    SERVER_ENV,
    cached_bin_dir,
    find_toolchain,
    parse_help_options,
    parse_version,
)
from llamalaunch.toolchain.install import (
    configure,
    extract_llama_tree,
    fetch_sdist,
    install,
    is_installed,
    lock_file,
)
from llamalaunch.toolchain.pin import BUILD_TARGETS, LLAMA_CPP_SDIST

NO_CACHE = Path("/nonexistent-llamalaunch-cache")


@pytest.fixture
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH with the system tools (ldd, cc) but no llama.cpp, and no env override."""
    monkeypatch.delenv(SERVER_ENV, raising=False)
    system = [folder for folder in os.environ["PATH"].split(os.pathsep)
              if folder and not (Path(folder) / "llama-server").exists()]
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", os.pathsep.join([str(empty), *system]))
    return empty


def link_binaries(folder: Path, source: Path, names: tuple[str, ...] = BUILD_TARGETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(source / name)
    return folder


@pytest.mark.llama
def test_option_wins_and_reads_capabilities(llama_bin_dir: Path, bare_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_ENV, "/nonexistent/llama-server")  # the option must win over a broken env
    toolchain = find_toolchain(str(llama_bin_dir / "llama-server"), cache=NO_CACHE)
    assert toolchain.source == "option"
    assert toolchain.server.path == llama_bin_dir / "llama-server"
    assert toolchain.server.capabilities == {"--fit", "--rpc", "-dev", "-lv", "--list-devices", "--metrics",
                                             "--log-file", "--load-mode", "--no-host"}
    assert toolchain.server.knows("-fitt") and not toolchain.server.knows("--no-such-flag")
    assert toolchain.server.backend == "CPU"
    assert toolchain.server.version.startswith("0.5.0")
    assert toolchain.rpc_server is not None and toolchain.rpc_server.path == llama_bin_dir / "ggml-rpc-server"
    assert toolchain.rpc_server.version == toolchain.server.version  # same build folder
    assert {"-H", "-p", "-d", "-t"} <= toolchain.rpc_server.options
    assert toolchain.fit_params is not None and "--fit" in toolchain.fit_params.capabilities


@pytest.mark.llama
def test_option_may_name_the_folder(llama_bin_dir: Path, bare_path: Path) -> None:
    assert find_toolchain(str(llama_bin_dir), cache=NO_CACHE).server.path == llama_bin_dir / "llama-server"


@pytest.mark.llama
def test_env_then_config(llama_bin_dir: Path, bare_path: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    other = link_binaries(tmp_path / "other", llama_bin_dir)
    assert find_toolchain(config_server=str(other / "llama-server"), cache=NO_CACHE).source == "config"
    monkeypatch.setenv(SERVER_ENV, str(llama_bin_dir / "llama-server"))
    toolchain = find_toolchain(config_server=str(other / "llama-server"), cache=NO_CACHE)
    assert (toolchain.source, toolchain.server.path) == ("env", llama_bin_dir / "llama-server")


@pytest.mark.llama
def test_path_lookup_finds_siblings(llama_bin_dir: Path, bare_path: Path) -> None:
    link_binaries(bare_path, llama_bin_dir, ("llama-server",))  # siblings only beside the link target
    toolchain = find_toolchain(cache=NO_CACHE)
    assert (toolchain.source, toolchain.server.path) == ("PATH", bare_path / "llama-server")
    assert toolchain.rpc_server is not None and toolchain.rpc_server.path == llama_bin_dir / "ggml-rpc-server"
    assert toolchain.fit_params is not None


@pytest.mark.llama
def test_bare_name_in_option_is_looked_up_on_path(llama_bin_dir: Path, bare_path: Path) -> None:
    link_binaries(bare_path, llama_bin_dir, ("llama-server",))
    assert find_toolchain("llama-server", cache=NO_CACHE).server.path == bare_path / "llama-server"


@pytest.mark.llama
def test_cache_is_last_and_prefers_cuda(llama_bin_dir: Path, bare_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cpu = link_binaries(cached_bin_dir(cache, "cpu"), llama_bin_dir)
    toolchain = find_toolchain(cache=cache)
    assert (toolchain.source, toolchain.server.path) == ("cache", cpu / "llama-server")
    assert toolchain.rpc_server is not None and toolchain.rpc_server.path == cpu / "ggml-rpc-server"
    cuda = link_binaries(cached_bin_dir(cache, "cuda"), llama_bin_dir)
    assert find_toolchain(cache=cache).server.path == cuda / "llama-server"
    link_binaries(bare_path, llama_bin_dir, ("llama-server",))
    assert find_toolchain(cache=cache).source == "PATH"


def test_cached_bin_dir_names_version_and_backend(tmp_path: Path) -> None:
    assert cached_bin_dir(tmp_path, "cuda") == tmp_path / "llama.cpp" / "llama-cpp-python-0.3.36-cuda" / "bin"


def test_missing_everywhere_is_one_line_with_the_fix(bare_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ToolchainError) as caught:
        find_toolchain(cache=tmp_path / "cache")
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("llama-server not found (searched --llama-server, LLAMALAUNCH_LLAMA_SERVER")
    assert "llamalaunch toolchain install" in text and "--llama-server PATH" in text


def test_given_path_that_does_not_exist(bare_path: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ToolchainError, match=r"given by --llama-server does not exist"):
        find_toolchain(str(tmp_path / "nope" / "llama-server"), cache=NO_CACHE)
    monkeypatch.setenv(SERVER_ENV, str(tmp_path / "gone"))
    with pytest.raises(ToolchainError, match=r"given by LLAMALAUNCH_LLAMA_SERVER does not exist"):
        find_toolchain(cache=NO_CACHE)


def test_given_path_not_executable(bare_path: Path, tmp_path: Path) -> None:
    plain = tmp_path / "llama-server"
    plain.write_text("not a program")
    with pytest.raises(ToolchainError, match=r"is not an executable file \(check the path, or make it"):
        find_toolchain(str(plain), cache=NO_CACHE)


def test_binary_that_does_not_start(bare_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libllama.so.0' >&2\nexit 127\n")
    broken.chmod(0o755)
    with pytest.raises(ToolchainError, match=r"--help` failed: error while loading shared libraries"):
        find_toolchain(str(broken), cache=NO_CACHE)


def test_a_program_that_is_not_llama_server_is_refused(bare_path: Path) -> None:
    """/bin/ls answers --help too; llama-server's help lists --model and --port."""
    result = CliRunner().invoke(app, ["toolchain", "--llama-server", "/bin/ls"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == ("error: /bin/ls does not answer like llama-server (its --help lists no --model or "
                             "--port) (give --llama-server (or $LLAMALAUNCH_LLAMA_SERVER) the path of llama.cpp's "
                             "llama-server, or run `llamalaunch toolchain install`)\n")


@pytest.mark.llama
def test_inspection_is_cached_per_binary(llama_bin_dir: Path, bare_path: Path) -> None:
    find_toolchain(str(llama_bin_dir), cache=NO_CACHE)
    started = time.perf_counter()
    find_toolchain(str(llama_bin_dir), cache=NO_CACHE)
    assert time.perf_counter() - started < 0.01


def test_help_parsing_reads_the_option_column_only() -> None:
    help_text = textwrap.dedent("""\
        -h,    --help, --usage                  print usage and exit
        --version                               show version and build info
        -dev,  --device <dev1,dev2,..>          comma-separated list of devices (none = don't offload)
                                                use --list-devices to see a list of available devices
        -fitt, --fit-target MiB0,MiB1,MiB2,...
                                                target margin per device for --fit
        -lv,   --verbosity, --log-verbosity N   Set the verbosity threshold, see --log-file
    """)
    assert parse_help_options(help_text) == {"-h", "--help", "--usage", "--version", "-dev", "--device",
                                             "-fitt", "--fit-target", "-lv", "--verbosity", "--log-verbosity"}
    rpc_help = "options:\n  -h, --help                       show this help\n  -p, --port PORT    port\n"
    assert parse_help_options(rpc_help) == {"-h", "--help", "-p", "--port"}


def test_version_parsing() -> None:
    assert parse_version("version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU") == \
        "0.5.0-dev (build 1, commit 0c1e570)"
    assert parse_version("version: 4521 (a1b2c3d4)\n") == "4521 (a1b2c3d4)"
    assert parse_version("garbage") == "unknown"


# --- install -----------------------------------------------------------------------------------------


@pytest.mark.llama
def test_install_is_instant_when_the_build_is_there(llama_bin_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    link_binaries(cached_bin_dir(cache, "cpu"), llama_bin_dir)
    said: list[str] = []
    started = time.perf_counter()
    assert install(False, said.append, cache=cache) == cached_bin_dir(cache, "cpu")
    assert time.perf_counter() - started < 1.0
    assert said == []  # nothing done, nothing said: a second scripts/setup stays quiet


@pytest.mark.llama
def test_second_install_waits_for_the_lock_then_returns(llama_bin_dir: Path, tmp_path: Path) -> None:
    """While one install holds the lock the other waits; once the first has finished, nothing is rebuilt."""
    cache = tmp_path / "cache"
    bin_dir = cached_bin_dir(cache, "cpu")
    lock_path = lock_file(bin_dir)
    lock_path.parent.mkdir(parents=True)
    said: list[str] = []
    result: list[Path] = []
    with open(lock_path, "a+") as first_install:
        fcntl.flock(first_install, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: result.append(install(False, said.append, cache=cache)))
        second.start()
        _wait_until(lambda: any("waiting for another install" in line for line in said))
        assert second.is_alive() and not result
        link_binaries(bin_dir, llama_bin_dir)  # the first install "finishes"
        fcntl.flock(first_install, fcntl.LOCK_UN)
    second.join(10)
    assert result == [bin_dir]
    assert said[-1] == f"already installed: {bin_dir}"


def _wait_until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


FAKE_TREE_CMAKE = """\
cmake_minimum_required(VERSION 3.14)
project(fake C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_library(ggml-base SHARED ggml.c)
foreach(name llama-server ggml-rpc-server llama-fit-params)
  add_executable(${name} main.c)
  target_link_libraries(${name} PRIVATE ggml-base)
endforeach()
"""
FAKE_MAIN = """\
#include <stdio.h>
#include <string.h>
const char *ggml_version(void);
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) { printf("version: %s\\n", ggml_version()); return 0; }
    printf("-h,    --help                     print usage\\n--version                  show version\\n");
    return 0;
}
"""


def fake_llama_tree(root: Path, main_source: str = FAKE_MAIN) -> Path:
    """A tiny CMake project with llama.cpp's three target names and one shared library (for RPATH)."""
    (root / "tools" / "rpc").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(FAKE_TREE_CMAKE)
    (root / "main.c").write_text(main_source)
    (root / "ggml.c").write_text('const char *ggml_version(void) { return "fake 1 (build 7)"; }\n')
    return root


def test_install_builds_collects_and_moves_into_place(tmp_path: Path) -> None:
    """The whole pipeline on a tiny tree: configure, compile, copy libs, RPATH $ORIGIN, verify, rename."""
    cache = tmp_path / "cache"
    said: list[str] = []
    bin_dir = install(False, said.append, jobs=2, sdist=fake_llama_tree(tmp_path / "src"), cache=cache)
    assert bin_dir == cached_bin_dir(cache, "cpu") and is_installed(bin_dir)
    assert (bin_dir / "libggml-base.so").exists() and (bin_dir.parent / "build.json").exists()
    moved = tmp_path / "moved"
    shutil.move(str(bin_dir), moved)  # the binaries find their library beside them, wherever they go
    assert is_installed(moved)
    assert any(line.startswith("[") and "/" in line for line in said)  # the [n/N] counter
    assert said[-1] == f"installed into {bin_dir}"
    assert sorted(path.name for path in bin_dir.parent.parent.iterdir()) == [
        "llama-cpp-python-0.3.36-cpu", "llama-cpp-python-0.3.36-cpu.lock"]


def test_compile_failure_shows_the_compiler_tail_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tree = fake_llama_tree(tmp_path / "src", main_source="int main(void) { this is not C; }\n")
    with pytest.raises(ToolchainError) as caught:
        install(False, lambda _: None, jobs=2, sdist=tree, cache=cache)
    text = str(caught.value)
    assert text.startswith("compiling llama.cpp failed (exit status")
    assert "main.c" in text and "error" in text
    assert len(text.splitlines()) <= 25
    left = sorted(path.name for path in (cache / "llama.cpp").iterdir())
    assert left == ["llama-cpp-python-0.3.36-cpu.lock"]


def test_sdist_with_the_wrong_hash_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / LLAMA_CPP_SDIST.filename
    with tarfile.open(fake, "w:gz") as archive:
        archive.add(fake_llama_tree(tmp_path / "src"), arcname="llama_cpp_python-0.3.36")
    with pytest.raises(ToolchainError, match=r"is not the pinned llama-cpp-python==0.3.36 sdist"):
        install(False, lambda _: None, sdist=fake, cache=tmp_path / "cache")
    assert not cached_bin_dir(tmp_path / "cache", "cpu").exists()


@pytest.mark.llama
def test_an_sdist_that_is_not_an_archive_is_refused_even_when_installed(
        llama_bin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build being there already is no reason to accept a wrong --sdist silently."""
    monkeypatch.setenv("LLAMALAUNCH_CACHE", str(tmp_path / "cache"))
    link_binaries(cached_bin_dir(tmp_path / "cache", "cpu"), llama_bin_dir)
    text = tmp_path / "text.gguf"
    text.write_text("not an sdist\n")
    result = CliRunner().invoke(app, ["toolchain", "install", "--sdist", str(text)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (f"error: {text} is not a gzip/tar archive (pass the pinned sdist "
                             f"({LLAMA_CPP_SDIST.filename}) or a llama.cpp source folder)\n")


@pytest.mark.slow
def test_real_sdist_download_extract_and_configure(tmp_path: Path) -> None:
    """The first steps of a real install on the pinned sdist (the compile itself takes ~7 min)."""
    said: list[str] = []
    archive = fetch_sdist(cache_dir(), said.append)  # shared cache: downloaded once per machine
    assert archive.name == LLAMA_CPP_SDIST.filename
    try:
        tree = extract_llama_tree(archive, tmp_path / "src")
        assert (tree / "tools" / "rpc" / "rpc-server.cpp").is_file()
        configure(tree, tmp_path / "build", False, said.append)
        cmake_cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
        assert "GGML_RPC:BOOL=ON" in cmake_cache and "LLAMA_USE_PREBUILT_UI:BOOL=OFF" in cmake_cache
        ninja_file = tmp_path / "build" / "build.ninja"
        assert not ninja_file.exists() or "$$ORIGIN" in ninja_file.read_text()
    finally:
        shutil.rmtree(tmp_path / "src", ignore_errors=True)  # 176 MB
        shutil.rmtree(tmp_path / "build", ignore_errors=True)


def test_a_cudacxx_that_is_no_program_is_said_before_anything_is_unpacked(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """cmake failed on it after the 76 MB sdist was unpacked, with a hint about apt-get install cmake."""
    monkeypatch.setenv("CUDACXX", str(tmp_path / "nvcc"))
    with pytest.raises(ToolchainError, match=r"CUDACXX=.*/nvcc is not an executable nvcc") as refused:
        install(True, lambda _: None, cache=tmp_path / "cache")
    assert refused.value.hint is not None and "unset it" in refused.value.hint
    assert not (tmp_path / "cache").exists()
