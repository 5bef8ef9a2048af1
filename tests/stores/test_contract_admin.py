"""Store contract: admin adjustments (set a limit, credit a balance) and the ledger's contents."""

from __future__ import annotations

from extproc.stores.base import Outcome
from tests.stores.helpers import NOW, cost, entries, state, take


async def test_set_limit_overrides_the_policy_value_both_ways(store, tag):
    await store.adjust(tag, "k", set_limit=500)
    assert (await state(store, tag, cost("k", 100))).limit == 500
    assert (await take(store, tag, "a", [cost("k", 100, 450)])).ok
    await store.adjust(tag, "k", set_limit=50)
    r = await take(store, tag, "b", [cost("k", 100, 1)])
    assert not r.ok and r.states[0].limit == 50 and r.states[0].reserved == 450


async def test_credit_tops_up_and_accumulates(store, tag):
    assert (await take(store, tag, "a", [cost("k", 100, 100)])).ok
    await store.settle(tag, "a", {"cost": 100}, now_ms=NOW)
    assert not (await take(store, tag, "b", [cost("k", 100, 30)])).ok
    await store.adjust(tag, "k", credit=20)
    await store.adjust(tag, "k", credit=20)
    assert (await state(store, tag, cost("k", 100))).limit == 140
    assert (await take(store, tag, "c", [cost("k", 100, 30)])).ok
    await store.adjust(tag, "k", credit=-40)
    assert (await state(store, tag, cost("k", 100))).limit == 100


async def test_credit_adds_to_an_override(store, tag):
    await store.adjust(tag, "k", set_limit=1_000, credit=5)
    assert (await state(store, tag, cost("k", 100))).limit == 1_005
    await store.adjust(tag, "k", set_limit=10)
    assert (await state(store, tag, cost("k", 100))).limit == 15


async def test_adjust_touches_only_its_line(store, tag):
    await store.adjust(tag, "k", credit=50)
    got = await store.snapshot([cost("k", 100), cost("other", 100)], tag=tag, now_ms=NOW)
    assert [s.limit for s in got] == [150, 100]


async def test_ledger_records_everything_needed_for_chargeback(store, tag):
    meta = {"principal": "alice", "run": "r-1", "model": "gpt-x", "estimate": {"cost": 40, "input_tokens": 10, "output_tokens": 20}}
    assert (await take(store, tag, "req-1", [cost("key:alice", 100, 40), cost("team:ml", 1000, 40)], NOW, meta=meta)).ok
    await store.settle(tag, "req-1", {"cost": 25, "input_tokens": 9, "output_tokens": 11}, now_ms=NOW + 700, meta={"usage_source": "body"})
    (e,) = await entries(store, tag)
    assert (e.tag, e.reservation_id, e.outcome) == (tag, "req-1", Outcome.SETTLED)
    assert e.reserved == {"cost": 40, "input_tokens": 10, "output_tokens": 20, "total_tokens": 30}
    assert e.charged == {"cost": 25, "input_tokens": 9, "output_tokens": 11, "total_tokens": 20}
    assert (e.reserved_at_ms, e.closed_at_ms) == (NOW, NOW + 700)
    assert e.lines == ("key:alice", "team:ml")
    assert {k: e.meta[k] for k in ("principal", "run", "model", "usage_source")} == {
        "principal": "alice", "run": "r-1", "model": "gpt-x", "usage_source": "body",
    }  # fmt: skip


async def test_ledger_filters_and_orders(store, tag):
    for i, at in enumerate((NOW + 30, NOW + 10, NOW + 20)):
        assert (await take(store, tag, f"r{i}", [cost("k", 1000, 5)], NOW)).ok
        await store.settle(tag, f"r{i}", {"cost": i + 1}, now_ms=at)
    got = await store.ledger(tag=tag)
    assert [e.reservation_id for e in got] == ["r1", "r2", "r0"]  # by close time
    assert [e.reservation_id for e in await store.ledger(tag=tag, since_ms=NOW + 20)] == ["r2", "r0"]
    assert [e.reservation_id for e in await store.ledger(tag=tag, limit=1)] == ["r1"]
    assert [e.reservation_id for e in await store.ledger(since_ms=NOW + 30) if e.tag == tag] == ["r0"]
