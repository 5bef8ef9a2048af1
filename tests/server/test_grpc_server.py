"""The grpclib server over a real socket, called by grpcio clients (what Envoy and probes speak):
health Check and Watch, and the drain on stop (new calls refused, calls in flight finish)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpclib.const
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server.grpc_server import GrpcServer
from extproc.server.health import LIVENESS, NOT_SERVING, SERVING, StoreHealth


class _Echo:
    """A unary handler that holds each call until `release` is set: a call in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.cancelled = False

    async def Echo(self, stream: Any) -> None:
        request = await stream.recv_message()
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await stream.send_message(request)

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        req = health_pb2.HealthCheckRequest
        return {"/test.Echo/Echo": grpclib.const.Handler(self.Echo, grpclib.const.Cardinality.UNARY_UNARY, req, req)}


def _echo_call(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        "/test.Echo/Echo",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckRequest.FromString,
    )


@pytest.fixture
async def served(tmp_path):
    up = asyncio.Event()

    async def ping() -> None:
        if not up.is_set():
            raise ConnectionError("store down")

    health = StoreHealth(ping, interval=0.05, timeout=0.5)
    echo = _Echo()
    server = GrpcServer([echo], always=[health])
    addr = f"unix:{tmp_path}/grpc.sock"
    await health.start()
    await server.start(addr, socket_mode=0o600)
    channel = grpc.aio.insecure_channel(addr)
    try:
        yield server, health, echo, up, channel
    finally:
        await channel.close()
        await health.stop()
        await server.stop(0)


async def test_health_check_and_watch_follow_the_store(served):
    _, _, _, up, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest
    assert (await stub.Check(req(service=""), timeout=2)).status == NOT_SERVING
    assert (await stub.Check(req(service=LIVENESS), timeout=2)).status == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Check(req(service="no.such.Service"), timeout=2)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    watch = stub.Watch(req(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=5)
    seen = [(await watch.read()).status]
    up.set()  # the store answers: the next probe publishes SERVING to the watcher
    seen.append((await watch.read()).status)
    watch.cancel()
    assert seen == [NOT_SERVING, SERVING]


async def test_stop_refuses_new_calls_and_lets_calls_in_flight_finish(served):
    server, _, echo, _, channel = served
    call = _echo_call(channel)
    in_flight = asyncio.ensure_future(call(health_pb2.HealthCheckRequest(service="first"), timeout=5))
    await asyncio.wait_for(echo.entered.wait(), 5)
    stopping = asyncio.ensure_future(server.stop(5))
    await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(health_pb2.HealthCheckRequest(service="second"), timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.in_flight == 1 and not stopping.done()
    echo.release.set()
    assert (await in_flight).service == "first"
    await asyncio.wait_for(stopping, 5)


async def test_stop_cancels_what_outlives_the_grace(served):
    server, _, echo, _, channel = served
    call = _echo_call(channel)
    in_flight = asyncio.ensure_future(call(health_pb2.HealthCheckRequest(service="stuck"), timeout=1))
    await asyncio.wait_for(echo.entered.wait(), 5)
    t0 = asyncio.get_running_loop().time()
    await server.stop(0.2)
    assert asyncio.get_running_loop().time() - t0 < 0.9  # the grace, not the call, bounds the stop
    assert echo.cancelled
    with pytest.raises(grpc.aio.AioRpcError):  # the process exits next; here the client's deadline ends it
        await in_flight


async def test_a_check_without_its_request_is_invalid_not_a_crash(tmp_path):
    """A unary ext_authz call whose client ends its side before sending the CheckRequest."""
    from envoy.service.auth.v3 import external_auth_pb2 as az

    from extproc.server.callers import CallerGate
    from extproc.server.ext_authz import Authorization

    server = GrpcServer([Authorization(None, CallerGate(None, True))], always=[])  # type: ignore[arg-type]
    addr = f"unix:{tmp_path}/authz.sock"
    await server.start(addr, socket_mode=0o600)
    try:
        async with grpc.aio.insecure_channel(addr) as channel:
            call = channel.stream_unary(
                "/envoy.service.auth.v3.Authorization/Check",
                request_serializer=az.CheckRequest.SerializeToString,
                response_deserializer=az.CheckResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(iter(()), timeout=5)  # no message, then end of stream
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(0)
