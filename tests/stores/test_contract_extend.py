"""Store contract: extensions. A reserved reservation grows by a delta while its call
runs (a stream's output), all lines or none, with the TTL pushed; settle, release
and expiry afterwards give back and charge the grown amounts. Reservations may
carry headroom: it must fit on reserve, but only the amount is taken."""

from __future__ import annotations

import pytest

from extproc.stores.base import Mode, Outcome, RunRef, RunRefusal
from tests.stores.helpers import (
    NOW,
    TTL,
    concurrency,
    cost,
    counter,
    duration,
    entries,
    mode,
    rolling,
    spent_reserved,
    state,
    take,
)

HOUR = 3_600_000


async def grow(store, tag, rid, delta, now=NOW, ttl=TTL):
    return await store.extend(tag, rid, delta, now_ms=now, ttl_ms=ttl)


async def test_extension_fits_then_refuses_at_the_exact_limit(store, tag):
    line = cost("k", 100, 10)
    assert (await take(store, tag, "other", [cost("k", 100, 50)])).ok
    assert (await take(store, tag, "a", [line])).ok
    r = await grow(store, tag, "a", {"cost": 30})
    assert r.ok and r.found and r.blocked is None and r.reason is None
    assert [(s.key, s.limit, s.spent, s.reserved) for s in r.states] == [("k", 100, 0, 90)]
    r = await grow(store, tag, "a", {"cost": 11})
    assert not r.ok and r.found and r.blocked == 0 and r.states[0].reserved == 90  # as found
    assert await spent_reserved(store, tag, line) == (0, 90)
    r = await grow(store, tag, "a", {"cost": 10})
    assert r.ok and r.states[0].remaining == 0


async def test_every_extension_adds(store, tag):
    assert (await take(store, tag, "a", [cost("k", 100, 10)])).ok
    for _ in range(3):
        assert (await grow(store, tag, "a", {"cost": 5})).ok  # not idempotent: a retry takes again
    assert await spent_reserved(store, tag, cost("k", 100)) == (0, 25)


async def test_all_lines_or_none(store, tag):
    lines = [cost("key", 1_000, 10), cost("team", 100, 10), counter("tok", "total_tokens", 50, 20)]
    assert (await take(store, tag, "a", lines)).ok
    r = await grow(store, tag, "a", {"cost": 91, "total_tokens": 5})
    assert not r.ok and r.blocked == 1
    assert [s.reserved for s in r.states] == [10, 10, 20]
    assert [await spent_reserved(store, tag, l) for l in lines] == [(0, 10), (0, 10), (0, 20)]
    r = await grow(store, tag, "a", {"cost": 90, "total_tokens": 31})
    assert not r.ok and r.blocked == 2
    r = await grow(store, tag, "a", {"cost": 90, "total_tokens": 30})
    assert r.ok and [s.reserved for s in r.states] == [100, 100, 50]


async def test_lines_of_other_dimensions_and_concurrency_are_neither_checked_nor_grown(store, tag):
    lines = [cost("c", 100, 10), counter("req", "requests", 1, 1), concurrency("fan", 1)]
    assert (await take(store, tag, "a", lines)).ok
    assert (await take(store, tag, "b", [counter("req", "requests", 100, 5)])).ok  # req is now over its limit of 1
    r = await grow(store, tag, "a", {"cost": 20})
    assert r.ok and [s.reserved for s in r.states] == [30, 6, 1]


async def test_soft_gate_extends_into_its_margin(store, tag):
    assert (await take(store, tag, "a", [mode(cost("k", 100, 90), Mode.SOFT_GATE, margin=10)])).ok
    assert (await grow(store, tag, "a", {"cost": 20})).ok
    r = await grow(store, tag, "a", {"cost": 1})
    assert not r.ok and r.blocked == 0 and r.states[0].reserved == 110


async def test_actuals_only_refuses_once_spent_reaches_the_limit(store, tag):
    line = mode(cost("k", 100, 10), Mode.ACTUALS_ONLY)
    assert (await take(store, tag, "a", [line])).ok
    assert (await grow(store, tag, "a", {"cost": 500})).ok  # in flight does not count
    assert (await take(store, tag, "b", [line])).ok
    await store.settle(tag, "b", {"cost": 100}, now_ms=NOW)
    r = await grow(store, tag, "a", {"cost": 1})
    assert not r.ok and r.blocked == 0


async def test_advisory_lines_grow_and_never_refuse(store, tag):
    adv = mode(cost("adv", 10, 5), Mode.ADVISORY)
    assert (await take(store, tag, "a", [adv, cost("hard", 1_000, 5)])).ok
    r = await grow(store, tag, "a", {"cost": 500})
    assert r.ok and [s.reserved for s in r.states] == [505, 505]


async def test_rolling_window_drops_old_charges_before_checking(store, tag):
    line = rolling("rw", 100, 0, window_ms=60_000)
    assert (await take(store, tag, "old", [rolling("rw", 100, 60)], NOW)).ok
    await store.settle(tag, "old", {"cost": 60}, now_ms=NOW)
    assert (await take(store, tag, "a", [rolling("rw", 100, 10)], NOW + 1)).ok
    r = await grow(store, tag, "a", {"cost": 40}, NOW + 59_999)
    assert not r.ok and r.states[0].spent == 60
    r = await grow(store, tag, "a", {"cost": 40}, NOW + 60_000)
    assert r.ok and (r.states[0].spent, r.states[0].reserved) == (0, 50)
    assert await spent_reserved(store, tag, line, NOW + 60_000) == (0, 50)


async def test_credits_overrides_and_a_runs_lowered_limit_apply(store, tag):
    line = cost("k", 100, 50)
    assert (await take(store, tag, "a", [line])).ok
    assert not (await grow(store, tag, "a", {"cost": 60})).ok
    await store.adjust(tag, "k", credit=10)
    r = await grow(store, tag, "a", {"cost": 60})
    assert r.ok and r.states[0].limit == 110
    await store.adjust(tag, "k", set_limit=200)
    r = await grow(store, tag, "a", {"cost": 100})
    assert r.ok and (r.states[0].limit, r.states[0].reserved) == (210, 210)

    run = RunRef("alice/r1", "alice", HOUR, 5)
    rline = cost("run:alice/r1|cost", 1_000, 10, run=True, lower=40)
    assert (await take(store, tag, "b", [rline], run=run)).ok
    r = await grow(store, tag, "b", {"cost": 31})
    assert not r.ok and r.states[0].limit == 40
    assert (await grow(store, tag, "b", {"cost": 30})).ok


async def test_duration_deadline_refuses_and_is_reported(store, tag):
    wall = duration("run:x|wall", 60)
    r = await store.check(tag, [wall], now_ms=NOW)
    assert r.deadline_ms == NOW + 60_000  # were it taken now
    r = await take(store, tag, "a", [cost("k", 1_000, 10), wall])
    assert r.ok and r.deadline_ms == NOW + 60_000
    r = await take(store, tag, "b", [wall], NOW + 5_000)
    assert r.ok and r.deadline_ms == NOW + 60_000  # from the first reservation on the line
    assert (await take(store, tag, "b", [wall], NOW + 6_000)).deadline_ms == NOW + 60_000  # replayed
    r = await grow(store, tag, "a", {"cost": 10}, NOW + 59_999)
    assert r.ok and r.deadline_ms == NOW + 60_000
    r = await grow(store, tag, "a", {"cost": 10}, NOW + 60_000)
    assert not r.ok and r.blocked == 1 and r.deadline_ms == NOW + 60_000
    assert await spent_reserved(store, tag, cost("k", 1_000), NOW + 60_000) == (0, 20)
    assert (await grow(store, tag, "a", {}, NOW + 60_000)).blocked == 1  # even with nothing to add
    # an advisory duration line sets no deadline and never refuses
    soft = mode(duration("run:y|wall", 1), Mode.ADVISORY)
    r = await take(store, tag, "c", [soft], NOW)
    assert r.ok and r.deadline_ms is None
    r = await grow(store, tag, "c", {"cost": 1}, NOW + 10_000)
    assert r.ok and r.deadline_ms is None
    assert (await take(store, tag, "d", [cost("k", 1_000, 1)])).deadline_ms is None


async def test_closed_run_refuses_and_an_active_one_is_kept_alive(store, tag):
    run = RunRef("alice/r1", "alice", HOUR, 5)
    rline = cost("run:alice/r1|cost", 1_000, 10, run=True)
    assert (await take(store, tag, "a", [rline], run=run)).ok
    r = await grow(store, tag, "a", {"cost": 10}, NOW + HOUR - 1)
    assert r.ok
    st = await store.run_state(tag, run.key, now_ms=NOW + HOUR)
    assert (st.state, st.seen_at_ms, st.expires_at_ms) == ("active", NOW + HOUR - 1, NOW + 2 * HOUR - 1)
    await store.close_run(tag, run, now_ms=NOW + HOUR)
    r = await grow(store, tag, "a", {"cost": 10}, NOW + HOUR + 1)
    assert not r.ok and r.found and r.reason is RunRefusal.CLOSED and r.blocked is None
    assert r.states[0].reserved == 20
    assert (await store.settle(tag, "a", {"cost": 15}, now_ms=NOW + HOUR + 2)).found  # still settles
    assert await spent_reserved(store, tag, rline, NOW + HOUR + 2) == (15, 0)


async def test_expired_run_refuses(store, tag):
    run = RunRef("alice/r1", "alice", 1_000, 5)
    assert (await take(store, tag, "a", [cost("k", 100, 10)], run=run, ttl=HOUR)).ok
    r = await grow(store, tag, "a", {"cost": 1}, NOW + 1_000)
    assert not r.ok and r.reason is RunRefusal.EXPIRED


async def test_unknown_or_closed_reservations_are_not_found(store, tag):
    assert (r := await grow(store, tag, "nope", {"cost": 1})).found is False and not r.ok and r.states == ()
    assert not (await take(store, tag, "refused", [cost("k", 10, 11)])).ok
    assert not (await grow(store, tag, "refused", {"cost": 1})).found
    assert (await take(store, tag, "a", [cost("k", 100, 10)])).ok
    await store.release(tag, "a", now_ms=NOW)
    assert not (await grow(store, tag, "a", {"cost": 1})).found
    assert await spent_reserved(store, tag, cost("k", 100)) == (0, 0)


async def test_negative_deltas_are_refused_before_the_store(store, tag):
    with pytest.raises(ValueError):
        await grow(store, tag, "a", {"cost": -1})


async def test_extension_pushes_the_ttl_and_expiry_charges_the_grown_estimate(store, tag):
    lines = [cost("k", 1_000, 10), counter("out", "output_tokens", 1_000, 20), counter("tot", "total_tokens", 1_000, 25)]
    meta = {"estimate": {"cost": 10, "input_tokens": 5, "output_tokens": 20}}
    assert (await take(store, tag, "a", lines, ttl=1_000, meta=meta)).ok
    assert (await grow(store, tag, "a", {"cost": 4, "output_tokens": 8, "total_tokens": 8}, NOW + 900, ttl=1_000)).ok
    assert await store.expire(now_ms=NOW + 1_000) == 0  # the old expiry has passed: not reaped
    assert await spent_reserved(store, tag, lines[0], NOW + 1_000) == (0, 14)
    assert await store.expire(now_ms=NOW + 1_900) == 1
    (e,) = await entries(store, tag, "a")
    grown = {"cost": 14, "input_tokens": 5, "output_tokens": 28, "total_tokens": 33}
    assert e.outcome is Outcome.EXPIRED and e.reserved == grown and e.charged == grown
    assert [await spent_reserved(store, tag, l, NOW + 1_900) for l in lines] == [(14, 0), (28, 0), (33, 0)]


async def test_settle_and_release_give_back_the_grown_amounts(store, tag):
    lines = [cost("k", 1_000, 10), rolling("rw", 1_000, 10)]
    for rid in ("s", "r"):
        assert (await take(store, tag, rid, lines)).ok
        assert (await grow(store, tag, rid, {"cost": 30})).ok
        assert (await grow(store, tag, rid, {"cost": 20})).ok
    assert [await spent_reserved(store, tag, l) for l in lines] == [(0, 120), (0, 120)]
    await store.settle(tag, "s", {"cost": 45}, now_ms=NOW + 1)
    await store.release(tag, "r", now_ms=NOW + 2)
    assert [await spent_reserved(store, tag, l, NOW + 2) for l in lines] == [(45, 0), (45, 0)]
    by_rid = {e.reservation_id: e for e in await entries(store, tag)}
    assert by_rid["s"].reserved == {"cost": 60} and by_rid["s"].charged == {"cost": 45}
    assert by_rid["r"].reserved == {"cost": 60} and by_rid["r"].charged == {}


async def test_large_amounts_stay_exact(store, tag):
    big = 10**15 + 7  # nano-USD: past the 14 digits Lua's cjson would round to
    assert (await take(store, tag, "a", [cost("k", 4 * big, big)], ttl=1_000)).ok
    assert (await grow(store, tag, "a", {"cost": big + 1})).ok
    await store.expire(now_ms=NOW + TTL)
    (e,) = await entries(store, tag, "a")
    assert e.charged == {"cost": 2 * big + 1}
    assert await spent_reserved(store, tag, cost("k", 0), NOW + TTL) == (2 * big + 1, 0)


async def test_headroom_must_fit_but_only_the_amount_is_taken(store, tag):
    assert (await take(store, tag, "other", [cost("k", 100, 50)])).ok
    r = await take(store, tag, "a", [cost("k", 100, 10, headroom=41)])
    assert not r.ok and r.blocked == 0
    r = await store.check(tag, [cost("k", 100, 10, headroom=41)], now_ms=NOW)
    assert not r.ok
    r = await take(store, tag, "b", [cost("k", 100, 10, headroom=40)])
    assert r.ok and r.states[0].reserved == 60
    assert await spent_reserved(store, tag, cost("k", 100)) == (0, 60)
    # soft gate: headroom fits into the margin; advisory and concurrency lines ignore it
    r = await take(store, tag, "c", [mode(cost("s", 100, 10, headroom=95), Mode.SOFT_GATE, margin=5)])
    assert r.ok and r.states[0].reserved == 10
    assert (await take(store, tag, "d", [mode(cost("adv", 1, 1, headroom=10), Mode.ADVISORY)])).ok
    # an extension ignores the headroom the reservation was taken with
    assert (await grow(store, tag, "b", {"cost": 40})).ok
    assert await spent_reserved(store, tag, cost("k", 100)) == (0, 100)


async def test_headroom_counts_in_a_rolling_windows_retry_after(store, tag):
    assert (await take(store, tag, "old", [rolling("rw", 100, 60)], NOW)).ok
    await store.settle(tag, "old", {"cost": 60}, now_ms=NOW)
    r = await take(store, tag, "a", [rolling("rw", 100, 10, headroom=40)], NOW + 1_000)
    assert not r.ok and r.retry_after_ms == 59_000
    assert (await take(store, tag, "b", [rolling("rw", 100, 10, headroom=30)], NOW + 1_000)).ok
    assert (await state(store, tag, rolling("rw", 100), NOW + 1_000)).reserved == 10
