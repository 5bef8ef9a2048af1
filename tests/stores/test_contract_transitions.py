"""Store contract: reserve -> settle | release | expire, each idempotent; refusals replayed, never ledgered."""

from __future__ import annotations

from extproc.stores.base import CLOSED_MEMORY_MS, REFUSAL_MEMORY_MS, Outcome
from tests.stores.helpers import NOW, TTL, cost, entries, spent_reserved, take

K = cost("k", 100)


async def test_settle_then_everything_replays_settled(store, tag):
    assert (await take(store, tag, "r", [cost("k", 100, 40)])).ok
    first = await store.settle(tag, "r", {"cost": 30}, now_ms=NOW + 1)
    assert (first.outcome, first.charged, first.replayed, first.found) == (Outcome.SETTLED, {"cost": 30}, False, True)
    for again in (
        await store.settle(tag, "r", {"cost": 99}, now_ms=NOW + 2),
        await store.release(tag, "r", now_ms=NOW + 3),
    ):
        assert (again.outcome, again.charged, again.replayed) == (Outcome.SETTLED, {"cost": 30}, True)
    assert await store.expire(now_ms=NOW + TTL + 1) == 0
    replay = await take(store, tag, "r", [cost("k", 100, 40)], NOW + 4)
    assert replay.ok and replay.replayed and replay.states[0].reserved == 40  # the first outcome, verbatim
    assert await spent_reserved(store, tag, K) == (30, 0)
    assert len(await entries(store, tag, "r")) == 1


async def test_release_then_settle_replays_released(store, tag):
    assert (await take(store, tag, "r", [cost("k", 100, 40)])).ok
    rel = await store.release(tag, "r", now_ms=NOW)
    assert (rel.outcome, rel.charged) == (Outcome.RELEASED, {})
    late = await store.settle(tag, "r", {"cost": 10}, now_ms=NOW)
    assert (late.outcome, late.replayed, late.charged) == (Outcome.RELEASED, True, {})
    assert await spent_reserved(store, tag, K) == (0, 0)
    (e,) = await entries(store, tag, "r")
    assert e.outcome is Outcome.RELEASED and e.charged == {}


async def test_expire_charges_the_estimate_at_the_ttl(store, tag):
    meta = {"estimate": {"cost": 40, "input_tokens": 7}}
    assert (await take(store, tag, "r", [cost("k", 100, 40)], ttl=5_000, meta=meta)).ok
    assert await store.expire(now_ms=NOW + 4_999) == 0
    assert await store.expire(now_ms=NOW + 5_000) == 1
    assert await spent_reserved(store, tag, K) == (40, 0)
    late = await store.settle(tag, "r", {"cost": 1}, now_ms=NOW + 6_000)
    assert (late.outcome, late.replayed) == (Outcome.EXPIRED, True)
    (e,) = await entries(store, tag, "r")
    assert e.outcome is Outcome.EXPIRED and e.charged == {"cost": 40, "input_tokens": 7, "total_tokens": 7}
    assert e.reserved == e.charged and e.closed_at_ms == NOW + 5_000


async def test_expire_without_an_estimate_charges_the_lines(store, tag):
    assert (await take(store, tag, "r", [cost("k", 100, 40)], ttl=5_000)).ok
    assert await store.expire(now_ms=NOW + 5_000) == 1
    (e,) = await entries(store, tag, "r")
    assert e.charged == {"cost": 40}


async def test_expire_honours_its_batch_limit(store, tag):
    for i in range(5):
        assert (await take(store, tag, f"r{i}", [cost("k", 100, 10)], ttl=1_000)).ok
    assert await store.expire(now_ms=NOW + 1_000, limit=3) == 3
    assert await store.expire(now_ms=NOW + 1_000, limit=3) == 2
    assert await spent_reserved(store, tag, K) == (50, 0)


async def test_settle_may_exceed_the_reservation_and_it_is_recorded(store, tag):
    assert (await take(store, tag, "r", [cost("k", 100, 90)])).ok
    await store.settle(tag, "r", {"cost": 130}, now_ms=NOW)
    assert await spent_reserved(store, tag, K) == (130, 0)
    r = await take(store, tag, "next", [cost("k", 100, 0)])
    assert not r.ok and r.states[0].remaining == -30


async def test_refusal_is_replayed_then_forgotten(store, tag):
    assert (await take(store, tag, "a", [cost("k", 100, 90)])).ok
    r = await take(store, tag, "b", [cost("k", 100, 20)])
    assert not r.ok and not r.replayed
    await store.release(tag, "a", now_ms=NOW)
    again = await take(store, tag, "b", [cost("k", 100, 20)], NOW + REFUSAL_MEMORY_MS - 1)
    assert not again.ok and again.replayed and again.blocked == 0 and again.states == r.states
    fresh = await take(store, tag, "b", [cost("k", 100, 20)], NOW + REFUSAL_MEMORY_MS)
    assert fresh.ok and not fresh.replayed


async def test_refused_reservations_never_reach_the_ledger(store, tag):
    r = await take(store, tag, "x", [cost("k", 10, 20)])
    assert not r.ok
    for s in (await store.settle(tag, "x", {"cost": 5}, now_ms=NOW), await store.release(tag, "x", now_ms=NOW)):
        assert not s.found and s.charged == {}
    assert await store.expire(now_ms=NOW + 10 * TTL) == 0
    assert await entries(store, tag) == []
    assert await spent_reserved(store, tag, cost("k", 10)) == (0, 0)


async def test_unknown_id_is_not_found(store, tag):
    s = await store.settle(tag, "nope", {"cost": 5}, now_ms=NOW)
    assert not s.found and not s.replayed


async def test_closed_reservation_is_forgotten_after_its_memory(store, tag):
    assert (await take(store, tag, "r", [cost("k", 100, 10)])).ok
    await store.settle(tag, "r", {"cost": 10}, now_ms=NOW)
    assert (await store.settle(tag, "r", {"cost": 1}, now_ms=NOW + CLOSED_MEMORY_MS - 1)).replayed
    gone = await store.settle(tag, "r", {"cost": 1}, now_ms=NOW + CLOSED_MEMORY_MS)
    assert not gone.found
    again = await take(store, tag, "r", [cost("k", 100, 10)], NOW + CLOSED_MEMORY_MS)
    assert again.ok and not again.replayed and again.states[0].reserved == 10
