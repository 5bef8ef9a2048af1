"""One ext_proc stream = one HTTP request: headers → body → response → end.

The session holds the request's facts, its reservation and its stream reader,
and answers each phase with a `Reply`. It never sees protobuf or sockets.
Every path that reserved money ends in exactly one of settle, release or (if
this process dies) expiry by the store's reaper.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Mapping

from ..engine.budget import AppliedLimit, Decision, Engine, Hold, Identity
from ..engine.runs import run_overrides_from_headers
from ..engine.pricing import ledger_usage, settlement, tool_reserve, unpriced_tools, usage_cost
from ..engine.downshift import Candidate, affordable_output, chain, missing_capabilities
from ..errors import (
    BadRequest,
    ClientError,
    MethodNotAllowed,
    NoRoute,
    RouteDenied,
    StoreUnavailable,
    ToolNotPriced,
    Unauthenticated,
    UnknownModel,
    UpstreamError,
)
from ..estimate import Counts, TokenCounter, estimate, lower_bound_tokens, media_tokens
from ..money import nano_to_usd, usd_to_nano
from ..policy.loader import PolicyHolder
from ..policy.model import Policy
from ..policy.routes import RouteMatch
from ..protocols.envelopes import error_body
from ..protocols.paths import BadPath, RequestPath
from ..protocols.paths import normalize as normalize_path
from ..protocols.request import RequestFacts
from ..protocols.schemas import Schema, schema_by_name
from ..protocols.usage import Usage
from ..rules import LineState, exhausted_for_good
from . import headers as H
from . import identity, metrics, render
from .reply import Immediate, Reply

log = logging.getLogger("extproc.session")

LARGE_BODY_BYTES = 256 * 1024  # above this, bound the request by its bytes before tokenizing it


class DecisionLog:
    """Recent decisions by id, for `GET <budget_path>/decisions/{id}` (bounded, per process).

    Stores the inputs as they are and renders JSON only on lookup: most
    decisions are never looked up, and this runs on every call.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._items: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._size = size

    def add(self, decision_id: str, inputs: tuple[Any, ...]) -> None:
        self._items[decision_id] = inputs
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def get(self, decision_id: str) -> dict[str, Any] | None:
        item = self._items.get(decision_id)
        if item is None:
            return None
        principal, run, requested, c, d, clamped, price_version = item
        return {
            "decision_id": d.decision_id,
            "principal": principal,
            "run": run,
            "decision": render.decision_value(d, clamped or c.name != requested),
            "requested_model": requested,
            "selected_model": c.name,
            "scopes": sorted({l.budget for l in d.limits}),
            "estimate": {"cost_usd": nano_to_usd(c.cost), "input_tokens": c.input_tokens, "output_tokens": c.output_tokens},
            "effective_max_output": c.output_tokens,
            "output_clamped": clamped,
            "price_source": c.price_source,
            "blocking_scope": d.blocking.budget if d.blocking else None,
            "price_table_version": price_version,
            "reservation_id": d.hold.reservation_id,
        }


class RecentStates:
    """The budget states this process last saw per (tree, principal, run), from its own decisions.

    Lets request headers refuse a caller whose budget is already spent, and
    start a call on the cheaper model past a soft threshold, without a store
    round trip. The reservation stays authoritative: a stale entry can only
    refuse early for at most `ttl_ms` after a top-up or a period rollover,
    never let spending through.
    """

    def __init__(self, ttl_ms: int = 1000, size: int = 50_000) -> None:
        self.ttl_ms = ttl_ms
        self._items: OrderedDict[tuple[str, str, str | None], tuple[int, Decision]] = OrderedDict()
        self._size = size

    def put(self, who: Identity, run_id: str | None, d: Decision, now_ms: int) -> None:
        key = (who.tag, who.principal, run_id)
        self._items[key] = (now_ms, d)
        self._items.move_to_end(key)
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def get(self, who: Identity, run_id: str | None, now_ms: int) -> Decision | None:
        item = self._items.get((who.tag, who.principal, run_id))
        if item is None or now_ms - item[0] > self.ttl_ms:
            return None
        return item[1]


@dataclass
class Services:
    """What every session shares: policy snapshot source, engine, token cache, background tasks."""

    policy: PolicyHolder
    engine: Engine
    counter: TokenCounter = field(default_factory=TokenCounter)
    decisions: DecisionLog = field(default_factory=DecisionLog)
    recent: RecentStates = field(default_factory=RecentStates)
    rates: Any = None  # costrate.CostRates when the policy has self-hosted backends
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def _over_soft(lim: AppliedLimit, st: LineState, amount: int) -> bool:
    t = lim.spec.soft_threshold
    return t is not None and lim.spec.dimension == "cost" and (st.spent + st.reserved + amount) > st.limit * t


def _past_soft(d: Decision, amount: int) -> bool:
    """Would `amount` more take any cost line of this decision past its soft threshold?"""
    return any(_over_soft(lim, st, amount) for lim, st in zip(d.limits, d.states))


def _envelope_guess(path: RequestPath) -> str:
    """The error envelope before a route is known: Anthropic's under /v1/messages, else OpenAI's."""
    return "anthropic" if [s.lower() for s in path.segments[:2]] == ["v1", "messages"] else "openai"


class Session:
    def __init__(self, services: Services, *, caller_authenticated: bool = False) -> None:
        self.s = services
        # The gRPC caller proved it is our Envoy (callers.py): only then do Envoy's
        # attributes and trusted principal headers name the principal.
        self.caller_authenticated = caller_authenticated
        self.policy: Policy = services.policy.current  # one snapshot for the whole request
        self.route: RouteMatch | None = None
        self.schema: Schema | None = None
        self.envelope = "openai"
        self.who: Identity | None = None
        self.run_id: str | None = None
        self.run_overrides: dict[str, int] | None = None  # x-run-budget-usd & co: lowered run limits
        # The reservation id is ours, one per stream: a header the client can set (x-request-id)
        # must never name, replay or settle a reservation. The client's id is only correlation.
        self.reservation_id = uuid.uuid4().hex
        self.request_id = ""
        self.flat = False  # a flat-priced route: reserved on headers, settled on the response status
        self.early: Decision | None = None  # this caller's most recent decision in this process
        self.chosen: Candidate | None = None
        self.requested_model = ""
        self.clamped = False
        self.decision: Decision | None = None
        self.reader: Any = None
        self.closed = False  # settled, released or refused
        self.response_started = False
        self.status = 0
        self._strip_usage = False  # we injected include_usage, so hide the usage chunk
        self.cost: int | None = None
        self.fail_open = False  # the store was down and the policy says fail_open
        self.content_encoding: str | None = None
        self._counts: dict[str, Counts] = {}  # text tokens of the request per encoding
        self._media_tokens = 0  # what its images, audio, files and stored conversation add (estimate.media_tokens)

    # -- request ---------------------------------------------------------------

    async def request_headers(self, headers: Mapping[str, str], end_of_stream: bool, peer_id: str | None = None) -> Reply:
        """Closed world: the normalised path must match a route of the policy; the route says
        whether the call is metered, flat-priced, unmetered, public or denied."""
        method = headers.get(":method", "")
        try:
            path = normalize_path(headers.get(":path", ""))
        except BadPath as e:
            return self._client_error(e)
        self.envelope = _envelope_guess(path)
        budget_path = self.policy.decisions.budget_path
        if method == "GET" and (path.path == budget_path or path.path.startswith(budget_path + "/decisions/")):
            return await self._budget_endpoint(path.path, headers, peer_id)
        route, path_known = self.policy.route_table.find(path.segments, method)
        if route is None:
            if path_known:
                return self._client_error(MethodNotAllowed(f"{method} is not allowed on {path.path}"))
            return self._client_error(NoRoute(f"{path.path} is not a route of this gateway"))
        spec = route.spec
        self.route = route
        if spec.api is not None:
            self.schema = schema_by_name(spec.api)
            assert self.schema is not None
            self.envelope = self.schema.envelope
        if spec.action == "deny":
            return self._client_error(RouteDenied(f"{path.path} is not served through this gateway" + (f": {spec.note}" if spec.note else "")))
        # Forward exactly the path that was matched (the backend must not read another one),
        # marked as classified so that Envoy routes it (a request without the mark gets a 404).
        target = route.path + ("?" + path.query if path.query else "")
        let_through = [(H.VERDICT, spec.action)] + ([(":path", target)] if target != path.raw else [])
        if spec.action == "public":
            return Reply(set_headers=let_through, clear_route_cache=True, skip_rest=True)
        refused = await self.gate(headers, peer_id, ask_store=False)
        if refused is not None:
            return refused
        if spec.action == "unmetered":
            return Reply(set_headers=let_through, clear_route_cache=True, skip_rest=True)
        if spec.action == "flat":
            reply = await self._reserve_flat(spec.price or "0")
        elif end_of_stream:
            return self._client_error(BadRequest("request body is required"))
        else:
            # usage must be readable: ask the backend for an uncompressed body (a body
            # compressed anyway is decoded on the side, see protocols/encoding.py)
            reply = Reply(set_headers=[("accept-encoding", "identity")])
        if reply.immediate is None:
            reply.set_headers += let_through
            reply.clear_route_cache = True
        return reply

    async def authorize(self, headers: Mapping[str, str], peer_id: str | None) -> Reply | None:
        """ext_authz: the same closed world, then identity and a store-checked refusal (None = allow).

        ext_authz sees no body and meters nothing, so it lets through only `public` routes and
        `unmetered` ones (an orchestrator's dispatch endpoint, listed in the policy) with a
        verified identity and budget room; a metered route must pass the ext_proc filter."""
        try:
            path = normalize_path(headers.get(":path", ""))
        except BadPath as e:
            return self._client_error(e)
        self.envelope = _envelope_guess(path)
        method = headers.get(":method", "")
        route, path_known = self.policy.route_table.find(path.segments, method)
        if route is None:
            if path_known:
                return self._client_error(MethodNotAllowed(f"{method} is not allowed on {path.path}"))
            return self._client_error(NoRoute(f"{path.path} is not a route of this gateway"))
        action = route.spec.action
        if action == "public":
            return None
        if action != "unmetered":
            why = route.spec.note if action == "deny" else "it is metered, and this gate (ext_authz) cannot meter it"
            return self._client_error(RouteDenied(f"{path.path} is not served through this gateway: {why}"))
        return await self.gate(headers, peer_id)

    async def gate(self, headers: Mapping[str, str], peer_id: str | None, *, ask_store: bool = True) -> Reply | None:
        """Identity, run id, and a refusal if a budget is already spent (no body needed).

        ext_authz asks the store (it is the only check such a request gets);
        ext_proc's request headers use this process's recent states and leave
        the authoritative answer to the reservation on the body."""
        try:
            self.who = identity.resolve(self.policy, headers, peer_id, caller_authenticated=self.caller_authenticated)
        except Unauthenticated as e:
            return self._client_error(e)
        for name in self.policy.runs.headers:
            value = headers.get(name)
            if value:
                if len(value) > 128 or not value.isprintable():
                    return self._client_error(BadRequest(f"{name} must be at most 128 printable characters", param=name))
                self.run_id = value
                break
        self.request_id = headers.get("x-request-id", "")[:128] or self.reservation_id
        if self.run_id:
            try:  # a client may lower (never raise) its run's limits; the store keeps the lowest
                self.run_overrides = run_overrides_from_headers(headers) or None
            except BadRequest as e:
                return self._client_error(e)
        # Refuse now if a budget is already spent: the body need not be uploaded.
        eng = self.s.engine
        if ask_store:
            try:
                checked = await eng.check(self.policy, self.who, run_id=self.run_id, run_overrides=self.run_overrides)
            except StoreUnavailable as e:
                return self._store_down(e)
            if not checked.allowed:
                return self._early_refusal(checked, checked.blocked)
            return None
        recent = self.s.recent.get(self.who, self.run_id, eng.clock())
        if recent is not None:
            self.early = recent
            for i, (lim, st) in enumerate(zip(recent.limits, recent.states)):
                if exhausted_for_good(lim.line, st):
                    return self._early_refusal(recent, i)
        return None

    def _early_refusal(self, d: Decision, blocked: int | None) -> Reply:
        assert self.who is not None and blocked is not None
        refusal = replace(d, allowed=False, decision_id=uuid.uuid4().hex, blocked=blocked, hold=Hold(self.who.tag, self.reservation_id))
        lim = refusal.limits[blocked]
        metrics.DECISIONS.labels("block", lim.scope).inc()
        self.closed = True
        return Reply(immediate=render.refusal(self.envelope, refusal, self._headers(refusal), []))

    async def request_body(self, body: bytes) -> Reply:
        assert self.schema is not None and self.who is not None and self.route is not None
        policy = self.policy
        route_model = None
        if self.route.spec.model_param:  # the path names the model (Azure deployments)
            name = self.route.params[self.route.spec.model_param]
            route_model = policy.deployments.get(name, name)
        try:
            facts = self.schema.parse_request(body, max_bytes=policy.max_body_bytes, model=route_model)
            spec = policy.model(facts.model)
            if spec is None:
                raise UnknownModel(f"model {facts.model!r} has no price in this gateway's policy", param="model")
            missing = unpriced_tools(spec, facts.builtin_tools)
            if missing:
                raise ToolNotPriced(f"built-in tool(s) {', '.join(missing)} have no per-call price for {facts.model!r} in this gateway's policy", param="tools")
            self._media_tokens = media_tokens(facts, policy.inputs, api=self.schema.name)  # InputNotBounded: 400
        except ClientError as e:
            return self._client_error(e)
        self.requested_model = facts.model
        names = [facts.model]
        if policy.decisions.downshift and route_model is None:  # a path-named model cannot be re-routed
            names += [n for n in chain(policy, facts.model) if not unpriced_tools(policy.prices.models[n], facts.builtin_tools)]
        early = await self._refuse_from_size(facts, names, len(body))
        if early is not None:
            return early
        try:  # count each encoding once, off the event loop when large (estimate.TokenCounter)
            for enc in {policy.prices.models[n].encoding if n in policy.prices.models else spec.encoding for n in names}:
                self._counts[enc] = await self.s.counter.count_async(facts.segments, enc, owner=self.who.principal)
        except ClientError as e:
            return self._client_error(e, retry_after=1)
        requested = self._candidate(facts, facts.model)
        options = [requested]
        for name in names[1:]:
            c = self._candidate(facts, name)
            if not missing_capabilities(c.spec, facts, c.input_tokens, c.output_tokens):
                options.append(c)
        start = 0
        if len(options) > 1 and self.early is not None and _past_soft(self.early, requested.cost):
            start = 1  # past a soft threshold: go straight to the cheaper model
        held: Hold | None = None  # a hold taken before a later store call failed must be given back
        try:
            decision, chosen = await self._reserve_first_fit(options[start:])
            if decision.allowed and chosen is requested and len(options) > 1 and _past_soft(decision, 0):
                # this call crossed the soft threshold: move it to the cheaper model
                held = decision.hold
                cheaper, cheaper_choice = await self._reserve_first_fit(options[1:], first_attempt=1)
                if cheaper.allowed:
                    await self.s.engine.release(decision.hold)
                    decision, chosen = cheaper, cheaper_choice
                held = None
            if not decision.allowed and policy.decisions.output_clamp:
                decision, chosen = await self._try_clamp(facts, requested, decision)
        except StoreUnavailable as e:
            if held is not None:
                self.s.spawn(_release_later(self.s.engine, held))
            return self._store_down(e)
        self.s.recent.put(self.who, self.run_id, decision, self.s.engine.clock())
        self.decision, self.chosen = decision, chosen
        self._record(decision, chosen)
        outcome = render.decision_value(decision, self.clamped or chosen.name != self.requested_model)
        metrics.DECISIONS.labels(outcome, decision.blocking.scope if decision.blocking else "").inc()
        if decision.allowed:
            metrics.INFLIGHT.inc()
            for counts in self._counts.values():  # only allowed calls fill the token cache
                self.s.counter.remember(counts)
        if not decision.allowed:
            self.closed = True
            alternatives = self._alternatives(facts, decision)
            return Reply(immediate=render.refusal(self.envelope, decision, self._headers(decision), alternatives))
        reply = Reply()
        inject = facts.stream and not facts.include_usage and self.schema.include_usage_option
        new_model = chosen.name if chosen.name != facts.model else None
        # The backend must not outgrow what was reserved: forward the reserved cap per choice
        # whenever the request has none, or one above it (a clamp, a model's output limit).
        per_choice = chosen.output_tokens // max(1, facts.n)
        cap = per_choice if per_choice and (facts.max_output is None or facts.max_output > per_choice) else None
        if inject or new_model or cap:
            new = self.schema.rewrite_request(facts, model=new_model, include_usage=inject, max_output=cap)
            reply.body = new
            reply.set_headers.append(("content-length", str(len(new))))
        self._strip_usage = inject
        reply.set_headers.append((policy.decisions.route_header, chosen.name))
        reply.clear_route_cache = True  # the route keys on the model header (and the model may have changed)
        return reply

    async def _refuse_from_size(self, facts: RequestFacts, names: list[str], size: int) -> Reply | None:
        """A large body whose byte length alone proves it cannot fit is refused before any
        tokenizing (no token is longer than 128 bytes): one store check, only for large bodies."""
        if size < LARGE_BODY_BYTES:
            return None
        assert self.who is not None
        cheapest = min((self._candidate(facts, n, lower_bound=True) for n in names), key=lambda c: c.cost)
        try:
            checked = await self.s.engine.check(self.policy, self.who, run_id=self.run_id, estimate=cheapest.estimate, run_overrides=self.run_overrides)
        except StoreUnavailable as e:
            return self._store_down(e)
        if checked.allowed:
            return None
        self.chosen = cheapest
        return self._early_refusal(checked, checked.blocked)

    def _candidate(self, facts: RequestFacts, name: str, max_output: int | None = None, *, lower_bound: bool = False) -> Candidate:
        spec = self.policy.model(name)
        assert spec is not None
        text = lower_bound_tokens(facts.segments, spec.encoding) if lower_bound else self._counts[spec.encoding].tokens
        est = estimate(
            facts,
            text_tokens=text,
            encoding=spec.encoding,
            safety_factor=spec.token_safety_factor,
            output_limit=spec.output_limit,
            fallback_output=self.policy.fallback_output_tokens,
            media_tokens=self._media_tokens,
            context_window=spec.context_window,
            max_output_override=max_output,
        )
        live = self.s.rates.price_for_model(name) if self.s.rates is not None else None
        price = live or spec.price
        cost = price.cost(input_tokens=est.input_tokens, output_tokens=est.output_tokens) + tool_reserve(spec, facts.builtin_tools)
        return Candidate(name, spec, price, est.input_tokens, est.output_tokens, cost, "cost_rate" if live else "static")

    async def _reserve(self, c: Candidate, attempt: int) -> Decision:
        return await self._reserve_estimate(c.estimate, c.name, attempt)

    async def _reserve_estimate(self, estimate: Mapping[str, int], model: str, attempt: int) -> Decision:
        assert self.who is not None and self.route is not None
        rid = self.reservation_id if attempt == 0 else f"{self.reservation_id}.{attempt}"
        api = self.schema.name if self.schema is not None else f"flat:{self.route.spec.path}"
        with metrics.RESERVE_SECONDS.time():
            return await self.s.engine.reserve(
                self.policy,
                self.who,
                run_id=self.run_id,
                reservation_id=rid,
                estimate=estimate,
                meta={"model": model, "requested_model": self.requested_model, "api": api, "request_id": self.request_id},
                run_overrides=self.run_overrides,
            )

    async def _reserve_flat(self, price: str) -> Reply:
        """A flat-priced route: reserve its price now (no body is read) and settle it on a 2xx."""
        assert self.route is not None
        try:
            decision = await self._reserve_estimate({"cost": usd_to_nano(price), "requests": 1}, "", 0)
        except StoreUnavailable as e:
            return self._store_down(e)
        self.decision, self.flat = decision, True
        metrics.DECISIONS.labels(render.decision_value(decision, False), decision.blocking.scope if decision.blocking else "").inc()
        if not decision.allowed:
            self.closed = True
            return Reply(immediate=render.refusal(self.envelope, decision, self._headers(decision), []))
        metrics.INFLIGHT.inc()
        return Reply(headers_only=True)

    async def _reserve_first_fit(self, options: list[Candidate], first_attempt: int = 0) -> tuple[Decision, Candidate]:
        """Try each model in order; stop at the first that fits or at a refusal a cheaper model cannot fix."""
        decision: Decision | None = None
        for attempt, c in enumerate(options):
            decision = await self._reserve(c, first_attempt + attempt)
            if decision.allowed:
                return decision, c
            blocking = decision.blocking
            if blocking is None or blocking.spec.dimension not in ("cost", "input_tokens", "output_tokens", "total_tokens"):
                break
        assert decision is not None
        return decision, options[min(attempt, len(options) - 1)]

    async def _try_clamp(self, facts: RequestFacts, requested: Candidate, refused: Decision) -> tuple[Decision, Candidate]:
        """Lower max output to what the blocking budget still affords (opt-in)."""
        b, idx = refused.blocking, refused.blocked
        if b is None or idx is None:
            return refused, requested
        st = refused.states[idx]
        remaining = max(0, st.remaining)
        n = max(1, facts.n)
        if b.spec.dimension == "cost":
            per_choice = affordable_output(requested.spec, requested.price, requested.input_tokens, remaining, n)
        elif b.spec.dimension == "output_tokens":
            per_choice = remaining // n
        elif b.spec.dimension == "total_tokens":
            per_choice = (remaining - requested.input_tokens) // n
        else:
            return refused, requested
        if per_choice < self.policy.decisions.min_clamped_output_tokens:
            return refused, requested
        clamped = self._candidate(facts, requested.name, max_output=per_choice)
        decision = await self._reserve(clamped, 9)
        if decision.allowed:
            self.clamped = True
            return decision, clamped
        return refused, requested

    def _alternatives(self, facts: RequestFacts, d: Decision) -> list[dict[str, Any]]:
        """Cheaper models an agent could ask for instead, with whether they fit now."""
        remaining = min((max(0, st.remaining) for lim, st in zip(d.limits, d.states) if lim.spec.dimension == "cost"), default=None)
        out = []
        for name in chain(self.policy, facts.model):
            c = self._candidate(facts, name)
            missing = missing_capabilities(c.spec, facts, c.input_tokens, c.output_tokens)
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

    def _record(self, d: Decision, c: Candidate) -> None:
        """Keep what the decision was made from; rendered only if someone looks it up."""
        assert self.who is not None
        self.s.decisions.add(
            d.decision_id,
            (self.who.principal, self.run_id, self.requested_model, c, d, self.clamped, self.policy.prices.version),
        )

    # -- response --------------------------------------------------------------

    async def response_headers(self, headers: Mapping[str, str]) -> Reply:
        self.response_started = True
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        if self.fail_open:
            return Reply(set_headers=[(H.DECISION, "allow"), (H.FAILURE_MODE, "fail_open")], skip_response_body=True)
        if self.decision is None or self.closed:
            return Reply(skip_response_body=True)
        reply = Reply(set_headers=self._headers(self.decision))
        if self.flat:  # no body to read: the status decides
            if 200 <= self.status < 300:
                cost = await self._settle(None, source="flat")
                reply.set_headers.append((H.COST, nano_to_usd(cost)))
                reply.metadata = self._metadata(cost)
            else:
                await self._release()
            return reply
        if self.s.rates is not None and self.chosen is not None:
            reply.set_headers += self.s.rates.headers_for_model(self.chosen.name)
        if not 200 <= self.status < 300:
            await self._release()
            reply.skip_response_body = True
            return reply
        self.content_encoding = headers.get("content-encoding")
        if "text/event-stream" in headers.get("content-type", ""):
            assert self.schema is not None and self.chosen is not None
            enc = self.chosen.spec.encoding
            counter = self.s.counter
            self.reader = self.schema.stream_reader(
                strip_usage_chunk=self._strip_usage,
                count_tokens=lambda t: counter.count(t, enc),
                content_encoding=self.content_encoding,
            )
            reply.stream_response = True
        return reply

    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Reply:
        if self.decision is None or self.closed:
            return Reply()
        assert self.schema is not None
        if self.reader is None:  # buffered JSON
            try:
                usage = self.schema.usage_from_body(chunk, content_encoding=self.content_encoding)
            except UpstreamError as e:
                log.warning("unparseable response body for %s: %s; charging the reservation", self.request_id, e)
                usage = None
            cost = await self._settle(usage, source="body" if usage else "estimate")
            return Reply(set_headers=[(H.COST, nano_to_usd(cost))], metadata=self._metadata(cost))
        try:
            out = self.reader.feed(chunk)
            if end_of_stream:
                out = out + self.reader.finish()
        except UpstreamError as e:
            log.warning("stream parse error for %s: %s", self.request_id, e)
            out = chunk
        if not end_of_stream:
            return Reply(body=None if out is chunk else out)
        if self.reader.malformed_events:  # never silent: a skipped frame could be unbilled spend
            log.warning(
                "stream %s had %d malformed event(s): %s", self.request_id, self.reader.malformed_events, self.reader.last_error
            )
        cost = await self._settle_stream(ended=True)
        if self.reader.may_rewrite:  # never inside a compressed body
            out = out + f": {H.COST}={nano_to_usd(cost)}\n\n".encode()
        return Reply(body=out, metadata=self._metadata(cost))

    async def close(self) -> None:
        """The stream ended. If the call was served but never settled, charge what was observed:
        the usage already parsed (an SDK that hangs up at [DONE] beats the end of the body),
        else the lost-usage rule (engine/pricing.py)."""
        if self.decision is None or self.closed:
            return
        if self.response_started and not 200 <= self.status < 300:
            await self._release()
            return
        await self._settle_stream(ended=False)

    async def _settle_stream(self, *, ended: bool) -> int:
        reader, chosen = self.reader, self.chosen
        if chosen is None or reader is None:  # gone before any response body: input estimate
            return await self._settle(self._counted_usage(), source="aborted")
        if reader.decode_error is not None and reader.usage is None:
            log.warning("stream %s could not be decoded (%s); charging the reservation", self.request_id, reader.decode_error)
            return await self._settle(None, source="undecodable")
        plan = settlement(
            seen=reader.usage,
            complete=reader.usage_complete or (ended and reader.usage is not None),
            counted=self._counted_usage(),
            reasoning=chosen.spec.reasoning,
        )
        source = plan.source if ended or plan.source == "stream" else f"aborted_{plan.source}"
        return await self._settle(plan.usage, source=source)

    # -- helpers ---------------------------------------------------------------

    def _counted_usage(self) -> Usage:
        c = self.chosen
        counted = Usage(input_tokens=c.input_tokens if c else 0)
        if self.reader is None:
            return counted
        return counted.plus(Usage(output_tokens=self.reader.counted_output_tokens)).plus(self.reader.tool_calls)

    async def _settle(self, usage: Usage | None, *, source: str) -> int:
        """Charge `usage` (None → the reserved worst case). Returns the cost charged."""
        assert self.decision is not None
        self.closed = True
        if usage is None or self.chosen is None:
            charge = dict(self.decision.reserved)
        else:
            cost = usage_cost(self.chosen.spec, self.chosen.price, usage)
            charge = {"cost": cost, "input_tokens": usage.total_input, "output_tokens": usage.output_tokens, "requests": 1}
        meta: dict[str, Any] = {"usage_source": source, "status": self.status}
        if self.chosen is not None:
            p = self.chosen.price
            meta["price_source"] = self.chosen.price_source
            meta["price_pico_usd_per_token"] = {"input": p.input, "output": p.output, "cached_input": p.cached_input, "cache_write": p.cache_write}
        if usage is not None:
            meta["usage"] = ledger_usage(usage)
        reserved_cost = self.decision.reserved.get("cost", 0)
        if charge.get("cost", 0) > reserved_cost:  # the backend outgrew the reservation
            meta["overrun"] = charge["cost"] - reserved_cost
            metrics.OVERRUNS.inc()
            log.warning("%s charged %s USD above its reservation", self.request_id, nano_to_usd(meta["overrun"]))
        self.cost = charge["cost"]
        metrics.INFLIGHT.dec()
        reserved = self.decision.reserved.get("cost", 0)
        if reserved:
            metrics.ESTIMATE_RATIO.observe(charge["cost"] / reserved)
        t0 = time.perf_counter()
        try:
            result = await self.s.engine.settle(self.decision.hold, charge, meta)
        except StoreUnavailable as e:
            metrics.STORE_ERRORS.labels("settle").inc()
            log.error("settle of %s failed (%s); retrying in background", self.decision.hold.reservation_id, e)
            self.s.spawn(_settle_later(self.s.engine, self.decision.hold, charge, meta))
            return charge["cost"]
        metrics.SETTLE_SECONDS.observe(time.perf_counter() - t0)
        if not result.replayed:
            for lim in self.decision.limits:
                if lim.spec.dimension == "cost" and lim.scope != "run":
                    metrics.SPEND.labels(lim.budget).inc(result.charged.get("cost", 0))
        return result.charged.get("cost", 0)

    async def _release(self) -> None:
        assert self.decision is not None
        self.closed = True
        metrics.INFLIGHT.dec()
        try:
            await self.s.engine.release(self.decision.hold)
        except StoreUnavailable as e:
            metrics.STORE_ERRORS.labels("release").inc()
            log.error("release of %s failed (%s); it will expire at its TTL", self.decision.hold.reservation_id, e)

    def _headers(self, d: Decision) -> list[tuple[str, str]]:
        return render.state_headers(
            d,
            now_ms=self.s.engine.clock(),
            price_version=self.policy.prices.version,
            run_id=self.run_id,
            requested_model=self.requested_model,
            selected_model=self.chosen.name if self.chosen else self.requested_model,
            clamped=self.clamped,
        )

    def _metadata(self, cost: int) -> dict[str, Any]:
        d = self.decision
        tight = d.tightest("cost") if d else None
        return {
            "cost_usd": nano_to_usd(cost),
            "scope": tight[0].budget if tight else "",
            "principal": self.who.principal if self.who else "",
            "model": self.chosen.name if self.chosen else "",
            "decision_id": d.decision_id if d else "",
        }

    async def _budget_endpoint(self, path: str, headers: Mapping[str, str], peer_id: str | None) -> Reply:
        try:
            who = identity.resolve(self.policy, headers, peer_id, caller_authenticated=self.caller_authenticated)
        except Unauthenticated as e:
            return self._client_error(e)
        if "/decisions/" in path:
            rec = self.s.decisions.get(path.rsplit("/", 1)[1])
            if rec is None or rec["principal"] != who.principal:
                body = error_body("openai", status=404, message="no such decision", type="invalid_request_error", code="not_found")
                return self._json(404, body)
            return self._json(200, json.dumps(rec).encode())
        run_id = next((headers[h] for h in self.policy.runs.headers if headers.get(h)), None)
        try:
            snap = await self.s.engine.snapshot_lines(self.policy, who, run_id=run_id)
        except StoreUnavailable as e:
            return self._store_down(e)
        doc = {
            "principal": who.principal,
            "team": who.team,
            "org": who.org,
            "run": run_id,
            "price_table_version": self.policy.prices.version,
            "budgets": render.budget_rows(snap.limits, snap.states, snap.now_ms),
        }
        return self._json(200, json.dumps(doc).encode())

    def _json(self, status: int, body: bytes, extra: list[tuple[str, str]] | None = None) -> Reply:
        return Reply(immediate=Immediate(status, (("content-type", "application/json"), *(extra or [])), body))

    def _client_error(self, e: ClientError, retry_after: int | None = None) -> Reply:
        self.closed = True
        body = error_body(self.envelope, status=e.status, message=e.message, type=e.type, code=e.code, param=e.param)
        return self._json(e.status, body, [("retry-after", str(retry_after))] if retry_after else None)

    def _store_down(self, e: StoreUnavailable) -> Reply:
        self.closed = True
        metrics.STORE_ERRORS.labels("reserve").inc()
        if self.policy.failure_mode == "fail_open":
            if not self.fail_open:
                metrics.FAIL_OPEN.inc()
                log.error("budget store unavailable, letting %s through unmetered (failure_mode fail_open): %s", self.request_id, e)
            self.fail_open = True
            return Reply()
        log.error("budget store unavailable, refusing %s (fail closed): %s", self.request_id, e)
        body = error_body(
            self.envelope,
            status=503,
            message="The budget service cannot reach its store; the request was not sent (fail closed).",
            type="server_error",
            code="budget_store_unavailable",
        )
        return self._json(503, body, [(H.DECISION, "block"), ("retry-after", "1")])


async def _settle_later(engine: Engine, hold: Hold, charge: Mapping[str, int], meta: Mapping[str, Any]) -> None:
    """Retry a settle the store refused; the reservation's TTL is the backstop."""
    await _retry(lambda: engine.settle(hold, charge, meta), f"settling {hold.reservation_id}")


async def _release_later(engine: Engine, hold: Hold) -> None:
    """Give back a hold of a request that will never run (the store failed after it was taken)."""
    await _retry(lambda: engine.release(hold), f"releasing {hold.reservation_id}", delay=0.0)


async def _retry(op: Callable[[], Awaitable[Any]], what: str, *, delay: float = 0.2) -> None:
    for _ in range(12):
        await asyncio.sleep(delay)
        try:
            await op()
            return
        except StoreUnavailable:
            delay = min(max(delay, 0.1) * 2, 10.0)
    log.error("giving up %s; the reaper will expire it at the reserved amount", what)
