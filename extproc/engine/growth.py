"""Reservations that grow with the output: right-sized calls the service sees stream.

A call whose answer passes through the service as a stream (the client asked
for one, or the model's policy has `upstream_stream`) does not reserve its
worst case. It reserves its input plus an *expected* output
(`expected_output`), and `StreamGrowth` grows the hold as output passes, in
steps, before the chunk that needs them is released. When a step does not
fit (or the run's wall-clock deadline passed) the growth says `Cut`: the
session ends the stream cleanly in the API's terms and charges what was
delivered, which the reservation covers, so spend never passes a limit.

Expected output is the `history_percentile` of what this principal's last
calls of the model produced (`OutputHistory`, per process: each worker
learns on its own, a restart forgets), else the model's
`expected_output_tokens`, else nothing (the worst case is reserved); plus a
margin (1/8, at least 64 tokens) so that a call ending where expected never
needs an extension at its very end, when its budget may be full.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from decimal import Decimal

from ..policy.model import ModelSpec, StreamingSpec
from ..stores.base import RunRefusal
from .budget import Decision

HISTORY_KEYS = 50_000  # (principal, model) pairs remembered; the least recently used go first
MIN_LOOKAHEAD_TOKENS = 16  # grown this far ahead of the output at least
END_MARGIN_TOKENS = 64  # reserved beyond the expected output (at least; 1/8 of it when larger)


class OutputHistory:
    """Output tokens per choice of each principal's recent calls, per model (bounded)."""

    def __init__(self, keys: int = HISTORY_KEYS) -> None:
        self._items: OrderedDict[tuple[str, str], deque[int]] = OrderedDict()
        self._keys = keys

    def add(self, principal: str, model: str, output_per_choice: int, *, size: int) -> None:
        key = (principal, model)
        d = self._items.get(key)
        if d is None or d.maxlen != size:
            d = self._items[key] = deque(d or (), maxlen=size)
        d.append(max(0, output_per_choice))
        self._items.move_to_end(key)
        if len(self._items) > self._keys:
            self._items.popitem(last=False)

    def percentile(self, principal: str, model: str, pct: int, *, min_count: int) -> int | None:
        """The nearest-rank `pct` percentile, None with fewer than `min_count` calls known."""
        d = self._items.get((principal, model))
        if d is None or len(d) < min_count:
            return None
        ordered = sorted(d)
        return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def expected_output(history: OutputHistory, streaming: StreamingSpec, spec: ModelSpec, principal: str, model: str) -> int | None:
    """Output per choice a right-sized call reserves, None when nothing is known (worst case)."""
    seen = history.percentile(principal, model, streaming.history_percentile, min_count=streaming.min_history)
    expected = seen if seen is not None else spec.expected_output_tokens
    if expected is None:
        return None
    return expected + max(END_MARGIN_TOKENS, expected // 8)  # a call that ends where expected needs no extension


@dataclass(frozen=True, slots=True)
class Cut:
    """The stream must end now. `reason`: budget_exhausted | run_deadline | run_closed |
    run_expired | budget_store_unavailable; `scope`: the budget that did not fit ("key:bob")."""

    reason: str
    scope: str


def cut_of(decision: Decision, blocked: int | None, *, run_refusal: RunRefusal | None = None) -> Cut:
    """Name what refused an extension: the run itself (closed, expired), else a line of the decision."""
    if run_refusal is not None:
        return Cut(run_refusal.value, f"run:{decision.run}" if decision.run else "run")
    if blocked is None or blocked >= len(decision.limits):
        return Cut("budget_exhausted", "")
    lim = decision.limits[blocked]
    return Cut("run_deadline" if lim.spec.dimension == "duration" else "budget_exhausted", lim.budget)


def deadline_cut(decision: Decision) -> Cut:
    """The cut of a stream whose run's wall-clock limit passed (seen without a store call)."""
    line = next((i for i, lim in enumerate(decision.limits) if lim.spec.dimension == "duration"), None)
    return cut_of(decision, line)


@dataclass(frozen=True, slots=True)
class Need:
    """What the next chunk needs reserved: `tokens` (all choices) at least, `step` if it fits."""

    tokens: int
    step: int


class StreamGrowth:
    """When one right-sized call must grow its reservation (pure: the hold does the store call).

    `need` is asked before each chunk is released, with the output counted so
    far (this chunk included): None while the reservation covers the output
    (times the model's token safety factor) plus a lookahead of twice the
    largest chunk seen; else how far to grow."""

    def __init__(
        self, *, reserved: int, cap: int, step_tokens: int, safety: Decimal, deadline_ms: int | None,
        touch_every_ms: int | None = None, now_ms: int = 0,
    ) -> None:  # fmt: skip
        self.reserved = reserved  # output tokens reserved, all choices
        self.cap = cap  # the most the backend may generate (the cap forwarded to it)
        self.step_tokens = step_tokens
        self.safety = safety
        self.deadline_ms = deadline_ms
        self.touch_every_ms = touch_every_ms  # half the reservation TTL: a long stream's hold never expires
        self.touched_ms = now_ms  # when the store last pushed the hold's TTL
        self.largest_chunk = 0
        self.extensions = 0

    def stale(self, now_ms: int) -> bool:
        """The hold's TTL needs pushing (a long stream that has not grown for half its TTL)."""
        return self.touch_every_ms is not None and now_ms - self.touched_ms >= self.touch_every_ms

    def past_deadline(self, now_ms: int) -> bool:
        return self.deadline_ms is not None and now_ms >= self.deadline_ms

    def need(self, counted: int, chunk_tokens: int) -> Need | None:
        self.largest_chunk = max(self.largest_chunk, chunk_tokens)
        output = counted if self.safety == 1 else math.ceil(counted * self.safety)
        want = min(self.cap, output + max(MIN_LOOKAHEAD_TOKENS, 2 * self.largest_chunk))
        if want <= self.reserved:
            return None
        step = min(self.cap, max(want, self.reserved + max(self.step_tokens, self.reserved // 4)))
        return Need(want, step)

    def covers(self, counted: int) -> bool:
        """Whether what was counted so far (this chunk included) is within the reservation."""
        output = counted if self.safety == 1 else math.ceil(counted * self.safety)
        return output <= self.reserved or counted >= self.cap

    def grew(self, reserved: int, now_ms: int) -> None:
        self.touched_ms = now_ms
        if reserved != self.reserved:
            self.reserved = reserved
            self.extensions += 1
