"""Property test: nested runs under random concurrent interleavings, against every store.

A tree of runs (a root, two children, a grandchild under the first child), each with
its own cost limit; every reservation of a run carries the lines of all its ancestors
(as the engine builds them). After every operation no run is over its limit; after
every round each run's spent equals the charges of the ledger entries that carried
its line (so a parent's spent is its own calls plus all its descendants'), and its
reserved equals what the open reservations of its subtree hold.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.stores.base import Kind, Line, RunRef
from tests.stores.test_property import EXAMPLES, T0, Clock, open_store  # noqa: F401 (fixture)

TAG = "nest"
HOUR = 3_600_000
TREE = {"root": (), "a": ("root",), "b": ("root",), "a1": ("root", "a")}  # run -> ancestors, root first


def ref(run: str) -> RunRef:
    ancestors = tuple(f"p/{a}" for a in TREE[run])
    inherited = frozenset(f"run:{a}|cost" for a in ancestors)
    return RunRef(f"p/{run}", "p", HOUR, 10, ancestors=ancestors, inherited=inherited)


def lines_of(run: str, limits: dict[str, int], amount: int) -> list[Line]:
    chain = (run, *TREE[run])
    return [Line(f"run:p/{r}|cost", Kind.COUNTER, "cost", limits[r], amount, run=True) for r in chain]


call = st.tuples(
    st.just("reserve"),
    st.sampled_from(sorted(TREE)),
    st.integers(0, 60),  # cost
    st.sampled_from(["settle", "settle", "release", "leave"]),
    st.integers(0, 100),  # share of the estimate actually used
)
op = st.one_of(call, st.tuples(st.just("tick"), st.integers(0, 2_000)), st.tuples(st.just("expire")))
programs = st.lists(st.lists(op, min_size=1, max_size=8), min_size=2, max_size=8)
tree_limits = st.fixed_dictionaries({r: st.integers(0, 200) for r in TREE})


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(programs=programs, limits=tree_limits)
def test_a_run_tree_never_outspends_any_of_its_runs(open_store, programs, limits):  # noqa: F811
    asyncio.run(_drive(open_store(), programs, limits))


async def _drive(store, programs: list[list[tuple]], limits: dict[str, int]) -> None:
    clock = Clock()
    taken: dict[str, tuple[str, int]] = {}  # rid -> (run, amount reserved on each line of its chain)
    every = [l for r in TREE for l in lines_of(r, limits, 0)[:1]]  # one line per run
    for run in TREE:  # the tree, parents first (a child names an existing parent)
        r = await store.reserve(TAG, f"make-{run}", lines_of(run, limits, 0), now_ms=T0, ttl_ms=1_000, meta={}, run=ref(run))
        assert r.ok, (run, r)
        await store.release(TAG, f"make-{run}", now_ms=T0)

    async def check_limits() -> None:
        for line, s in zip(every, await store.snapshot(every, tag=TAG, now_ms=clock.now)):
            assert s.spent >= 0 and s.reserved >= 0 and s.spent + s.reserved <= s.limit, (line.key, s)

    async def step(task: int, i: int, o: tuple) -> None:
        if o[0] == "tick":
            clock.now += o[1]
        elif o[0] == "expire":
            await store.expire(now_ms=clock.now, limit=1_000)
        else:
            _, run, cost, finish, share = o
            rid = f"t{task}-{i}"
            r = await store.reserve(
                TAG, rid, lines_of(run, limits, cost), now_ms=clock.now, ttl_ms=3_000, meta={"estimate": {"cost": cost}}, run=ref(run)
            )
            assert r.reason is None, r
            if r.ok:
                taken[rid] = (run, cost)
                await check_limits()
                await asyncio.sleep(0)
                if finish == "settle":
                    await store.settle(TAG, rid, {"cost": cost * share // 100}, now_ms=clock.now)
                elif finish == "release":
                    await store.release(TAG, rid, now_ms=clock.now)
        await check_limits()

    async def check_books() -> None:
        entries = {e.reservation_id: e for e in await store.ledger(tag=TAG)}
        for line, s in zip(every, await store.snapshot(every, tag=TAG, now_ms=clock.now)):
            run = line.key.split("/", 1)[1].split("|")[0]
            subtree = {r for r in TREE if r == run or run in TREE[r]}
            charged = sum(e.charged.get("cost", 0) for e in entries.values() if line.key in e.lines)
            mine = sum(e.charged.get("cost", 0) for rid, e in entries.items() if rid in taken and taken[rid][0] in subtree)
            assert s.spent == charged == mine, (line.key, s.spent, charged, mine)
            held = sum(a for rid, (r, a) in taken.items() if rid not in entries and r in subtree)
            assert s.reserved == held, (line.key, s.reserved, held)

    try:
        rounds = max(len(p) for p in programs)
        for i in range(rounds):
            await asyncio.gather(*(step(t, i, p[i]) for t, p in enumerate(programs) if i < len(p)))
            await check_books()
        clock.now += 10_000  # past every reservation's TTL: expiry charges what was left in flight
        await store.expire(now_ms=clock.now, limit=1_000)
        await check_books()
    finally:
        await store.close()
