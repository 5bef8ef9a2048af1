"""CostRates: one sampler per backend fleet-wide, everyone reads its value; gauges; staleness."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry

from extproc.costrate import CostRate, CostRates, PrometheusGauges, SQLiteRatePublisher
from extproc.errors import StoreUnavailable
from extproc.policy.selfhosted import SelfHostedSpec

from .conftest import SPEC


def spec(url: str | None, **over: Any) -> SelfHostedSpec:
    backend = {**SPEC, "metrics_url": url, "models": ["llama"], "sample_interval_seconds": 10}
    return SelfHostedSpec.model_validate({"backends": {"gpu": backend}, **over})


class Recorder:
    def __init__(self) -> None:
        self.rates: list[CostRate] = []

    async def publish(self, rate: CostRate) -> None:
        self.rates.append(rate)

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_one_process_samples_every_other_reads_the_same_value(start_mock, tmp_path):
    base, _ = await start_mock()
    s = spec(f"{base}/metrics")
    k8s_a, k8s_b = Recorder(), Recorder()
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    a = CostRates(s, store=SQLiteRatePublisher(tmp_path / "db"), owner="pod-a",
                  sinks=[PrometheusGauges(reg_a)], sampler_sinks=[k8s_a])
    b = CostRates(s, store=SQLiteRatePublisher(tmp_path / "db"), owner="pod-b",
                  sinks=[PrometheusGauges(reg_b)], sampler_sinks=[k8s_b])
    sampled: list[str] = []
    for name, rates in (("a", a), ("b", b)):
        sampler = rates.samplers["gpu"]
        orig = sampler.sample

        async def counting(orig=orig, name=name) -> CostRate:
            sampled.append(name)
            return await orig()

        sampler.sample = counting  # type: ignore[method-assign]
    try:
        ra = await a.refresh("gpu")
        rb = await b.refresh("gpu")
        assert sampled == ["a"]  # pod-a holds the lease; pod-b only reads
        assert ra is not None and rb == ra
        assert a.current("gpu") == b.current("gpu") == ra
        assert len(k8s_a.rates) == 1 and k8s_b.rates == []  # one status writer, not one per pod
        for reg in (reg_a, reg_b):  # every process exports the fleet's value
            assert reg.get_sample_value("extproc_backend_cost_rate_usd_per_hour", {"backend": "gpu"}) == float(ra.usd_per_hour)
            assert reg.get_sample_value("extproc_backend_power_watts", {"backend": "gpu"}) == 60.0
            assert reg.get_sample_value("extproc_backend_cost_rate_tdp_fallback", {"backend": "gpu"}) == 0.0
        await a.refresh("gpu")
        await b.refresh("gpu")
        assert sampled == ["a", "a"]
    finally:
        await a.close()
        await b.close()


async def test_a_stale_rate_is_unknown_and_the_static_price_applies(start_mock, tmp_path):
    base, _ = await start_mock()
    clock = Clock()
    rates = CostRates(spec(f"{base}/metrics", header=True), wall=clock)
    try:
        r = await rates.refresh("gpu")
        assert r is not None and rates.current("gpu") == r
        assert rates.headers_for_backend("gpu")[0] == ("x-backend-cost-rate-usd-per-hour", "1.493378265")
        clock.now += 30  # 3 intervals of 10 s: still fresh
        assert rates.current("gpu") == r
        clock.now += 1
        assert rates.current("gpu") is None
        assert rates.price_for_model("llama") is None
        assert rates.headers_for_backend("gpu") == []
    finally:
        await rates.close()


async def test_headers_can_be_turned_off_and_unknown_backends_have_none(start_mock):
    base, _ = await start_mock()
    rates = CostRates(spec(f"{base}/metrics", header=False))
    try:
        await rates.refresh("gpu")
        assert rates.current("gpu") is not None
        assert rates.headers_for_backend("gpu") == []
        assert rates.headers_for_model("not-self-hosted") == []
        assert rates.current("nope") is None
    finally:
        await rates.close()


class DeadStore:
    async def publish(self, rate: CostRate) -> None:
        raise StoreUnavailable("down")

    async def read(self, backend: str) -> CostRate | None:
        raise StoreUnavailable("down")

    async def acquire(self, backend: str, owner: str, ttl_s: float) -> bool:
        raise StoreUnavailable("down")

    async def close(self) -> None:
        pass


async def test_store_down_means_every_process_samples_for_itself(start_mock):
    base, _ = await start_mock()
    rates = CostRates(spec(f"{base}/metrics"), store=DeadStore())
    try:
        r = await rates.refresh("gpu")
        assert r is not None and r.source == "dcgm"
        readers = CostRates(spec(f"{base}/metrics"), store=DeadStore(), sample=False)
        assert await readers.refresh("gpu") is None  # may not sample, cannot read: unknown
        await readers.close()
    finally:
        await rates.close()


async def test_a_failing_sink_does_not_stop_the_refresh(start_mock):
    class Broken(Recorder):
        async def publish(self, rate: CostRate) -> None:
            raise RuntimeError("boom")

    base, _ = await start_mock()
    ok = Recorder()
    rates = CostRates(spec(f"{base}/metrics"), sinks=[Broken(), ok])
    try:
        await rates.refresh("gpu")
        assert len(ok.rates) == 1 and ok.rates[0].power_watts == Decimal("60.000")
    finally:
        await rates.close()


async def test_background_loop_refreshes_every_backend(start_mock):
    base, _ = await start_mock()
    rates = CostRates(spec(f"{base}/metrics"))
    rates.start()
    try:
        for _ in range(500):
            if rates.current("gpu") is not None:
                break
            await asyncio.sleep(0.01)
        assert rates.current("gpu") is not None
    finally:
        await rates.close()
