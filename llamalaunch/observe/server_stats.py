"""Ask a llama-server over HTTP (/health, /slots, /metrics, /props) for its ServerStats."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from llamalaunch.launch import http
from llamalaunch.observe.snapshot import ServerStats


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition → {name: value} (labels dropped; llama-server's metrics have none)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            try:
                values[parts[0].split("{", 1)[0]] = float(parts[1])
            except ValueError:
                continue
    return values


def _as_int(value: float | None) -> int | None:
    return int(value) if value is not None else None


_COUNTERS = ("prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total", "tokens_predicted_seconds_total")


def _rate(metrics: Mapping[str, float], tokens: str, seconds: str) -> float | None:
    """Tokens per second of processing from two counters. Not the `*_tokens_seconds` gauges: those are
    averaged over the window between two scrapes, so every other scraper would shorten ours (and we theirs)."""
    spent = metrics.get(f"llamacpp:{seconds}")
    done = metrics.get(f"llamacpp:{tokens}")
    # Below 10 ms the quotient is noise (the readiness check's one token takes microseconds).
    return done / spent if done is not None and spent is not None and spent >= 0.01 else None


def _counters(metrics: Mapping[str, float]) -> tuple[float, ...] | None:
    values = [metrics.get(f"llamacpp:{name}") for name in _COUNTERS]
    return tuple(v for v in values if v is not None) if all(v is not None for v in values) else None


def with_recent_rates(stats: ServerStats, before: tuple[float, ...] | None) -> ServerStats:
    """Rates over the tokens processed since the `before` counters (None where none were)."""
    if before is None or stats.counters is None:
        return stats
    prompt_tokens, prompt_s, generated, generated_s = (
        now - then for now, then in zip(stats.counters, before, strict=True))
    return dataclasses.replace(
        stats, recent_prompt_tokens_per_s=prompt_tokens / prompt_s if prompt_tokens > 0 and prompt_s > 0 else None,
        recent_generation_tokens_per_s=generated / generated_s if generated > 0 and generated_s > 0 else None)


NOT_LLAMA_ANSWER = "HTTP 200, not llama-server's answer"  # /health's health where its body is another server's


def ask_server(url: str, api_key: str | None = None, with_props: bool = False,
               slots_total: int | None = None) -> tuple[ServerStats, list[str]]:
    """/health, then (when it answers) /slots and /metrics; the stats and notes on what did not answer.

    With `slots_total` known, /slots is skipped: /metrics' requests_processing is the busy slot count,
    and every request is one more task (and a dozen debug lines in a `-lv 5` log) for the server.
    """
    notes: list[str] = []
    health = http.health(url, api_key)
    if health.status == 0:
        return ServerStats("unreachable"), [f"no answer from {url}: {health.error}"]
    if health.status == 503:
        return ServerStats("loading"), notes
    if health.status != 200:
        return ServerStats(f"HTTP {health.status}"), [f"{url}/health answered HTTP {health.status}"]
    if not (isinstance(health.body, dict) and health.body.get("status") == "ok"):
        return ServerStats(NOT_LLAMA_ANSWER), [f"{url}/health answered HTTP 200 but not "
                                                                   "with llama-server's {\"status\": \"ok\"}"]
    busy = None
    if slots_total is None:
        slots_total, busy = _ask_slots(url, api_key, notes)
    metrics_result = http.get_json(url, "/metrics", api_key)
    metrics = parse_metrics(metrics_result.body) \
        if metrics_result.status == 200 and isinstance(metrics_result.body, str) else {}
    if metrics_result.status != 200:
        notes.append(_endpoint_note(url, "/metrics", metrics_result.status))
    processing = _as_int(metrics.get("llamacpp:requests_processing"))
    stats = ServerStats(
        "ok", slots_total, busy if busy is not None else processing,
        _rate(metrics, "prompt_tokens_total", "prompt_seconds_total"),
        _rate(metrics, "tokens_predicted_total", "tokens_predicted_seconds_total"),
        prompt_tokens_total=_as_int(metrics.get("llamacpp:prompt_tokens_total")),
        generated_tokens_total=_as_int(metrics.get("llamacpp:tokens_predicted_total")),
        requests_processing=processing, requests_deferred=_as_int(metrics.get("llamacpp:requests_deferred")),
        counters=_counters(metrics), metrics_text=metrics_result.body if metrics else None)
    if processing:  # a request runs: /slots says how far (only then: each ask is lines in a -lv 5 log)
        stats = dataclasses.replace(stats, decoding_tokens=_decoding(url, api_key))
    if with_props:
        stats = _with_props(stats, http.get_json(url, "/props", api_key))
    return stats, notes


def _decoding(url: str, api_key: str | None) -> int | None:
    """Tokens the busy slots have generated so far in their requests."""
    slots = http.get_json(url, "/slots", api_key)
    if slots.status != 200 or not isinstance(slots.body, list):
        return None
    return sum(int(slot.get("next_token", [{}])[0].get("n_decoded", 0) if isinstance(slot.get("next_token"), list)
                   else slot.get("n_decoded", 0))
               for slot in slots.body if isinstance(slot, dict) and slot.get("is_processing"))


def _ask_slots(url: str, api_key: str | None, notes: list[str]) -> tuple[int | None, int | None]:
    slots = http.get_json(url, "/slots", api_key)
    if slots.status == 200 and isinstance(slots.body, list):
        busy = sum(1 for slot in slots.body if isinstance(slot, dict) and slot.get("is_processing"))
        return len(slots.body), busy
    notes.append(_endpoint_note(url, "/slots", slots.status))
    return None, None


def _with_props(stats: ServerStats, props: http.HttpResult) -> ServerStats:
    if props.status != 200 or not isinstance(props.body, dict):
        return stats
    settings = props.body.get("default_generation_settings") or {}
    ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return dataclasses.replace(stats, ctx_tokens=ctx if isinstance(ctx, int) else None,
                               model_path=props.body.get("model_path"),
                               slots_total=stats.slots_total or props.body.get("total_slots"))


def _endpoint_note(url: str, path: str, status: int) -> str:
    if status in (401, 403):
        return f"{url}{path} needs the API key: pass --api-key-file"
    if status == 501:
        return f"{url}{path} is turned off in this llama-server"
    return f"{url}{path} answered {'nothing' if status == 0 else f'HTTP {status}'}"
