"""The deterministic usage rules and the pure generators, without HTTP."""

from __future__ import annotations

import json

import pytest
from mock_backend_helpers import parse_sse, sse_json

from extproc.mock_backend import generate as g
from extproc.mock_backend.usage import BadRequest, Knobs, Usage, count_prompt, decide, prompt_text
from extproc.tokenizers import count_tokens


def test_generated_text_is_one_token_per_hello() -> None:
    assert count_tokens(Usage(prompt=0, output=37).text) == 37


@pytest.mark.parametrize(
    ("api", "body", "text"),
    [
        ("chat", {"messages": [{"role": "user", "content": "Hello world"}]}, "Hello world"),
        (
            "chat",
            {
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": None, "tool_calls": []},
                ]
            },
            "Be terse.\na\nb",
        ),
        (
            "messages",
            {"system": [{"type": "text", "text": "S"}], "messages": [{"role": "user", "content": "Q"}]},
            "S\nQ",
        ),
        ("messages", {"system": "S", "messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}]}, "S\nQ"),
        ("completions", {"prompt": "once upon"}, "once upon"),
        ("completions", {"prompt": ["a", "b"]}, "a\nb"),
        ("responses", {"input": "plain", "instructions": "be kind"}, "be kind\nplain"),
        (
            "responses",
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "y"}]},
                    {"type": "function_call_output", "call_id": "c", "output": "ignored"},
                ]
            },
            "x\ny",
        ),
    ],
)
def test_prompt_text_and_count(api: str, body: dict, text: str) -> None:
    assert prompt_text(api, body) == text
    assert count_prompt(api, body) == count_tokens(text)


def test_embeddings_prompt_is_sum_over_inputs() -> None:
    inputs = ["the quick brown fox", "jumps", "over the lazy dog!"]
    assert count_prompt("embeddings", {"input": inputs}) == sum(count_tokens(t) for t in inputs)
    assert count_prompt("embeddings", {"input": "one"}) == count_tokens("one")


def test_output_tokens_default_cap_and_header() -> None:
    chat = {"messages": []}
    assert decide("chat", chat, Knobs(), 16).output == 16
    u = decide("chat", {**chat, "max_tokens": 5}, Knobs(), 16)
    assert (u.output, u.truncated) == (5, True)
    u = decide("chat", {**chat, "max_tokens": 50}, Knobs(), 16)
    assert (u.output, u.truncated) == (16, False)
    # max_completion_tokens wins over the deprecated max_tokens
    assert decide("chat", {**chat, "max_tokens": 50, "max_completion_tokens": 3}, Knobs(), 16).output == 3
    assert decide("chat", chat, Knobs(output_tokens=40), 16).output == 40
    assert decide("chat", {**chat, "max_tokens": 30}, Knobs(output_tokens=40), 16).output == 30
    assert decide("responses", {"input": "x", "max_output_tokens": 2}, Knobs(), 16).output == 2
    assert decide("completions", {"prompt": "x", "max_tokens": 4}, Knobs(), 16).output == 4
    assert decide("messages", {"messages": [], "max_tokens": 7}, Knobs(), 16).output == 7


def test_choices_reasoning_and_cache_knobs() -> None:
    body = {"messages": [{"role": "user", "content": "count me in please"}], "n": 3}
    prompt = count_tokens("count me in please")
    u = decide("chat", body, Knobs(output_tokens=4, reasoning_tokens=2, cached_tokens=2), 16)
    assert (u.n, u.completion, u.cached) == (3, (4 + 2) * 3, 2)
    usage = g.openai_usage(u)
    assert usage == {
        "prompt_tokens": prompt,
        "completion_tokens": 18,
        "total_tokens": prompt + 18,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 6},
    }
    # cache figures are clamped to the prompt
    assert decide("chat", body, Knobs(cached_tokens=10_000), 16).cached == prompt
    m = decide(
        "messages",
        {"messages": body["messages"], "max_tokens": 100},
        Knobs(cached_tokens=1, cache_write_tokens=2, reasoning_tokens=5, output_tokens=3),
        16,
    )
    assert g.anthropic_usage(m, m.completion) == {
        "input_tokens": prompt - 3,
        "cache_creation_input_tokens": 2,
        "cache_read_input_tokens": 1,
        "output_tokens": 8,
    }


@pytest.mark.parametrize(
    ("api", "body", "param"),
    [
        ("messages", {"messages": []}, "max_tokens"),
        ("chat", {}, "messages"),
        ("chat", {"messages": [], "max_tokens": -1}, "max_tokens"),
        ("chat", {"messages": [], "n": 0}, "n"),
        ("completions", {}, "prompt"),
        ("embeddings", {"input": []}, "input"),
    ],
)
def test_bad_requests(api: str, body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as e:
        decide(api, body, Knobs(), 16)
    assert e.value.param == param


def test_knobs_from_headers() -> None:
    assert Knobs.from_headers({}) == Knobs()
    k = Knobs.from_headers(
        {
            "x-mock-output-tokens": "3",
            "x-mock-status": "503",
            "x-mock-delay-ms": "2.5",
            "x-mock-no-usage": "1",
            "x-mock-first-byte-delay-ms": "10",
        }
    )
    assert (k.output_tokens, k.status, k.delay_ms, k.no_usage, k.first_byte_delay_ms) == (3, 503, 2.5, True, 10.0)
    assert Knobs.from_headers({"x-mock-status": "200"}).status is None
    with pytest.raises(BadRequest):
        Knobs.from_headers({"x-mock-output-tokens": "lots"})


def test_chat_stream_plan_shape() -> None:
    u = Usage(prompt=5, output=3, n=2, truncated=True)
    plan = g.chat_stream(id="c1", created=1, model="m", usage=u, include_usage=True)
    assert len(plan.steps) == 3
    chunks = sse_json(plan.joined())
    assert all("usage" in c for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    finals = [c["choices"][0] for c in chunks[-3:-1]]
    assert [(f["index"], f["finish_reason"]) for f in finals] == [(0, "length"), (1, "length")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"][0]["index"] == 0)
    assert text == " hello" * 3


def test_stream_without_usage_or_tokens() -> None:
    u = Usage(prompt=5, output=0)
    chunks = sse_json(g.chat_stream(id="c", created=1, model="m", usage=u, include_usage=True, with_usage=False).joined())
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    chunks = sse_json(g.completion_stream(id="c", created=1, model="m", usage=u, include_usage=False).joined())
    assert [c["choices"][0]["finish_reason"] for c in chunks] == ["stop"]


def test_responses_stream_sequence_numbers() -> None:
    u = Usage(prompt=2, output=4)
    events = parse_sse(g.responses_stream(id="r", msg_id="m", created=1, body={"model": "x"}, usage=u).joined())
    payloads = [json.loads(d) for _, d in events]
    assert [p["sequence_number"] for p in payloads] == list(range(len(events)))
    assert all(name == p["type"] for (name, _), p in zip(events, payloads, strict=True))
    assert "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta") == " hello" * 4


def test_embedding_vectors_deterministic_unit_length() -> None:
    v = g.embedding_vector("abc")
    assert v == g.embedding_vector("abc") != g.embedding_vector("abd")
    assert len(v) == g.EMBEDDING_DIMS
    assert abs(sum(x * x for x in v) - 1) < 1e-4
