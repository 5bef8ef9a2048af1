"""Store contract, part 1: reserve/settle/release on total-window counters."""

from __future__ import annotations

import asyncio

from extproc.stores.base import Kind, Line, Outcome

NOW = 1_700_000_000_000


def cost(key: str, limit: int, amount: int, **kw) -> Line:
    return Line(key=key, kind=Kind.COUNTER, dimension="cost", limit=limit, amount=amount, **kw)


async def test_reserve_fits_and_settles_actual(store, tag):
    r = await store.reserve(tag, "r1", [cost("k", 100, 30)], now_ms=NOW, ttl_ms=60_000, meta={"estimate": {"cost": 30}})
    assert r.ok and r.states[0].reserved == 30 and r.states[0].spent == 0
    s = await store.settle(tag, "r1", {"cost": 12}, now_ms=NOW + 1)
    assert s.outcome is Outcome.SETTLED and s.charged == {"cost": 12}
    (st,) = await store.snapshot([cost("k", 100, 0)], tag=tag, now_ms=NOW + 2)
    assert (st.spent, st.reserved, st.limit) == (12, 0, 100)


async def test_all_or_nothing_across_lines(store, tag):
    ok = await store.reserve(tag, "a", [cost("team", 100, 60)], now_ms=NOW, ttl_ms=60_000, meta={})
    assert ok.ok
    r = await store.reserve(tag, "b", [cost("key", 1000, 50), cost("team", 100, 50)], now_ms=NOW, ttl_ms=60_000, meta={})
    assert not r.ok and r.blocked == 1
    st = await store.snapshot([cost("key", 1000, 0), cost("team", 100, 0)], tag=tag, now_ms=NOW)
    assert st[0].reserved == 0 and st[1].reserved == 60


async def test_concurrent_reserves_never_exceed_limit(store, tag):
    async def one(i: int):
        return await store.reserve(tag, f"c{i}", [cost("k", 1000, 90)], now_ms=NOW, ttl_ms=60_000, meta={})

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(r.ok for r in results) == 11
    (st,) = await store.snapshot([cost("k", 1000, 0)], tag=tag, now_ms=NOW)
    assert st.reserved == 990 and st.spent + st.reserved <= st.limit


async def test_transitions_are_idempotent(store, tag):
    line = [cost("k", 100, 40)]
    first = await store.reserve(tag, "r", line, now_ms=NOW, ttl_ms=60_000, meta={})
    again = await store.reserve(tag, "r", line, now_ms=NOW, ttl_ms=60_000, meta={})
    assert first.ok and again.ok and again.replayed
    (st,) = await store.snapshot(line, tag=tag, now_ms=NOW)
    assert st.reserved == 40
    s1 = await store.settle(tag, "r", {"cost": 10}, now_ms=NOW)
    s2 = await store.settle(tag, "r", {"cost": 99}, now_ms=NOW)
    rel = await store.release(tag, "r", now_ms=NOW)
    assert s1.outcome is s2.outcome is rel.outcome is Outcome.SETTLED
    assert s2.replayed and s2.charged == {"cost": 10}
    (st,) = await store.snapshot(line, tag=tag, now_ms=NOW)
    assert (st.spent, st.reserved) == (10, 0)
    assert len([e for e in await store.ledger() if (e.tag, e.reservation_id) == (tag, "r")]) == 1


async def test_release_charges_nothing(store, tag):
    await store.reserve(tag, "r", [cost("k", 100, 40)], now_ms=NOW, ttl_ms=60_000, meta={})
    rel = await store.release(tag, "r", now_ms=NOW)
    assert rel.outcome is Outcome.RELEASED
    (st,) = await store.snapshot([cost("k", 100, 0)], tag=tag, now_ms=NOW)
    assert (st.spent, st.reserved) == (0, 0)


async def test_expiry_charges_reserved_amount(store, tag):
    await store.reserve(tag, "r", [cost("k", 100, 40)], now_ms=NOW, ttl_ms=1000, meta={"estimate": {"cost": 40}})
    assert await store.expire(now_ms=NOW + 999) == 0
    assert await store.expire(now_ms=NOW + 1000) >= 1
    (st,) = await store.snapshot([cost("k", 100, 0)], tag=tag, now_ms=NOW)
    assert (st.spent, st.reserved) == (40, 0)
    late = await store.settle(tag, "r", {"cost": 1}, now_ms=NOW + 2000)
    assert late.outcome is Outcome.EXPIRED and late.replayed
    (entry,) = [e for e in await store.ledger() if (e.tag, e.reservation_id) == (tag, "r")]
    assert entry.outcome is Outcome.EXPIRED and entry.charged == {"cost": 40}


async def test_big_amounts_stay_exact(store, tag):
    limit = 2**53 - 1
    await store.reserve(tag, "r", [cost("k", limit, limit - 7)], now_ms=NOW, ttl_ms=60_000, meta={})
    await store.settle(tag, "r", {"cost": limit - 8}, now_ms=NOW)
    (st,) = await store.snapshot([cost("k", limit, 0)], tag=tag, now_ms=NOW)
    assert st.spent == limit - 8 and st.reserved == 0
