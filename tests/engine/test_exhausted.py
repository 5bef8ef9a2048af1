"""`rules.exhausted` (the early refusal on request headers) answers what
`Engine.check` answers, in every mode and dimension, soft_gate margin included."""

from __future__ import annotations

import itertools

import pytest

from extproc.engine.budget import Identity
from extproc.rules import Mode, exhausted, exhausted_for_good
from tests.engine.conftest import make_policy

LIMIT = 100  # units of the dimension (nano-USD for cost); soft_gate_margin 0.1 -> 10 units of slack
SPENT = (0, 50, 98, 99, 100, 101, 105, 109, 110, 111, 150)
RESERVED = (0, 1, 5)
DIMENSIONS = ("cost", "requests", "input_tokens", "output_tokens", "total_tokens")
_ids = itertools.count()


def _policy(mode: Mode, dimension: str):
    limit = "0.0000001" if dimension == "cost" else LIMIT
    return make_policy(
        enforcement={"mode": mode.value, "soft_gate_margin": "0.1"},
        budgets=[{"scope": "key", "limits": [{"dimension": dimension, "limit": limit}]}],
    )


async def _at(engine, policy, dimension: str, spent: int, reserved: int) -> Identity:
    """A fresh caller whose one line stands at `spent` settled and `reserved` in flight."""
    who = Identity(f"p{next(_ids)}", org="acme")
    amount = "input_tokens" if dimension == "total_tokens" else dimension
    held = await engine.reserve(policy, who, run_id=None, reservation_id=None, estimate={amount: reserved}, meta={})
    done = await engine.reserve(policy, who, run_id=None, reservation_id=None, estimate={}, meta={})
    assert held.allowed and done.allowed
    await engine.settle(done.hold, {dimension: spent})
    return who


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
@pytest.mark.parametrize("dimension", DIMENSIONS)
async def test_exhausted_agrees_with_engine_check(engine, mode, dimension):
    policy = _policy(mode, dimension)
    refused = 0
    for spent, reserved in itertools.product(SPENT, RESERVED):
        who = await _at(engine, policy, dimension, spent, reserved)
        checked = await engine.check(policy, who)
        snap = await engine.snapshot_lines(policy, who)
        ((lim, st),) = snap.rows()
        assert (st.spent, st.reserved) == (spent, reserved)
        assert exhausted(lim.line, st) == (not checked.allowed), (mode, dimension, spent, reserved)
        assert exhausted_for_good(lim.line, st) == exhausted(lim.line, st)  # nothing here frees with time
        refused += not checked.allowed
    assert (refused == 0) == (mode is Mode.ADVISORY)  # the grid reaches refusals in every blocking mode


async def test_soft_gate_margin_is_not_a_refusal_on_headers(engine):
    """The bug the session's old copy had: past the limit but inside the margin, check allows."""
    policy = _policy(Mode.SOFT_GATE, "cost")
    who = await _at(engine, policy, "cost", 105, 0)
    checked = await engine.check(policy, who)
    ((lim, st),) = (await engine.snapshot_lines(policy, who)).rows()
    assert checked.allowed and st.spent > st.limit and not exhausted(lim.line, st)


async def test_lines_that_free_with_time_are_left_to_the_reservation(engine):
    policy = make_policy(budgets=[{"scope": "key", "limits": [
        {"dimension": "cost", "limit": "0.0000001", "window": "rolling", "seconds": 60},
        {"dimension": "concurrency", "limit": 1},
    ]}])  # fmt: skip
    who = Identity("busy", org="acme")
    d = await engine.reserve(policy, who, run_id=None, reservation_id=None, estimate={"cost": 100}, meta={})
    assert d.allowed and not (await engine.check(policy, who)).allowed
    for lim, st in (await engine.snapshot_lines(policy, who)).rows():
        assert exhausted(lim.line, st) and not exhausted_for_good(lim.line, st)
