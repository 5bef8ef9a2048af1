"""Incremental, bounded Server-Sent Events parser (WHATWG HTML, "event stream").

Envoy hands the response body over in chunks that split anywhere: mid-line,
between `\\r` and `\\n`, inside a UTF-8 sequence. The parser keeps only the
bytes of the event in progress, so feeding a stream in any number of pieces
yields the same events as feeding it whole, and memory per stream is capped:
an event larger than `max_event_bytes` is an `UpstreamError` (`EventTooLarge`):
a backend that never ends its event must not grow our heap without limit.

Every event carries `raw`, its exact bytes up to and including the blank line
that ended it, so a caller forwarding the stream can drop one event and pass
every other byte through untouched.

Deliberate choices where the spec leaves room or says otherwise:

- Lines are decoded one by one as UTF-8 with replacement characters; a line
  never splits a UTF-8 sequence (`\\r` and `\\n` never occur inside one), so
  the result does not depend on chunk boundaries. Invalid UTF-8 never raises.
- A line ending in a lone `\\r` at the very end of the buffered bytes waits
  for the next byte (it may be the first half of `\\r\\n`).
- `finish()` *dispatches* an event the stream left unterminated (no final
  blank line) if it has a data line; the spec says to discard it. A backend
  that closes right after its usage event must still be billed on it. Its
  `raw` is the remaining bytes as they are (no blank line is invented).
- With `include_empty=True`, blocks the spec does not dispatch (comments,
  `id:`/`retry:` only, stray blank lines) are returned too, with
  `dispatch=False`, so the `raw` of everything returned concatenates back to
  the input byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.errors import UpstreamError

DEFAULT_MAX_EVENT_BYTES = 1 << 20

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class EventTooLarge(UpstreamError):
    """An event outgrew the cap. `events` holds the events the same call
    completed before it, so a caller can still account for them (a usage
    event must not be lost because garbage followed it)."""

    def __init__(self, message: str, events: list[SSEEvent]) -> None:
        super().__init__(message)
        self.events = events


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One blank-line-terminated block of an event stream.

    `event` is None when the block had no (or an empty) `event:` field, which
    the spec reads as "message". `data` is the `data:` lines joined by `\\n`.
    `id` is the stream's last event id at dispatch time.
    """

    event: str | None
    data: str
    raw: bytes
    id: str | None = None
    dispatch: bool = True


def _decode(b: bytes | bytearray) -> str:
    return b.decode("utf-8", "replace")


class SSEParser:
    """Bytes in, `SSEEvent`s out; no I/O. One instance per stream."""

    __slots__ = (
        "_buf",
        "_pos",
        "_max",
        "_include_empty",
        "_data",
        "_event",
        "_id",
        "_first_line",
    )

    def __init__(
        self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, *, include_empty: bool = False
    ) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        self._include_empty = include_empty
        self._buf = bytearray()  # bytes of the block in progress, nothing older
        self._pos = 0  # start of the first line of _buf not yet interpreted
        self._data: list[str] = []  # data lines of the block in progress
        self._event: str | None = None
        self._id: str | None = None  # persists across events, as the spec says
        self._first_line = True  # the BOM may only start the stream

    @property
    def pending(self) -> int:
        """Bytes held for the event in progress (never above the cap after a call)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[SSEEvent]:
        """Consume a chunk; return the events it completed, in order."""
        self._buf += data
        out: list[SSEEvent] = []
        self._scan(out, final=False)
        if len(self._buf) > self._max:
            self._reset()
            raise EventTooLarge(f"SSE event exceeds {self._max} bytes without ending", out)
        return out

    def finish(self) -> list[SSEEvent]:
        """End of stream: interpret what is left (see the module docstring) and reset."""
        out: list[SSEEvent] = []
        self._scan(out, final=True)
        buf = self._buf
        pos = self._pos
        if pos < len(buf):  # a last line without a line ending
            if self._first_line:
                pos = self._skip_bom(buf, pos)
            if pos < len(buf):
                self._line(buf[pos:])
        if buf:
            self._emit(out, bytes(buf))
        self._reset()
        return out

    def _reset(self) -> None:
        """Forget the stream: after finish(), or after an oversize event (the
        stream is unusable then, and its bytes must not stay on the heap)."""
        self._buf = bytearray()
        self._pos = 0
        self._data = []
        self._event = None
        self._id = None
        self._first_line = True

    def _scan(self, out: list[SSEEvent], *, final: bool) -> None:
        buf = self._buf
        end = len(buf)
        pos = self._pos
        start = 0  # start of the current block within buf
        search = _EOL.search
        while True:
            m = search(buf, pos)
            if m is None:
                break
            eol, nxt = m.span()
            if nxt == end and not final and nxt - eol == 1 and buf[eol] == 13:
                break  # a trailing "\r" may be half of "\r\n": wait for the next byte
            if self._first_line:
                pos = self._skip_bom(buf, pos)
            if eol == pos:  # blank line: the block ends here
                size = nxt - start
                if size > self._max:
                    self._reset()
                    raise EventTooLarge(f"SSE event of {size} bytes exceeds {self._max}", out)
                self._emit(out, bytes(buf[start:nxt]))
                start = nxt
            else:
                self._line(buf[pos:eol])
            pos = nxt
        if start:
            del buf[:start]
            pos -= start
        self._pos = pos

    def _skip_bom(self, buf: bytearray, pos: int) -> int:
        """The stream's first line may start with one UTF-8 BOM, which is not content."""
        self._first_line = False
        return pos + 3 if buf.startswith(_BOM, pos) else pos

    def _line(self, line: bytearray) -> None:
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._data.append(_decode(value))
            return
        if line[0] == 0x3A:  # ":" comment
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":  # "data" with no colon: an empty data line
            self._data.append(_decode(value))
        elif name == b"event":
            self._event = _decode(value) or None
        elif name == b"id":
            if b"\x00" not in value:
                self._id = _decode(value)
        # "retry" and unknown fields are ignored, as the spec says

    def _emit(self, out: list[SSEEvent], raw: bytes) -> None:
        if self._data:
            out.append(SSEEvent(self._event, "\n".join(self._data), raw, self._id))
            self._data = []
        elif self._include_empty:
            out.append(SSEEvent(None, "", raw, self._id, dispatch=False))
        self._event = None
