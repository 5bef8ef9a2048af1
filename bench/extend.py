"""What one reservation extension costs: µs per `Engine.extend` on each store.

    python -m bench.extend [--count 2000] [--streams 32]

A stream extends its reservation every few hundred output tokens, so this is a
per-chunk cost of the hot path. For each store (embedded SQLite file, one
Redis) it reserves with the policy of bench/engine.py (five lines: key cost,
key concurrency, team cost per day, org tokens rolling 60 s, run steps) and
then:

- latency: `--count` sequential extends of one reservation, p50 / p99 / mean µs;
- throughput: `--streams` reservations extended concurrently, extends per second;
- for scale, the p50 of a reserve of the same call on the same store (the
  machine's load moves both alike).

It starts its own redis-server (tests/support/redis_server.py), prints one
Markdown table, and stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.engine import POLICY  # noqa: E402
from extproc.engine.budget import Engine, Hold, Identity  # noqa: E402
from extproc.stores.embedded import EmbeddedStore  # noqa: E402
from extproc.stores.redis_store import RedisStore  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

WHO = Identity("alice", team="ml", org="acme")
ESTIMATE = {"cost": 3_000, "input_tokens": 500, "output_tokens": 1000, "requests": 1}
STEP = {"cost": 600, "output_tokens": 200}  # one extension: 200 output tokens


async def _hold(engine: Engine, rid: str) -> Hold:
    d = await engine.reserve(POLICY, WHO, run_id="r1", reservation_id=rid, estimate=ESTIMATE, meta={})
    assert d.allowed, d.message
    return d.hold


async def reserve_p50(engine: Engine, count: int) -> float:
    out = []
    for i in range(count):
        t = time.perf_counter_ns()
        hold = await _hold(engine, f"r{i}")
        out.append((time.perf_counter_ns() - t) / 1_000)
        await engine.release(hold)
    return statistics.median(out)


async def latency(engine: Engine, count: int) -> list[float]:
    hold = await _hold(engine, "lat")
    for _ in range(50):  # warm-up: scripts loaded, pages cached
        await engine.extend(POLICY, hold, STEP)
    out = []
    for _ in range(count):
        t = time.perf_counter_ns()
        r = await engine.extend(POLICY, hold, STEP)
        out.append((time.perf_counter_ns() - t) / 1_000)
        assert r.ok
    await engine.release(hold)
    return out


async def throughput(engine: Engine, streams: int, count: int) -> float:
    holds = [await _hold(engine, f"s{i}") for i in range(streams)]

    async def stream(hold: Hold) -> None:
        for _ in range(count // streams):
            assert (await engine.extend(POLICY, hold, STEP)).ok
            await asyncio.sleep(0)  # the embedded store's thread hop aside, let the other streams in

    t = time.perf_counter()
    await asyncio.gather(*(stream(h) for h in holds))
    elapsed = time.perf_counter() - t
    for h in holds:
        await engine.release(h)
    return (count // streams) * streams / elapsed


async def measure(name: str, store: Any, count: int, streams: int) -> str:
    """One table row: extend latency percentiles, concurrent extends/s, reserve p50."""
    engine = Engine(store)
    try:
        lat, ops = await latency(engine, count), await throughput(engine, streams, count)
        reserve = await reserve_p50(engine, count // 4)
    finally:
        await store.close()
    q = statistics.quantiles(lat, n=100)
    return f"| {name} | {q[49]:.0f} | {q[98]:.0f} | {statistics.fmean(lat):.0f} | {ops:,.0f} | {reserve:.0f} |"


async def main(count: int, streams: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-extend-"))
    rows = [await measure("embedded (SQLite WAL)", EmbeddedStore(tmp / "budget.db"), count, streams)]
    server = RedisServer(appendonly=False).start()
    try:
        rows.append(await measure("Redis (one server, AOF off)", RedisStore(server.url), count, streams))
    finally:
        server.stop()
    print(f"Engine.extend, 5 budget lines, {count} sequential extends; {streams} concurrent streams\n")
    print(f"| store | extend p50 µs | p99 µs | mean µs | extends/s ({streams} streams) | reserve p50 µs |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--streams", type=int, default=32)
    a = p.parse_args()
    asyncio.run(main(a.count, a.streams))
