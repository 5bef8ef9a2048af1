"""extproc's gRPC server over a real socket, called by grpcio clients (what Envoy and probes speak):
health Check and Watch, and the drain on stop (new calls refused, calls in flight finish)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server import grpc_server
from extproc.server.grpc_server import GRPCError, GrpcServer, Handler, Status
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

    def __mapping__(self) -> dict[str, Handler]:
        req = health_pb2.HealthCheckRequest
        return {"/test.Echo/Echo": Handler(self.Echo, req, req)}


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


class _Calls:
    """Bidi echo (each message back, in order), a handler that never answers, one that fails with a message."""

    M = health_pb2.HealthCheckRequest

    async def Echo(self, stream: Any) -> None:
        async for m in stream:
            await stream.send_message(m)

    async def Hang(self, stream: Any) -> None:
        await asyncio.Event().wait()

    async def Fail(self, stream: Any) -> None:
        await stream.recv_message()
        raise GRPCError(Status.PERMISSION_DENIED, "nö: 100% refused\n")

    async def Crash(self, stream: Any) -> None:
        raise RuntimeError("a bug")

    def __mapping__(self) -> dict[str, Handler]:
        return {f"/t.Calls/{n}": Handler(getattr(self, n), self.M, self.M) for n in ("Echo", "Hang", "Fail", "Crash")}


@pytest.fixture
async def calls(tmp_path):
    server = GrpcServer([_Calls()], always=[])
    addr = f"unix:{tmp_path}/calls.sock"
    await server.start(addr, socket_mode=0o600)
    channel = grpc.aio.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(0)


def _method(channel: grpc.aio.Channel, name: str, kind: str = "stream_stream") -> Any:
    m = _Calls.M
    return getattr(channel, kind)(f"/t.Calls/{name}", request_serializer=m.SerializeToString, response_deserializer=m.FromString)


async def test_many_streams_and_messages_larger_than_every_window(calls):
    """Messages of 3 MB each way: the client's windows start at 64 KiB, so the server's sends wait for
    WINDOW_UPDATEs and its receive windows are given back as the handler reads; 20 streams at once."""
    _, channel = calls
    echo = _method(channel, "Echo")

    async def one(i: int) -> list[int]:
        call = echo()
        sizes = []
        for size in (10, 70_000, 3_000_000, 5):
            await call.write(_Calls.M(service=str(i) * size))
            sizes.append(len((await call.read()).service))
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        return sizes

    results = await asyncio.gather(*(one(i) for i in range(1, 10)), *(one(i) for i in range(1, 10)))
    assert results == [[10, 70_000, 3_000_000, 5]] * 18


async def test_status_unknown_method_deadline_and_crash(calls):
    server, channel = calls
    with pytest.raises(grpc.aio.AioRpcError) as fail:
        await _method(channel, "Fail", "unary_unary")(_Calls.M(), timeout=5)
    assert fail.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert fail.value.details() == "nö: 100% refused\n"  # percent-encoded on the wire, decoded by the client
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await _method(channel, "Nope", "unary_unary")(_Calls.M(), timeout=5)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await _method(channel, "Hang", "unary_unary")(_Calls.M(), timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert asyncio.get_running_loop().time() - t0 < 2
    with pytest.raises(grpc.aio.AioRpcError) as crash:
        await _method(channel, "Crash", "unary_unary")(_Calls.M(), timeout=5)
    assert crash.value.code() == grpc.StatusCode.INTERNAL and "a bug" not in (crash.value.details() or "")
    await asyncio.sleep(0.05)
    assert server.in_flight == 0


async def test_a_message_over_the_limit_is_refused_and_the_connection_lives(calls, monkeypatch):
    _, channel = calls
    monkeypatch.setattr(grpc_server, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await _method(channel, "Echo", "unary_unary")(_Calls.M(service="x" * 2000), timeout=5)
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await _method(channel, "Echo", "unary_unary")(_Calls.M(service="ok"), timeout=5)).service == "ok"


async def test_a_client_that_goes_away_cancels_its_calls(calls):
    server, channel = calls
    call = _method(channel, "Hang")()
    await call.write(_Calls.M())
    for _ in range(100):
        if server.in_flight:
            break
        await asyncio.sleep(0.01)
    assert server.in_flight == 1
    call.cancel()  # RST_STREAM from the client
    for _ in range(100):
        if not server.in_flight:
            break
        await asyncio.sleep(0.01)
    assert server.in_flight == 0


async def test_a_peer_that_sends_pings_but_never_reads_is_cut(tmp_path, monkeypatch):
    """Every PING is answered; a peer that never reads the answers would grow the write buffer without end."""
    from extproc.server import http2

    monkeypatch.setattr(grpc_server, "MAX_UNSENT_BYTES", 256 * 1024)
    server = GrpcServer([], always=[])
    path = tmp_path / "p.sock"
    await server.start(f"unix:{path}", socket_mode=0o600)
    try:
        _, writer = await asyncio.open_unix_connection(str(path))  # never read from
        ping = b"\x00\x00\x08" + bytes([http2.PING, 0]) + b"\x00\x00\x00\x00" + b"12345678"
        writer.write(http2.PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + ping * 200_000)  # 3.4 MB of PINGs
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.drain(), 10)
        for _ in range(200):
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        assert not server.connections, "the connection that never reads is still open"
        writer.close()
    finally:
        await server.stop(0)


def test_a_call_is_served_on_uvloop(tmp_path):
    """`extproc serve` runs on uvloop when it is installed, whose transports are not asyncio.Transport
    subclasses: a connection once failed an isinstance check there and every call got a reset."""
    uvloop = pytest.importorskip("uvloop")
    addr = f"unix:{tmp_path}/uv.sock"

    def call() -> Any:
        with grpc.insecure_channel(addr) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5)

    async def main() -> Any:
        async def ping() -> None:
            return None

        health = StoreHealth(ping, interval=0.05, timeout=0.5)
        server = GrpcServer([], always=[health])
        await health.start()
        await server.start(addr, socket_mode=0o600)
        try:
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            return await asyncio.get_running_loop().run_in_executor(None, call)
        finally:
            await health.stop()
            await server.stop(0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()).status == SERVING


def test_serve_runs_asyncios_own_loop_even_with_uvloop_installed(monkeypatch):
    """What is tested and measured is what runs: `extproc serve` once switched to uvloop whenever it
    was importable, and its connections failed there (the test above)."""
    pytest.importorskip("uvloop")
    from extproc import app, cli

    loops: list[type] = []

    async def serve(*args: Any, **kwargs: Any) -> None:
        loops.append(type(asyncio.get_running_loop()))

    monkeypatch.setattr(app, "serve", serve)
    args = cli.build_parser().parse_args(["serve", "--policy", "p.yaml"])
    cli._serve_one(args, None)
    assert loops and loops[0].__module__.startswith("asyncio")
