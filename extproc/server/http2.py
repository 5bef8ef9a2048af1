"""The server side of HTTP/2, as much as gRPC needs, sans-IO: bytes in, events out, bytes to send.

Why not h2: the service's hot path is four small gRPC messages per call, and h2
(with hyperframe and grpclib over it) validated, wrapped and logged every frame
in Python: ~60% of a no-op ext_proc's CPU per call (`python -m bench.profile
--filter noop-grpclib`). A gRPC server needs far less of HTTP/2: it never
pushes, never sends priorities, and its own header blocks are a handful of
constants, so they are encoded without HPACK's dynamic table (RFC 7541 allows
any encoder to). What it receives it still checks as RFC 9113 asks of a
server: the preface, frame sizes, stream ids and states, header blocks
(decoded by `hpack`, with its size limits), flow control in both directions.
A peer that breaks the protocol gets GOAWAY and the connection closes.

Flow control: a stream's and the connection's receive windows are given back
only as the application takes the data (`consumed`), so what a peer can make
the process hold is bounded by the windows (16 MiB per connection). Outgoing
data waits in the stream for window; trailers go out after it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

_HEADER_TABLE_SIZE, _ENABLE_PUSH, _MAX_CONCURRENT_STREAMS, _INITIAL_WINDOW_SIZE, _MAX_FRAME_SIZE, _MAX_HEADER_LIST_SIZE = range(1, 7)

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
MAX_FRAME = 16_384  # what we accept (the default; we never raise it)
HEADER_LIST_LIMIT = 64 * 1024  # decoded size of one header block (names + values + 32 each)
HEADER_BLOCK_LIMIT = 64 * 1024  # encoded size, HEADERS and CONTINUATION together


class ProtocolError(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY(`code`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- events -------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestReceived:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    end_stream: bool


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    flow_length: int  # what it cost the windows (padding included): give it back with `consumed`
    end_stream: bool


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM on trailers or an empty frame)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    code: int


@dataclass(slots=True)
class ConnectionEnded:
    """GOAWAY from the peer: no new streams; the ones up to `last_stream_id` may finish."""

    code: int
    last_stream_id: int


Event = RequestReceived | DataReceived | StreamEnded | StreamReset | ConnectionEnded


# -- header blocks we send: static table and literals only ---------------------------------------


def _int(value: int, prefix: int, flags: int) -> bytes:
    """HPACK integer (RFC 7541 5.1)."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes([flags | value])
    out = bytearray([flags | top])
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + _int(len(name), 7, 0) + name + _int(len(value), 7, 0) + value


STATUS_200 = b"\x88"  # static table index 8
STATUS_415 = b"\x08" + _int(3, 7, 0) + b"415"  # literal, name :status (static index 8)
GRPC_CONTENT_TYPE = b"\x0f\x10" + _int(16, 7, 0) + b"application/grpc"  # name: static index 31
RESPONSE_HEADERS = STATUS_200 + GRPC_CONTENT_TYPE


def encode_fields(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(_literal(k, v) for k, v in fields)


# -- the connection ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    send_window: int
    recv_window: int
    remote_closed: bool = False
    local_closed: bool = False
    unacked: int = 0  # consumed, not yet given back
    pending: bytearray = field(default_factory=bytearray)  # data waiting for window
    trailers: bytes | None = None  # a header block to send (END_STREAM) once `pending` is out


class Connection:
    """One server connection. `receive(bytes)` returns events; whatever must go out (answers to the
    peer's frames, our data) collects in the outgoing buffer that `data_to_send()` empties."""

    def __init__(self, *, window: int, max_streams: int) -> None:
        self.window = window
        self.max_streams = max_streams
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        self.closed = False
        self._out = bytearray()
        self._buf = b""
        self._preface = False
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = HEADER_LIST_LIMIT
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_end_stream = False
        self._last_block: bytes | None = None  # see _decode
        self._last_head: object = None  # the table's newest entry then (kept alive: compared by identity)
        self._last_shape: tuple[int, int] = (-1, -1)
        self._last_fields: list[tuple[bytes, bytes]] = []
        self._send_window = DEFAULT_WINDOW  # the connection's, granted by the peer
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = MAX_FRAME
        self._table_size_update: int | None = None  # the peer lowered HEADER_TABLE_SIZE: say so first
        self._encoder_table = 4096
        self._recv_window = window  # the connection's, after the WINDOW_UPDATE below
        self._recv_unacked = 0  # consumed, not yet given back
        self._settings_frame(
            [(_MAX_CONCURRENT_STREAMS, max_streams), (_INITIAL_WINDOW_SIZE, window), (_ENABLE_PUSH, 0),
             (_MAX_HEADER_LIST_SIZE, HEADER_LIST_LIMIT)]
        )
        self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - DEFAULT_WINDOW))

    # -- out ---------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        n = len(payload)
        self._out += struct.pack(">HBBBI", n >> 8, n & 0xFF, kind, flags, stream_id)
        self._out += payload

    def _settings_frame(self, pairs: list[tuple[int, int]]) -> None:
        self._frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))

    def send_headers(self, stream_id: int, block: bytes, *, end_stream: bool = False) -> None:
        """A header block for `stream_id` (encoded by this module: static table and literals)."""
        st = self.streams.get(stream_id)
        if st is None or st.local_closed:
            return
        if self._table_size_update is not None:
            block = _int(self._table_size_update, 5, 0x20) + block
            self._table_size_update = None
        if end_stream and st.pending:
            st.trailers = block  # after the data that waits for window
            st.local_closed = True
            return
        self._header_frames(stream_id, block, end_stream)
        if end_stream:
            st.local_closed = True
            self._ended_here(stream_id, st)

    def _header_frames(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        limit = self._peer_max_frame
        first, rest = block[:limit], block[limit:]
        self._frame(HEADERS, (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS), stream_id, first)
        while rest:
            part, rest = rest[:limit], rest[limit:]
            self._frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, part)

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Queue `data` on the stream; returns how many bytes still wait for window."""
        st = self.streams.get(stream_id)
        if st is None or st.local_closed:
            return 0
        if not st.pending and len(data) <= st.send_window and len(data) <= self._send_window and len(data) <= self._peer_max_frame:
            st.send_window -= len(data)  # the common case: one small message, one frame
            self._send_window -= len(data)
            self._frame(DATA, 0, stream_id, data)
            return 0
        st.pending += data
        self._pump(stream_id, st)
        return len(st.pending)

    def _pump(self, stream_id: int, st: _Stream) -> None:
        while st.pending:
            n = min(len(st.pending), st.send_window, self._send_window, self._peer_max_frame)
            if n <= 0:
                return
            chunk = bytes(st.pending[:n])
            del st.pending[:n]
            st.send_window -= n
            self._send_window -= n
            self._frame(DATA, 0, stream_id, chunk)
        if st.trailers is not None:
            self._header_frames(stream_id, st.trailers, True)
            st.trailers = None
            self._ended_here(stream_id, st)

    def pending(self, stream_id: int) -> int:
        st = self.streams.get(stream_id)
        return len(st.pending) if st is not None else 0

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM from our side; the stream is forgotten."""
        if self.streams.pop(stream_id, None) is not None:
            self._frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took `n` flow-controlled bytes of `stream_id`: give them back to the windows
        once half of a window is owed, so a steady stream of small messages costs few updates."""
        if n <= 0:
            return
        self._recv_unacked += n
        if self._recv_unacked >= self.window // 2:
            self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        st = self.streams.get(stream_id)
        if st is None or st.remote_closed:
            return
        st.unacked += n
        if st.unacked >= self.window // 2:
            self._frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", st.unacked))
            st.recv_window += st.unacked
            st.unacked = 0

    def goaway(self, code: int = NO_ERROR, message: bytes = b"") -> None:
        self._frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, code) + message)

    def _ended_here(self, stream_id: int, st: _Stream) -> None:
        """Our side is complete: a peer still sending is asked to stop (RST_STREAM NO_ERROR, RFC 9113 8.1)."""
        if not st.remote_closed:
            self._frame(RST_STREAM, 0, stream_id, struct.pack(">I", NO_ERROR))
        self.streams.pop(stream_id, None)

    def _maybe_forget(self, stream_id: int, st: _Stream) -> None:
        if st.local_closed and st.remote_closed and not st.pending and st.trailers is None:
            self.streams.pop(stream_id, None)

    # -- in ----------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Frames in, events out. Raises ProtocolError (after queueing GOAWAY) when the peer broke HTTP/2."""
        try:
            return self._receive(data)
        except ProtocolError as e:
            self.goaway(e.code, str(e).encode()[:256])
            self.closed = True
            raise

    def _receive(self, data: bytes) -> list[Event]:
        buf = self._buf + data if self._buf else data
        pos = 0
        if not self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._buf = buf
                return []
            if not buf.startswith(PREFACE):
                raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._preface = True
            pos = len(PREFACE)
        events: list[Event] = []
        end = len(buf)
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > MAX_FRAME:
                raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if end - pos - 9 < length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = buf[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if self._block is not None and (kind != CONTINUATION or sid != self._block_stream):
                raise ProtocolError(PROTOCOL_ERROR, "a header block interrupted")
            if kind == DATA:
                self._on_data(sid, flags, payload, events)
            elif kind == HEADERS:
                self._on_headers(sid, flags, payload, events)
            elif kind == CONTINUATION:
                self._on_continuation(sid, flags, payload, events)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif kind == SETTINGS:
                self._on_settings(sid, flags, payload)
            elif kind == PING:
                if sid or length != 8:
                    raise ProtocolError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
                if not flags & ACK:
                    self._frame(PING, ACK, 0, payload)
            elif kind == RST_STREAM:
                if not sid or length != 4:
                    raise ProtocolError(PROTOCOL_ERROR if not sid else FRAME_SIZE_ERROR, "bad RST_STREAM")
                if sid > self.last_stream_id:
                    raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
                if self.streams.pop(sid, None) is not None:
                    events.append(StreamReset(sid, int.from_bytes(payload, "big")))
            elif kind == GOAWAY:
                if sid or length < 8:
                    raise ProtocolError(PROTOCOL_ERROR, "bad GOAWAY")
                last, code = struct.unpack_from(">II", payload)
                events.append(ConnectionEnded(code, last & 0x7FFFFFFF))
            elif kind == PRIORITY:
                if not sid or length != 5:
                    raise ProtocolError(PROTOCOL_ERROR if not sid else FRAME_SIZE_ERROR, "bad PRIORITY")
            elif kind == PUSH_PROMISE:
                raise ProtocolError(PROTOCOL_ERROR, "a client sent PUSH_PROMISE")
            # other frame types are extensions: ignored (RFC 9113 4.1)
        self._buf = buf[pos:] if pos < end else b""
        return events

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_data(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        st = self.streams.get(sid)
        n = len(payload)
        self._recv_window -= n
        if self._recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        if st is None:
            if sid > self.last_stream_id:
                raise ProtocolError(PROTOCOL_ERROR, "DATA on an idle stream")
            # a stream we reset or finished: the data still counted against the connection window
            self.consumed(0, n)
            return
        if st.remote_closed:
            raise ProtocolError(STREAM_CLOSED, "DATA after END_STREAM")
        if n > st.recv_window:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA beyond the stream's window")
        st.recv_window -= n
        data = self._unpad(flags, payload)
        end = bool(flags & END_STREAM)
        if end:
            st.remote_closed = True
        events.append(DataReceived(sid, data, n, end))
        if end:
            self._maybe_forget(sid, st)

    def _on_headers(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
                raise ProtocolError(PROTOCOL_ERROR, "a stream depending on itself")
            payload = payload[5:]
        self._block_stream, self._block_end_stream = sid, bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._header_block(payload, events)
        else:
            self._block = bytearray(payload)

    def _on_continuation(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if self._block is None:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        self._block += payload
        if len(self._block) > HEADER_BLOCK_LIMIT:
            raise ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block, self._block = bytes(self._block), None
            self._header_block(block, events)

    def _header_block(self, block: bytes, events: list[Event]) -> None:
        sid, end = self._block_stream, self._block_end_stream
        fields = self._decode(block)
        st = self.streams.get(sid)
        if st is not None:  # trailers: gRPC clients send none, but they must end the stream
            if st.remote_closed or not end:
                raise ProtocolError(PROTOCOL_ERROR, "HEADERS on a stream that already has them")
            st.remote_closed = True
            events.append(StreamEnded(sid))
            self._maybe_forget(sid, st)
            return
        if sid % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, "a client stream with an even id")
        if sid <= self.last_stream_id:
            return  # a stream that is over here (we may have reset it): ignored, its block decoded above
        self.last_stream_id = sid
        if self.closed:
            return
        if len(self.streams) >= self.max_streams:
            self._frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM))
            return
        self.streams[sid] = _Stream(send_window=self._peer_initial_window, recv_window=self.window, remote_closed=end)
        events.append(RequestReceived(sid, fields, end))

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """hpack's decode, remembered for the last block: Envoy opens every ext_proc stream with the same
        block, whose `:path` is a Huffman-coded literal it never indexes (a third of the transport's CPU).
        The remembered fields are valid while the dynamic table is the one that decoded them: a block that
        inserts or resizes is never remembered, and any other block leaves the table as it was."""
        table = self._decoder.header_table
        entries = table.dynamic_entries
        head, shape = entries[0] if entries else None, (len(entries), table.maxsize)
        if block == self._last_block and head is self._last_head and shape == self._last_shape:
            return self._last_fields
        try:
            headers = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as e:  # the table is now out of step with the peer's: nothing can follow
            raise ProtocolError(COMPRESSION_ERROR, f"header block: {e}") from None
        fields = [(bytes(k), bytes(v)) for k, v in headers]
        if (entries[0] if entries else None) is head and (len(entries), table.maxsize) == shape:  # held by identity
            self._last_block, self._last_head, self._last_shape, self._last_fields = block, head, shape, fields
        return fields

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise ProtocolError(PROTOCOL_ERROR, "a zero window increment")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window past 2^31-1")
            for stream_id, waiting in list(self.streams.items()):
                if waiting.pending or waiting.trailers is not None:
                    self._pump(stream_id, waiting)
            return
        st = self.streams.get(sid)
        if st is None:
            if sid > self.last_stream_id:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not inc:
            self.reset(sid, PROTOCOL_ERROR)
            return
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            self.reset(sid, FLOW_CONTROL_ERROR)
            return
        if st.pending or st.trailers is not None:
            self._pump(sid, st)

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == _INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "initial window past 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
            elif key == _MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= 2**24 - 1:
                    raise ProtocolError(PROTOCOL_ERROR, "max frame size out of range")
                self._peer_max_frame = value
            elif key == _HEADER_TABLE_SIZE:
                if value < self._encoder_table:  # our blocks use no dynamic table, but must say it shrank
                    self._encoder_table = value
                    self._table_size_update = value
            elif key == _ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
        self._frame(SETTINGS, ACK, 0)
        for stream_id, st in list(self.streams.items()):
            if st.pending or st.trailers is not None:
                self._pump(stream_id, st)
