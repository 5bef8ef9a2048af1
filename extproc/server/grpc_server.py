"""The gRPC server: ext_proc, ext_authz and grpc.health.v1 in the event loop's own thread.

The service's hot path is four small messages per call, so the transport is
most of a call's cost. History, each step measured behind real Envoy
(`bench/optimisations.md`):

- grpc.aio moved every message across three threads (the C core's event
  engine, its completion-queue poller, the asyncio loop): ~84 syscalls and
  ~24 context switches per call for a no-op.
- grpclib (h2 in the loop): ~12 syscalls and ~1 context switch, but h2,
  hyperframe, hpack and grpclib then spent ~0.6 ms of Python per call
  validating, wrapping and logging each frame.
- Now: HTTP/2 in `http2.py` (sans-IO, only what a gRPC server needs) and the
  gRPC layer here: a stream per call, length-prefixed messages, status in
  trailers, `grpc-timeout` honoured. The wire is the same gRPC, so Envoy,
  probes and clients do not change.

Handlers kept the shape they had on grpclib: a `__mapping__` of path to
`Handler`, a stream with `metadata` (pairs), `recv_message`, `send_message`
and async iteration, and `GRPCError` for a status (all defined here now).

Shutdown drains: once `stop` is called new ext_proc and ext_authz calls are
refused with UNAVAILABLE (Envoy fails them closed), the calls in flight (a
streamed answer's ext_proc stream lasts as long as the stream) get up to the
grace to finish, then the rest are cancelled. Health keeps answering (with
NOT_SERVING, see health.py) until the end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, cast

from . import http2

log = logging.getLogger(__name__)

# Stream and connection windows: a buffered request or response body of several MiB arrives
# without waiting for window updates (Envoy bounds bodies itself).
WINDOW_BYTES = 16 * 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one gRPC message: an ext_proc body message holds a whole buffered body
MAX_STREAMS = 4096  # concurrent streams per connection (Envoy multiplexes every call on few connections)
BACKPRESSURE_BYTES = 1024 * 1024  # a handler's send waits while this much of its stream waits for window
MAX_UNSENT_BYTES = 64 * 1024 * 1024  # written to a connection and not yet taken by the peer: past it, the peer is cut
CLOSE_WAIT_S = 1.0  # after the grace: how long stop waits for clients to close their connections

# The Unix socket's mode. The server creates it with the process umask (0755 by uid 10001), and
# the pod's Envoy runs as another user (uid 101) with no group in common, so every call was
# refused (503). 0666: the socket lives in the pod-private emptyDir that only this pod's
# containers mount, so that directory is the access boundary. Narrower: give the pod a shared
# fsGroup (the kubelet makes the emptyDir setgid, so the socket gets that group) and serve
# with --socket-mode 0660.
DEFAULT_SOCKET_MODE = 0o666

_RESERVED = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"user-agent"})
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_OK_TRAILERS = http2.encode_fields([(b"grpc-status", b"0")])


class Status(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GRPCError(Exception):
    """Raised by a handler: the call ends with `status` and `message` in its trailers."""

    def __init__(self, status: Status, message: str | None = None) -> None:
        super().__init__(status, message)
        self.status, self.message = status, message


class Handler(NamedTuple):
    """One method: the coroutine that serves a call's stream, and the message types it reads and writes."""

    func: Callable[[Any], Awaitable[None]]
    request_type: Any
    reply_type: Any


def unix_socket_path(grpc_addr: str) -> str:
    """The file of a gRPC unix: address (unix:path or unix:///abs/path)."""
    path = grpc_addr.removeprefix("unix:")
    return path[2:] if path.startswith("//") else path


class Servable(Protocol):
    def __mapping__(self) -> dict[str, Handler]: ...


def _status_block(status: int, message: str | None) -> bytes:
    fields = [(b"grpc-status", str(status).encode())]
    if message:  # percent-encoded as gRPC asks (PROTOCOL-HTTP2.md: Status-Message)
        raw = message.encode("utf-8", "replace")
        fields.append((b"grpc-message", b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in raw)))
    return http2.encode_fields(fields)


def _timeout(value: bytes) -> float | None:
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


class ServerStream:
    """One call as its handler sees it: `metadata`, messages in (`recv_message`, async iteration), `send_message`."""

    __slots__ = ("id", "metadata", "_conn", "_type", "_queue", "_parts", "_off", "_have", "_need", "_owed", "_ended",
                 "_waiter", "_headers_sent", "_drained", "task")

    def __init__(self, conn: _Connection, stream_id: int, metadata: list[tuple[str, str]], request_type: Any) -> None:
        self.id = stream_id
        self.metadata = metadata
        self._conn = conn
        self._type = request_type
        self._queue: collections.deque[bytes] = collections.deque()
        self._parts: collections.deque[bytes] = collections.deque()  # received, not yet cut into messages
        self._off = 0  # where the unread bytes start in _parts[0]
        self._have = 0  # unread bytes in _parts
        self._need = -1  # the length of the message being read, or -1 while its 5-byte prefix is
        self._owed = 0  # flow-controlled bytes received and not yet given back to the peer
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._headers_sent = False
        self._drained: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    # -- from the connection ---------------------------------------------------------------------

    def feed(self, data: bytes, flow: int, end: bool) -> None:
        """DATA from the peer: complete messages queue for the handler. The windows are given back
        only while the handler waits for a message, so an idle handler holds at most a window."""
        self._owed += flow
        if data:
            self._parts.append(data)
            self._have += len(data)
        while True:
            if self._need < 0:
                if self._have < 5:
                    break
                prefix = self._take(5)
                if prefix[0]:
                    raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
                self._need = int.from_bytes(prefix[1:], "big")
                if self._need > MAX_MESSAGE_BYTES:
                    raise GRPCError(Status.RESOURCE_EXHAUSTED, f"message of {self._need} bytes (limit {MAX_MESSAGE_BYTES})")
            if self._have < self._need:
                break
            self._queue.append(self._take(self._need))
            self._need = -1
        if end:
            self._ended = True
        if self._waiter is not None and not self._waiter.done():
            if self._queue or self._ended:
                self._waiter.set_result(None)
            else:  # the handler waits for the rest of a message: let it come
                self._give_back()

    def _take(self, n: int) -> bytes:
        """The next `n` unread bytes. A message spread over many DATA frames is joined once, when it is
        complete (appending frame by frame would copy it once per frame: quadratic in its size)."""
        if not n:
            return b""  # an empty message (all fields default)
        first = self._parts[0]
        if len(first) - self._off >= n:
            out = first[self._off : self._off + n]
            self._off += n
            if self._off == len(first):
                self._parts.popleft()
                self._off = 0
        else:
            joined = b"".join(self._parts)
            out, rest = joined[self._off : self._off + n], joined[self._off + n :]
            self._parts.clear()
            self._off = 0
            if rest:
                self._parts.append(rest)
        self._have -= n
        return out

    def end(self) -> None:
        self._ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _give_back(self) -> None:
        if self._owed:
            self._conn.h2.consumed(self.id, self._owed)
            self._owed = 0
            self._conn.flush()

    # -- for the handler -------------------------------------------------------------------------

    async def recv_message(self) -> Any:
        """The next request message, or None once the client has half-closed."""
        while not self._queue:
            if self._ended:
                if self._have or self._need >= 0:
                    raise GRPCError(Status.INTERNAL, "the stream ended inside a message")
                return None
            self._give_back()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        msg = self._queue.popleft()
        if not self._queue:
            self._give_back()
        return self._type.FromString(msg)

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Any:
        msg = await self.recv_message()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def send_message(self, message: Any) -> None:
        data = message.SerializeToString()
        conn = self._conn
        if not self._headers_sent:
            self._headers_sent = True
            conn.h2.send_headers(self.id, http2.RESPONSE_HEADERS)
        waiting = conn.h2.send_data(self.id, len(data).to_bytes(5, "big") + data)
        conn.flush()
        while waiting > BACKPRESSURE_BYTES and not conn.lost:
            self._drained = asyncio.get_running_loop().create_future()
            conn.blocked.add(self)
            try:
                await self._drained
            finally:
                conn.blocked.discard(self)
            waiting = conn.h2.pending(self.id)

    def finish(self, status: int, message: str | None) -> None:
        """Trailers (or a trailers-only answer), then the stream is done on our side."""
        conn = self._conn
        block = _OK_TRAILERS if status == 0 and not message else _status_block(status, message)
        if not self._headers_sent:
            self._headers_sent = True
            block = http2.RESPONSE_HEADERS + block
        conn.h2.send_headers(self.id, block, end_stream=True)
        conn.flush()


class _Connection(asyncio.Protocol):
    """One client connection: frames to streams, streams to handler tasks."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.h2 = http2.Connection(window=WINDOW_BYTES, max_streams=MAX_STREAMS)
        self.streams: dict[int, ServerStream] = {}
        self.blocked: set[ServerStream] = set()  # handlers whose send waits for window
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods)
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.flush()

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.lost:
            self.transport.write(out)
            if self.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
                # a peer that sends (PINGs, SETTINGS) but never reads would grow this buffer without end
                log.warning("closing a gRPC connection: the peer does not read what it asks for")
                self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive(data)
        except http2.ProtocolError as e:
            log.warning("closing a gRPC connection: HTTP/2 protocol error from the peer: %s", e)
            self.flush()
            self._abort()
            return
        for ev in events:
            if isinstance(ev, http2.DataReceived):
                stream = self.streams.get(ev.stream_id)
                if stream is None:
                    self.h2.consumed(ev.stream_id, ev.flow_length)
                    continue
                try:
                    stream.feed(ev.data, ev.flow_length, ev.end_stream)
                except GRPCError as e:
                    self._fail(stream, e)
            elif isinstance(ev, http2.RequestReceived):
                self._start(ev)
            elif isinstance(ev, http2.StreamEnded):
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.end()
            elif isinstance(ev, http2.StreamReset):
                stream = self.streams.pop(ev.stream_id, None)
                if stream is not None and stream.task is not None:
                    stream.task.cancel()
        for stream in list(self.blocked):  # window updates may have let their data out
            if self.h2.pending(stream.id) <= BACKPRESSURE_BYTES:
                stream.drained()
        self.flush()

    def _start(self, ev: http2.RequestReceived) -> None:
        path = method = ctype = b""
        timeout = None
        metadata: list[tuple[str, str]] = []
        for k, v in ev.headers:
            if k[:1] == b":":
                if k == b":path":
                    path = v
                elif k == b":method":
                    method = v
            elif k == b"content-type":
                ctype = v
            elif k == b"grpc-timeout":
                timeout = _timeout(v)
            elif k not in _RESERVED and not k.endswith(b"-bin"):
                metadata.append((k.decode("latin-1"), v.decode("latin-1")))
        handler = self.server.handlers.get(path.decode("latin-1"))
        sid = ev.stream_id
        if method != b"POST" or not ctype.startswith(b"application/grpc"):
            self.h2.send_headers(sid, http2.STATUS_415, end_stream=True)  # what gRPC asks of a server (PROTOCOL-HTTP2.md)
            return
        stream = ServerStream(self, sid, metadata, handler.request_type if handler is not None else None)
        self.streams[sid] = stream
        if handler is None:
            stream.finish(Status.UNIMPLEMENTED.value, f"method {path.decode('latin-1')!r} not found")
            self.streams.pop(sid, None)
            return
        if ev.end_stream:
            stream._ended = True
        stream.task = asyncio.get_running_loop().create_task(self._run(stream, handler.func, timeout))

    async def _run(self, stream: ServerStream, func: Callable[[Any], Awaitable[None]], timeout: float | None) -> None:
        status, message = 0, None
        try:
            if timeout is None:
                await func(stream)
            else:
                async with asyncio.timeout(timeout):
                    await func(stream)
        except GRPCError as e:
            status, message = e.status.value, e.message
        except TimeoutError:
            status, message = Status.DEADLINE_EXCEEDED.value, "deadline exceeded"
        except asyncio.CancelledError:
            if self.streams.pop(stream.id, None) is not None and not self.lost:  # cancelled by us, not by the peer
                self.h2.reset(stream.id, http2.CANCEL)
                self.flush()
            return
        except Exception:
            log.exception("gRPC handler failed")
            status, message = Status.INTERNAL.value, "internal error"
        if self.streams.pop(stream.id, None) is None or self.lost:
            return  # the peer reset the stream meanwhile
        stream.finish(status, message)

    def _fail(self, stream: ServerStream, error: GRPCError) -> None:
        self.streams.pop(stream.id, None)
        if stream.task is not None:
            stream.task.cancel()
        stream.finish(error.status.value, error.message)  # its end asks a peer still sending to stop (http2._ended_here)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        for stream in list(self.blocked):
            stream.drained()
        self.streams.clear()

    def close(self) -> None:
        """GOAWAY, then close once what is queued is out."""
        if not self.lost:
            self.h2.goaway()
            self.flush()
            self._abort()


class GrpcServer:
    """The gRPC server with draining: `services` are tracked and refused while stopping, `always` (health) never."""

    def __init__(self, services: list[Servable], always: list[Servable]) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.handlers: dict[str, Handler] = {}
        for s in services:
            for path, h in s.__mapping__().items():
                self.handlers[path] = h._replace(func=self.tracked(h.func))
        for s in always:
            self.handlers.update(s.__mapping__())
        self.connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    def tracked(self, fn: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def run(stream: Any) -> None:
            if self.draining:
                raise GRPCError(Status.UNAVAILABLE, "extproc is shutting down")
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
        loop = asyncio.get_running_loop()
        if addr.startswith("unix:"):
            path = unix_socket_path(addr)
            if os.path.exists(path):
                os.unlink(path)  # a socket left by a process that did not stop cleanly
            self._server = await loop.create_unix_server(lambda: _Connection(self), path)
            os.chmod(path, socket_mode)
            return
        host, _, port = addr.rpartition(":")
        self._server = await loop.create_server(lambda: _Connection(self), host.strip("[]") or None, int(port), reuse_port=True)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, give the ones in flight up to `grace` seconds, cancel the rest, close."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        # asyncio's Server.wait_closed also waits for every open connection to close, which a client that
        # keeps its HTTP/2 connection (Envoy, a probe's channel) may never do: the calls are over, so bound it.
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_WAIT_S)
