"""Workflow budgets in the engine: nested runs (ancestor lines, depth, recorded ancestry),
retry ceilings (run retries, attempts per call and per idempotency key), tool-call budgets."""

from __future__ import annotations

from decimal import Decimal

import pytest

from extproc.engine.calls import run_share
from extproc.engine.workflow import Workflow, baggage, from_headers
from extproc.errors import BadRequest
from extproc.stores.base import RunRefusal
from tests.engine.conftest import ALICE, BOB, make_policy, usd

RUNS = {
    "ttl_seconds": 3600,
    "max_depth": 2,
    "limits": [
        {"dimension": "cost", "limit": "1.00"},
        {"dimension": "retries", "limit": 3},
        {"dimension": "tool_calls", "limit": 5},
    ],
}


def policy(**runs):
    return make_policy(runs={**RUNS, **runs})


async def call(engine, pol, run_id, wf=None, *, who=ALICE, cost="0.10", settle=None, headers=None):
    """Place the call in its tree like the gate does, reserve, and settle `settle` (or the reservation)."""
    if headers is not None:
        _, wf = from_headers(pol.runs, headers)
    wf = await engine.place(pol, who, run_id, wf or Workflow())
    d = await engine.reserve(
        pol, who, run_id=run_id, reservation_id=None, estimate={"cost": usd(cost), "requests": 1}, meta={}, workflow=wf
    )
    if d.allowed:
        await engine.settle(d.hold, settle if settle is not None else {k: v for k, v in d.reserved.items()})
    return d


def spent(d, scope_id, dimension="cost"):
    return next(st.spent for lim, st in zip(d.limits, d.states) if lim.scope_id == scope_id and lim.spec.dimension == dimension)


async def test_children_reserve_on_their_ancestors(engine):
    pol = policy()
    assert (await call(engine, pol, "root")).allowed
    assert (await call(engine, pol, "kid", Workflow(parent="root"))).allowed
    d = await call(engine, pol, "grandkid", Workflow(parent="kid"), cost="0.20")
    assert d.allowed and [l.scope_id for l in d.limits if l.spec.dimension == "cost"] == [
        "alice/grandkid", "alice/root", "alice/kid"
    ]  # fmt: skip
    d = await call(engine, pol, "root", cost="0")
    assert spent(d, "alice/root") == usd("0.40")
    # later calls of the child need no header: the recorded ancestry applies
    d = await call(engine, pol, "grandkid", cost="0")
    assert spent(d, "alice/root") == usd("0.40") and spent(d, "alice/kid") == usd("0.30")


async def test_the_parent_limit_binds_every_child(engine):
    pol = policy()
    assert (await call(engine, pol, "root", cost="0.50")).allowed
    assert (await call(engine, pol, "a", Workflow(parent="root"), cost="0.30")).allowed
    d = await call(engine, pol, "b", Workflow(parent="root"), cost="0.30")
    assert not d.allowed and d.blocking.scope_id == "alice/root" and d.refusal_code == "insufficient_quota"


async def test_depth_is_capped(engine):
    pol = policy(max_depth=1)
    assert (await call(engine, pol, "root")).allowed
    assert (await call(engine, pol, "kid", Workflow(parent="root"))).allowed
    d = await call(engine, pol, "grandkid", Workflow(parent="kid"))
    assert not d.allowed and d.reason is RunRefusal.DEPTH and d.refusal_code == "run_depth_exceeded"
    assert "at most 1 ancestor" in d.message


async def test_unknown_parent_and_moving_a_run(engine):
    pol = policy()
    d = await call(engine, pol, "kid", Workflow(parent="nobody"))
    assert not d.allowed and d.reason is RunRefusal.PARENT
    assert (await call(engine, pol, "root")).allowed
    assert (await call(engine, pol, "other")).allowed
    assert (await call(engine, pol, "kid", Workflow(parent="root"))).allowed
    with pytest.raises(BadRequest, match="started under 'root'"):
        await call(engine, pol, "kid", Workflow(parent="other"))
    with pytest.raises(BadRequest, match="own parent"):
        await call(engine, pol, "x", Workflow(parent="x"))


async def test_another_principals_run_is_not_a_parent(engine):
    pol = policy()
    assert (await call(engine, pol, "root", who=BOB)).allowed
    d = await call(engine, pol, "kid", Workflow(parent="root"))  # alice/root does not exist
    assert not d.allowed and d.reason is RunRefusal.PARENT


async def test_closing_the_root_closes_the_tree(engine):
    pol = policy()
    assert (await call(engine, pol, "root")).allowed
    assert (await call(engine, pol, "kid", Workflow(parent="root"))).allowed
    await engine.close_run(pol, ALICE, "root")
    d = await call(engine, pol, "kid")
    assert not d.allowed and d.reason is RunRefusal.CLOSED


async def test_retries_ceiling_refuses_the_fourth_retry(engine):
    pol = policy()
    for n in range(1, 4):
        d = await call(engine, pol, "r", headers={"x-stainless-retry-count": str(n)}, cost="0.01")
        assert d.allowed and d.reserved["retries"] == 1
    assert (await call(engine, pol, "r", cost="0.01")).allowed  # a first attempt is no retry
    d = await call(engine, pol, "r", headers={"x-stainless-retry-count": "4"}, cost="0.01")
    assert not d.allowed and d.refusal_code == "retry_budget_exceeded" and d.blocking.spec.dimension == "retries"


async def test_a_released_retry_still_counts(engine):
    from extproc.engine.holds import CallHold

    pol = policy()
    for n in range(1, 4):
        wf = await engine.place(pol, ALICE, "r", from_headers(pol.runs, {"x-stainless-retry-count": str(n)})[1])
        d = await engine.reserve(pol, ALICE, run_id="r", reservation_id=None, estimate={"cost": 1}, meta={}, workflow=wf)
        assert d.allowed
        assert await CallHold(engine, d, None, lambda c: None).release()  # the backend failed: nothing served
    d = await call(engine, pol, "r", headers={"x-stainless-retry-count": "1"})
    assert not d.allowed and d.refusal_code == "retry_budget_exceeded"
    entries = await engine.ledger()
    assert [e.charged for e in entries[:3]] == [{"retries": 1}] * 3


async def test_attempts_per_call_from_the_retry_header(engine):
    pol = policy(max_attempts_per_call=2)
    assert (await call(engine, pol, None, headers={"x-stainless-retry-count": "1"})).allowed
    d = await call(engine, pol, None, headers={"x-stainless-retry-count": "2"})
    assert not d.allowed and d.reason is RunRefusal.ATTEMPTS and d.refusal_code == "retry_budget_exceeded"


async def test_attempts_of_one_idempotency_key(engine):
    pol = policy(max_attempts_per_call=3)
    same = {"idempotency-key": "step-7"}
    for expected_retry in range(3):
        d = await call(engine, pol, "r", headers=same, cost="0.01")
        assert d.allowed and d.reserved.get("retries", 0) == (1 if expected_retry else 0)
    d = await call(engine, pol, "r", headers=same, cost="0.01")
    assert not d.allowed and d.refusal_code == "retry_budget_exceeded" and d.blocking.spec.dimension == "attempts"
    assert (await call(engine, pol, "r", headers={"idempotency-key": "step-8"}, cost="0.01")).allowed


async def test_tool_calls_refuse_once_spent(engine):
    pol = policy()
    assert (await call(engine, pol, "t", settle={"cost": 1, "tool_calls": 3})).allowed
    assert (await call(engine, pol, "t", settle={"cost": 1, "tool_calls": 2})).allowed
    d = await call(engine, pol, "t")
    assert not d.allowed and d.blocking.spec.dimension == "tool_calls" and d.refusal_code == "insufficient_quota"
    assert "5 tool calls" in d.message


def test_baggage_and_headers():
    assert baggage({"baggage": "budget.run=a%20b;p=1, other=x,bad, budget.parent_run=root"}) == {
        "budget.run": "a b", "other": "x", "budget.parent_run": "root"
    }  # fmt: skip
    pol = policy()
    run, wf = from_headers(pol.runs, {"baggage": "budget.run=kid,budget.parent_run=root", "x-stainless-retry-count": "2"})
    assert run == "kid" and wf.parent == "root" and wf.retry == 2
    run, wf = from_headers(pol.runs, {"x-parent-run-id": "p", "baggage": "budget.parent_run=q"})
    assert run is None and wf.parent == "p"
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert from_headers(pol.runs, {"traceparent": tp})[1].traceparent == tp
    assert from_headers(pol.runs, {"traceparent": "junk"})[1].traceparent == ""
    with pytest.raises(BadRequest):
        from_headers(pol.runs, {"x-stainless-retry-count": "-1"})
    with pytest.raises(BadRequest):
        from_headers(pol.runs, {"x-parent-run-id": "x" * 200})


async def test_ledger_meta_carries_the_workflow(engine):
    pol = policy()
    assert (await call(engine, pol, "root")).allowed
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    d = await call(engine, pol, "kid", headers={"x-parent-run-id": "root", "x-stainless-retry-count": "1", "traceparent": tp})
    assert d.allowed
    meta = (await engine.ledger())[-1].meta
    assert (meta["run"], meta["parent_run"], meta["ancestors"], meta["retry"], meta["traceparent"]) == ("kid", "root", ["root"], 1, tp)


async def test_spend_of_each_level_root_first(engine):
    from extproc.server import render

    pol = policy()
    assert (await call(engine, pol, "root", cost="0.30")).allowed
    assert (await call(engine, pol, "kid", Workflow(parent="root"), cost="0.20")).allowed
    wf = await engine.place(pol, ALICE, "kid", Workflow())
    d = await engine.reserve(pol, ALICE, run_id="kid", reservation_id=None, estimate={"cost": usd("0.10")}, meta={}, workflow=wf)
    assert dict(render.run_spend(d)) == {
        "x-budget-run-chain": "root, kid",
        "x-budget-run-spent-usd": "0.5, 0.2",
        "x-budget-run-remaining-usd": "0.4, 0.7",
    }
    assert dict(render.run_spend(d, usd("0.05")))["x-budget-run-spent-usd"] == "0.55, 0.25"


def two_models(**runs):
    return make_policy(
        prices={
            "models": {
                "big": {"input": "10", "output": "10", "downshift_to": ["small"]},
                "small": {"input": "1", "output": "1"},
            }
        },
        runs={"limits": [{"dimension": "cost", "limit": "1.00"}], **runs},
    )


async def plan(engine, pol, model, run_id="r"):
    from extproc.engine.calls import Caller, Planner
    from extproc.protocols import OPENAI_CHAT

    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000}' % model.encode()
    facts = OPENAI_CHAT.parse_request(body, max_bytes=1 << 20)
    planner = Planner(engine, pol)
    call_in = Planner.call_input(pol, facts, api="openai.chat")
    p = await planner.plan(call_in, Caller(ALICE, run_id, reservation_id=f"{model}-{engine.clock.now}", workflow=Workflow()), api="x")
    engine.clock.advance(1)
    if p.decision.allowed:
        await engine.settle(p.decision.hold, dict(p.decision.reserved))
    return p


@pytest.mark.parametrize("action", ["downshift", "refuse"])
async def test_escalation_gate_past_the_threshold(engine, action):
    pol = two_models(escalation={"threshold": "0.5", "action": action})
    assert (await plan(engine, pol, "small")).chosen.name == "small"  # each call settles its reservation
    p = await plan(engine, pol, "big")  # below the threshold: escalation is free
    assert p.decision.allowed and p.chosen.name == "big"
    while run_share(p.decision, 0) <= Decimal("0.5"):  # spend past 50% on the small model
        p = await plan(engine, pol, "small")
    p = await plan(engine, pol, "big")  # big was used already: no escalation
    assert p.decision.allowed and p.chosen.name == "big"
    fresh = two_models(escalation={"threshold": "0.5", "action": action})
    engine.models_used.__init__()  # forget: the run used only the small model
    await plan(engine, fresh, "small")
    p = await plan(engine, fresh, "big")
    if action == "downshift":
        assert p.decision.allowed and p.chosen.name == "small" and p.requested == "big"
    else:
        assert not p.decision.allowed and p.decision.refusal_code == "model_escalation_refused"
        assert "the escalation threshold is 50%" in p.decision.message
        assert engine.models_used.get("alice/r")[1] == "small"


async def test_admin_run_state_shows_the_ancestry(engine):
    from extproc.server import admin

    pol = make_policy(principals=[{"name": "alice", "team": "ml", "org": "acme"}], runs=RUNS)
    assert (await call(engine, pol, "root")).allowed
    assert (await call(engine, pol, "kid", Workflow(parent="root"))).allowed
    doc = await admin.budgets(engine, pol, "alice", "kid")
    assert doc["run_state"]["ancestors"] == ["root"] and doc["run_state"]["state"] == "active"


async def test_a_retry_without_a_retry_limit_is_released_as_before(engine):
    from extproc.engine.holds import CallHold
    from extproc.stores.base import Outcome

    pol = make_policy(runs={"limits": [{"dimension": "cost", "limit": "1.00"}]})
    wf = from_headers(pol.runs, {"x-stainless-retry-count": "1"})[1]
    d = await engine.reserve(pol, ALICE, run_id="r", reservation_id=None, estimate={"cost": 1}, meta={}, workflow=wf)
    assert d.allowed and await CallHold(engine, d, None, lambda c: None).release()
    assert (await engine.ledger())[-1].outcome is Outcome.RELEASED
