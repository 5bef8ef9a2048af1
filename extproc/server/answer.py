"""A metered call's answer as it streams through: read, grown, cut, or assembled into JSON.

`StreamedAnswer` is the response side of one call whose answer passes as an
SSE stream: it feeds the bytes to the schema's reader (protocols), asks the
call's `StreamGrowth` (engine) whether the reservation still covers the output,
grows the hold when it runs low, and says when the stream must end. The
session turns what it returns into replies; nothing here knows Envoy.

Two shapes: the client asked for the stream (the bytes are forwarded, event by
event), or the service asked the backend to stream a JSON call
(`upstream_stream`): nothing is forwarded until the end, when the JSON body the
client asked for is assembled from the events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.calls import Plan
from ..engine.growth import Cut, StreamGrowth, cut_of, deadline_cut
from ..engine.holds import CallHold
from ..errors import StoreUnavailable, UpstreamError
from ..money import nano_to_usd
from ..policy.model import Policy
from ..protocols.assemble import assembler_for
from ..protocols.envelopes import error_body
from ..protocols.usage import Usage
from . import headers as H
from . import metrics, render

log = logging.getLogger("extproc.answer")


@dataclass(frozen=True, slots=True)
class Piece:
    """What to send for one chunk: `body` (None: the chunk as it came), and whether the
    response ends here (`cut`: the service ended it, in the API's terms, having told the client
    `usage`, which is what the call is charged)."""

    body: bytes | None
    cut: Cut | None = None
    usage: Usage | None = None


class StreamedAnswer:
    def __init__(
        self,
        reader: Any,  # protocols.stream.StreamReader
        hold: CallHold,
        growth: StreamGrowth | None,
        *,
        clock: Callable[[], int],
        assembler: Any = None,  # protocols.assemble.Assembler: a JSON call streamed upstream
        client_usage: bool = False,
        fail_open: bool = False,
        envelope: str = "openai",
    ) -> None:
        self.reader, self.hold, self.growth, self.clock = reader, hold, growth, clock
        self.assembler = assembler
        self.client_usage = client_usage  # the client asked for the usage chunk itself
        self.fail_open = fail_open
        self.schema_envelope = envelope  # the API's error envelope (openai | anthropic)

    async def chunk(self, data: bytes) -> Piece:
        """One chunk of the answer (not the last): what to forward, or where the stream ends."""
        reader = self.reader
        before = reader.counted_output_tokens
        out = reader.feed(data)
        cut = await self._cover(reader.counted_output_tokens - before)
        if cut is not None:
            usage, _ = self.hold.stream_outcome(reader, ended=False)  # what was delivered
            return Piece(self._ending(out, cut, usage), cut, usage)
        if self.assembler is not None:
            return Piece(b"")
        return Piece(None if out is data else out)

    def last(self, data: bytes, rid: str) -> bytes:
        """The last chunk: what to forward (the assembled JSON for a call streamed upstream)."""
        r = self.reader
        out = r.feed(data) + r.finish()
        if r.malformed_events:  # never silent: a skipped frame could be unbilled spend
            log.warning("stream %s had %d malformed event(s): %s", rid, r.malformed_events, r.last_error)
        if self.assembler is not None:
            return self._assembled()
        return bytes(out)

    def cost_comment(self, cost: int, source: str) -> bytes:
        """The SSE comments that tell the cost (and when it is an estimate, from what) and, in
        nested runs, each level's spend with this charge included, after the last event;
        never inside a compressed body or a JSON answer."""
        if not self.reader.may_rewrite or self.assembler is not None:
            return b""
        estimate = f": {H.COST_SOURCE}={source}\n\n" if source != "stream" else ""
        runs = "".join(f": {name}={value}\n\n" for name, value in render.run_spend(self.hold.decision, cost)[1:2])
        return f"{estimate}: {H.COST}={nano_to_usd(cost)}\n\n{runs}".encode()

    async def _cover(self, chunk_tokens: int) -> Cut | None:
        """Grow the hold ahead of the output; a Cut when it cannot (or the run's deadline passed)."""
        growth = self.growth
        if growth is None:
            return None
        now = self.clock()
        if growth.past_deadline(now):
            return deadline_cut(self.hold.decision)
        need = growth.need(self.reader.counted_output_tokens, chunk_tokens)
        if need is None and not growth.stale(now):
            return None
        try:  # grow, or (a long stream that has not grown for half its TTL) just push the TTL
            result = await (self.hold.grow(need) if need is not None else self.hold.touch())
        except StoreUnavailable as e:
            metrics.extended("error")
            if self.fail_open:
                log.error("cannot grow %s (%s); streaming on unmetered (fail_open)", self.hold.decision.hold.reservation_id, e)
                self.growth = None
                return None
            return Cut("budget_store_unavailable", "")
        if result.ok:
            growth.grew(self.hold.reserved_output, now)
            if result.deadline_ms is not None:
                growth.deadline_ms = result.deadline_ms
            metrics.extended("ok" if need is not None else "touch")
            return None
        metrics.extended("refused")
        return cut_of(self.hold.decision, result.blocked, run_refusal=result.reason)

    def _assembled(self, *, cut: bool = False, usage: Usage | None = None) -> bytes:
        """The JSON answer assembled from the stream; an error in the API's envelope when the
        stream cannot make one (an error event, past the size bound): the headers (200) are
        already on their way, and a crash here would reset the client's connection."""
        try:
            return bytes(self.assembler.body(cut=cut, usage=usage))
        except UpstreamError as e:
            log.warning("%s: the streamed answer could not be assembled: %s", self.hold.decision.hold.reservation_id, e)
            why = f"The backend's streamed answer could not be returned as JSON: {e}"
            return error_body(self.schema_envelope, status=502, message=why, type="server_error", code="upstream_unassemblable")

    def _ending(self, forwarded: bytes, cut: Cut, usage: Usage | None) -> bytes:
        metrics.cut(cut.reason)
        if self.assembler is not None:
            return self._assembled(cut=True, usage=usage)
        tail = self.reader.cut(reason=cut.reason, scope=cut.scope, usage=usage, include_usage=self.client_usage)
        return forwarded + (tail or b"")


def open(
    services: Any, policy: Policy, schema: Any, hold: CallHold, plan: Plan, strip_usage: bool, content_encoding: str | None
) -> StreamedAnswer:
    """The answer of `plan`'s call, whose response headers said it streams (SSE)."""
    chosen, facts = plan.chosen, plan.facts
    count, enc = services.counter.count, chosen.spec.encoding
    assembler = assembler_for(schema.name) if not facts.stream else None  # a JSON call streamed upstream
    reader = schema.stream_reader(
        strip_usage_chunk=strip_usage,
        count_tokens=lambda t: count(t, enc),
        content_encoding=content_encoding,
        cuttable=True,
        sink=assembler.take if assembler is not None else None,
        # an assembled answer needs every event whole (a Responses terminal event echoes the request)
        **({"max_event_bytes": policy.max_body_bytes + (1 << 20)} if assembler is not None else {}),
    )
    growth = StreamGrowth(
        reserved=hold.reserved_output,
        cap=chosen.output_cap,
        step_tokens=policy.streaming.extend_step_tokens,
        safety=chosen.spec.token_safety_factor,
        deadline_ms=hold.decision.deadline_ms,
        touch_every_ms=policy.reservation_ttl_seconds * 500,
        now_ms=services.engine.clock(),
    )
    client_usage = facts.stream and facts.include_usage
    return StreamedAnswer(
        reader, hold, growth, clock=services.engine.clock, assembler=assembler, client_usage=client_usage,
        fail_open=policy.failure_mode == "fail_open", envelope=schema.envelope,
    )  # fmt: skip
