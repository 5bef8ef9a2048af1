"""The sampler against the real mock GPU backend: the rate follows the load; TDP when blind."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from extproc.costrate import CostRates, Sampler
from extproc.mock_backend.app import Backend
from extproc.policy.selfhosted import SelfHostedSpec

from .conftest import SPEC, backend_spec, closed_port

CONCURRENCY = 8  # saturates one simulated GPU (8 slots)


async def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def chat(http: aiohttp.ClientSession, base: str, *, tokens: int, delay_ms: int) -> None:
    async with http.post(
        f"{base}/v1/chat/completions",
        json={"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "count to a hundred"}]},
        headers={"x-mock-output-tokens": str(tokens), "x-mock-delay-ms": str(delay_ms)},
    ) as r:
        assert r.status == 200
        await r.read()


async def test_cost_rate_rises_with_load_and_prices_tokens(start_mock):
    base, backend = await start_mock(gpus=1, tdp_watts=700, idle_watts=60, name="mock-gpu")
    backend: Backend
    spec = SelfHostedSpec.model_validate(
        {"backends": {"mock-gpu": {**SPEC, "metrics_url": f"{base}/metrics", "models": ["llama-3.1-8b"]}}}
    )
    rates = CostRates(spec)  # no store: this process samples for itself
    try:
        idle = await rates.refresh("mock-gpu")
        assert idle is not None and idle.source == "dcgm"
        assert idle.power_watts == Decimal("60.000")
        assert idle.usd_per_hour == Decimal("1.493378265")  # the formula at 60 W
        assert rates.price_for_model("llama-3.1-8b") is None  # no tokens served yet: static price applies

        async with aiohttp.ClientSession() as http:
            load = [asyncio.create_task(chat(http, base, tokens=40, delay_ms=50)) for _ in range(CONCURRENCY)]
            await wait_for(lambda: backend.stats.in_flight == CONCURRENCY, "the GPU to be busy")
            busy = await rates.refresh("mock-gpu")
            await asyncio.gather(*load)
        assert busy is not None and busy.source == "dcgm"
        assert busy.power_watts > idle.power_watts
        assert busy.power_watts == Decimal("700.000")  # every slot busy: TDP
        assert busy.usd_per_hour > idle.usd_per_hour
        assert busy.usd_per_hour == Decimal("1.593218265")

        after = await rates.refresh("mock-gpu")
        assert after is not None
        assert after.tokens_per_hour is not None and after.tokens_per_hour > 0
        served = backend.stats.prompt_tokens + backend.stats.generation_tokens
        assert backend.stats.generation_tokens == CONCURRENCY * 40
        assert after.tokens_per_hour >= served  # all of them within far less than an hour
        # self-hosted calls are priced from the rate: $/h x 1e6 / tokens per hour, rounded up
        price = rates.price_for_model("llama-3.1-8b")
        assert price is not None and after.usd_per_million_tokens is not None
        expected = (after.usd_per_hour * Decimal(10**6) / Decimal(after.tokens_per_hour)).quantize(
            Decimal("0.000001"), rounding="ROUND_CEILING"
        )
        assert after.usd_per_million_tokens == expected
        assert price.output == after.pico_usd_per_token
        assert rates.headers_for_model("llama-3.1-8b") == [
            ("x-backend-cost-rate-usd-per-hour", format(after.usd_per_hour.normalize(), "f")),
            ("x-backend-cost-rate-source", "dcgm"),
        ]
        assert rates.price_for_model("gpt-4o") is None  # not self-hosted
    finally:
        await rates.close()


async def test_unreachable_metrics_fall_back_to_tdp_times_gpus():
    url = f"http://127.0.0.1:{closed_port()}/metrics"
    sampler = Sampler("gpu", backend_spec(gpu_count=4, metrics_url=url))
    try:
        rate = await sampler.sample()
    finally:
        await sampler.close()
    assert rate.source == "tdp_fallback"
    assert rate.power_watts == Decimal(2800)
    assert rate.reason is not None and "unreachable" in rate.reason and url in rate.reason
    assert rate.tokens_per_hour is None
    # 39000/26280 + 2.8 kW x 0.12 x 1.3 = 1.4840182648… + 0.4368
    assert rate.usd_per_hour == Decimal("1.920818265")


async def test_no_metrics_url_means_tdp():
    sampler = Sampler("gpu", backend_spec())
    rate = await sampler.sample()
    await sampler.close()
    assert rate.source == "tdp_fallback" and rate.power_watts == Decimal(700)
    assert rate.reason == "no metrics_url configured"


@pytest.fixture
async def odd_exporter():
    """An exporter that misbehaves on purpose, one path per way."""

    async def vllm_only(request: web.Request) -> web.Response:
        return web.Response(text='vllm:prompt_tokens_total{model_name="m"} 100.0\nvllm:generation_tokens_total 50\n')

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="oops")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="DCGM_FI_DEV_POWER_USAGE{gpu=0} 100\n")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="DCGM_FI_DEV_POWER_USAGE 1\n")

    async def dcgm(request: web.Request) -> web.Response:
        return web.Response(text='DCGM_FI_DEV_POWER_USAGE{gpu="0"} 250.5\n')

    app = web.Application()
    for path, h in [("/vllm", vllm_only), ("/broken", broken), ("/garbage", garbage), ("/slow", slow), ("/dcgm", dcgm)]:
        app.router.add_get(path, h)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/vllm", "has no DCGM_FI_DEV_POWER_USAGE"),
        ("/broken", "HTTP 500"),
        ("/garbage", 'unusable: line 1: expected ="'),
        ("/slow", "TimeoutError"),
        ("/missing", "HTTP 404"),
    ],
)
async def test_every_blind_spot_falls_back_and_says_why(odd_exporter, path, reason):
    sampler = Sampler("gpu", backend_spec(metrics_url=odd_exporter + path), timeout_s=0.3)
    try:
        rate = await sampler.sample()
    finally:
        await sampler.close()
    assert rate.source == "tdp_fallback"
    assert rate.power_watts == Decimal(700)
    assert rate.reason is not None and reason in rate.reason


async def test_power_and_tokens_from_separate_exporters(odd_exporter):
    now = [0.0]
    sampler = Sampler(
        "gpu",
        backend_spec(metrics_url=odd_exporter + "/dcgm", token_metrics_url=odd_exporter + "/vllm"),
        clock=lambda: now[0],
    )
    try:
        first = await sampler.sample()
        now[0] = 36.0
        second = await sampler.sample()
    finally:
        await sampler.close()
    assert first.source == "dcgm" and first.power_watts == Decimal("250.5")
    assert first.tokens_per_hour is None
    assert second.tokens_per_hour == 0  # the counters did not move in 36 s
