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

Oversize events. By default an event over the cap raises. With an
`oversize` sink factory the parser instead *streams* such an event: from
the moment it passes the cap, its bytes are no longer held; the values of
its `data:` lines (joined by `\n`, as `data` would be) go to a fresh
`DataSink` piece by piece, and when the event ends, one event is dispatched
in its place with `oversize=True`, `data` = what the sink returned and
`raw=b""`. With `include_empty`, the event's raw bytes are returned as they
arrive, as non-dispatched fragments, so forwarding stays byte-exact. Memory
stays bounded whatever the event's size: the sink decides what it keeps
(`StreamReader` keeps only the usage object, see `jsonscan.py`). An
`event:`/`id:` value longer than 1 KiB (or the cap) read after the event
passed the cap is ignored, the one way the result can depend on chunking.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from extproc.errors import UpstreamError

DEFAULT_MAX_EVENT_BYTES = 1 << 20

_NAME_END = re.compile(rb"[:\r\n]")
_BOM = b"\xef\xbb\xbf"

_MAX_FIELD_NAME = 8  # longer than any field we read ("event", "data", "id")
_MAX_SMALL_VALUE = 1024  # an `event:`/`id:` value of an oversize event; longer is ignored

# states of the line reader of an oversize event
_START, _NAME, _DATA_SP, _DATA, _SMALL_SP, _SMALL, _SKIP, _BLANK_CR = range(8)


class _LineBreaks:
    """The line breaks of one piece of bytes, found in linear time.

    The next "\n" and the next "\r" are each found by one memchr scan and
    remembered until passed: searching both afresh for every line rescans to
    the end of the piece for the one that is absent (every line of a
    "\r"-only stream), which is quadratic in the piece's size.
    """

    __slots__ = ("_data", "_n", "_lf", "_cr")

    def __init__(self, data: bytes | bytearray, n: int) -> None:
        self._data = data
        self._n = n
        self._lf = -1  # the next "\n" (or n) at or after the last position asked
        self._cr = -1  # the next "\r" before _lf (or _lf)

    def next(self, i: int) -> int:
        """Index of the first "\r" or "\n" at or after `i`, or n."""
        if self._lf < i:
            lf = self._data.find(b"\n", i, self._n)
            self._lf = lf if lf >= 0 else self._n
        if self._cr < i:
            cr = self._data.find(b"\r", i, self._lf)
            self._cr = cr if cr >= 0 else self._lf
        return self._cr


class DataSink(Protocol):
    """Receives the data of one oversize event, in pieces of any size."""

    def feed(self, data: bytes) -> None: ...

    def result(self) -> str:
        """The `data` of the event dispatched in place of the oversize one."""
        ...


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
    oversize: bool = False
    """Stands for an event over the cap: `data` came from the sink, `raw` is empty."""


def _decode(b: bytes | bytearray) -> str:
    return b.decode("utf-8", "replace")


class SSEParser:
    """Bytes in, `SSEEvent`s out; no I/O. One instance per stream."""

    __slots__ = (
        "_buf",
        "_pos",
        "_seen",
        "_max",
        "_include_empty",
        "_data",
        "_event",
        "_id",
        "_first_line",
        "_oversize",
        "_sink",
        "_state",
        "_small",
        "_small_field",
        "_small_over",
        "_name_limit",
        "_value_limit",
        "_skip_lf",
        "_data_lines",
    )

    def __init__(
        self,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        *,
        include_empty: bool = False,
        oversize: Callable[[], DataSink] | None = None,
    ) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        self._include_empty = include_empty
        self._buf = bytearray()  # bytes of the block in progress, nothing older
        self._pos = 0  # start of the first line of _buf not yet interpreted
        self._seen = 0  # _buf[_pos:_seen] has no line break: the next search starts at _seen
        self._data: list[str] = []  # data lines of the block in progress
        self._event: str | None = None
        self._id: str | None = None  # persists across events, as the spec says
        self._first_line = True  # the BOM may only start the stream
        self._oversize = oversize
        # an oversize event in progress (see the module docstring)
        self._sink: DataSink | None = None
        self._state = _START
        self._small = bytearray()  # a field name, or an event/id value
        self._small_field = b""
        self._small_over = False
        # held bytes stay within the cap, however small it is
        self._name_limit = min(_MAX_FIELD_NAME, max_event_bytes)
        self._value_limit = min(_MAX_SMALL_VALUE, max_event_bytes)
        self._skip_lf = False  # the last line ended with "\r": a "\n" next is part of it
        self._data_lines = 0

    @property
    def pending(self) -> int:
        """Bytes held for the event in progress (never above the cap after a call)."""
        return len(self._buf) + len(self._small)

    def feed(self, data: bytes | bytearray | memoryview) -> list[SSEEvent]:
        """Consume a chunk; return the events it completed, in order."""
        out: list[SSEEvent] = []
        if self._sink is not None:
            data = bytes(data)
            end = self._stream_oversize(data, out)
            if end < 0:
                return out
            data = data[end:]
        self._buf += data
        self._scan(out, final=False)
        if len(self._buf) > self._max:
            if self._oversize is None:
                self._reset()
                raise EventTooLarge(f"SSE event exceeds {self._max} bytes without ending", out)
            self._start_oversize(out)
        return out

    def finish(self) -> list[SSEEvent]:
        """End of stream: interpret what is left (see the module docstring) and reset."""
        out: list[SSEEvent] = []
        if self._sink is not None:
            self._end_last_line()
            self._end_oversize(out)
            self._reset()
            return out
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
        self._pos = self._seen = 0
        self._data = []
        self._event = None
        self._id = None
        self._first_line = True
        self._sink = None
        self._small = bytearray()
        self._small_over = False
        self._skip_lf = False
        self._data_lines = 0

    def _scan(self, out: list[SSEEvent], *, final: bool) -> None:
        """Interpret the complete lines of _buf. A line that arrives in many chunks is
        searched once: the search resumes where the last call's stopped."""
        buf = self._buf
        end = len(buf)
        pos = self._pos
        start = 0  # start of the current block within buf
        breaks = _LineBreaks(buf, end)
        seen = max(pos, self._seen)
        while True:
            eol = breaks.next(seen)
            if eol == end:
                seen = end
                break
            nxt = eol + 1
            if buf[eol] == 13:
                if nxt == end and not final:
                    seen = eol
                    break  # a trailing "\r" may be half of "\r\n": wait for the next byte
                if nxt < end and buf[nxt] == 10:
                    nxt += 1
            if self._first_line:
                pos = self._skip_bom(buf, pos)
            if eol == pos:  # blank line: the block ends here
                size = nxt - start
                if size > self._max:
                    if self._oversize is None:
                        self._reset()
                        raise EventTooLarge(f"SSE event of {size} bytes exceeds {self._max}", out)
                    self._open_sink(out, bytes(buf[start:nxt]))
                    self._end_oversize(out)
                else:
                    self._emit(out, bytes(buf[start:nxt]))
                start = nxt
            else:
                self._line(buf[pos:eol])
            pos = seen = nxt
        if start:
            del buf[:start]
            pos -= start
            seen -= start
        self._pos = pos
        self._seen = seen

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
        elif name == b"id" and b"\x00" not in value:
            self._id = _decode(value)
        # "retry" and unknown fields are ignored, as the spec says

    def _emit(self, out: list[SSEEvent], raw: bytes) -> None:
        if self._data:
            out.append(SSEEvent(self._event, "\n".join(self._data), raw, self._id))
            self._data = []
        elif self._include_empty:
            out.append(SSEEvent(None, "", raw, self._id, dispatch=False))
        self._event = None

    # --- oversize events -------------------------------------------------------------

    def _open_sink(self, out: list[SSEEvent], raw: bytes) -> None:
        """Hand the event in progress to a new sink: the data lines read so far,
        and `raw` (its bytes up to here) as a fragment."""
        assert self._oversize is not None
        sink = self._sink = self._oversize()
        for i, line in enumerate(self._data):
            if i:
                sink.feed(b"\n")
            sink.feed(line.encode("utf-8", "surrogatepass"))
        self._data_lines = len(self._data)
        self._data = []
        self._state = _START
        if self._include_empty and raw:
            out.append(SSEEvent(None, "", raw, self._id, dispatch=False))

    def _start_oversize(self, out: list[SSEEvent]) -> None:
        """The pending event passed the cap: stream the rest of it."""
        buf = self._buf
        pos = self._pos
        self._open_sink(out, bytes(buf[:pos]))
        partial = bytes(buf[pos:])  # a line not ended yet (maybe a lone "\r")
        self._buf = bytearray()
        self._pos = self._seen = 0
        if self._first_line:
            self._first_line = False
            if partial.startswith(_BOM):
                if self._include_empty:
                    out.append(SSEEvent(None, "", _BOM, self._id, dispatch=False))
                partial = partial[3:]
        end = self._stream_oversize(partial, out)
        assert end < 0  # no blank line can be in a partial line

    def _end_last_line(self) -> None:
        """End of stream inside an oversize event: a last line without a line ending counts,
        as it does for a small event (`finish` reads it with `_line`)."""
        sink, state = self._sink, self._state
        assert sink is not None
        if state == _NAME and self._small:
            name = bytes(self._small)
            self._small = bytearray()
            if name == b"data":
                self._data_line(sink)
            else:
                self._small_field = name
                self._set_small()
        elif state in (_SMALL, _SMALL_SP) and not self._small_over:
            self._set_small()
        self._state = _START

    def _end_oversize(self, out: list[SSEEvent]) -> None:
        sink = self._sink
        assert sink is not None
        if self._data_lines:
            out.append(SSEEvent(self._event, sink.result(), b"", self._id, oversize=True))
        self._sink = None
        self._event = None
        self._small = bytearray()
        self._small_over = False
        self._data_lines = 0

    def _line_end(self, data: bytes, j: int) -> int:
        """Index after the line ending at `j`; a "\r" at the very end may pair with a "\n" to come."""
        if data[j] == 13:
            if j + 1 == len(data):
                self._skip_lf = True
            elif data[j + 1] == 10:
                return j + 2
        return j + 1

    def _stream_oversize(self, data: bytes, out: list[SSEEvent]) -> int:
        """Read `data` as the continuation of an oversize event. Returns the index
        after the blank line that ended it, or -1 if it goes on."""
        sink = self._sink
        assert sink is not None
        n = len(data)
        breaks = _LineBreaks(data, n)
        i = 0
        end = -1
        while i < n:
            if self._skip_lf:
                self._skip_lf = False
                if data[i] == 10:
                    i += 1
                    continue
            state = self._state
            if state == _BLANK_CR:  # a blank line "\r" ended the last chunk
                end = i + 1 if data[i] == 10 else i
                break
            if state == _START:
                c = data[i]
                if c == 10 or c == 13:  # a blank line: the event ends
                    if c == 13 and i + 1 == n:
                        self._state = _BLANK_CR
                        i = n
                        break
                    end = i + 2 if c == 13 and data[i + 1] == 10 else i + 1
                    break
                self._small = bytearray()
                self._state = _NAME
            elif state == _NAME:
                m = _NAME_END.search(data, i)
                j = m.start() if m is not None else n
                if len(self._small) + (j - i) > self._name_limit:
                    self._small = bytearray()
                    self._state = _SKIP
                    continue
                self._small += data[i:j]
                if m is None:
                    i = n
                    break
                name = bytes(self._small)
                self._small = bytearray()
                if data[j] == 0x3A:  # ":"
                    i = j + 1
                    if name == b"data":
                        self._data_line(sink)
                        self._state = _DATA_SP
                    elif name in (b"event", b"id"):
                        self._small_field = name
                        self._small_over = False
                        self._state = _SMALL_SP
                    else:  # a comment (no name), retry, unknown fields
                        self._state = _SKIP
                else:  # a field name alone on its line: an empty value
                    if name == b"data":
                        self._data_line(sink)
                    else:
                        self._small_field = name
                        self._set_small()
                    i = self._line_end(data, j)
                    self._state = _START
            elif state in (_DATA_SP, _SMALL_SP):
                if data[i] == 0x20:
                    i += 1
                self._state = _DATA if state == _DATA_SP else _SMALL
            else:  # _DATA, _SMALL, _SKIP: up to the end of the line
                j = breaks.next(i)
                if state == _DATA:
                    if j > i:
                        sink.feed(data[i:j])
                elif state == _SMALL and not self._small_over:
                    if len(self._small) + (j - i) > self._value_limit:
                        self._small = bytearray()
                        self._small_over = True
                    else:
                        self._small += data[i:j]
                if j == n:
                    i = n
                    break
                if state == _SMALL:
                    self._set_small()
                i = self._line_end(data, j)
                self._state = _START
        if self._include_empty:
            fragment = data[: n if end < 0 else end]
            if fragment:
                out.append(SSEEvent(None, "", fragment, self._id, dispatch=False))
        if end >= 0:
            self._end_oversize(out)
        return end

    def _data_line(self, sink: DataSink) -> None:
        if self._data_lines:
            sink.feed(b"\n")
        self._data_lines += 1

    def _set_small(self) -> None:
        value = self._small
        self._small = bytearray()
        if self._small_over:
            self._small_over = False
            return
        if self._small_field == b"event":
            self._event = _decode(value) or None
        elif self._small_field == b"id" and b"\x00" not in value:
            self._id = _decode(value)
