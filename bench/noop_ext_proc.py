"""A no-op ext_proc server: the floor any Python ext_proc service pays.

Same processing modes as the shipped filter (envoy/envoy.yaml: request headers
and buffered request body sent, response headers sent, response body buffered)
and the same per-request switch as extproc: an SSE response is moved to
FULL_DUPLEX_STREAMED with `mode_override` (each chunk echoed back unchanged;
`--sse-mode streamed` moves it to STREAMED instead, what extproc did before it
could end a stream). Every other phase is answered with an empty
CommonResponse, so what this costs is the gRPC round trips and nothing else,
except the one header every request needs to be routed at all: the shipped
Envoy config routes only requests marked `x-extproc-route` (closed world), so
the no-op marks each request on its headers, as extproc does.
Runs on grpc.aio (the baseline issue 14 named); with `--transport grpclib` on
the grpclib library (h2; what extproc served on before its own server); with
`--transport extproc` on extproc's own gRPC server (server/grpc_server.py and
http2.py): the floor for the transport extproc serves on. All share one TCP
port across processes (SO_REUSEPORT).

    python -m bench.noop_ext_proc --grpc 127.0.0.1:50052 [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from extproc.server.grpc_server import GrpcServer, Handler

SSE_MODES = {
    "duplex": pm.ProcessingMode(
        response_body_mode=pm.ProcessingMode.FULL_DUPLEX_STREAMED, response_trailer_mode=pm.ProcessingMode.SEND
    ),
    "streamed": pm.ProcessingMode(response_body_mode=pm.ProcessingMode.STREAMED),
}
# --one-round-trip: answer the request headers and skip every later phase (what
# extproc does for unmetered paths), to price one ext_proc round trip.
_SKIP_REST = pm.ProcessingMode(
    request_body_mode=pm.ProcessingMode.NONE,
    response_header_mode=pm.ProcessingMode.SKIP,
    response_body_mode=pm.ProcessingMode.NONE,
)


def _is_sse(headers: ep.HttpHeaders) -> bool:
    for h in headers.headers.headers:
        if h.key == "content-type":
            value = h.raw_value.decode("latin-1") if h.raw_value else h.value
            return "text/event-stream" in value
    return False


class NoopProcessor(epg.ExternalProcessorServicer):
    def __init__(self, one_round_trip: bool = False, sse_mode: str = "duplex") -> None:
        self.one_round_trip = one_round_trip
        self.sse_mode = sse_mode

    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest], context) -> AsyncIterator[ep.ProcessingResponse]:  # type: ignore[override]
        duplex = False
        async for req in request_iterator:
            phase = req.WhichOneof("request")
            resp = ep.ProcessingResponse()
            if phase == "response_body" and duplex:  # full duplex: the client gets what is sent back
                out = resp.response_body.response.body_mutation.streamed_response
                out.SetInParent()
                out.body, out.end_of_stream = req.response_body.body, req.response_body.end_of_stream
            elif phase == "response_headers":
                resp.response_headers.response.SetInParent()
                if _is_sse(req.response_headers):
                    resp.mode_override.CopyFrom(SSE_MODES[self.sse_mode])
                    duplex = self.sse_mode == "duplex"
            elif phase == "request_headers":
                common = resp.request_headers.response
                mark = common.header_mutation.set_headers.add(append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
                mark.header.key, mark.header.raw_value = "x-extproc-route", b"meter"
                common.clear_route_cache = True
                if self.one_round_trip:
                    resp.mode_override.CopyFrom(_SKIP_REST)
            elif phase in ("request_body", "response_body"):
                getattr(resp, phase).response.SetInParent()
            else:  # trailers
                getattr(resp, phase).SetInParent()
            yield resp


class NoopHandler:
    """The same answers as a handler of extproc's gRPC server (or, through `grpclib_mapping`, of grpclib's)."""

    def __init__(self, processor: NoopProcessor) -> None:
        self.processor = processor

    async def Process(self, stream: Any) -> None:
        async for resp in self.processor.Process(stream, None):
            await stream.send_message(resp)

    def __mapping__(self) -> dict[str, Handler]:
        return {"/envoy.service.ext_proc.v3.ExternalProcessor/Process": Handler(self.Process, ep.ProcessingRequest, ep.ProcessingResponse)}


class GrpclibNoop:
    """The no-op on the grpclib library (a dev dependency, for this comparison only)."""

    def __init__(self, handler: NoopHandler) -> None:
        self.handler = handler

    def __mapping__(self) -> dict[str, Any]:
        import grpclib.const

        return {"/envoy.service.ext_proc.v3.ExternalProcessor/Process": grpclib.const.Handler(
            self.handler.Process, grpclib.const.Cardinality.STREAM_STREAM, ep.ProcessingRequest, ep.ProcessingResponse)}


async def _start_grpclib(handler: NoopHandler, addr: str) -> Any:
    import grpclib.config
    import grpclib.server

    window = 16 * 1024 * 1024  # what extproc's server uses
    config = grpclib.config.Configuration(http2_connection_window_size=window, http2_stream_window_size=window)
    server = grpclib.server.Server([GrpclibNoop(handler)], config=config)
    if addr.startswith("unix:"):
        await server.start(path=addr.removeprefix("unix:"))
    else:
        host, _, port = addr.rpartition(":")
        await server.start(host or None, int(port), reuse_port=True)
    return server


async def serve(addr: str, one_round_trip: bool = False, sse_mode: str = "duplex", transport: str = "grpcio") -> None:
    processor = NoopProcessor(one_round_trip, sse_mode)
    if transport == "extproc":
        own = GrpcServer([NoopHandler(processor)], always=[])
        await own.start(addr, socket_mode=0o666)
    elif transport == "grpclib":
        lib = await _start_grpclib(NoopHandler(processor), addr)
    else:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        epg.add_ExternalProcessorServicer_to_server(processor, server)
        if server.add_insecure_port(addr) == 0 and not addr.startswith("unix:"):
            raise OSError(f"cannot bind {addr}")
        await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"noop ext_proc listening {addr}", flush=True)
    await stop.wait()
    if transport == "extproc":
        await own.stop(1)
    elif transport == "grpclib":
        lib.close()
    else:
        await server.stop(grace=1)


def _run(addr: str, one_round_trip: bool = False, sse_mode: str = "duplex", transport: str = "grpcio") -> None:
    asyncio.run(serve(addr, one_round_trip, sse_mode, transport))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grpc", default="127.0.0.1:50052", help="host:port or unix:/path")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the TCP port (SO_REUSEPORT)")
    ap.add_argument("--one-round-trip", action="store_true", help="skip every phase after the request headers")
    ap.add_argument("--sse-mode", choices=sorted(SSE_MODES), default="duplex", help="the body mode an SSE answer is switched to")
    ap.add_argument("--transport", choices=["grpcio", "grpclib", "extproc"], default="grpcio",
                    help="the gRPC server: grpc.aio, the grpclib library, or extproc's own")
    a = ap.parse_args()
    if a.workers <= 1:
        _run(a.grpc, a.one_round_trip, a.sse_mode, a.transport)
        return
    if a.grpc.startswith("unix:"):
        raise SystemExit("--workers > 1 needs a TCP address (a Unix socket path cannot be shared)")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(a.grpc, a.one_round_trip, a.sse_mode, a.transport), daemon=True) for _ in range(a.workers)]
    for p in procs:
        p.start()

    def stop(signum: int, frame: object) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
