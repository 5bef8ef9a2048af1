"""Budget lines and the one copy of the rules that refuse them.

A reservation touches a set of *lines*: one limit of one budget (for example
"team:ml, cost, calendar day"). This module holds what a line is and when it
refuses, with no I/O and no store in sight, so that every reader agrees:

- the embedded store evaluates reservations with `over` / `blocks` /
  `rolling_need` inside its transaction;
- `stores/lua/rules.lua` is the same three rules for the Redis scripts
  (atomicity needs them inside Redis); the shared vectors in
  tests/stores/rule_vectors.py run against both, so the two cannot drift;
- the early refusal on request headers asks `exhausted` of a recent state.

It is the neutral layer: `policy` (for `Mode`), `stores` and `engine` import
it; it imports nothing of ours.

Counter semantics (tests/stores is the judge):

- COUNTER line: refused when spent + reserved + amount + headroom > limit
  (hard_gate), > limit + margin (soft_gate), spent >= limit (actuals_only);
  advisory lines never refuse, they are reported as warned when `over`.
  `headroom` is room that must be left over but is not taken (fairness: a
  new call leaves room for the streams in flight to grow); an extension
  checks its delta with no headroom.
- CONCURRENCY line: reserved + amount > limit; nothing is ever spent.
- DURATION line: spent = whole seconds since the first reservation taken on
  it; refused when spent >= limit.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from .records import fast_init


class Kind(str, enum.Enum):
    """How a line is counted."""

    COUNTER = "counter"  # spent + reserved against a limit (cost, tokens, requests)
    CONCURRENCY = "concurrency"  # in-flight reservations; nothing is ever spent
    DURATION = "duration"  # seconds since the budget's first reservation


class Mode(str, enum.Enum):
    """Enforcement mode of a line (DESIGN.md "Enforcement modes")."""

    ADVISORY = "advisory"  # decide and report, never block
    ACTUALS_ONLY = "actuals_only"  # block once settled spend reaches the limit
    SOFT_GATE = "soft_gate"  # block when spent+reserved+amount > limit + margin
    HARD_GATE = "hard_gate"  # block when spent+reserved+amount > limit


class Window(str, enum.Enum):
    TOTAL = "total"
    CALENDAR = "calendar"
    ROLLING = "rolling"


@fast_init
@dataclass(frozen=True, slots=True)
class Line:
    """One limit of one budget, with the amount this request wants to reserve.

    `key` names the counter (budget + dimension + window shape) and must be
    stable across requests; `period` is the calendar bucket ("2026-11-23") or
    "" for other windows; `window_ms` is the rolling window length.
    `dimension` is a usage field name for counters (what settle charges).
    """

    key: str
    kind: Kind
    dimension: str
    limit: int
    amount: int
    mode: Mode = Mode.HARD_GATE
    window: Window = Window.TOTAL
    period: str = ""
    window_ms: int = 0
    margin: int = 0  # soft_gate slack, in the line's unit
    period_ttl_s: int = 0  # how long a calendar bucket must be kept
    run: bool = False  # belongs to the request's run: purged with it, lowerable
    lower: int | None = None  # run lines: the client asks to lower the limit to this (kept, never raised)
    headroom: int = 0  # counters: must fit on top of `amount` to pass, but is not taken (reserve/check only)


@fast_init
@dataclass(frozen=True, slots=True)
class LineState:
    """A line as the store saw it, after the operation (limit includes admin credits)."""

    key: str
    limit: int
    spent: int
    reserved: int

    @property
    def remaining(self) -> int:
        return self.limit - self.spent - self.reserved


def over(line: Line, st: LineState, amount: int | None = None) -> bool:
    """Would this line exceed its limit if the amount (default: the line's) were taken? (what advisory lines warn about)"""
    if amount is None:
        amount = line.amount
    if line.kind is Kind.DURATION:
        return st.spent >= st.limit
    if line.kind is Kind.CONCURRENCY:
        return st.reserved + amount > st.limit
    return st.spent + st.reserved + amount > st.limit


def blocks(line: Line, st: LineState, amount: int | None = None) -> bool:
    """The mode-specific refusal rule for one line: taking its amount (plus, on counters, its
    headroom), or exactly `amount` when given (the early check's probe)."""
    if line.mode is Mode.ADVISORY:
        return False
    if line.kind is not Kind.COUNTER:
        return over(line, st, amount)
    if line.mode is Mode.ACTUALS_ONLY:
        return st.spent >= st.limit
    need = line.amount + line.headroom if amount is None else amount
    if line.mode is Mode.SOFT_GATE:
        return st.spent + st.reserved + need > st.limit + line.margin
    return st.spent + st.reserved + need > st.limit


def rolling_need(line: Line, st: LineState) -> int:
    """How much settled spend must leave a blocked rolling window before the line passes."""
    if line.mode is Mode.ACTUALS_ONLY:
        return st.spent - st.limit + 1
    slack = line.margin if line.mode is Mode.SOFT_GATE else 0
    return st.spent + st.reserved + line.amount + line.headroom - st.limit - slack


def deadline_ms(line: Line, limit: int, first_ms: int | None, now_ms: int) -> int | None:
    """The wall-clock instant a gating duration line starts to refuse: its first reservation
    (now, if none was taken yet) + its limit in seconds. None for every other line."""
    if line.kind is not Kind.DURATION or line.mode is Mode.ADVISORY:
        return None
    return (now_ms if first_ms is None else first_ms) + limit * 1000


# The smallest request: what a check without an estimate probes with. A line
# that cannot take even this is exhausted.
PROBE: Mapping[str, int] = {"cost": 1, "input_tokens": 1, "output_tokens": 0, "requests": 1}


def probe_amount(dimension: str) -> int:
    """The amount of the smallest request on a line of `dimension` (concurrency: one more in flight)."""
    if dimension == "concurrency":
        return 1
    if dimension == "total_tokens":
        return PROBE["input_tokens"] + PROBE["output_tokens"]
    return PROBE.get(dimension, 0)


def exhausted(line: Line, st: LineState) -> bool:
    """Would the smallest request be refused by this line in state `st`? The same answer
    as the store's check with the `PROBE` estimate (soft_gate margin included), whatever
    amount `line` carried when `st` was read."""
    return blocks(line, st, probe_amount(line.dimension))


def frees_with_time(line: Line) -> bool:
    """Does this line make room by itself as time passes (rolling windows, in-flight
    concurrency)? A cached state of such a line goes stale; only the store can tell."""
    return line.kind is Kind.CONCURRENCY or line.window is Window.ROLLING


def exhausted_for_good(line: Line, st: LineState) -> bool:
    """`exhausted`, for a state that may be a little old (a recent decision's states):
    lines that free up by themselves are left to the reservation."""
    return not frees_with_time(line) and exhausted(line, st)
