"""Token usage as the backend reported it, normalised to one shape.

Providers disagree on what "input tokens" means. OpenAI's `prompt_tokens`
(and the Responses API's `input_tokens`) *include* the cached tokens listed
in `*_tokens_details.cached_tokens`; Anthropic's `input_tokens` *exclude*
`cache_read_input_tokens` and `cache_creation_input_tokens`. Pricing needs
the three buckets apart (uncached, cache read, cache write), so every
provider's numbers are mapped here into disjoint fields, once, and nothing
downstream asks which provider it came from.

Beyond tokens, `Usage` carries what else a response reports that has a
price: audio tokens (a part of the input/output, priced higher), and the
server-side tool calls the API ran (web search, web fetch, file search,
code interpreter), counted per call.

Cache writes. OpenAI reports them as `prompt_tokens_details.cache_write_tokens`
(Responses: `input_tokens_details.cache_write_tokens`), inside the prompt
total like `cached_tokens`; OpenAI-compatible proxies in front of Anthropic
models put `cache_creation_input_tokens` at the top level instead. Either is
read. If the cache fields add up to more than the total, the write tokens are
taken as additional (never charge less than reported).

Anthropic iterations. With server-side compaction (and server tool loops),
`usage.iterations` lists one entry per sampling step, and the top-level
fields do not include the `compaction` steps. When `iterations` is present,
each field is the larger of the top-level value and the sum over the
iterations, so a compaction's tokens are billed and nothing is counted twice.

Usage is what we bill on, so a backend's numbers are validated rather than
trusted: a negative, absurd or non-integer count is an `UpstreamError` (the
backend is wrong, not the client), never a `TypeError` deep inside pricing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.errors import UpstreamError

from ..records import fast_init

MAX_USAGE_TOKENS = 10**9
"""More tokens than any single response can carry: a count above it is garbage."""


@fast_init
@dataclass(frozen=True, slots=True)
class Usage:
    """Disjoint token counts of one response.

    `input_tokens` is the *uncached* input only; the three input fields add
    up to everything the model read. `output_tokens` includes reasoning;
    `reasoning_tokens` is informational (already inside `output_tokens`).

    `audio_input_tokens` is a part of `total_input` and `audio_output_tokens`
    a part of `output_tokens` (like `reasoning_tokens`): price the audio
    premium on them, not the tokens a second time. The `*_calls` fields are
    server-side tool invocations, priced per call, not tokens; but
    `function_calls` counts the tool calls the model returned for the client
    to run (never priced: a run's `tool_calls` budget counts them).
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    web_search_calls: int = 0
    web_fetch_calls: int = 0
    file_search_calls: int = 0
    code_interpreter_calls: int = 0
    function_calls: int = 0

    @property
    def total_input(self) -> int:
        """Every input token, whatever its cache state."""
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens

    @property
    def total(self) -> int:
        return self.total_input + self.output_tokens

    def merge(self, other: Usage | None) -> Usage:
        """Field-wise maximum: streams report cumulative counters, so a later
        report never lowers an earlier one, and a partial report (Anthropic's
        `message_delta` with only `output_tokens`) keeps the other fields."""
        if other is None or other == self:
            return self
        return Usage(*map(max, self._values(), other._values()))

    def plus(self, other: Usage) -> Usage:
        """Field-wise sum: separate reports of separate work (iterations, tool calls)."""
        return Usage(*map(sum, zip(self._values(), other._values(), strict=True)))

    def _values(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in _FIELDS)

    @property
    def tool_calls(self) -> Usage:
        """Only the per-call fields (for merging into a usage built another way)."""
        return Usage(**{f: getattr(self, f) for f in _CALL_FIELDS})


_FIELDS = tuple(Usage.__dataclass_fields__)
_CALL_FIELDS = tuple(f for f in _FIELDS if f.endswith("_calls"))


def _count(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if type(value) is not int:  # bool is an int subclass; floats are not counts
        raise UpstreamError(f"backend usage {where}{key} is not an integer: {value!r:.40}")
    if value < 0 or value > MAX_USAGE_TOKENS:
        raise UpstreamError(f"backend usage {where}{key} is out of range: {value}")
    return value


def _details(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UpstreamError(f"backend usage {key} is not an object")
    return value


def _object(usage: Any) -> Mapping[str, Any] | None:
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise UpstreamError(f"backend usage is not an object: {usage!r:.40}")
    return usage


def _split_cached(total: int, cached: int, key: str) -> int:
    if cached > total:
        raise UpstreamError(f"backend usage reports {cached} cached tokens out of {total} {key}")
    return total - cached


def _split_writes(total: int, cached: int, writes: int, key: str) -> int:
    """Uncached input out of a total that includes cache reads and, normally, writes."""
    rest = _split_cached(total, cached, key)
    return rest - writes if writes <= rest else rest  # writes past the total: additional


def _tools_anthropic(u: Mapping[str, Any]) -> dict[str, int]:
    tools = _details(u, "server_tool_use")
    where = "server_tool_use."
    return {
        "web_search_calls": _count(tools, "web_search_requests", where),
        "web_fetch_calls": _count(tools, "web_fetch_requests", where),
    }


def openai_usage(usage: Any) -> Usage | None:
    """Chat Completions, Completions and Embeddings `usage` (None stays None).

    `prompt_tokens` includes `prompt_tokens_details.cached_tokens` and
    `cache_write_tokens`, and the audio tokens of both details objects.
    """
    u = _object(usage)
    if u is None:
        return None
    prompt = _count(u, "prompt_tokens", "")
    details = _details(u, "prompt_tokens_details")
    cached = _count(details, "cached_tokens", "prompt_tokens_details.")
    writes = max(
        _count(details, "cache_write_tokens", "prompt_tokens_details."),
        _count(u, "cache_creation_input_tokens", ""),
    )
    output = _count(u, "completion_tokens", "")
    out_details = _details(u, "completion_tokens_details")
    return Usage(
        input_tokens=_split_writes(prompt, cached, writes, "prompt_tokens"),
        cached_input_tokens=cached,
        cache_write_tokens=writes,
        output_tokens=output,
        reasoning_tokens=_count(out_details, "reasoning_tokens", "completion_tokens_details."),
        audio_input_tokens=_count(details, "audio_tokens", "prompt_tokens_details."),
        audio_output_tokens=_count(out_details, "audio_tokens", "completion_tokens_details."),
    )


def responses_usage(usage: Any) -> Usage | None:
    """Responses API `usage`: `input_tokens` includes `input_tokens_details.cached_tokens`
    and `cache_write_tokens`. Tool calls are not in `usage`: see `responses_tool_calls`."""
    u = _object(usage)
    if u is None:
        return None
    total_in = _count(u, "input_tokens", "")
    details = _details(u, "input_tokens_details")
    cached = _count(details, "cached_tokens", "input_tokens_details.")
    writes = _count(details, "cache_write_tokens", "input_tokens_details.")
    output = _count(u, "output_tokens", "")
    reasoning = _count(
        _details(u, "output_tokens_details"), "reasoning_tokens", "output_tokens_details."
    )
    return Usage(
        input_tokens=_split_writes(total_in, cached, writes, "input_tokens"),
        cached_input_tokens=cached,
        cache_write_tokens=writes,
        output_tokens=output,
        reasoning_tokens=reasoning,
    )


RESPONSES_TOOL_ITEMS = {
    "web_search_call": "web_search_calls",
    "file_search_call": "file_search_calls",
    "code_interpreter_call": "code_interpreter_calls",
}
"""Responses output item types billed per call, and the `Usage` field counting them."""


RESPONSES_CLIENT_CALLS = frozenset({"function_call", "custom_tool_call", "computer_call", "local_shell_call"})
"""Responses output items that are a tool call for the client to run (a `function_calls`)."""


def client_tool_calls(obj: Mapping[str, Any]) -> int:
    """Tool calls a whole (non-streamed) response returned for the client to run, whichever
    API shaped it: chat `choices[].message.tool_calls` (or the legacy `function_call`),
    Responses `output[]` call items, Anthropic `content[]` `tool_use` blocks."""
    n = 0
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict):
            calls = msg.get("tool_calls")
            n += len(calls) if isinstance(calls, list) else 0
            n += isinstance(msg.get("function_call"), dict)
    for key, kinds in (("output", RESPONSES_CLIENT_CALLS), ("content", frozenset({"tool_use"}))):
        items = obj.get(key)
        for item in items if isinstance(items, list) else ():
            n += isinstance(item, dict) and item.get("type") in kinds
    return n


def responses_tool_calls(output: Any) -> Usage | None:
    """Per-call tools run by the Responses API, from a response's `output` items."""
    if not isinstance(output, list):
        return None
    counts = dict.fromkeys(RESPONSES_TOOL_ITEMS.values(), 0)
    for item in output:
        kind = item.get("type") if isinstance(item, dict) else None
        field = RESPONSES_TOOL_ITEMS.get(kind) if isinstance(kind, str) else None
        if field is not None:
            counts[field] += 1
    return Usage(**counts) if any(counts.values()) else None


def anthropic_usage(usage: Any) -> Usage | None:
    """Anthropic `usage`: the three input fields are already disjoint.

    Thinking tokens are billed as output and not reported apart, so
    `reasoning_tokens` stays 0. `iterations` (compaction, server tool loops)
    is summed, see the module docstring.
    """
    u = _object(usage)
    if u is None:
        return None
    top = _anthropic_tokens(u, "", _tools_anthropic(u))
    iterations = u.get("iterations")
    if iterations is None:
        return top
    if not isinstance(iterations, list):
        raise UpstreamError("backend usage iterations is not an array")
    total = Usage()
    for i, step in enumerate(iterations):
        if not isinstance(step, dict):
            raise UpstreamError(f"backend usage iterations[{i}] is not an object")
        total = total.plus(_anthropic_tokens(step, f"iterations[{i}].", {}))
    return top.merge(total)


def _anthropic_tokens(u: Mapping[str, Any], where: str, tools: dict[str, int]) -> Usage:
    return Usage(
        input_tokens=_count(u, "input_tokens", where),
        cached_input_tokens=_count(u, "cache_read_input_tokens", where),
        cache_write_tokens=_count(u, "cache_creation_input_tokens", where),
        output_tokens=_count(u, "output_tokens", where),
        **tools,
    )


# --- rendering: a Usage back into each API's usage object -----------------------
# The inverse of the readers above for the token fields (reading what these
# write gives the same Usage back), used where the service itself writes an
# API's usage: the end of a stream it cuts (`ending.py`).


def openai_usage_object(u: Usage) -> dict[str, Any]:
    """Chat Completions / Completions `usage`: the prompt total includes cache reads and writes."""
    prompt: dict[str, int] = {"cached_tokens": u.cached_input_tokens}
    if u.cache_write_tokens:
        prompt["cache_write_tokens"] = u.cache_write_tokens
    if u.audio_input_tokens:
        prompt["audio_tokens"] = u.audio_input_tokens
    completion: dict[str, int] = {"reasoning_tokens": u.reasoning_tokens}
    if u.audio_output_tokens:
        completion["audio_tokens"] = u.audio_output_tokens
    return {
        "prompt_tokens": u.total_input,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total,
        "prompt_tokens_details": prompt,
        "completion_tokens_details": completion,
    }


def responses_usage_object(u: Usage) -> dict[str, Any]:
    """Responses API `usage`: `input_tokens` includes cache reads and writes."""
    details = {"cached_tokens": u.cached_input_tokens, "cache_write_tokens": u.cache_write_tokens}  # the SDK requires both
    return {
        "input_tokens": u.total_input,
        "input_tokens_details": details,
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total,
    }


def anthropic_usage_object(u: Usage) -> dict[str, Any]:
    """Anthropic `usage`: the three input fields disjoint, as the API reports them."""
    out: dict[str, Any] = {
        "input_tokens": u.input_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cached_input_tokens,
        "output_tokens": u.output_tokens,
    }
    if u.web_search_calls or u.web_fetch_calls:
        out["server_tool_use"] = {
            "web_search_requests": u.web_search_calls,
            "web_fetch_requests": u.web_fetch_calls,
        }
    return out
