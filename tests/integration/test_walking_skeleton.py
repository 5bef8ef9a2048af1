"""Issue 2: budgets enforced through real Envoy, end to end."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import httpx
import openai
import pytest

from extproc.money import Price, usd_to_nano
from tests.integration.conftest import ledger, sha, shared_stack

pytestmark = pytest.mark.integration

KEY, KEY2 = "sk-test-alice", "sk-test-bob"
PRICE = Price.per_million("1.00", "10.00")


def policy(key_limit: str = "1.00", team_limit: str = "100.00") -> str:
    return f"""
version: 1
prices:
  version: test-1
  models:
    m-small: {{ input: "1.00", output: "10.00", output_limit: 1000 }}
keys:
  - {{ sha256: {sha(KEY)}, principal: alice, team: t1, org: o1 }}
  - {{ sha256: {sha(KEY2)}, principal: bob, team: t1, org: o1 }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "{key_limit}" }}]
  - scope: team
    limits: [{{ dimension: cost, limit: "{team_limit}" }}]
"""


def chat(content: str = "hello there", **kw) -> dict:
    return {"model": "m-small", "messages": [{"role": "user", "content": content}], "max_tokens": 100, **kw}


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def default_stack(request):
    """One stack on policy() for the tests that only need it to answer (each asks the backend's
    hit count from a reset or reads back only its own call's ledger entry, and $1.00 of key
    budget covers every call they make)."""
    with shared_stack(request, "skeleton", policy()) as s:
        yield s


@pytest.mark.parametrize("store", ["embedded", "redis"])
async def test_fan_out_of_20_never_overshoots_a_budget_of_about_5(make_stack, store):
    # Each call reserves ~100 output tokens x $10/1M = $0.001 plus a few input
    # tokens; the key budget fits 5 such reservations, not 6.
    stack = make_stack(policy(key_limit="0.0055"), store=store)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        await c.post(f"{stack.backend_url()}/stats/reset")
        slow = {**auth(), "x-mock-delay-ms": "20"}  # calls overlap: ~16 tokens x 20 ms
        results = await asyncio.gather(*(c.post("/v1/chat/completions", json=chat(), headers=slow) for _ in range(20)))
        stats = (await c.get(f"{stack.backend_url()}/stats")).json()
    served = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code != 200]
    assert 5 <= len(served) < 20
    assert stats["hits"] == len(served), "every call the backend saw was let through, and only those"
    for r in refused:
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
        assert err["budget"]["scope"] == "key:alice"
        assert r.headers["x-should-retry"] == "false"
        assert "retry-after" not in r.headers
        assert r.headers["x-budget-decision"] == "block"
    entries = await ledger(stack, expect=len(served))
    settled = [e for e in entries if e.outcome.value == "settled"]
    assert len(settled) == len(served)
    spent = sum(e.charged["cost"] for e in settled)
    assert 0 < spent <= usd_to_nano("0.0055")
    # each charge is the exact price of the usage the backend reported
    for r in served:
        u = r.json()["usage"]
        assert Decimal(r.headers["x-budget-cost-usd"]) * 10**9 == PRICE.cost(u["prompt_tokens"], u["completion_tokens"])


async def test_streaming_call_is_settled_on_real_usage_and_really_streams(default_stack):
    stack = default_stack
    body = chat("count to ten", stream=True)
    headers = {**auth(), "x-mock-delay-ms": "50", "x-mock-output-tokens": "12"}
    t0 = time.monotonic()
    first_at = None
    raw = b""
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-budget-decision"] == "allow"
            rid = r.headers["x-budget-reservation-id"]
            async for chunk in r.aiter_raw():
                if first_at is None and b"data:" in chunk:
                    first_at = time.monotonic() - t0
                raw += chunk
    total = time.monotonic() - t0
    assert first_at is not None and total >= 0.5
    assert first_at < total / 3, f"first chunk at {first_at:.3f}s of {total:.3f}s: the stream was buffered"
    text = raw.decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # the client did not ask for usage: the gateway injected include_usage and removed the usage chunk again
    assert all(ch["choices"] for ch in chunks)
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == " hello" * 12
    (entry,) = await ledger(stack, where=lambda e: e.reservation_id == rid)
    assert entry.outcome.value == "settled" and entry.meta["usage_source"] == "stream"
    assert entry.charged["output_tokens"] == 12
    expected = PRICE.cost(entry.charged["input_tokens"], 12)
    assert entry.charged["cost"] == expected
    assert f": x-budget-cost-usd={Decimal(expected) / 10**9}" in text


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("malformed_json", 400, "invalid_request"),
        ("missing_key", 401, "invalid_api_key"),
        ("unknown_key", 401, "invalid_api_key"),
        ("unknown_model", 400, "model_not_priced"),
    ],
)
async def test_bad_requests_get_clear_4xx_envelopes_and_service_keeps_serving(default_stack, case, status, code):
    stack = default_stack
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        await c.post(f"{stack.backend_url()}/stats/reset")
        if case == "malformed_json":
            r = await c.post("/v1/chat/completions", content=b'{"model": "m-small", "messages": [', headers={**auth(), "content-type": "application/json"})
        elif case == "missing_key":
            r = await c.post("/v1/chat/completions", json=chat())
        elif case == "unknown_key":
            r = await c.post("/v1/chat/completions", json=chat(), headers=auth("sk-nope"))
        else:
            r = await c.post("/v1/chat/completions", json={**chat(), "model": "gpt-unknown"}, headers=auth())
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"]
        assert (await c.get(f"{stack.backend_url()}/stats")).json()["hits"] == 0
        ok = await c.post("/v1/chat/completions", json=chat(), headers=auth())
        assert ok.status_code == 200, ok.text


async def test_openai_sdk_raises_rate_limit_error_with_insufficient_quota(make_stack):
    stack = make_stack(policy(key_limit="0.0025"))
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=3)
    served = 0
    with pytest.raises(openai.RateLimitError) as exc:
        for _ in range(30):  # each call reserves ~$0.002 and settles ~$0.00017
            await client.chat.completions.create(model="m-small", messages=[{"role": "user", "content": "hi"}], max_tokens=200)
            served += 1
    assert exc.value.code == "insufficient_quota"
    assert exc.value.status_code == 429
    assert served >= 2
    await client.close()
