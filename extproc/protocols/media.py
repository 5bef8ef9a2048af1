"""Facts about the non-text inputs of a request: images, audio, files, documents.

The estimator prices what it can see, so a request's media parts are
reported, not tokenised: their kind, where the bytes are (inline base64, a
URL, an uploaded file id), the `detail` asked for, the size of inline data,
and for inline PNG/JPEG/GIF/WebP images their pixel size, read from the
header. Only the few bytes a header needs are base64-decoded (JPEG: the
segment headers up to its frame header), never the whole payload.

Nothing here raises for a bad payload: a malformed data URL or an image
whose header cannot be read just leaves the fields it would give as None.
"""

from __future__ import annotations

import binascii
import re
import struct
from dataclasses import dataclass, field
from typing import Literal

MediaKind = Literal["image", "audio", "file", "document"]
Source = Literal["base64", "url", "file_id", "text", "unknown"]
"""Where the bytes are: inline base64, a URL, an uploaded file, inline text
(a non-base64 `data:` URL), or a shape we do not know."""


@dataclass(frozen=True, slots=True)
class MediaPart:
    """One non-text input part of a request."""

    kind: MediaKind
    source: Source
    detail: str | None = None
    """OpenAI image `detail` ("low", "high", "auto", …) as given; None if absent."""
    mime: str | None = None
    """Media type when the request says it (data URL, `media_type`, audio `format`)."""
    size: int | None = None
    """Bytes of the inline (base64) data, decoded size; None when not inline."""
    width: int | None = None
    height: int | None = None
    where: str = field(default="", compare=False)
    """Where the part is in the request (`messages[0].content[1]`), for error messages."""


_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
_MAX_JPEG_SEGMENTS = 256


def b64_size(data: str) -> int:
    """Decoded size of base64 text, from its length (no decoding)."""
    n = len(data)
    pad = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    return max(0, n * 3 // 4 - pad) if n % 4 == 0 else n * 3 // 4


class _B64:
    """Random access to the bytes of base64 text, decoding only the windows read."""

    __slots__ = ("_s",)

    def __init__(self, s: str) -> None:
        self._s = s

    def read(self, offset: int, n: int) -> bytes:
        start = offset // 3 * 4
        end = -(-(offset + n) // 3) * 4
        try:
            raw = binascii.a2b_base64(self._s[start:end].encode("ascii", "ignore"))
        except (binascii.Error, ValueError):
            return b""
        skip = offset - offset // 3 * 3
        return raw[skip : skip + n]


def image_size(data: str) -> tuple[int, int] | None:
    """(width, height) of a base64 PNG, GIF, WebP or JPEG image, from its header."""
    b = _B64(data)
    head = b.read(0, 32)
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return w, h
        if head[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", head[6:10])
            return w, h
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:2] == b"\xff\xd8":
            return _jpeg(b)
    except struct.error:
        return None
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    return None


def _jpeg(b: _B64) -> tuple[int, int] | None:
    """Walk the marker segments to the first frame header (SOFn)."""
    pos = 2
    for _ in range(_MAX_JPEG_SEGMENTS):
        seg = b.read(pos, 9)
        if len(seg) < 4 or seg[0] != 0xFF:
            return None
        marker = seg[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if len(seg) < 9:
                return None
            h, w = struct.unpack(">HH", seg[5:9])
            return w, h
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        (length,) = struct.unpack(">H", seg[2:4])
        if length < 2:
            return None
        pos += 2 + length
    return None


def inline(
    kind: MediaKind, data: str, *, mime: str | None = None, detail: str | None = None
) -> MediaPart:
    """A part whose bytes are given as bare base64 text."""
    width = height = None
    if kind == "image":
        wh = image_size(data)
        if wh is not None:
            width, height = wh
    return MediaPart(kind, "base64", detail, mime, b64_size(data), width, height)


def from_url(kind: MediaKind, url: str, *, detail: str | None = None) -> MediaPart:
    """A part given by URL; a base64 `data:` URL is inline data."""
    m = _DATA_URL.match(url)
    if m is None:
        return MediaPart(kind, "url", detail)
    mime = m.group(1).lower() or None
    if ";base64" not in m.group(2).lower():
        return MediaPart(kind, "text", detail, mime, len(url) - m.end())
    return inline(kind, url[m.end() :], mime=mime, detail=detail)


_DATED = re.compile(r"_\d{8}$|_\d{4}_\d{2}_\d{2}$")


def tool_kind(kind: str) -> str:
    """A built-in tool's type without its version date: `web_search_20250305` and
    `web_search_2025_08_26` are both `web_search`."""
    return _DATED.sub("", kind)
