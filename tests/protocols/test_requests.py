"""Request parsing, validation (with `param`), rewriting and path matching."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest

from extproc.errors import BadRequest, BodyTooLarge
from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    SCHEMAS,
    Schema,
)

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --- parse_request per schema -----------------------------------------------------------


def test_chat() -> None:
    req = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 500,
        "max_tokens": 900,
        "n": 3,
        "tools": [TOOL],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "name": "ana",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        ],
    }
    f = OPENAI_CHAT.parse_request(body(req))
    assert (f.model, f.stream, f.max_output, f.n, f.include_usage) == ("gpt-4o", True, 500, 3, True)
    assert (f.images, f.has_tools, f.json_mode) == (2, True, True)
    assert f.segments == (
        "tools\n" + json.dumps([TOOL], separators=(",", ":"), sort_keys=True),
        "system\nBe brief.",
        "user ana\nWhat is this?",
        'assistant\nget_weather {"city":"Paris"}',
        "tool\n18C",
    )
    assert f.raw == req


def test_chat_defaults_and_max_tokens_fallback() -> None:
    f = OPENAI_CHAT.parse_request(body({"model": "m", "messages": [], "max_tokens": 7, "stream": None, "n": None}))
    assert (f.stream, f.max_output, f.n, f.include_usage, f.segments) == (False, 7, 1, False, ())
    f = OPENAI_CHAT.parse_request(body({"model": "m", "messages": []}))
    assert f.max_output is None and not f.has_tools and not f.json_mode


def test_segments_of_old_messages_do_not_change_as_the_context_grows() -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    a = OPENAI_CHAT.parse_request(body({"model": "m", "messages": msgs}))
    b = OPENAI_CHAT.parse_request(body({"model": "m", "messages": [*msgs, {"role": "user", "content": "more"}]}))
    assert b.segments[: len(a.segments)] == a.segments


@pytest.mark.parametrize("role,content", [("user", "hi"), ("", ""), ("assistant", "é😀\n\"x\""), ("tool", "  ")])
def test_a_role_and_string_content_is_read_as_the_general_path_reads_it(role: str, content: str) -> None:
    # {role, content} alone takes a short cut; a key the reader ignores sends it down the general path
    short = OPENAI_CHAT.parse_request(body({"model": "m", "messages": [{"role": role, "content": content}]}))
    general = OPENAI_CHAT.parse_request(
        body({"model": "m", "messages": [{"role": role, "content": content, "function_call": None}]})
    )
    assert short.segments == general.segments == (f"{role}\n{content}",)


def test_a_bad_message_is_named_by_its_index() -> None:
    for bad, param in [([1], "messages[0]"), ([{"role": "user", "content": 1}], "messages[0].content"),
                       ([{"role": "user", "content": "ok"}, {"role": 5, "content": "x"}], "messages[1].role")]:
        with pytest.raises(BadRequest) as info:
            OPENAI_CHAT.parse_request(body({"model": "m", "messages": bad}))
        assert info.value.param == param


def test_completions() -> None:
    f = OPENAI_COMPLETIONS.parse_request(
        body({"model": "gpt-3.5-turbo-instruct", "prompt": ["Say", "this"], "max_tokens": 16, "n": 2, "best_of": 5, "stream": True})
    )
    assert (f.max_output, f.n, f.stream, f.segments, f.pretokenized) == (16, 5, True, ("Say", "this"), 0)
    f = OPENAI_COMPLETIONS.parse_request(body({"model": "m", "prompt": [[1, 2, 3], [4]]}))
    assert (f.segments, f.pretokenized, f.max_output) == ((), 4, None)


def test_responses() -> None:
    req = {
        "model": "o3",
        "instructions": "You are terse.",
        "max_output_tokens": 2048,
        "stream": True,
        "n": 9,  # not a Responses parameter: ignored
        "tools": [{"type": "web_search"}],
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Look"}, {"type": "input_image", "image_url": "data:..."}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "OK"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
            {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "thought"}]},
        ],
    }
    f = OPENAI_RESPONSES.parse_request(body(req))
    assert (f.max_output, f.n, f.stream, f.images, f.has_tools, f.json_mode, f.include_usage) == (
        2048, 1, True, 1, True, True, False,
    )
    assert f.segments == (
        "system\nYou are terse.",
        'tools\n[{"type":"web_search"}]',
        "user\nLook",
        "assistant\nOK",
        "function_call\nf {}",
        "function_call_output\n42",
        "reasoning\nthought",
    )
    assert OPENAI_RESPONSES.parse_request(body({"model": "m", "input": "Hi"})).segments == ("user\nHi",)


def test_embeddings() -> None:
    f = OPENAI_EMBEDDINGS.parse_request(body({"model": "text-embedding-3-small", "input": ["a b", "c"], "stream": "ignored"}))
    assert (f.max_output, f.n, f.stream, f.segments) == (0, 1, False, ("a b", "c"))
    assert OPENAI_EMBEDDINGS.parse_request(body({"model": "e", "input": [5, 6]})).pretokenized == 2


def test_anthropic() -> None:
    req = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": True,
        "system": [{"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "tool_use", "id": "t", "name": "get_weather", "input": {"z": 1, "a": "b"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "text", "text": "sunny"}, {"type": "image", "source": {}}],
                    }
                ],
            },
        ],
    }
    f = ANTHROPIC_MESSAGES.parse_request(body(req))
    assert (f.max_output, f.n, f.stream, f.images, f.has_tools, f.json_mode, f.include_usage) == (
        1024, 1, True, 2, True, False, False,
    )
    assert f.segments == (
        "system\nBe kind.",
        'tools\n[{"input_schema":{"type":"object"},"name":"get_weather"}]',
        "user\nWhat is this?",
        'assistant\nhmm\nget_weather {"a":"b","z":1}',
        "user\nsunny",
    )
    f = ANTHROPIC_MESSAGES.parse_request(body({"model": "c", "system": "S", "messages": [{"role": "user", "content": "x"}]}))
    assert f.segments == ("system\nS", "user\nx") and f.max_output is None


# --- refusals ------------------------------------------------------------------------


def chat(**fields: Any) -> bytes:
    return body({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields})


BAD = [
    (OPENAI_CHAT, b"{", None),
    (OPENAI_CHAT, b"", None),
    (OPENAI_CHAT, b"\xff\xfe{}", None),
    (OPENAI_CHAT, b'{"model": NaN}', None),
    (OPENAI_CHAT, b"[]", None),
    (OPENAI_CHAT, b'"model"', None),
    (OPENAI_CHAT, body({"messages": []}), "model"),
    (OPENAI_CHAT, body({"model": 4, "messages": []}), "model"),
    (OPENAI_CHAT, body({"model": "", "messages": []}), "model"),
    (OPENAI_CHAT, chat(max_tokens=0), "max_tokens"),
    (OPENAI_CHAT, chat(max_tokens=-5), "max_tokens"),
    (OPENAI_CHAT, chat(max_tokens=12.5), "max_tokens"),
    (OPENAI_CHAT, chat(max_tokens="100"), "max_tokens"),
    (OPENAI_CHAT, chat(max_tokens=True), "max_tokens"),
    (OPENAI_CHAT, chat(max_completion_tokens=10_000_001), "max_completion_tokens"),
    (OPENAI_CHAT, chat(max_completion_tokens=10, max_tokens=-1), "max_tokens"),
    (OPENAI_CHAT, chat(n=0), "n"),
    (OPENAI_CHAT, chat(n=129), "n"),
    (OPENAI_CHAT, chat(n="2"), "n"),
    (OPENAI_CHAT, chat(stream="true"), "stream"),
    (OPENAI_CHAT, chat(stream=1), "stream"),
    (OPENAI_CHAT, chat(stream_options=[]), "stream_options"),
    (OPENAI_CHAT, chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (OPENAI_CHAT, chat(tools={"a": 1}), "tools"),
    (OPENAI_CHAT, body({"model": "m"}), "messages"),
    (OPENAI_CHAT, body({"model": "m", "messages": "hi"}), "messages"),
    (OPENAI_CHAT, body({"model": "m", "messages": [{"role": "user", "content": "a"}, "hi"]}), "messages[1]"),
    (OPENAI_CHAT, body({"model": "m", "messages": [{"content": "a"}]}), "messages[0].role"),
    (OPENAI_CHAT, body({"model": "m", "messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
    (OPENAI_CHAT, body({"model": "m", "messages": [{"role": "user", "content": [1]}]}), "messages[0].content[0]"),
    (
        OPENAI_CHAT,
        body({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}),
        "messages[0].content[0].text",
    ),
    (OPENAI_CHAT, body({"model": "m", "messages": [{"role": "assistant", "tool_calls": {}}]}), "messages[0].tool_calls"),
    (OPENAI_COMPLETIONS, body({"model": "m", "prompt": 5}), "prompt"),
    (OPENAI_COMPLETIONS, body({"model": "m", "prompt": ["a", {}]}), "prompt[1]"),
    (OPENAI_COMPLETIONS, body({"model": "m", "prompt": "a", "best_of": 500}), "best_of"),
    (OPENAI_EMBEDDINGS, body({"model": "m"}), "input"),
    (OPENAI_EMBEDDINGS, body({"model": "m", "input": None}), "input"),
    (OPENAI_RESPONSES, body({"model": "m", "input": 3}), "input"),
    (OPENAI_RESPONSES, body({"model": "m", "input": [3]}), "input[0]"),
    (OPENAI_RESPONSES, body({"model": "m", "input": [{"content": "x"}]}), "input[0].role"),
    (OPENAI_RESPONSES, body({"model": "m", "input": [{"type": ["x"]}]}), "input[0].type"),
    (OPENAI_RESPONSES, body({"model": "m", "instructions": ["x"]}), "instructions"),
    (OPENAI_RESPONSES, body({"model": "m", "max_output_tokens": 0}), "max_output_tokens"),
    (ANTHROPIC_MESSAGES, body({"model": "c", "max_tokens": 0, "messages": []}), "max_tokens"),
    (ANTHROPIC_MESSAGES, body({"model": "c", "messages": {}}), "messages"),
    (ANTHROPIC_MESSAGES, body({"model": "c", "messages": [{"role": "user"}]}), "messages[0].content"),
    (ANTHROPIC_MESSAGES, body({"model": "c", "system": 5, "messages": []}), "system"),
    (ANTHROPIC_MESSAGES, body({"model": "c", "system": [{"type": "text"}], "messages": []}), "system[0].text"),
    (
        ANTHROPIC_MESSAGES,
        body({"model": "c", "messages": [{"role": "user", "content": [{"type": "tool_result", "content": 5}]}]}),
        "messages[0].content[0].content",
    ),
]


@pytest.mark.parametrize(("schema", "raw", "param"), BAD, ids=lambda v: getattr(v, "name", None))
def test_bad_request(schema: Schema, raw: bytes, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        schema.parse_request(raw)
    assert info.value.param == param
    assert info.value.message
    assert info.value.status == 400


def test_body_too_large() -> None:
    raw = chat()
    OPENAI_CHAT.parse_request(raw, max_bytes=len(raw))
    with pytest.raises(BodyTooLarge) as info:
        OPENAI_CHAT.parse_request(raw, max_bytes=len(raw) - 1)
    assert info.value.status == 413


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.name)
@pytest.mark.parametrize("depth", [50, 900, 5000, 100_000])
def test_deep_nesting_never_crashes(schema: Schema, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    for raw in (
        nested,
        '{"model":"m","messages":' + nested + "}",
        '{"model":"m","input":[{"type":"x","output":' + nested + "}]}",
        '{"model":"m","tools":[' + "{\"a\":" * depth + "1" + "}" * depth + "],\"messages\":[]}",
        '{"model":"m","messages":[{"role":"user","content":['
        + '{"type":"tool_result","content":[' * depth
        + "]}" * depth
        + "]}]}",
    ):
        try:
            facts = schema.parse_request(raw.encode())
            schema.rewrite_request(facts, model="x")
        except BadRequest:
            pass


def test_big_chat_body_parses_in_a_few_ms() -> None:
    msgs = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} " + "lorem ipsum " * 40} for i in range(800)]
    raw = chat(messages=msgs, tools=[TOOL])
    assert len(raw) > 400_000
    OPENAI_CHAT.parse_request(raw)
    start = time.perf_counter()
    for _ in range(5):
        OPENAI_CHAT.parse_request(raw)
    assert (time.perf_counter() - start) / 5 < 0.05  # generous for slow CI; ~3 ms locally


# --- rewrite_request ---------------------------------------------------------------------


def test_rewrite_chat_round_trip() -> None:
    req = {"model": "gpt-4o", "stream": True, "max_tokens": 900, "messages": [{"role": "user", "content": "héllo \ud83d\ude00"}]}
    facts = OPENAI_CHAT.parse_request(body(req))
    before = copy.deepcopy(facts.raw)
    out = OPENAI_CHAT.rewrite_request(facts, model="gpt-4o-mini", include_usage=True, max_output=100)
    assert facts.raw == before
    again = OPENAI_CHAT.parse_request(out)
    assert (again.model, again.max_output, again.include_usage, again.segments) == ("gpt-4o-mini", 100, True, facts.segments)
    assert again.raw["max_tokens"] == 100 and "max_completion_tokens" not in again.raw
    assert "é".encode() in out  # not \u-escaped


def test_rewrite_keeps_existing_stream_options_and_sets_every_cap_the_client_used() -> None:
    req = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_obfuscation": False},
        "max_tokens": 900,
        "max_completion_tokens": 800,
        "messages": [],
    }
    facts = OPENAI_CHAT.parse_request(body(req))
    out = json.loads(OPENAI_CHAT.rewrite_request(facts, include_usage=True, max_output=10))
    assert out["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert out["max_tokens"] == out["max_completion_tokens"] == 10
    assert facts.raw["stream_options"] == {"include_obfuscation": False}


@pytest.mark.parametrize(
    ("schema", "req", "field"),
    [
        (OPENAI_CHAT, {"model": "m", "messages": []}, "max_completion_tokens"),
        (OPENAI_COMPLETIONS, {"model": "m", "prompt": "x"}, "max_tokens"),
        (OPENAI_RESPONSES, {"model": "m", "input": "x"}, "max_output_tokens"),
        (ANTHROPIC_MESSAGES, {"model": "m", "messages": []}, "max_tokens"),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_rewrite_sets_the_canonical_cap_when_the_client_gave_none(schema: Schema, req: dict, field: str) -> None:
    facts = schema.parse_request(body({**req, "stream": True}))
    out = json.loads(schema.rewrite_request(facts, max_output=64, include_usage=True))
    assert out[field] == 64
    assert schema.parse_request(json.dumps(out).encode()).max_output == 64
    assert ("stream_options" in out) == (schema in (OPENAI_CHAT, OPENAI_COMPLETIONS))


def test_rewrite_include_usage_only_when_streaming() -> None:
    facts = OPENAI_CHAT.parse_request(chat())
    assert "stream_options" not in json.loads(OPENAI_CHAT.rewrite_request(facts, include_usage=True))


STREAM_USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        (OPENAI_CHAT, {"model": "gpt-4o", "messages": STREAM_USER, "max_tokens": 5}),
        (OPENAI_COMPLETIONS, {"model": "m", "prompt": "hi", "stream_options": {"other": 1}}),
        (OPENAI_RESPONSES, {"model": "gpt-4o", "input": "hi"}),
        (ANTHROPIC_MESSAGES, {"model": "claude", "max_tokens": 5, "messages": STREAM_USER}),
    ],
)
def test_rewrite_asks_the_backend_to_stream(schema: Schema, body: dict[str, Any]) -> None:
    facts = schema.parse_request(json.dumps(body).encode())
    rewritten = json.loads(schema.rewrite_request(facts, stream=True, model="other", max_output=7))
    want = {**body, "model": "other", "stream": True, schema.cap_fields(facts)[0]: 7}
    if schema.include_usage_option:
        want["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
    assert rewritten == want
    assert schema.parse_request(json.dumps(rewritten).encode()).stream
    assert json.loads(schema.rewrite_request(facts)) == body  # without `stream`: as before
    back = json.loads(schema.rewrite_request(schema.parse_request(json.dumps(rewritten).encode()), stream=False))
    assert back["stream"] is False and "stream_options" not in back


def test_rewrite_cannot_stream_embeddings() -> None:
    facts = OPENAI_EMBEDDINGS.parse_request(b'{"model": "e", "input": "hi"}')
    with pytest.raises(ValueError):
        OPENAI_EMBEDDINGS.rewrite_request(facts, stream=True)


def test_rewrite_embeddings_ignores_max_output_and_identity_rewrite_is_equivalent() -> None:
    facts = OPENAI_EMBEDDINGS.parse_request(body({"model": "e", "input": "x"}))
    assert json.loads(OPENAI_EMBEDDINGS.rewrite_request(facts, model="e2", max_output=5)) == {"model": "e2", "input": "x"}
    facts = OPENAI_CHAT.parse_request(chat(temperature=0.2))
    assert json.loads(OPENAI_CHAT.rewrite_request(facts)) == facts.raw


def test_rewrite_lone_surrogate_stays_escaped() -> None:
    facts = OPENAI_CHAT.parse_request(b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}')
    assert b"\\ud800" in OPENAI_CHAT.rewrite_request(facts, model="x")


def test_rewrite_rejects_programmer_errors() -> None:
    facts = OPENAI_CHAT.parse_request(chat())
    with pytest.raises(ValueError):
        OPENAI_CHAT.rewrite_request(facts, max_output=0)
    with pytest.raises(ValueError):
        OPENAI_CHAT.rewrite_request(facts, model="")


def test_facts_are_frozen_and_raw_is_out_of_eq_and_repr() -> None:
    a = OPENAI_CHAT.parse_request(chat(temperature=1))
    b = OPENAI_CHAT.parse_request(chat(temperature=0))
    assert a == b and hash(a) == hash(b)
    assert "raw" not in repr(a)
    with pytest.raises(AttributeError):
        a.model = "x"  # type: ignore[misc]


def test_schema_descriptions() -> None:
    assert [s.name for s in SCHEMAS] == [
        "openai.chat",
        "openai.completions",
        "openai.responses",
        "openai.embeddings",
        "anthropic.messages",
    ]
    assert [s.envelope for s in SCHEMAS] == ["openai"] * 4 + ["anthropic"]
    assert [s.streams for s in SCHEMAS] == [True, True, True, False, True]


@pytest.mark.parametrize(
    ("schema", "req", "fields"),
    [
        (OPENAI_CHAT, {"messages": [], "n": 3}, ("max_completion_tokens",)),
        (OPENAI_CHAT, {"messages": [], "n": 3, "max_tokens": 50}, ("max_tokens",)),
        (OPENAI_CHAT, {"messages": [], "max_tokens": 5, "max_completion_tokens": 9}, ("max_completion_tokens", "max_tokens")),
        (OPENAI_COMPLETIONS, {"prompt": "x", "n": 2, "best_of": 4}, ("max_tokens",)),
        (OPENAI_RESPONSES, {"input": "x"}, ("max_output_tokens",)),
        (ANTHROPIC_MESSAGES, {"messages": [], "max_tokens": 10}, ("max_tokens",)),
        (OPENAI_EMBEDDINGS, {"input": "x"}, ()),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_cap_fields_and_the_cap_is_per_choice(schema: Schema, req: dict, fields: tuple[str, ...]) -> None:
    facts = schema.parse_request(body({"model": "m", **req}))
    assert schema.cap_fields(facts) == fields
    out = json.loads(schema.rewrite_request(facts, max_output=64))
    assert {k: out[k] for k in schema.max_output_fields if k in out} == dict.fromkeys(fields, 64)
    again = schema.parse_request(json.dumps(out).encode())
    assert again.n == facts.n  # the cap is per choice: n is neither folded in nor changed
    assert again.max_output == (64 if fields else 0)


def test_cap_field_forces_one_field_and_drops_the_others() -> None:
    facts = OPENAI_CHAT.parse_request(body({"model": "gpt-4o", "messages": [], "max_tokens": 900, "n": 2}))
    # a downshift to a reasoning model: max_tokens would be refused there
    out = json.loads(OPENAI_CHAT.rewrite_request(facts, model="o4-mini", max_output=300, cap_field="max_completion_tokens"))
    assert out["max_completion_tokens"] == 300 and "max_tokens" not in out and out["n"] == 2
    # an older OpenAI-compatible backend that only knows max_tokens
    facts = OPENAI_CHAT.parse_request(body({"model": "m", "messages": [], "max_completion_tokens": 90}))
    out = json.loads(OPENAI_CHAT.rewrite_request(facts, max_output=30, cap_field="max_tokens"))
    assert out["max_tokens"] == 30 and "max_completion_tokens" not in out
    assert OPENAI_CHAT.cap_fields(facts, "max_tokens") == ("max_tokens",)
    with pytest.raises(ValueError):
        OPENAI_CHAT.cap_fields(facts, "max_output_tokens")
