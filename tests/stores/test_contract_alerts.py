"""Store contract: the alert marker is claimed by exactly one caller until it expires."""

from __future__ import annotations

import asyncio
import time


def _now() -> int:
    return time.time_ns() // 1_000_000


async def test_one_of_many_concurrent_claims_wins(store, tag):
    won = await asyncio.gather(*(store.claim_alert(tag, "key:a|cost|total@0.8|", now_ms=_now(), ttl_ms=60_000) for _ in range(20)))
    assert won.count(True) == 1


async def test_claims_are_per_key_and_per_tree(store, tag):
    assert await store.claim_alert(tag, "k@0.5|2026-01-01", now_ms=_now(), ttl_ms=60_000)
    assert await store.claim_alert(tag, "k@0.5|2026-01-02", now_ms=_now(), ttl_ms=60_000)
    assert await store.claim_alert(tag + "x", "k@0.5|2026-01-01", now_ms=_now(), ttl_ms=60_000)
    assert not await store.claim_alert(tag, "k@0.5|2026-01-01", now_ms=_now(), ttl_ms=60_000)


async def test_a_claim_can_be_taken_again_after_its_ttl(store, tag):
    assert await store.claim_alert(tag, "k", now_ms=_now(), ttl_ms=50)
    assert not await store.claim_alert(tag, "k", now_ms=_now(), ttl_ms=50)
    await asyncio.sleep(0.12)
    assert await store.claim_alert(tag, "k", now_ms=_now(), ttl_ms=50)
