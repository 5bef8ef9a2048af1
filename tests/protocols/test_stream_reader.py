"""StreamReader over recorded streams: whole, split at every byte, stripped."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import UpstreamError
from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    EventTooLarge,
    Usage,
)
from tests.protocols.fixtures import RECORDED, Recorded, cr, crlf, run, summary, usage_chunk_raw

VARIANTS = {"lf": lambda b: b, "crlf": crlf, "cr": cr}


def reader(rec: Recorded, strip: bool = False):
    return rec.schema.stream_reader(strip_usage_chunk=strip, count_tokens=len)


@pytest.mark.parametrize("rec", RECORDED, ids=str)
def test_whole_stream(rec: Recorded) -> None:
    body = rec.body
    out, r = run(reader(rec), [body])
    assert out == body
    assert r.usage == rec.usage
    assert r.counted_output_tokens == rec.counted
    assert r.done
    assert r.events == rec.events
    assert r.malformed_events == 0
    assert r.pending_bytes == 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("rec", RECORDED, ids=str)
def test_every_split_offset(rec: Recorded, strip: bool, variant: str) -> None:
    body = VARIANTS[variant](rec.body)
    whole_out, whole = run(reader(rec, strip), [body])
    expected = summary(whole)
    assert expected[:3] == (rec.usage, rec.counted, True)
    for i in range(len(body) + 1):
        out, r = run(reader(rec, strip), [body[:i], body[i:]])
        assert out == whole_out, i
        assert summary(r) == expected, i


@pytest.mark.parametrize("rec", RECORDED, ids=str)
def test_byte_at_a_time(rec: Recorded) -> None:
    body = crlf(rec.body)
    for strip in (False, True):
        out, r = run(reader(rec, strip), [body[i : i + 1] for i in range(len(body))])
        assert r.usage == rec.usage and r.counted_output_tokens == rec.counted and r.done
        if not (strip and rec.has_usage_chunk):
            assert out == body


@settings(max_examples=60, deadline=None)
@given(data=st.data(), rec=st.sampled_from(RECORDED), strip=st.booleans())
def test_random_chunks(data: st.DataObject, rec: Recorded, strip: bool) -> None:
    body = rec.body
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=40)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    whole_out, whole = run(reader(rec, strip), [body])
    out, r = run(reader(rec, strip), chunks)
    assert out == whole_out
    assert summary(r) == summary(whole)


def test_no_strip_returns_input_object() -> None:
    rec = RECORDED[0]
    r = reader(rec)
    chunk = rec.body[:100]
    assert r.feed(chunk) is chunk
    assert r.finish() == b""


@pytest.mark.parametrize("rec", [r for r in RECORDED if r.has_usage_chunk], ids=str)
def test_strip_removes_exactly_the_usage_chunk(rec: Recorded) -> None:
    body = rec.body
    out, r = run(reader(rec, strip=True), [body])
    assert out == body.replace(usage_chunk_raw(body), b"")
    assert len(body) - len(out) == len(usage_chunk_raw(body))
    assert r.usage == rec.usage  # still read, just not forwarded
    assert out.endswith(b"data: [DONE]\n\n")


def test_strip_holds_partial_event_until_complete() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=True, count_tokens=None)
    assert r.feed(b'data: {"choices":[{"delta":{"content":"hi"}}]}') == b""
    assert r.feed(b"\n") == b""
    assert r.feed(b"\n") == b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert r.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n') == b""
    assert r.usage == Usage(input_tokens=3, output_tokens=1)


def test_strip_keeps_comments_and_final_unterminated_event() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=True, count_tokens=None)
    out = r.feed(b": ping\n\n\n") + r.feed(b"data: [DONE]")
    assert out == b": ping\n\n\n"
    assert r.finish() == b"data: [DONE]"
    assert r.done


def test_strip_ignored_where_usage_is_always_reported() -> None:
    r = ANTHROPIC_MESSAGES.stream_reader(strip_usage_chunk=True, count_tokens=None)
    chunk = b"event: message_stop\ndata: {"
    assert r.feed(chunk) is chunk


def test_embeddings_do_not_stream() -> None:
    with pytest.raises(ValueError):
        OPENAI_EMBEDDINGS.stream_reader(strip_usage_chunk=False, count_tokens=None)


def test_no_count_tokens_counts_nothing() -> None:
    rec = RECORDED[0]
    _, r = run(rec.schema.stream_reader(strip_usage_chunk=False, count_tokens=None), [rec.body])
    assert r.counted_output_tokens == 0 and r.usage == rec.usage


def test_malformed_event_is_recorded_and_usage_still_read() -> None:
    body = (
        b"data: {not json\n\n"
        b"data: [1, 2]\n\n"
        b'data: {"choices":[],"usage":{"prompt_tokens":-1}}\n\n'
        b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    _, r = run(OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=len), [body])
    assert r.malformed_events == 3
    assert r.last_error is not None
    assert r.usage == Usage(input_tokens=7, output_tokens=2)
    assert r.counted_output_tokens == 2
    assert r.events == 6 and r.done


def test_tolerates_odd_shapes_without_raising() -> None:
    odd = [
        {"choices": "x"},
        {"choices": [1, None, {"delta": []}, {"delta": {"content": 5, "tool_calls": "x"}}]},
        {"choices": [{"delta": {"tool_calls": [1, {"function": []}, {"function": {"arguments": 3}}]}}]},
        {"type": ["list"], "delta": {"type": {}}},
        {"type": "content_block_delta", "delta": {"type": ["x"]}},
        {"type": "message_start", "message": []},
        {"type": "response.output_text.delta", "delta": None},
        {"type": "response.completed", "response": "x"},
    ]
    body = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in odd)
    for schema in (OPENAI_CHAT, OPENAI_COMPLETIONS, OPENAI_RESPONSES, ANTHROPIC_MESSAGES):
        _, r = run(schema.stream_reader(strip_usage_chunk=True, count_tokens=len), [body])
        assert r.events == len(odd)
        assert r.usage is None


def test_anthropic_delta_may_carry_input_fields() -> None:
    body = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":'
        b'{"input_tokens":12,"cache_creation_input_tokens":null,"output_tokens":40}}\n\n'
    )
    _, r = run(ANTHROPIC_MESSAGES.stream_reader(strip_usage_chunk=False, count_tokens=None), [body])
    assert r.usage == Usage(input_tokens=12, cached_input_tokens=5, output_tokens=40)
    assert not r.done  # no message_stop: an aborted stream


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_responses_other_terminal_events_carry_usage(kind: str) -> None:
    event = {"type": kind, "response": {"usage": {"input_tokens": 4, "output_tokens": 9}}}
    body = f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()
    _, r = run(OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None), [body])
    assert r.done and r.usage == Usage(input_tokens=4, output_tokens=9)


def test_oversize_event_raises_after_accounting_earlier_events() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=None, max_event_bytes=64)
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n'
    with pytest.raises(UpstreamError) as info:
        r.feed(usage + b"data: " + b"x" * 100)
    assert isinstance(info.value, EventTooLarge)
    assert r.usage == Usage(input_tokens=3)
    assert r.pending_bytes == 0


def test_continuous_usage_chunks_keep_the_latest_and_are_not_stripped() -> None:
    # vLLM's continuous_usage_stats: cumulative usage in every chunk that has choices
    body = b"".join(
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":%d}}\n\n'
        % i
        for i in (1, 2, 3)
    )
    out, r = run(OPENAI_CHAT.stream_reader(strip_usage_chunk=True, count_tokens=len), [body])
    assert out == body
    assert r.usage == Usage(input_tokens=5, output_tokens=3)
