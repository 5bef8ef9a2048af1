"""Issue 4: every schema x {JSON, SSE} reserved and settled to the nano-dollar
through real Envoy; the official SDKs unchanged; aborted streams still charged."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from extproc.money import Price
from tests.integration.conftest import ledger, sha, shared_stack

pytestmark = pytest.mark.integration

KEY = "sk-cover"
PRICES = {
    "gpt-4o": Price.per_million("2.50", "10.00", "1.25"),
    "claude-test": Price.per_million("3.00", "15.00", "0.30", "3.75"),
    "text-embedding-3-small": Price.per_million("0.02", "0"),
}

POLICY = f"""
version: 1
prices:
  version: cover-1
  models:
    gpt-4o: {{ input: "2.50", cached_input: "1.25", output: "10.00", output_limit: 4096 }}
    claude-test: {{ input: "3.00", cached_input: "0.30", cache_write: "3.75", output: "15.00", output_limit: 8192, encoding: cl100k_base, token_safety_factor: "1.25" }}
    text-embedding-3-small: {{ input: "0.02", output: "0", output_limit: 1 }}
keys:
  - {{ sha256: {sha(KEY)}, principal: cover, team: t, org: o }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "5.00" }}]
"""

MSG = [{"role": "user", "content": "Summarise the budget rules for agents."}]
KNOBS = {"x-mock-output-tokens": "9", "x-mock-cached-tokens": "4", "x-mock-reasoning-tokens": "3"}

CASES = {
    "chat": ("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG, "max_tokens": 50}),
    "completions": ("/v1/completions", {"model": "gpt-4o", "prompt": "Say hello to the budget.", "max_tokens": 50}),
    "responses": ("/v1/responses", {"model": "gpt-4o", "input": "What does a run cost?", "max_output_tokens": 50}),
    "embeddings": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["one budget", "two budgets"]}),
    "messages": ("/v1/messages", {"model": "claude-test", "messages": MSG, "max_tokens": 50}),
}


def _usage_from_client_view(case: str, body: bytes, stream: bool) -> dict[str, int]:
    """Read the backend's usage from what the client received, independently of extproc's parsers."""
    if not stream:
        u = json.loads(body)["usage"]
        events = []
    else:
        events = [json.loads(l[6:]) for l in body.decode().splitlines() if l.startswith("data: {")]
        u = {}
    if case in ("chat", "completions"):
        if stream:
            u = next(e["usage"] for e in events if e.get("usage"))
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {"input": u["prompt_tokens"] - cached, "cached": cached, "write": 0, "output": u["completion_tokens"]}
    if case == "responses":
        if stream:
            u = next(e["response"]["usage"] for e in events if e.get("type") == "response.completed")
        cached = u["input_tokens_details"]["cached_tokens"]
        return {"input": u["input_tokens"] - cached, "cached": cached, "write": 0, "output": u["output_tokens"]}
    if case == "embeddings":
        return {"input": u["prompt_tokens"], "cached": 0, "write": 0, "output": 0}
    if stream:  # anthropic: message_start carries input and cache fields, message_delta the cumulative output
        start = next(e["message"]["usage"] for e in events if e.get("type") == "message_start")
        delta = [e["usage"] for e in events if e.get("type") == "message_delta"][-1]
        u = {**start, **delta}
    return {
        "input": u["input_tokens"],
        "cached": u.get("cache_read_input_tokens") or 0,
        "write": u.get("cache_creation_input_tokens") or 0,
        "output": u["output_tokens"],
    }


@pytest.fixture(scope="module")
def stack(request):
    with shared_stack(request, "cover", POLICY) as s:
        yield s


@pytest.mark.parametrize(
    "case, stream",
    [(c, s) for c in CASES for s in (False, True) if not (c == "embeddings" and s)],  # embeddings do not stream
    ids=lambda v: v if isinstance(v, str) else ("sse" if v else "json"),
)
async def test_each_schema_is_settled_to_the_nano_dollar(stack, case, stream):
    path, body = CASES[case]
    body = {**body, "stream": True} if stream else dict(body)
    if case in ("chat", "completions") and stream:
        body["stream_options"] = {"include_usage": True}  # so the client (this test) can see the usage
    headers = {"authorization": f"Bearer {KEY}", **KNOBS}
    if case == "messages":
        headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", **KNOBS, "x-mock-cache-write-tokens": "2"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        before = len(await ledger(stack, expect=0))
        r = await c.post(path, json=body, headers=headers)
    assert r.status_code == 200, r.text
    u = _usage_from_client_view(case, r.content, stream)
    price = PRICES[body["model"]]
    expected = price.cost(input_tokens=u["input"], output_tokens=u["output"], cached_input_tokens=u["cached"], cache_write_tokens=u["write"])
    assert expected > 0
    entries = await ledger(stack, expect=before + 1)
    entry = entries[-1]
    assert entry.reservation_id == r.headers.get("x-budget-reservation-id")
    assert entry.charged["cost"] == expected, (entry.charged, u)
    assert entry.charged.get("output_tokens", 0) == u["output"]
    if case != "embeddings":
        assert u["output"] >= 9, "the knobs took effect"
    if case in ("chat", "completions", "responses"):
        assert u["cached"] == 4, "cached input is priced separately"
    if stream:
        assert f": x-budget-cost-usd={Decimal(expected) / 10**9}".encode() in r.content
    else:
        assert Decimal(r.headers["x-budget-cost-usd"]) * 10**9 == expected
    assert Decimal(r.headers["x-budget-reserved-usd"]) * 10**9 >= expected, "the reservation covered the real cost"


async def test_openai_sdk_works_unchanged(stack):
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0)
    r = await client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=20)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    chunks = [c async for c in await client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=20, stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks), "the injected usage chunk never reaches a client that did not ask"
    chunks = [c async for c in await client.chat.completions.create(
        model="gpt-4o", messages=MSG, max_tokens=20, stream=True, stream_options={"include_usage": True})]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    resp = await client.responses.create(model="gpt-4o", input="hi", max_output_tokens=20)
    assert resp.usage.output_tokens > 0
    events = [e async for e in await client.responses.create(model="gpt-4o", input="hi", max_output_tokens=20, stream=True)]
    assert events[-1].type == "response.completed"
    emb = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert emb.usage.prompt_tokens > 0
    await client.close()


async def test_anthropic_sdk_works_unchanged(stack):
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key=KEY, max_retries=0)
    msg = await client.messages.create(model="claude-test", max_tokens=20, messages=MSG)
    assert msg.usage.output_tokens > 0
    async with client.messages.stream(model="claude-test", max_tokens=20, messages=MSG) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text and final.usage.output_tokens > 0
    await client.close()


async def test_anthropic_refusal_uses_the_anthropic_envelope(make_stack):
    stack = make_stack(POLICY.replace('limit: "5.00"', 'limit: "0.0001"'))
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as exc:
        await client.messages.create(model="claude-test", max_tokens=2000, messages=MSG)
    body = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert body["budget"]["scope"] == "key:cover"
    await client.close()


async def test_client_that_disconnects_mid_stream_is_charged_for_what_it_received(stack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        before = len(await ledger(stack, expect=0))
        got = 0
        headers = {"authorization": f"Bearer {KEY}", "x-mock-output-tokens": "200", "x-mock-delay-ms": "30"}
        body = {"model": "gpt-4o", "messages": MSG, "max_tokens": 400, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if got == 6:
                        break  # the client goes away mid-stream
    entries = await ledger(stack, expect=before + 1, timeout=10)
    entry = entries[-1]
    assert entry.outcome.value == "settled"
    assert entry.meta["usage_source"] == "aborted_counted"  # client gone, no usage seen: counted output
    # charged: the input estimate + the output tokens counted from the deltas seen so far
    assert 5 <= entry.charged["output_tokens"] < 200
    assert entry.charged["cost"] > 0
    assert entry.charged["cost"] < entry.reserved["cost"]
