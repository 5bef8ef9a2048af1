"""Content decoding: every coding, split at every byte, bounded against bombs."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import UpstreamError
from extproc.protocols.encoding import (
    ContentDecoder,
    DecodedTooLarge,
    DecodeError,
    UnsupportedEncoding,
    codings,
    content_decoder,
)
from tests.protocols.fixtures import RECORDED

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[import-not-found,no-redef]


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "deflate-raw": raw_deflate,  # sent as "deflate" by servers that skip the zlib wrapper
    "br": brotli.compress,
    "zstd": zstd.compress,
    "gzip, br": lambda d: brotli.compress(gzip.compress(d)),
    "zstd,gzip": lambda d: gzip.compress(zstd.compress(d)),
}


def header(name: str) -> str:
    return "deflate" if name == "deflate-raw" else name


BODY = RECORDED[0].body * 3


def decode(name: str, chunks: list[bytes], **kw: int) -> bytes:
    d = content_decoder(header(name), **kw)
    assert d is not None
    out = [p for c in chunks for p in d.feed(c)]
    out += list(d.finish())
    return b"".join(out)


@pytest.mark.parametrize("name", ENCODERS)
def test_every_split_offset(name: str) -> None:
    enc = ENCODERS[name](BODY)
    assert decode(name, [enc]) == BODY
    for i in range(len(enc) + 1):
        assert decode(name, [enc[:i], enc[i:]]) == BODY, i


@pytest.mark.parametrize("name", ENCODERS)
def test_byte_at_a_time_and_pieces_bounded_by_step(name: str) -> None:
    enc = ENCODERS[name](BODY)
    d = content_decoder(header(name), step=100)
    assert d is not None
    pieces = [p for i in range(len(enc)) for p in d.feed(enc[i : i + 1])] + list(d.finish())
    assert b"".join(pieces) == BODY
    assert max(map(len, pieces)) <= 100
    assert d.decoded_bytes == len(BODY)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(ENCODERS)), body=st.binary(max_size=3000))
def test_random_bodies_and_chunks(data: st.DataObject, name: str, body: bytes) -> None:
    enc = ENCODERS[name](body)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(enc)), max_size=10)))
    chunks = [enc[a:b] for a, b in zip([0, *cuts], [*cuts, len(enc)])]
    assert decode(name, chunks, step=data.draw(st.integers(1, 5000))) == body


@pytest.mark.parametrize("name", ["gzip", "deflate", "deflate-raw"])
def test_output_still_inside_zlib_when_the_input_is_used_up_is_drained(name: str) -> None:
    """A body whose last input bytes decode to more than one step: zlib keeps the rest after its input
    is consumed, and only a call with no new input lets it out (found by the test above: raw deflate of
    5 x 0x90, step 1, was "truncated"). A long run of spaces is the real-world shape."""
    for body, step in ((b"\x90" * 5, 1), (b" " * 200_000, 4096)):
        enc = ENCODERS[name](body)
        assert decode(name, [enc], step=step) == body
        assert decode(name, [enc[i : i + 1] for i in range(len(enc))], step=step) == body


def test_gzip_members_are_concatenated() -> None:
    enc = gzip.compress(b"first ") + gzip.compress(b"second")
    for i in range(len(enc) + 1):
        assert decode("gzip", [enc[:i], enc[i:]]) == b"first second"


def test_zstd_frames_are_concatenated() -> None:
    enc = zstd.compress(b"first ") + zstd.compress(b"second")
    for i in range(len(enc) + 1):
        assert decode("zstd", [enc[:i], enc[i:]]) == b"first second"


def test_decode_all_for_buffered_bodies() -> None:
    d = ContentDecoder("br")
    assert d.decode_all(brotli.compress(BODY)) == BODY


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_bomb_stops_at_the_cap_without_expanding(name: str) -> None:
    zeros = b"\0" * (64 << 20)
    bomb = brotli.compress(zeros, quality=4) if name == "br" else ENCODERS[name](zeros)  # KiB -> 64 MiB
    cap = 1 << 20
    d = content_decoder(name, max_decoded_bytes=cap, step=64 << 10)
    assert d is not None
    with pytest.raises(DecodedTooLarge):
        for i in range(0, len(bomb), 4096):
            for piece in d.feed(bomb[i : i + 4096]):
                assert len(piece) <= 64 << 10
    assert cap < d.decoded_bytes <= cap + (64 << 10)  # stopped one piece past the cap
    with pytest.raises(DecodedTooLarge):
        ContentDecoder(name, max_decoded_bytes=cap).decode_all(bomb)


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_truncated_body_is_a_decode_error_at_finish(name: str) -> None:
    enc = ENCODERS[name](BODY)
    d = content_decoder(name)
    assert d is not None
    got = b"".join(d.feed(enc[: len(enc) // 2]))
    assert BODY.startswith(got)  # what could be decoded came out
    with pytest.raises(DecodeError):
        list(d.finish())


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_corrupt_body_is_a_decode_error(name: str) -> None:
    enc = bytearray(ENCODERS[name](BODY))
    for i in range(0, len(enc), 3):
        enc[i] ^= 0x5A
    with pytest.raises(UpstreamError):
        decode(name, [bytes(enc)])


def test_header_parsing_and_unsupported_codings() -> None:
    assert codings(None) == [] and codings("") == [] and codings("identity") == []
    assert codings(" GZIP , br") == ["gzip", "br"]
    assert content_decoder(None) is None
    assert content_decoder("identity") is None
    for bad in ("compress", "gzip, snappy", "x"):
        with pytest.raises(UnsupportedEncoding):
            content_decoder(bad)
    with pytest.raises(ValueError):
        content_decoder("gzip", max_decoded_bytes=0)


def test_buffered_usage_through_the_decoder() -> None:
    from extproc.protocols import OPENAI_CHAT, Usage

    body = json.dumps({"id": "x", "usage": {"prompt_tokens": 12, "completion_tokens": 3}}).encode()
    d = content_decoder("gzip")
    assert d is not None
    assert OPENAI_CHAT.usage_from_body(d.decode_all(gzip.compress(body))) == Usage(
        input_tokens=12, output_tokens=3
    )
