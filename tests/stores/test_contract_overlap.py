"""Overlapping budgets through the engine, on every store: a key under both the budget
for every key and a budget of its own counts once on each counter."""

from __future__ import annotations

from extproc.engine.budget import Engine
from extproc.stores.base import Outcome
from tests.engine.conftest import ALICE, BOB, make_policy, usd
from tests.stores.helpers import NOW

POLICY = make_policy(
    budgets=[
        {"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}, {"dimension": "requests", "limit": 10}]},
        {"scope": "key", "id": "alice", "limits": [{"dimension": "cost", "limit": "0.50"}, {"dimension": "requests", "limit": 3}]},
    ]
)


def estimate(cost: str) -> dict[str, int]:
    return {"cost": usd(cost), "input_tokens": 0, "output_tokens": 0, "requests": 1}


async def test_general_and_id_budgets_count_a_call_once_each(store):
    engine = Engine(store, clock=lambda: NOW)
    d = await engine.reserve(POLICY, ALICE, run_id=None, reservation_id="a1", estimate=estimate("0.30"), meta={})
    assert d.allowed
    keys = [l.line.key for l in d.limits]
    assert keys == ["key:alice|cost|total", "key:alice|requests|total", "key@id:alice|cost|total", "key@id:alice|requests|total"]
    assert [st.reserved for st in d.states] == [usd("0.30"), 1, usd("0.30"), 1]  # once per counter, not twice
    await engine.settle(d.hold, {"cost": usd("0.20"), "requests": 1}, {})

    snap = await engine.snapshot(POLICY, ALICE)
    assert [(s.spent, s.reserved) for s in snap.states] == [(usd("0.20"), 0), (1, 0), (usd("0.20"), 0), (1, 0)]
    (entry,) = await store.ledger(tag=ALICE.tag)  # the ledger says once what each counter holds
    assert entry.outcome is Outcome.SETTLED and sorted(entry.lines) == sorted(keys)
    assert (entry.charged["cost"], entry.charged["requests"]) == (usd("0.20"), 1)

    # both limits hold: alice's own $0.50 refuses what the key budget ($1.00) would take
    d = await engine.reserve(POLICY, ALICE, run_id=None, reservation_id="a2", estimate=estimate("0.31"), meta={})
    assert not d.allowed and d.blocking is not None and d.blocking.line.key == "key@id:alice|cost|total"
    assert d.states[0].remaining == usd("0.80")
    # bob has no budget of his own: only the key budget applies to him
    d = await engine.reserve(POLICY, BOB, run_id=None, reservation_id="b1", estimate=estimate("0.90"), meta={})
    assert d.allowed and [l.line.key for l in d.limits] == ["key:bob|cost|total", "key:bob|requests|total"]
