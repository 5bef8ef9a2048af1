"""Cost rates of self-hosted backends: what a GPU backend costs per hour and per token.

DESIGN.md "Cost rate of self-hosted backends". Layers, lowest first:

    formula      amortization + electricity, per-token price, TokenMeter (pure, Decimal)
    prometheus   the text exposition parser (sans-IO)
    sampler      aiohttp GET of the DCGM / vLLM /metrics -> CostRate (TDP fallback)
    publish      RateSink / RatePublisher interfaces, Prometheus gauges, response header
    store        the shared rate: Redis key or SQLite row, plus a sampler lease
    k8s          InferenceService status.costRatePerHour (optional)
    service      CostRates: refresh loop, one value fleet-wide, lookups without I/O

``python -m extproc.costrate`` runs the loop stand-alone (compose demo).
"""

from .formula import (
    CostRate,
    TokenMeter,
    amortization_usd_per_hour,
    cost_rate,
    electricity_usd_per_hour,
    usd_per_million_tokens,
)
from .publish import (
    HEADER,
    SOURCE_HEADER,
    PrometheusGauges,
    RatePublisher,
    RateSink,
    header_value,
    response_headers,
)
from .sampler import Sampler
from .service import CostRates
from .store import RedisRatePublisher, SQLiteRatePublisher, open_rate_publisher

__all__ = [
    "HEADER",
    "SOURCE_HEADER",
    "CostRate",
    "CostRates",
    "PrometheusGauges",
    "RatePublisher",
    "RateSink",
    "RedisRatePublisher",
    "SQLiteRatePublisher",
    "Sampler",
    "TokenMeter",
    "amortization_usd_per_hour",
    "cost_rate",
    "electricity_usd_per_hour",
    "header_value",
    "open_rate_publisher",
    "response_headers",
    "usd_per_million_tokens",
]
