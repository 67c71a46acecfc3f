"""One reader of --api-key-file, with llama-server's rules, for serve's check, the supervisor and `status`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamalaunch.errors import BadInputError
from llamalaunch.launch.http import read_api_key


@pytest.mark.parametrize(("content", "key"), [
    (b"secret\n", "secret"),
    (b"secret", "secret"),
    (b"# a comment\n\nfirst\nsecond\n", "first"),
    (b"#not-a-key\nk#1\n", "k#1"),
])
def test_the_first_key_as_llama_server_reads_it(tmp_path: Path, content: bytes, key: str) -> None:
    (path := tmp_path / "key").write_bytes(content)
    assert read_api_key(path) == key


@pytest.mark.parametrize(("content", "message"), [
    (b"", "the API key file {path} holds no key (write the key on a line of its own)"),
    (b"# only a comment\n\n", "the API key file {path} holds no key (write the key on a line of its own)"),
    (b"secret\r\n", ("a key in {path} has spaces or a carriage return around it (Windows line endings?) "
                     "(llama-server would expect them in every request: save the file with plain \\n endings)")),
    (b" secret\n", "a key in {path} has spaces or a carriage return around it"),
    (b"\xff\xfe", "cannot read the API key file {path}: not a text file (check the path and its permissions)"),
])
def test_a_file_llama_server_would_misread_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    (path := tmp_path / "key").write_bytes(content)
    with pytest.raises(BadInputError) as caught:
        read_api_key(path)
    assert str(caught.value).startswith(message.format(path=path))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="cannot read the API key file .*: No such file or directory"):
        read_api_key(tmp_path / "absent")


def test_status_reads_the_key_file_by_the_same_rules(tmp_path: Path) -> None:
    """`status` used to strip the key (and take a comment-only file as no key): it now refuses what serve
    refuses, before it asks any server."""
    (key := tmp_path / "key").write_bytes(b"secret\r\n")
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "status", "--url", "http://127.0.0.1:9",
                             "--api-key-file", str(key), "--once"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: a key in {key} has spaces or a carriage return around it")
    assert result.stdout == ""
