"""CPU of one reserve + settle pair (three lines) on a store alone, no service around it.

    python -m bench.store_pair [--store sqlite: | journal:] [--pairs 5000] [--inflight 16] [--processes 2]

`--inflight K`: K pairs in flight at once in each process (a service at concurrency
K). `--processes N`: N processes on one SQLite file at once, as `extproc serve
--workers N` runs them; each reports its own CPU per pair and the share of its
writes that waited for the file lock on the store's thread rather than on the
event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from extproc.app import open_store
from extproc.stores.base import Kind, Line, Store

NOW = 1_700_000_000_000
LINES = [
    Line("key:alice|cost|total", Kind.COUNTER, "cost", 10**15, 1000),
    Line("team:ml|total_tokens|day", Kind.COUNTER, "total_tokens", 10**15, 30, period="2026-12-02"),
    Line("key:alice|concurrency", Kind.CONCURRENCY, "concurrency", 10**6, 1),
]
USAGE = {"cost": 900, "input_tokens": 10, "output_tokens": 20}


async def pairs_in_order(store: Store, prefix: str, n: int) -> None:
    """`n` reserve + settle pairs, one after the other (ids `prefix0`, `prefix1`, ...)."""
    for i in range(n):
        rid = f"{prefix}{i}"
        await store.reserve("t", rid, LINES, now_ms=NOW + i, ttl_ms=60_000, meta={"model": "m"})
        await store.settle("t", rid, USAGE, now_ms=NOW + i)


async def measure(url: str, pairs: int, inflight: int) -> tuple[float, float, float]:
    """CPU µs per pair, pairs per second, and the share of writes handed to the store's thread (SQLite only)."""
    store = open_store(url)
    prefix = f"{os.getpid()}-"

    async def worker(w: int, n: int) -> None:
        await pairs_in_order(store, f"{prefix}{w}-", n)

    try:
        await asyncio.gather(*(worker(-1 - w, 200 // inflight) for w in range(inflight)))  # warm up
        handed0 = getattr(store, "_queued", 0)  # writes the embedded store ran on its thread so far
        t0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(w, pairs // inflight) for w in range(inflight)))
        cpu, wall = (time.process_time() - t0) / pairs * 1e6, time.perf_counter() - w0
        return cpu, pairs / wall, (getattr(store, "_queued", 0) - handed0) / (2 * pairs)
    finally:
        await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="journal:", choices=("sqlite:", "journal:"))
    ap.add_argument("--pairs", type=int, default=5000)
    ap.add_argument("--inflight", type=int, default=1)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--url", help=argparse.SUPPRESS)  # a child of --processes: the store to open
    a = ap.parse_args()
    if a.url:
        cpu, rate, handed = asyncio.run(measure(a.url, a.pairs, a.inflight))
        print(f"{cpu:.1f} µs CPU per reserve + settle, {rate:.0f} pairs/s, {100 * handed:.0f}% of writes on the store's thread", flush=True)
        return
    if a.processes > 1 and a.store != "sqlite:":
        ap.error("--processes > 1 needs a store several processes can open: sqlite:")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{a.store}{tmp}/store" + (".db" if a.store == "sqlite:" else "")
        cmd = [sys.executable, "-m", "bench.store_pair", "--url", url, "--pairs", str(a.pairs), "--inflight", str(a.inflight)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(a.processes)]
        for i, p in enumerate(procs):
            out, _ = p.communicate()
            print(f"{a.store} process {i + 1}/{a.processes}, {a.inflight} in flight: {out.strip()}")


if __name__ == "__main__":
    main()
