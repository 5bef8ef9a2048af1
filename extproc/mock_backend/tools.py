"""Tool calls from the mock backend: what an agent loop needs to run against it.

Like a real model, the mock calls a tool only when the request forces one:
OpenAI `tool_choice: "required"` or `{"type": "function", ...}` (chat and
Responses), Anthropic `tool_choice: {"type": "any"}` or `{"type": "tool", ...}`.
It then calls the named (else the first) tool once, with `{}` as arguments,
after the text it generated: `finish_reason: "tool_calls"` / `stop_reason:
"tool_use"`, in JSON bodies and streams alike. Pure functions of the request
and the body or stream the generator built.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from .generate import SSEPlan, _data, _event

_ARGS = "{}"
_STOP = re.compile(rb'"stop_reason":"[a-z_]+"')  # message_delta's, the only one in a stream's tail


def _tool_names(tools: Any) -> list[str]:
    names = []
    for t in tools if isinstance(tools, list) else ():
        if isinstance(t, dict):
            fn = t["function"] if isinstance(t.get("function"), dict) else t
            if isinstance(name := fn.get("name"), str):
                names.append(name)
    return names


def forced(api: str, body: dict[str, Any]) -> str | None:
    """The tool the request forces the model to call, or None."""
    names = _tool_names(body.get("tools"))
    choice = body.get("tool_choice")
    if not names or choice is None:
        return None
    if api == "messages":
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "tool" and isinstance(choice.get("name"), str):
            return str(choice["name"])
        return names[0] if kind == "any" else None
    if choice == "required":
        return names[0]
    if isinstance(choice, dict):
        fn = choice["function"] if isinstance(choice.get("function"), dict) else choice
        name = fn.get("name")
        return name if isinstance(name, str) else names[0]
    return None


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def with_call(api: str, obj: dict[str, Any], name: str) -> dict[str, Any]:
    """A JSON response body with one call of `name` added."""
    if api == "chat":
        for choice in obj["choices"]:
            call = {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": _ARGS}}
            choice["message"]["tool_calls"] = [call]
            choice["finish_reason"] = "tool_calls"
    elif api == "responses":
        obj["output"].append(_responses_item(name))
    elif api == "messages":
        obj["content"].append({"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": name, "input": {}})
        obj["stop_reason"] = "tool_use"
    return obj


def _responses_item(name: str) -> dict[str, Any]:
    return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24], "call_id": _call_id(), "name": name,
            "arguments": _ARGS, "status": "completed"}  # fmt: skip


def with_call_stream(api: str, plan: SSEPlan, name: str, *, chunk_id: str, model: str) -> SSEPlan:
    """A stream with one call of `name` after the generated text (before the usage and the end)."""
    if api == "chat":
        delta = {"tool_calls": [{"index": 0, "id": _call_id(), "type": "function", "function": {"name": name, "arguments": _ARGS}}]}
        chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": "tool_calls"}]}  # fmt: skip
        return SSEPlan(plan.head, plan.steps, _data(chunk) + plan.tail)
    if api == "responses":
        item = _responses_item(name)
        done = _event("response.output_item.done", {"type": "response.output_item.done", "output_index": 1, "item": item})
        return SSEPlan(plan.head, plan.steps, _insert_before(plan.tail, b"response.completed", done))
    if api == "messages":
        block = {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": name, "input": {}}
        events = b"".join(
            (
                _event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": block}),
                _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": _ARGS}},
                ),
                _event("content_block_stop", {"type": "content_block_stop", "index": 1}),
            )
        )
        tail = _STOP.sub(b'"stop_reason":"tool_use"', _insert_before(plan.tail, b"event: message_delta", events), count=1)
        return SSEPlan(plan.head, plan.steps, tail)
    return plan


def _insert_before(tail: bytes, marker: bytes, events: bytes) -> bytes:
    """`events` before the SSE event that contains `marker` (the end of `tail` without one)."""
    at = tail.find(marker)
    if at < 0:
        return tail + events
    start = tail.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    return tail[:start] + events + tail[start:]
