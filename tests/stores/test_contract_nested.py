"""Store contract: nested runs. A child run's reservation carries its ancestors'
lines as well (ordinary run lines, inherited), so one atomic reserve holds the
whole tree under its root; the ancestry is recorded when the child is created
and checked on every attempt (each ancestor this owner's and active); activity
in a child keeps its ancestors alive; a purged child never takes its
ancestors' counters with it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from extproc.stores.base import RunRef, RunRefusal
from tests.stores.helpers import NOW, entries, spent_reserved, take
from tests.stores.test_contract_runs import HOUR, MEM, ref, rline


def child(name: str, *ancestors: RunRef, owner: str = "alice", max_active: int = 10) -> RunRef:
    """A run nested under `ancestors` (root first); their lines are inherited, not its own."""
    base = ref(name, owner, max_active)
    inherited = frozenset(rline(a).key for a in ancestors)
    return replace(base, ancestors=tuple(a.key for a in ancestors), inherited=inherited)


def tree_lines(run: RunRef, *ancestors: RunRef, amount: int = 10, limits: dict[str, int] | None = None):
    """The run's own cost line and one per ancestor, the way the engine builds them."""
    limits = limits or {}
    return [rline(run, limits.get(run.key, 100), amount)] + [rline(a, limits.get(a.key, 100), amount) for a in ancestors]


async def test_child_reserves_on_every_ancestor_and_settles_there(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root)], NOW, run=root)).ok
    await store.settle(tag, "r0", {"cost": 10}, now_ms=NOW)
    mid = child("mid", root)
    leaf = child("leaf", root, mid)
    assert (await take(store, tag, "m1", tree_lines(mid, root), NOW, run=mid)).ok
    r = await take(store, tag, "l1", tree_lines(leaf, root, mid), NOW, run=leaf)
    assert r.ok and [s.reserved for s in r.states] == [10, 20, 20]
    await store.settle(tag, "m1", {"cost": 7}, now_ms=NOW + 1)
    await store.settle(tag, "l1", {"cost": 5}, now_ms=NOW + 1)
    assert await spent_reserved(store, tag, rline(root)) == (10 + 7 + 5, 0)
    assert await spent_reserved(store, tag, rline(mid)) == (7 + 5, 0)
    assert await spent_reserved(store, tag, rline(leaf)) == (5, 0)
    st = await store.run_state(tag, leaf.key, now_ms=NOW)
    assert st.ancestors == (root.key, mid.key)
    assert (await store.run_state(tag, root.key, now_ms=NOW)).ancestors == ()


async def test_the_tree_never_spends_past_its_root_under_concurrency(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root, 100, 0)], NOW, run=root)).ok
    await store.release(tag, "r0", now_ms=NOW)
    kids = [child(f"k{i}", root) for i in range(3)]
    for k in kids:  # each child alone could spend 100; together they share the root's 100
        assert (await take(store, tag, f"{k.key}-0", tree_lines(k, root, amount=0), NOW, run=k)).ok
        await store.release(tag, f"{k.key}-0", now_ms=NOW)

    async def call(i: int) -> bool:
        k = kids[i % 3]
        r = await take(store, tag, f"c{i}", tree_lines(k, root, amount=9), NOW + 1, run=k)
        if r.ok:
            await store.settle(tag, f"c{i}", {"cost": 9}, now_ms=NOW + 2)
        return r.ok

    ok = await asyncio.gather(*(call(i) for i in range(20)))
    assert sum(ok) == 11  # 11 * 9 = 99 <= 100 < 12 * 9
    spent_root, reserved_root = await spent_reserved(store, tag, rline(root))
    kid_spent = [(await spent_reserved(store, tag, rline(k)))[0] for k in kids]
    assert (spent_root, reserved_root) == (99, 0) and sum(kid_spent) == spent_root


async def test_ancestors_lowered_limit_binds_the_child(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root, 100, 0, lower=30)], NOW, run=root)).ok
    kid = child("kid", root)
    r = await take(store, tag, "k1", tree_lines(kid, root, amount=31), NOW, run=kid)
    assert not r.ok and r.blocked == 1 and r.states[1].limit == 30


async def test_unknown_parent_is_refused_and_nothing_is_created(store, tag):
    ghost = ref("ghost")
    kid = child("kid", ghost)
    r = await take(store, tag, "k1", tree_lines(kid, ghost), NOW, run=kid)
    assert not r.ok and r.reason is RunRefusal.PARENT and r.blocked is None
    assert await store.run_state(tag, kid.key, now_ms=NOW) is None
    assert await store.run_state(tag, ghost.key, now_ms=NOW) is None


async def test_another_owners_run_is_never_a_parent(store, tag):
    bobs = ref("root", owner="bob")
    assert (await take(store, tag, "b0", [rline(bobs)], NOW, run=bobs)).ok
    kid = replace(child("kid", bobs), owner="alice", key="alice/kid")
    r = await take(store, tag, "k1", tree_lines(kid, bobs), NOW, run=kid)
    assert not r.ok and r.reason is RunRefusal.PARENT


async def test_ancestry_is_recorded_once(store, tag):
    a, b = ref("a", max_active=10), ref("b", max_active=10)
    for run in (a, b):
        assert (await take(store, tag, f"{run.key}-0", [rline(run)], NOW, run=run)).ok
    kid = child("kid", a)
    assert (await take(store, tag, "k1", tree_lines(kid, a), NOW, run=kid)).ok
    moved = child("kid", b)  # the same run id claiming another parent
    assert (await take(store, tag, "k2", tree_lines(moved, b), NOW, run=moved)).reason is RunRefusal.PARENT
    as_root = ref("kid", max_active=10)  # or no parent at all: it would escape its tree
    assert (await take(store, tag, "k3", [rline(as_root)], NOW, run=as_root)).reason is RunRefusal.PARENT
    assert (await take(store, tag, "k4", tree_lines(kid, a), NOW, run=kid)).ok


async def test_closing_an_ancestor_closes_its_descendants(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root)], NOW, run=root)).ok
    kid = child("kid", root)
    grandkid = child("gk", root, kid)
    assert (await take(store, tag, "k1", tree_lines(kid, root), NOW, run=kid)).ok
    assert (await take(store, tag, "g1", tree_lines(grandkid, root, kid), NOW, run=grandkid)).ok
    await store.close_run(tag, root, now_ms=NOW + 1)
    for rid, run, lines in (("k2", kid, tree_lines(kid, root)), ("g2", grandkid, tree_lines(grandkid, root, kid))):
        r = await take(store, tag, rid, lines, NOW + 2, run=run)
        assert not r.ok and r.reason is RunRefusal.CLOSED
    # in-flight reservations still settle on the whole chain
    await store.settle(tag, "g1", {"cost": 4}, now_ms=NOW + 3)
    assert (await spent_reserved(store, tag, rline(root)))[0] == 4


async def test_child_activity_keeps_its_ancestors_alive(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root)], NOW, run=root)).ok
    kid = child("kid", root)
    t = NOW + HOUR - 1
    assert (await take(store, tag, "k1", tree_lines(kid, root), t, run=kid)).ok
    assert (await store.run_state(tag, root.key, now_ms=t)).expires_at_ms == t + HOUR
    assert (await take(store, tag, "r1", [rline(root)], NOW + HOUR + 10, run=root)).ok


async def test_expired_ancestor_refuses_the_child(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root)], NOW, run=root)).ok
    kid = child("kid", root)
    r = await take(store, tag, "k1", tree_lines(kid, root), NOW + HOUR, run=kid)
    assert not r.ok and r.reason is RunRefusal.EXPIRED


async def test_purging_a_child_keeps_its_ancestors_counters(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root)], NOW, run=root)).ok
    await store.settle(tag, "r0", {"cost": 3}, now_ms=NOW)
    kid = child("kid", root)
    assert (await take(store, tag, "k1", tree_lines(kid, root), NOW, run=kid)).ok
    await store.settle(tag, "k1", {"cost": 4}, now_ms=NOW)
    await store.close_run(tag, kid, now_ms=NOW + 1)
    await store.expire(now_ms=NOW + 1 + MEM)  # the child's memory passed: purged
    assert await store.run_state(tag, kid.key, now_ms=NOW + 1 + MEM) is None
    assert await spent_reserved(store, tag, rline(root), NOW + 1 + MEM) == (7, 0)
    assert len(await entries(store, tag, "k1")) == 1


async def test_check_of_a_child_creates_nothing(store, tag):
    root = ref("root", max_active=10)
    assert (await take(store, tag, "r0", [rline(root)], NOW, run=root)).ok
    kid = child("kid", root)
    r = await store.check(tag, tree_lines(kid, root), now_ms=NOW, run=kid)
    assert r.ok and await store.run_state(tag, kid.key, now_ms=NOW) is None
    ghost = child("g", ref("nobody"))
    assert (await store.check(tag, tree_lines(ghost, ref("nobody")), now_ms=NOW, run=ghost)).reason is RunRefusal.PARENT
