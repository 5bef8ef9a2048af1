"""The ext_authz gRPC servicer: the same identity and refusal rules, headers only.

Calls not from an authenticated Envoy are refused first (callers.py).
For callers that pass no inference body through the filter (an orchestrator's
dispatch endpoint, meshes that allow only ext_authz): `Check` resolves the
principal and run and denies with the same 429 envelope when a hard budget,
a step cap or a run deadline is already spent. Nothing is reserved.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as az
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from .callers import CallerGate
from .gate import Gate
from .grpc_server import GRPCError, Handler, ServerStream, Status
from .services import Services

_OK = status_pb2.Status(code=code_pb2.OK)


class Authorization:
    """`envoy.service.auth.v3.Authorization/Check` as a handler of grpc_server.py."""

    def __init__(self, services: Services, callers: CallerGate) -> None:
        self.services = services
        self.callers = callers

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/envoy.service.auth.v3.Authorization/Check": Handler(self._check, az.CheckRequest, az.CheckResponse)
        }

    async def _check(self, stream: ServerStream) -> None:
        authenticated = self.callers.authenticate(stream.metadata)
        request = await stream.recv_message()
        if request is None:  # the client ended its side without the request
            raise GRPCError(Status.INVALID_ARGUMENT, "Check needs a CheckRequest")
        await stream.send_message(await self.Check(request, authenticated))

    async def Check(self, request: az.CheckRequest, authenticated: bool) -> az.CheckResponse:
        http = request.attributes.request.http
        headers = dict(http.headers)
        if http.header_map.headers:
            for h in http.header_map.headers:
                headers[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        headers.setdefault(":path", http.path)
        headers.setdefault(":method", http.method)
        peer = request.attributes.source.principal or None
        session = Gate(self.services, caller_authenticated=authenticated)
        reply = await session.authorize(headers, peer)
        if reply is None or reply.immediate is None:
            return az.CheckResponse(status=_OK, ok_response=az.OkHttpResponse())
        imm = reply.immediate
        return az.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED if imm.status != 503 else code_pb2.UNAVAILABLE),
            denied_response=az.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=imm.status),
                headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=k, value=v),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                    for k, v in imm.headers
                ],
                body=imm.body.decode(),
            ),
        )
