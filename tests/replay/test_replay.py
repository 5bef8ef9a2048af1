"""Real recorded provider traffic through real Envoy and the real extproc service.

Every exchange of tests/replay/corpus/ (recorded against the real OpenAI and
Anthropic APIs, see SOURCES.md) is replayed by the replay backend behind
Envoy, and for each:

(a) the ledger charge equals the policy's price applied to the usage the
    provider reported (read from the recorded body by `reference.py`, a
    parser independent of extproc's), to the nano-dollar;
(b) the client receives the recorded status and body byte for byte, apart
    from the documented additions: the SSE comment `: x-budget-cost-usd=…`
    before the end of a stream, and the usage chunk removed when extproc
    injected `stream_options.include_usage`;
(c) the official `openai` and `anthropic` SDKs parse every successful response;
(d) error responses are released, charged 0.

Compressed recordings (most real JSON answers are gzip) check that usage is
read from the decoded copy while the client gets the compressed bytes
unchanged, with no comment appended inside the compressed stream.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import uuid
from typing import Any

import aiohttp
import pytest

from extproc.money import nano_to_usd
from extproc.stores.base import Outcome
from extproc.stores.embedded import EmbeddedStore
from tests.replay.conftest import KEY, price
from tests.replay.reference import reported_usage, sse_events
from tests.replay.server import load_corpus, response_bytes, split_events

pytestmark = pytest.mark.integration

CORPUS = load_corpus()
COST_COMMENT = re.compile(rb": x-budget-cost-usd=([0-9.]+)\n\n\Z")


def header(ex: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in ex["response"]["headers"] if k.lower() == name), None)


def ok(ex: dict[str, Any]) -> bool:
    return 200 <= ex["response"]["status"] < 300


def case(ident: str, *, extra: str | None = None):
    return pytest.param(ident, id=f"{ident}-{extra}" if extra else ident)


def sse(ex: dict[str, Any]) -> bool:
    return "text/event-stream" in (header(ex, "content-type") or "")


def recorded_include_usage(ex: dict[str, Any]) -> bool:
    body = json.loads(ex["request"]["body"])
    return bool(body.get("stream") and (body.get("stream_options") or {}).get("include_usage"))


def expected_cost(ex: dict[str, Any]) -> int:
    b = ex["usage"]["buckets"]
    return price().cost(
        input_tokens=b["input"], output_tokens=b["output"], cached_input_tokens=b["cached_input"], cache_write_tokens=b["cache_write"]
    )


def request_headers(ex: dict[str, Any], **extra: str) -> dict[str, str]:
    h = {"content-type": "application/json", "x-replay-id": ex["id"], "x-replay-tag": uuid.uuid4().hex}
    if ex["api"].startswith("anthropic"):
        h["x-api-key"] = KEY
        for name in ("anthropic-version", "anthropic-beta"):
            if name in ex["request"]["headers"]:
                h[name] = ex["request"]["headers"][name]
    else:
        h["authorization"] = f"Bearer {KEY}"
    h.update(extra)
    return h


async def ledger_entry(stack, reservation_id: str, timeout: float = 5.0):
    """The closed ledger entry of one reservation, read from the stack's store."""
    store = EmbeddedStore(stack.store[len("sqlite:"):])
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [e for e in await store.ledger() if e.reservation_id == reservation_id]
            if found or asyncio.get_running_loop().time() > deadline:
                assert len(found) == 1, f"{len(found)} ledger entries for {reservation_id}"
                return found[0]
            await asyncio.sleep(0.05)
    finally:
        await store.close()


async def send(stack, ex: dict[str, Any], *, body: bytes | None = None, stop_at_done: bool = False, **hdrs: str):
    """POST through Envoy; returns (status, headers, body bytes as received, undecoded)."""
    data = ex["request"]["body"].encode() if body is None else body
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(stack.url + ex["request"]["path"], data=data, headers=request_headers(ex, **hdrs)) as r:
            if not stop_at_done:
                return r.status, r.headers, await r.read()
            got = b""
            async for piece in r.content.iter_any():
                got += piece
                if b"data: [DONE]" in got:
                    break
            r.close()  # as the openai SDK does once it has read [DONE]
            return r.status, r.headers, got


def strip_cost_comment(body: bytes) -> tuple[bytes, str | None]:
    m = COST_COMMENT.search(body)
    return (body[: m.start()], m.group(1).decode()) if m else (body, None)


def without_usage_chunk(recorded: bytes) -> bytes:
    """The recorded stream minus OpenAI's usage-only chunk (`choices: []`, `usage` set)."""
    keep = []
    for ev in split_events(recorded):
        data = [line[6:] for line in ev.decode().splitlines() if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            obj = json.loads("\n".join(data))
            if obj.get("choices") == [] and obj.get("usage"):
                continue
        keep.append(ev)
    return b"".join(keep)


# -- the corpus itself ---------------------------------------------------------------

def test_corpus_usage_is_what_the_recorded_bodies_report():
    """The usage stored with each exchange is re-read from its recorded body, not typed in."""
    assert len(CORPUS) >= 50
    for ex in CORPUS.values():
        if ok(ex):
            got = reported_usage(
                ex["api"], response_bytes(ex), content_type=header(ex, "content-type") or "", content_encoding=header(ex, "content-encoding")
            )
            assert got == ex["usage"], ex["id"]
        else:
            assert ex["usage"] is None, ex["id"]


# -- (a) (b) (d): every exchange -----------------------------------------------------

def _replay_cases():
    for ident, ex in CORPUS.items():
        if ok(ex) and ex["usage"] is None:
            continue  # streams recorded without usage: test_stream_without_usage
        if sse(ex):
            for chunking in ("events", "bytes:7"):
                yield case(ident, extra=chunking.replace(":", ""))
        else:
            yield case(ident)


@pytest.mark.parametrize("ident", list(_replay_cases()))
async def test_replay(stack, replay, ident, request):
    ex = CORPUS[ident]
    chunking = "bytes:7" if request.node.callspec.id.endswith("-bytes7") else "events"
    tag = uuid.uuid4().hex
    status, headers, body = await send(stack, ex, **{"x-replay-chunking": chunking, "x-replay-tag": tag})
    recorded = response_bytes(ex)
    assert status == ex["response"]["status"]
    if not ok(ex) and "x-budget-reservation-id" not in headers:
        # The provider refused this request as malformed, and so did extproc, before
        # reserving or forwarding anything (fail closed on bad input): same status, the
        # API's own error envelope, nothing upstream.
        assert tag not in replay.received
        doc = json.loads(body)
        assert doc["type"] == "error" if ex["api"].startswith("anthropic") else "error" in doc
        assert doc["error"]["type"] == json.loads(recorded)["error"]["type"]
        return
    entry = await ledger_entry(stack, headers["x-budget-reservation-id"])
    if not ok(ex):  # (d) released, charged nothing, body untouched
        assert entry.outcome is Outcome.RELEASED
        assert entry.charged.get("cost", 0) == 0
        assert body == recorded
        return
    assert entry.outcome is Outcome.SETTLED
    if zero_usage_with_text(ex):
        # The provider reported 0 tokens for a stream that carried text: never trusted to
        # $0; the visible output extproc counted is charged instead ("partial").
        assert entry.meta["usage_source"] == "partial" and entry.charged["output_tokens"] > 0
        want = entry.charged["cost"]
    else:
        want = expected_cost(ex)
        assert entry.charged.get("cost", 0) == want, (entry.charged, entry.meta, ex["usage"]["buckets"])
    if sse(ex) and header(ex, "content-encoding"):
        assert body == recorded, "a compressed stream is observed, never rewritten (no comment inside it)"
    elif sse(ex):
        forwarded, comment = strip_cost_comment(body)
        assert comment == nano_to_usd(want)
        told = b": x-budget-cost-source=partial\n\n" if zero_usage_with_text(ex) else b""  # an estimate says so
        assert forwarded == recorded + told
    else:
        assert headers["x-budget-cost-usd"] == nano_to_usd(want)
        assert body == recorded


# -- streams recorded without usage -------------------------------------------------

@pytest.mark.parametrize("ident", [case(i) for i, ex in CORPUS.items() if ok(ex) and ex["usage"] is None])
async def test_stream_without_usage(stack, replay, ident):
    """No usage in the recording: extproc asks for it (include_usage) and, not getting it,
    charges what it counted; the client still gets the recorded stream."""
    ex = CORPUS[ident]
    tag = uuid.uuid4().hex
    status, headers, body = await send(stack, ex, **{"x-replay-tag": tag})
    assert status == 200
    if ex["api"] == "openai.chat_completions":
        assert json.loads(replay.received[tag]["body"])["stream_options"] == {"include_usage": True}
    entry = await ledger_entry(stack, headers["x-budget-reservation-id"])
    assert entry.outcome is Outcome.SETTLED
    assert entry.meta["usage_source"] == "counted"
    u = entry.meta["usage"]
    assert u["output"] > 0
    assert entry.charged["cost"] == price().cost(input_tokens=u["input"], output_tokens=u["output"])
    forwarded, comment = strip_cost_comment(body)
    assert forwarded == response_bytes(ex) + b": x-budget-cost-source=counted\n\n", "the client is told the cost is an estimate"
    assert comment == nano_to_usd(entry.charged["cost"])


# -- include_usage injected by extproc ----------------------------------------------

INJECTABLE = [i for i, ex in CORPUS.items() if ok(ex) and sse(ex) and recorded_include_usage(ex)]


@pytest.mark.parametrize("ident", [case(i) for i in INJECTABLE])
async def test_injected_include_usage(stack, replay, ident):
    """The client did not ask for usage: extproc injects include_usage upstream, bills the
    usage chunk and removes it from what the client receives."""
    ex = CORPUS[ident]
    asked = json.loads(ex["request"]["body"])
    asked.pop("stream_options")
    tag = uuid.uuid4().hex
    status, headers, body = await send(stack, ex, body=json.dumps(asked).encode(), **{"x-replay-tag": tag})
    assert status == 200
    upstream = json.loads(replay.received[tag]["body"])
    assert upstream["stream_options"] == {"include_usage": True}
    entry = await ledger_entry(stack, headers["x-budget-reservation-id"])
    assert entry.charged.get("cost", 0) == expected_cost(ex)
    if header(ex, "content-encoding"):
        # A backend that compresses although extproc asked for identity: the stream can be
        # read but not rewritten, so the client also gets the usage chunk (documented).
        assert body == response_bytes(ex)
        return
    forwarded, comment = strip_cost_comment(body)
    assert forwarded == without_usage_chunk(response_bytes(ex))
    assert forwarded != response_bytes(ex)
    assert comment == nano_to_usd(expected_cost(ex))


# -- the client hangs up right after data: [DONE] -----------------------------------

DONE_CLOSE = [i for i in INJECTABLE if b"data: [DONE]" in response_bytes(CORPUS[i])]


@pytest.mark.parametrize("ident", [case(i) for i in DONE_CLOSE])
async def test_closed_at_done_is_charged_the_recorded_usage(stack, replay, ident):
    """The provider's end of stream lags its [DONE] (linger); the client, like the openai SDK,
    closes on [DONE]. The usage chunk was seen, so the call is charged the recorded usage."""
    ex = CORPUS[ident]
    status, headers, _ = await send(stack, ex, stop_at_done=True, **{"x-replay-linger-ms": "300"})
    assert status == 200
    entry = await ledger_entry(stack, headers["x-budget-reservation-id"])
    assert entry.charged.get("cost", 0) == expected_cost(ex), entry.meta


# -- (c) the official SDKs parse every successful response --------------------------

def _sdk_call(stack, ex: dict[str, Any]):
    import anthropic
    import openai
    from anthropic.types import Message, RawMessageStreamEvent
    from anthropic.types.beta import BetaMessage, BetaRawMessageStreamEvent
    from openai.types import Completion, CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent

    body = json.loads(ex["request"]["body"])
    stream = bool(body.get("stream"))
    path = ex["request"]["path"]
    extra = {"x-replay-id": ex["id"]}
    if ex["api"].startswith("anthropic"):
        client = anthropic.AsyncAnthropic(base_url=stack.url, api_key=KEY, max_retries=0)
        beta = path.endswith("?beta=true")
        for name in ("anthropic-beta",):
            if name in ex["request"]["headers"]:
                extra[name] = ex["request"]["headers"][name]
        cast, event = (BetaMessage, BetaRawMessageStreamEvent) if beta else (Message, RawMessageStreamEvent)
        return client, client.post(
            path, cast_to=cast, body=body, options={"headers": extra}, stream=stream, stream_cls=anthropic.AsyncStream[event]
        )
    client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0)
    cast, event = {
        "openai.chat_completions": (ChatCompletion, ChatCompletionChunk),
        "openai.completions": (Completion, Completion),
        "openai.responses": (Response, ResponseStreamEvent),
        "openai.embeddings": (CreateEmbeddingResponse, None),
    }[ex["api"]]
    return client, client.post(
        path[len("/v1"):], cast_to=cast, body=body, options={"headers": extra}, stream=stream,
        stream_cls=openai.AsyncStream[event] if event else None,
    )


def zero_usage_with_text(ex: dict[str, Any]) -> bool:
    """A recording whose reported usage is all zero although its stream carried output text."""
    u = ex["usage"]
    return bool(u) and sse(ex) and not any(u["buckets"].values()) and b'"delta":"' in decoded_body(ex)


def decoded_body(ex: dict[str, Any]) -> bytes:
    body = response_bytes(ex)
    return gzip.decompress(body) if header(ex, "content-encoding") == "gzip" else body


def recorded_events(ex: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON events of a recorded stream the SDKs hand to the caller (not [DONE], not ping)."""
    text = decoded_body(ex).decode()
    events = [json.loads(d) for _, d in sse_events(text) if d.strip() != "[DONE]"]
    return [e for e in events if e.get("type") != "ping"]


@pytest.mark.parametrize("ident", [case(i) for i, ex in CORPUS.items() if ok(ex)])
async def test_official_sdk_parses(stack, replay, ident):
    ex = CORPUS[ident]
    client, call = _sdk_call(stack, ex)
    async with client:
        result = await call
        if sse(ex):
            events = [e async for e in result]
            want = recorded_events(ex)
            assert len(events) == len(want)
            last = events[-1].model_dump()
            assert last.get("type") == want[-1].get("type")
            usage_in = want[-1].get("usage") or (want[-1].get("response") or {}).get("usage")
            if usage_in:
                got = last.get("usage") or last["response"]["usage"]
                assert int_fields(got, usage_in) == int_fields(usage_in, usage_in)
        else:
            reported = ex["usage"]["reported"]
            assert int_fields(result.usage.model_dump(), reported) == int_fields(reported, reported)


def int_fields(d: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """The integer counts of `d` at the keys where `like` has integers."""
    return {k: d.get(k) for k, v in like.items() if type(v) is int}
