"""Issue 6: a self-hosted backend's cost rate moves with the load driven through
the local stack, and calls to its models are charged at the live per-token price."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest

from extproc.money import Price
from extproc.stack import Stack
from tests.integration.conftest import ledger, sha

pytestmark = pytest.mark.integration

KEY = "sk-gpu-team"


def policy(metrics_url: str) -> str:
    return f"""
version: 1
prices:
  version: selfhosted-1
  models:
    llama-3.1-8b: {{ input: "0.20", output: "0.20", output_limit: 4096 }}   # static fallback until a rate exists
keys:
  - {{ sha256: {sha(KEY)}, principal: gpu-team, team: ml, org: acme }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "10.00" }}]
self_hosted:
  backends:
    backend:
      gpu_model: NVIDIA H100 80GB HBM3
      gpu_count: 1
      purchase_price_usd: "30000"
      amortization_years: 3
      yearly_maintenance_share: "0.10"
      tdp_watts: 700
      usd_per_kwh: "0.12"
      pue: "1.3"
      metrics_url: {metrics_url}
      sample_interval_seconds: 1
      token_window_seconds: 30
      min_tokens_per_hour: 1000000
      models: [llama-3.1-8b]
"""


async def test_cost_rate_rises_with_load_and_prices_self_hosted_calls(tmp_path):
    stack = Stack(policy=str(tmp_path / "policy.yaml"), workdir=tmp_path / "stack", store=f"sqlite:{tmp_path / 'b.db'}")
    try:
        stack.start_backends()
        (tmp_path / "policy.yaml").write_text(policy(stack.backend_url() + "/metrics"))
        stack.start_service()
        stack.start_envoy()
        hdrs = {"authorization": f"Bearer {KEY}", "x-mock-output-tokens": "30"}
        body = {"model": "llama-3.1-8b", "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
            idle = None
            for _ in range(50):  # wait for the first sample
                r = await c.post("/v1/chat/completions", json=body, headers=hdrs)
                assert r.status_code == 200
                if "x-backend-cost-rate-usd-per-hour" in r.headers:
                    idle = Decimal(r.headers["x-backend-cost-rate-usd-per-hour"])
                    break
                await asyncio.sleep(0.2)
            assert idle is not None and r.headers["x-backend-cost-rate-source"] == "dcgm"
            # load: 12 slow calls in flight keep the mock GPU busy for ~3 s
            slow = {**hdrs, "x-mock-delay-ms": "100"}
            load = [asyncio.ensure_future(c.post("/v1/chat/completions", json=body, headers=slow)) for _ in range(12)]
            busy = idle
            for _ in range(40):
                await asyncio.sleep(0.25)
                r = await c.post("/v1/chat/completions", json=body, headers=hdrs)
                busy = max(busy, Decimal(r.headers["x-backend-cost-rate-usd-per-hour"]))
                if busy > idle:
                    break
            assert all(x.status_code == 200 for x in await asyncio.gather(*load))
        assert busy > idle, "the rate follows the mock GPU's power draw"
        entries = await ledger(stack, expect=14)
        priced = [e for e in entries if e.meta.get("price_source") == "cost_rate"]
        assert priced, "calls after the first sample were priced from the cost rate"
        for e in priced:
            p = e.meta["price_pico_usd_per_token"]
            price = Price(p["input"], p["output"], p["cached_input"], p["cache_write"])
            assert price != Price.per_million("0.20", "0.20")
            assert e.charged["cost"] == price.cost(input_tokens=e.charged["input_tokens"], output_tokens=e.charged["output_tokens"])
        # Envoy's access log carries the settled cost and scope from the service's dynamic metadata
        log = stack.log("envoy")
        assert "cost_usd=0." in log and "scope=key:gpu-team" in log
    finally:
        stack.stop()
