"""How long each step of the embedded store's WAL checkpoints takes under load.

    python -m bench.checkpoint_steps [--pairs 10000] [--inflight 32]

The first step runs on its own connection and thread while writes go on; the
second holds the store's writes back while it runs (`EmbeddedStore._start_checkpoint`).
Its duration is what a write can wait for a checkpoint: the p99 that one call at
a time sees.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.store_pair import pairs_in_order
from extproc.stores.embedded import EmbeddedStore


async def measure(pairs: int, inflight: int) -> dict[str, list[float]]:
    store = EmbeddedStore(Path(tempfile.mkdtemp(prefix="ckpt-")) / "b.db")
    steps: dict[str, list[float]] = {"first (writes go on)": [], "second (writes wait)": []}
    plain = EmbeddedStore._checkpoint

    def timed(db: object, mode: str) -> None:
        t0 = time.perf_counter()
        plain(db, mode)  # type: ignore[arg-type]
        name = "first (writes go on)" if db is store._ckpt_db else "second (writes wait)"
        steps[name].append((time.perf_counter() - t0) * 1000)

    store._checkpoint = timed  # type: ignore[method-assign]  # the instance's, so the class keeps its own

    try:
        await asyncio.gather(*(pairs_in_order(store, f"{w}-", pairs // inflight) for w in range(inflight)))
    finally:
        await store.close()
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--inflight", type=int, default=32)
    args = ap.parse_args()
    for name, ms in asyncio.run(measure(args.pairs, args.inflight)).items():
        if ms:
            print(f"{name}: {len(ms)} checkpoints, median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms")


if __name__ == "__main__":
    main()
