"""server/http2.py, sans-IO: frames in, events and frames out, as RFC 9113 asks of a server.

The peer here is hand-built frames (and hpack's encoder for header blocks), so
every rule is checked on the bytes: the preface, header blocks and their
CONTINUATIONs, padding, stream ids, both directions of flow control, SETTINGS,
PING, RST_STREAM, and the remembered header block (`_decode`)."""

from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.server import http2
from extproc.server.http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    DataReceived,
    ProtocolError,
    RequestReceived,
    StreamEnded,
    StreamReset,
)

WINDOW = 1024 * 1024
REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Method"), (":authority", "x"),
           ("content-type", "application/grpc"), ("te", "trailers")]


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, kind, flags, sid) + payload


def parse(out: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, pos = [], 0
    while pos < len(out):
        n = int.from_bytes(out[pos : pos + 3], "big")
        kind, flags, sid = out[pos + 3], out[pos + 4], int.from_bytes(out[pos + 5 : pos + 9], "big")
        frames.append((kind, flags, sid, out[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return frames


class Peer:
    """A client: its preface and SETTINGS sent, our opening frames read."""

    def __init__(self, window: int = WINDOW, max_streams: int = 100) -> None:
        self.conn = Connection(window=window, max_streams=max_streams)
        self.enc = hpack.Encoder()
        self.opening = parse(self.conn.data_to_send())
        assert self.conn.receive(PREFACE + frame(SETTINGS, 0, 0)) == []
        assert parse(self.conn.data_to_send()) == [(SETTINGS, http2.ACK, 0, b"")]

    def send(self, data: bytes) -> list[http2.Event]:
        return self.conn.receive(data)

    def open(self, sid: int, *, end: bool = False, extra: list[tuple[str, str]] | None = None) -> list[http2.Event]:
        block = self.enc.encode(REQUEST + (extra or []))
        return self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block))

    def out(self) -> list[tuple[int, int, int, bytes]]:
        return parse(self.conn.data_to_send())

    def error(self, data: bytes) -> int:
        with pytest.raises(ProtocolError) as e:
            self.send(data)
        goaway = [f for f in self.out() if f[0] == GOAWAY]
        assert len(goaway) == 1 and int.from_bytes(goaway[0][3][4:8], "big") == e.value.code
        return e.value.code


def test_opening_frames_grant_the_windows_and_refuse_push():
    peer = Peer(window=WINDOW, max_streams=7)
    (s_kind, _, _, payload), (w_kind, _, w_sid, inc) = peer.opening
    assert s_kind == SETTINGS and w_kind == WINDOW_UPDATE and w_sid == 0
    pairs = dict(struct.unpack_from(">HI", payload, i) for i in range(0, len(payload), 6))
    assert pairs[0x3] == 7 and pairs[0x4] == WINDOW and pairs[0x2] == 0
    assert int.from_bytes(inc, "big") == WINDOW - http2.DEFAULT_WINDOW


def test_the_preface_may_arrive_in_pieces_and_must_be_exact():
    conn = Connection(window=WINDOW, max_streams=10)
    conn.data_to_send()
    for i in range(len(PREFACE)):
        assert conn.receive(PREFACE[i : i + 1]) == []
    assert conn.receive(frame(SETTINGS, 0, 0)) == []
    bad = Connection(window=WINDOW, max_streams=10)
    with pytest.raises(ProtocolError):
        bad.receive(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError):
        Connection(window=WINDOW, max_streams=10).receive(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")


def test_a_request_its_messages_and_its_end():
    peer = Peer()
    [req] = peer.open(1, extra=[("x-extproc-caller-token", "t")])
    assert isinstance(req, RequestReceived) and req.stream_id == 1 and not req.end_stream
    assert (b":path", b"/pkg.Svc/Method") in req.headers and (b"x-extproc-caller-token", b"t") in req.headers
    [data] = peer.send(frame(DATA, 0, 1, b"hello"))
    assert data == DataReceived(1, b"hello", 5, False)
    [last] = peer.send(frame(DATA, END_STREAM, 1, b""))
    assert last == DataReceived(1, b"", 0, True)
    with_end = peer.open(3, end=True)
    assert with_end[0].end_stream  # type: ignore[union-attr]


def test_frames_split_anywhere_are_the_same_frames():
    whole = Peer()
    wire = frame(HEADERS, END_HEADERS, 1, whole.enc.encode(REQUEST)) + frame(DATA, 0, 1, b"abc") + frame(DATA, END_STREAM, 1, b"de")
    expect = whole.send(wire)
    for cut in range(1, len(wire)):
        peer = Peer()
        peer.enc = hpack.Encoder()
        got = peer.send(wire[:cut]) + peer.send(wire[cut:])
        assert got == expect


def test_continuation_assembles_and_nothing_may_interleave():
    peer = Peer()
    block = peer.enc.encode(REQUEST + [("x-big", "v" * 3000)])
    a, b, c = block[:10], block[10:20], block[20:]
    assert peer.send(frame(HEADERS, 0, 1, a) + frame(CONTINUATION, 0, 1, b)) == []
    [req] = peer.send(frame(CONTINUATION, END_HEADERS, 1, c))
    assert (b"x-big", b"v" * 3000) in req.headers  # type: ignore[union-attr]
    other = Peer()
    other_block = other.enc.encode(REQUEST)
    assert other.error(frame(HEADERS, 0, 1, other_block[:5]) + frame(PING, 0, 0, b"12345678")) == http2.PROTOCOL_ERROR
    assert Peer().error(frame(CONTINUATION, END_HEADERS, 1, b"\x82")) == http2.PROTOCOL_ERROR


def test_a_header_block_past_the_limit_ends_the_connection():
    peer = Peer()
    flood = peer.send(frame(HEADERS, 0, 1, peer.enc.encode(REQUEST)))
    assert flood == []
    chunk = frame(CONTINUATION, 0, 1, b"\x00" * 16_000)
    with pytest.raises(ProtocolError) as e:
        for _ in range(10):
            peer.send(chunk)
    assert e.value.code == http2.ENHANCE_YOUR_CALM


def test_a_header_list_past_its_limit_is_a_compression_error():
    peer = Peer()
    block = peer.enc.encode(REQUEST + [("x", "y")] * 2100)  # ~12 KB on the wire, ~71 KB decoded (32 bytes a field)
    assert len(block) < http2.HEADER_BLOCK_LIMIT
    frames = b"".join(frame(CONTINUATION if i else HEADERS, END_HEADERS if i + 16_000 >= len(block) else 0, 1, block[i : i + 16_000])
                      for i in range(0, len(block), 16_000))
    assert peer.error(frames) == http2.COMPRESSION_ERROR


def test_padding_is_removed_and_still_costs_window():
    peer = Peer()
    peer.open(1)
    [data] = peer.send(frame(DATA, PADDED, 1, bytes([4]) + b"abc" + b"\x00" * 4))
    assert data.data == b"abc" and data.flow_length == 8  # type: ignore[union-attr]
    assert Peer().error(frame(DATA, PADDED, 1, bytes([9]) + b"abc")) == http2.PROTOCOL_ERROR


def test_stream_ids_must_be_odd_and_increasing():
    assert Peer().error(frame(HEADERS, END_HEADERS, 2, hpack.Encoder().encode(REQUEST))) == http2.PROTOCOL_ERROR
    peer = Peer()
    peer.open(5)
    assert peer.open(3) == []  # a stream that is over here: its block is decoded and ignored
    assert Peer().error(frame(DATA, 0, 7, b"x")) == http2.PROTOCOL_ERROR  # idle
    assert Peer().error(frame(DATA, 0, 0, b"x")) == http2.PROTOCOL_ERROR


def test_frames_larger_than_we_accept_and_push_promises_end_the_connection():
    big = frame(DATA, 0, 1, b"x" * (http2.MAX_FRAME + 1))
    assert Peer().error(big) == http2.FRAME_SIZE_ERROR
    assert Peer().error(frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02")) == http2.PROTOCOL_ERROR


def test_receive_windows_are_enforced_and_given_back_as_the_application_reads():
    peer = Peer(window=64 * 1024)
    peer.open(1)
    for _ in range(4):  # the whole stream window, 16 KiB at a time
        peer.send(frame(DATA, 0, 1, b"x" * 16_384))
    assert peer.out() == []
    with pytest.raises(ProtocolError) as e:
        peer.send(frame(DATA, 0, 1, b"x"))
    assert e.value.code == http2.FLOW_CONTROL_ERROR
    peer = Peer(window=64 * 1024)
    peer.open(1)
    peer.send(frame(DATA, 0, 1, b"x" * 16_384))
    peer.conn.consumed(1, 16_384)
    assert peer.out() == []  # under half a window: nothing said yet
    peer.send(frame(DATA, 0, 1, b"x" * 16_384))
    peer.conn.consumed(1, 16_384)
    updates = {(sid, int.from_bytes(p, "big")) for kind, _, sid, p in peer.out() if kind == WINDOW_UPDATE}
    assert updates == {(0, 32_768), (1, 32_768)}
    for _ in range(3):  # the window is open again
        peer.send(frame(DATA, 0, 1, b"x" * 16_384))


def test_data_on_a_stream_that_is_over_still_counts_against_the_connection():
    peer = Peer(window=64 * 1024)
    peer.open(1)
    peer.conn.reset(1, http2.CANCEL)
    assert [f[0] for f in peer.out()] == [RST_STREAM]
    for _ in range(8):  # twice the connection window: given back, since nobody will read it
        assert peer.send(frame(DATA, 0, 1, b"x" * 16_384)) == []
    assert any(kind == WINDOW_UPDATE and sid == 0 for kind, _, sid, _ in peer.out())


def test_send_waits_for_window_and_trailers_wait_for_the_data():
    peer = Peer()
    peer.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 10)))  # initial window 10
    peer.out()
    peer.open(1, end=True)
    peer.conn.send_headers(1, http2.RESPONSE_HEADERS)
    assert peer.conn.send_data(1, b"0123456789abcdef") == 6
    peer.conn.send_headers(1, b"trailers", end_stream=True)
    frames = peer.out()
    assert [(k, p) for k, _, _, p in frames] == [(HEADERS, http2.RESPONSE_HEADERS), (DATA, b"0123456789")]
    peer.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)))
    frames = peer.out()
    assert [(k, f, p) for k, f, _, p in frames] == [(DATA, 0, b"abcdef"), (HEADERS, END_STREAM | END_HEADERS, b"trailers")]
    assert 1 not in peer.conn.streams


def test_the_connection_window_limits_every_stream():
    peer = Peer()
    peer.open(1, end=True)
    peer.open(3, end=True)
    assert peer.conn.send_data(1, b"a" * 60_000) == 0
    assert peer.conn.send_data(3, b"b" * 10_000) == 10_000 - (http2.DEFAULT_WINDOW - 60_000)
    peer.out()
    peer.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1_000_000)))
    assert sum(len(p) for k, _, sid, p in peer.out() if k == DATA and sid == 3) == 10_000 - 5_535


def test_large_data_goes_in_frames_of_the_peers_maximum():
    peer = Peer()
    peer.open(1, end=True)
    peer.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1_000_000)) + frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1_000_000)))
    peer.out()
    peer.conn.send_data(1, b"z" * 40_000)
    sizes = [len(p) for k, _, _, p in peer.out() if k == DATA]
    assert sizes == [16_384, 16_384, 40_000 - 32_768]


def test_settings_change_windows_and_header_table_size_is_announced():
    peer = Peer()
    peer.open(1, end=True)
    peer.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0)))
    assert peer.out() == [(SETTINGS, http2.ACK, 0, b"")]
    assert peer.conn.send_data(1, b"abc") == 3  # no window at all now
    peer.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2) + struct.pack(">HI", 0x1, 0)))
    frames = peer.out()
    assert (DATA, 0, 1, b"ab") in frames
    peer.conn.send_headers(1, http2.RESPONSE_HEADERS)
    [(_, _, _, block)] = [f for f in peer.out() if f[0] == HEADERS]
    decoder = hpack.Decoder()
    decoder.header_table_size = 0
    assert block[:1] == b"\x20"  # a dynamic table size update to 0 comes first
    assert decoder.decode(block) == [(":status", "200"), ("content-type", "application/grpc")]
    assert Peer().error(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31))) == http2.FLOW_CONTROL_ERROR
    assert Peer().error(frame(SETTINGS, 0, 0, b"\x00\x04\x00")) == http2.FRAME_SIZE_ERROR
    assert Peer().error(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 100))) == http2.PROTOCOL_ERROR


def test_ping_is_echoed_and_reset_streams_are_reported():
    peer = Peer()
    peer.send(frame(PING, 0, 0, b"abcdefgh"))
    assert peer.out() == [(PING, http2.ACK, 0, b"abcdefgh")]
    peer.open(1)
    assert peer.send(frame(RST_STREAM, 0, 1, struct.pack(">I", http2.CANCEL))) == [StreamReset(1, http2.CANCEL)]
    assert peer.conn.streams == {}
    assert Peer().error(frame(RST_STREAM, 0, 9, struct.pack(">I", 0))) == http2.PROTOCOL_ERROR


def test_trailers_from_the_client_end_its_side():
    peer = Peer()
    peer.open(1)
    assert peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, peer.enc.encode([("x-t", "1")]))) == [StreamEnded(1)]
    peer.open(3)
    assert peer.error(frame(HEADERS, END_HEADERS, 3, peer.enc.encode([("x-t", "1")]))) == http2.PROTOCOL_ERROR


def test_streams_past_the_limit_are_refused():
    peer = Peer(max_streams=2)
    assert peer.open(1) and peer.open(3)
    assert peer.open(5) == []
    assert peer.out() == [(RST_STREAM, 0, 5, struct.pack(">I", http2.REFUSED_STREAM))]


def test_an_answer_complete_before_the_request_asks_the_peer_to_stop():
    peer = Peer()
    peer.open(1)
    peer.conn.send_headers(1, http2.RESPONSE_HEADERS + http2.encode_fields([(b"grpc-status", b"0")]), end_stream=True)
    frames = peer.out()
    assert [k for k, *_ in frames] == [HEADERS, RST_STREAM] and frames[1][3] == struct.pack(">I", http2.NO_ERROR)
    assert peer.send(frame(DATA, END_STREAM, 1, b"late")) == []  # ignored, not an error


def test_our_header_blocks_decode_as_meant():
    block = http2.RESPONSE_HEADERS + http2.encode_fields([(b"grpc-status", b"16"), (b"grpc-message", b"x" * 300)])
    assert hpack.Decoder().decode(block) == [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "16"),
                                             ("grpc-message", "x" * 300)]
    assert hpack.Decoder().decode(http2.STATUS_415) == [(":status", "415")]


headers_st = st.lists(st.tuples(st.sampled_from(["x-a", "x-b", "x-c", ":path", "x-request-id"]),
                                st.sampled_from(["1", "2", "a-longer-value", "/p.S/M", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"])),
                      min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(headers_st, st.booleans()), min_size=1, max_size=12), st.sampled_from([64, 128, 4096]))
def test_the_remembered_block_always_decodes_as_hpack_does(requests, table_size):
    """Blocks repeat (the cache is used) while the table fills, evicts and resizes: every decode equals a
    plain hpack decoder's on the same bytes, and a block hpack refuses (a repeat that names an entry its
    first decode evicted) is refused here too."""
    peer = Peer(max_streams=1000)
    enc = hpack.Encoder()
    enc.header_table_size = table_size
    reference = hpack.Decoder()
    sid = 1
    for headers, repeat in requests:
        block = enc.encode(headers)
        for _ in range(2 if repeat else 1):
            try:
                expect = [(k.encode(), v.encode()) for k, v in reference.decode(block)]
            except hpack.HPACKError:
                with pytest.raises(ProtocolError):
                    peer.send(frame(HEADERS, END_HEADERS | END_STREAM, sid, block))
                return
            [req] = peer.send(frame(HEADERS, END_HEADERS | END_STREAM, sid, block))
            assert req.headers == expect  # type: ignore[union-attr]
            sid += 2
