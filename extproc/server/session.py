"""One ext_proc stream = one HTTP request: phases in, engine calls, replies out.

The session only maps Envoy's phases (lifecycle.py) to engine calls and the
engine's answers to `Reply`s; it judges no budget state itself. A request walks
down the layers: the path and body are read by `protocols`, the caller by
`identity`, the model and reservation are chosen by `engine.calls.Planner`,
and the one hold a call owns is settled or released exactly once by
`engine.holds.CallHold`. It never sees protobuf or sockets.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..engine.budget import Decision
from ..engine.calls import Plan, Planner
from ..engine.holds import CallHold, Settled
from ..errors import BadRequest, ClientError, RouteDenied, StoreUnavailable, UpstreamError
from ..estimate import CountingBusy, Counts
from ..money import nano_to_usd, usd_to_nano
from ..protocols.usage import Usage
from . import answer, budget_endpoint, metrics, render
from . import headers as H
from .answer import StreamedAnswer
from .gate import Gate, log
from .lifecycle import Phase, advance
from .reply import Reply
from .services import Services

LARGE_BODY_BYTES = 256 * 1024  # above this, bound the request by its bytes before tokenizing it


class Session(Gate):
    def __init__(self, services: Services, *, caller_authenticated: bool = False) -> None:
        super().__init__(services, caller_authenticated=caller_authenticated)
        self.hold: CallHold | None = None
        self.answer: StreamedAnswer | None = None  # an answer that passes as a stream
        self.upstream_stream, self.strip_usage, self.status = False, False, 0  # JSON streamed upstream; usage chunk ours; status
        self.content_encoding: str | None = None
        self.cost_source = ""  # the settled charge's usage_source
        self.later: list[Callable[[], None]] = []  # what the caller need not wait for (after_reply)

    async def request_headers(self, headers: Mapping[str, str], end_of_stream: bool, peer_id: str | None = None) -> Reply:
        """Closed world: the normalised path must be a route of the policy, which says whether the
        call is metered, flat-priced, unmetered, public or denied."""
        self.phase = advance(self.phase, Phase.REQUEST_HEADERS)
        path = self._path(headers)
        if isinstance(path, Reply):
            return path
        if budget_endpoint.is_budget_path(self.policy, headers.get(":method", ""), path.path):
            answer = await budget_endpoint.answer(self.s, self.policy, path.path, headers, peer_id, authenticated=self.authenticated)
            return self._done(answer)
        route = self._route(path, headers.get(":method", ""))
        if isinstance(route, Reply):
            return route
        action = route.spec.action
        if action == "deny":
            return self._refuse(RouteDenied(f"{path.path} is not served through this gateway: {route.spec.note or 'denied by policy'}"))
        # Forward exactly the path that was matched, marked as classified: Envoy routes only marked requests.
        target = route.path + ("?" + path.query if path.query else "")
        let_through = [(H.VERDICT, action)] + ([(":path", target)] if target != path.raw else [])
        if action == "public":
            return Reply(set_headers=let_through, clear_route_cache=True, skip_rest=True)
        refused = await self.gate(headers, peer_id, ask_store=False)
        if refused is not None:
            return refused
        if action == "unmetered":
            return Reply(set_headers=let_through, clear_route_cache=True, skip_rest=True)
        if action == "flat":
            reply = await self._reserve_flat(usd_to_nano(route.spec.price or "0"))
        elif end_of_stream:
            return self._refuse(BadRequest("request body is required"))
        else:  # usage must be readable: a body compressed anyway is decoded on the side
            reply = Reply(set_headers=[("accept-encoding", "identity")])
        if reply.immediate is None:
            reply.set_headers += let_through
            reply.clear_route_cache = True
        return reply

    async def request_body(self, body: bytes) -> Reply:
        self.phase = advance(self.phase, Phase.REQUEST_BODY)
        assert self.schema is not None and self.caller is not None and self.route is not None
        policy, caller = self.policy, self.caller
        param = self.route.spec.model_param
        route_model = policy.deployments.get(self.route.params[param], self.route.params[param]) if param else None
        parse = functools.partial(self.schema.parse_request, body, max_bytes=policy.max_body_bytes, model=route_model)
        large = len(body) >= LARGE_BODY_BYTES
        try:  # a multi-megabyte body is parsed off the event loop, one at a time per caller
            facts = await self.s.counter.run_large(caller.who.principal, parse) if large else parse()
            call = Planner.call_input(policy, facts, api=self.schema.name)  # priced model, tools, bounded media
        except ClientError as e:
            return self._refuse(e, retry_after=1 if isinstance(e, CountingBusy) else None)
        planner = self.s.planner(policy, caller.who.principal)
        names = planner.models(facts, downshift=route_model is None)  # a path-named model cannot be re-routed
        try:
            if large and (too_big := await planner.refused_by_size(call, names, caller)) is not None:
                return self._early_refusal(too_big, too_big.blocked)
            counts: dict[str, Counts] = {}
            for enc in planner.encodings(names):  # once per encoding, large counts off the event loop
                counts[enc] = await self.s.counter.count_async(facts.segments, enc, owner=caller.who.principal)
            call = replace(call, text_tokens={enc: c.tokens for enc, c in counts.items()})
            self.plan = plan = await metrics.reserving(planner.plan(call, caller, api=self.schema.name, downshift=route_model is None))
        except ClientError as e:  # CountingBusy: this caller has too much counting queued
            return self._refuse(e, retry_after=1)
        except StoreUnavailable as e:
            return self._store_down(e)
        self.later.append(functools.partial(self.s.decided, policy, caller, plan, counts.values()))
        if (refused := self._decided(plan.decision, plan.changed, plan.alternatives)) is not None:
            return refused
        self.hold = CallHold(self.s.engine, plan.decision, plan.chosen, self.s.spawn, policy)
        return self._forward(plan)

    def _forward(self, plan: Plan) -> Reply:
        """The body the backend gets: the chosen model, include_usage for streams, and the reserved
        output cap whenever the request has none or a larger one (it must not outgrow its hold)."""
        assert self.schema is not None
        facts, chosen = plan.facts, plan.chosen
        self.strip_usage = inject = facts.stream and not facts.include_usage and self.schema.include_usage_option
        self.upstream_stream = upstream = not facts.stream and chosen.right_sized  # JSON assembled from a stream
        new_model = chosen.name if chosen.name != facts.model else None
        per_choice = chosen.output_cap // max(1, facts.n)
        cap = per_choice if per_choice and (facts.max_output is None or facts.max_output > per_choice) else None
        reply = Reply(set_headers=[(self.policy.decisions.route_header, chosen.name)], clear_route_cache=True)
        if inject or new_model or cap or upstream:
            reply.body = self.schema.rewrite_request(facts, model=new_model, include_usage=inject, max_output=cap, stream=upstream or None)
            reply.set_headers.append(("content-length", str(len(reply.body))))
        return reply

    async def _reserve_flat(self, cost: int) -> Reply:
        """A flat-priced route: reserve its price now (no body is read); the status settles it."""
        assert self.caller is not None and self.route is not None
        try:
            d = await metrics.reserving(self.s.planner(self.policy).reserve_flat(self.caller, cost, api=f"flat:{self.route.spec.path}"))
        except StoreUnavailable as e:
            return self._store_down(e)
        if (refused := self._decided(d, False, [])) is not None:
            return refused
        self.hold = CallHold(self.s.engine, d, None, self.s.spawn)
        return Reply(headers_only=True)

    def _decided(self, d: Decision, changed: bool, alternatives: list[dict[str, Any]]) -> Reply | None:
        """Count the decision; a refusal is answered now in the caller's envelope."""
        metrics.decided(render.decision_value(d, changed), d.blocking.scope if d.blocking else "")
        if not d.allowed:
            return self._done(Reply(immediate=render.refusal(self.envelope, d, self._headers(d), alternatives)))
        metrics.held()
        return None

    async def response_headers(self, headers: Mapping[str, str]) -> Reply:
        self.phase = advance(self.phase, Phase.RESPONSE_HEADERS)
        self.status = int(headers.get(":status", "0")) if headers.get(":status", "").isdigit() else 0
        if self.fail_open:
            return Reply(set_headers=[(H.DECISION, "allow"), (H.FAILURE_MODE, "fail_open")], skip_response_body=True)
        if self.hold is None or not self.hold.open:
            return Reply(skip_response_body=True)
        reply = Reply(set_headers=self._headers(self.hold.decision))
        if not 200 <= self.status < 300:
            await self._release()
            reply.skip_response_body = True
            return reply
        if self.hold.chosen is None:  # flat-priced: the status was all there was to read
            cost = await self._settle(None, source="flat")
            reply.set_headers.append((H.COST, nano_to_usd(cost)))
            reply.metadata = self._metadata(cost)
            return reply
        chosen = self.hold.chosen
        if self.s.rates is not None:
            reply.set_headers += self.s.rates.headers_for_model(chosen.name)
        self.content_encoding = headers.get("content-encoding")
        if "text/event-stream" in headers.get("content-type", "") and self.schema is not None and self.plan is not None:
            self.answer = answer.open(self.s, self.policy, self.schema, self.hold, self.plan, self.strip_usage, self.content_encoding)
            reply.stream_response = True
            if self.upstream_stream:  # the client asked for JSON: the body assembled from the (decoded) stream
                reply.set_headers += [("content-type", "application/json"), ("content-encoding", "identity")]
        return reply

    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Reply:
        self.phase = advance(self.phase, Phase.RESPONSE_BODY)
        if self.hold is None or not self.hold.open or self.schema is None:
            return Reply()
        if self.answer is None:  # buffered JSON
            try:
                usage = self.schema.usage_from_body(chunk, content_encoding=self.content_encoding)
            except UpstreamError as e:
                log.warning("unparseable response body for %s: %s; charging the reservation", self.reservation_id, e)
                usage = None
            cost = await self._settle(usage, source="body" if usage else "estimate", last=end_of_stream)
            return Reply(set_headers=[(H.COST, nano_to_usd(cost)), (H.COST_SOURCE, self.cost_source)], metadata=self._metadata(cost))
        if not end_of_stream:
            piece = await self.answer.chunk(chunk)
            if piece.cut is None:
                return Reply(body=piece.body)
            cost = await self._settle(piece.usage, source="cut", last=True)
            return Reply(body=piece.body, end_stream=True, metadata=self._metadata(cost))
        out = self.answer.last(chunk, self.reservation_id)
        cost = await self._settle(*self.hold.stream_outcome(self.answer.reader, ended=True), last=True)
        return Reply(body=out + self.answer.cost_comment(cost, self.cost_source), metadata=self._metadata(cost))

    async def close(self) -> None:
        """The stream ended. A charge a last reply told is booked now; a hold still open is released
        (non-2xx) or charged what was observed: the usage already parsed (an SDK that hangs up at
        [DONE]), else the lost-usage rule."""
        self.phase = Phase.DONE
        self.after_reply()
        if self.hold is not None and self.hold.pending is not None:  # told to the caller, the store takes it now
            await self._book()
        if self.hold is None or not self.hold.open:
            return
        if self.status and not 200 <= self.status < 300:
            await self._release()
        else:
            await self._settle(*self.hold.stream_outcome(self.answer.reader if self.answer else None, ended=False))

    async def _settle(self, usage: Usage | None, source: str, *, last: bool = False) -> int:
        """Charge `usage` (None: the reservation): the cost the caller is told. `last`: told by the
        stream's last reply, so booked in `close`, just after it left (README, "What is charged")."""
        assert self.hold is not None
        self.cost_source, self.phase = source, Phase.DONE
        due = await self.hold.due(usage, source=source, status=self.status)
        if due is None:
            return 0
        if last and self.hold.may_book_later(self.policy.reservation_ttl_seconds * 1000):
            return due.cost
        return (await self._book() or due).cost

    async def _book(self) -> Settled | None:
        assert self.hold is not None
        t0, done = time.perf_counter(), await self.hold.book()
        if done is not None:
            self.s.settled(self.policy, self.caller, self.plan, self.hold.decision, done, self.cost_source, t0)
        return done

    async def _release(self) -> None:
        assert self.hold is not None
        if await self.hold.release():
            metrics.released()
        self.phase = Phase.DONE

    def after_reply(self) -> None:
        while self.later:
            self.later.pop(0)()

    def _metadata(self, cost: int) -> dict[str, Any]:  # Envoy dynamic metadata for the access log
        principal, model = (self.caller.who.principal if self.caller else ""), (self.plan.chosen.name if self.plan else "")
        return render.log_metadata(self.hold.decision if self.hold else None, cost, principal, model)
