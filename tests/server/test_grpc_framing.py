"""Length-prefixed gRPC messages cut out of DATA however it arrives (server/grpc_server.py: ServerStream.feed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.server import grpc_server
from extproc.server.grpc_server import GRPCError, ServerStream, Status


def _framed(messages: list[bytes]) -> bytes:
    return b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)


def _stream() -> ServerStream:
    return ServerStream(None, 1, [], None)  # type: ignore[arg-type]  # feed needs no connection while nobody waits


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
def test_messages_come_out_whole_however_the_bytes_are_cut(messages, data):
    wire = _framed(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    stream = _stream()
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        stream.feed(wire[a:b], b - a, False)
    assert list(stream._queue) == messages


def test_a_large_message_in_many_frames_and_small_ones_in_one():
    big = bytes(range(256)) * 4096  # 1 MiB
    wire = _framed([big, b"", b"a"])
    stream = _stream()
    for i in range(0, len(wire), 16_384):
        stream.feed(wire[i : i + 16_384], 16_384, False)
    assert list(stream._queue) == [big, b"", b"a"]
    many = _stream()
    many.feed(_framed([b"x%d" % i for i in range(1000)]), 1, True)
    assert len(many._queue) == 1000 and many._queue[-1] == b"x999"


def test_compressed_and_oversized_messages_are_refused(monkeypatch):
    with pytest.raises(GRPCError) as compressed:
        _stream().feed(b"\x01\x00\x00\x00\x01a", 6, False)
    assert compressed.value.status is Status.UNIMPLEMENTED
    monkeypatch.setattr(grpc_server, "MAX_MESSAGE_BYTES", 10)
    with pytest.raises(GRPCError) as big:
        _stream().feed(b"\x00\x00\x00\x00\x0b", 5, False)  # refused on its prefix, before its bytes arrive
    assert big.value.status is Status.RESOURCE_EXHAUSTED
