"""The official openai and anthropic SDKs work against the mock unchanged."""

from __future__ import annotations

import anthropic
import openai
import pytest

from extproc.tokenizers import count_tokens

USER = [{"role": "user", "content": "Tell me a story about a robot."}]
USER_TOKENS = count_tokens(USER[0]["content"])


@pytest.fixture
async def oai(base: str):
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def claude(base: str):
    client = anthropic.AsyncAnthropic(base_url=base, api_key="x", max_retries=0)
    yield client
    await client.close()


async def test_openai_chat(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(model="gpt-4o", messages=USER, max_completion_tokens=7)
    assert r.choices[0].message.content == " hello" * 7
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (USER_TOKENS, 7)


async def test_openai_chat_stream_include_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "5", "x-mock-reasoning-tokens": "2", "x-mock-cached-tokens": "4"},
    )
    text, chunks = "", []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == " hello" * 5
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (USER_TOKENS, 7, USER_TOKENS + 7)
    assert usage.completion_tokens_details.reasoning_tokens == 2
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


async def test_openai_completions(oai: openai.AsyncOpenAI) -> None:
    r = await oai.completions.create(model="m", prompt="Say this is a test", max_tokens=3)
    assert r.choices[0].text == " hello" * 3
    assert r.usage.prompt_tokens == count_tokens("Say this is a test")
    stream = await oai.completions.create(model="m", prompt="x", stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage.completion_tokens == 16


async def test_openai_responses(oai: openai.AsyncOpenAI) -> None:
    r = await oai.responses.create(model="gpt-5", input="Hi there", instructions="Be nice", max_output_tokens=4)
    assert r.output_text == " hello" * 4
    assert r.usage.input_tokens == count_tokens("Be nice\nHi there")
    assert r.usage.output_tokens == 4


async def test_openai_responses_stream(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(model="gpt-5", input=[{"role": "user", "content": "Hi"}], stream=True)
    events = [e async for e in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == " hello" * 16
    assert events[-1].response.usage.output_tokens == 16
    assert events[-1].response.output_text == deltas
    # the higher-level helper accumulates the same events into a final response
    async with oai.responses.stream(model="gpt-5", input="Hi", max_output_tokens=2) as s:
        async for _ in s:
            pass
        final = await s.get_final_response()
    assert final.output_text == " hello" * 2 and final.usage.total_tokens == count_tokens("Hi") + 2


async def test_openai_embeddings(oai: openai.AsyncOpenAI) -> None:
    r = await oai.embeddings.create(model="text-embedding-3-small", input=["alpha beta", "gamma"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8
    assert r.usage.prompt_tokens == count_tokens("alpha beta") + count_tokens("gamma")


async def test_openai_error_status(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-status": "429"})


async def test_anthropic_messages(claude: anthropic.AsyncAnthropic) -> None:
    m = await claude.messages.create(
        model="claude-mock",
        max_tokens=3,
        system="Short answers.",
        messages=USER,
        extra_headers={"x-mock-cached-tokens": "2"},
    )
    assert m.content[0].text == " hello" * 3 and m.stop_reason == "max_tokens"
    prompt = count_tokens("Short answers.\n" + USER[0]["content"])
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.output_tokens) == (prompt - 2, 2, 3)


async def test_anthropic_messages_stream(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-mock",
        max_tokens=1024,
        messages=USER,
        extra_headers={"x-mock-output-tokens": "6", "x-mock-cache-write-tokens": "3"},
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == " hello" * 6
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 6
    assert final.usage.input_tokens == USER_TOKENS - 3
    assert final.usage.cache_creation_input_tokens == 3


async def test_anthropic_raw_stream_and_errors(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(model="c", max_tokens=2, messages=USER, stream=True)
    types = [e.type async for e in stream]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    with pytest.raises(anthropic.InternalServerError) as e:
        await claude.messages.create(model="c", max_tokens=2, messages=USER, extra_headers={"x-mock-status": "500"})
    assert e.value.body["error"]["type"] == "api_error"


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
CLAUDE_TOOL = {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}


async def test_openai_chat_forced_tool_call_json_and_stream(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(model="m", messages=USER, tools=[TOOL], tool_choice="required", max_completion_tokens=3)
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments, r.choices[0].finish_reason) == ("lookup", "{}", "tool_calls")
    auto = await oai.chat.completions.create(model="m", messages=USER, tools=[TOOL], max_completion_tokens=3)
    assert auto.choices[0].message.tool_calls is None  # the model calls a tool only when made to
    stream = await oai.chat.completions.create(
        model="m", messages=USER, tools=[TOOL], tool_choice="required", max_completion_tokens=3, stream=True
    )
    names = [tc.function.name async for chunk in stream for c in chunk.choices for tc in c.delta.tool_calls or ()]
    assert names == ["lookup"]


async def test_openai_responses_forced_tool_call(oai: openai.AsyncOpenAI) -> None:
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    r = await oai.responses.create(model="m", input="hi", tools=[tool], tool_choice="required", max_output_tokens=3)
    assert [o.name for o in r.output if o.type == "function_call"] == ["lookup"]
    stream = await oai.responses.create(model="m", input="hi", tools=[tool], tool_choice="required", max_output_tokens=3, stream=True)
    done = [e.item.name async for e in stream if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert done == ["lookup"]


async def test_anthropic_forced_tool_use_json_and_stream(claude: anthropic.AsyncAnthropic) -> None:
    args = {"model": "claude", "max_tokens": 3, "messages": USER, "tools": [CLAUDE_TOOL], "tool_choice": {"type": "any"}}
    r = await claude.messages.create(**args)
    assert r.stop_reason == "tool_use" and [b.name for b in r.content if b.type == "tool_use"] == ["lookup"]
    async with claude.messages.stream(**args) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.name for b in final.content if b.type == "tool_use"] == ["lookup"]
