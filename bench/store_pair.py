"""CPU of one reserve + settle pair (three lines) on a store alone, no service around it.

    python -m bench.store_pair [--store sqlite: | journal:] [--pairs 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from extproc.app import open_store
from extproc.stores.base import Kind, Line

NOW = 1_700_000_000_000
LINES = [
    Line("key:alice|cost|total", Kind.COUNTER, "cost", 10**15, 1000),
    Line("team:ml|total_tokens|day", Kind.COUNTER, "total_tokens", 10**15, 30, period="2026-12-02"),
    Line("key:alice|concurrency", Kind.CONCURRENCY, "concurrency", 10**6, 1),
]
USAGE = {"cost": 900, "input_tokens": 10, "output_tokens": 20}


async def measure(kind: str, pairs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"{kind}{tmp}/store" + (".db" if kind == "sqlite:" else ""))
        try:
            for i in range(-200, pairs):  # the first 200 warm up
                if i == 0:
                    t0 = time.process_time()
                await store.reserve("t", f"r{i}", LINES, now_ms=NOW + i, ttl_ms=60_000, meta={"model": "m"})
                await store.settle("t", f"r{i}", USAGE, now_ms=NOW + i)
            return (time.process_time() - t0) / pairs * 1e6
        finally:
            await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="journal:", choices=("sqlite:", "journal:"))
    ap.add_argument("--pairs", type=int, default=5000)
    a = ap.parse_args()
    print(f"{a.store} {asyncio.run(measure(a.store, a.pairs)):.1f} µs CPU per reserve + settle")


if __name__ == "__main__":
    main()
