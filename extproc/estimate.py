"""Worst-case token estimates for a request, before it reaches the model.

Input: tiktoken counts of the request's segments (one per message, system
prompt, tool definitions) with the model's encoding, plus a fixed overhead per
segment and a fixed count per image, times the model's safety factor. Counts
are cached per segment, so an agent that resends its growing context only
tokenizes the new messages.

Output: the explicit max output, else the model's output limit, else the
policy fallback; times `n`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, Sequence

from .tokenizers import get_encoding

PER_SEGMENT_OVERHEAD = 4  # role/name/separators per message (OpenAI's documented 3, rounded up)
PER_REQUEST_OVERHEAD = 3  # the assistant reply primer


class Facts(Protocol):
    segments: Sequence[str]
    images: int
    max_output: int | None
    n: int


@dataclass(frozen=True, slots=True)
class Estimate:
    input_tokens: int
    output_tokens: int  # all choices together


class TokenCounter:
    """tiktoken counts with an LRU cache keyed by segment text, bounded by total characters."""

    def __init__(self, max_chars: int = 64 * 1024 * 1024) -> None:
        self._cache: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._max_chars = max_chars
        self._chars = 0
        self.hits = 0
        self.misses = 0

    def count(self, text: str, encoding: str) -> int:
        key = (encoding, text)
        cache = self._cache
        n = cache.get(key)
        if n is not None:
            self.hits += 1
            cache.move_to_end(key)
            return n
        self.misses += 1
        n = len(get_encoding(encoding).encode(text, disallowed_special=()))
        if len(text) <= self._max_chars:
            cache[key] = n
            self._chars += len(text)
            while self._chars > self._max_chars:
                (_, old), _ = cache.popitem(last=False)
                self._chars -= len(old)
        return n

    def count_all(self, segments: Sequence[str], encoding: str) -> int:
        return sum(self.count(s, encoding) for s in segments)


def estimate(
    facts: Facts,
    *,
    counter: TokenCounter,
    encoding: str,
    safety_factor: Decimal,
    output_limit: int | None,
    fallback_output: int,
    image_tokens: int,
    max_output_override: int | None = None,
) -> Estimate:
    """Worst-case tokens of this request. `max_output_override` is a clamp already decided."""
    raw = counter.count_all(facts.segments, encoding)
    raw += PER_SEGMENT_OVERHEAD * len(facts.segments) + PER_REQUEST_OVERHEAD
    raw += image_tokens * facts.images + getattr(facts, "pretokenized", 0)
    input_tokens = raw if safety_factor == 1 else math.ceil(raw * safety_factor)
    per_choice = max_output_override or facts.max_output
    if per_choice is None:
        per_choice = output_limit or fallback_output
    return Estimate(input_tokens, per_choice * max(1, facts.n))
