"""The engine over a real store with an injected clock: windows, runs, modes, refusal codes, admin."""

from __future__ import annotations

import pytest

from extproc.engine.budget import Decision, Hold
from extproc.engine.runs import run_overrides_from_headers
from extproc.errors import BadRequest
from extproc.stores.base import Mode, Outcome, RunRefusal
from tests.engine.conftest import ALICE, BOB, local_ms, make_policy, usd

NY = "America/New_York"


def est(cost: str = "0", inp: int = 0, out: int = 0, requests: int = 1) -> dict[str, int]:
    return {"cost": usd(cost), "input_tokens": inp, "output_tokens": out, "requests": requests}


async def reserve(engine, policy, who=ALICE, *, run_id=None, cost="0", rid=None, overrides=None, **kw):
    return await engine.reserve(
        policy, who, run_id=run_id, reservation_id=rid, estimate=est(cost, **kw), meta={"model": "m"}, run_overrides=overrides
    )


async def spend(engine, policy, who=ALICE, *, run_id=None, cost="0", **kw):
    d = await reserve(engine, policy, who, run_id=run_id, cost=cost, **kw)
    assert d.allowed, d.message
    await engine.settle(d.hold, dict(d.reserved), {"usage_source": "test"})
    return d


async def test_calendar_day_rolls_over_at_local_midnight(engine, clock):
    policy = make_policy(budgets=[{"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00", "window": "day", "timezone": NY}]}])
    clock.set_local(NY, 2026, 3, 6, 23, 59, 59)
    await spend(engine, policy, cost="0.80")
    d = await reserve(engine, policy, cost="0.50")
    assert not d.allowed and d.refusal_code == "insufficient_quota" and d.retry_after_s is None
    assert d.blocking.budget == "key:alice" and d.blocking.reset_ms == local_ms(NY, 2026, 3, 7)
    clock.set_local(NY, 2026, 3, 7, 0, 0, 0)
    d = await reserve(engine, policy, cost="0.50")
    assert d.allowed and d.states[0].spent == 0


async def test_calendar_reset_across_a_dst_change(engine, clock):
    policy = make_policy(budgets=[{"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00", "window": "day", "timezone": NY}]}])
    clock.set_local(NY, 2026, 3, 8, 12, 0, 0)  # US DST starts 2026-03-08: a 23-hour day
    d = await reserve(engine, policy, cost="2.00")
    assert not d.allowed and d.blocking.reset_ms == local_ms(NY, 2026, 3, 9)
    assert d.blocking.reset_ms - local_ms(NY, 2026, 3, 8) == 23 * 3_600_000


async def test_calendar_month_in_a_zone(engine, clock):
    policy = make_policy(budgets=[{"scope": "team", "limits": [{"dimension": "cost", "limit": "1.00", "window": "month", "timezone": "Asia/Tokyo"}]}])
    clock.set_local("Asia/Tokyo", 2026, 1, 31, 23, 0, 0)
    await spend(engine, policy, cost="1.00")
    assert not (await reserve(engine, policy, BOB, cost="0.01")).allowed  # same team
    clock.set_local("Asia/Tokyo", 2026, 2, 1, 0, 0, 0)
    assert (await reserve(engine, policy, BOB, cost="1.00")).allowed


async def test_rolling_window_is_rate_limited_with_exact_retry(engine, clock):
    policy = make_policy(budgets=[{"scope": "key", "limits": [{"dimension": "requests", "limit": 2, "window": "rolling", "seconds": 60}]}])
    t0 = clock.now
    await spend(engine, policy)
    clock.advance(15_000)
    await spend(engine, policy)
    clock.advance(15_000)
    d = await reserve(engine, policy)
    assert not d.allowed and d.refusal_code == "rate_limit_exceeded"
    assert d.retry_after_ms == 30_000 and d.retry_after_s == 30
    clock.now = t0 + 60_000 - 1
    d = await reserve(engine, policy)
    assert not d.allowed and d.retry_after_ms == 1 and d.retry_after_s == 1
    clock.now = t0 + 60_000
    assert (await reserve(engine, policy)).allowed


async def test_refusal_codes(engine, clock):
    policy = make_policy(
        budgets=[
            {"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}]},
            {"scope": "team", "limits": [{"dimension": "concurrency", "limit": 1}]},
            {"scope": "org", "limits": [{"dimension": "output_tokens", "limit": 100, "window": "rolling", "seconds": 10}]},
        ]
    )
    d = await reserve(engine, policy, cost="2.00")
    assert d.blocking.scope == "key" and d.refusal_code == "insufficient_quota" and d.retry_after_s is None
    d = await reserve(engine, policy, out=101)
    assert d.blocking.scope == "org" and d.refusal_code == "insufficient_quota"  # larger than the whole window
    first = await reserve(engine, policy, out=10)
    assert first.allowed
    d = await reserve(engine, policy, out=10)
    assert d.blocking.scope == "team" and d.refusal_code == "rate_limit_exceeded" and d.retry_after_s == 1
    await engine.settle(first.hold, {"output_tokens": 95, "requests": 1})
    d = await reserve(engine, policy, out=10)
    assert d.blocking.scope == "org" and d.refusal_code == "rate_limit_exceeded" and d.retry_after_ms == 10_000
    assert "output_tokens limit 100, spent 95" in d.message


async def test_modes_from_policy(engine, clock):
    policy = make_policy(
        enforcement={"mode": "soft_gate", "soft_gate_margin": "0.5"},
        budgets=[
            {"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}]},
            {"scope": "team", "mode": "advisory", "limits": [{"dimension": "cost", "limit": "0.10"}]},
        ],
    )
    d = await reserve(engine, policy, cost="1.40")  # within the 50% margin
    assert d.allowed and d.warned == (1,) and d.mode is Mode.SOFT_GATE
    d = await reserve(engine, policy, cost="0.20")  # 1.60 > 1.50
    assert not d.allowed and d.blocking.scope == "key"


async def test_run_budget_applies_per_run_and_principal(engine, clock):
    policy = make_policy(runs={"limits": [{"dimension": "cost", "limit": "1.00"}, {"dimension": "requests", "limit": 3}]})
    for _ in range(3):
        await spend(engine, policy, run_id="r1", cost="0.10")
    d = await reserve(engine, policy, run_id="r1", cost="0.10")
    assert not d.allowed and d.blocking.budget == "run:alice/r1" and d.blocking.spec.dimension == "requests"
    assert d.refusal_code == "insufficient_quota"
    assert (await reserve(engine, policy, BOB, run_id="r1", cost="0.10")).allowed  # bob's r1 is another run
    assert (await reserve(engine, policy, run_id=None, cost="0.10")).allowed  # no run: no run budget
    snap = await engine.snapshot(policy, ALICE, run_id="r1")
    assert snap.run.state == "active" and [(l.spec.dimension, s.spent) for l, s in snap.rows()] == [("cost", usd("0.30")), ("requests", 3)]


async def test_run_wall_clock_budget(engine, clock):
    policy = make_policy(runs={"limits": [{"dimension": "duration", "limit": 60}]})
    await spend(engine, policy, run_id="r1")
    clock.advance(59_999)
    await spend(engine, policy, run_id="r1")
    clock.advance(1)
    d = await reserve(engine, policy, run_id="r1")
    assert not d.allowed and d.refusal_code == "insufficient_quota" and "wall-clock budget of 60s" in d.message


async def test_client_lowers_its_run_budget_for_good(engine, clock):
    policy = make_policy(runs={"limits": [{"dimension": "cost", "limit": "5.00"}]})
    lowered = run_overrides_from_headers({"x-run-budget-usd": "0.50"})
    assert lowered == {"cost": usd("0.50")}
    await spend(engine, policy, run_id="r1", cost="0.30", overrides=lowered)
    d = await reserve(engine, policy, run_id="r1", cost="0.30")  # header omitted: still 0.50
    assert not d.allowed and d.states[0].limit == usd("0.50") and d.refusal_code == "insufficient_quota"
    d = await reserve(engine, policy, run_id="r1", cost="0.30", overrides={"cost": usd("9.00")})
    assert not d.allowed and d.states[0].limit == usd("0.50")
    assert (await reserve(engine, policy, run_id="r2", cost="3.00")).allowed  # other runs keep the default
    # a lowering of a dimension the policy does not limit for runs changes nothing
    assert (await reserve(engine, policy, run_id="r3", cost="1.00", overrides={"requests": 0})).allowed


async def test_active_run_cap_is_a_rate_limit_with_exact_retry(engine, clock):
    policy = make_policy(runs={"ttl_seconds": 600, "max_active_per_principal": 2})
    await spend(engine, policy, run_id="r1")
    clock.advance(1_000)
    await spend(engine, policy, run_id="r2")
    clock.advance(1_000)
    d = await reserve(engine, policy, run_id="r3")
    assert not d.allowed and d.reason is RunRefusal.LIMIT and d.run == "alice/r3"
    assert d.refusal_code == "rate_limit_exceeded" and d.retry_after_ms == 598_000 and d.retry_after_s == 598
    assert d.blocking.budget == "key:alice" and d.states[d.blocked].reserved == 2 and d.states[d.blocked].limit == 2
    assert "already has 2 active runs" in d.message
    assert len(d.limits) == len(d.states) == d.blocked + 1
    clock.advance(598_000)
    assert (await reserve(engine, policy, run_id="r3")).allowed


async def test_closed_and_expired_runs_are_refused(engine, clock):
    policy = make_policy(runs={"ttl_seconds": 60, "limits": [{"dimension": "cost", "limit": "1.00"}]})
    d1 = await reserve(engine, policy, run_id="r1", cost="0.10")
    st = await engine.close_run(policy, ALICE, "r1")
    assert st.state == "closed"
    d = await reserve(engine, policy, run_id="r1", cost="0.10")
    assert not d.allowed and d.reason is RunRefusal.CLOSED and d.refusal_code == "insufficient_quota"
    assert d.blocking.budget == "run:alice/r1" and "closed" in d.message
    assert (await engine.settle(d1.hold, dict(d1.reserved))).outcome is Outcome.SETTLED  # in flight still settles
    await spend(engine, policy, run_id="r2")
    clock.advance(60_000)
    d = await reserve(engine, policy, run_id="r2")
    assert d.reason is RunRefusal.EXPIRED and "expired" in d.message
    assert (await engine.run_state(ALICE, "r2")).state == "expired"


async def test_admin_adjust_credit_and_snapshot(engine, clock):
    policy = make_policy(budgets=[{"scope": "team", "limits": [{"dimension": "cost", "limit": "1.00"}, {"dimension": "requests", "limit": 10}]}])
    await spend(engine, policy, cost="1.00")
    assert not (await reserve(engine, policy, BOB, cost="0.50")).allowed
    [(lim, st)] = await engine.credit(policy, BOB, scope="team", dimension="cost", amount=usd("0.50"))
    assert lim.budget == "team:ml" and st.limit == usd("1.50") and st.remaining == usd("0.50")
    assert (await reserve(engine, policy, BOB, cost="0.50")).allowed
    [(_, st)] = await engine.set_limit(policy, ALICE, scope="team", dimension="requests", limit=2)
    assert st.limit == 2
    snap = await engine.snapshot(policy, BOB)
    assert [(l.spec.dimension, s.limit, s.spent, s.reserved) for l, s in snap.rows()] == [
        ("cost", usd("1.50"), usd("1.00"), usd("0.50")),
        ("requests", 2, 1, 1),
    ]
    assert not (await reserve(engine, policy, BOB)).allowed
    with pytest.raises(LookupError):
        await engine.credit(policy, BOB, scope="org", dimension="cost", amount=1)


async def test_admin_raises_a_run_limit_over_the_clients_lowering(engine, clock):
    policy = make_policy(runs={"limits": [{"dimension": "cost", "limit": "1.00"}]})
    await spend(engine, policy, run_id="r1", cost="0.20", overrides={"cost": usd("0.25")})
    assert not (await reserve(engine, policy, run_id="r1", cost="0.10")).allowed
    await engine.set_limit(policy, ALICE, scope="run", run_id="r1", dimension="cost", limit=usd("2.00"))
    assert (await reserve(engine, policy, run_id="r1", cost="1.50")).allowed


async def test_check_reserves_nothing(engine, clock):
    policy = make_policy(
        budgets=[{"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}]}],
        runs={"max_active_per_principal": 1, "limits": [{"dimension": "requests", "limit": 1}]},
    )
    assert (await engine.check(policy, ALICE, run_id="r1")).allowed
    assert (await engine.check(policy, ALICE, run_id="r1")).allowed
    assert await engine.run_state(ALICE, "r1") is None
    await spend(engine, policy, run_id="r1", cost="0.40")
    d = await engine.check(policy, ALICE, run_id="r1")
    assert not d.allowed and d.blocking.spec.dimension == "requests"  # the step cap is spent
    d = await engine.check(policy, ALICE, run_id="r2")
    assert d.reason is RunRefusal.LIMIT
    d = await engine.check(policy, ALICE, estimate=est("0.61"))
    assert not d.allowed and d.blocking.scope == "key"
    snap = await engine.snapshot(policy, ALICE)
    assert snap.states[0].reserved == 0


async def test_reaper_expires_through_the_engine(engine, clock):
    policy = make_policy(reservation_ttl_seconds=30, budgets=[{"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}]}])
    d = await reserve(engine, policy, cost="0.40")
    clock.advance(29_999)
    assert await engine.expire() == 0
    clock.advance(1)
    assert await engine.expire() == 1
    snap = await engine.snapshot(policy, ALICE)
    assert (snap.states[0].spent, snap.states[0].reserved) == (usd("0.40"), 0)
    (entry,) = await engine.ledger()
    assert entry.outcome is Outcome.EXPIRED and entry.meta["principal"] == "alice" and entry.reservation_id == d.hold.reservation_id


async def test_one_worker_reaps_and_trims_the_ledger(engine, clock):
    """Every worker runs the reaper loop; the store's lease lets one of them work at a time."""
    from extproc.engine.budget import Engine

    other = Engine(engine.store, clock=clock)  # a second worker process on the same store
    policy = make_policy(reservation_ttl_seconds=30, budgets=[{"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}]}])
    await spend(engine, policy, cost="0.10")
    await reserve(engine, policy, cost="0.40")
    clock.advance(30_000)
    assert await engine.reap("w1", lease_ms=5000) == 1
    assert await other.reap("w2", lease_ms=5000) is None
    assert len(await engine.ledger()) == 2
    clock.advance(5000)  # w1 stopped renewing: w2 takes over, and trims what is past the retention
    assert await other.reap("w2", lease_ms=5000, ledger_retention_ms=10_000) == 0
    assert [e.outcome for e in await engine.ledger()] == [Outcome.EXPIRED]
    pages = [page async for page in engine.ledger_pages(page=1)]
    assert [[e.outcome for e in p] for p in pages] == [[Outcome.EXPIRED]]


async def test_replayed_reservation_is_marked(engine, clock):
    policy = make_policy(budgets=[{"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}]}])
    a = await reserve(engine, policy, cost="0.40", rid="req-1")
    b = await reserve(engine, policy, cost="0.40", rid="req-1")
    assert a.allowed and b.allowed and b.replayed and not a.replayed
    assert (await engine.snapshot(policy, ALICE)).states[0].reserved == usd("0.40")


def test_decision_keeps_its_positional_shape():
    d = Decision(False, "id", Hold("t", "r"), (), (), None, (), None, {}, Mode.HARD_GATE)
    assert d.reason is None and d.refusal_code == "" and d.message == ""


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({}, {}),
        ({"x-run-budget-usd": "2.5"}, {"cost": 2_500_000_000}),
        ({"x-run-max-steps": "12", "x-run-max-seconds": "300", "x-run-max-tokens": "9000"}, {"requests": 12, "duration": 300, "total_tokens": 9000}),
    ],
)
def test_run_override_headers(headers, expected):
    assert run_overrides_from_headers(headers) == expected


@pytest.mark.parametrize("headers", [{"x-run-budget-usd": "-1"}, {"x-run-budget-usd": "1e3"}, {"x-run-max-steps": "3.5"}, {"x-run-budget-usd": "0.0000000001"}])
def test_bad_run_override_headers(headers):
    with pytest.raises(BadRequest) as e:
        run_overrides_from_headers(headers)
    assert e.value.param == next(iter(headers))


async def test_an_id_budget_keeps_its_own_counter_across_reloads_and_reordering(engine, clock):
    general = {"scope": "team", "limits": [{"dimension": "cost", "limit": "1.00"}]}
    own = {"scope": "team", "id": "ml", "limits": [{"dimension": "cost", "limit": "0.50"}]}
    policy = make_policy(budgets=[general, own])
    await spend(engine, policy, cost="0.40")
    assert [s.spent for s in (await engine.snapshot(policy, BOB)).states] == [usd("0.40"), usd("0.40")]
    # a reload that reorders the budgets and adds one: the counters are the same ones
    reloaded = make_policy(budgets=[{"scope": "org", "limits": [{"dimension": "cost", "limit": "9.00"}]}, own, general])
    snap = await engine.snapshot(reloaded, BOB)
    assert [(l.line.key, s.spent) for l, s in snap.rows()] == [
        ("org:acme|cost|total", 0),
        ("team@id:ml|cost|total", usd("0.40")),
        ("team:ml|cost|total", usd("0.40")),
    ]
    d = await reserve(engine, reloaded, BOB, cost="0.20")  # the team's own $0.50 refuses; the general $1.00 would not
    assert not d.allowed and d.blocking is not None and d.blocking.line.key == "team@id:ml|cost|total"
