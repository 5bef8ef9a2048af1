"""Reserve, settle and release across every budget that applies to a call.

One call to `Engine.reserve` builds the lines (one per limit of each budget
that applies: key, team, org, user, labels, run), asks the store to take them
atomically, and returns a `Decision` the caller can render. `settle` charges
the real usage to the same lines; `release` gives everything back.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Mapping, Sequence

from ..policy.model import BudgetSpec, KeySpec, LimitSpec, Policy
from ..stores.base import Kind, Line, LineState, Mode, ReserveResult, SettleResult, Store, Window
from .windows import calendar_period


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, resolved from a trusted source."""

    principal: str
    team: str | None = None
    org: str | None = None
    user: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_key(cls, key: KeySpec) -> "Identity":
        return cls(key.principal, key.team, key.org, key.user, dict(key.labels))

    @property
    def tag(self) -> str:
        """The budget tree: every counter of one call lives under it (one Redis Cluster shard)."""
        return f"org:{self.org}" if self.org else "default"

    def scope_value(self, scope: str, run_id: str | None) -> str | None:
        if scope == "key":
            return self.principal
        if scope == "run":
            return f"{self.principal}/{run_id}" if run_id else None
        if scope.startswith("label:"):
            return self.labels.get(scope[6:])
        return getattr(self, scope)


@dataclass(frozen=True, slots=True)
class AppliedLimit:
    scope: str
    scope_id: str
    spec: LimitSpec
    line: Line
    reset_ms: int | None  # calendar reset time; None for other windows

    @property
    def budget(self) -> str:
        return f"{self.scope}:{self.scope_id}"


KIND_OF = {"concurrency": Kind.CONCURRENCY, "duration": Kind.DURATION}


def _window_id(spec: LimitSpec) -> str:
    if spec.window == "rolling":
        return f"roll{spec.seconds}s"
    if spec.window == "total":
        return "total"
    return f"{spec.window}@{spec.timezone}"


def _amount(dimension: str, usage: Mapping[str, int]) -> int:
    if dimension == "concurrency":
        return 1
    if dimension == "duration":
        return 0
    return usage.get(dimension, 0)


@dataclass(frozen=True, slots=True)
class Hold:
    """What settle/release need to find a reservation again."""

    tag: str
    reservation_id: str


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    decision_id: str
    hold: Hold
    limits: tuple[AppliedLimit, ...]
    states: tuple[LineState, ...]
    blocked: int | None
    warned: tuple[int, ...]
    retry_after_ms: int | None
    reserved: Mapping[str, int]  # the estimate reserved (cost nano-USD, tokens, requests)
    mode: Mode

    @property
    def blocking(self) -> AppliedLimit | None:
        return None if self.blocked is None else self.limits[self.blocked]

    @property
    def refusal_code(self) -> str:
        """insufficient_quota for balances (no retry helps); rate_limit_exceeded when time frees room."""
        b = self.blocking
        if b is None:
            return ""
        if b.spec.window == "rolling" or b.spec.dimension == "concurrency":
            return "rate_limit_exceeded"
        return "insufficient_quota"

    def tightest(self, dimension: str = "cost") -> tuple[AppliedLimit, LineState] | None:
        """The limit of `dimension` with the least remaining (what the headers report)."""
        best = None
        for lim, st in zip(self.limits, self.states):
            if lim.spec.dimension == dimension and (best is None or st.remaining < best[1].remaining):
                best = (lim, st)
        return best


class Engine:
    """Budget decisions over a store. Stateless apart from the store and the clock."""

    def __init__(self, store: Store, *, clock: Callable[[], int] = now_ms) -> None:
        self.store = store
        self.clock = clock

    def budgets_for(self, policy: Policy, who: Identity, run_id: str | None) -> list[tuple[BudgetSpec, str]]:
        """Every (budget, scope instance) that applies to this caller and run."""
        out = []
        specs: Sequence[BudgetSpec] = policy.budgets
        if run_id and policy.runs.limits:
            specs = (*specs, BudgetSpec(scope="run", limits=policy.runs.limits))
        for spec in specs:
            value = who.scope_value(spec.scope, run_id)
            if value is None or (spec.id is not None and spec.id != value and spec.scope != "run"):
                continue
            out.append((spec, value))
        return out

    def limits_for(
        self, policy: Policy, who: Identity, run_id: str | None, amounts: Mapping[str, int], now: int
    ) -> tuple[AppliedLimit, ...]:
        out = []
        margin_share = policy.enforcement.soft_gate_margin
        for spec, value in self.budgets_for(policy, who, run_id):
            for lim in spec.limits:
                mode = lim.mode or spec.mode or policy.enforcement.mode
                period, reset, keep = "", None, 0
                window = Window.TOTAL
                if lim.window in ("day", "week", "month"):
                    period, reset, keep = calendar_period(lim.window, lim.timezone, now)
                    window = Window.CALENDAR
                elif lim.window == "rolling":
                    window = Window.ROLLING
                line = Line(
                    key=f"{spec.scope}:{value}|{lim.dimension}|{_window_id(lim)}",
                    kind=KIND_OF.get(lim.dimension, Kind.COUNTER),
                    dimension=lim.dimension,
                    limit=lim.value,
                    amount=_amount(lim.dimension, amounts),
                    mode=mode,
                    window=window,
                    period=period,
                    window_ms=(lim.seconds or 0) * 1000,
                    margin=int(Decimal(lim.value) * margin_share) if mode is Mode.SOFT_GATE else 0,
                    period_ttl_s=keep,
                )
                out.append(AppliedLimit(spec.scope, value, lim, line, reset))
        return tuple(out)

    async def reserve(
        self,
        policy: Policy,
        who: Identity,
        *,
        run_id: str | None,
        reservation_id: str | None,
        estimate: Mapping[str, int],
        meta: Mapping[str, Any],
    ) -> Decision:
        """Reserve `estimate` ({cost, input_tokens, output_tokens, requests}) on every applicable limit."""
        now = self.clock()
        amounts = {**estimate, "total_tokens": estimate.get("input_tokens", 0) + estimate.get("output_tokens", 0)}
        limits = self.limits_for(policy, who, run_id, amounts, now)
        rid = reservation_id or uuid.uuid4().hex
        result: ReserveResult = await self.store.reserve(
            who.tag,
            rid,
            [l.line for l in limits],
            now_ms=now,
            ttl_ms=policy.reservation_ttl_seconds * 1000,
            meta={**meta, "principal": who.principal, "run": run_id, "estimate": dict(amounts)},
        )
        return Decision(
            allowed=result.ok,
            decision_id=uuid.uuid4().hex,
            hold=Hold(who.tag, rid),
            limits=limits,
            states=result.states,
            blocked=result.blocked,
            warned=result.warned,
            retry_after_ms=result.retry_after_ms,
            reserved=amounts,
            mode=policy.enforcement.mode,
        )

    async def settle(self, hold: Hold, usage: Mapping[str, int], meta: Mapping[str, Any] | None = None) -> SettleResult:
        return await self.store.settle(hold.tag, hold.reservation_id, usage, now_ms=self.clock(), meta=meta)

    async def release(self, hold: Hold) -> SettleResult:
        return await self.store.release(hold.tag, hold.reservation_id, now_ms=self.clock())

    async def expire(self) -> int:
        return await self.store.expire(now_ms=self.clock())
