"""The simulated GPU and /metrics: DCGM gauges follow the load, vLLM counters count tokens."""

from __future__ import annotations

import asyncio

import aiohttp
from mock_backend_helpers import parse_prometheus, sample

from extproc.mock_backend.gpu import SimulatedGPU
from extproc.tokenizers import count_tokens


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_utilisation_rises_with_load_and_decays_to_idle() -> None:
    clock = FakeClock()
    gpu = SimulatedGPU(gpus=1, tdp_watts=700, idle_watts=60, clock=clock)
    assert gpu.utilisation() == 0 and gpu.power_watts() == 60
    gpu.begin()
    assert gpu.utilisation() == 1 / 8
    assert gpu.power_watts() == 60 + 640 / 8
    gpu.add_tokens(2000)  # 1000 tok/s over the 2 s window = half of one GPU's capacity
    assert abs(gpu.utilisation() - (1 / 8 + 0.5)) < 1e-9
    gpu.end()
    clock.now += 1.0
    assert abs(gpu.utilisation() - 0.5) < 1e-9
    clock.now += 1.5
    assert gpu.utilisation() == 0 and gpu.power_watts() == 60


def test_utilisation_saturates_and_splits_over_gpus() -> None:
    gpu = SimulatedGPU(gpus=2, clock=FakeClock())
    for _ in range(8):
        gpu.begin()
    assert gpu.utilisation() == 0.5
    for _ in range(100):
        gpu.begin()
    assert gpu.utilisation() == 1.0 and gpu.power_watts() == 700


async def _metrics(http: aiohttp.ClientSession, base: str):
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        return parse_prometheus(await r.text())


async def test_metrics_format_and_idle(start_mock, http: aiohttp.ClientSession) -> None:
    base = await start_mock(gpus=2, name="node-a", idle_watts=50)
    types, samples = await _metrics(http, base)
    assert types["DCGM_FI_DEV_POWER_USAGE"] == "gauge" and types["DCGM_FI_DEV_GPU_UTIL"] == "gauge"
    assert types["vllm:prompt_tokens_total"] == "counter" and types["vllm:generation_tokens_total"] == "counter"
    for gpu in ("0", "1"):
        labels = {"gpu": gpu, "UUID": f"GPU-node-a-{gpu}", "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a"}
        assert sample(samples, "DCGM_FI_DEV_POWER_USAGE", **labels) == 50
        assert sample(samples, "DCGM_FI_DEV_GPU_UTIL", **labels) == 0


async def test_power_rises_under_load(start_mock, http: aiohttp.ClientSession) -> None:
    base = await start_mock(token_delay_ms=20)
    req = {"model": "llama", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 10, "stream": True}

    async def call() -> None:
        async with http.post(f"{base}/v1/chat/completions", json=req) as r:
            await r.read()

    tasks = [asyncio.create_task(call()) for _ in range(4)]
    await asyncio.sleep(0.1)
    _, loaded = await _metrics(http, base)
    await asyncio.gather(*tasks)
    _, after = await _metrics(http, base)
    idle = 60.0
    power_loaded = sample(loaded, "DCGM_FI_DEV_POWER_USAGE", gpu="0")
    assert power_loaded >= idle + 640 * 4 / 8  # four in flight on one GPU: at least 50 %
    assert sample(loaded, "DCGM_FI_DEV_GPU_UTIL", gpu="0") >= 50
    assert idle <= sample(after, "DCGM_FI_DEV_POWER_USAGE", gpu="0") < power_loaded
    assert sample(after, "vllm:prompt_tokens_total", model_name="llama") == 4 * count_tokens("hi there")
    assert sample(after, "vllm:generation_tokens_total", model_name="llama") == 40
    # vLLM counters survive /stats/reset, as a real server's would
    async with http.post(f"{base}/stats/reset"):
        pass
    _, reset = await _metrics(http, base)
    assert sample(reset, "vllm:generation_tokens_total", model_name="llama") == 40
