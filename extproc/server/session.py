"""One ext_proc stream = one HTTP request: headers → body → response → end.

The session holds the request's facts, its reservation and its stream reader,
and answers each phase with a `Reply`. It never sees protobuf or sockets.
Every path that reserved money ends in exactly one of settle, release or (if
this process dies) expiry by the store's reaper.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..engine.budget import Decision, Engine, Identity
from ..errors import BadRequest, ClientError, StoreUnavailable, Unauthenticated, UnknownModel, UpstreamError
from ..estimate import Estimate, TokenCounter, estimate
from ..money import nano_to_usd
from ..policy.loader import PolicyHolder
from ..policy.model import ModelSpec, Policy
from ..protocols.envelopes import error_body
from ..protocols.schemas import Schema, schema_for_path
from ..protocols.usage import Usage
from . import headers as H
from .reply import Immediate, Reply

log = logging.getLogger("extproc.session")


@dataclass
class Services:
    """What every session shares: policy snapshot source, engine, token cache, background tasks."""

    policy: PolicyHolder
    engine: Engine
    counter: TokenCounter = field(default_factory=TokenCounter)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def _api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


class Session:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.policy: Policy = services.policy.current  # one snapshot for the whole request
        self.schema: Schema | None = None
        self.envelope = "openai"
        self.who: Identity | None = None
        self.run_id: str | None = None
        self.request_id: str | None = None
        self.model: ModelSpec | None = None
        self.model_name = ""
        self.estimate: Estimate | None = None
        self.decision: Decision | None = None
        self.reader: Any = None
        self.closed = False  # settled or released
        self.response_started = False
        self.status = 0
        self._strip_usage = False  # we injected include_usage, so hide the usage chunk

    # -- request ---------------------------------------------------------------

    async def request_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> Reply:
        path = headers.get(":path", "")
        self.schema = schema_for_path(path)
        if self.schema is None or headers.get(":method", "POST") != "POST":
            return Reply(skip_rest=True)
        self.envelope = self.schema.envelope
        key = _api_key(headers)
        spec = self.policy.keys_by_hash.get(_sha256(key)) if key else None
        if spec is None:
            return self._client_error(Unauthenticated("missing API key" if key is None else "unknown API key"))
        self.who = Identity.from_key(spec)
        for name in self.policy.runs.headers:
            if headers.get(name):
                self.run_id = headers[name][:128]
                break
        self.request_id = headers.get("x-request-id") or uuid.uuid4().hex
        if end_of_stream:
            return self._client_error(BadRequest("request body is required"))
        return Reply()

    async def request_body(self, body: bytes) -> Reply:
        assert self.schema is not None and self.who is not None
        policy = self.policy
        try:
            facts = self.schema.parse_request(body, max_bytes=policy.max_body_bytes)
            model = policy.prices.models.get(facts.model)
            if model is None:
                raise UnknownModel(f"model {facts.model!r} has no price in this gateway's policy", param="model")
        except ClientError as e:
            return self._client_error(e)
        self.model, self.model_name = model, facts.model
        est = estimate(
            facts,
            counter=self.s.counter,
            encoding=model.encoding,
            safety_factor=model.token_safety_factor,
            output_limit=model.output_limit,
            fallback_output=policy.fallback_output_tokens,
            image_tokens=policy.image_tokens,
        )
        self.estimate = est
        cost = model.price.cost(input_tokens=est.input_tokens, output_tokens=est.output_tokens)
        try:
            decision = await self.s.engine.reserve(
                policy,
                self.who,
                run_id=self.run_id,
                reservation_id=self.request_id,
                estimate={"cost": cost, "input_tokens": est.input_tokens, "output_tokens": est.output_tokens, "requests": 1},
                meta={"model": facts.model, "api": self.schema.name, "request_id": self.request_id},
            )
        except StoreUnavailable as e:
            return self._store_down(e)
        self.decision = decision
        if not decision.allowed:
            self.closed = True
            return self._refusal(decision)
        reply = Reply()
        inject = self.schema.streams and facts.stream and not facts.include_usage and self.schema.name in ("openai.chat", "openai.completions")
        if inject:
            new = self.schema.rewrite_request(facts, include_usage=True)
            reply.body = new
            reply.set_headers.append(("content-length", str(len(new))))
        self._strip_usage = inject
        return reply

    # -- response --------------------------------------------------------------

    async def response_headers(self, headers: Mapping[str, str]) -> Reply:
        self.response_started = True
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        reply = Reply(set_headers=self._state_headers())
        if self.decision is None or self.closed:
            reply.skip_response_body = True
            return reply
        if not 200 <= self.status < 300:
            await self._release()
            reply.skip_response_body = True
            return reply
        if "text/event-stream" in headers.get("content-type", ""):
            assert self.schema is not None and self.model is not None
            enc = self.model.encoding
            counter = self.s.counter
            self.reader = self.schema.stream_reader(
                strip_usage_chunk=self._strip_usage, count_tokens=lambda t: counter.count(t, enc)
            )
            reply.stream_response = True
        return reply

    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Reply:
        if self.decision is None or self.closed:
            return Reply()
        assert self.schema is not None
        if self.reader is None:  # buffered JSON
            try:
                usage = self.schema.usage_from_body(chunk)
            except UpstreamError as e:
                log.warning("unparseable response body for %s: %s; charging the reservation", self.request_id, e)
                usage = None
            cost = await self._settle(usage, source="body" if usage else "estimate")
            return Reply(set_headers=[] if cost is None else [(H.COST, nano_to_usd(cost))])
        try:
            out = self.reader.feed(chunk)
            if end_of_stream:
                out = out + self.reader.finish()
        except UpstreamError as e:
            log.warning("stream parse error for %s: %s", self.request_id, e)
            out = chunk
        if not end_of_stream:
            return Reply(body=None if out is chunk else out)
        usage = self.reader.usage
        cost = await self._settle(usage if usage is not None else self._counted_usage(), source="stream" if usage else "counted")
        if cost is not None:
            out = out + f": {H.COST}={nano_to_usd(cost)}\n\n".encode()
        return Reply(body=out)

    async def close(self) -> None:
        """The stream ended. If the call was served but never settled, charge what was observed."""
        if self.decision is None or self.closed:
            return
        if self.response_started and not 200 <= self.status < 300:
            await self._release()
            return
        usage = self._counted_usage()
        await self._settle(usage, source="aborted")

    # -- helpers ---------------------------------------------------------------

    def _counted_usage(self) -> Usage:
        est = self.estimate
        out = self.reader.counted_output_tokens if self.reader is not None else 0
        return Usage(input_tokens=est.input_tokens if est else 0, output_tokens=out)

    async def _settle(self, usage: Usage | None, *, source: str) -> int | None:
        """Charge `usage` (None → the reserved worst case). Returns the cost charged."""
        assert self.decision is not None and self.model is not None
        self.closed = True
        if usage is None:
            charge = dict(self.decision.reserved)
        else:
            cost = self.model.price.cost(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            )
            charge = {"cost": cost, "input_tokens": usage.total_input, "output_tokens": usage.output_tokens, "requests": 1}
        meta = {"usage_source": source, "status": self.status}
        try:
            result = await self.s.engine.settle(self.decision.hold, charge, meta)
        except StoreUnavailable as e:
            log.error("settle of %s failed (%s); retrying in background", self.decision.hold.reservation_id, e)
            self.s.spawn(_settle_later(self.s.engine, self.decision.hold, charge, meta))
            return charge["cost"]
        return result.charged.get("cost", 0)

    async def _release(self) -> None:
        assert self.decision is not None
        self.closed = True
        try:
            await self.s.engine.release(self.decision.hold)
        except StoreUnavailable as e:
            log.error("release of %s failed (%s); it will expire at its TTL", self.decision.hold.reservation_id, e)

    def _state_headers(self) -> list[tuple[str, str]]:
        d = self.decision
        if d is None:
            return []
        out = [
            (H.DECISION, "allow" if d.allowed and not d.warned else ("advisory_warn" if d.allowed else "block")),
            (H.DECISION_ID, d.decision_id),
            (H.RESERVATION_ID, d.hold.reservation_id),
            (H.MODE, d.mode.value),
            (H.RESERVED, nano_to_usd(d.reserved.get("cost", 0))),
            (H.PRICE_VERSION, self.policy.prices.version),
        ]
        tight = d.tightest("cost")
        if tight is not None:
            lim, st = tight
            out += [
                (H.SCOPE, lim.budget),
                (H.LIMIT, nano_to_usd(st.limit)),
                (H.SPENT, nano_to_usd(st.spent)),
                (H.REMAINING, nano_to_usd(max(0, st.remaining))),
            ]
        if self.run_id:
            out.append((H.RUN_ID, self.run_id))
        return out

    def _immediate(self, status: int, body: bytes, extra: list[tuple[str, str]]) -> Reply:
        hdrs = [("content-type", "application/json"), *extra]
        return Reply(immediate=Immediate(status, tuple(hdrs), body))

    def _client_error(self, e: ClientError) -> Reply:
        body = error_body(self.envelope, status=e.status, message=e.message, type=e.type, code=e.code, param=e.param)
        return self._immediate(e.status, body, [])

    def _store_down(self, e: StoreUnavailable) -> Reply:
        log.error("budget store unavailable: %s", e)
        body = error_body(
            self.envelope,
            status=503,
            message="The budget service cannot reach its store; the request was not sent (fail closed).",
            type="server_error",
            code="budget_store_unavailable",
        )
        return self._immediate(503, body, [(H.DECISION, "block"), ("retry-after", "1")])

    def _refusal(self, d: Decision) -> Reply:
        blocking = d.blocking
        assert blocking is not None and d.blocked is not None
        st = d.states[d.blocked]
        code = d.refusal_code
        unit = blocking.spec.dimension
        fmt = nano_to_usd if unit == "cost" else str
        budget = {
            "scope": blocking.budget,
            "dimension": unit,
            "window": blocking.spec.window,
            "limit": fmt(st.limit),
            "spent": fmt(st.spent),
            "reserved": fmt(st.reserved),
            "remaining": fmt(max(0, st.remaining)),
            "requested": fmt(blocking.line.amount),
            "reset_at_ms": blocking.reset_ms,
            "retry_after_ms": d.retry_after_ms,
            "decision_id": d.decision_id,
        }
        msg = (
            f"Budget {blocking.budget} cannot cover this request: {unit} limit {fmt(st.limit)}, "
            f"spent {fmt(st.spent)}, reserved {fmt(st.reserved)}, this request needs up to {fmt(blocking.line.amount)}."
        )
        body = error_body(self.envelope, status=429, message=msg, type=code, code=code, budget=budget)
        extra = self._state_headers() + [(H.BLOCKING_SCOPE, blocking.budget)]
        if code == "rate_limit_exceeded":
            secs = max(1, -(-(d.retry_after_ms or 1000) // 1000))
            extra.append(("retry-after", str(secs)))
        else:
            extra.append((H.SHOULD_RETRY, "false"))
        return self._immediate(429, body, extra)


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def _settle_later(engine: Engine, hold: Any, charge: Mapping[str, int], meta: Mapping[str, Any]) -> None:
    """Retry a settle the store refused; the reservation's TTL is the backstop."""
    delay = 0.2
    for _ in range(12):
        await asyncio.sleep(delay)
        try:
            await engine.settle(hold, charge, meta)
            return
        except StoreUnavailable:
            delay = min(delay * 2, 10.0)
    log.error("giving up settling %s; the reaper will expire it at the reserved amount", hold.reservation_id)
