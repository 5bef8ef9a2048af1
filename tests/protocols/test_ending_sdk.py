"""The official SDKs read a cut stream as a normal end (no exception, the API's cap reason, our usage).

Every recorded stream is cut at every event boundary; `forwarded + ending`
is served through a mock transport (no network) to the `openai` and
`anthropic` SDKs, through both their plain streams and their helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from extproc.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_COMPLETIONS, OPENAI_RESPONSES
from tests.protocols.cutting import CORPUS, STREAMS, USAGE, Stream, cut_at


def served(module: Any, body: Callable[[], bytes]) -> Any:
    def answer(request: Any) -> Any:
        return module.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return module.Client(transport=module.MockTransport(answer))


class Backend:
    """Both SDKs' clients, answering every request with `body`."""

    def __init__(self) -> None:
        self.body = b""
        self.openai = openai.OpenAI(
            api_key="sk-test", base_url="http://sdk.test/v1", max_retries=0, http_client=served(httpx, lambda: self.body)
        )
        self.anthropic = anthropic.Anthropic(
            api_key="sk-test", base_url="http://sdk.test", max_retries=0, http_client=served(httpx2, lambda: self.body)
        )


def cuts(stream: Stream) -> list[tuple[int, bytes, bytes]]:
    """(offset, forwarded, ending) at every event boundary before the end."""
    return [(at, *cut_at(stream, at)) for at in stream.boundaries[:-1]]


def test_every_api_is_covered() -> None:
    assert {s.schema for s in STREAMS} == {OPENAI_CHAT, OPENAI_COMPLETIONS, OPENAI_RESPONSES, ANTHROPIC_MESSAGES}


def check_chat(b: Backend, stream: Stream, forwarded: bytes) -> None:
    if stream.schema is OPENAI_CHAT:
        chunks = list(b.openai.chat.completions.create(model="m", messages=[], stream=True))
    else:
        chunks = list(b.openai.completions.create(model="m", prompt="p", stream=True))
    reasons: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert reasons and all(reasons.values()), reasons
    assert "length" in reasons.values() or b'"finish_reason":"' in forwarded
    usage = [c.usage for c in chunks if c.usage is not None]
    if stream.include_usage and b'"choices":[],' not in forwarded:
        assert (usage[-1].prompt_tokens, usage[-1].completion_tokens, usage[-1].total_tokens) == (
            USAGE.total_input,
            USAGE.output_tokens,
            USAGE.total,
        )
    elif not stream.include_usage:
        assert not usage


def check_incomplete(response: Any) -> None:
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (USAGE.total_input, USAGE.output_tokens)
    assert response.usage.input_tokens_details.cached_tokens == USAGE.cached_input_tokens
    assert isinstance(response.output_text, str)


def final_response_outcome(b: Backend) -> str:
    """What `responses.stream().get_final_response()` does: "incomplete", or the error it raises."""
    with b.openai.responses.stream(model="m", input="x") as s:
        try:
            return s.get_final_response().status or ""
        except RuntimeError as e:
            return f"RuntimeError: {e}"


INCOMPLETE = next(s for s in CORPUS if s.name == "oai-responses-sse-incomplete")


def check_responses(b: Backend) -> None:
    events = list(b.openai.responses.create(model="m", input="x", stream=True))
    assert events[-1].type == "response.incomplete"
    check_incomplete(events[-1].response)
    with b.openai.responses.stream(model="m", input="x") as s:
        helper = list(s)
    assert helper[-1].type == "response.incomplete"
    check_incomplete(helper[-1].response)
    assert helper[-1].response.output_text == events[-1].response.output_text


def check_messages(b: Backend, forwarded: bytes) -> None:
    events = list(b.anthropic.messages.create(model="m", max_tokens=9, messages=[], stream=True))
    assert events[-1].type == "message_stop"
    with b.anthropic.messages.stream(model="m", max_tokens=9, messages=[]) as s:
        message = s.get_final_message()
    if b"event: message_delta" in forwarded:  # the stream's own end had been sent: only message_stop was missing
        return
    assert message.stop_reason == "max_tokens"
    u = message.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (
        USAGE.input_tokens,
        USAGE.cached_input_tokens,
        USAGE.cache_write_tokens,
        USAGE.output_tokens,
    )


@pytest.mark.parametrize("stream", STREAMS, ids=str)
def test_sdks_read_a_cut_stream_as_a_normal_end(stream: Stream) -> None:
    b = Backend()
    for at, forwarded, ending in cuts(stream):
        b.body = forwarded + ending
        try:
            if stream.schema is OPENAI_RESPONSES:
                check_responses(b)
            elif stream.schema is ANTHROPIC_MESSAGES:
                check_messages(b, forwarded)
            else:
                check_chat(b, stream, forwarded)
        except Exception as e:
            raise AssertionError(f"cut after {at} bytes:\n{b.body.decode()[-2000:]}") from e


def test_the_responses_helper_final_response_is_as_on_the_providers_own_incomplete_stream() -> None:
    """The helper's `get_final_response()` treats a cut stream exactly as the API's own
    `max_output_tokens` end (this SDK raises, wanting `response.completed`, on both)."""
    b = Backend()
    b.body = INCOMPLETE.body
    provider = final_response_outcome(b)
    for stream in (INCOMPLETE, next(s for s in CORPUS if s.name == "oai-responses-sse-function-call")):
        for _, forwarded, ending in cuts(stream):
            b.body = forwarded + ending
            assert final_response_outcome(b) == provider
