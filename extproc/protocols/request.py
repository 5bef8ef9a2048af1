"""What a request body tells the budget engine, and the checks that get it there.

`RequestFacts` is the frozen result of parsing one request body: the numbers
a reservation needs (model, output bound, `n`, streaming) and the countable
text, cut into `segments` so an estimator can cache token counts per segment.
An agent resending its growing context produces the same segment strings for
the old messages, so only the new ones are tokenised.

Everything here raises `BadRequest` with `param` naming the offending field:
the client sent it, the client gets a 400 saying which field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from extproc.errors import BadRequest
from extproc.protocols.media import MediaPart, tool_kind

from ..records import fast_init

MAX_OUTPUT_TOKENS_LIMIT = 10_000_000
"""An explicit max output above this is not a budget request, it is a typo."""

MAX_N = 128


@fast_init
@dataclass(frozen=True, slots=True)
class RequestFacts:
    """The parsed request. `raw` is the decoded JSON object, kept for rewriting;
    treat it as read-only (`Schema.rewrite_request` copies, never mutates)."""

    model: str
    stream: bool
    max_output: int | None
    """Explicit per-choice output cap; None when the client gave none; 0 for embeddings."""
    n: int
    """Choices generated per request (completions: max of `n` and `best_of`)."""
    include_usage: bool
    """The client itself asked for `stream_options.include_usage`."""
    segments: tuple[str, ...]
    images: int = 0
    """Image parts (also in `media`, with their details)."""
    has_tools: bool = False
    json_mode: bool = False
    pretokenized: int = 0
    """Input given as token ids (completions `prompt`, embeddings `input`): exact, not in segments."""
    media: tuple[MediaPart, ...] = ()
    """Non-text input parts (images, audio, files, documents), in request order."""
    previous_response_id: str | None = None
    """Responses API: the stored response this one continues (its input is billed, unseen here)."""
    builtin_tools: frozenset[str] = frozenset()
    """Provider-run tools requested, by undated type (`web_search`, `code_interpreter`,
    `file_search`, `web_fetch`, `code_execution`, `mcp`, …): not function tools."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(slots=True)
class Content:
    """The schema-specific part of `RequestFacts`, filled by one schema's reader."""

    segments: list[str] = field(default_factory=list)
    images: int = 0
    has_tools: bool = False
    json_mode: bool = False
    pretokenized: int = 0
    media: list[MediaPart] = field(default_factory=list)
    previous_response_id: str | None = None
    builtin_tools: set[str] = field(default_factory=set)

    def add_media(self, part: MediaPart, where: str = "") -> None:
        self.media.append(replace(part, where=where) if where else part)
        if part.kind == "image":
            self.images += 1


def compact_json(value: Any) -> str:
    """Canonical JSON text: the same value gives the same string (so the same cache key)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def kind_of(obj: dict[str, Any], key: str = "type") -> str | None:
    """A discriminator field, only if it is a string (a list there must not
    reach a set lookup and raise TypeError)."""
    value = obj.get(key)
    return value if isinstance(value, str) else None


def positive_int(value: Any, param: str, limit: int) -> int:
    if type(value) is not int:
        raise BadRequest(f"`{param}` must be an integer", param=param)
    if value < 1:
        raise BadRequest(f"`{param}` must be at least 1", param=param)
    if value > limit:
        raise BadRequest(f"`{param}` must be at most {limit}", param=param)
    return value


def optional_list(obj: dict[str, Any], key: str) -> list[Any] | None:
    value = obj.get(key)
    if value is None or isinstance(value, list):
        return value
    raise BadRequest(f"`{key}` must be an array", param=key)


def expect_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"`{param}` must be an object", param=param)
    return value


def expect_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"`{param}` must be a string", param=param)
    return value


_CLIENT_TOOL_TYPES = frozenset({"function", "custom"})


def add_tools(content: Content, obj: dict[str, Any], *keys: str) -> None:
    """One segment for all tool/function definitions of the request; the
    typed, provider-run ones are also named in `builtin_tools`."""
    parts = []
    for key in keys:
        tools = optional_list(obj, key)
        if tools:
            parts.append(compact_json(tools))
            for tool in tools:
                kind = kind_of(tool) if isinstance(tool, dict) else None
                if kind and kind not in _CLIENT_TOOL_TYPES:
                    content.builtin_tools.add(tool_kind(kind))
    if parts:
        content.has_tools = True
        content.segments.append("tools\n" + "\n".join(parts))


def add_prompt_items(content: Content, value: Any, param: str) -> None:
    """OpenAI's legacy input shapes (completions `prompt`, embeddings `input`):
    a string, strings, token ids, or lists of token ids. One segment per string."""
    if isinstance(value, str):
        content.segments.append(value)
        return
    if not isinstance(value, list):
        raise BadRequest(f"`{param}` must be a string or an array", param=param)
    for i, item in enumerate(value):
        if isinstance(item, str):
            content.segments.append(item)
        elif type(item) is int:
            content.pretokenized += 1
        elif isinstance(item, list) and all(type(t) is int for t in item):
            content.pretokenized += len(item)
        else:
            raise BadRequest(
                f"`{param}[{i}]` must be a string, a token id or an array of token ids",
                param=f"{param}[{i}]",
            )
