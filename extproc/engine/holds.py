"""The one owner of a call's reservation: settled or released exactly once.

Whatever ends a call (its usage, a non-2xx answer, the client going away, a
store error) goes through `CallHold.settle` or `CallHold.release`; the first
one wins and the others are no-ops, so no path can charge twice or leave a
hold to expire at its worst case. A store that refuses the settle gets it
retried in the background (the reservation's TTL is the backstop).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import StoreUnavailable
from ..policy.model import Policy
from ..protocols.usage import Usage
from ..records import fast_init
from ..stores.base import ExtendResult
from .budget import Decision, Engine
from .downshift import Candidate
from .growth import Need
from .pricing import ledger_usage, settlement, usage_cost
from .workflow import KEEP_ON_RELEASE

log = logging.getLogger("extproc.holds")


class StreamFacts(Protocol):
    """What a stream reader (protocols.stream.StreamReader) observed of an answer."""

    usage: Usage | None
    usage_complete: bool
    counted_output_tokens: int
    tool_calls: Usage
    decode_error: str | None
Spawn = Callable[[Awaitable[Any]], None]


@fast_init
@dataclass(frozen=True, slots=True)
class Due:
    """What closing a hold charges, decided before the store is written (`CallHold.due`), so the
    caller can be told its cost while the store write (`CallHold.book`) follows the reply."""

    charge: dict[str, int]  # per dimension: cost (nano-USD), tokens, requests
    meta: dict[str, Any]  # the ledger entry's meta
    reserved: int  # nano-USD that had been reserved
    overrun: int  # charged above the reservation
    usage: Usage | None  # what it was charged on (None: the reservation)

    @property
    def cost(self) -> int:
        return self.charge.get("cost", 0)


@fast_init
@dataclass(frozen=True, slots=True)
class Settled:
    cost: int  # nano-USD charged (what the caller is told)
    reserved: int  # nano-USD that had been reserved
    overrun: int  # charged above the reservation
    stored: bool  # False: the store refused it now, retried in the background
    replayed: bool = False
    usage: Usage | None = None  # what it was charged on (None: the reservation)


class CallHold:
    def __init__(self, engine: Engine, decision: Decision, chosen: Candidate | None, spawn: Spawn, policy: Policy | None = None) -> None:
        self.engine, self.decision, self.chosen, self.spawn, self.policy = engine, decision, chosen, spawn, policy
        self.open = True
        self.reserved: dict[str, int] = dict(decision.reserved)  # grows with a right-sized stream
        self.reserved_output = chosen.output_tokens if chosen is not None else 0
        self.uncharged = 0  # nano-USD the backend used beyond what the budgets could cover (never charged)
        self.since_ms = engine.clock()  # when the hold was taken or last pushed (its TTL runs from there)
        self.pending: Due | None = None  # closed on it, not yet booked

    @property
    def growable(self) -> bool:
        return self.chosen is not None and self.chosen.right_sized and self.policy is not None

    async def grow(self, need: Need) -> ExtendResult:
        """Grow the reserved output to `need.step` tokens, or if that does not fit to `need.tokens`,
        on every line of the hold at once. Raises StoreUnavailable."""
        result = await self._extend_output(need.step)
        if not result.ok and result.found and result.reason is None and need.tokens < need.step:
            result = await self._extend_output(need.tokens)
        return result

    async def touch(self) -> ExtendResult:
        """Push the hold's TTL (an empty extension; run deadlines and a closed run still refuse)."""
        assert self.policy is not None
        return self._pushed(await self.engine.extend(self.policy, self.decision.hold, {}))

    def _pushed(self, result: ExtendResult) -> ExtendResult:
        if result.ok:  # every extension the store takes re-arms the TTL
            self.since_ms = self.engine.clock()
        return result

    async def _extend_output(self, tokens: int) -> ExtendResult:
        c, policy = self.chosen, self.policy
        assert c is not None and policy is not None
        before = c.price.cost(input_tokens=c.input_tokens, output_tokens=self.reserved_output)
        after = c.price.cost(input_tokens=c.input_tokens, output_tokens=tokens)
        delta = {"cost": after - before, "output_tokens": tokens - self.reserved_output}
        result = self._pushed(await self.engine.extend(policy, self.decision.hold, delta))
        if result.ok:
            self.reserved_output = tokens
            for dim, amount in (*delta.items(), ("total_tokens", delta["output_tokens"])):
                self.reserved[dim] = self.reserved.get(dim, 0) + amount
        return result

    def stream_outcome(self, reader: StreamFacts | None, *, ended: bool) -> tuple[Usage | None, str]:
        """What a call whose answer streamed (or never came) is charged, and the ledger's
        `usage_source`: the lost-usage rule of pricing.settlement. `ended`: the body ended
        (else the client or Envoy closed the stream first). None: charge the reservation."""
        chosen = self.chosen
        if chosen is None or reader is None:  # no answer body: the input estimate (a flat route: its price)
            return (Usage(input_tokens=chosen.input_tokens) if chosen else None), "aborted"
        if reader.decode_error is not None and reader.usage is None:
            rid = self.decision.hold.reservation_id
            log.warning("stream of %s could not be decoded (%s); charging the reservation", rid, reader.decode_error)
            return None, "undecodable"
        counted = Usage(input_tokens=chosen.input_tokens, output_tokens=reader.counted_output_tokens).plus(reader.tool_calls)
        complete = reader.usage_complete or (ended and reader.usage is not None)
        rule = settlement(seen=reader.usage, complete=complete, counted=counted, reasoning=chosen.spec.reasoning)
        return rule.usage, rule.source if ended or rule.source == "stream" else f"aborted_{rule.source}"

    def charge(self, usage: Usage | None) -> dict[str, int]:
        """What settling `usage` charges (None, or no model: the reservation)."""
        if usage is None or self.chosen is None:
            return dict(self.reserved)
        cost = usage_cost(self.chosen.spec, self.chosen.price, usage)
        charge = {"cost": cost, "input_tokens": usage.total_input, "output_tokens": usage.output_tokens, "requests": 1}
        if usage.function_calls:  # the tool calls the model returned: a run's `tool_calls` budget
            charge["tool_calls"] = usage.function_calls
        return charge | self.attempt

    @property
    def attempt(self) -> dict[str, int]:
        """What the attempt itself counts (a retry, one attempt of an idempotency key) on a limit
        of this call: charged whatever its outcome, also when it is released (else a release)."""
        reserved, counted = self.decision.reserved, {lim.spec.dimension for lim in self.decision.limits}
        return {k: reserved[k] for k in KEEP_ON_RELEASE if reserved.get(k) and k in counted}

    async def settle(self, usage: Usage | None, *, source: str, status: int) -> Settled | None:
        """Charge `usage` (None: the reservation); None if the hold was already closed."""
        await self.due(usage, source=source, status=status)
        return await self.book()

    async def due(self, usage: Usage | None, *, source: str, status: int) -> Due | None:
        """Close the hold on `usage` (None: the reservation) and say what that charges; the
        store takes it with `book` (`pending` until then). None if the hold was already closed. Awaits the store only
        when a right-sized call used more than it holds (the hold grows first, if it can)."""
        if not self.open:
            return None
        self.open = False
        charge = self.charge(usage)
        if self.growable and charge.get("cost", 0) > self.reserved.get("cost", 0):
            charge = await self._within_budget(charge)
        reserved = self.reserved.get("cost", 0)
        meta: dict[str, Any] = {"usage_source": source, "status": status}
        if self.chosen is not None:
            p = self.chosen.price
            meta["price_source"] = self.chosen.price_source
            meta["price_pico_usd_per_token"] = {
                "input": p.input, "output": p.output, "cached_input": p.cached_input, "cache_write": p.cache_write
            }
        if usage is not None:
            meta["usage"] = ledger_usage(usage)
        if self.uncharged:
            meta["uncharged"] = self.uncharged
        overrun = max(0, charge.get("cost", 0) - reserved)
        if overrun:  # the backend outgrew the reservation
            meta["overrun"] = overrun
            log.warning("%s charged %d nano-USD above its reservation", self.decision.hold.reservation_id, overrun)
        self.pending = Due(charge, meta, reserved, overrun, usage)
        return self.pending

    def may_book_later(self, ttl_ms: int) -> bool:
        """Whether the store can take this hold's `Due` after the caller has been told it: the
        store charges what `due` says unless the hold expired first (then the reservation, and
        the caller was told a different figure), so only while well inside its TTL."""
        return self.engine.clock() - self.since_ms < ttl_ms // 2

    async def book(self) -> Settled | None:
        """The store takes the `pending` charge (once; None when there is none); a store that
        refuses it now gets it retried in the background."""
        due, self.pending, hold = self.pending, None, self.decision.hold
        if due is None:
            return None
        try:
            result = await self.engine.settle(hold, due.charge, due.meta)
        except StoreUnavailable as e:
            log.error("settle of %s failed (%s); retrying in the background", hold.reservation_id, e)
            self.spawn(self.engine.settle_retrying(hold, due.charge, due.meta))
            return Settled(due.cost, due.reserved, due.overrun, stored=False, usage=due.usage)
        cost = result.charged.get("cost", 0)
        return Settled(cost, due.reserved, due.overrun, stored=True, replayed=result.replayed, usage=due.usage)

    async def _within_budget(self, charge: dict[str, int]) -> dict[str, int]:
        """A right-sized call that used more than it reserved (the backend counted more than we
        did): grow the hold to cover it if the budgets allow, else charge what is reserved and
        record the rest as `uncharged`, so spend never passes a limit."""
        assert self.policy is not None
        over = {dim: v - self.reserved.get(dim, 0) for dim, v in charge.items() if v > self.reserved.get(dim, 0)}
        try:
            result: ExtendResult | None = self._pushed(await self.engine.extend(self.policy, self.decision.hold, over))
        except StoreUnavailable:
            result = None
        if result is not None and result.ok:
            for dim, amount in over.items():
                self.reserved[dim] = self.reserved.get(dim, 0) + amount
            return charge
        self.uncharged = over.get("cost", 0)
        log.warning("%s used %d nano-USD beyond what its budgets cover; not charged", self.decision.hold.reservation_id, self.uncharged)
        return {dim: min(v, self.reserved.get(dim, v)) for dim, v in charge.items()}

    async def release(self) -> bool:
        """Give everything back; False if the hold was already closed."""
        if not self.open:
            return False
        self.open = False
        if self.attempt:  # nothing served, but the attempt was made: it counts against the retry ceilings
            await self._keep_attempt()
            return True
        try:
            await self.engine.release(self.decision.hold)
        except StoreUnavailable as e:
            log.error("release of %s failed (%s); retrying in the background", self.decision.hold.reservation_id, e)
            self.spawn(self.engine.release_retrying(self.decision.hold))
        return True

    async def _keep_attempt(self) -> None:
        hold, charge, meta = self.decision.hold, self.attempt, {"usage_source": "not_served"}
        try:
            await self.engine.settle(hold, charge, meta)
        except StoreUnavailable as e:
            log.error("settle of attempt %s failed (%s); retrying in the background", hold.reservation_id, e)
            self.spawn(self.engine.settle_retrying(hold, charge, meta))
