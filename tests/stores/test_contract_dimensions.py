"""Store contract: every dimension (cost, input/output/total tokens, requests, concurrency, duration)."""

from __future__ import annotations

from tests.stores.helpers import NOW, concurrency, cost, counter, duration, entries, spent_reserved, state, take


async def test_token_dimensions_each_charge_their_own_usage(store, tag):
    lines = [
        counter("in", "input_tokens", 1000, 300),
        counter("out", "output_tokens", 1000, 500),
        counter("tot", "total_tokens", 1000, 800),
        cost("usd", 10**9, 12_000),
    ]
    r = await take(store, tag, "r", lines)
    assert r.ok and [s.reserved for s in r.states] == [300, 500, 800, 12_000]
    s = await store.settle(tag, "r", {"input_tokens": 200, "output_tokens": 100, "cost": 5000}, now_ms=NOW)
    # total_tokens is derived from input + output when the usage does not say
    assert s.charged == {"input_tokens": 200, "output_tokens": 100, "total_tokens": 300, "cost": 5000}
    got = await store.snapshot(lines, tag=tag, now_ms=NOW)
    assert [(x.spent, x.reserved) for x in got] == [(200, 0), (100, 0), (300, 0), (5000, 0)]
    (e,) = await entries(store, tag, "r")
    assert e.charged == s.charged


async def test_total_tokens_refuses_on_the_sum(store, tag):
    tot = counter("tot", "total_tokens", 1000)
    assert (await take(store, tag, "a", [counter("tot", "total_tokens", 1000, 700)])).ok
    r = await take(store, tag, "b", [counter("tot", "total_tokens", 1000, 301)])
    assert not r.ok and r.blocked == 0 and r.retry_after_ms is None
    assert (await take(store, tag, "c", [counter("tot", "total_tokens", 1000, 300)])).ok
    assert await spent_reserved(store, tag, tot) == (0, 1000)


async def test_requests_is_a_step_cap(store, tag):
    step = counter("steps", "requests", 3, 1)
    for i in range(3):
        assert (await take(store, tag, f"s{i}", [step])).ok
        await store.settle(tag, f"s{i}", {"requests": 1}, now_ms=NOW)
    r = await take(store, tag, "s3", [step])
    assert not r.ok and r.blocked == 0 and r.states[0].spent == 3
    assert await spent_reserved(store, tag, step) == (3, 0)


async def test_concurrency_counts_in_flight_and_never_spends(store, tag):
    c = concurrency("fan", 2)
    assert (await take(store, tag, "a", [c])).ok
    assert (await take(store, tag, "b", [c])).ok
    r = await take(store, tag, "c", [c])
    assert not r.ok and r.blocked == 0 and r.retry_after_ms == 1000
    assert (r.states[0].reserved, r.states[0].limit) == (2, 2)
    await store.settle(tag, "a", {"cost": 10, "requests": 1}, now_ms=NOW)
    assert (await take(store, tag, "d", [c])).ok
    await store.release(tag, "b", now_ms=NOW)
    await store.settle(tag, "d", {"cost": 1}, now_ms=NOW)
    assert await spent_reserved(store, tag, c) == (0, 0)


async def test_concurrency_of_zero_never_frees(store, tag):
    r = await take(store, tag, "a", [concurrency("none", 0)])
    assert not r.ok and r.retry_after_ms is None


async def test_duration_counts_whole_seconds_since_first_reservation(store, tag):
    d = duration("wall", 10)
    assert (await state(store, tag, d)).spent == 0  # not started: nothing elapsed
    assert (await take(store, tag, "a", [d], NOW)).ok
    r = await take(store, tag, "b", [d], NOW + 9_999)
    assert r.ok and r.states[0].spent == 9 and r.states[0].reserved == 0
    r = await take(store, tag, "c", [d], NOW + 10_000)
    assert not r.ok and r.blocked == 0 and r.states[0].spent == 10 and r.retry_after_ms is None
    assert (await state(store, tag, d, NOW + 25_500)).spent == 25
    # settling never moves the start
    await store.settle(tag, "a", {"cost": 1}, now_ms=NOW + 30_000)
    assert (await state(store, tag, d, NOW + 30_000)).spent == 30


async def test_a_refused_first_request_does_not_start_the_clock(store, tag):
    d = duration("wall", 10)
    r = await take(store, tag, "a", [cost("k", 5, 6), d], NOW)
    assert not r.ok and r.blocked == 0
    assert (await take(store, tag, "b", [d], NOW + 60_000)).ok
    assert (await state(store, tag, d, NOW + 61_000)).spent == 1
