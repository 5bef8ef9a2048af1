"""The cost rate of a self-hosted backend, in exact decimal arithmetic. No I/O.

DESIGN.md "Cost rate of self-hosted backends"::

    cost_rate_usd_per_hour = amortization + electricity
    amortization = purchase price x (1 + yearly maintenance share x years) / (years x 8760)
    electricity  = sum(DCGM_FI_DEV_POWER_USAGE) W / 1000 x $/kWh x PUE
                   (TDP x GPUs when the metrics are unreachable: source "tdp_fallback")
    usd_per_million_tokens = cost_rate_usd_per_hour x 10^6 / tokens per hour

Every figure is a ``Decimal`` computed at 40 significant digits; where a figure
feeds budgets it is rounded *up* (never under-charge) to integer units the
ledger uses: nano-USD per hour, and per-million-token prices with at most 6
decimals (pico-USD per token, what ``money.Price`` holds).
"""

from __future__ import annotations

import decimal
from collections import deque
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Literal

from ..money import NANO_PER_USD, Price
from ..policy.selfhosted import SelfHostedBackend

HOURS_PER_YEAR = 8760
_CTX = decimal.Context(prec=40)
_NANO = Decimal(1).scaleb(-9)
_MICRO = Decimal(1).scaleb(-6)
_MILLION = Decimal(10**6)

Source = Literal["dcgm", "tdp_fallback"]


def amortization_usd_per_hour(purchase_price_usd: Decimal, yearly_maintenance_share: Decimal, years: Decimal) -> Decimal:
    """purchase price x (1 + yearly maintenance share x years) / (years x 8760).

    Maintenance is a *yearly* share of the purchase price, so a life of N years
    pays it N times. DESIGN.md writes (1 + share), which charges it once over
    the whole life: for 3 years that under-prices maintenance threefold.
    """
    if years <= 0:
        raise ValueError("amortization years must be > 0")
    num = _CTX.multiply(purchase_price_usd, _CTX.add(Decimal(1), _CTX.multiply(yearly_maintenance_share, years)))
    return _CTX.divide(num, _CTX.multiply(years, Decimal(HOURS_PER_YEAR)))


def electricity_usd_per_hour(power_watts: Decimal, usd_per_kwh: Decimal, pue: Decimal) -> Decimal:
    """W / 1000 x $/kWh x PUE: what one hour at this draw costs, facility overhead included."""
    kw = _CTX.divide(power_watts, Decimal(1000))
    return _CTX.multiply(_CTX.multiply(kw, usd_per_kwh), pue)


def tdp_watts(spec: SelfHostedBackend) -> Decimal:
    """The fallback draw: every GPU at its thermal design power (an upper bound)."""
    return _CTX.multiply(spec.tdp_watts, Decimal(spec.gpu_count))


def usd_per_million_tokens(usd_per_hour: Decimal, tokens_per_hour: int, *, floor: int = 0) -> Decimal | None:
    """rate x 10^6 / max(tokens per hour, floor), rounded up to 6 decimals; None when both are 0."""
    tph = max(tokens_per_hour, floor)
    if tph <= 0:
        return None
    exact = _CTX.divide(_CTX.multiply(usd_per_hour, _MILLION), Decimal(tph))
    return exact.quantize(_MICRO, rounding=ROUND_CEILING)


@dataclass(frozen=True, slots=True)
class CostRate:
    """One sample of a backend's cost rate.

    usd_per_hour: amortization + electricity, rounded up to the nano-dollar.
    source: "dcgm" when the power came from DCGM_FI_DEV_POWER_USAGE, "tdp_fallback"
        when the metrics were unreachable or had no power samples (``reason`` says why).
    power_watts: the draw the electricity term used (sum over GPUs).
    tokens_per_hour: prompt + generation tokens from the vLLM counters, averaged over
        the sampler's window; None until two samples exist or when the counters are missing.
    usd_per_million_tokens: the per-token price budgets may use (None: unpriced).
    sampled_at: wall-clock seconds (epoch) of the sample.
    """

    backend: str
    usd_per_hour: Decimal
    source: Source
    power_watts: Decimal
    amortization_usd_per_hour: Decimal
    electricity_usd_per_hour: Decimal
    tokens_per_hour: int | None
    usd_per_million_tokens: Decimal | None
    sampled_at: float
    reason: str | None = None

    @property
    def nano_usd_per_hour(self) -> int:
        """The rate as integer nano-USD per hour (exact: usd_per_hour has 9 decimals)."""
        return int(self.usd_per_hour.scaleb(9))

    @property
    def pico_usd_per_token(self) -> int | None:
        """The per-token price in pico-USD (1e-12), the unit of ``money.Price``."""
        if self.usd_per_million_tokens is None:
            return None
        return int(self.usd_per_million_tokens.scaleb(6))

    def price(self) -> Price | None:
        """The same price for every token kind: GPU time is spent on input and output alike."""
        p = self.usd_per_million_tokens
        return None if p is None else Price.per_million(p, p, p, p)

    def to_json(self) -> dict[str, object]:
        """A JSON-safe dict: Decimals as strings, so a round trip is exact."""
        return {
            "backend": self.backend,
            "usd_per_hour": str(self.usd_per_hour),
            "source": self.source,
            "power_watts": str(self.power_watts),
            "amortization_usd_per_hour": str(self.amortization_usd_per_hour),
            "electricity_usd_per_hour": str(self.electricity_usd_per_hour),
            "tokens_per_hour": self.tokens_per_hour,
            "usd_per_million_tokens": None if self.usd_per_million_tokens is None else str(self.usd_per_million_tokens),
            "sampled_at": self.sampled_at,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> CostRate:
        upm = d.get("usd_per_million_tokens")
        tph = d.get("tokens_per_hour")
        source = d["source"]
        if source not in ("dcgm", "tdp_fallback"):
            raise ValueError(f"unknown cost rate source {source!r}")
        return cls(
            backend=str(d["backend"]),
            usd_per_hour=Decimal(str(d["usd_per_hour"])),
            source=source,
            power_watts=Decimal(str(d["power_watts"])),
            amortization_usd_per_hour=Decimal(str(d["amortization_usd_per_hour"])),
            electricity_usd_per_hour=Decimal(str(d["electricity_usd_per_hour"])),
            tokens_per_hour=None if tph is None else int(str(tph)),
            usd_per_million_tokens=None if upm is None else Decimal(str(upm)),
            sampled_at=float(str(d["sampled_at"])),
            reason=None if d.get("reason") is None else str(d["reason"]),
        )


def cost_rate(
    backend: str,
    spec: SelfHostedBackend,
    *,
    power_watts: Decimal | None,
    tokens_per_hour: int | None,
    sampled_at: float,
    reason: str | None = None,
) -> CostRate:
    """The rate for a measured draw, or for TDP x GPUs when ``power_watts`` is None."""
    source: Source = "dcgm"
    if power_watts is None:
        source, power_watts = "tdp_fallback", tdp_watts(spec)
        reason = reason or "no power measurement"
    amort = amortization_usd_per_hour(spec.purchase_price_usd, spec.yearly_maintenance_share, spec.amortization_years)
    elec = electricity_usd_per_hour(power_watts, spec.usd_per_kwh, spec.pue)
    total = _CTX.add(amort, elec).quantize(_NANO, rounding=ROUND_CEILING)
    upm = usd_per_million_tokens(total, tokens_per_hour or 0, floor=spec.min_tokens_per_hour)
    return CostRate(
        backend=backend,
        usd_per_hour=total,
        source=source,
        power_watts=power_watts,
        amortization_usd_per_hour=amort,
        electricity_usd_per_hour=elec,
        tokens_per_hour=tokens_per_hour,
        usd_per_million_tokens=upm,
        sampled_at=sampled_at,
        reason=reason if source == "tdp_fallback" else None,
    )


class TokenMeter:
    """Tokens per hour from a monotonic counter, averaged over a sliding window.

    Feed it ``observe(total, now)`` with the counter's current value (prompt +
    generation tokens) and a monotonic time. A counter that goes down means the
    backend restarted: the history restarts from that value (Prometheus ``rate``
    semantics). Rounded down, so a per-token price derived from it rounds up.
    """

    def __init__(self, window_s: float = 300.0) -> None:
        if window_s <= 0:
            raise ValueError("window must be > 0")
        self.window_s = window_s
        self._points: deque[tuple[float, Decimal]] = deque()

    def observe(self, total: Decimal, now: float) -> int | None:
        pts = self._points
        if pts and total < pts[-1][1]:
            pts.clear()  # counter reset: the backend restarted
        pts.append((now, total))
        # keep one point at or before the window's start so the average spans the window
        while len(pts) > 2 and pts[1][0] <= now - self.window_s:
            pts.popleft()
        return self.tokens_per_hour()

    def tokens_per_hour(self) -> int | None:
        pts = self._points
        if len(pts) < 2:
            return None
        (t0, v0), (t1, v1) = pts[0], pts[-1]
        dt = Decimal(repr(t1 - t0))
        if dt <= 0:
            return None
        per_hour = _CTX.divide(_CTX.multiply(v1 - v0, Decimal(3600)), dt)
        return int(per_hour.to_integral_value(rounding=ROUND_FLOOR))


def nano_usd(usd: Decimal) -> int:
    """USD -> integer nano-USD, rounded up."""
    return int(_CTX.multiply(usd, Decimal(NANO_PER_USD)).to_integral_value(rounding=ROUND_CEILING))
