"""Enforce during the stream, through real Envoy with the demo policy (bench/fanout.py's scenarios).

Right-sized reservations serve an agent's whole fan-out while its budget is
almost unspent; when the real total does not fit, every call is served whole,
cut cleanly in the API's terms or refused, and spend never passes the limit.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import yaml

from bench import fanout

pytestmark = pytest.mark.integration

# The overflow scenario in quarter-length calls: bench/fanout.py's 4,000-token calls become
# 1,000 tokens on a policy whose gpt-4o and gpt-4o-mini output prices are 4x and output limits
# 1/4, so every call, reservation and limit is the same in dollars (the same served, downshifted
# and refused counts, spent equal to the nano-dollar) for a quarter of the streamed chunks.
SCALE = 4
TOKENS = 4000 // SCALE


def scaled(policy_text: str) -> str:
    doc = yaml.safe_load(policy_text)
    for name in ("gpt-4o", "gpt-4o-mini"):
        model = doc["prices"]["models"][name]
        model["output"] = str(Decimal(model["output"]) * SCALE)
        model["output_limit"] //= SCALE
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "upstream_stream-json"])
async def test_a_fan_out_that_fits_is_served_whole(make_stack, stream):
    stack = make_stack(fanout.demo_policy(upstream_stream=not stream))
    s = await fanout.fits(stack, stream=stream)
    assert s.outcome.errors == []
    assert (s.outcome.served, s.outcome.cut, s.outcome.refused) == (20, 0, 0)
    assert s.state["reserved"] == 0 and s.state["spent"] <= s.state["limit"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "upstream_stream-json"])
async def test_a_fan_out_that_overflows_is_served_cut_or_refused_and_never_overspends(make_stack, stream):
    stack = make_stack(scaled(fanout.demo_policy(upstream_stream=not stream)))
    s = await fanout.overflows(stack, stream=stream, tokens=TOKENS)
    o = s.outcome
    assert o.errors == []  # no SDK exception: every cut call ended like an output-capped one
    assert o.served + o.downshifted + o.cut + o.refused == 20
    assert o.served >= 10, o.row()  # whole on gpt-4o
    assert s.state["reserved"] == 0
    assert s.state["spent"] <= s.state["limit"], (s.state, o.row())  # to the nano-dollar
    whole = sorted(o.output_tokens)[-(o.served + o.downshifted) :]
    assert all(t == TOKENS for t in whole)  # the served ones are whole


async def test_a_run_past_its_wall_clock_deadline_is_cut_within_100_ms(make_stack):
    stack = make_stack(fanout.demo_policy(run_seconds=2))
    late = await fanout.deadline(stack, seconds=2)
    assert late <= 0.1, f"cut {late * 1000:.0f} ms after the deadline"
