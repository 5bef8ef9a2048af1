"""OpenAI's four metered APIs: how to read their requests and stream events.

Only the parts that differ between schemas live here: where the countable
text is in a request (`read_*`) and what one streamed event says
(`observe_*`). The common fields (model, stream, max output, n) are read by
`Schema` from its declarative description in `schemas.py`.

Segments are canonical strings, one per message/item: the role, then the
text of each part and each tool call, joined by newlines. Image, audio and
file parts are not put in text (a base64 payload is not tokens): they are
reported in `media` (see `media.py`) for the estimator to price.
"""

from __future__ import annotations

from typing import Any

from extproc.errors import BadRequest
from extproc.protocols import media
from extproc.protocols.media import MediaPart
from extproc.protocols.request import (
    Content,
    add_prompt_items,
    add_tools,
    expect_object,
    expect_str,
    kind_of,
)
from extproc.protocols.stream import NOTHING, Observation
from extproc.protocols.usage import (
    RESPONSES_CLIENT_CALLS,
    RESPONSES_TOOL_ITEMS,
    Usage,
    openai_usage,
    responses_tool_calls,
    responses_usage,
)

_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_JSON_FORMATS = frozenset({"json_object", "json_schema"})


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _image_part(p: dict[str, Any]) -> MediaPart:
    """Chat `image_url: {url, detail}` (or a bare string); Responses `input_image`
    (`image_url` a string, or `file_id`; `detail` beside it)."""
    image = p.get("image_url")
    detail = _str(p.get("detail"))
    if isinstance(image, dict):
        detail = _str(image.get("detail")) or detail
        image = image.get("url")
    if isinstance(image, str):
        return media.from_url("image", image, detail=detail)
    return MediaPart("image", "file_id" if p.get("file_id") is not None else "unknown", detail)


def _audio_part(p: dict[str, Any]) -> MediaPart:
    audio = p.get("input_audio")
    audio = audio if isinstance(audio, dict) else p
    data = _str(audio.get("data"))
    fmt = _str(audio.get("format"))
    return media.inline("audio", data, mime=fmt) if data is not None else MediaPart("audio", "unknown", mime=fmt)


def _file_part(p: dict[str, Any]) -> MediaPart:
    """Chat `file: {file_data, file_id}`; Responses `input_file` (its fields inline):
    `file_data` is a data URL (or bare base64), else `file_url` or `file_id`."""
    f = p.get("file")
    f = f if isinstance(f, dict) else p
    data = _str(f.get("file_data"))
    if data is not None:
        return media.from_url("file", data) if data.startswith("data:") else media.inline("file", data)
    url = _str(f.get("file_url"))
    if url is not None:
        return media.from_url("file", url)
    return MediaPart("file", "file_id" if f.get("file_id") is not None else "unknown")


_MEDIA_PARTS = {
    "image_url": _image_part,
    "input_image": _image_part,
    "input_audio": _audio_part,
    "file": _file_part,
    "input_file": _file_part,
}


def _json_format(fmt: Any) -> bool:
    return isinstance(fmt, dict) and kind_of(fmt) in _JSON_FORMATS


def _content(value: Any, where: str, parts: list[str], c: Content) -> None:
    """A message's `content`: a string, null, or an array of typed parts."""
    if value is None:
        return
    if isinstance(value, str):
        parts.append(value)
        return
    if not isinstance(value, list):
        raise BadRequest(f"`{where}` must be a string or an array of content parts", param=where)
    for j, part in enumerate(value):
        p = expect_object(part, f"{where}[{j}]")
        kind = kind_of(p)
        if kind in _TEXT_PARTS:
            parts.append(expect_str(p.get("text"), f"{where}[{j}].text"))
        elif kind in _MEDIA_PARTS:
            c.add_media(_MEDIA_PARTS[kind](p), f"{where}[{j}]")
        elif kind == "refusal":
            refusal = p.get("refusal")
            if isinstance(refusal, str):
                parts.append(refusal)


def _function_call(fn: Any, parts: list[str]) -> None:
    if isinstance(fn, dict):
        name = fn.get("name")
        args = fn.get("arguments", fn.get("input"))
        parts.append(f"{name if isinstance(name, str) else ''} {args if isinstance(args, str) else ''}")


def _chat_message(m: Any, i: int, c: Content) -> str:
    """The segment of `messages[i]`. The usual message, a role and a string content, takes a
    short cut to the same segment: a body of 150k tiny messages parses in ~40% less time."""
    if type(m) is dict and len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str:
        return f"{m['role']}\n{m['content']}"
    where = f"messages[{i}]"
    msg = expect_object(m, where)
    role = expect_str(msg.get("role"), f"{where}.role")
    name = msg.get("name")
    parts = [f"{role} {name}" if isinstance(name, str) and name else role]
    _content(msg.get("content"), f"{where}.content", parts, c)
    calls = msg.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise BadRequest(f"`{where}.tool_calls` must be an array", param=f"{where}.tool_calls")
        for j, call in enumerate(calls):
            tc = expect_object(call, f"{where}.tool_calls[{j}]")
            _function_call(tc.get("function") or tc.get("custom"), parts)
    _function_call(msg.get("function_call"), parts)
    return "\n".join(parts)


def read_chat(obj: dict[str, Any]) -> Content:
    c = Content()
    add_tools(c, obj, "tools", "functions")
    if obj.get("web_search_options") is not None:  # the search models' built-in search
        c.builtin_tools.add("web_search")
    c.json_mode = _json_format(obj.get("response_format"))
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("`messages` must be an array of message objects", param="messages")
    c.segments.extend(_chat_message(m, i, c) for i, m in enumerate(messages))
    return c


def read_completions(obj: dict[str, Any]) -> Content:
    c = Content()
    prompt = obj.get("prompt")
    if prompt is not None:
        add_prompt_items(c, prompt, "prompt")
    suffix = obj.get("suffix")
    if isinstance(suffix, str) and suffix:
        c.segments.append(suffix)
    c.json_mode = _json_format(obj.get("response_format"))  # vLLM extension
    return c


def read_embeddings(obj: dict[str, Any]) -> Content:
    c = Content()
    if "input" not in obj:
        raise BadRequest("`input` is required", param="input")
    add_prompt_items(c, obj["input"], "input")
    return c


def _responses_item(item: Any, where: str, c: Content) -> str:
    it = expect_object(item, where)
    kind = kind_of(it)
    if kind is None and it.get("type") is not None:
        raise BadRequest(f"`{where}.type` must be a string", param=f"{where}.type")
    parts: list[str]
    if kind is None or kind == "message":
        parts = [expect_str(it.get("role"), f"{where}.role")]
        _content(it.get("content"), f"{where}.content", parts, c)
    elif kind in ("function_call", "custom_tool_call"):
        parts = [kind]
        _function_call(it, parts)
    elif kind == "reasoning":
        parts = [kind]
        for key in ("summary", "content"):
            blocks = it.get(key)
            if isinstance(blocks, list):
                parts.extend(
                    b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str)
                )
    else:
        # *_call_output and other items: their text fields, never image payloads
        parts = [kind]
        output = it.get("output")
        if isinstance(output, str):
            parts.append(output)
        elif isinstance(output, list):
            _content(output, f"{where}.output", parts, c)
        for key in ("text", "arguments", "input", "code"):
            value = it.get(key)
            if isinstance(value, str):
                parts.append(value)
    return "\n".join(parts)


def read_responses(obj: dict[str, Any]) -> Content:
    c = Content()
    previous = obj.get("previous_response_id")
    if previous is not None:
        c.previous_response_id = expect_str(previous, "previous_response_id")
    instructions = obj.get("instructions")
    if instructions is not None:
        c.segments.append("system\n" + expect_str(instructions, "instructions"))
    add_tools(c, obj, "tools")
    text = obj.get("text")
    c.json_mode = isinstance(text, dict) and _json_format(text.get("format"))
    items = obj.get("input")
    if isinstance(items, str):
        c.segments.append("user\n" + items)
    elif isinstance(items, list):
        c.segments.extend(_responses_item(it, f"input[{i}]", c) for i, it in enumerate(items))
    elif items is not None:
        raise BadRequest("`input` must be a string or an array of input items", param="input")
    return c


# --- streamed events -------------------------------------------------------------


def _choices(obj: dict[str, Any]) -> tuple[list[Any] | None, bool]:
    """(choices as a list or None, whether the chunk has no choices at all)."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        return choices, not choices
    return None, choices is None


def _call_delta(fn: Any, texts: list[str]) -> None:
    if isinstance(fn, dict):
        texts.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str) and v)


def observe_chat(event: str | None, obj: dict[str, Any]) -> Observation:
    usage = openai_usage(obj.get("usage"))
    choices, empty = _choices(obj)
    texts: list[str] = []
    started = 0  # tool calls for the client that begin in this chunk
    for choice in choices or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        content = delta.get("content")
        if isinstance(content, str) and content:
            texts.append(content)
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            texts.append(reasoning)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            texts.append(refusal)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                _call_delta(call.get("function"), texts)
                started += isinstance(call.get("id"), str) and bool(call["id"])  # a call's first chunk carries its id
        fn = delta.get("function_call")
        _call_delta(fn, texts)
        started += isinstance(fn, dict) and isinstance(fn.get("name"), str) and bool(fn["name"])
    if usage is None and not texts and not started:
        return NOTHING
    usage_only = usage is not None and empty
    return Observation(tuple(texts), usage, False, usage_only, usage_only, Usage(function_calls=started) if started else None)


def observe_completions(event: str | None, obj: dict[str, Any]) -> Observation:
    usage = openai_usage(obj.get("usage"))
    choices, empty = _choices(obj)
    texts = tuple(
        text
        for c in choices or ()
        if isinstance(c, dict) and isinstance(text := c.get("text"), str) and text
    )
    if usage is None and not texts:
        return NOTHING
    usage_only = usage is not None and empty
    return Observation(texts, usage, False, usage_only, usage_only)


_RESPONSES_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.code_interpreter_call_code.delta",
    }
)
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def responses_body(obj: dict[str, Any]) -> Usage | None:
    """Usage of a whole Responses object: `usage` plus the per-call tools of `output`
    (None without `usage`: tool calls alone are not a usage report)."""
    usage = responses_usage(obj.get("usage"))
    return usage.merge(responses_tool_calls(obj.get("output"))) if usage is not None else None


def observe_responses(event: str | None, obj: dict[str, Any]) -> Observation:
    kind = kind_of(obj) or event
    if kind in _RESPONSES_DELTAS:
        delta = obj.get("delta")
        return Observation((delta,)) if isinstance(delta, str) and delta else NOTHING
    if kind == "response.output_item.done":
        item = obj.get("item")
        item_kind = (kind_of(item) or "") if isinstance(item, dict) else ""
        field = RESPONSES_TOOL_ITEMS.get(item_kind) or ("function_calls" if item_kind in RESPONSES_CLIENT_CALLS else None)
        return Observation(calls=Usage(**{field: 1})) if field else NOTHING
    response = obj.get("response")
    usage = responses_body(response) if isinstance(response, dict) else None
    done = kind in _RESPONSES_TERMINAL
    if usage is None and not done:
        return NOTHING
    return Observation((), usage, done, final=done and usage is not None)
