"""Reading a streamed (SSE) response: usage, counted output, end of stream.

One `StreamReader` per response stream. The SSE framing, byte forwarding and
bookkeeping are the same for every API; what differs is how one decoded event
is read, and that is a single function per schema (an `Observer`, defined in
`openai.py` and `anthropic.py`) returning an `Observation`.

Bad upstream data is recorded, not raised: a data line that is not JSON, or
carries an invalid usage object, increments `malformed_events` (and sets
`last_error`) and the stream goes on, because one broken event must not cut
a response the client is already reading. Usage present in a well-formed
event is always taken. The only exception out of `feed` is the SSE parser's
`EventTooLarge` (an `UpstreamError`) for an event over the size cap; the
events completed before it are accounted for first, and the stream is dead
after it (settle on what was observed).

Memory per stream is the parser's pending event and a few counters; nothing
accumulates over the stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

from extproc.errors import UpstreamError
from extproc.protocols.sse import DEFAULT_MAX_EVENT_BYTES, EventTooLarge, SSEEvent, SSEParser
from extproc.protocols.usage import Usage


class Observation(NamedTuple):
    """What one event says. `usage_only` marks OpenAI's extra usage chunk
    (`"choices": []`), the one event a reader may strip."""

    texts: tuple[str, ...] = ()
    usage: Usage | None = None
    done: bool = False
    usage_only: bool = False


NOTHING = Observation()

Observer = Callable[[str | None, dict[str, Any]], Observation]
"""Reads one JSON event object (with its SSE event name). Raises only UpstreamError."""


class StreamReader:
    """Feed response bytes, get the bytes to forward; read usage at the end.

    With `strip_usage_chunk`, the usage-only chunk (injected by the gateway,
    not asked for by the client) is removed from the forwarded bytes; to do
    that safely only complete events are forwarded, a partial event waits for
    its end. Without it, `feed` returns its argument itself, uncopied.
    """

    __slots__ = (
        "_observe",
        "_parser",
        "_strip",
        "_count",
        "usage",
        "counted_output_tokens",
        "done",
        "events",
        "malformed_events",
        "last_error",
    )

    def __init__(
        self,
        observe: Observer,
        *,
        strip_usage_chunk: bool,
        count_tokens: Callable[[str], int] | None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self._observe = observe
        self._strip = strip_usage_chunk
        self._count = count_tokens
        self._parser = SSEParser(max_event_bytes, include_empty=strip_usage_chunk)
        self.usage: Usage | None = None
        """Usage the backend reported (merged over the stream), None if none yet."""
        self.counted_output_tokens = 0
        """Sum of count_tokens over the output deltas seen (0 without count_tokens)."""
        self.done = False
        """The API's terminal event was seen (`[DONE]`, `response.completed`, `message_stop`…)."""
        self.events = 0
        self.malformed_events = 0
        self.last_error: str | None = None

    @property
    def pending_bytes(self) -> int:
        return self._parser.pending

    def feed(self, data: bytes) -> bytes:
        try:
            events = self._parser.feed(data)
        except EventTooLarge as e:
            for ev in e.events:  # account for what completed before the overflow
                self._take(ev)
            raise
        if not self._strip:
            for ev in events:
                self._take(ev)
            return data
        return b"".join([ev.raw for ev in events if not self._take(ev)])

    def finish(self) -> bytes:
        """End of the response body: read a last unterminated event, return held bytes."""
        events = self._parser.finish()
        if not self._strip:
            for ev in events:
                self._take(ev)
            return b""
        return b"".join([ev.raw for ev in events if not self._take(ev)])

    def _take(self, ev: SSEEvent) -> bool:
        """Account for one event; True when it must not be forwarded."""
        if not ev.dispatch:
            return False
        self.events += 1
        data = ev.data
        if data == "[DONE]":
            self.done = True
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
        if seen is NOTHING:
            return False
        if seen.usage is not None:
            self.usage = seen.usage if self.usage is None else self.usage.merge(seen.usage)
        if seen.done:
            self.done = True
        count = self._count
        if count is not None:
            for text in seen.texts:
                self.counted_output_tokens += count(text)
        return seen.usage_only and self._strip

    def _malformed(self, why: str) -> bool:
        self.malformed_events += 1
        self.last_error = why
        return False
