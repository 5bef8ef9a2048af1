"""The store interface every backend implements, and the values it speaks.

A reservation touches a set of *lines*: one limit of one budget (for example
"team:ml, cost, calendar day"). `reserve` checks every line and takes all of
them or none, atomically, inside the store (one Lua script on Redis, one
transaction on the embedded store). The engine computes amounts and limits;
the store owns counters, key layout and atomicity, nothing else.

Transitions are idempotent: `reserve` with a known id replays its first
outcome, and `settle` / `release` / expiry after a reservation has left the
`reserved` state return the first terminal outcome unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence


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


class Outcome(str, enum.Enum):
    RESERVED = "reserved"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


# What a settled call used; lines pick their dimension from it.
USAGE_FIELDS = ("cost", "input_tokens", "output_tokens", "total_tokens", "requests")


@dataclass(frozen=True, slots=True)
class Line:
    """One limit of one budget, with the amount this request wants to reserve.

    `key` names the counter (budget + dimension + window shape) and must be
    stable across requests; `period` is the calendar bucket ("2026-11-23") or
    "" for other windows; `window_ms` is the rolling window length.
    `dimension` is a USAGE_FIELDS name for counters (what settle charges).
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


@dataclass(frozen=True, slots=True)
class ReserveResult:
    ok: bool
    reservation_id: str
    states: tuple[LineState, ...]
    blocked: int | None = None  # index of the first line that did not fit
    warned: tuple[int, ...] = ()  # advisory lines that would have blocked
    retry_after_ms: int | None = None  # rolling/concurrency: when enough frees up
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SettleResult:
    outcome: Outcome  # the reservation's terminal state (first one wins)
    charged: Mapping[str, int]  # usage charged per USAGE_FIELDS name
    replayed: bool = False
    found: bool = True


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    seq: str
    tag: str
    reservation_id: str
    outcome: Outcome
    reserved: Mapping[str, int]
    charged: Mapping[str, int]
    meta: Mapping[str, Any]
    reserved_at_ms: int
    closed_at_ms: int
    lines: tuple[str, ...] = field(default=())


class Store(Protocol):
    """Everything the engine needs from a budget store. All times are ms since epoch."""

    async def reserve(
        self,
        tag: str,
        reservation_id: str,
        lines: Sequence[Line],
        *,
        now_ms: int,
        ttl_ms: int,
        meta: Mapping[str, Any],
    ) -> ReserveResult: ...

    async def settle(
        self, tag: str, reservation_id: str, usage: Mapping[str, int], *, now_ms: int, meta: Mapping[str, Any] | None = None
    ) -> SettleResult: ...

    async def release(self, tag: str, reservation_id: str, *, now_ms: int) -> SettleResult: ...

    async def expire(self, *, now_ms: int, limit: int = 100) -> int:
        """Settle reservations past their TTL at the reserved amount; returns how many."""
        ...

    async def snapshot(self, lines: Sequence[Line], *, tag: str, now_ms: int) -> tuple[LineState, ...]: ...

    async def adjust(self, tag: str, key: str, *, set_limit: int | None = None, credit: int = 0) -> None:
        """Admin: override a line's limit and/or add a credit (raises its limit by `credit`)."""
        ...

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None) -> list[LedgerEntry]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def normalize_usage(usage: Mapping[str, int]) -> dict[str, int]:
    """Fill `total_tokens` from input + output when absent; drop zero fields."""
    out = {k: int(v) for k, v in usage.items() if k in USAGE_FIELDS and int(v)}
    if "total_tokens" not in out and ("input_tokens" in out or "output_tokens" in out):
        out["total_tokens"] = out.get("input_tokens", 0) + out.get("output_tokens", 0)
    return out
