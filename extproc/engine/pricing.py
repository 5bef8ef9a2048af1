"""What a call costs, and what to charge when its usage was lost. Pure functions.

Reading usage (protocols/usage.py) and pricing it are separate steps: the
protocols report what the API said, this module turns it into nano-USD with
the policy's prices, and decides what a call is charged when the API never
said (DESIGN.md lifecycle step 5):

    usage complete                 -> that usage                       "body" / "stream"
    part of the usage seen         -> it, raised to what was counted   "partial"
    nothing seen, reasoning model  -> the reservation                  "reserved"
    nothing seen, other model      -> input estimate + counted output  "counted"

A served call is never refunded to $0; a charge above the reservation is an
overrun (recorded by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..money import Price, pico_to_nano
from ..policy.model import ModelSpec
from ..protocols.usage import Usage

# Usage fields priced per call, by the tool name the policy uses for them.
CALL_FIELDS = {
    "web_search": "web_search_calls",
    "web_fetch": "web_fetch_calls",
    "file_search": "file_search_calls",
    "code_interpreter": "code_interpreter_calls",
}


def usage_cost(spec: ModelSpec, price: Price, usage: Usage) -> int:
    """nano-USD for `usage`: tokens at `price` (static or live), the audio premium on the
    audio part of the tokens, and the per-call fee of each server-side tool call."""
    pico = price.pico(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.cache_write_tokens)
    audio = spec.audio_price
    pico += usage.audio_input_tokens * (audio.input - price.input) + usage.audio_output_tokens * (audio.output - price.output)
    fees = sum(spec.tool_call_nano.get(tool, 0) * int(getattr(usage, field)) for tool, field in CALL_FIELDS.items())
    return pico_to_nano(max(0, pico)) + fees


def ledger_usage(usage: Usage) -> dict[str, int]:
    """The ledger's record of a usage: the five token counts always, the rest when present."""
    out = {
        "input": usage.input_tokens,
        "cached_input": usage.cached_input_tokens,
        "cache_write": usage.cache_write_tokens,
        "output": usage.output_tokens,
        "reasoning": usage.reasoning_tokens,
    }
    extras = {"audio_input": usage.audio_input_tokens, "audio_output": usage.audio_output_tokens}
    extras.update({field: getattr(usage, field) for field in CALL_FIELDS.values()})
    out.update({k: v for k, v in extras.items() if v})
    return out


def unpriced_tools(spec: ModelSpec, tools: frozenset[str]) -> list[str]:
    """Built-in tools a request enables that the policy gives no per-call price (fail closed)."""
    return sorted(t for t in tools if t not in spec.tool_calls)


def tool_reserve(spec: ModelSpec, tools: frozenset[str]) -> int:
    """nano-USD reserved for the tool calls a request may make: `tool_calls_reserved` calls
    of the priciest tool it enables."""
    fees = [spec.tool_call_nano.get(t, 0) for t in tools]
    return spec.tool_calls_reserved * max(fees, default=0)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to charge: `usage` priced, or the reservation when `usage` is None."""

    usage: Usage | None
    source: str


def settlement(*, seen: Usage | None, complete: bool, counted: Usage, reasoning: bool, source: str = "stream") -> Settlement:
    """The charge rule for a response whose usage may be partial or missing (see the module doc)."""
    if seen is not None and complete:
        if seen.output_tokens == 0 and counted.output_tokens > 0:  # "0 output" for a stream that carried text
            return Settlement(seen.merge(Usage(output_tokens=counted.output_tokens)), "partial")
        return Settlement(seen, source)
    if seen is not None:  # e.g. Anthropic's message_start: the input is known, the output still growing
        extra = Usage(input_tokens=0 if seen.total_input else counted.input_tokens, output_tokens=counted.output_tokens)
        return Settlement(seen.merge(extra), "partial")
    if reasoning:
        return Settlement(None, "reserved")
    return Settlement(counted, "counted")
