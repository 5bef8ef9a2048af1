"""Cutting a stream: whole events forwarded, then the API's own end (ending.py, StreamReader.cut).

Every recorded stream is cut at every event boundary and in the middle of
every event; what the client would receive (forwarded + ending) is then
read back with the SSE parser and checked against each API's rules. The
SDKs read the same bytes in test_ending_sdk.py.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    SSEParser,
    Usage,
)
from extproc.protocols.ending import MAX_KEPT_OUTPUT_CHARS, MAX_RESPONSE_OBJECT_BYTES
from extproc.protocols.usage import (
    anthropic_usage,
    anthropic_usage_object,
    openai_usage,
    openai_usage_object,
    responses_usage,
    responses_usage_object,
)
from tests.protocols.cutting import CORPUS, REASON, SCOPE, STREAMS, USAGE, Stream, cut_at, reader
from tests.protocols.test_fuzz import SCALARS, WORDS

COMMENT = f": {REASON} scope={SCOPE}\n\n".encode()


def events(body: bytes) -> list[tuple[str | None, Any]]:
    p = SSEParser(1 << 24)
    return [(e.event, e.data if e.data == "[DONE]" else json.loads(e.data)) for e in p.feed(body) + p.finish()]


def kind(ev: tuple[str | None, Any]) -> str | None:
    name, obj = ev
    return obj.get("type", name) if isinstance(obj, dict) else name


# --- what a client receives, checked against each API's rules ---------------------------


def check_chat(before: list[Any], after: list[Any], include_usage: bool) -> None:
    every = [obj for _, obj in before + after]
    assert every[-1] == "[DONE]" and every.count("[DONE]") == 1
    chunks = every[:-1]
    finished: dict[int, list[str]] = {}
    for c in chunks:
        for choice in c["choices"]:
            finished.setdefault(choice["index"], [])
            if choice["finish_reason"] is not None:
                finished[choice["index"]].append(choice["finish_reason"])
    assert all(len(reasons) == 1 for reasons in finished.values()), finished
    for _, c in after[:-1]:
        assert all(choice["finish_reason"] == "length" for choice in c["choices"])
        if before:  # the stream's own id and model
            assert (c["id"], c["model"], c["object"]) == tuple(before[0][1][k] for k in ("id", "model", "object"))
    usage = [c["usage"] for c in chunks if c.get("usage")]
    new_usage = [c["usage"] for _, c in after[:-1] if c.get("usage")]
    assert len(usage) <= 1
    if include_usage:
        assert usage
        if new_usage:
            assert openai_usage(new_usage[0]) == USAGE
    else:
        assert not new_usage


def check_responses(before: list[Any], after: list[Any]) -> None:
    every = before + after
    kinds = [kind(e) for e in every]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.incomplete" and kinds.count("response.incomplete") == 1
    added = [obj["output_index"] for _, obj in every if kind((_, obj)) == "response.output_item.added"]
    done = [obj["output_index"] for _, obj in every if kind((_, obj)) == "response.output_item.done"]
    assert sorted(added) == sorted(done)
    seqs = [obj["sequence_number"] for _, obj in every if "sequence_number" in obj]
    if any("sequence_number" in obj for _, obj in before):
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    response = every[-1][1]["response"]
    assert response["id"] == every[0][1]["response"]["id"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert responses_usage(response["usage"]) == _responses_view(USAGE)
    items = {obj["output_index"]: obj["item"] for _, obj in every if kind((_, obj)) == "response.output_item.done"}
    assert response["output"] == [items[i] for i in sorted(items)]


TOKENS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens")


def _view(u: Usage, *fields: str) -> Usage:
    """Only `fields` of `u`: what an API's usage object can say."""
    return Usage(**{f: getattr(u, f) for f in fields})


def _responses_view(u: Usage) -> Usage:
    return _view(u, *TOKENS, "reasoning_tokens")


def _anthropic_view(u: Usage) -> Usage:
    return _view(u, *TOKENS)


def check_messages(before: list[Any], after: list[Any]) -> None:
    every = before + after
    kinds = [kind(e) for e in every if kind(e) != "ping"]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("message_start") == kinds.count("message_delta") == kinds.count("message_stop") == 1
    started = [obj["index"] for _, obj in every if kind((_, obj)) == "content_block_start"]
    stopped = [obj["index"] for _, obj in every if kind((_, obj)) == "content_block_stop"]
    assert started == stopped
    assert kinds.index("message_delta") > max((i for i, k in enumerate(kinds) if k == "content_block_stop"), default=0)
    for _, obj in after:
        if obj["type"] == "message_delta":
            assert obj["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
            assert anthropic_usage(obj["usage"]) == _anthropic_view(USAGE)


def check(stream: Stream, forwarded: bytes, ending: bytes) -> None:
    assert ending.startswith(COMMENT)
    before, after = events(forwarded), events(ending)
    if stream.schema in (OPENAI_CHAT, OPENAI_COMPLETIONS):
        check_chat(before, after, stream.include_usage)
    elif stream.schema is OPENAI_RESPONSES:
        check_responses(before, after)
    else:
        check_messages(before, after)


@pytest.mark.parametrize("stream", STREAMS, ids=str)
def test_cut_at_every_event_boundary_and_mid_event(stream: Stream) -> None:
    ends = stream.boundaries
    for start, end in pairwise(ends):
        forwarded, ending = cut_at(stream, start)
        assert forwarded == stream.body[:start]
        check(stream, forwarded, ending)
        for mid in {start + 1, (start + end) // 2, end - 1} - {start}:
            assert cut_at(stream, mid) == (forwarded, ending), mid  # the partial event is dropped


@pytest.mark.parametrize("stream", STREAMS, ids=str)
def test_a_cut_after_the_terminal_event_says_why_and_adds_nothing(stream: Stream) -> None:
    forwarded, ending = cut_at(stream, len(stream.body))
    assert forwarded == stream.body
    assert ending == COMMENT


@pytest.mark.parametrize("stream", [s for s in CORPUS if s.encoding], ids=str)
def test_an_encoded_stream_cannot_be_cut(stream: Stream) -> None:
    r = reader(stream)
    half = stream.body[: len(stream.body) // 2]
    assert r.feed(half) is half  # observed, forwarded as it came
    assert not r.may_rewrite
    assert r.cut(reason=REASON, scope=SCOPE, usage=USAGE, include_usage=False) is None


# --- the reader around a cut -------------------------------------------------------------

CHAT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":"fp",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n'
)


def test_not_cuttable_forwards_as_it_comes_and_cannot_be_cut() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=None)
    chunk = CHAT[:30]
    assert r.feed(chunk) is chunk
    assert r.cut(reason=REASON, scope=SCOPE, usage=USAGE, include_usage=False) is None


def test_cuttable_forwards_whole_events_only() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    assert r.feed(CHAT[:30]) == b""
    assert r.feed(CHAT[30:-1]) == b""
    assert r.feed(CHAT[-1:] + b": keep-alive\n\n") == CHAT + b": keep-alive\n\n"


def test_after_a_cut_nothing_more_is_forwarded_but_everything_is_observed() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=len, cuttable=True)
    assert r.feed(CHAT + CHAT[:40]) == CHAT
    assert r.cut(reason="run_deadline", scope="run:r1", usage=None, include_usage=False)
    assert r.cut_reason == "run_deadline"
    usage = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    assert r.feed(CHAT[40:] + CHAT + usage) == b""
    assert r.feed(b"data: [DONE]") == r.finish() == b""
    assert r.done and r.pending_bytes == 0
    assert r.counted_output_tokens == 3 * len("Hi")  # the partial event and what followed the cut
    assert r.usage == Usage(input_tokens=3, output_tokens=4) and r.usage_complete
    assert r.cut(reason=REASON, scope=SCOPE, usage=USAGE, include_usage=False) == b""


def test_chat_ending_exact() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    r.feed(CHAT)
    ending = r.cut(reason="run_deadline", scope="run:r1\nx", usage=Usage(input_tokens=4, output_tokens=2), include_usage=True)
    head = '"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":"fp"'
    usage = (
        '{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6,"prompt_tokens_details":{"cached_tokens":0},'
        '"completion_tokens_details":{"reasoning_tokens":0}}'
    )
    assert ending == (
        ": run_deadline scope=run:r1 x\n\n"
        f'data: {{{head},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"length"}}]}}\n\n'
        f'data: {{{head},"choices":[],"usage":{usage}}}\n\n'
        "data: [DONE]\n\n"
    ).encode()


def test_chat_ending_before_any_chunk_still_finishes_choice_zero() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    assert r.feed(CHAT[:50]) == b""
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=True) or b"")
    assert [obj if obj == "[DONE]" else obj["choices"][0]["finish_reason"] for _, obj in after] == ["length", "[DONE]"]


def test_strip_and_cut_hide_the_injected_usage_chunk_and_add_none() -> None:
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=True, count_tokens=None, cuttable=True)
    done = CHAT.replace(b'"content":"Hi"},"finish_reason":null', b'"content":"!"},"finish_reason":"stop"')
    usage = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    assert r.feed(CHAT + done + usage) == CHAT + done
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    assert after == [(None, "[DONE]")]  # every choice finished, and the client did not ask for usage


def test_completions_ending_uses_text_choices() -> None:
    r = OPENAI_COMPLETIONS.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    r.feed(b'data: {"id":"x","object":"text_completion","created":1,"model":"m","choices":[{"text":"a","index":1}]}\n\n')
    (_, last), _done = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    assert last["object"] == "text_completion"
    assert last["choices"] == [{"text": "", "index": 1, "logprobs": None, "finish_reason": "length"}]


def test_messages_ending_before_message_start_synthesizes_it() -> None:
    r = ANTHROPIC_MESSAGES.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    assert [k for k, _ in after] == ["message_start", "message_delta", "message_stop"]
    assert after[1][1]["usage"]["output_tokens"] == 0


def test_messages_ending_with_no_usage_given_reports_the_streams_own() -> None:
    r = ANTHROPIC_MESSAGES.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    r.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":9,"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    )
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    assert [k for k, _ in after] == ["content_block_stop", "message_delta", "message_stop"]
    assert anthropic_usage(after[1][1]["usage"]) == Usage(input_tokens=9, output_tokens=1)


RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m", "output": []}


def sse(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **obj})}\n\n".encode()


def test_responses_ending_closes_a_function_call_with_its_arguments_so_far() -> None:
    r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    item = {"id": "fc_1", "type": "function_call", "status": "in_progress", "arguments": "", "call_id": "c", "name": "f"}
    r.feed(
        sse("response.created", {"sequence_number": 0, "response": RESPONSE})
        + sse("response.output_item.added", {"sequence_number": 1, "output_index": 0, "item": item})
        + sse("response.function_call_arguments.delta", {"sequence_number": 2, "output_index": 0, "delta": '{"a":'})
    )
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=USAGE, include_usage=False) or b"")
    assert [(k, obj["sequence_number"]) for k, obj in after] == [
        ("response.function_call_arguments.done", 3),
        ("response.output_item.done", 4),
        ("response.incomplete", 5),
    ]
    closed = {**item, "arguments": '{"a":', "status": "incomplete"}
    assert after[0][1]["arguments"] == '{"a":'
    assert after[1][1]["item"] == closed
    assert after[2][1]["response"]["output"] == [closed]


def test_responses_ending_keeps_a_large_response_object_to_its_scalars() -> None:
    r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    big = {**RESPONSE, "instructions": "x" * MAX_RESPONSE_OBJECT_BYTES, "tools": [{"type": "function"}]}
    r.feed(sse("response.created", {"response": big}))
    (_, incomplete), = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    kept = incomplete["response"]
    assert "instructions" not in kept and "tools" not in kept
    assert (kept["id"], kept["model"], kept["status"], kept["usage"]) == ("resp_1", "m", "incomplete", None)


def test_responses_ending_bounds_the_text_it_keeps() -> None:
    r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
    part = {"type": "output_text", "annotations": [], "text": ""}
    r.feed(
        sse("response.created", {"response": RESPONSE})
        + sse("response.output_item.added", {"output_index": 0, "item": item})
        + sse("response.content_part.added", {"output_index": 0, "content_index": 0, "part": part})
    )
    piece = sse("response.output_text.delta", {"output_index": 0, "content_index": 0, "delta": "y" * 1000})
    for _ in range(MAX_KEPT_OUTPUT_CHARS // 1000 + 50):
        r.feed(piece)
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    assert after[0][0] == "response.output_text.done"
    assert len(after[0][1]["text"]) == MAX_KEPT_OUTPUT_CHARS // 1000 * 1000


def test_responses_ending_before_response_created_synthesizes_it() -> None:
    r = OPENAI_RESPONSES.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    assert [k for k, _ in after] == ["response.created", "response.incomplete"]
    assert [obj["sequence_number"] for _, obj in after] == [0, 1]


def test_oversize_response_created_still_names_the_response() -> None:
    r = OPENAI_RESPONSES.stream_reader(
        strip_usage_chunk=False, count_tokens=None, cuttable=True, max_event_bytes=4096
    )
    big = {**RESPONSE, "instructions": "z" * 10_000}
    r.feed(sse("response.created", {"sequence_number": 0, "response": big}))
    assert r.oversize_events == 1
    (_, incomplete), = events(r.cut(reason=REASON, scope=SCOPE, usage=None, include_usage=False) or b"")
    assert incomplete["sequence_number"] == 1
    assert {k: incomplete["response"][k] for k in ("id", "model", "created_at")} == {"id": "resp_1", "model": "m", "created_at": 1}


# --- usage written back in each API's shape --------------------------------------------

counts = st.integers(0, 10**6)


@given(counts, counts, counts, counts, counts, counts, counts)
def test_usage_objects_read_back_to_the_same_usage(i: int, c: int, w: int, o: int, r: int, ai: int, ao: int) -> None:
    u = Usage(input_tokens=i, cached_input_tokens=c, cache_write_tokens=w, output_tokens=o, reasoning_tokens=r,
              audio_input_tokens=ai, audio_output_tokens=ao)
    assert openai_usage(openai_usage_object(u)) == u
    assert responses_usage(responses_usage_object(u)) == _responses_view(u)
    assert anthropic_usage(anthropic_usage_object(u)) == _anthropic_view(u)


def test_anthropic_usage_object_keeps_server_tool_calls() -> None:
    u = Usage(input_tokens=1, output_tokens=2, web_search_calls=3, web_fetch_calls=1)
    assert anthropic_usage(anthropic_usage_object(u)) == u


@settings(max_examples=40, deadline=None)
@given(data=st.data(), stream=st.sampled_from(STREAMS))
def test_an_uncut_cuttable_stream_forwards_every_byte(data: st.DataObject, stream: Stream) -> None:
    body = stream.body
    offsets = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=30)))
    r = reader(stream)
    out = [r.feed(body[a:b]) for a, b in zip([0, *offsets], [*offsets, len(body)], strict=True)]
    assert b"".join(out) + r.finish() == body
    assert r.done and r.cut_reason is None


def test_a_running_usage_count_is_not_the_usage_chunk() -> None:
    """Some OpenAI-compatible servers put a running `usage` on every chunk; the client that asked
    for usage still gets the final usage chunk."""
    r = OPENAI_CHAT.stream_reader(strip_usage_chunk=False, count_tokens=None, cuttable=True)
    r.feed(CHAT.replace(b'"finish_reason":null}]', b'"finish_reason":null}],"usage":{"prompt_tokens":4,"completion_tokens":1}'))
    after = events(r.cut(reason=REASON, scope=SCOPE, usage=USAGE, include_usage=True) or b"")
    assert openai_usage(after[1][1]["usage"]) == USAGE and after[1][1]["choices"] == []


# --- odd upstream shapes never break a cut -------------------------------------------------

KINDS = st.sampled_from(
    "message_start content_block_start content_block_stop message_delta response.created response.in_progress "
    "response.output_item.added response.content_part.added response.output_text.delta response.refusal.delta "
    "response.output_text.done response.content_part.done response.function_call_arguments.delta "
    "response.custom_tool_call_input.delta response.output_item.done message function_call custom_tool_call "
    "refusal output_text".split()
)
ODD = st.recursive(SCALARS | KINDS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WORDS, inner, max_size=4), max_leaves=8)


def slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) inside a JSON value."""
    inner = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [slot for k, v in inner for slot in [(value, k), *slots(v)]]


def tampered(data: st.DataObject, stream: Stream) -> bytes:
    """The stream's events up to a random one, a few of their values replaced by odd ones."""
    evs = [(name, obj) for name, obj in events(stream.body) if obj != "[DONE]"]
    evs = evs[: data.draw(st.integers(0, len(evs)))]
    for _ in range(data.draw(st.integers(0, 4)) if evs else 0):
        where = slots(data.draw(st.sampled_from(evs))[1])
        if where:
            container, key = data.draw(st.sampled_from(where))
            container[key] = data.draw(ODD)
    return b"".join((f"event: {n}\n" if n else "").encode() + b"data: " + json.dumps(o).encode() + b"\n\n" for n, o in evs)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), stream=st.sampled_from(STREAMS))
def test_a_cut_after_odd_events_is_well_formed(data: st.DataObject, stream: Stream) -> None:
    body = tampered(data, stream)
    schema = stream.schema
    r = schema.stream_reader(strip_usage_chunk=data.draw(st.booleans()), count_tokens=len, cuttable=True)
    r.feed(body)
    usage = data.draw(st.none() | st.just(USAGE))
    ending = r.cut(reason=REASON, scope=SCOPE, usage=usage, include_usage=data.draw(st.booleans()))
    assert ending is not None and ending.startswith(COMMENT)
    after = events(ending)  # every data line is JSON (or [DONE])
    assert after or r.done
