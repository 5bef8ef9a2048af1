"""Crash tests: no settled spend is lost and no reservation outlives its TTL.

(a) the service (a child process on the embedded or the journal store) is SIGKILLed mid-load;
(b) Redis (AOF, appendfsync always) is SIGKILLed and restarted mid-load under
    the same RedisStore object, which raises StoreUnavailable while Redis is
    down and recovers by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extproc.app import open_store
from extproc.engine.budget import Engine
from extproc.errors import StoreUnavailable
from extproc.stores.base import Outcome
from extproc.stores.redis_store import RedisStore
from tests.stores.restart_load import COST, POLICY, WHO, run_load
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
TTL_MS = POLICY.reservation_ttl_seconds * 1000


async def _check_books(store, settled: dict[str, int]) -> None:
    """Every settle that returned is ledgered; spent == the ledger; the reaper empties `reserved`."""
    engine = Engine(store)
    entries = {e.reservation_id: e for e in await store.ledger()}
    for rid, cost in settled.items():
        e = entries.get(rid)
        assert e is not None, f"settled {rid} is missing from the ledger"
        assert e.outcome is Outcome.SETTLED and e.charged["cost"] == cost == COST
    before = await engine.snapshot(POLICY, WHO)
    assert before.states[0].spent == sum(e.charged.get("cost", 0) for e in entries.values())
    assert before.states[1].reserved > 0  # orphans were in flight

    later = Engine(store, clock=lambda: time.time_ns() // 1_000_000 + TTL_MS + 1)
    while await later.expire():
        pass
    after = await later.snapshot(POLICY, WHO)
    entries = await store.ledger()
    assert [s.reserved for s in after.states] == [0, 0, 0]
    assert after.states[0].spent == sum(e.charged.get("cost", 0) for e in entries)
    expired = [e for e in entries if e.outcome is Outcome.EXPIRED]
    assert expired and all(e.charged["cost"] == 2 * COST for e in expired)
    for r in range(4):
        snap = await later.snapshot(POLICY, WHO, run_id=f"run{r}")
        assert snap.states[-1].reserved == 0  # the run's step counter too


@pytest.mark.parametrize("url", ["sqlite:{tmp}/budget.db", "journal:{tmp}/journal"], ids=["embedded", "journal"])
async def test_local_store_survives_sigkill_of_the_service(tmp_path, url):
    url = url.format(tmp=tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.stores.restart_load", url], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    settled: dict[str, int] = {}
    journal = tmp_path / "journal" if url.startswith("journal:") else None
    try:
        assert child.stdout is not None
        for line in child.stdout:
            _, rid, cost = line.split()
            settled[rid] = int(cost)
            # the journal store compacts every 64 KiB (restart_load): kill it once one snapshot is in, so
            # the kill lands between or in compactions
            if len(settled) >= 300 and (journal is None or len(settled) >= 20_000 or any(journal.glob("snapshot-*.log"))):
                break
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    for line in rest.splitlines():  # settles reported before the kill landed
        if line.count(" ") == 2:
            _, rid, cost = line.split()
            settled[rid] = int(cost)
    assert child.returncode == -signal.SIGKILL and len(settled) >= 300
    if journal is not None:
        assert any(journal.glob("snapshot-*.log")), "no compaction before the kill"
    store = open_store(url)
    try:
        await _check_books(store, settled)
    finally:
        await store.close()


@pytest.mark.integration
async def test_redis_restart_mid_load_loses_no_settled_spend():
    server = RedisServer().start()  # appendonly yes, appendfsync always
    store = RedisStore(server.url, socket_timeout=1.0)
    engine = Engine(store)
    settled: dict[str, int] = {}
    failures: list[str] = []
    stop = asyncio.Event()

    async def wait_for(n: int) -> None:
        while len(settled) < n:
            await asyncio.sleep(0.01)

    load = asyncio.create_task(run_load(engine, tasks=16, on_settled=settled.__setitem__, stop=stop, failures=failures))
    try:
        await asyncio.wait_for(wait_for(200), 60)
        server.kill()  # SIGKILL
        down_at = len(settled)
        # While Redis is down every call fails fast with StoreUnavailable (never hangs).
        for _ in range(3):
            try:
                await asyncio.wait_for(store.ping(), 10)
            except StoreUnavailable:
                pass
            else:
                raise AssertionError("ping succeeded while Redis was down")
        await asyncio.wait_for(_until(lambda: len(failures) >= 50), 30)
        assert len(settled) - down_at <= 16  # at most the settles already answered in flight
        server.start()  # same port, same AOF
        await asyncio.wait_for(wait_for(len(settled) + 200), 60)  # the same store object recovered
    finally:
        stop.set()
        await asyncio.wait_for(load, 60)
    try:
        assert failures and all("redis" in f for f in failures)
        await _check_books(store, settled)
    finally:
        await store.close()
        server.stop()


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0.01)
