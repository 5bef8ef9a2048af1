"""One metered call decided: which model, what is reserved, what the backend may generate.

`Planner.plan` takes the parsed request (`RequestFacts`), who is calling and its
text token counts, and returns a `Plan`: the decision (with its hold when
allowed), the model chosen, whether its output was clamped, and on refusal the
cheaper models that would fit. In order:

1. the requested model and every capability-valid model it may downshift to;
2. past a soft threshold (known from this caller's recent decision) start at the
   cheaper model; else reserve the first that fits (a refusal a cheaper model
   cannot fix stops the ladder);
3. a call that itself crossed a soft threshold moves to the cheaper model;
4. if nothing fits and the policy allows it, clamp the output to what fits.

Every hold taken on the way and not kept is released here, also when the store
fails half way (in the background: the store is down right now), so the caller
only ever owns the one hold of the decision it gets back.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..errors import StoreUnavailable, ToolNotPriced, UnknownModel
from ..estimate import estimate, lower_bound_tokens, media_tokens, upper_bound_tokens
from ..money import Price, nano_to_usd
from ..policy.model import ModelSpec, Policy
from ..protocols.request import RequestFacts
from ..records import fast_init
from ..stores.base import RunRefusal
from .budget import Decision, Engine, Hold, Identity, run_key
from .downshift import Candidate, affordable_output, chain, missing_capabilities
from .pricing import tool_reserve, unpriced_tools
from .workflow import Workflow

LivePrice = Callable[[str], Price | None]
ExpectedOutput = Callable[[str, ModelSpec], int | None]  # (model, spec) -> output per choice a right-sized call reserves
Spawn = Callable[[Awaitable[Any]], None]
TOKEN_DIMENSIONS = ("cost", "input_tokens", "output_tokens", "total_tokens")


@fast_init
@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, under which run, and what this process last decided for them."""

    who: Identity
    run_id: str | None = None
    run_overrides: Mapping[str, int] | None = None
    reservation_id: str = ""
    request_id: str = ""
    recent: Decision | None = None
    workflow: Workflow | None = None  # parent run and ancestors, retry depth, traceparent (workflow.py)


@fast_init
@dataclass(frozen=True, slots=True)
class CallInput:
    """The parsed request and its input tokens: text per encoding (exact counts, or bounds)
    and what its non-text parts cost (`estimate.media_tokens`)."""

    facts: RequestFacts
    text_tokens: Mapping[str, int]
    media_tokens: int = 0

    def bounded(self, encodings: set[str]) -> CallInput:
        """The same call with its text bounded from below by its bytes (nothing tokenized)."""
        return CallInput(self.facts, {enc: lower_bound_tokens(self.facts.segments, enc) for enc in encodings}, self.media_tokens)

    def text(self, encoding: str) -> int:
        """Text tokens in `encoding`; one the call was not counted in is bounded from above."""
        known = self.text_tokens.get(encoding)
        return known if known is not None else upper_bound_tokens(self.facts.segments, encoding)


@fast_init
@dataclass(frozen=True, slots=True)
class Plan:
    decision: Decision
    chosen: Candidate
    requested: str
    facts: RequestFacts
    clamped: bool = False
    alternatives: list[dict[str, Any]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """The call runs otherwise than asked (another model, a lower output cap)."""
        return self.clamped or self.chosen.name != self.requested


def price_rank(c: Candidate) -> int:
    """How pricey a model is for the escalation gate: its per-token input + output price."""
    return c.price.input + c.price.output


def run_share(d: Decision, amount: int) -> Decimal:
    """The largest share of a run cost limit (any level of the chain) already spent or
    reserved before this call's `amount`."""
    shares = [
        Decimal(st.spent + st.reserved - amount) / st.limit
        for lim, st in zip(d.limits, d.states, strict=False)
        if lim.scope == "run" and lim.spec.dimension == "cost" and st.limit > 0
    ]
    return max(shares, default=Decimal(0))


def past_soft(d: Decision, amount: int) -> bool:
    """Would `amount` more take any cost line of this decision past its soft threshold?"""
    for lim, st in zip(d.limits, d.states, strict=False):
        t = lim.spec.soft_threshold
        if t is not None and lim.spec.dimension == "cost" and st.spent + st.reserved + amount > st.limit * t:
            return True
    return False


class Planner:
    """Model choice and reservation for one call, over one policy snapshot."""

    def __init__(
        self,
        engine: Engine,
        policy: Policy,
        *,
        live_price: LivePrice | None = None,
        spawn: Spawn | None = None,
        expected_output: ExpectedOutput | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.live_price = live_price
        self.spawn = spawn
        self.expected_output = expected_output  # given when the call's answer will pass as a stream

    # -- candidates --------------------------------------------------------------

    @staticmethod
    def call_input(policy: Policy, facts: RequestFacts, *, api: str) -> CallInput:
        """What a request must be to be planned at all: a priced model, priced built-in tools and
        bounded non-text input. Raises the ClientError that says which (before any tokenizing)."""
        spec = policy.model(facts.model)
        if spec is None:
            raise UnknownModel(f"model {facts.model!r} has no price in this gateway's policy", param="model")
        missing = unpriced_tools(spec, facts.builtin_tools)
        if missing:
            why = f"built-in tool(s) {', '.join(missing)} have no per-call price for {facts.model!r} in this gateway's policy"
            raise ToolNotPriced(why, param="tools")
        return CallInput(facts, {}, media_tokens(facts, policy.inputs, api=api))

    def models(self, facts: RequestFacts, *, downshift: bool = True) -> list[str]:
        """The requested model, then those it may downshift to (nearest first) that price its tools."""
        names = [facts.model]
        if downshift and self.policy.decisions.downshift:
            names += [n for n in chain(self.policy, facts.model) if not unpriced_tools(self.policy.prices.models[n], facts.builtin_tools)]
        return names

    def encodings(self, names: list[str]) -> set[str]:
        return {spec.encoding for n in names if (spec := self.policy.model(n)) is not None}

    def streams(self, facts: RequestFacts, spec: ModelSpec) -> bool:
        """Whether the answer passes through the service as a stream it can grow and cut."""
        return self.expected_output is not None and self.policy.streaming.right_size and (facts.stream or spec.upstream_stream)

    def candidate(self, call: CallInput, name: str, *, max_output: int | None = None) -> Candidate:
        """`name` for this call: its worst case, or for a call that streams through the service
        (`streams`) its input plus the expected output, growing later up to the worst case."""
        spec = self.policy.model(name)
        assert spec is not None
        est = estimate(
            call.facts,
            text_tokens=call.text(spec.encoding),
            encoding=spec.encoding,
            safety_factor=spec.token_safety_factor,
            output_limit=spec.output_limit,
            fallback_output=self.policy.fallback_output_tokens,
            media_tokens=call.media_tokens,
            context_window=spec.context_window,
            max_output_override=max_output,
        )
        live = self.live_price(name) if self.live_price is not None else None
        price = live or spec.price
        tools = tool_reserve(spec, call.facts.builtin_tools)
        cost = price.cost(input_tokens=est.input_tokens, output_tokens=est.output_tokens) + tools
        source = "cost_rate" if live else "static"
        if self.expected_output is not None and self.streams(call.facts, spec):
            expected = self.expected_output(name, spec)
            if expected is not None and expected * max(1, call.facts.n) < est.output_tokens:
                output = expected * max(1, call.facts.n)
                right = price.cost(input_tokens=est.input_tokens, output_tokens=output) + tools
                return Candidate(name, spec, price, est.input_tokens, output, right, source, est.output_tokens, cost)
        return Candidate(name, spec, price, est.input_tokens, est.output_tokens, cost, source)

    # -- before tokenizing -----------------------------------------------------------

    async def refused_by_size(self, call: CallInput, names: list[str], caller: Caller) -> Decision | None:
        """A refusal when even the least this call can cost (its bytes bound its tokens from
        below) does not fit the cheapest model: no tokenizing needed. None: it may fit."""
        bounded = call.bounded(self.encodings(names))
        cheapest = min((self.candidate(bounded, n) for n in names), key=lambda c: c.cost)
        checked = await self.engine.check(
            self.policy, caller.who, run_id=caller.run_id, estimate=cheapest.estimate, run_overrides=caller.run_overrides,
            workflow=caller.workflow,
        )
        return None if checked.allowed else checked

    # -- reserve --------------------------------------------------------------------

    async def plan(self, call: CallInput, caller: Caller, *, api: str, downshift: bool = True) -> Plan:
        """Reserve for this call (see the module doc). Raises StoreUnavailable; then no hold is kept."""
        facts = call.facts
        names = self.models(facts, downshift=downshift)
        requested = self.candidate(call, facts.model)
        options = [requested]
        for name in names[1:]:
            c = self.candidate(call, name)
            if not missing_capabilities(c.spec, facts, c.input_tokens, c.output_cap):
                options.append(c)
        reserve = _Reserver(self, caller, api, requested.name)
        start = 1 if len(options) > 1 and caller.recent is not None and past_soft(caller.recent, requested.cost) else 0
        try:
            decision, chosen = await reserve.first_fit(options[start:], 0)
            if decision.allowed and chosen is requested and len(options) > 1 and past_soft(decision, 0):
                reserve.held = decision.hold  # crossed a soft threshold: move to the cheaper model
                cheaper, cheaper_choice = await reserve.first_fit(options[1:], 1)
                if cheaper.allowed:
                    await self.engine.release(decision.hold)
                    decision, chosen = cheaper, cheaper_choice
                reserve.held = None
            if not decision.allowed and self.policy.decisions.output_clamp:
                clamped = await self._clamp(call, requested, decision, reserve)
                if clamped is not None:
                    return Plan(clamped[0], clamped[1], requested.name, facts, clamped=True)
            if decision.allowed and caller.run_id and self.policy.runs.escalation is not None:
                decision, chosen = await self._escalation_gate(caller, options, decision, chosen, reserve)
        except StoreUnavailable:
            if reserve.held is not None and self.spawn is not None:
                self.spawn(self.engine.release_retrying(reserve.held))
            raise
        alternatives = [] if decision.allowed else self.alternatives(call, decision)
        return Plan(decision, chosen, requested.name, facts, alternatives=alternatives)

    async def _escalation_gate(
        self, caller: Caller, options: list[Candidate], decision: Decision, chosen: Candidate, reserve: _Reserver
    ) -> tuple[Decision, Candidate]:
        """Past the run's escalation threshold, a model pricier than any the run used so far
        (in this process) moves to one it used (policy `downshift`, when a capable one exists)
        or is refused; below the threshold, or with no baseline yet, escalation is free."""
        esc = self.policy.runs.escalation
        assert esc is not None and caller.run_id is not None
        key = run_key(caller.who, caller.run_id)
        used = self.engine.models_used.get(key)
        rank = price_rank(chosen)
        share = run_share(decision, chosen.cost)
        if used is not None and rank > used[0] and share > esc.threshold:
            cheaper = [c for c in options if price_rank(c) <= used[0]] if esc.action == "downshift" else []
            moved = None
            if cheaper:
                reserve.held = decision.hold
                moved = await reserve.first_fit(cheaper, 5)
                reserve.held = None
            await self.engine.release(decision.hold)  # the escalated reservation: moved, or refused
            if moved is not None and moved[0].allowed:
                decision, chosen = moved
            else:
                pct = int(share * 100)
                refused = self.engine.refuse_run(
                    self.policy, caller.who, caller.run_id, RunRefusal.ESCALATION, int(esc.threshold * 100), pct
                )
                return refused, chosen
        self.engine.models_used.note(key, price_rank(chosen), chosen.name)
        return decision, chosen

    async def reserve_flat(self, caller: Caller, cost: int, *, api: str) -> Decision:
        """A flat-priced route: `cost` nano-USD and one request, no model."""
        try:
            return await self._reserve_flat(caller, cost, api=api)
        except StoreUnavailable:
            release_lost(self.engine, self.spawn, Hold(caller.who.tag, caller.reservation_id))
            raise

    async def _reserve_flat(self, caller: Caller, cost: int, *, api: str) -> Decision:
        return await self.engine.reserve(
            self.policy,
            caller.who,
            run_id=caller.run_id,
            reservation_id=caller.reservation_id,
            estimate={"cost": cost, "requests": 1},
            meta={"model": "", "requested_model": "", "api": api, "request_id": caller.request_id},
            run_overrides=caller.run_overrides,
            workflow=caller.workflow,
        )

    async def _clamp(
        self, call: CallInput, requested: Candidate, refused: Decision, reserve: _Reserver
    ) -> tuple[Decision, Candidate] | None:
        """Lower max output to what the blocking budget still affords (opt-in)."""
        b, idx = refused.blocking, refused.blocked
        if b is None or idx is None:
            return None
        remaining = max(0, refused.states[idx].remaining)
        n = max(1, call.facts.n)
        if b.spec.dimension == "cost":
            per_choice = affordable_output(requested.spec, requested.price, requested.input_tokens, remaining, n)
        elif b.spec.dimension == "output_tokens":
            per_choice = remaining // n
        elif b.spec.dimension == "total_tokens":
            per_choice = (remaining - requested.input_tokens) // n
        else:
            return None
        if per_choice < self.policy.decisions.min_clamped_output_tokens:
            return None
        clamped = self.candidate(call, requested.name, max_output=per_choice)
        decision = await reserve.one(clamped, 9)
        return (decision, clamped) if decision.allowed else None

    def alternatives(self, call: CallInput, d: Decision) -> list[dict[str, Any]]:
        """Cheaper models an agent could ask for instead, with whether they fit now."""
        costs = [max(0, st.remaining) for lim, st in zip(d.limits, d.states, strict=False) if lim.spec.dimension == "cost"]
        remaining = min(costs, default=None)
        out = []
        for name in chain(self.policy, call.facts.model):
            c = self.candidate(call, name)
            missing = missing_capabilities(c.spec, call.facts, c.input_tokens, c.output_cap)
            caps = c.spec.capabilities
            out.append(
                {
                    "model": name,
                    "estimate_usd": nano_to_usd(c.cost),
                    "fits": not missing and (remaining is None or c.cost <= remaining),
                    "capable": not missing,
                    "missing": missing,
                    "capabilities": {
                        "tools": caps.tools,
                        "vision": caps.vision,
                        "json_mode": caps.json_mode,
                        "context_window": c.spec.context_window,
                        "output_limit": c.spec.output_limit,
                    },
                }
            )
        return out


def release_lost(engine: Engine, spawn: Spawn | None, hold: Hold) -> None:
    """A reserve whose answer was lost (the connection to the store dropped) may still have
    been taken: give it back in the background once the store answers, so a request that
    never ran is not left holding budget until its TTL (release is idempotent). Called where
    the reserve raised StoreUnavailable (a try, not a context manager: this is every call's path)."""
    if spawn is not None and hold.reservation_id:
        spawn(engine.release_retrying(hold))


def admission_headroom(c: Candidate, factor: Decimal) -> dict[str, int] | None:
    """What a right-sized call must also find free to be admitted: `factor` times its expected
    output, left for the calls already streaming to grow into (fairness under pressure)."""
    if not c.right_sized or not factor:
        return None
    tokens = math.ceil(c.output_tokens * factor)
    return {"cost": c.price.cost(output_tokens=tokens), "output_tokens": tokens, "total_tokens": tokens}


class _Reserver:
    """The reservations one plan makes, with the hold it must give back if the store fails."""

    def __init__(self, planner: Planner, caller: Caller, api: str, requested: str) -> None:
        self.p, self.caller, self.api, self.requested = planner, caller, api, requested
        self.held: Hold | None = None

    async def one(self, c: Candidate, attempt: int) -> Decision:
        rid = self.caller.reservation_id if attempt == 0 else f"{self.caller.reservation_id}.{attempt}"
        try:
            return await self.p.engine.reserve(
                self.p.policy,
                self.caller.who,
                run_id=self.caller.run_id,
                reservation_id=rid,
                estimate=c.estimate,
                meta={"model": c.name, "requested_model": self.requested, "api": self.api, "request_id": self.caller.request_id},
                run_overrides=self.caller.run_overrides,
                headroom=admission_headroom(c, self.p.policy.streaming.admission_headroom),
                workflow=self.caller.workflow,
            )
        except StoreUnavailable:
            release_lost(self.p.engine, self.p.spawn, Hold(self.caller.who.tag, rid))
            raise

    async def first_fit(self, options: list[Candidate], first_attempt: int) -> tuple[Decision, Candidate]:
        """Try each model in order; stop at the first that fits or at a refusal a cheaper model cannot fix."""
        decision: Decision | None = None
        chosen = options[0]
        for attempt, c in enumerate(options):
            decision, chosen = await self.one(c, first_attempt + attempt), c
            if decision.allowed:
                break
            blocking = decision.blocking
            if blocking is None or blocking.spec.dimension not in TOKEN_DIMENSIONS:
                break
        assert decision is not None
        return decision, chosen
