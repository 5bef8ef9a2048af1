"""Anthropic's Messages API: how to read its request and its stream events.

Requests: `system` (a string or text blocks) is one segment, `tools` one,
and each message one (role, then the text of its blocks; tool_use input as
compact JSON; tool_result content read recursively). Image blocks and
base64/URL/file documents are reported in `media`, not tokenised as text;
server tools (`web_search_20250305`, …) in `builtin_tools`.

Streams: usage arrives in two halves. `message_start.message.usage` carries
the input side (uncached, cache read, cache write) and an initial output
count; `message_delta.usage` carries the *cumulative* output count and may
repeat the input fields. The reader merges them field-wise (max).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from extproc.errors import BadRequest
from extproc.protocols import media
from extproc.protocols.media import MediaKind, MediaPart
from extproc.protocols.request import (
    Content,
    add_tools,
    compact_json,
    expect_object,
    expect_str,
    kind_of,
)
from extproc.protocols.stream import NOTHING, Observation
from extproc.protocols.usage import Usage, anthropic_usage


def _source(kind: MediaKind, source: Any) -> MediaPart:
    """An image/document `source`: base64 (`data`, `media_type`), url, or file."""
    if not isinstance(source, dict):
        return MediaPart(kind, "unknown")
    form = kind_of(source)
    mime = source.get("media_type")
    mime = mime if isinstance(mime, str) else None
    data = source.get("data")
    if form == "base64" and isinstance(data, str):
        return media.inline(kind, data, mime=mime)
    url = source.get("url")
    if form == "url" and isinstance(url, str):
        return media.from_url(kind, url)
    if form == "file":
        return MediaPart(kind, "file_id", mime=mime)
    return MediaPart(kind, "unknown", mime=mime)


def _blocks(value: Any, where: str, parts: list[str], c: Content) -> None:
    """A string or an array of content blocks."""
    if isinstance(value, str):
        parts.append(value)
        return
    if not isinstance(value, list):
        raise BadRequest(f"`{where}` must be a string or an array of content blocks", param=where)
    for j, block in enumerate(value):
        here = f"{where}[{j}]"
        b = expect_object(block, here)
        kind = kind_of(b)
        if kind == "text":
            parts.append(expect_str(b.get("text"), f"{here}.text"))
        elif kind == "image":
            c.add_media(_source("image", b.get("source")), here)
        elif kind in ("tool_use", "server_tool_use"):
            name = b.get("name")
            parts.append(f"{name if isinstance(name, str) else ''} {compact_json(b.get('input'))}")
        elif kind in ("tool_result", "search_result"):
            title = b.get("title")
            if isinstance(title, str):
                parts.append(title)
            content = b.get("content")
            if content is not None:
                _blocks(content, f"{here}.content", parts, c)
        elif kind == "thinking":
            thinking = b.get("thinking")
            if isinstance(thinking, str):
                parts.append(thinking)
        elif kind == "document":
            source = b.get("source")
            if isinstance(source, dict) and kind_of(source) == "text":
                data = source.get("data")
                if isinstance(data, str):
                    parts.append(data)
            elif isinstance(source, dict) and kind_of(source) == "content":
                _blocks(source.get("content"), f"{here}.source.content", parts, c)
            else:  # base64 (PDF), url, file: priced by the estimator from `media`
                c.add_media(_source("document", source), here)
        # redacted_thinking, …: not estimated from text


def read_messages(obj: dict[str, Any]) -> Content:
    c = Content()
    system = obj.get("system")
    if system is not None:
        parts = ["system"]
        _blocks(system, "system", parts, c)
        c.segments.append("\n".join(parts))
    add_tools(c, obj, "tools")
    if obj.get("mcp_servers"):
        c.builtin_tools.add("mcp")
    fmt = obj.get("output_format")
    c.json_mode = isinstance(fmt, dict) and kind_of(fmt) == "json_schema"
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("`messages` must be an array of message objects", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        msg = expect_object(m, where)
        parts = [expect_str(msg.get("role"), f"{where}.role")]
        content = msg.get("content")
        if content is None:
            raise BadRequest(f"`{where}.content` is required", param=f"{where}.content")
        _blocks(content, f"{where}.content", parts, c)
        c.segments.append("\n".join(parts))
    return c


# --- streamed events -------------------------------------------------------------

_DELTA_TEXT = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


def _message_start(obj: dict[str, Any]) -> Observation:
    message = obj.get("message")
    usage = anthropic_usage(message.get("usage")) if isinstance(message, dict) else None
    return Observation((), usage) if usage is not None else NOTHING


def _content_block_start(obj: dict[str, Any]) -> Observation:
    block = obj.get("content_block")
    if not isinstance(block, dict):
        return NOTHING
    texts = tuple(v for v in (block.get("name"), block.get("text")) if isinstance(v, str) and v)
    call = Usage(function_calls=1) if kind_of(block) == "tool_use" else None  # a tool call for the client
    return Observation(texts, calls=call) if texts or call else NOTHING


def _content_block_delta(obj: dict[str, Any]) -> Observation:
    delta = obj.get("delta")
    if not isinstance(delta, dict):
        return NOTHING
    kind = kind_of(delta)
    key = _DELTA_TEXT.get(kind) if kind else None
    text = delta.get(key) if key else None
    return Observation((text,)) if isinstance(text, str) and text else NOTHING


def _message_delta(obj: dict[str, Any]) -> Observation:
    """The cumulative, final usage of the message (`message_stop` follows)."""
    usage = anthropic_usage(obj.get("usage"))
    return Observation((), usage, final=True) if usage is not None else NOTHING


_DONE = Observation(done=True)

_HANDLERS: dict[str, Callable[[dict[str, Any]], Observation]] = {
    "message_start": _message_start,
    "content_block_start": _content_block_start,
    "content_block_delta": _content_block_delta,
    "message_delta": _message_delta,
    "message_stop": lambda obj: _DONE,
}


def observe_messages(event: str | None, obj: dict[str, Any]) -> Observation:
    kind = kind_of(obj) or event
    handler = _HANDLERS.get(kind) if kind else None
    return handler(obj) if handler is not None else NOTHING
