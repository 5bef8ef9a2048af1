"""The JSON body of a non-streamed call, assembled from a stream (assemble.py).

Checked four ways: on real recorded streams (the body bills like the stream it
came from; where the corpus recorded the same request without `stream`, the
body has the recorded JSON's fields and types); by round trip (every recorded
chat and Anthropic JSON body, streamed as the provider streams it, assembles
back to itself); against the mock backend answering one request both ways; and
through the official SDKs, which must parse every body (cut ones included)
into their typed objects with the usage we meant.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import UpstreamError
from extproc.mock_backend import MockConfig, make_app
from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    Schema,
    StreamReader,
    Usage,
)
from extproc.protocols.assemble import (
    ASSEMBLED_APIS,
    assembler_for,
    partial_json_object,
    usage_object,
)
from extproc.protocols.encoding import content_decoder
from extproc.protocols.sse import SSEParser
from extproc.protocols.usage import anthropic_usage, openai_usage, responses_usage
from tests.replay.server import load_corpus, response_bytes

CORPUS = load_corpus()
SCHEMA = {
    "openai.chat_completions": OPENAI_CHAT,
    "openai.completions": OPENAI_COMPLETIONS,
    "openai.responses": OPENAI_RESPONSES,
    "anthropic.messages": ANTHROPIC_MESSAGES,
}
Event = tuple[str | None, dict[str, Any]]


def decoded(name: str) -> bytes:
    ex = CORPUS[name]
    headers = {k.lower(): v for k, v in ex["response"]["headers"]}
    decoder = content_decoder(headers.get("content-encoding"))
    body = response_bytes(ex)
    return decoder.decode_all(body) if decoder is not None else body


def sse_events(body: bytes) -> list[Event]:
    parser = SSEParser(64 << 20)
    evs = parser.feed(body) + parser.finish()
    return [(e.event, json.loads(e.data)) for e in evs if e.dispatch and e.data != "[DONE]"]


def assemble(schema: Schema, events: list[Event], **kw: Any) -> dict[str, Any]:
    asm = assembler_for(schema.name)
    for event, obj in events:
        asm.take(event, obj)
    return json.loads(asm.body(**kw))


def streams(*apis: str) -> list[str]:
    return [
        n
        for n, ex in CORPUS.items()
        if ex["kind"] == "sse" and ex["response"]["status"] == 200 and SCHEMA.get(ex["api"]) is not None and (not apis or ex["api"] in apis)
    ]


def schema_of(name: str) -> Schema:
    return SCHEMA[CORPUS[name]["api"]]


def reader_usage(schema: Schema, body: bytes) -> Usage | None:
    reader = schema.stream_reader(strip_usage_chunk=False, count_tokens=None, max_event_bytes=64 << 20)
    reader.feed(body)
    reader.finish()
    return reader.usage


# --- the official SDKs --------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


def _openai(body: bytes) -> openai.OpenAI:
    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=body, headers={"content-type": "application/json"}))
    return openai.OpenAI(base_url="http://sdk.test/v1", api_key="x", max_retries=0, http_client=httpx.Client(transport=transport))


def _anthropic(body: bytes) -> anthropic.Anthropic:
    # this anthropic release speaks httpx2 (the same API as httpx, MockTransport included)
    transport = httpx2.MockTransport(lambda _: httpx2.Response(200, content=body, headers={"content-type": "application/json"}))
    return anthropic.Anthropic(base_url="http://sdk.test", api_key="x", max_retries=0, http_client=httpx2.Client(transport=transport))


SDK_CALLS: dict[str, Callable[[bytes], Any]] = {
    "openai.chat": lambda b: _openai(b).chat.completions.create(model="m", messages=USER),  # type: ignore[arg-type]
    "openai.completions": lambda b: _openai(b).completions.create(model="m", prompt="hi"),
    "openai.responses": lambda b: _openai(b).responses.create(model="m", input="hi"),
    "anthropic.messages": lambda b: _anthropic(b).messages.create(model="m", max_tokens=5, messages=USER),  # type: ignore[arg-type]
}
SDK_TYPES = {
    "openai.chat": openai.types.chat.ChatCompletion,
    "openai.completions": openai.types.Completion,
    "openai.responses": openai.types.responses.Response,
    "anthropic.messages": anthropic.types.Message,
}


def through_sdk(schema: Schema, body: dict[str, Any], *, strict: bool = True) -> Any:
    """The body served to the SDK's `create()`: the typed object it returns holds
    every field we sent (`to_dict` gives the body back), its usage is ours, and
    (`strict`) the body passes the SDK model's full validation."""
    raw = json.dumps(body).encode()
    got = SDK_CALLS[schema.name](raw)
    model = SDK_TYPES[schema.name]
    assert type(got) is model
    assert got.to_dict() == body
    if strict:
        model.model_validate(body)
    if body.get("usage") is not None:
        assert got.usage.to_dict() == body["usage"]
        if strict:
            assert got.usage == type(got.usage).model_validate(body["usage"])
    return got


# --- recorded streams --------------------------------------------------------------


@pytest.mark.parametrize("name", streams())
def test_recorded_stream_assembles_to_a_body_billed_like_the_stream(name: str) -> None:
    schema = schema_of(name)
    raw = decoded(name)
    body = assemble(schema, sse_events(raw))
    assert schema.usage_from_body(json.dumps(body).encode()) == reader_usage(schema, raw)
    # recorded Responses objects predate fields this SDK requires; their own object is passed on as sent
    through_sdk(schema, body, strict=schema is not OPENAI_RESPONSES)


def shape(value: Any) -> Any:
    """Field names and JSON types, recursively; a list is the set of its elements' shapes."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted({json.dumps(shape(v), sort_keys=True) for v in value})
    return {bool: "bool", int: "number", float: "number", str: "string", type(None): "null"}[type(value)]


SAME_REQUEST = [  # (stream, JSON) recorded for one request body, `stream` aside
    ("oai-chat-sse-usage-n2", "oai-chat-json-n2"),
    ("ant-sse-tools", "ant-json-tools"),
    ("ant-sse-thinking", "ant-json-thinking"),
    ("ant-sse-thinking-37", "ant-json-thinking-37"),
    ("ant-sse-gzip-beta-tools", "ant-json-server-tool-use"),
]


@pytest.mark.parametrize(("stream", "recorded"), SAME_REQUEST)
def test_assembled_body_has_the_recorded_json_fields(stream: str, recorded: str) -> None:
    schema = schema_of(stream)
    streamed = json.loads(CORPUS[stream]["request"]["body"])
    assert {k: v for k, v in streamed.items() if not k.startswith("stream")} == json.loads(CORPUS[recorded]["request"]["body"])
    body = assemble(schema, sse_events(decoded(stream)))
    want = json.loads(decoded(recorded))
    assert shape(body) == shape(want)
    assert body["model"] == want["model"]
    if schema is OPENAI_CHAT:
        assert [c["finish_reason"] for c in body["choices"]] == [c["finish_reason"] for c in want["choices"]]
    else:
        assert (body["stop_reason"], [b["type"] for b in body["content"]]) == (want["stop_reason"], [b["type"] for b in want["content"]])
    # the same prompt: the same input figures (the outputs are two samplings)
    got, expected = schema.read_usage(body["usage"]), schema.read_usage(want["usage"])
    assert got is not None and expected is not None
    assert (got.input_tokens, got.cached_input_tokens, got.cache_write_tokens) == (
        expected.input_tokens,
        expected.cached_input_tokens,
        expected.cache_write_tokens,
    )


# --- round trip: a recorded JSON body, streamed the provider's way, assembles back ----


def pieces(text: str | None, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] if text else []


def chat_stream_of(body: dict[str, Any]) -> list[Event]:
    """The chunks OpenAI streams for `body`: per choice a role delta, text pieces,
    each tool call's head then its argument pieces, a finish chunk; choices
    interleaved; then the usage chunk."""
    head = {k: body[k] for k in ("id", "created", "model", "service_tier", "system_fingerprint") if k in body}
    per_choice = []
    for c in body["choices"]:
        m = c["message"]
        calls = m.get("tool_calls") or []
        deltas: list[dict[str, Any]] = [{"role": m["role"], "content": None if calls else "", "refusal": None}]
        for key in ("reasoning_content", "content", "refusal"):
            deltas += [{key: p} for p in pieces(m.get(key))]
        for j, call in enumerate(calls):
            kind = call["type"]
            streamed = "arguments" if kind == "function" else "input"
            part = call[kind]
            deltas.append({"tool_calls": [{"index": j, "id": call["id"], "type": kind, kind: {"name": part["name"], streamed: ""}}]})
            deltas += [{"tool_calls": [{"index": j, kind: {streamed: p}}]} for p in pieces(part[streamed])]
        if m.get("annotations"):
            deltas.append({"annotations": m["annotations"]})
        chunks = [{"index": c["index"], "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        chunks.append({"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]})
        per_choice.append(chunks)
    events: list[Event] = [
        (None, {**head, "object": "chat.completion.chunk", "choices": [chunk]})
        for group in itertools.zip_longest(*per_choice)
        for chunk in group
        if chunk is not None
    ]
    if "usage" in body:
        events.append((None, {**head, "object": "chat.completion.chunk", "choices": [], "usage": body["usage"]}))
    return events


def messages_stream_of(body: dict[str, Any]) -> list[Event]:
    """The events Anthropic streams for `body`: message_start (empty content, the
    input usage, output 1), each block started empty and filled by deltas,
    message_delta (stop reason, output usage, the other top-level fields), message_stop."""
    top = {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    message = {k: v for k, v in body.items() if k in top}
    message.update(content=[], stop_reason=None, stop_sequence=None, usage={**body["usage"], "output_tokens": 1})
    events: list[Event] = [("message_start", {"type": "message_start", "message": message})]
    for i, block in enumerate(body["content"]):
        kind, deltas = block["type"], []
        start = dict(block)
        if kind == "text":
            start["text"] = ""
            deltas = [{"type": "text_delta", "text": p} for p in pieces(block["text"])]
        elif kind == "thinking":
            start.update(thinking="", signature="")
            deltas = [{"type": "thinking_delta", "thinking": p} for p in pieces(block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif "input" in block:
            start["input"] = {}
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces(json.dumps(block["input"]))]
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    delta = {"type": "message_delta", "delta": {"stop_reason": body["stop_reason"], "stop_sequence": body["stop_sequence"]}}
    delta["usage"] = {"output_tokens": body["usage"]["output_tokens"]}
    delta.update({k: v for k, v in body.items() if k not in top})
    return [*events, ("message_delta", delta), ("message_stop", {"type": "message_stop"})]


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal, except that `got` may add fields the recorded body omits, at their
    empty value (`annotations: []`, `refusal: null` where an older API left them out)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for k in want:
            assert k in got, f"{where}.{k} missing"
            assert_same(got[k], want[k], f"{where}.{k}")
        assert all(got[k] in (None, []) for k in got.keys() - want.keys()), where
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


REFUSAL = {
    "id": "chatcmpl-refusal",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that.", "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 10, "total_tokens": 19},
    "system_fingerprint": "fp_1",
}


def json_bodies(api: str) -> list[str]:
    return [n for n, ex in CORPUS.items() if ex["kind"] == "json" and ex["response"]["status"] == 200 and ex["api"] == api]


@pytest.mark.parametrize("name", [*json_bodies("openai.chat_completions"), "refusal"])
def test_chat_json_streamed_then_assembled_is_itself(name: str) -> None:
    want = REFUSAL if name == "refusal" else json.loads(decoded(name))
    body = assemble(OPENAI_CHAT, chat_stream_of(want))
    assert_same(body, want)
    got = through_sdk(OPENAI_CHAT, body)
    for choice, recorded in zip(got.choices, want["choices"]):
        assert choice.message.content == recorded["message"]["content"]
        assert len(choice.message.tool_calls or ()) == len(recorded["message"].get("tool_calls") or ())


def test_round_trip_covers_parallel_tools_custom_tools_n_and_refusal() -> None:
    messages = [c["message"] for n in json_bodies("openai.chat_completions") for c in json.loads(decoded(n))["choices"]]
    assert any(len(m.get("tool_calls") or ()) > 1 for m in messages)
    assert any(call["type"] == "custom" for m in messages for call in m.get("tool_calls") or ())
    assert any(len(json.loads(decoded(n))["choices"]) > 1 for n in json_bodies("openai.chat_completions"))
    assert REFUSAL["choices"][0]["message"]["refusal"]


@pytest.mark.parametrize("name", json_bodies("anthropic.messages"))
def test_messages_json_streamed_then_assembled_is_itself(name: str) -> None:
    want = json.loads(decoded(name))
    body = assemble(ANTHROPIC_MESSAGES, messages_stream_of(want))
    assert body == want
    through_sdk(ANTHROPIC_MESSAGES, body)


# --- cut: the budget ran out mid-stream ---------------------------------------------

CUT_USAGE = Usage(input_tokens=80, cached_input_tokens=5, output_tokens=7)


def until(events: list[Event], stop: Callable[[Event], bool]) -> list[Event]:
    return list(itertools.takewhile(lambda e: not stop(e), events))


def test_chat_cut_mid_tool_call_keeps_the_partial_arguments() -> None:
    events = sse_events(decoded("oai-chat-sse-usage-tools"))
    seen = until(events, lambda e: bool(e[1]["choices"]) and e[1]["choices"][0]["finish_reason"] is not None)
    arguments = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for _, c in seen[:6] if "tool_calls" in c["choices"][0]["delta"])
    body = assemble(OPENAI_CHAT, seen[:6], cut=True, usage=CUT_USAGE)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == arguments
    assert arguments and not arguments.endswith("}")
    assert openai_usage(body["usage"]) == CUT_USAGE
    got = through_sdk(OPENAI_CHAT, body)
    assert got.choices[0].message.tool_calls[0].function.name == "get_current_weather"


def test_chat_cut_with_n_choices_ends_every_unfinished_choice() -> None:
    events = sse_events(decoded("oai-chat-sse-usage-n2"))
    full = assemble(OPENAI_CHAT, events)
    body = assemble(OPENAI_CHAT, events[:9], cut=True, usage=CUT_USAGE)
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    for cut, whole in zip(body["choices"], full["choices"]):
        assert whole["message"]["content"].startswith(cut["message"]["content"])
        assert len(cut["message"]["content"]) < len(whole["message"]["content"])
    through_sdk(OPENAI_CHAT, body)


def test_cut_after_the_stream_finished_changes_nothing_but_missing_facts() -> None:
    events = sse_events(decoded("oai-chat-sse-usage"))
    assert assemble(OPENAI_CHAT, events, cut=True, usage=CUT_USAGE) == assemble(OPENAI_CHAT, events)


def test_completions_cut() -> None:
    events = sse_events(decoded("oai-completions-sse"))
    body = assemble(OPENAI_COMPLETIONS, events[:3], cut=True, usage=CUT_USAGE)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == "".join(c["choices"][0]["text"] for _, c in events[:3])
    assert openai_usage(body["usage"]) == CUT_USAGE
    through_sdk(OPENAI_COMPLETIONS, body)


def test_responses_cut_mid_message_reads_like_the_recorded_max_output_tokens_answer() -> None:
    """The corpus holds a stream the API itself stopped at max_output_tokens: cutting
    the same stream after its last text delta gives that response object."""
    events = sse_events(decoded("oai-responses-sse-incomplete"))
    recorded = events[-1][1]["response"]
    seen = until(events, lambda e: e[1]["type"] == "response.output_text.done")
    usage = responses_usage(recorded["usage"])
    body = assemble(OPENAI_RESPONSES, seen, cut=True, usage=usage)
    assert responses_usage(body["usage"]) == usage
    # the last response object before the cut is `response.in_progress`'s: the tier actually served comes at the end
    settled = {"usage", "service_tier"}
    assert {k: v for k, v in body.items() if k not in settled} == {k: v for k, v in recorded.items() if k not in settled}
    got = through_sdk(OPENAI_RESPONSES, body)
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert got.output_text == recorded["output"][0]["content"][0]["text"]


def test_responses_cut_mid_function_call_drops_the_half_call() -> None:
    events = sse_events(decoded("oai-responses-sse-function-call"))
    seen = until(events, lambda e: e[1]["type"] == "response.function_call_arguments.done")[:-3]
    assert seen[-1][1]["type"] == "response.function_call_arguments.delta"
    body = assemble(OPENAI_RESPONSES, seen, cut=True, usage=CUT_USAGE)
    assert (body["status"], body["incomplete_details"], body["output"]) == ("incomplete", {"reason": "max_output_tokens"}, [])
    assert responses_usage(body["usage"]) == CUT_USAGE
    through_sdk(OPENAI_RESPONSES, body)


@pytest.mark.parametrize("name", streams("openai.responses"))
def test_responses_terminal_event_reduced_to_its_usage_still_assembles(name: str) -> None:
    """An oversize terminal event reaches the assembler as stream.py keeps it: type and usage."""
    events = sse_events(decoded(name))
    kind, full = events[-1][1]["type"], events[-1][1]["response"]
    reduced = [*events[:-1], (kind, {"type": kind, "response": {"usage": full["usage"]}})]
    body = assemble(OPENAI_RESPONSES, reduced)
    assert (body["id"], body["status"], body["output"], body["usage"]) == (full["id"], full["status"], full["output"], full["usage"])
    through_sdk(OPENAI_RESPONSES, body, strict=False)


def test_anthropic_cut_mid_tool_use_keeps_the_complete_members_of_its_input() -> None:
    events = sse_events(decoded("ant-sse-gzip-beta-tools"))
    last = max(i for i, (_, o) in enumerate(events) if o.get("delta", {}).get("partial_json") == ", ")
    body = assemble(ANTHROPIC_MESSAGES, events[: last + 1], cut=True, usage=CUT_USAGE)
    assert body["stop_reason"] == "max_tokens"
    assert body["content"][-1]["type"] == "tool_use"
    assert body["content"][-1]["input"] == {}  # `{"location": "San Francisco, ` : its one member is unfinished
    assert [b["type"] for b in body["content"]] == ["text", "server_tool_use", "tool_search_tool_result", "text", "tool_use"]
    start_usage = events[0][1]["message"]["usage"]
    assert body["usage"] == {**start_usage, **usage_object("anthropic.messages", CUT_USAGE)}
    assert anthropic_usage(body["usage"]) == CUT_USAGE
    through_sdk(ANTHROPIC_MESSAGES, body)


def test_anthropic_cut_mid_thinking_drops_the_unsigned_block() -> None:
    events = sse_events(decoded("ant-sse-thinking-37"))
    first_text = next(i for i, (_, o) in enumerate(events) if o.get("delta", {}).get("type") == "thinking_delta")
    body = assemble(ANTHROPIC_MESSAGES, events[: first_text + 2], cut=True)
    assert body["content"] == [] and body["stop_reason"] == "max_tokens"
    assert body["usage"] == events[0][1]["message"]["usage"]  # no usage given: message_start's
    through_sdk(ANTHROPIC_MESSAGES, body)


def test_anthropic_cut_mid_text_keeps_the_text_so_far() -> None:
    events = sse_events(decoded("ant-sse-tools"))
    body = assemble(ANTHROPIC_MESSAGES, events[:8], cut=True, usage=CUT_USAGE)
    texts = [o["delta"]["text"] for _, o in events[:8] if o.get("type") == "content_block_delta"]
    assert body["content"] == [{"type": "text", "text": "".join(texts)}]
    through_sdk(ANTHROPIC_MESSAGES, body)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ('{"a": 1, "b": [1, "2"', {"a": 1, "b": [1, "2"]}),
        ('{"a": 1, "b": [1, 23', {"a": 1, "b": [1]}),  # 23 may be the start of 234
        ('{"a": 1, "b": tru', {"a": 1}),
        ('{"a": 1, "b": "half', {"a": 1}),
        ('{"a": {"x": "y", "z": tr', {"a": {"x": "y"}}),
        ('{"a": "x\\"', {}),
        ('{"a": 1, "b":', {"a": 1}),
        ('{"a": "1,2", "b', {"a": "1,2"}),
        ("", {}),
        ("[1, 2", {}),
        ('{"a": 1}', {"a": 1}),
    ],
)
def test_partial_json_object(text: str, want: dict[str, Any]) -> None:
    assert partial_json_object(text) == want


# --- the mock backend, asked both ways ------------------------------------------------

MOCK_CASES = [
    # (schema, path, body, mock headers)
    (OPENAI_CHAT, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER}, {"x-mock-output-tokens": "6"}),
    (OPENAI_CHAT, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER, "n": 2, "max_tokens": 4}, {"x-mock-output-tokens": "6"}),
    (OPENAI_CHAT, "/v1/chat/completions", {"model": "o3", "messages": USER}, {"x-mock-reasoning-tokens": "3", "x-mock-cached-tokens": "2"}),
    (OPENAI_COMPLETIONS, "/v1/completions", {"model": "m", "prompt": "Say hi", "n": 2}, {"x-mock-output-tokens": "5"}),
    (OPENAI_COMPLETIONS, "/v1/completions", {"model": "m", "prompt": "Say hi", "max_tokens": 3}, {"x-mock-output-tokens": "5"}),
    (OPENAI_RESPONSES, "/v1/responses", {"model": "gpt-4o", "input": "hi"}, {"x-mock-output-tokens": "5", "x-mock-cached-tokens": "1"}),
    (OPENAI_RESPONSES, "/v1/responses", {"model": "gpt-4o", "input": "hi", "max_output_tokens": 2}, {"x-mock-output-tokens": "5"}),
    (ANTHROPIC_MESSAGES, "/v1/messages", {"model": "claude", "max_tokens": 100, "messages": USER}, {"x-mock-cache-write-tokens": "2"}),
    (ANTHROPIC_MESSAGES, "/v1/messages", {"model": "claude", "max_tokens": 3, "messages": USER}, {"x-mock-output-tokens": "8"}),
]
IDS = frozenset({"id", "created", "created_at", "completed_at"})


def masked(value: Any) -> Any:
    """Without the fields the mock draws afresh per answer (ids, clocks)."""
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items() if k not in IDS}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


@pytest.fixture
async def mock() -> Any:
    server = TestServer(make_app(MockConfig(token_delay_ms=0)), host="127.0.0.1")
    await server.start_server()
    async with ClientSession(f"http://127.0.0.1:{server.port}") as session:
        yield session
    await server.close()


async def ask(session: ClientSession, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    async with session.post(path, data=body, headers={"content-type": "application/json", **headers}) as r:
        assert r.status == 200
        return await r.read()


@pytest.mark.parametrize(("schema", "path", "request_body", "headers"), MOCK_CASES)
async def test_mock_backend_answer_and_assembled_stream_are_the_same(
    mock: ClientSession, schema: Schema, path: str, request_body: dict[str, Any], headers: dict[str, str]
) -> None:
    raw = json.dumps(request_body).encode()
    facts = schema.parse_request(raw)
    assert not facts.stream
    answered = json.loads(await ask(mock, path, raw, headers))
    streamed = await ask(mock, path, schema.rewrite_request(facts, stream=True), headers)
    body = assemble(schema, sse_events(streamed))
    assert masked(body) == masked(answered)
    through_sdk(schema, body)


CUT_CASES = [  # (schema, path, body, mock headers); Responses: see the recorded incomplete stream above
    (OPENAI_CHAT, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER}, {"x-mock-cached-tokens": "2"}),
    (OPENAI_COMPLETIONS, "/v1/completions", {"model": "m", "prompt": "Say hi"}, {}),
    (ANTHROPIC_MESSAGES, "/v1/messages", {"model": "claude", "max_tokens": 100, "messages": USER}, {"x-mock-cache-write-tokens": "2"}),
]


@pytest.mark.parametrize(("schema", "path", "request_body", "headers"), CUT_CASES)
async def test_mock_stream_cut_after_k_tokens_reads_like_an_answer_capped_at_k(
    mock: ClientSession, schema: Schema, path: str, request_body: dict[str, Any], headers: dict[str, str]
) -> None:
    """Cut after 3 tokens, the body is the mock's own answer to the request with a
    3-token cap (finish_reason "length" / stop_reason "max_tokens"), usage given."""
    k, headers = 3, {**headers, "x-mock-output-tokens": "8"}
    cap = "max_tokens" if schema is not OPENAI_CHAT else "max_completion_tokens"
    capped = json.loads(await ask(mock, path, json.dumps({**request_body, cap: k}).encode(), headers))
    facts = schema.parse_request(json.dumps(request_body).encode())
    events = sse_events(await ask(mock, path, schema.rewrite_request(facts, stream=True), headers))
    deltas = [i for i, (_, o) in enumerate(events) if o.get("type") == "content_block_delta" or any(c.get("delta", {}).get("content") or c.get("text") for c in o.get("choices") or ())]
    usage = schema.read_usage(capped["usage"])
    body = assemble(schema, events[: deltas[k - 1] + 1], cut=True, usage=usage)
    assert schema.read_usage(body["usage"]) == usage
    assert masked({**body, "usage": None}) == masked({**capped, "usage": None})
    through_sdk(schema, body)


# --- usage rendering, bounds, errors, garbage ---------------------------------------

counts = st.integers(0, 10**6)


@given(counts, counts, counts, counts, counts, counts, counts)
def test_usage_object_reads_back_as_the_same_usage(i: int, cached: int, write: int, out: int, reasoning: int, a_in: int, a_out: int) -> None:
    openai_u = Usage(
        input_tokens=i + a_in,
        cached_input_tokens=cached,
        cache_write_tokens=write,
        output_tokens=out + reasoning + a_out,
        reasoning_tokens=reasoning,
        audio_input_tokens=a_in,
        audio_output_tokens=a_out,
    )
    assert openai_usage(usage_object("openai.chat", openai_u)) == openai_u
    with_reasoning = Usage(input_tokens=i, cached_input_tokens=cached, cache_write_tokens=write, output_tokens=out + reasoning, reasoning_tokens=reasoning)
    assert responses_usage(usage_object("openai.responses", with_reasoning)) == with_reasoning
    with_tools = Usage(input_tokens=i, cached_input_tokens=cached, cache_write_tokens=write, output_tokens=out, web_search_calls=a_in % 5, web_fetch_calls=a_out % 3)
    assert anthropic_usage(usage_object("anthropic.messages", with_tools)) == with_tools


def test_every_streaming_schema_but_embeddings_is_assembled() -> None:
    assert {OPENAI_CHAT.name, OPENAI_COMPLETIONS.name, OPENAI_RESPONSES.name, ANTHROPIC_MESSAGES.name} == ASSEMBLED_APIS
    with pytest.raises(ValueError):
        assembler_for(OPENAI_EMBEDDINGS.name)


@pytest.mark.parametrize("name", ["oai-chat-sse-usage-cached", "oai-responses-sse-cached", "ant-sse-cache-write", "oai-completions-sse"])
def test_held_output_is_bounded(name: str) -> None:
    schema = schema_of(name)
    events = sse_events(decoded(name))
    asm = assembler_for(schema.name, max_bytes=20)
    with pytest.raises(UpstreamError, match="over 20 bytes"):
        for event, obj in events:
            asm.take(event, obj)
    roomy = assembler_for(schema.name)
    for event, obj in events:
        roomy.take(event, obj)
    assert 0 < roomy.held <= len(decoded(name))


@pytest.mark.parametrize(
    ("schema", "event", "error"),
    [
        (OPENAI_CHAT, None, {"error": {"message": "overloaded", "type": "server_error"}}),
        (OPENAI_COMPLETIONS, None, {"error": {"message": "overloaded", "type": "server_error"}}),
        (OPENAI_RESPONSES, "error", {"type": "error", "code": "server_error", "message": "overloaded"}),
        (ANTHROPIC_MESSAGES, "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ],
)
def test_an_error_event_is_never_dressed_as_a_success(schema: Schema, event: str | None, error: dict[str, Any]) -> None:
    name = {OPENAI_CHAT: "oai-chat-sse-usage", OPENAI_COMPLETIONS: "oai-completions-sse", OPENAI_RESPONSES: "oai-responses-sse", ANTHROPIC_MESSAGES: "ant-sse-opus"}[schema]
    asm = assembler_for(schema.name)
    for ev, obj in sse_events(decoded(name))[:3]:
        asm.take(ev, obj)
    asm.take(event, error)
    assert asm.error is not None
    with pytest.raises(UpstreamError, match="overloaded"):
        asm.body(cut=True, usage=CUT_USAGE)


@pytest.mark.parametrize("api", sorted(ASSEMBLED_APIS))
def test_nothing_identifying_is_an_upstream_error(api: str) -> None:
    asm = assembler_for(api)
    asm.take(None, {"type": "ping"})
    with pytest.raises(UpstreamError):
        asm.body(cut=True, usage=CUT_USAGE)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "index", "delta", "text", "content", "choices", "response", "message", "output_index", "content_index", "item", "part", "usage", "tool_calls", "function", "arguments", "content_block", "partial_json", "logprobs", "finish_reason"]), inner, max_size=4),
    max_leaves=20,
)
event_types = st.sampled_from(
    [None, "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "response.created", "response.output_item.added", "response.content_part.added", "response.output_text.delta", "response.output_item.done", "response.completed"]
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ASSEMBLED_APIS)), st.lists(st.tuples(event_types, st.dictionaries(st.sampled_from(["type", "index", "delta", "choices", "response", "message", "output_index", "content_index", "item", "part", "usage", "content_block", "id", "model"]), json_values, max_size=5)), max_size=8), st.booleans())
def test_garbage_events_raise_nothing_but_upstream_errors(api: str, events: list[Event], cut: bool) -> None:
    asm = assembler_for(api)
    try:
        for event, obj in events:
            if event is not None and "type" not in obj:
                obj = {**obj, "type": event}
            asm.take(event, copy.deepcopy(obj))
        json.loads(asm.body(cut=cut, usage=CUT_USAGE))
    except UpstreamError:
        pass


# --- wired behind a StreamReader, as the service feeds it ----------------------------


def tee(schema: Schema, asm: Any) -> Callable[[str | None, dict[str, Any]], Any]:
    assert schema.observe is not None
    observe = schema.observe

    def both(event: str | None, obj: dict[str, Any]) -> Any:
        asm.take(event, obj)
        return observe(event, obj)

    return both


@pytest.mark.parametrize("name", streams())
@pytest.mark.parametrize("split", [7, 4096])
def test_fed_by_a_stream_reader_in_pieces_gives_the_same_body(name: str, split: int) -> None:
    """The stream read in `split`-byte pieces by a StreamReader whose observer feeds
    the assembler; Responses with an event cap under the terminal event's size, so it
    arrives reduced to its usage (stream.py)."""
    schema, raw = schema_of(name), decoded(name)
    asm = assembler_for(schema.name)
    cap = 64 << 20
    if schema is OPENAI_RESPONSES:  # under the terminal event, over every other
        sizes = [len(json.dumps(obj)) for _, obj in sse_events(raw)]
        cap = max(sizes[:-1]) + 64
        assert sizes[-1] > cap
    reader = StreamReader(tee(schema, asm), strip_usage_chunk=False, count_tokens=None, max_event_bytes=cap)
    for i in range(0, len(raw), split):
        reader.feed(raw[i : i + split])
    reader.finish()
    assert reader.malformed_events == 0 and reader.done == (schema is not OPENAI_CHAT or b"[DONE]" in raw)
    assert (reader.oversize_events > 0) == (schema is OPENAI_RESPONSES)
    body = json.loads(asm.body())
    whole = assemble(schema, sse_events(raw))
    if schema is OPENAI_RESPONSES:  # assembled from the items and the last full object: what the final one settles differs
        assert (body["id"], body["status"], body["output"], body["usage"]) == (whole["id"], whole["status"], whole["output"], whole["usage"])
    else:
        assert body == whole
    assert schema.usage_from_body(json.dumps(body).encode()) == reader.usage


def test_a_size_overflow_swallowed_by_the_reader_still_fails_the_body() -> None:
    schema, raw = OPENAI_CHAT, decoded("oai-chat-sse-usage-cached")
    asm = assembler_for(schema.name, max_bytes=100)
    reader = StreamReader(tee(schema, asm), strip_usage_chunk=False, count_tokens=None)
    reader.feed(raw)
    reader.finish()
    assert reader.malformed_events > 0 and "over 100 bytes" in (reader.last_error or "")
    with pytest.raises(UpstreamError, match="over 100 bytes"):
        asm.body()


# --- the SDKs' own stream accumulators agree -----------------------------------------


def pruned(value: Any) -> Any:
    """Without null and empty fields (an SDK snapshot spells every optional field out)."""
    if isinstance(value, dict):
        return {k: pruned(v) for k, v in value.items() if v not in (None, [])}
    if isinstance(value, list):
        return [pruned(v) for v in value]
    return value


def sse_openai(raw: bytes) -> openai.OpenAI:
    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"}))
    return openai.OpenAI(base_url="http://sdk.test/v1", api_key="x", max_retries=0, http_client=httpx.Client(transport=transport))


def sdk_accumulated(schema: Schema, raw: bytes) -> dict[str, Any]:
    """What the SDK's streaming helper makes of the stream: its final object."""
    if schema is OPENAI_CHAT:
        with sse_openai(raw).chat.completions.stream(model="m", messages=USER) as s:  # type: ignore[arg-type]
            s.until_done()
            try:
                final = s.get_final_completion()
            except openai.LengthFinishReasonError as e:  # it parses, and refuses a capped answer
                final = e.completion
        out = final.to_dict()
        for choice in out["choices"]:
            choice["message"].pop("parsed", None)
            for call in choice["message"].get("tool_calls") or ():
                call.pop("index")  # a stream artifact its snapshot keeps
        return out
    if schema is OPENAI_RESPONSES:
        with sse_openai(raw).responses.stream(model="m", input="hi") as s:
            s.until_done()
            return s.get_final_response().to_dict()
    transport = httpx2.MockTransport(lambda _: httpx2.Response(200, content=raw, headers={"content-type": "text/event-stream"}))
    client = anthropic.Anthropic(base_url="http://sdk.test", api_key="x", max_retries=0, http_client=httpx2.Client(transport=transport))
    with client.messages.stream(model="m", max_tokens=5, messages=USER) as s:  # type: ignore[arg-type]
        s.until_done()
        return s.get_final_message().to_dict()


# the Responses helper insists on response.completed; Anthropic's drops message_delta's context_management
# (the non-streamed JSON of the same request has it: ant-json-server-tool-use)
ACCUMULATED = [n for n in streams("openai.chat_completions", "openai.responses", "anthropic.messages") if n != "oai-responses-sse-incomplete"]


@pytest.mark.parametrize("name", ACCUMULATED)
def test_the_sdk_accumulating_the_same_stream_gets_the_same_object(name: str) -> None:
    schema, raw = schema_of(name), decoded(name)
    body = assemble(schema, sse_events(raw))
    if schema is ANTHROPIC_MESSAGES:
        body.pop("context_management", None)
    assert pruned(sdk_accumulated(schema, raw)) == pruned(body)


# --- fields the corpus does not record: logprobs, annotations, citations --------------


def test_chat_and_completions_logprobs_are_concatenated() -> None:
    entry = {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105], "top_logprobs": []}
    chat = [(e, copy.deepcopy(o)) for e, o in sse_events(decoded("oai-chat-sse-usage"))]
    texts = [o["choices"][0]["delta"].get("content") for _, o in chat if o["choices"]]
    for _, o in chat:
        if o["choices"] and o["choices"][0]["delta"].get("content"):
            o["choices"][0]["logprobs"] = {"content": [{**entry, "token": o["choices"][0]["delta"]["content"]}], "refusal": None}
    body = assemble(OPENAI_CHAT, chat)
    assert [e["token"] for e in body["choices"][0]["logprobs"]["content"]] == [t for t in texts if t]
    assert body["choices"][0]["logprobs"]["refusal"] is None
    got = through_sdk(OPENAI_CHAT, body)
    assert "".join(t.token for t in got.choices[0].logprobs.content) == got.choices[0].message.content

    legacy = [(e, copy.deepcopy(o)) for e, o in sse_events(decoded("oai-completions-sse"))]
    for _, o in legacy:
        t = o["choices"][0]["text"]
        o["choices"][0]["logprobs"] = {"tokens": [t], "token_logprobs": [-0.1], "top_logprobs": [{t: -0.1}], "text_offset": [0]}
    body = assemble(OPENAI_COMPLETIONS, legacy)
    assert "".join(body["choices"][0]["logprobs"]["tokens"]) == body["choices"][0]["text"]
    assert len(body["choices"][0]["logprobs"]["text_offset"]) == len(legacy)
    through_sdk(OPENAI_COMPLETIONS, body)


ANNOTATED = {
    **REFUSAL,
    "id": "chatcmpl-search",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Paris is the capital of France.",
                "refusal": None,
                "annotations": [{"type": "url_citation", "url_citation": {"start_index": 0, "end_index": 5, "title": "Paris", "url": "https://example.org/paris"}}],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
}

CITED = {
    "id": "msg_cited",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [
        {
            "type": "text",
            "text": "The grass is green.",
            "citations": [{"type": "char_location", "cited_text": "The grass is green.", "document_index": 0, "document_title": "Facts", "start_char_index": 0, "end_char_index": 19}],
        },
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"},
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 30, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 12},
}


def test_chat_annotations_survive_the_round_trip() -> None:
    body = assemble(OPENAI_CHAT, chat_stream_of(ANNOTATED))
    assert body == ANNOTATED
    assert through_sdk(OPENAI_CHAT, body).choices[0].message.annotations[0].url_citation.url == "https://example.org/paris"


def test_anthropic_citations_and_redacted_thinking_survive_the_round_trip() -> None:
    events = []
    for event, obj in messages_stream_of(CITED):
        block = obj.get("content_block")
        if block is not None and block.get("citations"):  # streamed: an empty list, then one citations_delta each
            obj = {**obj, "content_block": {**block, "citations": []}}
            events.append((event, obj))
            events += [("content_block_delta", {"type": "content_block_delta", "index": obj["index"], "delta": {"type": "citations_delta", "citation": c}}) for c in block["citations"]]
        else:
            events.append((event, obj))
    body = assemble(ANTHROPIC_MESSAGES, events)
    assert body == CITED
    got = through_sdk(ANTHROPIC_MESSAGES, body)
    assert got.content[0].citations[0].cited_text == "The grass is green."
