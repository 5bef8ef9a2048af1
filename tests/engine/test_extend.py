"""Engine.extend (a held reservation grows with its stream), reserve with headroom, and the
run deadline a decision reports; a real embedded store, an injected clock."""

from __future__ import annotations

from extproc.stores.base import Outcome, RunRefusal
from tests.engine.conftest import ALICE, make_policy, usd

BUDGETS = [
    {"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}, {"dimension": "total_tokens", "limit": 1_000}]},
    {"scope": "team", "limits": [{"dimension": "output_tokens", "limit": 500}]},
]


def est(cost: str, inp: int, out: int) -> dict[str, int]:
    return {"cost": usd(cost), "input_tokens": inp, "output_tokens": out, "requests": 1}


async def reserve(engine, policy, *, cost="0.10", inp=100, out=100, run_id=None, headroom=None):
    return await engine.reserve(
        policy, ALICE, run_id=run_id, reservation_id=None, estimate=est(cost, inp, out), meta={}, headroom=headroom
    )


def by_dimension(d, states):
    return {lim.spec.dimension: st for lim, st in zip(d.limits, states, strict=True)}


async def test_extend_grows_every_limit_of_the_delta_and_adds_total_tokens(engine):
    policy = make_policy(budgets=BUDGETS)
    d = await reserve(engine, policy)
    assert d.allowed
    r = await engine.extend(policy, d.hold, {"cost": usd("0.05"), "output_tokens": 50})
    assert r.ok and r.found
    got = {dim: st.reserved for dim, st in by_dimension(d, r.states).items()}
    assert got == {"cost": usd("0.15"), "total_tokens": 250, "output_tokens": 150}
    (st,) = [s for lim, s in zip(d.limits, (await engine.snapshot(policy, ALICE)).states, strict=True) if lim.scope == "team"]
    assert st.reserved == 150


async def test_extend_refuses_what_does_not_fit_and_names_the_limit(engine):
    policy = make_policy(budgets=BUDGETS)
    d = await reserve(engine, policy)
    r = await engine.extend(policy, d.hold, {"output_tokens": 401})
    assert not r.ok and r.found and d.limits[r.blocked].scope == "team"
    assert (await engine.extend(policy, d.hold, {"output_tokens": 400})).ok
    await engine.settle(d.hold, {"cost": usd("0.01"), "input_tokens": 100, "output_tokens": 450})
    r = await engine.extend(policy, d.hold, {"output_tokens": 1})
    assert not r.ok and not r.found


async def test_extend_pushes_the_reservation_ttl(engine, clock):
    policy = make_policy(budgets=BUDGETS, reservation_ttl_seconds=60)
    d = await reserve(engine, policy)
    clock.advance(50_000)
    assert (await engine.extend(policy, d.hold, {"output_tokens": 10})).ok
    clock.advance(50_000)  # 100 s after the reservation, 50 s after the extension
    assert await engine.expire() == 0
    clock.advance(10_000)
    assert await engine.expire() == 1
    (e,) = await engine.ledger()
    assert e.outcome is Outcome.EXPIRED and e.charged["output_tokens"] == 110 and e.charged["total_tokens"] == 210


async def test_closed_run_refuses_an_extension(engine):
    policy = make_policy(budgets=BUDGETS, runs={"limits": [{"dimension": "cost", "limit": "5.00"}]})
    d = await reserve(engine, policy, run_id="r1")
    await engine.close_run(policy, ALICE, "r1")
    r = await engine.extend(policy, d.hold, {"cost": 1})
    assert not r.ok and r.found and r.reason is RunRefusal.CLOSED


async def test_decision_reports_the_run_deadline(engine, clock):
    policy = make_policy(budgets=BUDGETS, runs={"limits": [{"dimension": "duration", "limit": 60}]})
    t0 = clock.now
    d = await reserve(engine, policy, run_id="r1")
    assert d.allowed and d.deadline_ms == t0 + 60_000
    clock.advance(30_000)
    d2 = await reserve(engine, policy, run_id="r1")
    assert d2.deadline_ms == t0 + 60_000
    assert (await reserve(engine, policy)).deadline_ms is None  # no run: no deadline
    clock.now = t0 + 60_000
    r = await engine.extend(policy, d.hold, {"output_tokens": 1})
    assert not r.ok and d.limits[r.blocked].spec.dimension == "duration" and r.deadline_ms == t0 + 60_000


async def test_headroom_must_fit_but_is_not_taken(engine):
    policy = make_policy(budgets=BUDGETS)
    d = await reserve(engine, policy, out=100, headroom={"output_tokens": 401})
    assert not d.allowed and d.blocking.scope == "team"
    assert d.message.endswith("needs up to 100 (and 401 left for calls in flight to grow).")
    d = await reserve(engine, policy, out=100, headroom={"output_tokens": 400, "cost": usd("0.90")})
    assert d.allowed
    got = {dim: st.reserved for dim, st in by_dimension(d, d.states).items()}
    assert got == {"cost": usd("0.10"), "total_tokens": 200, "output_tokens": 100}
    # total_tokens follows output_tokens' headroom: 200 taken + 801 > 1,000
    d = await reserve(engine, policy, cost="0.01", inp=0, out=0, headroom={"output_tokens": 801})
    assert not d.allowed and d.blocking.spec.dimension == "total_tokens"
    c = await engine.check(policy, ALICE, estimate=est("0.01", 0, 0), headroom={"cost": usd("0.90")})
    assert not c.allowed and c.blocking.spec.dimension == "cost"
