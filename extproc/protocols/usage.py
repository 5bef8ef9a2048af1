"""Token usage as the backend reported it, normalised to one shape.

Providers disagree on what "input tokens" means. OpenAI's `prompt_tokens`
(and the Responses API's `input_tokens`) *include* the cached tokens listed
in `*_tokens_details.cached_tokens`; Anthropic's `input_tokens` *exclude*
`cache_read_input_tokens` and `cache_creation_input_tokens`. Pricing needs
the three buckets apart (uncached, cache read, cache write), so every
provider's numbers are mapped here into disjoint fields, once, and nothing
downstream asks which provider it came from.

Usage is what we bill on, so a backend's numbers are validated rather than
trusted: a negative, absurd or non-integer count is an `UpstreamError` (the
backend is wrong, not the client), never a `TypeError` deep inside pricing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.errors import UpstreamError

MAX_USAGE_TOKENS = 10**9
"""More tokens than any single response can carry: a count above it is garbage."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Disjoint token counts of one response.

    `input_tokens` is the *uncached* input only; the three input fields add
    up to everything the model read. `output_tokens` includes reasoning;
    `reasoning_tokens` is informational (already inside `output_tokens`).
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

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
        return Usage(
            max(self.input_tokens, other.input_tokens),
            max(self.cached_input_tokens, other.cached_input_tokens),
            max(self.cache_write_tokens, other.cache_write_tokens),
            max(self.output_tokens, other.output_tokens),
            max(self.reasoning_tokens, other.reasoning_tokens),
        )


def merge_usage(a: Usage | None, b: Usage | None) -> Usage | None:
    """`a.merge(b)` where either side may be missing."""
    if a is None:
        return b
    return a.merge(b)


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


def openai_usage(usage: Any) -> Usage | None:
    """Chat Completions, Completions and Embeddings `usage` (None stays None).

    `prompt_tokens` includes `prompt_tokens_details.cached_tokens`.
    """
    u = _object(usage)
    if u is None:
        return None
    prompt = _count(u, "prompt_tokens", "")
    cached = _count(_details(u, "prompt_tokens_details"), "cached_tokens", "prompt_tokens_details.")
    output = _count(u, "completion_tokens", "")
    reasoning = _count(
        _details(u, "completion_tokens_details"), "reasoning_tokens", "completion_tokens_details."
    )
    return Usage(
        input_tokens=_split_cached(prompt, cached, "prompt_tokens"),
        cached_input_tokens=cached,
        output_tokens=output,
        reasoning_tokens=reasoning,
    )


def responses_usage(usage: Any) -> Usage | None:
    """Responses API `usage`: `input_tokens` includes `input_tokens_details.cached_tokens`."""
    u = _object(usage)
    if u is None:
        return None
    total_in = _count(u, "input_tokens", "")
    cached = _count(_details(u, "input_tokens_details"), "cached_tokens", "input_tokens_details.")
    output = _count(u, "output_tokens", "")
    reasoning = _count(
        _details(u, "output_tokens_details"), "reasoning_tokens", "output_tokens_details."
    )
    return Usage(
        input_tokens=_split_cached(total_in, cached, "input_tokens"),
        cached_input_tokens=cached,
        output_tokens=output,
        reasoning_tokens=reasoning,
    )


def anthropic_usage(usage: Any) -> Usage | None:
    """Anthropic `usage`: the three input fields are already disjoint.

    Thinking tokens are billed as output and not reported apart, so
    `reasoning_tokens` stays 0.
    """
    u = _object(usage)
    if u is None:
        return None
    return Usage(
        input_tokens=_count(u, "input_tokens", ""),
        cached_input_tokens=_count(u, "cache_read_input_tokens", ""),
        cache_write_tokens=_count(u, "cache_creation_input_tokens", ""),
        output_tokens=_count(u, "output_tokens", ""),
    )
