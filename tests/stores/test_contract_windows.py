"""Store contract: windows. Calendar buckets by period key; rolling windows slide
exactly (a charge settled at t counts in (t, t + window)) and refusals say
exactly when the request would fit."""

from __future__ import annotations

from extproc.stores.base import Mode
from tests.stores.helpers import NOW, calendar, entries, mode, rolling, spent_reserved, state, take

D1, D2 = "2026-01-01@UTC", "2026-01-02@UTC"


async def test_calendar_periods_are_separate_buckets(store, tag):
    assert (await take(store, tag, "a", [calendar("day", 100, 80, D1)])).ok
    await store.settle(tag, "a", {"cost": 80}, now_ms=NOW)
    r = await take(store, tag, "b", [calendar("day", 100, 30, D1)])
    assert not r.ok and r.retry_after_ms is None
    r = await take(store, tag, "c", [calendar("day", 100, 30, D2)])
    assert r.ok and r.states[0].spent == 0
    assert await spent_reserved(store, tag, calendar("day", 100, 0, D1)) == (80, 30)  # in flight counts in any period


async def test_calendar_charge_lands_in_the_period_it_was_reserved_in(store, tag):
    assert (await take(store, tag, "a", [calendar("day", 100, 50, D1)])).ok
    await store.settle(tag, "a", {"cost": 40}, now_ms=NOW + 86_400_000)
    assert await spent_reserved(store, tag, calendar("day", 100, 0, D1)) == (40, 0)
    assert await spent_reserved(store, tag, calendar("day", 100, 0, D2)) == (0, 0)


async def _charge(store, tag, rid, amount, at, window_ms=60_000, limit=100):
    r = await take(store, tag, rid, [rolling("rw", limit, amount, window_ms)], at)
    assert r.ok, r
    await store.settle(tag, rid, {"cost": amount}, now_ms=at)


async def test_rolling_window_slides_exactly(store, tag):
    line = rolling("rw", 100)
    await _charge(store, tag, "a", 40, NOW)
    await _charge(store, tag, "b", 30, NOW + 10_000)
    await _charge(store, tag, "c", 20, NOW + 20_000)
    expected = {
        NOW + 20_000: 90,
        NOW + 59_999: 90,
        NOW + 60_000: 50,  # the charge at NOW leaves exactly one window later
        NOW + 69_999: 50,
        NOW + 70_000: 20,
        NOW + 80_000: 0,
    }
    for at, spent in expected.items():
        assert (await state(store, tag, line, at)).spent == spent, at


async def test_rolling_retry_after_is_exact(store, tag):
    await _charge(store, tag, "a", 40, NOW)
    await _charge(store, tag, "b", 30, NOW + 10_000)
    await _charge(store, tag, "c", 20, NOW + 20_000)
    # 90 spent, 50 asked: 40 must leave, which happens when the first charge does.
    r = await take(store, tag, "x1", [rolling("rw", 100, 50)], NOW + 30_000)
    assert not r.ok and r.retry_after_ms == 30_000
    r = await take(store, tag, "x2", [rolling("rw", 100, 50)], NOW + 59_999)
    assert not r.ok and r.retry_after_ms == 1
    assert (await take(store, tag, "x3", [rolling("rw", 100, 50)], NOW + 60_000)).ok
    # 50 spent + 50 reserved: 75 more needs 75 gone, only 50 can leave -> waiting alone cannot help
    r = await take(store, tag, "x4", [rolling("rw", 100, 75)], NOW + 60_000)
    assert not r.ok and r.retry_after_ms is None
    await store.release(tag, "x3", now_ms=NOW + 60_000)
    # 50 spent (30 @+10s, 20 @+20s): 75 asked needs 25 gone -> the 30 leaves at +70s
    r = await take(store, tag, "x5", [rolling("rw", 100, 75)], NOW + 60_000)
    assert not r.ok and r.retry_after_ms == 10_000
    # 95 asked needs 45 gone -> both -> at +80s
    r = await take(store, tag, "x6", [rolling("rw", 100, 95)], NOW + 60_000)
    assert not r.ok and r.retry_after_ms == 20_000


async def test_rolling_request_larger_than_the_limit_never_fits(store, tag):
    r = await take(store, tag, "x", [rolling("rw", 100, 101)], NOW)
    assert not r.ok and r.retry_after_ms is None


async def test_rolling_retry_after_respects_the_mode(store, tag):
    await _charge(store, tag, "a", 60, NOW, limit=1000)
    await _charge(store, tag, "b", 60, NOW + 10_000, limit=1000)
    # actuals_only: blocked while spent >= limit; frees once spent < limit
    r = await take(store, tag, "x", [mode(rolling("rw", 100, 1), Mode.ACTUALS_ONLY)], NOW + 20_000)
    assert not r.ok and r.retry_after_ms == 40_000  # 120 spent, limit 100: the first 60 must go
    # soft_gate with margin 20: 120 + 10 > 100 + 20, 10 must go -> first charge
    r = await take(store, tag, "y", [mode(rolling("rw", 100, 10), Mode.SOFT_GATE, margin=20)], NOW + 20_000)
    assert not r.ok and r.retry_after_ms == 40_000


async def test_rolling_charges_are_ledgered(store, tag):
    await _charge(store, tag, "a", 40, NOW)
    (e,) = await entries(store, tag, "a")
    assert e.charged == {"cost": 40} and e.closed_at_ms == NOW
