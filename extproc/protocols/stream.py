"""Reading a streamed (SSE) response: usage, counted output, end of stream.

One `StreamReader` per response stream. The SSE framing, byte forwarding and
bookkeeping are the same for every API; what differs is how one decoded event
is read, and that is a single function per schema (an `Observer`, defined in
`openai.py` and `anthropic.py`) returning an `Observation`.

Bad upstream data is recorded, not raised: a data line that is not JSON, or
carries an invalid usage object, increments `malformed_events` (and sets
`last_error`) and the stream goes on, because one broken event must not cut
a response the client is already reading. Usage present in a well-formed
event is always taken. `feed` and `finish` raise nothing.

Oversize events. An event over `max_event_bytes` (the Responses API's
terminal `response.completed` echoes `instructions` and `output`, easily
over 1 MiB) is not held: its bytes are forwarded as they come and only a
`PathScanner` runs over its data, keeping `type`, `usage`, `response.usage`
and `message.usage` (at most 64 KiB each). The observer then reads that
small object as if it were the event. Lost for such an event: the text it
carries (counted output) and the tool items of `response.output` (counted
from the `response.output_item.done` events instead). `oversize_events`
counts them.

Encoded bodies. A backend may compress the stream although we asked for
identity. The reader then decodes a copy (`encoding.py`) and parses that;
the bytes forwarded are the backend's, untouched. It cannot rewrite such a
body: `strip_usage_chunk` is ignored (the injected usage chunk reaches the
client) and `may_rewrite` is False, so the caller must not append anything
(an SSE comment after a gzip/br body corrupts it). A body that cannot be
decoded (unknown coding, corrupt, over the decoded cap) sets `decode_error`
and the reader observes nothing more: settle on the reservation, not on
`counted_output_tokens`, which stopped counting.

Cutting. A `cuttable` reader (identity bodies only) forwards only complete
events, as strip mode does, so what the client received always ends on an
event boundary, and follows the forwarded events with the schema's `Ending`
(`ending.py`). `cut()` then returns the bytes that end the stream in the
API's own terms (a partial event still held is not forwarded) and the
reader forwards nothing more, though it goes on observing what comes.
Limit: an oversize event is forwarded as it comes, so a cut inside one
leaves it unfinished on the client (the only such event in practice is the
Responses API's terminal `response.completed`, after which there is
nothing left to cut).

End facts for settling: `done`/`terminal` say the API's terminal marker was
seen (`[DONE]`, `message_stop`, `response.completed`/`.incomplete`/`.failed`);
`usage_complete` says the usage read is the response's final usage, so a
client that closes right after the end can be settled on it.

Memory per stream is the parser's pending event (or, for an oversize one,
the scanner's captured values), one decoded piece, a few counters and, when
cuttable, the ending's state (bounded, see `ending.py`); nothing else
accumulates over the stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

from extproc.errors import UpstreamError
from extproc.protocols.encoding import DecodeError, content_decoder
from extproc.protocols.ending import Ending
from extproc.protocols.jsonscan import PathScanner
from extproc.protocols.sse import DEFAULT_MAX_EVENT_BYTES, SSEEvent, SSEParser
from extproc.protocols.usage import Usage

DEFAULT_MAX_STREAM_DECODED_BYTES = 256 << 20
"""Decoded size at which an encoded stream stops being read (a bomb, not a reply)."""

KEPT_PATHS = frozenset(
    {("type",), ("usage",), ("response", "usage"), ("message", "usage"), ("sequence_number",)}
    | {("response", k) for k in ("id", "object", "created_at", "model", "status")}
)
"""What is kept of an oversize event: enough for every observer to read its usage,
and for an `Ending` to name the response it ends."""


class Observation(NamedTuple):
    """What one event says. `usage_only` marks OpenAI's extra usage chunk
    (`"choices": []`), the one event a reader may strip. `final` marks usage
    that is the response's last word (the usage chunk, the terminal event,
    Anthropic's `message_delta`). `calls` counts per-call tools this event
    reports one by one (summed by the reader, unlike `usage`)."""

    texts: tuple[str, ...] = ()
    usage: Usage | None = None
    done: bool = False
    usage_only: bool = False
    final: bool = False
    calls: Usage | None = None


NOTHING = Observation()

Observer = Callable[[str | None, dict[str, Any]], Observation]
"""Reads one JSON event object (with its SSE event name). Raises only UpstreamError."""


_NO_CALLS = Usage()


class _UsageSink:
    """The data of an oversize event, reduced to its usage-bearing fields."""

    __slots__ = ("_scan",)

    def __init__(self) -> None:
        self._scan = PathScanner(KEPT_PATHS)

    def feed(self, data: bytes) -> None:
        self._scan.feed(data)

    def result(self) -> str:
        return json.dumps(self._scan.result())


class StreamReader:
    """Feed response bytes, get the bytes to forward; read usage at the end.

    With `strip_usage_chunk`, the usage-only chunk (injected by the gateway,
    not asked for by the client) is removed from the forwarded bytes; to do
    that safely only complete events are forwarded, a partial event waits for
    its end. `cuttable` (with an `ending`) forwards whole events too, so that
    `cut()` can end the stream cleanly at any time. With neither (and always
    for an encoded body), `feed` returns its argument itself, uncopied.
    """

    __slots__ = (
        "_observe",
        "_parser",
        "_strip",
        "_whole",
        "_ending",
        "_cut",
        "_count",
        "_decoder",
        "_usage",
        "_final",
        "tool_calls",
        "counted_output_tokens",
        "done",
        "terminal",
        "events",
        "oversize_events",
        "malformed_events",
        "last_error",
        "decode_error",
        "cut_reason",
    )

    def __init__(
        self,
        observe: Observer,
        *,
        strip_usage_chunk: bool,
        count_tokens: Callable[[str], int] | None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        content_encoding: str | None = None,
        max_decoded_bytes: int = DEFAULT_MAX_STREAM_DECODED_BYTES,
        cuttable: bool = False,
        ending: Callable[[], Ending] | None = None,
    ) -> None:
        self._observe = observe
        self._count = count_tokens
        self.decode_error: str | None = None
        """Why an encoded body stopped being read (observation ended there)."""
        try:
            self._decoder = content_decoder(content_encoding, max_decoded_bytes=max_decoded_bytes)
        except DecodeError as e:  # an unknown coding: forward blind
            self._decoder = None
            self.decode_error = str(e)
        self._strip = strip_usage_chunk and self.may_rewrite
        self._ending = ending() if cuttable and ending is not None and self.may_rewrite else None
        self._whole = self._strip or self._ending is not None
        """Forward only complete events (a partial one waits for its end)."""
        self._cut = False
        self.cut_reason: str | None = None
        """Why `cut()` ended the stream (None: it was not cut)."""
        self._parser = SSEParser(max_event_bytes, include_empty=self._whole, oversize=self._oversize)
        self._usage: Usage | None = None
        self._final = False
        self.tool_calls = Usage()
        """Per-call tools counted event by event (already merged into `usage`)."""
        self.counted_output_tokens = 0
        """Sum of count_tokens over the output deltas seen (0 without count_tokens)."""
        self.done = False
        """The API's terminal event was seen (`[DONE]`, `response.completed`, `message_stop`…)."""
        self.terminal: str | None = None
        """Which terminal marker: "[DONE]", "message_stop", "response.completed"…"""
        self.events = 0
        self.oversize_events = 0
        self.malformed_events = 0
        self.last_error: str | None = None

    @property
    def may_rewrite(self) -> bool:
        """Whether the forwarded body may differ from the backend's (identity only)."""
        return self._decoder is None and self.decode_error is None

    @property
    def usage(self) -> Usage | None:
        """Usage the backend reported (merged over the stream), None if none yet."""
        u = self._usage
        if u is None or self.tool_calls == _NO_CALLS:
            return u
        return u.merge(self.tool_calls)

    @property
    def usage_complete(self) -> bool:
        """The usage read is final: settle on it even if the body never ended."""
        return self._usage is not None and (self._final or self.done)

    @property
    def pending_bytes(self) -> int:
        return self._parser.pending

    def _oversize(self) -> _UsageSink:
        self.oversize_events += 1
        return _UsageSink()

    def feed(self, data: bytes) -> bytes:
        if self._decoder is not None or self.decode_error is not None:
            self._decoded(data, final=False)
            return data
        events = self._parser.feed(data)
        if not self._whole:
            for ev in events:
                self._take(ev)
            return data
        return self._forward(events)

    def finish(self) -> bytes:
        """End of the response body: read a last unterminated event, return held bytes."""
        if self._decoder is not None or self.decode_error is not None:
            self._decoded(b"", final=True)
            return b""
        events = self._parser.finish()
        if not self._whole:
            for ev in events:
                self._take(ev)
            return b""
        return self._forward(events)

    def _forward(self, events: list[SSEEvent]) -> bytes:
        """The raw bytes of the events to forward (each one observed); none once cut."""
        out = b"".join([ev.raw for ev in events if not self._take(ev)])
        return b"" if self._cut else out

    def _decoded(self, data: bytes, *, final: bool) -> None:
        """Observe an encoded body through its decoder (nothing once it failed)."""
        decoder = self._decoder
        if decoder is None:
            return
        parser = self._parser
        try:
            for piece in decoder.feed(data) if data else ():
                for ev in parser.feed(piece):
                    self._take(ev)
            if final:
                for piece in decoder.finish():
                    for ev in parser.feed(piece):
                        self._take(ev)
        except DecodeError as e:
            self._decoder = None
            self.decode_error = str(e)
            final = True  # what was decoded so far is all there will be
        if final:
            for ev in parser.finish():
                self._take(ev)

    def _take(self, ev: SSEEvent) -> bool:
        """Account for one event; True when it must not be forwarded."""
        if not ev.dispatch:
            return False
        self.events += 1
        data = ev.data
        if data == "[DONE]":
            self._end("[DONE]")
            return False
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:
            return self._malformed(f"event data is not JSON: {e}")
        if not isinstance(obj, dict):
            return self._malformed("event data is not a JSON object")
        try:
            seen = self._observe(ev.event, obj)
        except UpstreamError as e:
            return self._malformed(str(e))
        drop = seen.usage_only and self._strip and not ev.oversize
        if self._ending is not None and not drop:
            self._ending.see(ev.event, obj, len(data))
        if seen is NOTHING:
            return False
        if seen.usage is not None:
            self._usage = seen.usage if self._usage is None else self._usage.merge(seen.usage)
            self._final = self._final or seen.final
        if seen.calls is not None:
            self.tool_calls = self.tool_calls.plus(seen.calls)
        if seen.done:
            kind = obj.get("type")
            self._end(kind if isinstance(kind, str) else ev.event or "done")
        count = self._count
        if count is not None:
            for text in seen.texts:
                self.counted_output_tokens += count(text)
        return drop

    def cut(self, *, reason: str, scope: str, usage: Usage | None, include_usage: bool) -> bytes | None:
        """The bytes that end the stream now, cleanly, after what was forwarded.

        First an SSE comment saying why (`: budget_exhausted scope=key:bob`),
        then the API's own end (see `ending.py`), with `usage` (None: the
        usage the stream reported so far); `include_usage`: the client asked
        for the usage chunk (OpenAI chat/completions). A partial event held
        back is dropped; if the API's terminal event was already forwarded,
        only the comment. A second `cut` returns b"". None when the stream
        cannot be cut (not `cuttable`, or an encoded body: the caller must not
        append anything).

        Afterwards `feed`/`finish` forward nothing (they return b"") but still
        observe: the rest of the partial event, and whatever the backend sends
        before its request is ended, count for `usage`, `counted_output_tokens`
        and `done`. So a chunk that must not reach the client is cut *before*
        it: `end = reader.cut(...)`, then `reader.feed(chunk)` (observed, b"").
        """
        if self._cut:
            return b""
        ending = self._ending
        if ending is None:
            return None
        self._cut = True
        self.cut_reason = reason
        self._ending = None
        out = [f": {_one_line(reason)} scope={_one_line(scope)}\n\n"]
        if not self.done:
            for name, data in ending.events(usage if usage is not None else self.usage, include_usage):
                text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
                out.append(f"event: {name}\ndata: {text}\n\n" if name else f"data: {text}\n\n")
        return "".join(out).encode()

    def _end(self, marker: str) -> None:
        self.done = True
        if self.terminal is None:
            self.terminal = marker

    def _malformed(self, why: str) -> bool:
        self.malformed_events += 1
        self.last_error = why
        return False


def _one_line(text: str) -> str:
    """A value for an SSE comment: a line break in it would start a field."""
    return text.replace("\r", " ").replace("\n", " ")
