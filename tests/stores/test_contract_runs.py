"""Store contract: runs. Created on first sight, TTL refreshed by every attempt,
a cap on active runs per owner, client-lowered limits that stick, admin close,
and purge by the reaper once the run's memory has passed."""

from __future__ import annotations

from dataclasses import replace

from extproc.stores.base import RunRef, RunRefusal
from tests.stores.helpers import NOW, concurrency, cost, counter, duration, entries, spent_reserved, state, take

HOUR = 3_600_000
MEM = 86_400_000


def ref(name: str, owner: str = "alice", max_active: int = 2) -> RunRef:
    return RunRef(key=f"{owner}/{name}", owner=owner, ttl_ms=HOUR, max_active=max_active, memory_ms=MEM)


def rline(run: RunRef, limit: int = 100, amount: int = 10, lower: int | None = None):
    return cost(f"run:{run.key}|cost", limit, amount, run=True, lower=lower)


async def test_run_is_created_on_first_sight_and_refreshed_by_activity(store, tag):
    run = ref("r1")
    assert await store.run_state(tag, run.key, now_ms=NOW) is None
    assert (await take(store, tag, "a", [rline(run)], NOW, run=run)).ok
    st = await store.run_state(tag, run.key, now_ms=NOW)
    assert (st.state, st.owner, st.created_at_ms, st.seen_at_ms, st.expires_at_ms) == ("active", "alice", NOW, NOW, NOW + HOUR)
    assert (await take(store, tag, "b", [rline(run)], NOW + HOUR - 1, run=run)).ok
    st = await store.run_state(tag, run.key, now_ms=NOW + HOUR)
    assert (st.state, st.created_at_ms, st.expires_at_ms) == ("active", NOW, 2 * HOUR + NOW - 1)


async def test_idle_run_expires_and_is_refused(store, tag):
    run = ref("r1")
    assert (await take(store, tag, "a", [rline(run)], NOW, run=run)).ok
    await store.settle(tag, "a", {"cost": 10}, now_ms=NOW + 5)
    r = await take(store, tag, "b", [rline(run)], NOW + HOUR, run=run)
    assert not r.ok and r.reason is RunRefusal.EXPIRED and r.blocked is None
    assert len(r.states) == 1 and r.states[0].spent == 10
    assert (await store.run_state(tag, run.key, now_ms=NOW + HOUR)).state == "expired"
    # a refusal by the run touches nothing: still expired later
    assert (await take(store, tag, "c", [rline(run)], NOW + HOUR + 1, run=run)).reason is RunRefusal.EXPIRED


async def test_cap_on_active_runs_per_owner(store, tag):
    r1, r2, r3 = ref("r1"), ref("r2"), ref("r3")
    assert (await take(store, tag, "a", [rline(r1)], NOW, run=r1)).ok
    assert (await take(store, tag, "b", [rline(r2)], NOW + 1_000, run=r2)).ok
    r = await take(store, tag, "c", [rline(r3)], NOW + 2_000, run=r3)
    assert not r.ok and r.reason is RunRefusal.LIMIT and r.active_runs == 2
    assert r.retry_after_ms == HOUR - 2_000  # r1 expires first
    assert await store.run_state(tag, r3.key, now_ms=NOW + 2_000) is None  # refused: not created
    # existing runs are not capped; another owner has its own cap
    assert (await take(store, tag, "d", [rline(r1)], NOW + 3_000, run=r1)).ok
    bob = ref("r3", owner="bob")
    assert (await take(store, tag, "e", [rline(bob)], NOW + 3_000, run=bob)).ok
    # now r2 expires first (r1 was refreshed)
    r = await take(store, tag, "f", [rline(r3)], NOW + 4_000, run=r3)
    assert r.reason is RunRefusal.LIMIT and r.retry_after_ms == HOUR + 1_000 - 4_000
    assert (await take(store, tag, "g", [rline(r3)], NOW + HOUR + 1_000, run=r3)).ok


async def test_cap_retry_waits_for_enough_runs_when_the_cap_was_lowered(store, tag):
    for i in range(3):
        run = ref(f"r{i}", max_active=5)
        assert (await take(store, tag, f"a{i}", [], NOW + i * 1_000, run=run)).ok
    r = await take(store, tag, "x", [], NOW + 5_000, run=ref("new", max_active=2))
    assert r.reason is RunRefusal.LIMIT and r.active_runs == 3
    assert r.retry_after_ms == HOUR + 1_000 - 5_000  # two of three must expire: the second one's expiry


async def test_closed_run_refuses_and_frees_its_slot(store, tag):
    r1, r2, r3 = ref("r1"), ref("r2"), ref("r3")
    assert (await take(store, tag, "a", [rline(r1)], NOW, run=r1)).ok
    assert (await take(store, tag, "b", [rline(r2)], NOW, run=r2)).ok
    st = await store.close_run(tag, r1, now_ms=NOW + 10)
    assert st.state == "closed" and st.created_at_ms == NOW
    r = await take(store, tag, "c", [rline(r1)], NOW + 20, run=r1)
    assert not r.ok and r.reason is RunRefusal.CLOSED
    assert (await take(store, tag, "d", [rline(r3)], NOW + 20, run=r3)).ok
    # in-flight reservations of a closed run still settle
    assert (await store.settle(tag, "a", {"cost": 7}, now_ms=NOW + 30)).found
    assert (await state(store, tag, rline(r1), NOW + 30)).spent == 7


async def test_closing_an_unseen_run_keeps_it_from_starting(store, tag):
    run = ref("later")
    st = await store.close_run(tag, run, now_ms=NOW)
    assert st.state == "closed"
    assert (await take(store, tag, "a", [rline(run)], NOW + 1, run=run)).reason is RunRefusal.CLOSED


async def test_client_may_lower_but_never_raise(store, tag):
    run = ref("r1")
    r = await take(store, tag, "a", [rline(run, 100, 40, lower=50)], NOW, run=run)
    assert r.ok and r.states[0].limit == 50
    r = await take(store, tag, "b", [rline(run, 100, 20)], NOW + 1, run=run)  # header omitted: still 50
    assert not r.ok and r.blocked == 0 and r.states[0].limit == 50
    r = await take(store, tag, "c", [rline(run, 100, 20, lower=90)], NOW + 2, run=run)  # asking higher: still 50
    assert not r.ok and r.states[0].limit == 50
    assert (await take(store, tag, "d", [rline(run, 100, 10, lower=500)], NOW + 3, run=run)).ok
    # a policy limit below the client's value wins too
    assert (await state(store, tag, rline(run, 30, 0), NOW + 4)).limit == 30


async def test_lowering_sticks_even_when_that_request_is_refused(store, tag):
    run = ref("r1")
    assert (await take(store, tag, "a", [rline(run, 100, 40)], NOW, run=run)).ok
    r = await take(store, tag, "b", [rline(run, 100, 20, lower=45)], NOW + 1, run=run)
    assert not r.ok and r.states[0].limit == 45
    assert (await state(store, tag, rline(run), NOW + 2)).limit == 45


async def test_lowering_applies_to_run_lines_only(store, tag):
    run = ref("r1")
    key_line = cost("key:alice|cost", 100, 10, lower=5)  # not a run line: `lower` is ignored
    r = await take(store, tag, "a", [key_line, rline(run, 100, 10, lower=60)], NOW, run=run)
    assert r.ok and [s.limit for s in r.states] == [100, 60]


async def test_admin_set_limit_drops_the_clients_lowering(store, tag):
    run = ref("r1")
    assert (await take(store, tag, "a", [rline(run, 100, 10, lower=20)], NOW, run=run)).ok
    line = rline(run)
    await store.adjust(tag, line.key, credit=1_000)
    assert (await state(store, tag, line)).limit == 20  # credit does not lift the client's own cap
    await store.adjust(tag, line.key, set_limit=300)
    assert (await state(store, tag, line)).limit == 1_300


async def test_check_takes_nothing_and_creates_nothing(store, tag):
    run = ref("r1")
    r = await store.check(tag, [rline(run, 100, 10, lower=5)], now_ms=NOW, run=run)
    assert not r.ok and r.blocked == 0 and r.states[0].limit == 5
    r = await store.check(tag, [rline(run, 100, 10)], now_ms=NOW, run=run)
    assert r.ok and r.states[0].reserved == 0
    assert await store.run_state(tag, run.key, now_ms=NOW) is None
    assert await spent_reserved(store, tag, rline(run)) == (0, 0)
    await store.close_run(tag, run, now_ms=NOW)
    assert (await store.check(tag, [rline(run)], now_ms=NOW, run=run)).reason is RunRefusal.CLOSED
    for i in range(2):
        assert (await take(store, tag, f"x{i}", [], NOW, run=ref(f"o{i}"))).ok
    r = await store.check(tag, [], now_ms=NOW, run=ref("o3"))
    assert r.reason is RunRefusal.LIMIT and r.retry_after_ms == HOUR


async def test_run_limits_of_every_dimension(store, tag):
    run = ref("r1")
    k = f"run:{run.key}"
    lines = [
        cost(f"{k}|cost", 1_000, 10, run=True),
        counter(f"{k}|steps", "requests", 2, 1, run=True),
        concurrency(f"{k}|fan", 5, run=True),
        duration(f"{k}|wall", 60, run=True),
    ]
    for i in range(2):
        assert (await take(store, tag, f"s{i}", lines, NOW + i, run=run)).ok
        await store.settle(tag, f"s{i}", {"cost": 10, "requests": 1}, now_ms=NOW + i)
    r = await take(store, tag, "s2", lines, NOW + 2, run=run)
    assert not r.ok and r.blocked == 1
    lowered = [replace(lines[0]), replace(lines[1], limit=10), lines[2], replace(lines[3], lower=30)]
    assert (await take(store, tag, "s3", lowered, NOW + 29_000, run=run)).ok
    r = await take(store, tag, "s4", lowered, NOW + 30_000, run=run)
    assert not r.ok and r.blocked == 3 and (r.states[3].spent, r.states[3].limit) == (30, 30)


async def test_reaper_purges_a_forgotten_run(store, tag):
    run = ref("r1")
    line = rline(run, 100, 40, lower=60)
    assert (await take(store, tag, "a", [line, duration(f"run:{run.key}|wall", 10_000, run=True)], NOW, run=run)).ok
    await store.settle(tag, "a", {"cost": 40}, now_ms=NOW)
    await store.adjust(tag, line.key, credit=5)
    await store.expire(now_ms=NOW + HOUR + MEM - 1)
    assert (await store.run_state(tag, run.key, now_ms=NOW + HOUR + MEM - 1)).state == "expired"
    await store.expire(now_ms=NOW + HOUR + MEM)
    assert await store.run_state(tag, run.key, now_ms=NOW + HOUR + MEM) is None
    later = NOW + HOUR + MEM + 1
    st = await state(store, tag, rline(run), later)
    assert (st.spent, st.reserved, st.limit) == (0, 0, 100)  # counters, credit and lowering are gone
    assert (await state(store, tag, duration(f"run:{run.key}|wall", 10), later)).spent == 0
    r = await take(store, tag, "b", [rline(run)], later, run=run)
    assert r.ok and (await store.run_state(tag, run.key, now_ms=later)).created_at_ms == later
    assert len(await entries(store, tag, "a")) == 1  # the ledger is never purged


async def test_purge_waits_for_reservations_in_flight(store, tag):
    run = ref("r1")
    assert (await take(store, tag, "a", [rline(run, 100, 40)], NOW, run=run, ttl=10 * MEM)).ok
    await store.expire(now_ms=NOW + HOUR + MEM)
    assert await store.run_state(tag, run.key, now_ms=NOW + HOUR + MEM) is not None
    await store.settle(tag, "a", {"cost": 40}, now_ms=NOW + HOUR + MEM + 1)
    await store.expire(now_ms=NOW + HOUR + MEM + 60_000)
    assert await store.run_state(tag, run.key, now_ms=NOW + HOUR + MEM + 60_000) is None
