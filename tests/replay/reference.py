"""The usage a provider reported in a recorded response, read independently of extproc.

This is the test's own reading of the providers' documented `usage` shapes,
written from the API references and not from `extproc.protocols`, so a
replay test compares extproc's charge against a second implementation:

- OpenAI Chat Completions / Completions / Embeddings: `usage.prompt_tokens`
  *includes* `prompt_tokens_details.cached_tokens` (and `cache_write_tokens`
  where reported); `completion_tokens` includes
  `completion_tokens_details.reasoning_tokens`. A stream carries usage only in
  its last chunk (`choices: []`) when `stream_options.include_usage` was set.
- OpenAI Responses: `usage.input_tokens` includes
  `input_tokens_details.cached_tokens`; `output_tokens` includes
  `output_tokens_details.reasoning_tokens`. A stream reports it in the
  `response.completed` (or `.incomplete` / `.failed`) event's `response.usage`.
- Anthropic Messages: `input_tokens`, `cache_read_input_tokens` and
  `cache_creation_input_tokens` are disjoint; `output_tokens` includes
  thinking. A stream reports `message_start.message.usage`, then cumulative
  counts in `message_delta.usage` that replace the fields they carry. When
  `usage.iterations` is present the billed usage is the sum over iterations.

`Buckets` are disjoint: uncached input, cache reads, cache writes, output.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Buckets:
    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def decode_body(body: bytes, content_encoding: str | None) -> bytes:
    """The body as the provider meant it (undo `Content-Encoding`)."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    if enc == "deflate":
        return zlib.decompress(body)
    if enc == "br":
        import brotli  # type: ignore[import-not-found]

        return brotli.decompress(body)
    raise ValueError(f"unknown content-encoding {content_encoding!r}")


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each event of an SSE text (WHATWG framing, minimal)."""
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    data: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    if data:
        events.append((name, "\n".join(data)))
    return events


def _n(obj: dict[str, Any] | None, key: str) -> int:
    v = (obj or {}).get(key)
    return int(v) if isinstance(v, int) else 0


def openai_buckets(u: dict[str, Any]) -> Buckets:
    if "input_tokens" in u and "prompt_tokens" not in u:  # Responses API shape
        details = u.get("input_tokens_details") or {}
        total_in = _n(u, "input_tokens")
        out_details = u.get("output_tokens_details") or {}
        out = _n(u, "output_tokens")
    else:
        details = u.get("prompt_tokens_details") or {}
        total_in = _n(u, "prompt_tokens")
        out_details = u.get("completion_tokens_details") or {}
        out = _n(u, "completion_tokens")
    cached = _n(details, "cached_tokens")
    write = _n(details, "cache_write_tokens")
    return Buckets(total_in - cached - write, cached, write, out, _n(out_details, "reasoning_tokens"))


def anthropic_buckets(u: dict[str, Any]) -> Buckets:
    iterations = u.get("iterations")
    if isinstance(iterations, list) and iterations:
        parts = [anthropic_buckets({k: v for k, v in it.items() if k != "iterations"}) for it in iterations]
        return Buckets(*(sum(getattr(p, f) for p in parts) for f in ("input", "cached_input", "cache_write", "output", "reasoning")))
    return Buckets(
        _n(u, "input_tokens"), _n(u, "cache_read_input_tokens"), _n(u, "cache_creation_input_tokens"), _n(u, "output_tokens")
    )


def reported_usage(api: str, body: bytes, *, content_type: str, content_encoding: str | None) -> dict[str, Any] | None:
    """{"reported": <the provider's usage object(s)>, "buckets": {...}} or None when none was reported."""
    text = decode_body(body, content_encoding).decode("utf-8")
    if "text/event-stream" not in content_type:
        doc = json.loads(text)
        u = doc.get("usage") if isinstance(doc, dict) else None
        if not isinstance(u, dict):
            return None
        b = anthropic_buckets(u) if api.startswith("anthropic") else openai_buckets(u)
        return {"reported": u, "buckets": b.as_dict()}
    if api.startswith("anthropic"):
        merged: dict[str, Any] = {}
        seen: list[dict[str, Any]] = []
        for _, data in sse_events(text):
            ev = json.loads(data)
            if ev.get("type") == "message_start":
                u = (ev.get("message") or {}).get("usage")
            elif ev.get("type") == "message_delta":
                u = ev.get("usage")
            else:
                continue
            if isinstance(u, dict):
                seen.append(u)
                merged.update({k: v for k, v in u.items() if v is not None})
        if not seen:
            return None
        return {"reported": seen, "buckets": anthropic_buckets(merged).as_dict()}
    last: dict[str, Any] | None = None
    for _, data in sse_events(text):
        if data.strip() == "[DONE]":
            continue
        ev = json.loads(data)
        if api == "openai.responses":
            if ev.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                u = (ev.get("response") or {}).get("usage")
            else:
                u = None
        else:
            u = ev.get("usage")
        if isinstance(u, dict):
            last = u
    if last is None:
        return None
    return {"reported": last, "buckets": openai_buckets(last).as_dict()}
