"""Property test: random interleavings of reserve (with headroom) / extend /
settle / release / expiry from many concurrent tasks, against every store.

Each example builds a set of lines (hard, soft, actuals-only, advisory, rolling,
concurrency, tokens) with random limits and runs several tasks concurrently,
round by round. A task may hold a reservation across rounds, extend it (as a
stream's output grows) and settle it later with at most what it holds. After
every operation a task reads an atomic snapshot and checks that no hard line is
over its limit (`spent + reserved <= limit`, + margin on the soft line) and no
counter is negative; after every round (all tasks quiet) the driver checks the
books: reserved equals what the open reservations hold (extensions included),
spent equals the ledger's charges (within the window for rolling lines), and
every ledger entry charged what its outcome says (expiry: the grown estimate).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.stores.base import Kind, Line, Mode, Outcome, Window, normalize_usage
from extproc.stores.embedded import EmbeddedStore
from extproc.stores.journal import JournalStore
from extproc.stores.redis_store import RedisStore
from tests.support.redis_server import with_redis

T0 = 1_700_000_000_000
WINDOW = 4_000
TAG = "prop"

BASE = [
    Line("key", Kind.COUNTER, "cost", 0, 0),
    Line("team", Kind.COUNTER, "cost", 0, 0),
    Line("tok", Kind.COUNTER, "total_tokens", 0, 0),
    Line("roll", Kind.COUNTER, "cost", 0, 0, window=Window.ROLLING, window_ms=WINDOW),
    Line("soft", Kind.COUNTER, "cost", 0, 0, mode=Mode.SOFT_GATE, margin=15),
    Line("act", Kind.COUNTER, "cost", 0, 0, mode=Mode.ACTUALS_ONLY),
    Line("adv", Kind.COUNTER, "input_tokens", 0, 0, mode=Mode.ADVISORY),
    Line("fan", Kind.CONCURRENCY, "concurrency", 0, 1),
]
HARD = {"key", "team", "tok", "roll"}

reserve_op = st.tuples(
    st.just("reserve"),
    st.integers(1, 2 ** len(BASE) - 1),  # which lines
    st.integers(0, 60),  # cost
    st.integers(0, 30),  # input tokens
    st.integers(0, 30),  # output tokens
    st.integers(500, 6_000),  # ttl ms
    st.sampled_from(["settle", "settle", "release", "leave", "hold", "hold"]),  # hold: extend or close it later
    st.integers(0, 100),  # share of the estimate actually used
    st.integers(0, 60),  # cost headroom
    st.integers(0, 30),  # token headroom
)
extend_op = st.tuples(
    st.just("extend"),
    st.integers(0, 7),  # which of the task's held reservations
    st.integers(0, 30),  # cost delta
    st.integers(0, 20),  # output tokens delta
    st.integers(500, 6_000),  # ttl ms
)
close_op = st.tuples(st.just("close"), st.integers(0, 7), st.sampled_from(["settle", "release"]), st.integers(0, 100))
op = st.one_of(
    reserve_op, extend_op, extend_op, close_op, st.tuples(st.just("tick"), st.integers(0, 2_500)), st.tuples(st.just("expire"))
)
programs = st.lists(st.lists(op, min_size=1, max_size=10), min_size=2, max_size=8)
limits = st.lists(st.integers(0, 250), min_size=len(BASE), max_size=len(BASE))


@pytest.fixture(params=["journal", *with_redis("embedded")])
def open_store(request):
    kind = request.param
    if kind == "embedded":
        return lambda: EmbeddedStore(Path(tempfile.mkdtemp(prefix="prop-")) / "budget.db")
    if kind == "journal":
        return lambda: JournalStore(Path(tempfile.mkdtemp(prefix="prop-")) / "journal")
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        ports, url, cluster = [server.port], server.url, False
    else:
        c = request.getfixturevalue("redis_cluster")
        ports, url, cluster = [n.port for n in c.nodes], c.url, True

    def make():
        for port in ports:
            with redis.Redis(port=port) as r:
                r.flushall()
        return RedisStore(url, cluster=cluster)

    return make


class Clock:
    def __init__(self) -> None:
        self.now = T0


EXAMPLES = int(os.environ.get("EXTPROC_PROPERTY_EXAMPLES", "25"))  # raise for a deeper search


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(programs=programs, limits=limits, fan=st.integers(1, 6))
def test_random_interleavings_keep_the_books(open_store, programs, limits, fan):
    lines = [replace(l, limit=fan if l.kind is Kind.CONCURRENCY else lim) for l, lim in zip(BASE, limits)]
    asyncio.run(_drive(open_store(), lines, programs))


async def _drive(store, lines: list[Line], programs: list[list[tuple]]) -> None:
    clock = Clock()
    taken: dict[str, dict[str, int]] = {}  # rid -> {line key: amount} of every reservation that was taken
    sent: dict[str, dict[str, int]] = {}  # rid -> usage we settled with
    estimates: dict[str, dict[str, int]] = {}  # rid -> what expiry charges (grown by extensions)
    held: dict[int, list[str]] = {}  # task -> its reservations left open for later extension / close
    by_key = {l.key: l for l in lines}

    async def check_snapshot() -> None:
        for line, s in zip(lines, await store.snapshot(lines, tag=TAG, now_ms=clock.now)):
            assert s.spent >= 0 and s.reserved >= 0, (line.key, s)
            if line.key in HARD:
                assert s.spent + s.reserved <= s.limit, (line.key, s)
            elif line.key == "soft":
                assert s.spent + s.reserved <= s.limit + line.margin, s
            elif line.key == "fan":
                assert s.reserved <= s.limit, s

    async def finish(rid: str, how: str, share: int) -> None:
        if how == "settle":
            e = estimates[rid]
            usage = {"cost": e.get("cost", 0) * share // 100, "input_tokens": e.get("input_tokens", 0),
                     "output_tokens": e.get("output_tokens", 0) * share // 100}  # fmt: skip
            sent[rid] = normalize_usage(usage)
            await store.settle(TAG, rid, usage, now_ms=clock.now)
        elif how == "release":
            await store.release(TAG, rid, now_ms=clock.now)

    async def step(task: int, i: int, o: tuple) -> None:
        if o[0] == "tick":
            clock.now += o[1]
        elif o[0] == "expire":
            await store.expire(now_ms=clock.now, limit=1_000)
        elif o[0] == "extend":
            _, pick, dc, dout, ttl = o
            mine = held.get(task)
            if mine:
                rid = mine[pick % len(mine)]
                delta = {k: v for k, v in {"cost": dc, "output_tokens": dout, "total_tokens": dout}.items() if v}
                r = await store.extend(TAG, rid, delta, now_ms=clock.now, ttl_ms=ttl)
                if r.ok:
                    for key in taken[rid]:
                        line = by_key[key]
                        if line.kind is Kind.COUNTER:
                            taken[rid][key] += delta.get(line.dimension, 0)
                    for dim, d in delta.items():
                        estimates[rid][dim] = estimates[rid].get(dim, 0) + d
        elif o[0] == "close":
            _, pick, how, share = o
            mine = held.get(task)
            if mine:
                await finish(mine.pop(pick % len(mine)), how, share)
        else:
            _, mask, c, inp, out, ttl, how, share, hc, hout = o
            rid = f"t{task}-{i}"
            estimate = {"cost": c, "input_tokens": inp, "output_tokens": out}
            amounts = {"cost": c, "total_tokens": inp + out, "input_tokens": inp, "concurrency": 1}
            room = {"cost": hc, "total_tokens": hout}
            chosen = [
                replace(l, amount=amounts[l.dimension], headroom=room.get(l.dimension, 0) if l.kind is Kind.COUNTER else 0)
                for n, l in enumerate(lines)
                if mask >> n & 1
            ]
            r = await store.reserve(TAG, rid, chosen, now_ms=clock.now, ttl_ms=ttl, meta={"estimate": estimate})
            if r.ok:
                taken[rid] = {l.key: l.amount for l in chosen}
                estimates[rid] = normalize_usage(estimate)
                await check_snapshot()
                await asyncio.sleep(0)  # let other tasks run while this call is "in flight"
                if how == "hold":
                    held.setdefault(task, []).append(rid)
                else:
                    await finish(rid, how, share)
        await check_snapshot()

    async def check_books() -> None:
        entries = await store.ledger(tag=TAG)
        closed = {e.reservation_id: e for e in entries}
        assert len(closed) == len(entries), "one ledger entry per reservation"
        assert set(closed) <= set(taken), "refused reservations never reach the ledger"
        for rid, e in closed.items():
            expected = {Outcome.SETTLED: sent.get(rid), Outcome.RELEASED: {}, Outcome.EXPIRED: estimates[rid]}[e.outcome]
            assert e.charged == expected, (rid, e)
            assert set(e.lines) == set(taken[rid])
        states = await store.snapshot(lines, tag=TAG, now_ms=clock.now)
        for line, s in zip(lines, states):
            open_amount = sum(a.get(line.key, 0) for rid, a in taken.items() if rid not in closed)
            assert s.reserved == open_amount, (line.key, s, open_amount)
            if line.kind is not Kind.COUNTER:
                continue
            ledgered = sum(
                e.charged.get(line.dimension, 0)
                for e in entries
                if line.key in e.lines and (line.window is not Window.ROLLING or e.closed_at_ms > clock.now - WINDOW)
            )
            assert s.spent == ledgered, (line.key, s, ledgered)

    try:
        rounds = max(len(p) for p in programs)
        for i in range(rounds):
            await asyncio.gather(*(step(t, i, p[i]) for t, p in enumerate(programs) if i < len(p)))
            await check_books()
        clock.now += 10_000  # past every TTL: the reaper leaves nothing reserved
        await store.expire(now_ms=clock.now, limit=1_000)
        await check_books()
        assert all(s.reserved == 0 for s in await store.snapshot(lines, tag=TAG, now_ms=clock.now))
    finally:
        await store.close()
