"""What the journal store owns beyond the contract: a reopened store is the store that was
closed or killed (snapshot + journal replay, compaction included), a torn last record is cut
off, a damaged one refuses to open, and one process at a time holds the directory."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from extproc.app import open_store
from extproc.cli import main as cli
from extproc.errors import StoreUnavailable
from extproc.stores import parse_url
from extproc.stores.base import Kind, RunRef
from extproc.stores.journal import JournalStore
from tests.stores.helpers import NOW, calendar, concurrency, cost, duration, rolling, take
from tests.stores.test_property import BASE, EXAMPLES, _drive, limits, programs

ROOT = Path(__file__).resolve().parents[2]


class _Kept(JournalStore):
    """Keeps its state and ledger as they were when closed, to compare with a reopened store."""

    kept: tuple[Any, ...] = ()

    async def close(self) -> None:
        if not self._closed_store:
            self.kept = (self._state_copy(), await self.ledger())
        await super().close()


async def _reopened(path: Path) -> tuple[Any, ...]:
    store = JournalStore(path)
    try:
        return store._state_copy(), await store.ledger()
    finally:
        await store.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs=programs, limits=limits)
def test_a_reopened_store_is_the_one_that_was_closed(programs, limits):
    """Random interleavings (the property suite's), compacting every few hundred bytes and
    appending the ledger in batches of 3: replay gives back every record and ledger entry."""
    lines = [replace(l, limit=2 if l.kind is Kind.CONCURRENCY else lim) for l, lim in zip(BASE, limits)]
    path = Path(tempfile.mkdtemp(prefix="journal-")) / "j"
    store = _Kept(path, compact_bytes=600, ledger_batch=3)
    asyncio.run(_drive(store, lines, programs))
    assert asyncio.run(_reopened(path)) == store.kept


async def _busy(store: JournalStore, n: int, *, settle: bool = True) -> None:
    run = RunRef("alice/r1", "alice", 60_000, 5)
    lines = [cost("c", 10**9, 7), rolling("rw", 10**9, 3), calendar("day", 10**9, 2, "2026-01-01"), concurrency("fan", 100),
             duration("wall", 3600), cost("run:alice/r1|cost", 10**9, 1, run=True, lower=10**8)]  # fmt: skip
    for i in range(n):
        assert (await take(store, "t", f"r{i}", lines, NOW + i, run=run, meta={"model": "m", "i": i})).ok
        if settle:
            await store.settle("t", f"r{i}", {"cost": 5, "input_tokens": 1}, now_ms=NOW + i)
        if i % 10 == 9:
            await asyncio.wrap_future(store._pool.submit(int))  # the thread caught up: compactions finished
    await store.adjust("t", "c", credit=11)
    assert await store.claim_alert("t", "80%", now_ms=NOW, ttl_ms=10**6)
    assert await store.lead("reaper", "me", now_ms=NOW, ttl_ms=10**6)


async def test_compaction_keeps_one_snapshot_and_loses_nothing(tmp_path):
    store = _Kept(tmp_path / "j", compact_bytes=4096, ledger_batch=7)
    await _busy(store, 60)
    await store.close()
    names = sorted(p.name for p in (tmp_path / "j").iterdir())
    snaps = [n for n in names if n.startswith("snapshot-")]
    assert len(snaps) == 1 and snaps[0] >= "snapshot-00000005.log", names  # compacted often, older snapshots gone
    assert all(n >= snaps[0].replace("snapshot", "journal") for n in names if n.startswith("journal-")), names
    assert await _reopened(tmp_path / "j") == store.kept
    assert len(store.kept[1]) == 60


async def _written(store: JournalStore) -> Path:
    """The journal of a store that did a few things and closed."""
    await _busy(store, 3)
    await store.close()
    (journal,) = store.path.glob("journal-*.log")
    return journal


async def test_a_torn_last_record_is_cut_off_and_the_journal_goes_on(tmp_path):
    path = tmp_path / "j"
    store = _Kept(path)
    journal = await _written(store)
    whole = journal.read_bytes()
    last = whole[: -1].rsplit(b"\n", 1)[1]
    journal.write_bytes(whole + last[: len(last) // 2])  # a crash in the middle of a write
    again = JournalStore(path)
    try:
        assert (again._state_copy(), await again.ledger()) == store.kept
        assert journal.stat().st_size == len(whole)  # cut off before anything is appended
        assert (await take(again, "t", "after", [cost("c", 10**9, 1)], NOW)).ok
    finally:
        await again.close()
    store = JournalStore(path)
    try:
        assert ("t", "after") in store._live
    finally:
        await store.close()


async def test_a_damaged_record_refuses_to_open(tmp_path):
    path = tmp_path / "j"
    journal = await _written(JournalStore(path))
    data = bytearray(journal.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a whole line
    journal.write_bytes(bytes(data))
    with pytest.raises(StoreUnavailable, match="damaged"):
        JournalStore(path)


async def test_the_ledger_entries_a_crash_left_pending_are_appended_on_reopen(tmp_path):
    """Settled entries are in the journal at once, in ledger.db in batches: a crash between the
    two loses none (nor writes one twice)."""
    path = tmp_path / "j"
    store = JournalStore(path, ledger_batch=4)
    await _busy(store, 10)  # two batches reached ledger.db, two entries were pending
    os.close(store._fd)  # "killed": nothing flushed, the lock released with the process
    os.close(store._lock_fd)
    store._pool.shutdown(wait=True)
    again = JournalStore(path)
    try:
        got = await again.ledger(tag="t")
        assert sorted(e.reservation_id for e in got) == sorted(f"r{i}" for i in range(10))
        assert len({e.seq for e in got}) == 10
    finally:
        await again.close()


def _open_elsewhere(path: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from extproc.stores.journal import JournalStore; JournalStore(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)


async def test_a_second_process_cannot_open_the_store(tmp_path):
    store = JournalStore(tmp_path / "j")
    try:
        other = _open_elsewhere(tmp_path / "j")
        assert other.returncode != 0
        assert f"is in use by another process (pid {os.getpid()})" in other.stderr, other.stderr
        assert "only one process" in other.stderr
    finally:
        await store.close()
    assert _open_elsewhere(tmp_path / "j").returncode == 0  # closed: the lock went with it


async def test_journal_urls_name_a_directory(tmp_path):
    assert parse_url("journal:var/budget") == ("journal", "var/budget")
    assert parse_url(f"journal://{tmp_path}/j") == ("journal", f"{tmp_path}/j")
    store = open_store(f"journal:{tmp_path}/j")
    try:
        assert isinstance(store, JournalStore) and (tmp_path / "j" / "LOCK").exists()
    finally:
        await store.close()


def test_serve_refuses_several_workers_on_a_journal_store(tmp_path, capsys):
    assert cli(["serve", "--policy", str(ROOT / "policies/demo.yaml"), "--store", f"journal:{tmp_path}/j", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "keeps its counters in one process: it cannot serve --workers 2" in err, err
    assert not (tmp_path / "j").exists()  # refused before anything opened the store


async def test_a_write_is_fsynced_after_the_interval_even_if_none_follows(tmp_path):
    store = JournalStore(tmp_path / "j", fsync_interval_s=0.05)
    synced: list[int] = []
    store._fsync = synced.append  # records the fsyncs (run on the store's thread)
    try:
        assert (await take(store, "t", "r", [cost("c", 100, 1)])).ok
        assert synced == []
        for _ in range(200):
            await asyncio.sleep(0.01)
            if synced:
                break
        await asyncio.wrap_future(store._pool.submit(int))
        assert synced == [store._fd]
    finally:
        await store.close()
