"""The ext_proc gRPC servicer: protobuf in, `Session` calls, protobuf out.

Thin on purpose: all decisions live in `Session`. A call that does not come
from an authenticated Envoy is refused first (callers.py), before any session
exists. One session per stream;
when the stream ends (normally, or because the client went away) the session
is closed in a background task so settlement never delays Envoy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from .callers import CallerGate
from .reply import Reply
from .services import Services
from .session import Session

log = logging.getLogger("extproc.grpc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SKIP_ALL = pm.ProcessingMode(
    request_body_mode=pm.ProcessingMode.NONE,
    response_header_mode=pm.ProcessingMode.SKIP,
    response_body_mode=pm.ProcessingMode.NONE,
)
_HEADERS_ONLY = pm.ProcessingMode(
    request_body_mode=pm.ProcessingMode.NONE,
    response_header_mode=pm.ProcessingMode.SEND,
    response_body_mode=pm.ProcessingMode.NONE,
)
_STREAM_RESPONSE = pm.ProcessingMode(response_body_mode=pm.ProcessingMode.STREAMED)
_NO_RESPONSE_BODY = pm.ProcessingMode(response_body_mode=pm.ProcessingMode.NONE)
NAMESPACE = "extproc.budget"


def _headers(msg: ep.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _peer(req: ep.ProcessingRequest) -> str | None:
    """The mTLS peer's URI SAN, if Envoy was configured to send it as an attribute."""
    attrs = req.attributes.get("envoy.filters.http.ext_proc")
    if attrs is None:
        return None
    v = attrs.fields.get("connection.uri_san_peer_certificate")
    return v.string_value or None if v is not None else None


def _fill(mutation: ep.HeaderMutation, headers: Iterable[tuple[str, str]]) -> None:
    # add() then assign fields: 2.4x faster with upb than building nested messages in a list
    add = mutation.set_headers.add
    for k, v in headers:
        opt = add(append_action=_OVERWRITE)
        opt.header.key = k
        opt.header.raw_value = v.encode()


def _fill_common(common: ep.CommonResponse, reply: Reply) -> None:
    # filled in place: building a CommonResponse and copying it in cost a third of to_proto
    common.SetInParent()  # an empty answer must still say which phase it answers
    if reply.set_headers:
        _fill(common.header_mutation, reply.set_headers)
    if reply.body is not None:
        common.body_mutation.body = reply.body
    if reply.clear_route_cache:
        common.clear_route_cache = True


def _fill_metadata(md: struct_pb2.Struct, metadata: dict[str, Any]) -> None:
    """Struct.update() walks every value in Python; our metadata is one flat namespace of strings."""
    fields = md.fields[NAMESPACE].struct_value.fields
    for k, v in metadata.items():
        if isinstance(v, str):
            fields[k].string_value = v
        else:
            fields[k].CopyFrom(_value(v))


def _value(v: Any) -> struct_pb2.Value:
    s = struct_pb2.Struct()
    s.update({"v": v})
    return s.fields["v"]


def to_proto(phase: str, reply: Reply) -> ep.ProcessingResponse:
    if reply.immediate is not None:
        imm = reply.immediate
        resp = ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(status=http_status_pb2.HttpStatus(code=imm.status), body=imm.body)
        )
        _fill(resp.immediate_response.headers, imm.headers)
        return resp
    resp = ep.ProcessingResponse()
    if phase in ("request_headers", "response_headers"):
        _fill_common(getattr(resp, phase).response, reply)
        if reply.skip_rest:
            resp.mode_override.CopyFrom(_SKIP_ALL)
        elif reply.headers_only:
            resp.mode_override.CopyFrom(_HEADERS_ONLY)
        elif reply.stream_response:
            resp.mode_override.CopyFrom(_STREAM_RESPONSE)
        elif reply.skip_response_body:
            resp.mode_override.CopyFrom(_NO_RESPONSE_BODY)
    elif phase.endswith("_body"):
        _fill_common(getattr(resp, phase).response, reply)
    else:  # trailers carry only a header mutation
        getattr(resp, phase).SetInParent()
    if reply.metadata:
        _fill_metadata(resp.dynamic_metadata, reply.metadata)
    return resp


class ExternalProcessor(epg.ExternalProcessorServicer):  # type: ignore[misc]  # generated servicer: no stubs
    def __init__(self, services: Services, callers: CallerGate) -> None:
        self.services = services
        self.callers = callers

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        authenticated = await self.callers.authenticate(context)
        session = Session(self.services, caller_authenticated=authenticated)
        try:
            async for req in request_iterator:
                phase = req.WhichOneof("request")
                if phase == "request_headers":
                    reply = await session.request_headers(
                        _headers(req.request_headers), req.request_headers.end_of_stream, _peer(req)
                    )
                elif phase == "request_body":
                    reply = await session.request_body(req.request_body.body)
                elif phase == "response_headers":
                    reply = await session.response_headers(_headers(req.response_headers))
                elif phase == "response_body":
                    reply = await session.response_body(req.response_body.body, req.response_body.end_of_stream)
                else:  # trailers: nothing to decide
                    reply = Reply()
                yield to_proto(phase, reply)
                if reply.immediate is not None:
                    return
        finally:
            self.services.spawn(session.close())
