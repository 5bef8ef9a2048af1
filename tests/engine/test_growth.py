"""Right-sized reservations: what a streamed call expects, and when its hold must grow."""

from __future__ import annotations

from decimal import Decimal

from extproc.engine.growth import END_MARGIN_TOKENS, Need, OutputHistory, StreamGrowth, expected_output
from extproc.policy.model import ModelSpec, StreamingSpec


def test_history_percentile_is_nearest_rank_and_needs_min_calls() -> None:
    h = OutputHistory()
    for n in (100, 200, 300):
        h.add("bob", "gpt-4o", n, size=20)
    assert h.percentile("bob", "gpt-4o", 95, min_count=4) is None
    h.add("bob", "gpt-4o", 4000, size=20)
    assert h.percentile("bob", "gpt-4o", 95, min_count=4) == 4000
    assert h.percentile("bob", "gpt-4o", 50, min_count=4) == 200
    assert h.percentile("alice", "gpt-4o", 50, min_count=1) is None  # per principal
    assert h.percentile("bob", "gpt-4o-mini", 50, min_count=1) is None  # per model


def test_history_keeps_the_last_calls_and_bounds_its_keys() -> None:
    h = OutputHistory(keys=2)
    for n in (5000, 10, 10, 10):
        h.add("bob", "m", n, size=3)
    assert h.percentile("bob", "m", 100, min_count=3) == 10  # the 5000 fell out of the window
    h.add("carol", "m", 1, size=3)
    h.add("dave", "m", 1, size=3)
    assert h.percentile("bob", "m", 100, min_count=1) is None  # least recently used key evicted


def test_expected_output_prefers_history_then_policy_then_nothing() -> None:
    streaming = StreamingSpec(min_history=2)
    bare = ModelSpec(input="1", output="1")
    hinted = ModelSpec(input="1", output="1", expected_output_tokens=700)
    h = OutputHistory()
    assert expected_output(h, streaming, bare, "bob", "m") is None
    assert expected_output(h, streaming, hinted, "bob", "m") == 700 + 700 // 8  # plus a margin for the end
    h.add("bob", "m", 3, size=20)
    h.add("bob", "m", 5, size=20)
    assert expected_output(h, streaming, hinted, "bob", "m") == 5 + END_MARGIN_TOKENS  # history first; a floor on the margin


def test_growth_asks_before_the_output_reaches_the_reservation() -> None:
    g = StreamGrowth(reserved=1000, cap=16384, step_tokens=256, safety=Decimal(1), deadline_ms=None)
    assert g.need(900, 10) is None  # 900 + max(16, 20) <= 1000
    need = g.need(990, 10)
    assert need == Need(tokens=1010, step=1256)  # at least the lookahead; the step (or a quarter) if it fits
    g.grew(1256, 0)
    assert g.need(1200, 10) is None and g.extensions == 1


def test_growth_never_asks_past_the_cap() -> None:
    g = StreamGrowth(reserved=1000, cap=1100, step_tokens=256, safety=Decimal(1), deadline_ms=None)
    assert g.need(1000, 10) == Need(tokens=1020, step=1100)
    g.grew(1100, 0)
    assert g.need(1100, 10) is None  # the backend stops at the cap it was given
    assert g.covers(1100)


def test_growth_scales_counts_by_the_safety_factor_and_large_chunks_widen_the_lookahead() -> None:
    g = StreamGrowth(reserved=1000, cap=10_000, step_tokens=256, safety=Decimal("1.2"), deadline_ms=None)
    assert g.need(800, 1) is None and g.need(850, 1) is not None  # 960 + 16 fits, 1020 + 16 does not
    g2 = StreamGrowth(reserved=1000, cap=10_000, step_tokens=256, safety=Decimal(1), deadline_ms=None)
    assert g2.need(700, 200) is not None  # 700 + 400 > 1000
    assert not g2.covers(1001) and g2.covers(1000)


def test_worst_case_holds_never_grow_but_still_see_the_deadline() -> None:
    g = StreamGrowth(reserved=4096, cap=4096, step_tokens=256, safety=Decimal(1), deadline_ms=5_000)
    assert g.need(4090, 50) is None
    assert not g.past_deadline(4_999) and g.past_deadline(5_000)


def test_a_long_stream_that_does_not_grow_is_due_a_touch_every_half_ttl() -> None:
    g = StreamGrowth(reserved=4096, cap=4096, step_tokens=256, safety=Decimal(1), deadline_ms=None, touch_every_ms=300_000, now_ms=0)
    assert not g.stale(299_999) and g.stale(300_000)
    g.grew(4096, 300_000)  # a touch: the TTL pushed, nothing grown
    assert g.extensions == 0 and not g.stale(500_000) and g.stale(600_000)


def test_a_refusal_by_the_run_names_why() -> None:
    from extproc.engine.budget import Decision, Hold
    from extproc.engine.growth import cut_of
    from extproc.rules import Mode
    from extproc.stores.base import RunRefusal

    d = Decision(True, "id", Hold("t", "r"), (), (), None, (), None, {}, Mode.HARD_GATE, run="bob/r1")
    assert cut_of(d, None, run_refusal=RunRefusal.EXPIRED).scope == "run:bob/r1"
    assert cut_of(d, None, run_refusal=RunRefusal.EXPIRED).reason == "run_expired"
    assert cut_of(d, None, run_refusal=RunRefusal.CLOSED).reason == "run_closed"
