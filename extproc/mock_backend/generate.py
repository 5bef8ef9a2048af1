"""Response bodies and SSE byte streams, shaped like the real APIs.

Pure functions of the parsed request, the decided ``Usage`` and the ids the
caller supplies (no I/O, no clocks), so the shapes can be unit-tested and the
HTTP layer only decides *when* bytes leave. The shapes follow OpenAI (chat,
legacy completions, Responses, embeddings) and Anthropic Messages closely
enough that the official SDKs parse them unchanged.

A stream is an ``SSEPlan``: ``head`` is sent at once, then one ``steps`` entry
per generated token (all choices' deltas for that token), then ``tail``.
The HTTP layer sleeps the per-token delay before each step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from .usage import TOKEN_TEXT, Usage

EMBEDDING_DIMS = 8

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True, slots=True)
class SSEPlan:
    """A stream: ``head`` at once, one ``steps`` item per token, then ``tail``."""

    head: bytes
    steps: list[bytes]
    tail: bytes

    def joined(self) -> bytes:
        return self.head + b"".join(self.steps) + self.tail


def _data(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _token_steps(count: int, middle: bytes, last: bytes) -> list[bytes]:
    """``count`` steps, all ``middle`` except the final one, ``last``."""
    if count <= 0:
        return []
    return [middle] * (count - 1) + [last]


# --------------------------------------------------------------------------- errors

_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope (also used by vLLM's OpenAI-compatible server)."""
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------- OpenAI chat


def openai_usage(u: Usage) -> dict[str, Any]:
    """Chat/completions usage; ``completion_tokens`` includes reasoning tokens."""
    completion = u.completion
    return {
        "prompt_tokens": u.prompt,
        "completion_tokens": completion,
        "total_tokens": u.prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u.cached},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning * u.n},
    }


def _finish(u: Usage) -> str:
    return "length" if u.truncated else "stop"


def chat_json(*, id: str, created: int, model: str, usage: Usage, with_usage: bool = True) -> dict[str, Any]:
    text = usage.text
    finish = _finish(usage)
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i in range(usage.n)
        ],
        "system_fingerprint": "fp_mock",
    }
    if with_usage:
        body["usage"] = openai_usage(usage)
    return body


def chat_stream(
    *, id: str, created: int, model: str, usage: Usage, include_usage: bool, with_usage: bool = True
) -> SSEPlan:
    """Chunks like OpenAI: a role chunk per choice, one content chunk per token
    (the last carries ``finish_reason``), then, when ``include_usage``, a chunk
    with ``choices: []`` and the usage (every other chunk has ``usage: null``)."""
    usage_null = include_usage and with_usage

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        obj: dict[str, Any] = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        }
        if usage_null:
            obj["usage"] = None
        return _data(obj)

    def choice(i: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    n, finish = usage.n, _finish(usage)
    head = b"".join(chunk([choice(i, {"role": "assistant", "content": ""}, None)]) for i in range(n))
    middle = b"".join(chunk([choice(i, {"content": TOKEN_TEXT}, None)]) for i in range(n))
    last = b"".join(chunk([choice(i, {"content": TOKEN_TEXT}, finish)]) for i in range(n))
    tail = b""
    if usage.output == 0:
        tail += b"".join(chunk([choice(i, {}, finish)]) for i in range(n))
    if usage_null:
        final = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": openai_usage(usage),
        }
        tail += _data(final)
    return SSEPlan(head, _token_steps(usage.output, middle, last), tail + _DONE)


# --------------------------------------------------------------------------- legacy completions


def completion_json(*, id: str, created: int, model: str, usage: Usage, with_usage: bool = True) -> dict[str, Any]:
    text, finish = usage.text, _finish(usage)
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": finish} for i in range(usage.n)],
    }
    if with_usage:
        body["usage"] = openai_usage(usage)
    return body


def completion_stream(
    *, id: str, created: int, model: str, usage: Usage, include_usage: bool, with_usage: bool = True
) -> SSEPlan:
    """Legacy streaming: one ``text`` chunk per token and choice; usage rule as chat."""
    usage_null = include_usage and with_usage

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj: dict[str, Any] = {"id": id, "object": "text_completion", "created": created, "model": model}
        obj["choices"] = choices
        if usage_null:
            obj["usage"] = None
        obj.update(extra)
        return _data(obj)

    def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}

    n, finish = usage.n, _finish(usage)
    middle = b"".join(chunk([choice(i, TOKEN_TEXT, None)]) for i in range(n))
    last = b"".join(chunk([choice(i, TOKEN_TEXT, finish)]) for i in range(n))
    tail = b""
    if usage.output == 0:
        tail += b"".join(chunk([choice(i, "", finish)]) for i in range(n))
    if usage_null:
        tail += chunk([], usage=openai_usage(usage))
    return SSEPlan(b"", _token_steps(usage.output, middle, last), tail + _DONE)


# --------------------------------------------------------------------------- Responses API


def responses_usage(u: Usage) -> dict[str, Any]:
    output = u.completion
    return {
        "input_tokens": u.prompt,
        "input_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning * u.n},
        "total_tokens": u.prompt + output,
    }


def _response_object(
    *,
    id: str,
    created: int,
    body: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    completed_at: int | None,
) -> dict[str, Any]:
    instructions = body.get("instructions")
    return {
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "completed_at": completed_at,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions if isinstance(instructions, (str, list)) else None,
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": body.get("model"),
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": bool(body.get("store", True)),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
    }


def _message_item(msg_id: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
    return {"id": msg_id, "type": "message", "status": status, "content": content, "role": "assistant"}


def responses_json(
    *, id: str, msg_id: str, created: int, body: dict[str, Any], usage: Usage, with_usage: bool = True
) -> dict[str, Any]:
    return _response_object(
        id=id,
        created=created,
        body=body,
        status="completed",
        output=[_message_item(msg_id, "completed", usage.text)],
        usage=responses_usage(usage) if with_usage else None,
        completed_at=created,
    )


def responses_stream(
    *, id: str, msg_id: str, created: int, body: dict[str, Any], usage: Usage, with_usage: bool = True
) -> SSEPlan:
    """Typed events as the Responses API sends them, each with ``sequence_number``:
    created, in_progress, output_item.added, content_part.added, one
    output_text.delta per token, output_text.done, content_part.done,
    output_item.done, completed (the full response, usage included)."""
    seq = 0

    def ev(obj: dict[str, Any]) -> bytes:
        nonlocal seq
        obj["sequence_number"] = seq
        seq += 1
        return _event(obj["type"], obj)

    text = usage.text
    pending = _response_object(
        id=id, created=created, body=body, status="in_progress", output=[], usage=None, completed_at=None
    )
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    head = b"".join(
        (
            ev({"type": "response.created", "response": pending}),
            ev({"type": "response.in_progress", "response": pending}),
            ev({"type": "response.output_item.added", "output_index": 0, "item": _message_item(msg_id, "in_progress", None)}),
            ev({"type": "response.content_part.added", **where, "part": empty_part}),
        )
    )
    prefix = _dumps({"type": "response.output_text.delta", **where, "delta": TOKEN_TEXT, "logprobs": []})[:-1]
    steps = []
    for _ in range(usage.output):
        payload = f'{prefix},"sequence_number":{seq}}}'.encode()
        seq += 1
        steps.append(b"event: response.output_text.delta\ndata: " + payload + b"\n\n")
    done_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    final = _response_object(
        id=id,
        created=created,
        body=body,
        status="completed",
        output=[_message_item(msg_id, "completed", text)],
        usage=responses_usage(usage) if with_usage else None,
        completed_at=created,
    )
    tail = b"".join(
        (
            ev({"type": "response.output_text.done", **where, "text": text, "logprobs": []}),
            ev({"type": "response.content_part.done", **where, "part": done_part}),
            ev({"type": "response.output_item.done", "output_index": 0, "item": _message_item(msg_id, "completed", text)}),
            ev({"type": "response.completed", "response": final}),
        )
    )
    return SSEPlan(head, steps, tail)


# --------------------------------------------------------------------------- embeddings


def embedding_vector(text: str) -> list[float]:
    """A deterministic unit vector of EMBEDDING_DIMS floats derived from the text."""
    digest = hashlib.blake2b(text.encode(), digest_size=2 * EMBEDDING_DIMS).digest()
    raw = [(int.from_bytes(digest[i : i + 2], "little") / 32767.5) - 1.0 for i in range(0, len(digest), 2)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def embeddings_json(*, model: str, inputs: list[str], usage: Usage, encoding_format: str = "float") -> dict[str, Any]:
    """OpenAI embeddings list; ``base64`` packs little-endian float32 like the real API."""
    data = []
    for i, text in enumerate(inputs):
        vec: Any = embedding_vector(text)
        if encoding_format == "base64":
            vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": usage.prompt, "total_tokens": usage.prompt},
    }


# --------------------------------------------------------------------------- Anthropic Messages


def anthropic_usage(u: Usage, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": u.uncached_input,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cached,
        "output_tokens": output_tokens,
    }


def _stop_reason(u: Usage) -> str:
    return "max_tokens" if u.truncated else "end_turn"


def messages_json(*, id: str, model: str, usage: Usage, with_usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": usage.text}],
        "stop_reason": _stop_reason(usage),
        "stop_sequence": None,
    }
    if with_usage:
        body["usage"] = anthropic_usage(usage, usage.completion)
    return body


def messages_stream(*, id: str, model: str, usage: Usage, with_usage: bool = True) -> SSEPlan:
    """message_start (input usage, output_tokens 1), content_block_start, ping,
    one text_delta per token, content_block_stop, message_delta (cumulative
    usage: final output_tokens plus the input figures, as the API now sends),
    message_stop."""
    message: dict[str, Any] = {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if with_usage:
        message["usage"] = anthropic_usage(usage, 1)
    head = b"".join(
        (
            _event("message_start", {"type": "message_start", "message": message}),
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            _event("ping", {"type": "ping"}),
        )
    )
    step = _event(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TOKEN_TEXT}},
    )
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(usage), "stop_sequence": None},
    }
    if with_usage:
        delta["usage"] = anthropic_usage(usage, usage.completion)
    tail = b"".join(
        (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", delta),
            _event("message_stop", {"type": "message_stop"}),
        )
    )
    return SSEPlan(head, [step] * usage.output, tail)
