"""Policy section for self-hosted backends: what their GPUs cost to own and run.

A backend marked self-hosted has no list price. Its cost per hour is
amortization + electricity (DESIGN.md "Cost rate of self-hosted backends"),
sampled from its DCGM exporter; the models it serves may be priced from that
rate instead of a static price. The section, in a policy file::

    self_hosted:
      backends:
        mock-gpu:                               # the Envoy cluster the models route to
          gpu_model: "NVIDIA H100 80GB HBM3"
          gpu_count: 1
          purchase_price_usd: "30000"           # all of the backend's hardware
          amortization_years: 3
          yearly_maintenance_share: "0.10"
          tdp_watts: 700                        # per GPU, used when DCGM is unreachable
          usd_per_kwh: "0.12"
          pue: "1.3"
          metrics_url: http://mock-gpu:8000/metrics
          models: [llama-3.1-8b]                # priced from the rate
          min_tokens_per_hour: 1000000          # price floor when idle (optional)

Money and physical figures are decimal strings or integers (never floats), kept
as ``Decimal``; ``extproc.costrate`` does the arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_DECIMAL = re.compile(r"^\d+(\.\d+)?$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._|:-]*$"
_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _exact(v: object) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (str, int, Decimal)):
        raise ValueError('write this as a decimal string such as "0.12" or an integer (floats are not exact)')
    s = str(v)
    if not _DECIMAL.match(s):
        raise ValueError(f"{s!r} is not a non-negative decimal number")
    return Decimal(s)


ExactDecimal = Annotated[Decimal, BeforeValidator(_exact)]
"""A non-negative decimal written as a string or an integer, never a float."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InferenceServiceRef(_Frozen):
    """The KServe ``InferenceService`` whose ``status.costRatePerHour`` gets the rate."""

    namespace: str = Field(pattern=_K8S_NAME, max_length=63)
    name: str = Field(pattern=_K8S_NAME, max_length=253)


class SelfHostedBackend(_Frozen):
    """One self-hosted backend: its hardware, its energy price, where its metrics are."""

    gpu_model: str = Field(min_length=1, max_length=128)
    gpu_count: int = Field(gt=0, le=4096)
    purchase_price_usd: ExactDecimal = Field(description="purchase price of all the backend's hardware, USD")
    amortization_years: ExactDecimal = Field(description="years over which the purchase is written off")
    yearly_maintenance_share: ExactDecimal = Field(
        Decimal("0"), description="maintenance as a share of the purchase price, e.g. 0.10"
    )
    tdp_watts: ExactDecimal = Field(description="thermal design power of ONE GPU, the fallback power draw")
    usd_per_kwh: ExactDecimal
    pue: ExactDecimal = Field(Decimal("1.0"), description="power usage effectiveness of the facility (>= 1)")
    metrics_url: str | None = Field(
        None, description="DCGM exporter /metrics; unset = always price at TDP x GPUs (source tdp_fallback)"
    )
    token_metrics_url: str | None = Field(
        None, description="vLLM /metrics with the token counters; default: metrics_url"
    )
    sample_interval_seconds: int = Field(15, ge=1, le=3600)
    token_window_seconds: int = Field(300, ge=1, le=86400, description="window of the tokens-per-hour average")
    min_tokens_per_hour: int = Field(
        0, ge=0, description="throughput floor for per-token pricing; 0 = unpriced while idle"
    )
    models: tuple[str, ...] = Field((), description="models served here and priced from the cost rate")
    inference_service: InferenceServiceRef | None = None

    @field_validator("metrics_url", "token_metrics_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    @model_validator(mode="after")
    def _check(self) -> SelfHostedBackend:
        if self.amortization_years <= 0:
            raise ValueError("amortization_years must be > 0")
        if self.amortization_years > 50:
            raise ValueError("amortization_years must be <= 50")
        if self.yearly_maintenance_share > 10:
            raise ValueError("yearly_maintenance_share must be <= 10 (a share, not a percentage)")
        if self.tdp_watts <= 0 or self.tdp_watts > 10_000:
            raise ValueError("tdp_watts must be > 0 and <= 10000 (per GPU)")
        if not Decimal(1) <= self.pue <= Decimal(5):
            raise ValueError("pue must be between 1 and 5")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models are listed twice")
        return self

    @property
    def token_url(self) -> str | None:
        return self.token_metrics_url or self.metrics_url


class SelfHostedSpec(_Frozen):
    """``self_hosted:`` in a policy: the backends whose price comes from their cost rate."""

    backends: dict[Annotated[str, Field(pattern=_NAME, max_length=253)], SelfHostedBackend] = {}
    header: bool = Field(True, description="add x-backend-cost-rate-usd-per-hour to responses of these backends")
    kubernetes_status: bool = Field(
        False, description="patch status.costRatePerHour of each backend's inference_service"
    )

    @model_validator(mode="after")
    def _check(self) -> SelfHostedSpec:
        seen: dict[str, str] = {}
        for name, b in self.backends.items():
            for m in b.models:
                if m in seen:
                    raise ValueError(f"model {m!r} is served by both {seen[m]!r} and {name!r}")
                seen[m] = name
            if self.kubernetes_status and b.inference_service is None:
                raise ValueError(f"kubernetes_status is on but backend {name!r} names no inference_service")
        return self

    @property
    def backend_of_model(self) -> dict[str, str]:
        """model -> the self-hosted backend whose rate prices it."""
        return {m: name for name, b in self.backends.items() for m in b.models}

    def check_models_priced(self, priced: Iterable[str]) -> None:
        """Every rate-priced model must also have a static price in ``prices.models``:
        it is charged until the first rate arrives and whenever the rate is unknown
        (DESIGN.md: an unknown price refuses, fail closed). For ``Policy._check``."""
        known = set(priced)
        missing = sorted(m for m in self.backend_of_model if m not in known)
        if missing:
            raise ValueError(
                f"self-hosted model(s) {', '.join(map(repr, missing))} need a static price in prices.models "
                "(used until the first cost rate arrives)"
            )
