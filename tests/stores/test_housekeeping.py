"""Housekeeping each store owns beyond the contract: old calendar buckets and
rolling windows expire, closed records carry their memory, a purged run leaves
no key behind. Checked through each store's own storage."""

from __future__ import annotations

import redis

from extproc.stores.base import RunRef
from extproc.stores.embedded import EmbeddedStore
from extproc.stores.journal import JournalStore
from tests.stores.helpers import NOW, calendar, cost, duration, rolling, take

DAY = "2026-01-01@UTC"


def _keys(store, tag: str) -> dict[str, int]:
    """Redis keys of one tree with their TTL in seconds (-1 = none), read with a plain client."""
    client = store._r
    nodes = [client] if not hasattr(client, "get_nodes") else None
    out = {}
    ports = [store.url.rsplit(":", 1)[1].split("/")[0]] if nodes else [str(n.port) for n in client.get_nodes()]
    for port in ports:
        with redis.Redis(port=int(port), decode_responses=True) as r:
            for k in r.scan_iter(f"xp:{{{tag}}}:*"):
                out[k.split(":", 2)[2]] = r.ttl(k)
    return out


async def test_calendar_and_rolling_keys_expire(store, tag):
    assert (await take(store, tag, "a", [calendar("day", 100, 10, DAY), rolling("rw", 100, 10, window_ms=60_000)])).ok
    await store.settle(tag, "a", {"cost": 10}, now_ms=NOW)
    if isinstance(store, EmbeddedStore):
        (at,) = store._db.execute("SELECT at FROM kv_exp").fetchone()
        assert at == NOW + 2 * 86400 * 1000
        await store.expire(now_ms=at)
        assert store._db.execute("SELECT COUNT(*) FROM kv WHERE k LIKE '%|s|day|%'").fetchone()[0] == 0
        return
    if isinstance(store, JournalStore):
        (at,) = store._kv_exp.values()
        assert at == NOW + 2 * 86400 * 1000
        await store.expire(now_ms=at)
        assert not [k for k in store._kv if "|s|day|" in k]
        return
    keys = _keys(store, tag)
    assert 0 < keys[f"s:day|{DAY}"] <= 2 * 86400
    assert 0 < keys["e:rw"] <= 120 and 0 < keys["es:rw"] <= 120
    assert 0 < keys["resv:a"] <= 86400  # a closed reservation is remembered, then dropped
    assert keys["ledger"] == -1  # the ledger is kept


async def test_a_purged_run_leaves_nothing_behind(store, tag):
    run = RunRef("alice/r1", "alice", 1000, 5, memory_ms=1000)
    k = f"run:{run.key}"
    lines = [cost(f"{k}|cost", 100, 10, run=True, lower=50), duration(f"{k}|wall", 60, run=True),
             rolling(f"{k}|rw", 100, 10, run=True)]  # fmt: skip
    assert (await take(store, tag, "a", lines, NOW, run=run)).ok
    await store.settle(tag, "a", {"cost": 10}, now_ms=NOW)
    await store.adjust(tag, f"{k}|cost", credit=5)
    await store.expire(now_ms=NOW + 2000)
    assert await store.run_state(tag, run.key, now_ms=NOW + 2000) is None
    if isinstance(store, EmbeddedStore):
        left = store._db.execute("SELECT k FROM kv WHERE k LIKE ?", (f"%{k}%",)).fetchall()
        assert left == []
        assert store._db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
        return
    if isinstance(store, JournalStore):
        assert [kk for kk in store._kv if k in kk] == [] and store._events == {}
        assert store._runs == {} and store._by_owner == {}
        return
    left = {name for name in _keys(store, tag) if k in name or name.startswith(("run:", "ra:"))}
    assert left == set()
