"""The gRPC server: ext_proc, ext_authz and grpc.health.v1 on grpclib, in the event loop's own thread.

Why grpclib and not grpc.aio: the service's hot path is four small messages per
call, and with grpc.aio every one of them crosses three threads (the C core's
event engine, grpc.aio's completion-queue poller, the asyncio loop) with a
wake-up write, futex hand-offs of the GIL and a loop iteration each. Measured
with `python -m bench.transport` (the no-op ext_proc behind real Envoy, c=32):
~84 syscalls and ~24 context switches per call on grpc.aio, ~12 and ~1 on
grpclib, whose HTTP/2 (h2) runs as an asyncio protocol in the loop that runs
the session. The wire is the same gRPC, so Envoy, probes and clients do not
change.

Shutdown drains: once `stop` is called new ext_proc and ext_authz calls are
refused with UNAVAILABLE (Envoy fails them closed), the calls in flight (a
streamed answer's ext_proc stream lasts as long as the stream) get up to the
grace to finish, then the rest are cancelled. Health keeps answering (with
NOT_SERVING, see health.py) until the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpclib.config
import grpclib.const
import grpclib.server
from grpclib.exceptions import GRPCError

# Stream and connection windows: a buffered request or response body of several MiB arrives
# without waiting for window updates (grpclib's default is 4 MiB; Envoy bounds bodies itself).
WINDOW_BYTES = 16 * 1024 * 1024
CLOSE_WAIT_S = 1.0  # after the grace: how long stop waits for clients to close their connections

# The Unix socket's mode. The server creates it with the process umask (0755 by uid 10001), and
# the pod's Envoy runs as another user (uid 101) with no group in common, so every call was
# refused (503). 0666: the socket lives in the pod-private emptyDir that only this pod's
# containers mount, so that directory is the access boundary. Narrower: give the pod a shared
# fsGroup (the kubelet makes the emptyDir setgid, so the socket gets that group) and serve
# with --socket-mode 0660.
DEFAULT_SOCKET_MODE = 0o666


def unix_socket_path(grpc_addr: str) -> str:
    """The file of a gRPC unix: address (unix:path or unix:///abs/path)."""
    path = grpc_addr.removeprefix("unix:")
    return path[2:] if path.startswith("//") else path


class Servable(Protocol):
    def __mapping__(self) -> dict[str, grpclib.const.Handler]: ...


class _Drained:
    """A handler's methods wrapped to count the calls in flight and refuse new ones once draining."""

    def __init__(self, inner: Servable, server: GrpcServer) -> None:
        self.inner, self.server = inner, server

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {path: h._replace(func=self.server.tracked(h.func)) for path, h in self.inner.__mapping__().items()}


class GrpcServer:
    """grpclib's server with draining: `services` are tracked and refused while stopping, `always` (health) never."""

    def __init__(self, services: list[Servable], always: list[Servable]) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        config = grpclib.config.Configuration(http2_connection_window_size=WINDOW_BYTES, http2_stream_window_size=WINDOW_BYTES)
        handlers: list[Any] = [_Drained(s, self) for s in services] + list(always)
        self._server = grpclib.server.Server(handlers, config=config)

    def tracked(self, fn: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def run(stream: Any) -> None:
            if self.draining:
                raise GRPCError(grpclib.const.Status.UNAVAILABLE, "extproc is shutting down")
            self.in_flight += 1
            self._idle.clear()
            try:
                await fn(stream)
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self._idle.set()

        return run

    async def start(self, addr: str, *, socket_mode: int) -> None:
        """Listen on `unix:PATH` (created with `socket_mode`) or `HOST:PORT` (SO_REUSEPORT: worker processes share it)."""
        if addr.startswith("unix:"):
            path = unix_socket_path(addr)
            if os.path.exists(path):
                os.unlink(path)  # a socket left by a process that did not stop cleanly
            await self._server.start(path=path)
            os.chmod(path, socket_mode)
            return
        host, _, port = addr.rpartition(":")
        await self._server.start(host.strip("[]") or None, int(port), reuse_port=True)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, give the ones in flight up to `grace` seconds, cancel the rest, close."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self._server.close()
        # asyncio's Server.wait_closed also waits for every open connection to close, which a client that
        # keeps its HTTP/2 connection (Envoy, a probe's channel) may never do: the calls are over, so bound it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), CLOSE_WAIT_S)
