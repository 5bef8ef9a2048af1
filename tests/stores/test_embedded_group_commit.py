"""The embedded store commits the writes of one turn of the event loop together (group commit):
the first runs at once and alone, the rest in one transaction at the next turn, each in its own
savepoint. Each write still succeeds or fails alone and answers only once committed; the budget
rules hold across a batch exactly as across separate transactions."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from extproc.stores.embedded import MAX_BATCH, EmbeddedStore
from tests.stores.helpers import cost, spent_reserved, take


def _commits(store: EmbeddedStore) -> list[str]:
    """The COMMITs the store's connection runs from now on."""
    seen: list[str] = []
    store._db.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


async def test_writes_of_one_turn_share_one_commit_and_the_limit_holds_across_it(tmp_path: Path) -> None:
    """40 reservations of 10 against a limit of 300, asked for in one turn: the first alone, the other
    39 in one transaction; exactly 30 fit, in the order asked, and nothing else is reserved."""
    store = EmbeddedStore(tmp_path / "b.db")
    commits = _commits(store)
    results = await asyncio.gather(*(take(store, "t", f"r{i}", [cost("k", 300, 10)]) for i in range(40)))
    assert [r.ok for r in results] == [True] * 30 + [False] * 10
    assert len(commits) == 2, f"one commit alone, one for the rest of the turn: {len(commits)}"
    assert await spent_reserved(store, "t", cost("k", 300)) == (0, 300)
    await store.close()


async def test_a_batch_is_at_most_max_batch_writes(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "b.db")
    commits = _commits(store)
    n = 1 + 2 * MAX_BATCH + 1
    results = await asyncio.gather(*(take(store, "t", f"r{i}", [cost("k", 10**6, 1)]) for i in range(n)))
    assert all(r.ok for r in results)
    assert len(commits) == 4, "one alone, then batches of MAX_BATCH, MAX_BATCH and 1"
    assert await spent_reserved(store, "t", cost("k", 10**6)) == (0, n)
    await store.close()


async def test_a_write_that_fails_in_a_batch_fails_alone(tmp_path: Path) -> None:
    """The failing write's own changes are rolled back; the writes before and after it in its
    transaction are committed and answer normally."""
    store = EmbeddedStore(tmp_path / "b.db")

    def failing() -> None:
        store._add("t|r|k", 1000)  # a change that must not survive its write's failure
        raise ValueError("boom")

    first = take(store, "t", "r0", [cost("k", 100, 10)])  # alone, at once
    tasks = [
        asyncio.ensure_future(first),
        asyncio.ensure_future(take(store, "t", "r1", [cost("k", 100, 20)])),
        asyncio.ensure_future(store._write(failing)),
        asyncio.ensure_future(take(store, "t", "r2", [cost("k", 100, 30)])),
    ]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], ValueError)
    assert [r.ok for r in (done[0], done[1], done[3])] == [True, True, True]  # type: ignore[union-attr]
    assert await spent_reserved(store, "t", cost("k", 100)) == (0, 60)
    await store.close()


async def test_a_batch_that_meets_a_held_lock_waits_on_the_thread_and_gets_through(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "b.db", busy_timeout_s=2.0)
    other = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    tasks = [asyncio.create_task(take(store, "t", f"r{i}", [cost("k", 100, 10)])) for i in range(5)]
    await asyncio.sleep(0.1)
    assert not any(t.done() for t in tasks), "the lock is held: the writes must be waiting, not refused"
    other.execute("ROLLBACK")
    other.close()
    assert all(r.ok for r in await asyncio.gather(*tasks))
    assert await spent_reserved(store, "t", cost("k", 100)) == (0, 50)
    assert store._queued == 1, "the batch went to the thread once, as one transaction"
    await store.close()


async def test_a_write_whose_caller_is_cancelled_before_its_turn_never_happens(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "b.db")
    first = asyncio.create_task(take(store, "t", "r0", [cost("k", 100, 10)]))
    second = asyncio.create_task(take(store, "t", "r1", [cost("k", 100, 20)]))
    await asyncio.sleep(0)  # both asked: the first ran alone, the second waits for the next turn
    second.cancel()
    assert (await first).ok
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await spent_reserved(store, "t", cost("k", 100)) == (0, 10)
    await store.close()


async def test_close_waits_for_the_writes_already_asked_for(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "b.db")
    tasks = [asyncio.create_task(take(store, "t", f"r{i}", [cost("k", 100, 10)])) for i in range(3)]
    await asyncio.sleep(0)
    await store.close()
    assert all(r.ok for r in await asyncio.gather(*tasks))
    reopened = EmbeddedStore(tmp_path / "b.db")
    assert await spent_reserved(reopened, "t", cost("k", 100)) == (0, 30)
    await reopened.close()
