"""Routes of the policy through real Envoy: a flat-priced route (reserved on headers, charged
on a 2xx, released otherwise), an unmetered one (forwarded with identity, no charge), a
public one, and the closed world's 404 for what is listed nowhere."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from extproc.money import usd_to_nano
from tests.integration.conftest import ledger, sha
from tests.integration.reconcile import reconcile

pytestmark = pytest.mark.integration

VLLM_LIKE = Path(__file__).parents[1] / "security" / "vllm_like.py"
KEY, POOR = "sk-flat-rich", "sk-flat-poor"
POLICY = f"""
version: 1
prices:
  models:
    m: {{ input: "1.00", output: "1.00" }}
keys:
  - {{ sha256: {sha(KEY)}, principal: rich }}
  - {{ sha256: {sha(POOR)}, principal: poor }}
budgets:
  - scope: key
    id: poor
    limits: [{{ dimension: cost, limit: "0.003" }}]
  - scope: key
    id: rich
    limits: [{{ dimension: cost, limit: "1.00" }}]
routes:
  - {{ path: /v1/rerank, action: flat, price: "0.002" }}
"""


@pytest.fixture
def stack(make_stack):
    return make_stack(
        POLICY,
        backends=("backend", "backend_small"),
        backend_command=(sys.executable, str(VLLM_LIKE), "--port", "{port}"),
        backend_ready_path="/health",
    )


async def hits(c: httpx.AsyncClient, stack) -> int:
    return sum([(await c.get(f"{stack.backend_url(n)}/_hits")).json()["total"] for n in stack.backend_ports])


async def test_flat_unmetered_public_and_unlisted_routes_through_envoy(stack):
    rerank = {"model": "m", "query": "q", "documents": ["a", "b"]}
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        before = await hits(c, stack)
        ok = await c.post("/v1/rerank", json=rerank, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-budget-cost-usd"] == "0.002"
        # $0.003 holds one $0.002 call, not two
        first = await c.post("/v1/rerank", json=rerank, headers={"authorization": f"Bearer {POOR}"})
        second = await c.post("/v1/rerank", json=rerank, headers={"authorization": f"Bearer {POOR}"})
        assert (first.status_code, second.status_code) == (200, 429)
        assert second.json()["error"]["code"] == "insufficient_quota"
        anonymous = await c.post("/v1/rerank", json=rerank)
        assert anonymous.status_code == 401
        models = await c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and models.json()["data"]
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.get("/health")).status_code == 200
        unlisted = await c.post("/v1/something/new", json={}, headers={"authorization": f"Bearer {KEY}"})
        assert unlisted.status_code == 404 and unlisted.json()["error"]["code"] == "unknown_route"
        # served: two reranks, one model list, one health check; nothing else reached a backend
        assert await hits(c, stack) - before == 4
    entries = await ledger(stack, expect=2)
    assert sorted((e.meta["principal"], e.outcome.value, e.charged.get("cost", 0)) for e in entries) == [
        ("poor", "settled", usd_to_nano("0.002")),
        ("rich", "settled", usd_to_nano("0.002")),
    ]
    assert all(e.meta["usage_source"] == "flat" for e in entries)
    await reconcile(stack)
