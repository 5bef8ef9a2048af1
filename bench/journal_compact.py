"""How long the journal store's compaction stalls the event loop, with a realistic state.

Fills a journal store with `--calls` reserve + settle pairs (each leaves a closed
record, remembered for a day, and a ledger entry in ledger.db) spread over
`--runs` runs, then compacts it while a ticker measures the event loop's worst
gap. Reports the copy done on the loop, the worst gap while the store's thread
writes the snapshot, the snapshot's size and time, the time to reopen (load
the snapshot, replay the journal) and the resident memory per call kept.

    python -m bench.journal_compact [--calls 100000] [--runs 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from extproc.stores.base import Kind, Line, RunRef
from extproc.stores.journal import JournalStore

from .hostile import _max_stall_ms

NOW = 1_700_000_000_000


def _lines(run: str) -> list[Line]:
    return [
        Line("key:alice|cost|total", Kind.COUNTER, "cost", 10**15, 1000),
        Line("team:ml|total_tokens|day", Kind.COUNTER, "total_tokens", 10**15, 30, period="2026-12-02", period_ttl_s=172800),
        Line("key:alice|concurrency", Kind.CONCURRENCY, "concurrency", 10**6, 1),
        Line(f"run:{run}|requests", Kind.COUNTER, "requests", 10**9, 1, run=True),
    ]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(calls: int, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "j"
        store = JournalStore(path, compact_bytes=1 << 40)  # compacted below, by hand
        rss0 = _rss_mb()
        for i in range(calls):
            r = f"alice/run{i % runs}"
            run = RunRef(r, "alice", 3_600_000, runs + 1)
            meta = {"model": "gpt-4o", "route": "openai.chat", "request_id": f"00000000-0000-4000-8000-{i:012d}"}
            await store.reserve("tree", f"call-{i}", _lines(r), now_ms=NOW + i, ttl_ms=600_000, meta=meta, run=run)
            await store.settle("tree", f"call-{i}", {"cost": 900, "input_tokens": 14, "output_tokens": 16, "requests": 1},
                               now_ms=NOW + i)  # fmt: skip
        await asyncio.wrap_future(store._pool.submit(int))  # ledger batches in
        rss = _rss_mb() - rss0
        journal_bytes = store._jbytes

        copy_ms = 0.0

        async def compact() -> None:
            nonlocal copy_ms
            t0 = time.perf_counter()
            store._compact()
            copy_ms = (time.perf_counter() - t0) * 1000
            while store._compacting:
                await asyncio.sleep(0.001)

        worst_gap_ms, write_ms = await _max_stall_ms(compact)
        snap_mb = max(path.glob("snapshot-*.log")).stat().st_size / 2**20
        await store.close()

        t0 = time.perf_counter()
        again = JournalStore(path)
        open_ms = (time.perf_counter() - t0) * 1000
        await again.close()
    return {
        "calls": calls, "runs": runs, "journal_mb": round(journal_bytes / 2**20, 1),
        "rss_bytes_per_call": round(rss * 2**20 / calls), "copy_on_loop_ms": round(copy_ms, 1),
        "worst_loop_gap_ms": round(worst_gap_ms, 1), "snapshot_ms": round(write_ms), "snapshot_mb": round(snap_mb, 1),
        "reopen_ms": round(open_ms),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=1000)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(measure(a.calls, a.runs))))


if __name__ == "__main__":
    main()
