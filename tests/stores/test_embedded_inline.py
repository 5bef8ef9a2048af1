"""The embedded store writes on the event loop only when nothing can make it wait:
a lock another connection holds (still held after a few tries on the loop) sends
the write to the store's thread (where it waits, and succeeds once the lock is
free), writes behind one on the thread wait on the loop and then run there, and
WAL checkpoints (run on the thread) keep the log bounded without sending writes
there."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from extproc.stores import embedded
from extproc.stores.embedded import EmbeddedStore
from tests.stores.helpers import NOW, cost, spent_reserved, take


async def test_a_write_meeting_a_held_lock_waits_on_the_thread_and_gets_through(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "b.db", busy_timeout_s=2.0)
    other = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    first = asyncio.create_task(take(store, "t", "r1", [cost("k", 100, 10)]))
    await asyncio.sleep(0.1)
    assert not first.done(), "the lock is held: the write must be waiting, not refused"
    second = asyncio.create_task(take(store, "t", "r2", [cost("k", 100, 20)]))  # waits on the loop behind the first
    await asyncio.sleep(0.05)
    assert not second.done()
    other.execute("ROLLBACK")
    other.close()
    assert (await first).ok and (await second).ok
    assert await spent_reserved(store, "t", cost("k", 100)) == (0, 30)
    assert store._queued == 1, "only the write that met the lock went to the thread; the one behind it ran inline"
    await store.close()


async def test_uncontended_writes_never_touch_the_thread_and_checkpoints_bound_the_log(tmp_path: Path) -> None:
    """Calls in flight at once, across checkpoints: every write stays on the loop, and the WAL stays bounded.
    Writes wait for a checkpoint on the loop, not queued on the thread behind it: queued there, with calls in
    flight, the thread never drained again (98% of writes hopped at 32 in flight)."""
    store = EmbeddedStore(tmp_path / "b.db")
    wal = tmp_path / "b.db-wal"
    n = embedded.CHECKPOINT_EVERY

    async def call(rid: str) -> None:
        assert (await take(store, "t", rid, [cost("k", 10**12, 5)])).ok
        await store.settle("t", rid, {"cost": 5}, now_ms=NOW + 1)

    sizes = []
    for round_ in range(10):
        await asyncio.gather(*(call(f"r{round_}-{i}") for i in range(n // 2)))  # n writes: one checkpoint a round
        if store._checkpointing is not None:  # let the checkpoint finish (it fsyncs: 50 ms was once too short)
            await asyncio.wait([store._checkpointing])
        sizes.append(wal.stat().st_size)
    checkpoints = store._writes // n
    assert store._queued == store._finished == checkpoints == 10, f"{store._queued - checkpoints} writes went to the thread"
    assert await spent_reserved(store, "t", cost("k", 10**12)) == (5 * 10 * (n // 2), 0)
    assert sizes[-1] <= sizes[0] * 1.5, f"the WAL keeps growing: {sizes}"
    await store.close()


async def test_writes_go_on_during_a_checkpoints_long_step_and_the_log_still_restarts(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint's first step (copy the WAL into the database, fsync: ~30 ms) runs on its own
    connection and thread while writes go on inline; only its short second step holds them back,
    and after it the WAL starts again from its beginning."""
    store = EmbeddedStore(tmp_path / "b.db")
    first_step = threading.Event()
    plain = EmbeddedStore._checkpoint

    def slow_first_step(db: sqlite3.Connection | None, mode: str) -> None:
        if db is store._ckpt_db:
            first_step.set()
            time.sleep(0.5)  # a slow disk's fsync
        plain(db, mode)

    monkeypatch.setattr(EmbeddedStore, "_checkpoint", staticmethod(slow_first_step))
    for i in range(200):
        assert (await take(store, "t", f"before-{i}", [cost("k", 10**12, 5)])).ok
    store._start_checkpoint()
    while not first_step.is_set():
        await asyncio.sleep(0.001)
    t0 = time.monotonic()
    for i in range(200):  # one at a time, each awaited: none may wait for the checkpoint
        assert (await take(store, "t", f"during-{i}", [cost("k", 10**12, 5)])).ok
    assert time.monotonic() - t0 < 0.4 and not store._checkpointing.done(), "the writes waited for the checkpoint"
    assert store._queued == 0, "a write went to the store's thread"
    await asyncio.wait([store._checkpointing])
    assert store._queued == store._finished == 1  # the second step, on the store's thread
    assert (await take(store, "t", "after", [cost("k", 10**12, 5)])).ok
    (busy, frames, _), = store._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    assert busy == 0 and frames < 20, f"the WAL did not start again: {frames} frames after one write"
    assert await spent_reserved(store, "t", cost("k", 10**12)) == (0, 5 * 401)
    await store.close()


async def test_close_leaves_the_final_checkpoint_to_the_stores_thread(tmp_path: Path) -> None:
    """The last connection to a WAL database to close checkpoints it (an fsync). The checkpoint
    connection closes first, off the event loop, so that last one is the store's own, closed on
    the store's thread; the WAL is gone after it."""
    store = EmbeddedStore(tmp_path / "b.db")
    for i in range(50):
        assert (await take(store, "t", f"r-{i}", [cost("k", 10**12, 5)])).ok
    ckpt_db, loop_thread, seen = store._ckpt_db, threading.current_thread(), []
    assert ckpt_db is not None

    class Watched:  # sqlite3.Connection's methods cannot be patched: a stand-in that notes its close
        def execute(self, sql: str) -> sqlite3.Cursor:
            return ckpt_db.execute(sql)

        def close(self) -> None:
            try:
                store_open = store._db.execute("SELECT 1").fetchone() == (1,)
            except sqlite3.ProgrammingError:  # closed
                store_open = False
            seen.append((threading.current_thread() is not loop_thread, store_open))
            ckpt_db.close()

    store._ckpt_db = Watched()  # type: ignore[assignment]
    await store.close()
    assert seen == [(True, True)], "the checkpoint connection closed on the loop, or after the store's"
    assert not (tmp_path / "b.db-wal").exists()


async def test_housekeeping_runs_on_the_thread_not_the_event_loop(tmp_path: Path) -> None:
    """Expiry and ledger trims can touch thousands of rows: never inline, whatever the lock."""
    store = EmbeddedStore(tmp_path / "b.db")
    assert (await take(store, "t", "r", [cost("k", 100, 10)], ttl=1)).ok
    before = store._queued
    assert await store.expire(now_ms=NOW + 10) == 1
    assert await store.trim_ledger(before_ms=NOW + 20) == 1
    assert store._queued == before + 2 and store._finished == store._queued
    assert await spent_reserved(store, "t", cost("k", 100), now=NOW + 20) == (10, 0)
    await store.close()


def test_a_write_that_meets_a_finished_thread_operation_does_not_spin(tmp_path: Path) -> None:
    """A write that arrives after the thread finished its work but before the loop ran the callback that
    resolves its future: awaiting a done future returns at once without yielding, so a wait keyed on
    anything the callback clears spun on the event loop forever (seen as two processes' stores hanging
    under load, once with a checkpoint). Run in a thread, so a spin fails the test instead of hanging
    the suite."""
    result: list[bool] = []

    async def go() -> None:
        store = EmbeddedStore(tmp_path / "b.db")
        store._start_checkpoint()  # its second step on the thread, like any write that met a busy lock
        while store._queued == 0:  # the first step (its own thread) done, the second handed to the store's thread
            await asyncio.sleep(0.001)
        time.sleep(0.2)  # without yielding: the thread is done, its future's callbacks not yet run
        result.append((await take(store, "t", "r", [cost("k", 100, 10)])).ok)
        if (checkpoint := store._checkpointing) is not None:
            await asyncio.wait([checkpoint])
            await asyncio.sleep(0)
        result.append(store._checkpointing is None)  # its callback ran: the next checkpoint may start
        await store.close()

    runner = threading.Thread(target=asyncio.run, args=(go(),), daemon=True)
    runner.start()
    runner.join(10)
    assert result == [True, True], "the write spun on the finished checkpoint"


_GREEDY = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
end, n = time.monotonic() + float(sys.argv[2]), 0
print("ready", flush=True)
while time.monotonic() < end:  # commit and begin again at once: the lock is free for microseconds at a time
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO kv (k, v) VALUES (?, 1)", (f"greedy|{n}",))
    db.execute("COMMIT")
    n += 1
"""


async def test_a_write_waiting_for_another_processs_lock_is_not_starved(tmp_path: Path) -> None:
    """Another process commits and begins again back to back. SQLite's own busy handler sleeps 1, 2, 5, ...
    100 ms between tries and nearly always found the lock taken again: writes failed after their whole
    timeout. Polled every 50-500 µs, each gets in."""
    store = EmbeddedStore(tmp_path / "b.db", busy_timeout_s=0.3)
    greedy = subprocess.Popen([sys.executable, "-c", _GREEDY, str(tmp_path / "b.db"), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert greedy.stdout is not None and greedy.stdout.readline().strip() == "ready"
        await asyncio.sleep(0.1)
        results = []
        while len(results) < 30 or (store._queued == 0 and len(results) < 300):  # until one met the lock
            results.append((await take(store, "t", f"r{len(results)}", [cost("k", 10**6, 1)])).ok)
        assert greedy.poll() is None, "the other writer must still be writing"
    finally:
        greedy.kill()
        greedy.wait()
    assert results == [True] * len(results)
    assert store._queued > 0, "the writes met the lock and waited on the thread"
    await store.close()
