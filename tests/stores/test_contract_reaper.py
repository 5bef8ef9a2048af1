"""Store contract: one reaper per store (a lease), a bounded ledger (trimmed past
the retention, read in pages)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from extproc.errors import StoreUnavailable
from extproc.stores.embedded import EmbeddedStore
from tests.stores.helpers import NOW, cost, take


async def test_one_reaper_holds_the_lease_until_it_lapses(store):
    name = f"reaper-{store.kind}"
    assert await store.lead(name, "w1", now_ms=NOW, ttl_ms=5000)
    assert not await store.lead(name, "w2", now_ms=NOW + 1000, ttl_ms=5000)
    assert await store.lead(name, "w1", now_ms=NOW + 4000, ttl_ms=5000)  # renewed to NOW + 9000
    assert not await store.lead(name, "w2", now_ms=NOW + 8999, ttl_ms=5000)
    assert await store.lead(name, "w2", now_ms=NOW + 9000, ttl_ms=5000)  # w1 stopped renewing
    assert not await store.lead(name, "w1", now_ms=NOW + 9001, ttl_ms=5000)


async def _settled(store, tag, n: int, first_close: int) -> None:
    for i in range(n):
        assert (await take(store, tag, f"r{i}", [cost("k", 10**9, 1)])).ok
        await store.settle(tag, f"r{i}", {"cost": 1}, now_ms=first_close + i)


async def test_the_ledger_is_trimmed_past_the_retention(store, tag):
    await _settled(store, tag, 5, NOW)
    assert await store.trim_ledger(before_ms=NOW + 3) == 3
    assert [e.reservation_id for e in await store.ledger(tag=tag)] == ["r3", "r4"]
    assert await store.trim_ledger(before_ms=NOW + 3) == 0
    assert await store.trim_ledger(before_ms=NOW + 100, limit=1) == 1
    assert [e.reservation_id for e in await store.ledger(tag=tag)] == ["r4"]


async def test_the_ledger_reads_in_pages(store, tag):
    other = tag + "b"
    await _settled(store, tag, 5, NOW)
    await _settled(store, other, 3, NOW + 10)
    pages, after = [], None
    while True:
        page, after = await store.ledger_page(after=after, limit=2)
        assert len(page) <= 2
        pages.append([(e.tag, e.reservation_id) for e in page])
        if after is None:
            break
    got = [x for p in pages for x in p]
    assert sorted(got) == sorted([(tag, f"r{i}") for i in range(5)] + [(other, f"r{i}") for i in range(3)])
    assert len(got) == len(set(got)) and len(pages) >= 4
    page, _ = await store.ledger_page(since_ms=NOW + 11, limit=100)
    assert sorted((e.tag, e.reservation_id) for e in page) == [(other, "r1"), (other, "r2")]


async def test_the_embedded_store_never_blocks_the_event_loop(tmp_path):
    """Another process holds the write lock: the operation waits on the store's thread (the
    loop keeps running) and fails within the busy timeout, well under Envoy's 2 s."""
    store = EmbeddedStore(tmp_path / "b.db", busy_timeout_s=0.3)
    other = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await take(store, "t", "r", [cost("k", 100, 1)])
    waited = time.monotonic() - start
    t.cancel()
    other.execute("ROLLBACK")
    other.close()
    assert 0.25 <= waited < 1.5 and ticks >= 10
    assert (await take(store, "t", "r", [cost("k", 100, 1)])).ok  # the lock is free again
    await store.close()
