"""Issue 11 through real Envoy: parallel calls with images, files and a reasoning model on
small, overlapping budgets. Every budget stays within its limit, the ledger reconciles,
a key under both the budget for every key and its own budget is charged once on each,
and what cannot be sized is refused before it reaches the backend."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest

from extproc.engine.budget import Engine, Identity
from extproc.estimate import TokenCounter, estimate, media_tokens
from extproc.money import nano_to_usd
from extproc.policy.loader import load_policy, parse_policy
from extproc.protocols.schemas import schema_by_name
from tests.integration.conftest import ledger, open_store, sha
from tests.integration.reconcile import reconcile

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.integration

ALICE, BOB = "sk-media-alice", "sk-media-bob"
MODELS = f"""
version: 1
prices:
  models:
    vis: {{ input: "1.00", output: "2.00", output_limit: 200, capabilities: {{ vision: true }} }}
    think: {{ input: "1.00", output: "2.00", output_limit: 200, reasoning: true, capabilities: {{ vision: true }} }}
keys:
  - {{ sha256: {sha(ALICE)}, principal: alice, team: lab, org: acme }}
  - {{ sha256: {sha(BOB)}, principal: bob, team: lab, org: acme }}
inputs: {{ unsized_part_tokens: 3000 }}
"""


def png(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "green").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


PDF = base64.b64encode(b"%PDF-1.4\n" + bytes(range(256)) * 8).decode()  # ~2 KiB inline


def chat(model: str, **kw) -> dict:
    content = [
        {"type": "text", "text": "what do these show?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png((1024, 1024))}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://images.example/unknown-size.png"}},
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}", "filename": "a.pdf"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ]
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def messages() -> dict:
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png((1000, 1000))}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
        {"type": "text", "text": "summarise"},
    ]
    return {"model": "vis", "max_tokens": 200, "messages": [{"role": "user", "content": content}]}


def reservation(policy, api: str, body: dict) -> tuple[int, int]:
    """(input tokens, cost) the gateway reserves for `body`, from the code that prices it."""
    schema = schema_by_name(api)
    assert schema is not None
    facts = schema.parse_request(json.dumps(body).encode())
    spec = policy.model(facts.model)
    est = estimate(
        facts,
        counter=TokenCounter(),
        encoding=spec.encoding,
        safety_factor=spec.token_safety_factor,
        output_limit=spec.output_limit,
        fallback_output=policy.fallback_output_tokens,
        media_tokens=media_tokens(facts, policy.inputs, api=api),
        context_window=spec.context_window,
    )
    return est.input_tokens, spec.price.cost(input_tokens=est.input_tokens, output_tokens=est.output_tokens)


@pytest.mark.parametrize("store", ["embedded", "redis"])
async def test_parallel_media_calls_on_small_overlapping_budgets(make_stack, store):
    base = parse_policy(MODELS)
    think_input, think_cost = reservation(base, "openai.chat", chat("think", stream=True))
    _, vis_cost = reservation(base, "openai.chat", chat("vis"))
    _, msg_cost = reservation(base, "anthropic.messages", messages())
    media_part = media_tokens(schema_by_name("openai.chat").parse_request(json.dumps(chat("think")).encode()), base.inputs, api="openai.chat")
    assert think_input > media_part > 9000  # images, the PDF and the file by id are all reserved
    # alice's own budget fits 2 of her 8 parallel calls; every key 3 calls; the team 6 calls of either kind
    policy_text = MODELS + f"""
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "{nano_to_usd(3 * max(think_cost, vis_cost, msg_cost) + 1)}" }}]
  - scope: key
    id: alice
    limits: [{{ dimension: cost, limit: "{nano_to_usd(2 * think_cost + think_cost // 2)}" }}]
  - scope: team
    limits: [{{ dimension: cost, limit: "{nano_to_usd(6 * max(think_cost, vis_cost, msg_cost))}" }}]
"""
    stack = make_stack(policy_text, store=store)
    policy = load_policy(stack.policy)
    slow = {"x-mock-delay-ms": "30", "x-mock-first-byte-delay-ms": "200"}  # the calls overlap
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as c:
        await c.post(f"{stack.backend_url()}/stats/reset")

        async def think(i: int) -> httpx.Response:  # a reasoning model whose stream never reports usage
            headers = {"authorization": f"Bearer {ALICE}", "x-mock-no-usage": "1", "x-mock-output-tokens": "5", **slow}
            return await c.post("/v1/chat/completions", json=chat("think", stream=True), headers=headers)

        async def vis(i: int) -> httpx.Response:
            headers = {"authorization": f"Bearer {BOB}", "x-mock-output-tokens": "5", **slow}
            if i % 2:
                return await c.post("/v1/messages", json=messages(), headers={**headers, "anthropic-version": "2023-06-01"})
            return await c.post("/v1/chat/completions", json=chat("vis"), headers=headers)

        results = await asyncio.gather(*(think(i) for i in range(8)), *(vis(i) for i in range(8)))
        # a stored conversation the policy sets no worst case for: refused, never sent
        unbounded = await c.post(
            "/v1/responses",
            json={"model": "vis", "previous_response_id": "resp_1", "input": "go on"},
            headers={"authorization": f"Bearer {BOB}"},
        )
        hits = (await c.get(f"{stack.backend_url()}/stats")).json()["hits"]

    served = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code != 200]
    for r in refused:  # in each caller's API envelope
        assert r.status_code == 429, r.text
        if r.request.url.path == "/v1/messages":
            assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["x-should-retry"] == "false"
        else:
            assert r.json()["error"]["code"] == "insufficient_quota"
    alice_served = [r for r in results[:8] if r.status_code == 200]
    assert 1 <= len(alice_served) <= 2, "alice's own budget holds 2 of her calls, not her key budget's 3"
    assert len(served) < 16 and hits == len(served), "only what was let through reached the backend"
    assert unbounded.status_code == 400
    assert unbounded.json()["error"]["code"] == "input_not_bounded"
    assert unbounded.json()["error"]["param"] == "previous_response_id"

    entries = await ledger(stack, expect=len(served), timeout=15)
    alice_entries = [e for e in entries if e.meta.get("principal") == "alice"]
    assert len(alice_entries) == len(alice_served)
    for e in alice_entries:  # usage lost on a reasoning model: charged its reservation, which priced every part
        assert e.meta["usage_source"] == "reserved"
        assert e.charged["cost"] == e.reserved["cost"] == think_cost
        assert e.reserved["input_tokens"] == think_input

    lines = await reconcile(stack)  # every counter equals the sum of its ledger entries, nothing left reserved
    store_ = open_store(stack.store)
    engine = Engine(store_)
    try:
        for key in policy.keys:
            snap = await engine.snapshot(policy, Identity.from_key(key))
            for lim, st in snap.rows():
                assert st.spent <= st.limit, f"{lim.line.key}: spent {st.spent} > limit {st.limit}"
                assert st.reserved == 0
    finally:
        await store_.close()
    # alice's calls counted once on the budget for every key and once on her own
    charged = sum(e.charged["cost"] for e in alice_entries)
    assert lines["key:alice|cost|total"] == lines["key@id:alice|cost|total"] == (charged, charged)
    assert lines["team:lab|cost|total"][0] == sum(e.charged["cost"] for e in entries)
