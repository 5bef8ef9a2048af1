"""Model choice when a budget is tight: downshift chains, capability checks,
output clamps and the alternatives a refusal offers. Pure functions.

A cheaper model is only offered if it can do what the request needs: its
context window holds the input plus the output bound, and it supports the
tools, images and JSON mode the request uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..money import Price
from ..policy.model import ModelSpec, Policy
from ..records import fast_init


class Needs(Protocol):
    """What a request needs of a model (read-only: `RequestFacts` is frozen)."""

    @property
    def has_tools(self) -> bool: ...
    @property
    def images(self) -> int: ...
    @property
    def json_mode(self) -> bool: ...
    @property
    def n(self) -> int: ...


@fast_init
@dataclass(frozen=True, slots=True)
class Candidate:
    """One model this request could run on, with its worst-case estimate."""

    name: str
    spec: ModelSpec
    price: Price  # the static price, or the live cost-rate price of a self-hosted model
    input_tokens: int
    output_tokens: int  # all choices
    cost: int  # nano-USD
    price_source: str = "static"  # or "cost_rate"
    worst_output: int = 0  # a right-sized call: the most it may generate (all choices); 0: output_tokens
    worst_cost: int = 0  # a right-sized call: what its worst case would have reserved (nano-USD)

    @property
    def output_cap(self) -> int:
        """The most output this call may generate, all choices (the cap forwarded to the backend)."""
        return self.worst_output or self.output_tokens

    @property
    def right_sized(self) -> bool:
        """Reserves less than its worst case: the reservation grows with the stream."""
        return self.worst_output > self.output_tokens

    @property
    def estimate(self) -> dict[str, int]:
        return {"cost": self.cost, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "requests": 1}


def chain(policy: Policy, model: str) -> list[str]:
    """Models `model` may downshift to, nearest first (breadth-first, no cycles)."""
    out: list[str] = []
    frontier = [model]
    seen = {model}
    while frontier:
        nxt = []
        for name in frontier:
            spec = policy.prices.models.get(name)
            for target in spec.downshift_to if spec else ():
                if target not in seen:
                    seen.add(target)
                    out.append(target)
                    nxt.append(target)
        frontier = nxt
    return out


def missing_capabilities(spec: ModelSpec, needs: Needs, input_tokens: int, output_tokens: int) -> list[str]:
    """What `spec` lacks for this request; empty means capability-valid."""
    caps = spec.capabilities
    missing = []
    if needs.has_tools and not caps.tools:
        missing.append("tools")
    if needs.images and not caps.vision:
        missing.append("vision")
    if needs.json_mode and not caps.json_mode:
        missing.append("json_mode")
    per_choice = output_tokens // max(1, needs.n)
    if input_tokens + per_choice > spec.context_window:
        missing.append("context_window")
    return missing


def affordable_output(spec: ModelSpec, price: Price, input_tokens: int, remaining_cost: int, n: int) -> int:
    """Largest per-choice max output whose worst case fits in `remaining_cost` nano-USD."""
    pico_left = remaining_cost * 1000 - input_tokens * price.input
    if pico_left <= 0 or price.output <= 0:
        return 0 if price.output > 0 else spec.output_limit
    return min(spec.output_limit, pico_left // (price.output * max(1, n)))
