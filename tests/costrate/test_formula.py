"""The cost-rate formula to the last digit (DESIGN.md "Cost rate of self-hosted backends")."""

from __future__ import annotations

import decimal
from decimal import Decimal

import pytest

from extproc.costrate.formula import (
    CostRate,
    TokenMeter,
    amortization_usd_per_hour,
    cost_rate,
    electricity_usd_per_hour,
    nano_usd,
    tdp_watts,
    usd_per_million_tokens,
)

from .conftest import backend_spec

D = Decimal


def test_amortization_pays_the_yearly_maintenance_share_every_year_of_life():
    # 30000 x (1 + 0.10 x 3) / (3 x 8760) = 39000 / 26280
    got = amortization_usd_per_hour(D("30000"), D("0.10"), D("3"))
    assert got == decimal.Context(prec=40).divide(D(39000), D(26280))
    assert str(got) == "1.484018264840182648401826484018264840183"  # 40 significant digits
    # equivalently: the purchase spread over the life + the yearly share per hour
    assert abs(got - (D(30000) / D(26280) + D(3000) / D(8760))) < D("1e-25")
    assert amortization_usd_per_hour(D("8760"), D("0"), D("1")) == D(1)


def test_amortization_needs_positive_years():
    with pytest.raises(ValueError):
        amortization_usd_per_hour(D(1), D(0), D(0))


def test_electricity_is_kw_times_price_times_pue():
    # 700 W -> 0.7 kW x $0.12 x 1.3 = 0.1092 $/h, exactly
    assert electricity_usd_per_hour(D("700"), D("0.12"), D("1.3")) == D("0.1092")
    assert electricity_usd_per_hour(D("60.000"), D("0.12"), D("1.3")) == D("0.00936")
    assert electricity_usd_per_hour(D(0), D("0.12"), D("1.3")) == 0


def test_rate_from_measured_power_is_rounded_up_to_the_nano_dollar():
    rate = cost_rate("gpu", backend_spec(), power_watts=D("60.000"), tokens_per_hour=None, sampled_at=1.0)
    # 39000/26280 = 1.4840182648401826... + 0.00936 = 1.4933782648... -> ceiling at 9 decimals
    assert rate.usd_per_hour == D("1.493378265")
    assert rate.nano_usd_per_hour == 1_493_378_265
    assert rate.source == "dcgm" and rate.reason is None
    assert rate.power_watts == D("60.000")
    assert rate.electricity_usd_per_hour == D("0.00936")
    assert rate.tokens_per_hour is None and rate.usd_per_million_tokens is None and rate.price() is None


def test_tdp_fallback_uses_every_gpu_at_tdp_and_says_so():
    spec = backend_spec(gpu_count=8, purchase_price_usd="300000")
    assert tdp_watts(spec) == D(5600)
    rate = cost_rate("gpu", spec, power_watts=None, tokens_per_hour=None, sampled_at=0.0, reason="metrics down")
    # 300000 x 1.3 / 26280 = 14.840182648401826...; 5.6 kW x 0.12 x 1.3 = 0.8736
    assert rate.source == "tdp_fallback"
    assert rate.reason == "metrics down"
    assert rate.power_watts == D(5600)
    assert rate.usd_per_hour == D("15.713782649")
    no_reason = cost_rate("gpu", spec, power_watts=None, tokens_per_hour=None, sampled_at=0.0)
    assert no_reason.reason  # the fallback always says why


def test_per_token_price_is_rate_over_tokens_per_hour_rounded_up_to_a_pico_dollar():
    assert usd_per_million_tokens(D("1.5"), 3_000_000) == D("0.500000")
    # 1.265067763 x 1e6 / 7_000_000 = 0.180723966142857... -> 0.180724
    assert usd_per_million_tokens(D("1.265067763"), 7_000_000) == D("0.180724")
    assert usd_per_million_tokens(D("1"), 0) is None  # guard: idle backend, no price
    assert usd_per_million_tokens(D("1"), 0, floor=1_000_000) == D("1.000000")
    assert usd_per_million_tokens(D("1"), 4_000_000, floor=1_000_000) == D("0.250000")


def test_rate_prices_tokens_and_feeds_money_price_exactly():
    rate = cost_rate("gpu", backend_spec(), power_watts=D("700"), tokens_per_hour=2_000_000, sampled_at=5.0)
    # 1.4840182648... + 0.1092 = 1.5932182648... -> 1.593218265 $/h
    assert rate.usd_per_hour == D("1.593218265")
    assert rate.usd_per_million_tokens == D("0.796610")  # 1.593218265 / 2 = 0.7966091325, rounded up
    assert rate.pico_usd_per_token == 796_610
    price = rate.price()
    assert price is not None
    assert (price.input, price.output, price.cached_input, price.cache_write) == (796_610,) * 4
    # 1M tokens cost the per-million price, in nano-USD
    assert price.cost(input_tokens=500_000, output_tokens=500_000) == 796_610_000


def test_min_tokens_per_hour_is_a_floor_for_pricing_only():
    spec = backend_spec(min_tokens_per_hour=10_000_000)
    rate = cost_rate("gpu", spec, power_watts=D("700"), tokens_per_hour=0, sampled_at=0.0)
    assert rate.tokens_per_hour == 0
    assert rate.usd_per_million_tokens == D("0.159322")  # 1.593218265 / 10, rounded up


def test_json_round_trip_is_exact():
    rate = cost_rate("gpu", backend_spec(), power_watts=D("123.456"), tokens_per_hour=42, sampled_at=1700000000.25)
    back = CostRate.from_json(rate.to_json())
    assert back == rate
    with pytest.raises(ValueError):
        CostRate.from_json({**rate.to_json(), "source": "guess"})


def test_nano_usd_rounds_up():
    assert nano_usd(D("0.0000000011")) == 2
    assert nano_usd(D("1.5")) == 1_500_000_000


class TestTokenMeter:
    def test_needs_two_points(self):
        m = TokenMeter(60)
        assert m.observe(D(100), 0.0) is None
        assert m.observe(D(100), 0.0) is None  # no time passed
        assert m.observe(D(160), 10.0) == 21_600  # 60 tokens in 10 s -> 21600/h

    def test_average_over_the_window(self):
        m = TokenMeter(30)
        m.observe(D(0), 0.0)
        m.observe(D(1000), 10.0)
        m.observe(D(1000), 20.0)
        assert m.observe(D(1000), 30.0) == 120_000  # 1000 tokens over the 30 s window
        # 10 s later the oldest point slides out: 0 new tokens since t=10
        assert m.observe(D(1000), 40.0) == 0

    def test_counter_reset_restarts_the_history(self):
        m = TokenMeter(300)
        m.observe(D(5000), 0.0)
        assert m.observe(D(6000), 10.0) == 360_000
        assert m.observe(D(10), 20.0) is None  # backend restarted
        assert m.observe(D(40), 30.0) == 10_800

    def test_rounds_down(self):
        m = TokenMeter(300)
        m.observe(D(0), 0.0)
        assert m.observe(D(1), 7.0) == 514  # 514.28…

    def test_window_must_be_positive(self):
        with pytest.raises(ValueError):
            TokenMeter(0)
