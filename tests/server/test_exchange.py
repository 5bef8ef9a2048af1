"""The servicer's translation of `Reply`s for a full-duplex response body (no Envoy here; the
behaviour through Envoy is tests/integration/test_stream_cut_transport.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.server.ext_proc import exchange
from extproc.server.reply import Reply


class Scripted:
    """Answers each phase from a script; records what it was given."""

    def __init__(self, bodies: list[Reply], *, stream: bool = True) -> None:
        self.bodies, self.stream = bodies, stream
        self.seen: list[tuple[bytes, bool]] = []
        self.replies_sent = 0  # after_reply calls: one per reply the consumer took

    async def request_headers(self, headers: Mapping[str, str], end_of_stream: bool, peer_id: str | None = None) -> Reply:
        return Reply()

    async def request_body(self, body: bytes) -> Reply:
        return Reply()

    async def response_headers(self, headers: Mapping[str, str]) -> Reply:
        return Reply(stream_response=self.stream)

    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Reply:
        self.seen.append((chunk, end_of_stream))
        return self.bodies.pop(0)

    def after_reply(self) -> None:
        self.replies_sent += 1


def headers(phase: str) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    h = getattr(req, phase).headers.headers.add()
    h.key, h.raw_value = ":status" if phase == "response_headers" else ":path", b"200"
    return req


def body(chunk: bytes, eos: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk, end_of_stream=eos))


async def run(session: Scripted, messages: list[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
    async def it() -> AsyncIterator[ep.ProcessingRequest]:
        for m in messages:
            yield m

    return [r async for r in exchange(session, it())]


def streamed(resp: ep.ProcessingResponse) -> ep.StreamedBodyResponse:
    assert resp.response_body.response.body_mutation.HasField("streamed_response")
    return resp.response_body.response.body_mutation.streamed_response


async def test_stream_response_switches_to_full_duplex_with_trailers() -> None:
    out = await run(Scripted([]), [headers("request_headers"), headers("response_headers")])
    mode = out[1].mode_override
    assert mode.response_body_mode == pm.ProcessingMode.FULL_DUPLEX_STREAMED
    assert mode.response_trailer_mode == pm.ProcessingMode.SEND  # full duplex requires it


async def test_each_chunk_passed_replaced_or_withheld_and_the_end_carried() -> None:
    session = Scripted([Reply(), Reply(body=b"new"), Reply(body=b""), Reply(body=b"tail")])
    out = await run(session, [headers("response_headers"), body(b"a"), body(b"b"), body(b"c"), body(b"", eos=True)])
    answers = [(streamed(r).body, streamed(r).end_of_stream) for r in out[1:]]
    assert answers == [(b"a", False), (b"new", False), (b"", False), (b"tail", True)]
    assert session.seen[-1] == (b"", True)
    assert session.replies_sent == len(out)  # after_reply once per reply, the last one included


async def test_end_stream_ends_the_response_and_nothing_more_is_answered() -> None:
    session = Scripted([Reply(), Reply(body=b"data: [DONE]\n\n", end_stream=True), Reply()])
    out = await run(session, [headers("response_headers"), body(b"a"), body(b"b"), body(b"c")])
    assert len(out) == 3  # chunk "c", already on its way when the cut was sent, gets no answer
    assert (streamed(out[2]).body, streamed(out[2]).end_of_stream) == (b"data: [DONE]\n\n", True)
    assert session.seen == [(b"a", False), (b"b", False)]


async def test_upstream_trailers_end_a_duplex_body() -> None:
    session = Scripted([Reply(), Reply(body=b": cost\n\n")])
    out = await run(session, [headers("response_headers"), body(b"a"), ep.ProcessingRequest(response_trailers=ep.HttpTrailers())])
    assert session.seen[-1] == (b"", True)  # the session learns the stream is over
    assert (streamed(out[2]).body, streamed(out[2]).end_of_stream) == (b": cost\n\n", False)
    assert out[3].HasField("response_trailers")


async def test_buffered_body_keeps_the_common_response() -> None:
    reply = Reply(body=b"{}", set_headers=[("x-budget-cost-usd", "0.1")], end_stream=True)
    out = await run(Scripted([reply], stream=False), [headers("response_headers"), body(b"{}", eos=True)])
    common = out[1].response_body.response
    assert common.body_mutation.body == b"{}" and not common.body_mutation.HasField("streamed_response")
    opt = common.header_mutation.set_headers[0]
    assert (opt.header.key, opt.append_action) == ("x-budget-cost-usd", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
