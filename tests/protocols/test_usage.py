"""Usage normalisation: disjoint buckets whatever the provider, garbage refused."""

from __future__ import annotations

import json

import pytest

from extproc.errors import UpstreamError
from extproc.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    Usage,
)
from extproc.protocols.usage import anthropic_usage, openai_usage, responses_usage


def test_openai_prompt_tokens_include_cached() -> None:
    u = openai_usage(
        {
            "prompt_tokens": 2006,
            "completion_tokens": 300,
            "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 256},
        }
    )
    assert u == Usage(input_tokens=86, cached_input_tokens=1920, output_tokens=300, reasoning_tokens=256)
    assert u.total_input == 2006
    assert u.total == 2306


def test_responses_input_tokens_include_cached() -> None:
    u = responses_usage(
        {
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 64},
            "output_tokens": 50,
            "output_tokens_details": {"reasoning_tokens": 40},
            "total_tokens": 150,
        }
    )
    assert u == Usage(input_tokens=36, cached_input_tokens=64, output_tokens=50, reasoning_tokens=40)


def test_anthropic_input_tokens_exclude_cache() -> None:
    u = anthropic_usage(
        {
            "input_tokens": 25,
            "cache_creation_input_tokens": 1500,
            "cache_read_input_tokens": 3000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1500},
            "output_tokens": 15,
            "service_tier": "standard",
        }
    )
    assert u == Usage(input_tokens=25, cached_input_tokens=3000, cache_write_tokens=1500, output_tokens=15)
    assert u.total_input == 4525


def test_missing_and_null_fields_are_zero() -> None:
    assert openai_usage({"prompt_tokens": 8, "total_tokens": 8}) == Usage(input_tokens=8)
    assert openai_usage({"prompt_tokens": 8, "prompt_tokens_details": None}) == Usage(input_tokens=8)
    assert anthropic_usage({"output_tokens": 3, "input_tokens": None}) == Usage(output_tokens=3)
    assert openai_usage(None) is None


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1},
        {"prompt_tokens": True},
        {"prompt_tokens": 1.0},
        {"prompt_tokens": "12"},
        {"completion_tokens": 10**12},
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
        {"prompt_tokens_details": []},
        [],
        "usage",
    ],
)
def test_garbage_is_an_upstream_error(usage: object) -> None:
    with pytest.raises(UpstreamError):
        openai_usage(usage)


@pytest.mark.parametrize(
    "usage", [{"input_tokens": -5}, {"cache_read_input_tokens": "x"}, {"output_tokens": [1]}]
)
def test_anthropic_garbage_is_an_upstream_error(usage: object) -> None:
    with pytest.raises(UpstreamError):
        anthropic_usage(usage)


def test_merge_is_fieldwise_max() -> None:
    start = Usage(input_tokens=25, cached_input_tokens=3000, output_tokens=1)
    delta = Usage(output_tokens=15)
    assert start.merge(delta) == Usage(input_tokens=25, cached_input_tokens=3000, output_tokens=15)
    assert start.merge(None) is start


def _body(usage: object) -> bytes:
    return json.dumps({"id": "x", "object": "y", "usage": usage}).encode()


@pytest.mark.parametrize(
    ("schema", "usage", "expected"),
    [
        (
            OPENAI_CHAT,
            {"prompt_tokens": 19, "completion_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}},
            Usage(input_tokens=19, output_tokens=10),
        ),
        (OPENAI_COMPLETIONS, {"prompt_tokens": 5, "completion_tokens": 7}, Usage(input_tokens=5, output_tokens=7)),
        (OPENAI_EMBEDDINGS, {"prompt_tokens": 8, "total_tokens": 8}, Usage(input_tokens=8)),
        (
            OPENAI_RESPONSES,
            {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87},
            Usage(input_tokens=36, output_tokens=87),
        ),
        (
            ANTHROPIC_MESSAGES,
            {"input_tokens": 2095, "output_tokens": 503, "cache_read_input_tokens": 10},
            Usage(input_tokens=2095, cached_input_tokens=10, output_tokens=503),
        ),
    ],
    ids=lambda v: getattr(v, "name", ""),
)
def test_usage_from_body(schema, usage, expected) -> None:  # type: ignore[no-untyped-def]
    assert schema.usage_from_body(_body(usage)) == expected


def test_usage_from_body_without_usage_or_with_bad_json() -> None:
    assert OPENAI_CHAT.usage_from_body(b'{"id": "x"}') is None
    assert OPENAI_CHAT.usage_from_body(_body(None)) is None
    for bad in (b"", b"{", b"[]", b"\xff", b"[" * 100_000):
        with pytest.raises(UpstreamError):
            OPENAI_CHAT.usage_from_body(bad)
    with pytest.raises(UpstreamError):
        OPENAI_CHAT.usage_from_body(_body({"prompt_tokens": -3}))


# --- fields added for accounting truth ----------------------------------------------------


def test_openai_cache_writes_and_audio() -> None:
    u = openai_usage(
        {
            "prompt_tokens": 3000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 1500, "audio_tokens": 200},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 300},
        }
    )
    assert u == Usage(
        input_tokens=500,
        cached_input_tokens=1000,
        cache_write_tokens=1500,
        output_tokens=500,
        audio_input_tokens=200,
        audio_output_tokens=300,
    )
    assert u.total_input == 3000  # nothing counted twice


def test_openai_compatible_cache_creation_at_top_level() -> None:
    # proxies in front of Anthropic models: prompt_tokens includes both cache fields
    u = openai_usage(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 1,
            "cache_creation_input_tokens": 600,
            "prompt_tokens_details": {"cached_tokens": 300},
        }
    )
    assert u == Usage(input_tokens=100, cached_input_tokens=300, cache_write_tokens=600, output_tokens=1)


def test_cache_writes_beyond_the_total_are_taken_as_additional() -> None:
    u = openai_usage({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 90}})
    assert u == Usage(input_tokens=60, cached_input_tokens=40, cache_write_tokens=90)
    assert u.total_input == 190  # never less than reported


def test_responses_cache_writes() -> None:
    u = responses_usage(
        {
            "input_tokens": 1000,
            "input_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 700},
            "output_tokens": 9,
            "output_tokens_details": {"reasoning_tokens": 0},
        }
    )
    assert u == Usage(input_tokens=100, cached_input_tokens=200, cache_write_tokens=700, output_tokens=9)


def test_anthropic_iterations_add_the_compaction_step() -> None:
    # the documented compaction example: top level = the final message iteration only
    u = anthropic_usage(
        {
            "input_tokens": 23000,
            "output_tokens": 1000,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "iterations": [
                {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500,
                 "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
                {"type": "message", "input_tokens": 23000, "output_tokens": 1000,
                 "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            ],
        }
    )
    assert u == Usage(input_tokens=203000, output_tokens=4500)


def test_anthropic_cumulative_top_level_is_not_doubled_by_iterations() -> None:
    # a server-tool loop whose top level already sums its message iterations
    steps = [
        {"type": "message", "input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 50},
        {"type": "message", "input_tokens": 120, "output_tokens": 20, "cache_read_input_tokens": 50},
    ]
    u = anthropic_usage(
        {"input_tokens": 220, "output_tokens": 30, "cache_read_input_tokens": 100, "iterations": steps}
    )
    assert u == Usage(input_tokens=220, cached_input_tokens=100, output_tokens=30)


@pytest.mark.parametrize("iterations", ["x", [1], [{"input_tokens": -1}], [{"output_tokens": "3"}]])
def test_anthropic_bad_iterations_are_upstream_errors(iterations: object) -> None:
    with pytest.raises(UpstreamError):
        anthropic_usage({"input_tokens": 1, "iterations": iterations})


def test_anthropic_server_tool_use() -> None:
    u = anthropic_usage(
        {"input_tokens": 5, "output_tokens": 6, "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1}}
    )
    assert u == Usage(input_tokens=5, output_tokens=6, web_search_calls=2, web_fetch_calls=1)
    with pytest.raises(UpstreamError):
        anthropic_usage({"server_tool_use": {"web_search_requests": -1}})
    with pytest.raises(UpstreamError):
        anthropic_usage({"server_tool_use": 3})


def test_responses_tool_calls_from_output_items() -> None:
    from extproc.protocols.usage import responses_tool_calls

    output = [
        {"type": "web_search_call"},
        {"type": "web_search_call"},
        {"type": "file_search_call"},
        {"type": "code_interpreter_call"},
        {"type": "message"},
        {"type": ["odd"]},
        "junk",
    ]
    assert responses_tool_calls(output) == Usage(web_search_calls=2, file_search_calls=1, code_interpreter_calls=1)
    assert responses_tool_calls([{"type": "message"}]) is None
    assert responses_tool_calls(None) is None


def test_merge_plus_and_tool_calls_cover_every_field() -> None:
    a = Usage(*range(1, 12))
    b = Usage(*range(11, 0, -1))
    assert a.merge(b) == Usage(*(max(x, y) for x, y in zip(range(1, 12), range(11, 0, -1))))
    assert a.plus(b) == Usage(*([12] * 11))
    assert a.tool_calls == Usage(web_search_calls=8, web_fetch_calls=9, file_search_calls=10, code_interpreter_calls=11)


def test_client_tool_calls_of_each_api_shape():
    from extproc.protocols.usage import client_tool_calls

    chat = {"choices": [{"message": {"tool_calls": [{"id": "a"}, {"id": "b"}]}}, {"message": {"function_call": {"name": "f"}}}]}
    responses = {"output": [{"type": "function_call"}, {"type": "web_search_call"}, {"type": "message"}, {"type": "custom_tool_call"}]}
    anthropic = {"content": [{"type": "text"}, {"type": "tool_use"}, {"type": "server_tool_use"}]}
    assert [client_tool_calls(o) for o in (chat, responses, anthropic, {"choices": "x"})] == [3, 2, 1, 0]


def test_json_body_usage_counts_the_tool_calls_returned():
    import json

    from extproc.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES

    chat = {"choices": [{"message": {"tool_calls": [{"id": "a"}]}}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    resp = {"output": [{"type": "function_call"}] * 2, "usage": {"input_tokens": 3, "output_tokens": 2}}
    anth = {"content": [{"type": "tool_use"}] * 3, "usage": {"input_tokens": 3, "output_tokens": 2}}
    got = [s.usage_from_body(json.dumps(o).encode()).function_calls for s, o in
           ((OPENAI_CHAT, chat), (OPENAI_RESPONSES, resp), (ANTHROPIC_MESSAGES, anth))]  # fmt: skip
    assert got == [1, 2, 3]


def test_streamed_responses_count_client_calls_per_item():
    from extproc.protocols.openai import observe_responses

    seen = observe_responses(None, {"type": "response.output_item.done", "item": {"type": "function_call"}})
    assert seen.calls == Usage(function_calls=1)
