"""Recorded-style SSE response bodies (tests/protocols/data/*.sse) and what they contain.

The files follow the providers' documented wire formats; `count_tokens` in
these tests is `len` (characters), so expected counts are exact and easy to
check by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    Schema,
    StreamReader,
    Usage,
)

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Recorded:
    file: str
    schema: Schema
    usage: Usage
    counted: int  # sum of len() over output deltas
    events: int
    has_usage_chunk: bool  # an OpenAI usage-only chunk that strip mode removes

    @property
    def body(self) -> bytes:
        return (DATA / self.file).read_bytes()

    def __str__(self) -> str:
        return self.file


RECORDED = (
    Recorded(
        "openai_chat.sse",
        OPENAI_CHAT,
        Usage(input_tokens=86, cached_input_tokens=1920, output_tokens=9),
        counted=len("Bonjour" " à toi" " 😀 你好" "!"),
        events=8,
        has_usage_chunk=True,
    ),
    Recorded(
        "openai_chat_tools.sse",
        OPENAI_CHAT,
        Usage(input_tokens=85, output_tokens=211, reasoning_tokens=192, function_calls=1),
        counted=len("get_weather" '{"' "city" '":"Paris"}'),
        events=7,
        has_usage_chunk=True,
    ),
    Recorded(
        "openai_completions.sse",
        OPENAI_COMPLETIONS,
        Usage(input_tokens=5, output_tokens=4),
        counted=len("\n\nOnce" " upon" " a time"),
        events=6,
        has_usage_chunk=True,
    ),
    Recorded(
        "openai_responses.sse",
        OPENAI_RESPONSES,
        Usage(input_tokens=57, cached_input_tokens=1280, output_tokens=330, reasoning_tokens=320),
        counted=len("Hi" " there — ça va?"),
        events=12,
        has_usage_chunk=False,
    ),
    Recorded(
        "anthropic_messages.sse",
        ANTHROPIC_MESSAGES,
        Usage(input_tokens=25, cached_input_tokens=3000, cache_write_tokens=1500, output_tokens=15),
        counted=len("Hello" ", Grüße 👋"),
        events=8,
        has_usage_chunk=False,
    ),
    Recorded(
        "anthropic_tools.sse",
        ANTHROPIC_MESSAGES,
        Usage(input_tokens=472, output_tokens=89, function_calls=1),
        counted=len("Need the weather tool." "get_weather" '{"location": "San Fra' 'ncisco, CA"}'),
        events=12,
        has_usage_chunk=False,
    ),
)


def crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n")


def cr(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r")


def run(reader: StreamReader, chunks: list[bytes]) -> tuple[bytes, StreamReader]:
    """Feed chunks and finish; return the forwarded bytes."""
    out = [reader.feed(c) for c in chunks]
    out.append(reader.finish())
    return b"".join(out), reader


def summary(reader: StreamReader) -> tuple[object, ...]:
    return (
        reader.usage,
        reader.counted_output_tokens,
        reader.done,
        reader.events,
        reader.malformed_events,
    )


def usage_chunk_raw(body: bytes) -> bytes:
    """The raw bytes of the usage-only chunk of an OpenAI stream (with its blank line)."""
    for block in body.split(b"\n\n"):
        if b'"choices":[]' in block and b'"usage":{' in block:
            return block + b"\n\n"
    raise AssertionError("no usage chunk")


class KeepAll:
    """An SSE oversize sink that keeps everything: compares with an uncapped parse."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, data: bytes) -> None:
        self.data += data

    def result(self) -> str:
        return self.data.decode("utf-8", "replace")
