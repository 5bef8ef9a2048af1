"""Where a cost rate goes: the interfaces, the Prometheus gauges, the response header.

    RateSink        publish(rate), close()            anything a rate is pushed to
    └── RatePublisher   + read(backend), acquire(...)  the shared store: every sidecar
                                                       reads the one value it holds

Implementations: ``store.RedisRatePublisher`` / ``store.SQLiteRatePublisher``
(the shared value), ``PrometheusGauges`` (scraped), ``k8s.KubernetesStatusPublisher``
(``InferenceService`` status). The response header is a pure function,
``response_headers(rate)``, for the ext_proc session to add.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.registry import REGISTRY

from .formula import CostRate

HEADER = "x-backend-cost-rate-usd-per-hour"
SOURCE_HEADER = "x-backend-cost-rate-source"


@runtime_checkable
class RateSink(Protocol):
    async def publish(self, rate: CostRate) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class RatePublisher(RateSink, Protocol):
    """The store every sidecar shares: one current rate per backend, plus a sampler lease.

    ``acquire(backend, owner, ttl_s)`` takes or renews the right to sample that
    backend for ``ttl_s`` seconds and returns whether ``owner`` holds it, so one
    process samples and the others read what it wrote.
    """

    async def read(self, backend: str) -> CostRate | None: ...

    async def acquire(self, backend: str, owner: str, ttl_s: float) -> bool: ...


def header_value(rate: CostRate) -> str:
    """``x-backend-cost-rate-usd-per-hour``: decimal USD, e.g. ``"1.27841"``."""
    return format(rate.usd_per_hour.normalize(), "f")


def response_headers(rate: CostRate | None) -> list[tuple[str, str]]:
    """Headers for a response served by a self-hosted backend; none while its rate is unknown.

    The source header says ``tdp_fallback`` when the power draw was not measured.
    """
    if rate is None:
        return []
    return [(HEADER, header_value(rate)), (SOURCE_HEADER, rate.source)]


class PrometheusGauges:
    """``extproc_backend_*`` gauges, one series per backend. Floats are fine here: the
    ledger never reads them. ``PrometheusGauges.default()`` in the service; a fresh
    ``CollectorRegistry`` in tests."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        labels = ["backend"]
        self.rate = Gauge(
            "extproc_backend_cost_rate_usd_per_hour", "Cost rate of a self-hosted backend (amortization + electricity)",
            labels, registry=registry,
        )
        self.power = Gauge("extproc_backend_power_watts", "Power draw used for the cost rate", labels, registry=registry)
        self.fallback = Gauge(
            "extproc_backend_cost_rate_tdp_fallback", "1 when the power draw is TDP x GPUs (metrics unreachable)",
            labels, registry=registry,
        )
        self.tokens = Gauge(
            "extproc_backend_tokens_per_hour", "Prompt + generation tokens per hour (vLLM counters)", labels,
            registry=registry,
        )
        self.price = Gauge(
            "extproc_backend_usd_per_million_tokens", "Per-token price derived from the cost rate", labels,
            registry=registry,
        )

    _default: PrometheusGauges | None = None

    @classmethod
    def default(cls) -> PrometheusGauges:
        """The gauges in the process-wide registry, created once (registering twice raises)."""
        if cls._default is None:
            cls._default = cls(REGISTRY)
        return cls._default

    async def publish(self, rate: CostRate) -> None:
        b = rate.backend
        self.rate.labels(b).set(float(rate.usd_per_hour))
        self.power.labels(b).set(float(rate.power_watts))
        self.fallback.labels(b).set(1 if rate.source == "tdp_fallback" else 0)
        self.tokens.labels(b).set(float(rate.tokens_per_hour or 0))
        self.price.labels(b).set(float("nan") if rate.usd_per_million_tokens is None else float(rate.usd_per_million_tokens))

    async def close(self) -> None:
        return None
