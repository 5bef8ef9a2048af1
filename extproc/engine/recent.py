"""What this process remembers of its own recent decisions (bounded, per process).

`RecentStates` lets request headers refuse a caller whose budget is already
spent, and start a call on the cheaper model past a soft threshold, without a
store round trip. The reservation stays authoritative: a stale entry can only
refuse early for at most `ttl_ms` after a top-up or a period rollover, never
let spending through. `DecisionLog` keeps each decision, as
`GET <budget_path>/decisions/{id}` will show it, flattened when it is logged:
flat values rather than the plan, because what a long-lived bounded log holds
the cyclic collector walks on every full pass. 10,000 plans were ~210k objects
and each full collection stalled the event loop for tens of ms under load;
flattened they are ~10k (`python -m bench.gc_pauses`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..records import fast_init
from ..rules import exhausted_for_good
from .budget import Decision, Identity


class RecentStates:
    def __init__(self, ttl_ms: int = 1000, size: int = 50_000) -> None:
        self.ttl_ms = ttl_ms
        self._items: OrderedDict[tuple[str, str, str | None], tuple[int, Decision]] = OrderedDict()
        self._size = size

    def put(self, who: Identity, run_id: str | None, d: Decision, now_ms: int) -> None:
        key = (who.tag, who.principal, run_id)
        self._items[key] = (now_ms, d)
        self._items.move_to_end(key)
        # Oldest first: entries past the ttl are never read again, so they go now rather than when
        # the size bound is reached (a decision holds ~15 objects the collector walks on full passes).
        while self._items:
            at, _ = next(iter(self._items.values()))
            if now_ms - at <= self.ttl_ms and len(self._items) <= self._size:
                break
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, who: Identity, run_id: str | None, now_ms: int) -> Decision | None:
        item = self._items.get((who.tag, who.principal, run_id))
        if item is None or now_ms - item[0] > self.ttl_ms:
            return None
        return item[1]


def spent_line(d: Decision) -> int | None:
    """The first line of a recent decision that nothing more can fit (the store's own rule),
    leaving lines that free up by themselves to the reservation; None if there is none."""
    return next((i for i, (lim, st) in enumerate(zip(d.limits, d.states, strict=False)) if exhausted_for_good(lim.line, st)), None)


@fast_init
@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One decision as the lookup endpoint and the refusal list show it (flat values only)."""

    decision_id: str
    principal: str
    run: str | None
    allowed: bool
    at_ms: int
    code: str  # the refusal code ("" when allowed)
    scope: str  # the blocking budget ("" when none)
    message: str
    doc: dict[str, Any]  # the lookup's answer, rendered by the server when it logged the decision


class DecisionLog:
    def __init__(self, size: int = 10_000) -> None:
        self._items: OrderedDict[str, LoggedDecision] = OrderedDict()
        self._size = size

    def add(self, entry: LoggedDecision) -> None:
        self._items[entry.decision_id] = entry
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def get(self, decision_id: str) -> LoggedDecision | None:
        return self._items.get(decision_id)

    def refusals(self, principal: str, limit: int) -> list[LoggedDecision]:
        """The principal's latest refused decisions still held, newest first."""
        out: list[LoggedDecision] = []
        for entry in reversed(self._items.values()):
            if len(out) >= limit:
                break
            if entry.principal == principal and not entry.allowed:
                out.append(entry)
        return out
