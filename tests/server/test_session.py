"""The per-request session driven directly (no gRPC), over a real embedded store."""

from __future__ import annotations

import hashlib
import json

import pytest

from extproc.engine.budget import Engine
from extproc.policy.loader import PolicyHolder, parse_policy
from extproc.server.session import Services, Session
from extproc.stores.embedded import EmbeddedStore

KEY = "sk-session"
POLICY = f"""
version: 1
prices:
  models:
    big: {{ input: "10.00", output: "10.00", output_limit: 1000, downshift_to: [small] }}
    small: {{ input: "0.10", output: "0.10", output_limit: 1000 }}
keys:
  - {{ sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, principal: p, team: t, org: o }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "0.01", soft_threshold: "0.5" }}]
"""
HEADERS = {":path": "/v1/chat/completions", ":method": "POST", "authorization": f"Bearer {KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def services(tmp_path):
    store = EmbeddedStore(tmp_path / "b.db")
    clock = Clock()
    s = Services(PolicyHolder(parse_policy(POLICY)), Engine(store, clock=clock))
    s.clock = clock  # type: ignore[attr-defined]
    yield s
    await store.close()


def body(model: str, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def call(services: Services, rid: str, model: str, max_tokens: int):
    s = Session(services)
    r = await s.request_headers({**HEADERS, "x-request-id": rid}, False)
    if r.immediate is not None:
        return s, r, "headers"
    r = await s.request_body(body(model, max_tokens))
    return s, r, "body"


async def test_a_spent_budget_is_refused_on_headers_from_recent_state_until_it_ages_out(services):
    s, r, phase = await call(services, "a", "small", 1000)
    assert r.immediate is None and phase == "body"
    await s.response_headers({":status": "200", "content-type": "application/json"})
    await s.response_body(json.dumps({"usage": {"prompt_tokens": 100000, "completion_tokens": 0}}).encode(), True)
    # the key's $0.01 is now spent (100k input tokens x $0.10/1M); the next refusal comes from the reservation
    _, r, phase = await call(services, "b", "small", 10)
    assert r.immediate is not None and r.immediate.status == 429 and phase == "body"
    # and the one after is refused on its headers, before its body is uploaded
    _, r, phase = await call(services, "c", "small", 10)
    assert r.immediate is not None and r.immediate.status == 429 and phase == "headers"
    assert json.loads(r.immediate.body)["error"]["code"] == "insufficient_quota"
    services.clock.now += 1001  # type: ignore[attr-defined]
    _, r, phase = await call(services, "d", "small", 10)
    assert phase == "body", "a stale recent state never refuses on its own"


async def test_a_call_that_crosses_the_soft_threshold_moves_to_the_cheaper_model(services):
    # big's worst case: 600 output tokens x $10/1M + input = $0.0061 > 50% of $0.01 -> moved to small
    s, r, _ = await call(services, "x", "big", 600)
    assert r.immediate is None
    assert s.chosen is not None and s.chosen.name == "small"
    assert json.loads(r.body)["model"] == "small"
    assert ("x-extproc-model", "small") in r.set_headers and r.clear_route_cache
    entries = await services.engine.store.ledger()
    assert [(e.reservation_id, e.outcome.value) for e in entries] == [("x", "released")]
