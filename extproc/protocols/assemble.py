"""The JSON body of a non-streamed call, assembled from the backend's stream.

For a model with `upstream_stream: true` the service sends the client's
non-streamed request to the backend as a streamed one (`rewrite_request(...,
stream=True)`), so the reservation can grow as tokens arrive; the client still
gets the JSON body it asked for, built here from the stream's decoded events:

    asm = assembler_for(schema.name)         # openai.chat, openai.completions, openai.responses, anthropic.messages
    asm.take(event_name, obj)                # every decoded JSON event, in order ([DONE] is not passed)
    body = asm.body()                        # the body the non-streamed API returns
    body = asm.body(cut=True, usage=usage)   # the budget ran out mid-stream: an output-capped answer

What is assembled, per API:

- Chat Completions: `id`, `object: "chat.completion"`, `created`, `model`,
  `system_fingerprint`/`service_tier` when the chunks carry them, `choices` by
  index (`message`: role, content, refusal, tool calls with their arguments
  concatenated in order, legacy `function_call`, annotations (`[]` when none, as
  the API returns), `reasoning_content`/`reasoning` when streamed; `logprobs`
  concatenated when the chunks carry them, else null; `finish_reason`), `usage`
  (the usage chunk's object as sent). `content` is null when the choice only
  called tools or refused.
- Completions (legacy): the same head, `object: "text_completion"`, choices'
  `text` and legacy `logprobs` lists concatenated.
- Responses: the terminal event's `response` (`response.completed`,
  `.incomplete`, `.failed`) as sent. If that event reached us reduced (an
  oversize event, see stream.py: only its usage is kept), the last full
  response object takes its status and usage, and `output` is the items of the
  `response.output_item.done` events.
- Anthropic Messages: `message_start`'s message, its content blocks in index
  order (text with citations, `tool_use`/`server_tool_use` with `input` parsed
  from the concatenated `input_json_delta`s, thinking with its signature,
  redacted thinking and server tool results as given), `stop_reason`,
  `stop_sequence` and the other fields of `message_delta` (`context_management`,
  `container`), and usage merged: `message_start`'s object overlaid with the
  non-null fields of `message_delta`'s (cumulative output, repeated input and
  cache fields, server tool use).

`body()` renders what the stream said; an end fact the stream never gave stays
null (a stream that broke off is the caller's to notice). `cut=True` says the
service stopped the stream because the budget ran out, and the body ends like
an output-capped call: unfinished choices get `finish_reason: "length"`; a
Responses body is the last response object with `status: "incomplete"`,
`incomplete_details: {reason: "max_output_tokens"}` and `output` = the done
items plus each message item in progress with its text so far (status
"incomplete"; other items in progress, such as a half-written function call, are
dropped: an agent must not run a tool on half its arguments); an Anthropic body
gets `stop_reason: "max_tokens"`, a `tool_use` in progress keeps the complete
members of its partial input (as the API does when it stops mid-call), a
thinking block in progress is dropped (it has no signature, and an unsigned
block sent back is refused). A chat tool call in progress keeps its partial
`arguments`, as OpenAI returns it at `max_tokens`.

Usage. The stream's own final usage is used as sent (its details objects and
provider extras intact). When it never came (a cut, or a backend that omits
it) and `usage` is given, `usage_object` renders it in the API's shape (over
Anthropic's `message_start` usage, so its extra fields survive); without
either, chat and completions bodies have no `usage`, Responses has null,
Anthropic the `message_start` figures.

Errors. An error event in the stream (OpenAI `{"error": …}`, Responses
`type: "error"`, Anthropic `event: error`) is kept in `error`, and `body()`
then raises `UpstreamError`: the caller answers with the error, never with a
half body dressed as a success. A stream with no identifying event at all (no
chunk, no `response.created`, no `message_start`) also raises. Fields of the
wrong type are skipped, as the stream observers skip them: `take` raises
nothing but `UpstreamError`, and only for size.

Memory. The assembler holds the output: the client asked for it whole. What
it holds (text, arguments, logprobs, finished items, the response object) is
counted in UTF-8 bytes against `max_bytes` (default 16 MiB, about four
million tokens of text); past it `take` raises `UpstreamError` (and so does
`body()`, should the caller have carried on) and the caller ends the call.
The body is built once, at `body()`.

Wiring. Every event a `StreamReader` decodes goes through its observer, so an
observer that hands `(event, obj)` to `take` before observing sees exactly the
events to assemble (the tests do this). The reader records an observer's
`UpstreamError` as a malformed event and goes on: the size bound then shows at
`body()`. An event over the reader's `max_event_bytes` reaches the observer
reduced to its usage: a Responses terminal event (it echoes the whole output)
is then assembled from the other events, as above; a reduced
`response.created`/`.in_progress` (instructions over the cap) is ignored, and
without any full response object `body()` raises. Give the reader of an
assembled call a cap above the largest request the service accepts.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from extproc.errors import UpstreamError
from extproc.protocols.usage import Usage, anthropic_usage_object, openai_usage_object, responses_usage_object

DEFAULT_MAX_ASSEMBLED_BYTES = 16 << 20
"""What one assembler may hold (text, tool arguments, items) before it gives up."""

_PARTIAL_JSON_ATTEMPTS = 8


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped
        return json.dumps(obj, separators=(",", ":")).encode()


def _text_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _size(value: Any) -> int:
    return len(_dumps(value))


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _index(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


# --- usage in each API's shape ------------------------------------------------------


_USAGE_OBJECTS = {
    "openai.chat": openai_usage_object,
    "openai.completions": openai_usage_object,
    "openai.responses": responses_usage_object,
    "anthropic.messages": anthropic_usage_object,
}


def usage_object(api: str, usage: Usage) -> dict[str, Any]:
    """`usage` as API `api` reports it (read back by usage.py, it gives the same
    token figures). Per-call tools are not in OpenAI's usage objects."""
    render = _USAGE_OBJECTS.get(api)
    if render is None:
        raise ValueError(f"no usage object for {api!r}")
    return render(usage)


# --- a tool input cut mid-way ------------------------------------------------------


def partial_json_object(text: str) -> dict[str, Any]:
    """The complete members of a JSON object cut anywhere: the text closed as it
    stands if it ends on a string or a bracket, else cut back to one of its last
    commas and closed. A value that may be unfinished (an open string, a
    number or literal at the very end) is dropped with its member, never
    returned half-written. `{}` if nothing complete is left."""
    closers: list[str] = []
    cuts: deque[tuple[int, str]] = deque(maxlen=_PARTIAL_JSON_ATTEMPTS)
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            closers.append("}")
        elif ch == "[":
            closers.append("]")
        elif ch in "}]":
            if closers:
                closers.pop()
        elif ch == ",":
            cuts.append((i, "".join(reversed(closers))))
    ended = not in_string and text.rstrip()[-1:] in ('"', "}", "]")
    candidates = [text + "".join(reversed(closers))] if ended else []
    candidates += [text[:i] + close for i, close in reversed(cuts)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return {}


# --- the interface -------------------------------------------------------------------


class Assembler(ABC):
    """Takes one response stream's decoded events; gives the non-streamed body."""

    api: str = ""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_ASSEMBLED_BYTES) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        """Bytes of output held so far (the figure `max_bytes` bounds)."""
        self.error: Any = None
        """The stream's error event (its `error` object), if it sent one."""

    @abstractmethod
    def take(self, event: str | None, obj: dict[str, Any]) -> None:
        """One decoded SSE event (its `event:` name, its JSON object). Raises
        UpstreamError past `max_bytes`, nothing else."""

    def body(self, *, cut: bool = False, usage: Usage | None = None) -> bytes:
        """The JSON body; `cut`: the service ended the stream (budget spent);
        `usage`: the usage to report if the stream's own never came."""
        if self.error is not None:
            raise UpstreamError(f"the backend's stream ended in an error: {json.dumps(self.error)[:200]}")
        if self.held > self.max_bytes:  # `take` raised, and whoever called it carried on
            raise UpstreamError(f"the assembled response is over {self.max_bytes} bytes")
        return _dumps(self._build(cut, usage))

    @abstractmethod
    def _build(self, cut: bool, usage: Usage | None) -> dict[str, Any]: ...

    def _hold(self, n: int) -> None:
        self.held += n
        if self.held > self.max_bytes:
            raise UpstreamError(f"the assembled response is over {self.max_bytes} bytes")

    def _hold_text(self, text: str) -> None:
        self._hold(_text_size(text))

    def _usage(self, usage: Usage | None) -> dict[str, Any] | None:
        return usage_object(self.api, usage) if usage is not None else None


# --- OpenAI Chat Completions and Completions -----------------------------------------


class _Choice:
    """One choice in the making: text pieces and the last word on each field."""

    __slots__ = ("role", "texts", "tools", "function_call", "annotations", "logprobs", "finish")

    def __init__(self) -> None:
        self.role: str | None = None
        self.texts: dict[str, list[str]] = {}
        """Streamed text by field: chat content, refusal, reasoning; completions text."""
        self.tools: dict[int, dict[str, Any]] = {}
        self.function_call: dict[str, Any] | None = None
        self.annotations: list[Any] = []
        self.logprobs: dict[str, list[Any] | None] | None = None
        self.finish: str | None = None


_HEAD = ("id", "created", "model")
_OPTIONAL_HEAD = ("service_tier", "system_fingerprint", "prompt_filter_results")
_CHAT_TEXTS = ("content", "refusal", "reasoning_content", "reasoning")
"""Message fields streamed as text pieces (the last two: vLLM/DeepSeek reasoning, per server)."""
_CONCATENATED = frozenset({"arguments", "input"})
"""Tool call fields streamed in pieces (function arguments, custom tool input)."""


class _OpenAIAssembler(Assembler):
    """What Chat Completions and legacy Completions share: the head fields, the
    usage chunk, choices by index."""

    object_name = ""
    logprobs_lists: tuple[str, ...] = ()

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_ASSEMBLED_BYTES) -> None:
        super().__init__(max_bytes=max_bytes)
        self._head: dict[str, Any] = {}
        self._optional: dict[str, Any] = {}
        self._usage_seen: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}

    def take(self, event: str | None, obj: dict[str, Any]) -> None:
        if obj.get("error") is not None:
            self.error = obj["error"]
            return
        for key in _HEAD:
            if key not in self._head and obj.get(key) is not None:
                self._head[key] = obj[key]
        for key in _OPTIONAL_HEAD:
            if key in obj and (obj[key] is not None or key not in self._optional):
                self._optional[key] = obj[key]
        usage = _dict(obj.get("usage"))
        if usage is not None:
            self._usage_seen = usage
        for c in _list(obj.get("choices")):
            i = _index(c.get("index")) if isinstance(c, dict) else None
            if i is None:
                continue
            choice = self._choices.get(i)
            if choice is None:
                choice = self._choices[i] = _Choice()
            self._take_choice(choice, c)
            logprobs = _dict(c.get("logprobs"))
            if logprobs is not None:
                self._take_logprobs(choice, logprobs)
            finish = _str(c.get("finish_reason"))
            if finish is not None:
                choice.finish = finish

    @abstractmethod
    def _take_choice(self, choice: _Choice, c: dict[str, Any]) -> None: ...

    @abstractmethod
    def _render_choice(self, i: int, choice: _Choice, finish: str | None) -> dict[str, Any]: ...

    def _take_logprobs(self, choice: _Choice, logprobs: dict[str, Any]) -> None:
        if choice.logprobs is None:
            choice.logprobs = dict.fromkeys(self.logprobs_lists)
        for key in self.logprobs_lists:
            entries = logprobs.get(key)
            if isinstance(entries, list):
                self._hold(_size(entries))
                held = choice.logprobs[key]
                if held is None:
                    choice.logprobs[key] = list(entries)
                else:
                    held.extend(entries)

    def _build(self, cut: bool, usage: Usage | None) -> dict[str, Any]:
        if not self._head and not self._choices:
            raise UpstreamError("the backend's stream carried no completion chunk")
        obj: dict[str, Any] = {
            "id": self._head.get("id", ""),
            "object": self.object_name,
            "created": self._head.get("created", 0),
            "model": self._head.get("model", ""),
            "choices": [
                self._render_choice(i, c, c.finish or ("length" if cut else None))
                for i, c in sorted(self._choices.items())
            ],
        }
        reported = self._usage_seen if self._usage_seen is not None else self._usage(usage)
        if reported is not None:
            obj["usage"] = reported
        obj.update(self._optional)
        return obj


class ChatAssembler(_OpenAIAssembler):
    api = "openai.chat"
    object_name = "chat.completion"
    logprobs_lists = ("content", "refusal")

    def _take_choice(self, choice: _Choice, c: dict[str, Any]) -> None:
        delta = _dict(c.get("delta"))
        if delta is None:
            return
        role = _str(delta.get("role"))
        if role is not None:
            choice.role = role
        for key in _CHAT_TEXTS:
            value = delta.get(key)
            if isinstance(value, str) and value:
                choice.texts.setdefault(key, []).append(value)
                self._hold_text(value)
        for call in _list(delta.get("tool_calls")):
            i = _index(call.get("index")) if isinstance(call, dict) else None
            if i is not None:
                self._take_tool_call(choice.tools.setdefault(i, {}), call)
        fn = _dict(delta.get("function_call"))
        if fn is not None:
            if choice.function_call is None:
                choice.function_call = {}
            self._take_fields(choice.function_call, fn)
        annotations = delta.get("annotations")
        if isinstance(annotations, list):
            self._hold(_size(annotations))
            choice.annotations.extend(annotations)

    def _take_tool_call(self, held: dict[str, Any], call: dict[str, Any]) -> None:
        for key in ("id", "type"):
            value = _str(call.get(key))
            if value:
                held[key] = value
        for key in ("function", "custom"):
            part = _dict(call.get(key))
            if part is not None:
                self._take_fields(held.setdefault(key, {}), part)

    def _take_fields(self, held: dict[str, Any], part: dict[str, Any]) -> None:
        """A function's (or custom tool's) fields: the streamed ones concatenated, the others set."""
        for key, value in part.items():
            if not isinstance(value, str):
                continue
            if key in _CONCATENATED:
                held.setdefault(key, []).append(value)
                self._hold_text(value)
            elif value:
                held[key] = value

    def _render_choice(self, i: int, choice: _Choice, finish: str | None) -> dict[str, Any]:
        tools = [_render_call(call) for _, call in sorted(choice.tools.items())]
        texts = {key: "".join(pieces) for key, pieces in choice.texts.items()}
        text, refusal = texts.pop("content", ""), texts.pop("refusal", None)
        calls = bool(tools) or choice.function_call is not None
        message: dict[str, Any] = {
            "role": choice.role or "assistant",
            "content": text if text or not (calls or refusal) else None,
            "refusal": refusal,
        }
        if tools:
            message["tool_calls"] = tools
        if choice.function_call is not None:
            message["function_call"] = _joined(choice.function_call, "name", "arguments")
        message["annotations"] = choice.annotations
        message.update(texts)  # reasoning
        return {"index": i, "message": message, "logprobs": choice.logprobs, "finish_reason": finish}


def _joined(held: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A held function/custom part as the API writes it: pieces joined, `keys` always present."""
    out: dict[str, Any] = dict.fromkeys(keys, "")
    for key, value in held.items():
        out[key] = "".join(value) if isinstance(value, list) else value
    return out


def _render_call(call: dict[str, Any]) -> dict[str, Any]:
    kind = call.get("type") or ("custom" if "custom" in call and "function" not in call else "function")
    out: dict[str, Any] = {"id": call.get("id", ""), "type": kind}
    if kind == "custom":
        out["custom"] = _joined(call.get("custom", {}), "name", "input")
    else:
        out["function"] = _joined(call.get("function", {}), "name", "arguments")
    return out


class CompletionsAssembler(_OpenAIAssembler):
    api = "openai.completions"
    object_name = "text_completion"
    logprobs_lists = ("tokens", "token_logprobs", "top_logprobs", "text_offset")

    def _take_choice(self, choice: _Choice, c: dict[str, Any]) -> None:
        text = _str(c.get("text"))
        if text:
            choice.texts.setdefault("text", []).append(text)
            self._hold_text(text)

    def _render_choice(self, i: int, choice: _Choice, finish: str | None) -> dict[str, Any]:
        return {"text": "".join(choice.texts.get("text", ())), "index": i, "logprobs": choice.logprobs, "finish_reason": finish}


# --- OpenAI Responses ------------------------------------------------------------------

_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
"""Terminal event types; each names the status of its response (a reduced one may lack it)."""
_TEXT_DELTAS = {"response.output_text.delta": "text", "response.refusal.delta": "refusal"}


class ResponsesAssembler(Assembler):
    api = "openai.responses"

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_ASSEMBLED_BYTES) -> None:
        super().__init__(max_bytes=max_bytes)
        self._response: dict[str, Any] | None = None
        self._response_size = 0
        self._terminal: dict[str, Any] | None = None
        self._items: dict[int, dict[str, Any]] = {}
        self._done: set[int] = set()
        self._texts: dict[tuple[int, int], list[str]] = {}
        self._text_bytes: dict[int, int] = {}

    def take(self, event: str | None, obj: dict[str, Any]) -> None:
        kind = _str(obj.get("type")) or event
        if kind == "error":
            self.error = obj
            return
        response = _dict(obj.get("response"))
        if response is not None:
            self._take_response(kind if kind in _TERMINAL else None, response)
            return
        oi = _index(obj.get("output_index"))
        if oi is None:
            return
        if kind in _TEXT_DELTAS:
            ci, delta = _index(obj.get("content_index")), _str(obj.get("delta"))
            if ci is not None and delta and oi in self._items and oi not in self._done:
                self._texts.setdefault((oi, ci), []).append(delta)
                n = _text_size(delta)
                self._text_bytes[oi] = self._text_bytes.get(oi, 0) + n
                self._hold(n)
        elif kind == "response.content_part.added":
            ci, part = _index(obj.get("content_index")), _dict(obj.get("part"))
            item = self._items.get(oi)
            if ci is not None and part is not None and item is not None and oi not in self._done:
                content = item["content"] = list(_list(item.get("content")))
                content.extend([None] * (ci + 1 - len(content)))
                content[ci] = dict(part)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = _dict(obj.get("item"))
            if item is not None:
                self._take_item(oi, item, kind.endswith(".done"))

    def _take_response(self, terminal: str | None, response: dict[str, Any]) -> None:
        size = _size(response)
        if terminal is not None:
            status = terminal.removeprefix("response.")
            self._terminal = response if "status" in response else {**response, "status": status}
            self._hold(size)
            return
        if "id" not in response:  # reduced to its usage (an oversize event): not a response object
            return
        self.held -= self._response_size
        self._response, self._response_size = response, size
        self._hold(size)

    def _take_item(self, oi: int, item: dict[str, Any], done: bool) -> None:
        if oi in self._done:
            return
        if done:
            self._done.add(oi)
            self.held -= self._text_bytes.pop(oi, 0)
            for key in [k for k in self._texts if k[0] == oi]:
                del self._texts[key]
            self._hold(_size(item))
        self._items[oi] = dict(item)

    def _build(self, cut: bool, usage: Usage | None) -> dict[str, Any]:
        terminal = self._terminal
        if terminal is not None and isinstance(terminal.get("output"), list):
            return terminal
        if self._response is None and terminal is None:
            raise UpstreamError("the backend's stream carried no response object")
        obj = {**(self._response or {}), **(terminal or {})}
        output = [self._render_item(oi, item, cut) for oi, item in sorted(self._items.items())]
        obj["output"] = [item for item in output if item is not None]
        if terminal is None and cut:
            obj["status"] = "incomplete"
            obj["incomplete_details"] = {"reason": "max_output_tokens"}
        if obj.get("usage") is None:
            obj["usage"] = self._usage(usage)
        return obj

    def _render_item(self, oi: int, item: dict[str, Any], cut: bool) -> dict[str, Any] | None:
        if oi in self._done:
            return item
        if not cut or item.get("type") != "message":
            return None
        content = []
        for ci, part in enumerate(_list(item.get("content"))):
            if not isinstance(part, dict):
                continue
            key = "refusal" if part.get("type") == "refusal" else "text"
            part = dict(part)
            part[key] = (_str(part.get(key)) or "") + "".join(self._texts.get((oi, ci), ()))
            content.append(part)
        return {**item, "status": "incomplete", "content": content}


# --- Anthropic Messages ----------------------------------------------------------------

_BLOCK_DELTAS = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "input_json_delta": ("partial_json", "input"),
    "signature_delta": ("signature", "signature"),
}
"""Delta type → (its field, the block field its pieces build)."""


class MessagesAssembler(Assembler):
    api = "anthropic.messages"

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_ASSEMBLED_BYTES) -> None:
        super().__init__(max_bytes=max_bytes)
        self._message: dict[str, Any] | None = None
        self._blocks: dict[int, dict[str, Any]] = {}
        self._pieces: dict[tuple[int, str], list[str]] = {}
        self._stopped: set[int] = set()
        self._delta: dict[str, Any] = {}
        self._final_usage: dict[str, Any] | None = None

    def take(self, event: str | None, obj: dict[str, Any]) -> None:
        kind = _str(obj.get("type")) or event
        if kind == "message_start":
            message = _dict(obj.get("message"))
            if message is not None:
                self._message = dict(message)
                self._hold(_size(message))
        elif kind == "content_block_start":
            i, block = _index(obj.get("index")), _dict(obj.get("content_block"))
            if i is not None and block is not None:
                self._blocks[i] = dict(block)
                self._hold(_size(block))
        elif kind == "content_block_delta":
            self._take_delta(_index(obj.get("index")), _dict(obj.get("delta")))
        elif kind == "content_block_stop":
            i = _index(obj.get("index"))
            if i is not None:
                self._stopped.add(i)
        elif kind == "message_delta":
            self._take_message_delta(obj)
        elif kind == "error":
            self.error = obj.get("error", obj)

    def _take_delta(self, i: int | None, delta: dict[str, Any] | None) -> None:
        if i is None or delta is None or i not in self._blocks:
            return
        kind = _str(delta.get("type"))
        if kind == "citations_delta":
            citation = delta.get("citation")
            if citation is not None:
                block = self._blocks[i]
                block["citations"] = [*_list(block.get("citations")), citation]
                self._hold(_size(citation))
            return
        source, target = _BLOCK_DELTAS.get(kind or "", (None, None))
        piece = _str(delta.get(source)) if source else None
        if target and piece:
            self._pieces.setdefault((i, target), []).append(piece)
            self._hold_text(piece)

    def _take_message_delta(self, obj: dict[str, Any]) -> None:
        delta = _dict(obj.get("delta"))
        if delta is not None:
            self._delta.update(delta)
        usage = _dict(obj.get("usage"))
        if usage is not None:
            self._final_usage = {**(self._final_usage or {}), **{k: v for k, v in usage.items() if v is not None}}
        for key, value in obj.items():
            if key not in ("type", "delta", "usage"):
                self._delta[key] = value

    def _build(self, cut: bool, usage: Usage | None) -> dict[str, Any]:
        if self._message is None:
            raise UpstreamError("the backend's stream carried no message_start")
        obj = dict(self._message)
        content = [self._render_block(i, block, cut) for i, block in sorted(self._blocks.items())]
        obj["content"] = [block for block in content if block is not None]
        obj.update(self._delta)
        if cut and obj.get("stop_reason") is None:
            obj["stop_reason"] = "max_tokens"
        start = _dict(obj.get("usage")) or {}
        if self._final_usage is not None:
            obj["usage"] = {**start, **self._final_usage}
        elif usage is not None:
            obj["usage"] = {**start, **usage_object(self.api, usage)}
        return obj

    def _render_block(self, i: int, block: dict[str, Any], cut: bool) -> dict[str, Any] | None:
        out = dict(block)
        stopped = i in self._stopped
        for target in ("text", "thinking"):
            pieces = self._pieces.get((i, target))
            if pieces:
                out[target] = (_str(block.get(target)) or "") + "".join(pieces)
        signatures = self._pieces.get((i, "signature"))
        if signatures:  # each signature_delta carries the whole signature
            out["signature"] = signatures[-1]
        pieces = self._pieces.get((i, "input"))
        if pieces:
            raw = "".join(pieces)
            try:
                out["input"] = json.loads(raw) if stopped else partial_json_object(raw)
            except (ValueError, RecursionError):
                raise UpstreamError(f"tool input of content block {i} is not JSON") from None
        if cut and not stopped and out.get("type") == "thinking" and not out.get("signature"):
            return None  # unsigned: the API refuses it when the client sends it back
        return out


_ASSEMBLERS: dict[str, type[Assembler]] = {
    a.api: a for a in (ChatAssembler, CompletionsAssembler, ResponsesAssembler, MessagesAssembler)
}

ASSEMBLED_APIS = frozenset(_ASSEMBLERS)
"""The schema names (`Schema.name`) whose streams can be assembled."""


def assembler_for(api: str, *, max_bytes: int = DEFAULT_MAX_ASSEMBLED_BYTES) -> Assembler:
    """A fresh assembler for one response of schema `api` (a `Schema.name`)."""
    cls = _ASSEMBLERS.get(api)
    if cls is None:
        raise ValueError(f"{api!r} responses are not assembled from a stream")
    return cls(max_bytes=max_bytes)
