"""Ending a stream early, cleanly, in its API's own terms.

When a streamed call's budget runs out mid-stream, the service stops
forwarding the backend's events and appends the events the API itself sends
when a response reaches its output cap, so SDKs and agents see a normal end,
not an error:

- OpenAI Chat Completions and Completions: one last chunk per unfinished
  choice (`delta: {}`, or `text: ""`) with `finish_reason: "length"`; the
  usage chunk if the client asked for usage; `data: [DONE]`.
- OpenAI Responses: each open output item closed as the API closes it at
  the cap (`output_text.done`, `content_part.done`,
  `function_call_arguments.done`, `output_item.done` with status
  `incomplete` and the text so far), then `response.incomplete` with
  `incomplete_details.reason: "max_output_tokens"`, the output so far and
  the usage, every event with the next `sequence_number`.
- Anthropic Messages: `content_block_stop` for each open block,
  `message_delta` with `stop_reason: "max_tokens"` and the usage,
  `message_stop`.

A part of the ending the client already received is not repeated (a choice
that finished, a `message_delta` already sent). Nothing forwarded yet: the
API's opening event is synthesized first (`message_start`,
`response.created`, which the SDKs require), with empty ids.

One `Ending` per stream sees each event the reader forwards (`see`) and
keeps what the end needs. `events` returns the ending as (SSE event name,
data) pairs; `StreamReader.cut` frames them. Nothing here raises on odd
upstream shapes: a field of the wrong type is ignored.

Memory. Chat and Anthropic: a few short scalars and the indexes of the
choices or blocks (at most `MAX_INDEXES`). Responses: the response object of
`response.created`/`in_progress` (whole if its event is at most
`MAX_RESPONSE_OBJECT_BYTES`, else only its short scalar fields), the output
items done so far and the text (or arguments) of open items, together at
most `MAX_KEPT_OUTPUT_CHARS`. Past that cap, done items are left out of the
`output` of `response.incomplete` and an open item's text stops growing in
the ending's events; the client has the whole text from the deltas it read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from extproc.protocols.usage import (
    Usage,
    anthropic_usage_object,
    openai_usage_object,
    responses_usage_object,
)

MAX_INDEXES = 1024
"""Choices, content blocks or output items tracked per stream."""

MAX_RESPONSE_OBJECT_BYTES = 64 << 10
"""A Responses object echoed whole in `response.incomplete`; a larger one is cut to its scalars."""

MAX_KEPT_OUTPUT_CHARS = 256 << 10
"""Output items and open text kept for `response.incomplete` (see the module docstring)."""

_MAX_SCALAR_CHARS = 1024

Event = tuple[str | None, Any]
"""(SSE event name or None, data: a JSON object, or a literal string such as "[DONE]")."""


class Ending(Protocol):
    """Follows one stream and writes its early end."""

    def see(self, event: str | None, obj: dict[str, Any], size: int) -> None:
        """One forwarded event: its SSE name, its JSON object, the size of its data."""

    def events(self, usage: Usage | None, include_usage: bool) -> list[Event]:
        """The events that end the stream now (`include_usage`: the client asked for usage)."""


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float) or (
        isinstance(value, str) and len(value) <= _MAX_SCALAR_CHARS
    )


def _index(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if type(value) is int and value >= 0 else None


def _kind(event: str | None, obj: dict[str, Any]) -> str | None:
    kind = obj.get("type")
    return kind if isinstance(kind, str) else event


# --- OpenAI Chat Completions and Completions -----------------------------------------

_CHUNK_FIELDS = ("id", "object", "created", "model", "system_fingerprint", "service_tier")


class ChatEnding:
    """Chat Completions chunks (`delta`), or with `text` the legacy Completions (`text`)."""

    __slots__ = ("_text", "_fields", "_choices", "_finished", "_usage_sent")

    def __init__(self, *, text: bool = False) -> None:
        self._text = text
        self._fields: dict[str, Any] = {}
        self._choices: set[int] = set()
        self._finished: set[int] = set()
        self._usage_sent = False

    def see(self, event: str | None, obj: dict[str, Any], size: int) -> None:
        for key in _CHUNK_FIELDS:
            value = obj.get(key)
            if value is not None and _scalar(value):
                self._fields[key] = value
        choices = obj.get("choices")
        if choices == [] and obj.get("usage") is not None:  # the usage chunk (not a running count)
            self._usage_sent = True
        for choice in choices if isinstance(choices, list) else ():
            i = _index(choice, "index") if isinstance(choice, dict) else None
            if i is None or (i not in self._choices and len(self._choices) >= MAX_INDEXES):
                continue
            self._choices.add(i)
            if choice.get("finish_reason") is not None:
                self._finished.add(i)

    def events(self, usage: Usage | None, include_usage: bool) -> list[Event]:
        kind = "text_completion" if self._text else "chat.completion.chunk"
        base = {"id": "", "object": kind, "created": 0, "model": "", **self._fields}
        unfinished = sorted(self._choices - self._finished) if self._choices else [0]
        out: list[Event] = [(None, {**base, "choices": [self._last(i)]}) for i in unfinished]
        if include_usage and not self._usage_sent and usage is not None:
            out.append((None, {**base, "choices": [], "usage": openai_usage_object(usage)}))
        out.append((None, "[DONE]"))
        return out

    def _last(self, index: int) -> dict[str, Any]:
        if self._text:
            return {"text": "", "index": index, "logprobs": None, "finish_reason": "length"}
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"}


# --- OpenAI Responses ------------------------------------------------------------------

_ARGUMENTS = {  # item type: (its field, the delta event, the done event)
    "function_call": (
        "arguments",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ),
    "custom_tool_call": (
        "input",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
    ),
}
_ARGUMENT_DELTAS = {delta for _, delta, _ in _ARGUMENTS.values()}
_ARGUMENT_DONE = {done for _, _, done in _ARGUMENTS.values()}
_TEXT_DELTAS = {"response.output_text.delta", "response.refusal.delta"}
_TEXT_DONE = {"response.output_text.done", "response.refusal.done"}
_TEXT_DONE_EVENT: dict[str, tuple[str, dict[str, Any]]] = {  # part field: its done event, extra fields
    "text": ("response.output_text.done", {"logprobs": []}),
    "refusal": ("response.refusal.done", {}),
}
_LIFECYCLE = {"response.created", "response.in_progress", "response.queued"}


class _Item:
    """An output item in progress: as added, with its parts and their text (or its arguments) so far."""

    __slots__ = ("item", "parts", "texts", "text_done", "parts_done", "args", "args_done", "size")

    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item
        self.parts: dict[int, dict[str, Any]] = {}  # content_index: the part as added (or done)
        self.texts: dict[int, list[str]] = {}  # content_index: its text so far
        self.text_done: set[int] = set()  # `output_text.done`/`refusal.done` already sent
        self.parts_done: set[int] = set()  # `content_part.done` already sent
        self.args: list[str] = []
        self.args_done = False
        self.size = 0  # characters counted against MAX_KEPT_OUTPUT_CHARS


class ResponsesEnding:
    """OpenAI Responses: close the open items, then `response.incomplete`."""

    __slots__ = ("_response", "_items", "_done", "_seq", "_events", "_kept")

    def __init__(self) -> None:
        self._response: dict[str, Any] | None = None
        self._items: dict[int, _Item] = {}  # output_index: open item
        self._done: dict[int, dict[str, Any]] = {}  # output_index: item as `output_item.done` gave it
        self._seq = -1
        self._events = 0
        self._kept = 0

    def see(self, event: str | None, obj: dict[str, Any], size: int) -> None:
        self._events += 1
        seq = obj.get("sequence_number")
        if type(seq) is int:
            self._seq = max(self._seq, seq)
        kind = _kind(event, obj)
        if kind in _LIFECYCLE:
            response = obj.get("response")
            if isinstance(response, dict):
                self._response = response if size <= MAX_RESPONSE_OBJECT_BYTES else {
                    k: v for k, v in response.items() if _scalar(v)
                }
            return
        index = _index(obj, "output_index")
        if index is None:
            return
        if kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and (index in self._items or len(self._items) < MAX_INDEXES):
                self._items[index] = _Item(item)
        elif kind == "response.output_item.done":
            self._item_done(index, obj.get("item"), size)
        elif (it := self._items.get(index)) is not None:
            self._on_item(it, kind, obj)

    def _item_done(self, index: int, item: Any, size: int) -> None:
        open_item = self._items.pop(index, None)
        if open_item is not None:
            self._kept -= open_item.size
        if isinstance(item, dict) and self._kept + size <= MAX_KEPT_OUTPUT_CHARS and len(self._done) < MAX_INDEXES:
            self._done[index] = item
            self._kept += size

    def _on_item(self, it: _Item, kind: str | None, obj: dict[str, Any]) -> None:
        ci = _index(obj, "content_index")
        if kind == "response.content_part.added" and ci is not None:
            part = obj.get("part")
            if isinstance(part, dict) and len(it.parts) < MAX_INDEXES:
                it.parts[ci] = part
                it.texts[ci] = []
        elif kind in _TEXT_DELTAS and ci in it.texts:
            self._keep(it, it.texts[ci], obj.get("delta"))
        elif kind in _TEXT_DONE and ci in it.texts:
            it.text_done.add(ci)
        elif kind == "response.content_part.done" and ci in it.parts:
            part = obj.get("part")
            if isinstance(part, dict):
                it.parts[ci] = part
            it.parts_done.add(ci)
            released = sum(map(len, it.texts.pop(ci, ())))  # the done part carries its text
            it.size -= released
            self._kept -= released
        elif kind in _ARGUMENT_DELTAS:
            self._keep(it, it.args, obj.get("delta"))
        elif kind in _ARGUMENT_DONE:  # its value is the deltas joined, already kept
            it.args_done = True

    def _keep(self, it: _Item, pieces: list[str], text: Any) -> None:
        if isinstance(text, str) and self._kept + len(text) <= MAX_KEPT_OUTPUT_CHARS:
            pieces.append(text)
            it.size += len(text)
            self._kept += len(text)

    def events(self, usage: Usage | None, include_usage: bool) -> list[Event]:
        out: list[Event] = []
        seq = max(self._seq, self._events - 1)

        def add(kind: str, body: dict[str, Any]) -> None:
            nonlocal seq
            seq += 1
            out.append((kind, {"type": kind, "sequence_number": seq, **body}))

        response = self._response
        if response is None:
            response = {"id": "", "object": "response", "created_at": 0, "status": "in_progress", "model": "", "output": []}
            add("response.created", {"response": response})
        output = dict(self._done)
        for index in sorted(self._items):
            output[index] = self._close(index, self._items[index], add)
        add(
            "response.incomplete",
            {
                "response": {
                    **response,
                    "status": "incomplete",
                    "incomplete_details": {"reason": "max_output_tokens"},
                    "output": [output[i] for i in sorted(output)],
                    "usage": responses_usage_object(usage) if usage is not None else None,
                }
            },
        )
        return out

    def _close(self, index: int, it: _Item, add: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
        """Send the events that close an open item as the API does at the cap; return it closed."""
        item = dict(it.item)
        where = {"item_id": item.get("id"), "output_index": index}
        kind = item.get("type")
        if kind == "message":
            content = []
            for ci in sorted(it.parts):
                part = it.parts[ci]
                if ci not in it.parts_done:
                    field = "refusal" if part.get("type") == "refusal" else "text"
                    text = "".join(it.texts.get(ci, ()))
                    part = {**part, field: text}
                    if ci not in it.text_done:
                        done, extra = _TEXT_DONE_EVENT[field]
                        add(done, {**where, "content_index": ci, field: text, **extra})
                    add("response.content_part.done", {**where, "content_index": ci, "part": part})
                content.append(part)
            item["content"] = content
        elif isinstance(kind, str) and kind in _ARGUMENTS:
            field, _, done = _ARGUMENTS[kind]
            item[field] = "".join(it.args)
            if not it.args_done:
                add(done, {**where, field: item[field]})
        if "status" in item:
            item["status"] = "incomplete"
        add("response.output_item.done", {"output_index": index, "item": item})
        return item


# --- Anthropic Messages -------------------------------------------------------------------


class MessagesEnding:
    """Anthropic Messages: stop the open blocks, `message_delta` with `max_tokens`, `message_stop`."""

    __slots__ = ("_started", "_open", "_delta_sent")

    def __init__(self) -> None:
        self._started = False
        self._open: set[int] = set()
        self._delta_sent = False

    def see(self, event: str | None, obj: dict[str, Any], size: int) -> None:
        kind = _kind(event, obj)
        if kind == "message_start":
            self._started = True
        elif kind == "message_delta":
            self._delta_sent = True
        elif kind in ("content_block_start", "content_block_stop"):
            i = _index(obj, "index")
            if i is None:
                return
            if kind == "content_block_stop":
                self._open.discard(i)
            elif len(self._open) < MAX_INDEXES:
                self._open.add(i)

    def events(self, usage: Usage | None, include_usage: bool) -> list[Event]:
        u = anthropic_usage_object(usage if usage is not None else Usage())
        out: list[Event] = []
        if not self._started:
            message: dict[str, Any] = {
                "id": "",
                "type": "message",
                "role": "assistant",
                "model": "",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {**u, "output_tokens": 0},
            }
            out.append(("message_start", {"type": "message_start", "message": message}))
        out += [("content_block_stop", {"type": "content_block_stop", "index": i}) for i in sorted(self._open)]
        if not self._delta_sent:
            delta = {"stop_reason": "max_tokens", "stop_sequence": None}
            out.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": u}))
        out.append(("message_stop", {"type": "message_stop"}))
        return out
