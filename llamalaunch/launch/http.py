"""The only module that speaks HTTP to llama-server (urllib, loopback or the user's URL)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalaunch.errors import BadInputError


def read_api_key(path: Path) -> str:
    """The key llama-server takes from --api-key-file, read as it reads the file: lines split at \\n only
    (a \\r stays), `#` comments skipped, the first key counts. serve checks the file with this before
    anything starts, the supervisor and `status` authenticate with it.

    Raises:
        BadInputError: the file cannot be read, holds no key (a server that answers anyone), or a key
            has spaces or a carriage return around it (llama-server would expect them in every request).
    """
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not a text file"
        raise BadInputError(f"cannot read the API key file {path}: {why}", "check the path and its permissions"
                            ) from None
    keys = [line for line in lines if line and not line.startswith("#")]
    if not any(key.strip() for key in keys):
        raise BadInputError(f"the API key file {path} holds no key", "write the key on a line of its own")
    if any(key != key.strip() for key in keys):
        raise BadInputError(f"a key in {path} has spaces or a carriage return around it (Windows line endings?)",
                            "llama-server would expect them in every request: save the file with plain \\n endings")
    return keys[0]


@dataclass(frozen=True)
class HttpResult:
    status: int  # 0: no answer (refused, timeout)
    body: Any  # parsed JSON, or text, or None
    error: str | None = None


def request(url: str, payload: dict[str, Any] | None = None, timeout_s: float = 2.0,
            api_key: str | None = None) -> HttpResult:
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return HttpResult(response.status, _decode(response.read()))
    except urllib.error.HTTPError as error:
        return HttpResult(error.code, _decode(error.read()), f"HTTP {error.code}")
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        return HttpResult(0, None, str(reason))


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def health(base_url: str, api_key: str | None = None, timeout_s: float = 1.0) -> HttpResult:
    return request(f"{base_url}/health", timeout_s=timeout_s, api_key=api_key)


def complete_one_token(base_url: str, timeout_s: float = 60.0, api_key: str | None = None,
                       prompt: str | list[int] = "Hi") -> HttpResult:
    """Readiness: /health can say ok after a fatal allocation failure (llama.cpp #27309)."""
    payload = {"prompt": prompt, "n_predict": 1, "cache_prompt": False}
    return request(f"{base_url}/completion", payload, timeout_s=timeout_s, api_key=api_key)


def get_json(base_url: str, path: str, api_key: str | None = None, timeout_s: float = 1.0) -> HttpResult:
    return request(f"{base_url}{path}", timeout_s=timeout_s, api_key=api_key)
