"""StreamReader over recorded streams: whole, split at every byte, stripped."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
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


def test_oversize_event_is_streamed_not_raised_and_earlier_usage_kept() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=True, count_tokens=None, max_event_bytes=64)
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n'
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * 100 + b'"}}]}\n\n'
    out = r.feed(usage + big[:80]) + r.feed(big[80:]) + r.feed(b"data: [DONE]\n\n") + r.finish()
    assert out == big + b"data: [DONE]\n\n"  # the usage chunk stripped, the oversize one forwarded
    assert r.usage == Usage(input_tokens=3)
    assert r.oversize_events == 1 and r.events == 3 and r.done
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


# --- oversize terminal events -----------------------------------------------------------


def responses_with_huge_completed(size: int) -> tuple[bytes, Usage]:
    """The recorded Responses stream, its terminal event echoing `size` bytes of instructions."""
    rec = next(r for r in RECORDED if r.schema is OPENAI_RESPONSES)
    head, _, last = rec.body.rstrip(b"\n").rpartition(b"\n\n")
    event = json.loads(last.split(b"data: ", 1)[1])
    event["response"]["instructions"] = 'Follow the "rules".\n' * (size // 20)
    event["response"]["metadata"] = {"note": 'a "usage": {"input_tokens": 1} lookalike'}
    body = head + b"\n\nevent: response.completed\ndata: " + json.dumps(event).encode() + b"\n\n"
    return body, rec.usage


def test_five_mib_terminal_event_usage_at_many_split_offsets() -> None:
    body, usage = responses_with_huge_completed(5 << 20)
    assert len(body) > 5 << 20
    # spread over the event, then dense over its tail (the usage object and its key)
    offsets = [*range(0, len(body), len(body) // 16), *range(len(body) - 520, len(body) + 1, 20)]
    for i in offsets:
        r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=len)
        out = r.feed(body[:i]) + r.feed(body[i:])
        assert r.pending_bytes <= 1 << 20
        out += r.finish()
        assert out == body
        assert r.usage == usage, i
        assert r.done and r.terminal == "response.completed" and r.usage_complete
        assert r.oversize_events == 1 and r.malformed_events == 0


def test_huge_terminal_event_in_64k_chunks_holds_little() -> None:
    body, usage = responses_with_huge_completed(5 << 20)
    r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None)
    for i in range(0, len(body), 64 << 10):
        r.feed(body[i : i + (64 << 10)])
        assert r.pending_bytes <= 1 << 20
    r.finish()
    assert r.usage == usage and r.usage_complete


# --- encoded (compressed) streams -------------------------------------------------------


def _gzip(b: bytes) -> bytes:
    import gzip

    return gzip.compress(b)


def _br(b: bytes) -> bytes:
    import brotli

    return brotli.compress(b)


ENCODINGS = {"gzip": _gzip, "br": _br}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("rec", RECORDED, ids=str)
def test_encoded_stream_is_observed_and_forwarded_untouched(rec: Recorded, encoding: str) -> None:
    enc = ENCODINGS[encoding](rec.body)
    for i in range(len(enc) + 1):
        r = rec.schema.stream_reader(strip_usage_chunk=True, count_tokens=len, content_encoding=encoding)
        first, second = enc[:i], enc[i:]
        assert r.feed(first) is first and r.feed(second) is second  # never rewritten
        assert r.finish() == b""
        assert not r.may_rewrite and r.decode_error is None
        assert (r.usage, r.counted_output_tokens, r.done, r.events) == (rec.usage, rec.counted, True, rec.events)


def test_encoded_huge_terminal_event() -> None:
    body, usage = responses_with_huge_completed(3 << 20)
    enc = _gzip(body)
    r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None, content_encoding="gzip")
    for i in range(0, len(enc), 4096):
        r.feed(enc[i : i + 4096])
        assert r.pending_bytes <= 1 << 20
    r.finish()
    assert r.usage == usage and r.oversize_events == 1


def test_corrupt_or_unknown_encoding_is_recorded_and_bytes_still_forwarded() -> None:
    rec = RECORDED[0]
    enc = bytearray(_gzip(rec.body))
    enc[len(enc) // 2] ^= 0xFF
    r = rec.schema.stream_reader(strip_usage_chunk=True, count_tokens=len, content_encoding="gzip")
    chunk = bytes(enc)
    assert r.feed(chunk) is chunk
    assert r.finish() == b""
    assert r.decode_error is not None and not r.usage_complete
    r = rec.schema.stream_reader(strip_usage_chunk=True, count_tokens=len, content_encoding="compress")
    body = rec.body
    assert r.feed(body) is body and r.finish() == b""
    assert r.decode_error is not None and r.usage is None and r.events == 0 and not r.may_rewrite


def test_identity_encoding_is_not_encoded() -> None:
    rec = RECORDED[0]
    r = rec.schema.stream_reader(strip_usage_chunk=True, count_tokens=None, content_encoding="identity")
    assert r.may_rewrite
    out, _ = run(r, [rec.body])
    assert out == rec.body.replace(usage_chunk_raw(rec.body), b"")


# --- end facts ---------------------------------------------------------------------------

TERMINALS = {
    "openai_chat.sse": "[DONE]",
    "openai_chat_tools.sse": "[DONE]",
    "openai_completions.sse": "[DONE]",
    "openai_responses.sse": "response.completed",
    "anthropic_messages.sse": "message_stop",
    "anthropic_tools.sse": "message_stop",
}


@pytest.mark.parametrize("rec", RECORDED, ids=str)
def test_terminal_marker_and_usage_complete_at_every_prefix(rec: Recorded) -> None:
    body = rec.body
    _, whole = run(reader(rec), [body])
    assert whole.terminal == TERMINALS[rec.file] and whole.usage_complete
    for i in range(len(body) + 1):  # a client closing anywhere: no finish()
        r = reader(rec)
        r.feed(body[:i])
        if r.usage_complete:  # then the usage read is the whole stream's
            assert r.usage == rec.usage, i
        if r.done:
            assert r.usage_complete and r.terminal == TERMINALS[rec.file]


def test_chat_usage_chunk_is_final_before_done() -> None:
    rec = RECORDED[0]
    cut = rec.body.index(usage_chunk_raw(rec.body)) + len(usage_chunk_raw(rec.body))
    r = reader(rec)
    r.feed(rec.body[:cut])
    assert r.usage_complete and not r.done and r.terminal is None
    assert r.usage == rec.usage


def test_anthropic_message_start_alone_is_not_complete() -> None:
    body = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":10,"output_tokens":1}}}\n\n'
    )
    r = ANTHROPIC_MESSAGES.stream_reader(strip_usage_chunk=False, count_tokens=None)
    r.feed(body)
    assert r.usage == Usage(input_tokens=10, output_tokens=1) and not r.usage_complete


# --- per-call tools ----------------------------------------------------------------------


def test_responses_web_search_calls_counted_once() -> None:
    item = {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search"}}
    done = {"type": "response.output_item.done", "output_index": 0, "item": item}
    completed = {
        "type": "response.completed",
        "response": {
            "output": [item, {**item, "id": "ws_2"}, {"type": "message", "content": []}],
            "usage": {"input_tokens": 9, "output_tokens": 4},
        },
    }
    events = [done, {**done, "item": {**item, "id": "ws_2"}}, completed]
    body = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    expected = Usage(input_tokens=9, output_tokens=4, web_search_calls=2)
    _, r = run(OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None), [body])
    assert r.usage == expected and r.tool_calls == Usage(web_search_calls=2)
    # without the terminal event's output (an oversize one), the item events still count
    r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None)
    r.feed(body[: body.index(b"event: response.completed")])
    assert r.usage is None and r.tool_calls == Usage(web_search_calls=2)
    buffered = json.dumps(completed["response"]).encode()
    assert OPENAI_RESPONSES.usage_from_body(buffered) == expected


def test_anthropic_server_tool_use_in_the_stream() -> None:
    body = (
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":40,'
        b'"server_tool_use":{"web_search_requests":3,"web_fetch_requests":1}}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    _, r = run(ANTHROPIC_MESSAGES.stream_reader(strip_usage_chunk=False, count_tokens=None), [body])
    assert r.usage == Usage(output_tokens=40, web_search_calls=3, web_fetch_calls=1)
    assert r.usage_complete and r.terminal == "message_stop"
