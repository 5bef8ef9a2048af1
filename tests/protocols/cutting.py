"""Streams to cut: the recorded SSE bodies (tests/replay/corpus, tests/protocols/data) and cutting them."""

from __future__ import annotations

import json
from dataclasses import dataclass

from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    Schema,
    StreamReader,
    Usage,
)
from tests.protocols.fixtures import RECORDED
from tests.replay.server import load_corpus, response_bytes, split_events

SCHEMA_OF_API = {
    "anthropic.messages": ANTHROPIC_MESSAGES,
    "openai.chat_completions": OPENAI_CHAT,
    "openai.completions": OPENAI_COMPLETIONS,
    "openai.responses": OPENAI_RESPONSES,
}

USAGE = Usage(input_tokens=11, cached_input_tokens=3, cache_write_tokens=2, output_tokens=7, reasoning_tokens=2)
"""What the service says was used, distinct in every field so a misplaced one shows."""

REASON, SCOPE = "budget_exhausted", "key:bob"


@dataclass(frozen=True)
class Stream:
    name: str
    schema: Schema
    body: bytes
    encoding: str | None
    include_usage: bool  # the client asked for the usage chunk

    def __str__(self) -> str:
        return self.name

    @property
    def boundaries(self) -> list[int]:
        """Offsets where an event ends (0 first): the forwarded bytes always end at one."""
        ends = [0]
        for chunk in split_events(self.body):
            ends.append(ends[-1] + len(chunk))
        return ends


def _corpus() -> list[Stream]:
    out = []
    for name, ex in load_corpus().items():
        headers = {k.lower(): v for k, v in ex["response"]["headers"]}
        if "event-stream" not in headers.get("content-type", "") or ex["response"]["status"] != 200:
            continue
        request = json.loads(ex["request"]["body"])
        asked = bool((request.get("stream_options") or {}).get("include_usage"))
        out.append(
            Stream(name, SCHEMA_OF_API[ex["api"]], response_bytes(ex), headers.get("content-encoding"), asked)
        )
    return out


CORPUS = _corpus()
STREAMS = [s for s in CORPUS if s.encoding is None] + [
    Stream(r.file, r.schema, r.body, None, r.has_usage_chunk) for r in RECORDED
]
"""Every identity-encoded recorded stream (the encoded ones cannot be cut)."""


def reader(stream: Stream, *, strip: bool = False) -> StreamReader:
    return stream.schema.stream_reader(
        strip_usage_chunk=strip, count_tokens=None, content_encoding=stream.encoding, cuttable=True
    )


def cut_at(stream: Stream, offset: int, *, usage: Usage | None = USAGE) -> tuple[bytes, bytes]:
    """(forwarded bytes, the ending) when the stream is cut after `offset` bytes came in."""
    r = reader(stream)
    forwarded = r.feed(stream.body[:offset])
    ending = r.cut(reason=REASON, scope=SCOPE, usage=usage, include_usage=stream.include_usage)
    assert ending is not None
    return forwarded, ending
