"""Incremental, bounded decoding of compressed response bodies (a side reader).

We ask backends for `accept-encoding: identity`, but some compress anyway.
Usage must still be read, so the body is decoded *beside* the forwarded
bytes: the client gets the backend's compressed bytes untouched, and only a
decoded copy is parsed. Nothing here rewrites a body.

    decoder = content_decoder(headers.get("content-encoding"))   # None: identity
    for piece in decoder.feed(chunk): ...        # decoded bytes, each <= step
    for piece in decoder.finish(): ...           # end of body (DecodeError if truncated)
    body = decoder.decode_all(whole_body)        # buffered JSON bodies

Bounds: no call ever produces a piece larger than `step` bytes, so a caller
that consumes the pieces one by one (the SSE parser does) holds at most one
of them; and the decoded total is capped (`DecodedTooLarge` past
`max_decoded_bytes`), so a zip bomb costs at most that much CPU and, for
`decode_all`, that much memory.

Codings: gzip (and x-gzip; several members), deflate (zlib-wrapped, or raw as
some servers send it: told apart by the first two bytes), br, zstd (several
frames; needs Python 3.14's `compression.zstd` or the `backports.zstd`
package) and identity. A list ("gzip, br") is undone last-applied first.
An unknown coding raises `UnsupportedEncoding` when the decoder is made.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from extproc.errors import UpstreamError

try:
    import brotli
except ImportError:  # pragma: no cover - a runtime dependency
    brotli = None

try:
    from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
except ImportError:
    try:
        from backports import zstd
    except ImportError:  # pragma: no cover - optional
        zstd = None

DEFAULT_MAX_DECODED_BYTES = 64 << 20
"""More decoded bytes than any usage-bearing response needs: past it, a bomb."""

DEFAULT_STEP = 64 << 10
"""Largest decoded piece handed out at once."""


class DecodeError(UpstreamError):
    """The backend's compressed body is corrupt or truncated."""


class UnsupportedEncoding(DecodeError):
    """A `content-encoding` we cannot undo (`compress`, or zstd without a zstd module)."""


class DecodedTooLarge(DecodeError):
    """The decoded body outgrew `max_decoded_bytes` (a zip bomb, or a runaway body)."""


class _Codec(Protocol):
    def feed(self, data: bytes, step: int) -> Iterator[bytes]: ...
    def finish(self, step: int) -> Iterator[bytes]: ...


class _Zlib:
    """gzip (wbits 31, several members) or deflate (zlib header or raw, sniffed)."""

    __slots__ = ("_gzip", "_d", "_head", "_done")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._d: Any = zlib.decompressobj(31) if gzip else None
        self._head = b""  # deflate: bytes held until the first two decide zlib vs raw
        self._done = False

    def feed(self, data: bytes, step: int) -> Iterator[bytes]:
        if self._d is None:
            self._head += data
            if len(self._head) < 2:
                return
            b0, b1 = self._head[0], self._head[1]
            zlib_header = b0 & 0x0F == 8 and (b0 << 8 | b1) % 31 == 0
            self._d = zlib.decompressobj(15 if zlib_header else -15)
            data, self._head = self._head, b""
        yield from self._run(data, step)

    def _run(self, data: bytes, step: int) -> Iterator[bytes]:
        d = self._d
        full = False  # the last call filled its output bound: zlib may hold more with no input left
        while data or full:
            if self._done:
                # gzip allows several members; anything else after the end is ignored
                data, self._head = self._head + data, b""
                if len(data) < 2 and self._gzip and b"\x1f\x8b".startswith(data):
                    self._head = data  # maybe the start of the next member
                    return
                if not (self._gzip and data[:2] == b"\x1f\x8b"):
                    return
                d = self._d = zlib.decompressobj(31)
                self._done = False
            try:
                out = d.decompress(data, step)
            except zlib.error as e:
                raise DecodeError(f"corrupt {'gzip' if self._gzip else 'deflate'} body: {e}") from None
            full = 0 < step <= len(out)
            if out:
                yield out
            if d.eof:
                self._done = True
                data = d.unused_data
            else:
                data = d.unconsumed_tail

    def finish(self, step: int) -> Iterator[bytes]:
        if self._d is None:
            if self._head:
                raise DecodeError("deflate body ends after one byte")
        elif not self._done:
            raise DecodeError(f"{'gzip' if self._gzip else 'deflate'} body is truncated")
        return iter(())


class _Brotli:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        if brotli is None:  # pragma: no cover
            raise UnsupportedEncoding("content-encoding br needs the brotli package")
        self._d = brotli.Decompressor()

    def feed(self, data: bytes, step: int) -> Iterator[bytes]:
        d = self._d
        if d.is_finished():
            return  # bytes after the end of the stream: ignored
        try:
            out = d.process(data, output_buffer_limit=step)
            while out:
                # the limit stops buffer growth; one growth step may pass it (~32 KiB)
                for i in range(0, len(out), step):
                    yield out[i : i + step]
                out = d.process(b"", output_buffer_limit=step)  # drain what the limit held
        except brotli.error as e:
            raise DecodeError(f"corrupt br body: {e}") from None

    def finish(self, step: int) -> Iterator[bytes]:
        if not self._d.is_finished():
            raise DecodeError("br body is truncated")
        return iter(())


class _Zstd:
    __slots__ = ("_d", "_started")

    def __init__(self) -> None:
        if zstd is None:  # pragma: no cover
            raise UnsupportedEncoding("content-encoding zstd needs compression.zstd or backports.zstd")
        self._d = zstd.ZstdDecompressor()
        self._started = False  # a frame has begun since the last one ended

    def feed(self, data: bytes, step: int) -> Iterator[bytes]:
        d = self._d
        while True:
            if d.eof:
                data = d.unused_data + data
                if not data:
                    return
                d = self._d = zstd.ZstdDecompressor()  # the next frame
            if data:
                self._started = True
            elif d.needs_input:
                return
            try:
                out = d.decompress(data, step)
            except zstd.ZstdError as e:
                raise DecodeError(f"corrupt zstd body: {e}") from None
            data = b""
            if out:
                yield out
            if d.eof:
                self._started = False

    def finish(self, step: int) -> Iterator[bytes]:
        if self._started and not self._d.eof:
            raise DecodeError("zstd body is truncated")
        return iter(())


_CODECS: dict[str, Callable[[], _Codec]] = {
    "gzip": lambda: _Zlib(gzip=True),
    "x-gzip": lambda: _Zlib(gzip=True),
    "deflate": lambda: _Zlib(gzip=False),
    "br": _Brotli,
    "zstd": _Zstd,
}


def codings(content_encoding: str | None) -> list[str]:
    """The codings of a `content-encoding` value, in the order they were applied."""
    if not content_encoding:
        return []
    names = [c.strip().lower() for c in content_encoding.split(",")]
    return [c for c in names if c and c != "identity"]


class ContentDecoder:
    """Decodes one body; one instance per response. See the module docstring."""

    __slots__ = ("encoding", "decoded_bytes", "_codecs", "_max", "_step")

    def __init__(
        self,
        content_encoding: str,
        *,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
        step: int = DEFAULT_STEP,
    ) -> None:
        names = codings(content_encoding)
        unknown = [c for c in names if c not in _CODECS]
        if unknown or not names:
            raise UnsupportedEncoding(f"unsupported content-encoding {content_encoding!r:.60}")
        if max_decoded_bytes < 1 or step < 1:
            raise ValueError("max_decoded_bytes and step must be positive")
        self.encoding = ", ".join(names)
        self.decoded_bytes = 0
        # the last coding applied is the first undone
        self._codecs: list[_Codec] = [_CODECS[c]() for c in reversed(names)]
        self._max = max_decoded_bytes
        self._step = step

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decoded pieces of `data` (each at most `step` bytes). Consume the
        iterator fully before the next call; a DecodeError can come mid-way."""
        return self._counted(self._through(0, bytes(data), final=False))

    def finish(self) -> Iterator[bytes]:
        """End of body: the last pieces; DecodeError if the body was cut short."""
        return self._counted(self._through(0, b"", final=True))

    def decode_all(self, body: bytes) -> bytes:
        """A whole buffered body, decoded (at most `max_decoded_bytes`)."""
        return b"".join([*self.feed(body), *self.finish()])

    def _through(self, i: int, data: bytes, *, final: bool) -> Iterator[bytes]:
        codecs = self._codecs
        if i == len(codecs):
            if data:
                yield data
            return
        codec = codecs[i]
        if data:
            for piece in codec.feed(data, self._step):
                yield from self._through(i + 1, piece, final=False)
        if final:
            for piece in codec.finish(self._step):
                yield from self._through(i + 1, piece, final=False)
            yield from self._through(i + 1, b"", final=True)

    def _counted(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            self.decoded_bytes += len(piece)
            if self.decoded_bytes > self._max:
                raise DecodedTooLarge(
                    f"{self.encoding} body decodes to more than {self._max} bytes"
                )
            yield piece


def content_decoder(
    content_encoding: str | None,
    *,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    step: int = DEFAULT_STEP,
) -> ContentDecoder | None:
    """A decoder for a response's `content-encoding` header; None for identity/absent.

    Raises UnsupportedEncoding for a coding we cannot undo."""
    if not codings(content_encoding):
        return None
    assert content_encoding is not None
    return ContentDecoder(content_encoding, max_decoded_bytes=max_decoded_bytes, step=step)
