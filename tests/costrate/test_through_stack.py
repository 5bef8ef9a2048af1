"""Load through the whole local stack (real Envoy + service + mock GPU backend) moves the
backend's cost rate, and the rate prices its tokens."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from extproc.costrate import CostRates, SQLiteRatePublisher
from extproc.policy.selfhosted import SelfHostedSpec
from extproc.stack import Stack

from .conftest import SPEC

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 8

pytestmark = pytest.mark.integration


async def test_cost_rate_follows_load_driven_through_envoy(tmp_path):
    # compose/envoy.yaml routes to the cluster named like the self-hosted backend
    stack = Stack(policy=str(ROOT / "policies" / "demo.yaml"), envoy_config=str(ROOT / "compose" / "envoy.yaml"),
                  backends=("mock-gpu",), workdir=tmp_path / "stack")
    stack.start()
    spec = SelfHostedSpec.model_validate(
        {"backends": {"mock-gpu": {**SPEC, "metrics_url": stack.backend_url("mock-gpu") + "/metrics", "models": ["gpt-4o-mini"]}}}
    )
    rates = CostRates(spec, store=SQLiteRatePublisher(tmp_path / "rates.db"))
    body = {"model": "gpt-4o-mini", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer sk-demo-carol", "x-mock-output-tokens": "40", "x-mock-delay-ms": "50"}
    try:
        idle = await rates.refresh("mock-gpu")
        async with aiohttp.ClientSession() as http:

            async def call() -> int:
                async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    return r.status

            async def in_flight() -> int:
                async with http.get(stack.backend_url("mock-gpu") + "/stats") as r:
                    return (await r.json())["in_flight"]

            load = [asyncio.create_task(call()) for _ in range(CONCURRENCY)]
            for _ in range(2000):
                if await in_flight() == CONCURRENCY:
                    break
                await asyncio.sleep(0.01)
            busy = await rates.refresh("mock-gpu")
            assert await asyncio.gather(*load) == [200] * CONCURRENCY
        after = await rates.refresh("mock-gpu")
    finally:
        await rates.close()
        stack.stop()
    assert idle is not None and busy is not None and after is not None
    assert idle.source == busy.source == "dcgm"
    assert idle.power_watts == Decimal("60.000") and busy.power_watts == Decimal("700.000")
    assert busy.usd_per_hour > idle.usd_per_hour
    assert after.tokens_per_hour and after.tokens_per_hour > 0
    price = after.price()
    assert price is not None and price.output == after.pico_usd_per_token
