"""Store contract: enforcement modes per line."""

from __future__ import annotations

from extproc.stores.base import Mode
from tests.stores.helpers import NOW, cost, mode, spent_reserved, take


async def test_hard_gate_boundary_is_exact(store, tag):
    assert (await take(store, tag, "a", [cost("k", 100, 60)])).ok
    assert not (await take(store, tag, "b", [cost("k", 100, 41)])).ok
    r = await take(store, tag, "c", [cost("k", 100, 40)])
    assert r.ok and r.states[0].remaining == 0


async def test_advisory_warns_and_never_blocks(store, tag):
    adv = mode(cost("k", 10), Mode.ADVISORY)
    r = await take(store, tag, "a", [mode(cost("k", 10, 50), Mode.ADVISORY)])
    assert r.ok and r.warned == (0,) and r.blocked is None
    await store.settle(tag, "a", {"cost": 50}, now_ms=NOW)
    r = await take(store, tag, "b", [mode(cost("k", 10, 1_000), Mode.ADVISORY)])
    assert r.ok and r.warned == (0,)
    r = await take(store, tag, "c", [mode(cost("k", 10_000, 1), Mode.ADVISORY)])
    assert r.ok and r.warned == ()  # fits under a higher limit: no warning
    assert await spent_reserved(store, tag, adv) == (50, 1_001)


async def test_advisory_line_does_not_hide_a_blocking_one(store, tag):
    r = await take(store, tag, "a", [mode(cost("adv", 10, 50), Mode.ADVISORY), cost("hard", 40, 50)])
    assert not r.ok and r.blocked == 1 and r.warned == (0,)
    r = await take(store, tag, "b", [mode(cost("adv", 10, 30), Mode.ADVISORY), cost("hard", 40, 30)])
    assert r.ok and r.warned == (0,)


async def test_actuals_only_blocks_on_settled_spend_only(store, tag):
    line = lambda amount: mode(cost("k", 100, amount), Mode.ACTUALS_ONLY)  # noqa: E731
    assert (await take(store, tag, "a", [line(80)])).ok
    assert (await take(store, tag, "b", [line(80)])).ok  # estimates are not trusted: reserved may pass the limit
    await store.settle(tag, "a", {"cost": 60}, now_ms=NOW)
    assert (await take(store, tag, "c", [line(1_000)])).ok  # 60 < 100
    await store.settle(tag, "b", {"cost": 40}, now_ms=NOW)
    r = await take(store, tag, "d", [line(1)])
    assert not r.ok and r.blocked == 0 and r.states[0].spent == 100


async def test_soft_gate_allows_the_margin(store, tag):
    line = lambda amount: mode(cost("k", 100, amount), Mode.SOFT_GATE, margin=10)  # noqa: E731
    assert (await take(store, tag, "a", [line(70)])).ok
    assert (await take(store, tag, "b", [line(40)])).ok  # 110 <= 100 + 10
    r = await take(store, tag, "c", [line(1)])
    assert not r.ok and r.blocked == 0 and r.states[0].remaining == -10
