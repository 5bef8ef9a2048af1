"""Budget engine throughput: reserve + settle per second on every store.

    python -m bench.engine [--seconds 3] [--out bench/results-engine.md]

For each store (embedded SQLite file, one Redis, a 3-master Redis Cluster) it
runs `Engine.reserve` followed by `Engine.settle` in a loop from 1 task and from
64 concurrent tasks, and compares with the cheapest possible round trip on the
same backend: a bare `INCRBY` on the same Redis (or cluster), and a bare
single-row `UPDATE` transaction on the same kind of SQLite file. One reserve +
settle is two round trips, so a ratio near 0.5 means the engine costs little
more than the network/transaction floor.

It starts its own redis-server processes (tests/support/redis_server.py) and
prints a Markdown table that it also writes to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from extproc.engine.budget import Engine, Identity  # noqa: E402
from extproc.policy.model import Policy  # noqa: E402
from extproc.stores.embedded import EmbeddedStore  # noqa: E402
from extproc.stores.redis_store import RedisStore  # noqa: E402
from tests.support.redis_server import RedisCluster, RedisServer, redis_binary  # noqa: E402

POLICY = Policy.model_validate(
    {
        "prices": {"models": {"m": {"input": "1", "output": "2"}}},
        "budgets": [
            {"scope": "key", "limits": [{"dimension": "cost", "limit": "1000000"}, {"dimension": "concurrency", "limit": 10000}]},
            {"scope": "team", "limits": [{"dimension": "cost", "limit": "1000000", "window": "day"}]},
            {"scope": "org", "limits": [{"dimension": "total_tokens", "limit": 10**15, "window": "rolling", "seconds": 60}]},
        ],
        "runs": {"max_active_per_principal": 10000, "limits": [{"dimension": "requests", "limit": 10**9}]},
    }
)
ORGS = 8  # budget trees: on the cluster they spread over the shards
LINES = "key cost (total) + key concurrency + team cost (calendar day) + org tokens (rolling 60 s) + run steps"
TASKS = (1, 64)


@dataclass
class Row:
    store: str
    tasks: int
    ops: float
    baseline: str
    baseline_ops: float

    @property
    def ratio(self) -> float:
        return self.ops / self.baseline_ops if self.baseline_ops else 0.0


async def measure(tasks: int, seconds: float, op: Callable[[int, int], Awaitable[Any]]) -> float:
    """Operations per second of `op(task, n)` run in a loop by `tasks` tasks (after a short warm-up)."""
    counter = itertools.count()
    done = 0
    measuring = False
    stop = False

    async def worker(t: int) -> None:
        nonlocal done
        while not stop:
            await op(t, next(counter))
            if measuring:
                done += 1

    workers = [asyncio.create_task(worker(t)) for t in range(tasks)]
    await asyncio.sleep(min(0.5, seconds / 4))
    measuring, start = True, time.perf_counter()
    await asyncio.sleep(seconds)
    measuring, elapsed = False, time.perf_counter() - start
    stop = True
    await asyncio.gather(*workers)
    return done / elapsed


def engine_op(engine: Engine, *, yield_each: bool) -> Callable[[int, int], Awaitable[None]]:
    people = [Identity(f"user{i}", team=f"team{i % 16}", org=f"org{i % ORGS}") for i in range(64)]
    estimate = {"cost": 3_000, "input_tokens": 500, "output_tokens": 1000, "requests": 1}
    usage = {"cost": 2_000, "input_tokens": 500, "output_tokens": 700, "requests": 1}

    async def op(t: int, n: int) -> None:
        d = await engine.reserve(
            POLICY, people[t], run_id=f"run{n % 4}", reservation_id=f"b{t}-{n}", estimate=estimate, meta={"model": "m"}
        )
        assert d.allowed, d.message
        await engine.settle(d.hold, usage)
        if yield_each:
            await asyncio.sleep(0)  # the embedded store never suspends: let the timer and other tasks run

    return op


async def bench_engine(store: Any, seconds: float) -> dict[int, float]:
    engine = Engine(store)
    op = engine_op(engine, yield_each=isinstance(store, EmbeddedStore))
    return {tasks: await measure(tasks, seconds, op) for tasks in TASKS}


async def bench_incrby(client: Any, seconds: float) -> dict[int, float]:
    async def op(t: int, n: int) -> None:
        await client.incrby(f"bench:{{org{t % ORGS}}}:n", 1)

    return {tasks: await measure(tasks, seconds, op) for tasks in TASKS}


async def bench_sqlite_update(path: Path, seconds: float) -> dict[int, float]:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO kv VALUES ('n', 0)")

    async def op(t: int, n: int) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE kv SET v = v + 1 WHERE k = 'n'")
        db.execute("COMMIT")
        await asyncio.sleep(0)  # yield like an awaited store call would

    try:
        return {tasks: await measure(tasks, seconds, op) for tasks in TASKS}
    finally:
        db.close()


def machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True).stdout.split()
    server = next((v.split("=")[1] for v in version if v.startswith("v=")), "?")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        f"- CPU: {cpu}, `nproc` = {os.cpu_count()} (load average {load:.2f} at start; other processes share the machine)",
        f"- Python {platform.python_version()}, redis-py {redis.__version__}, redis-server {server} "
        "(AOF off for the bench; the client, the servers and the bench share the same cores)",
        f"- Policy per call: {LINES}; {ORGS} budget trees (orgs), 64 principals",
    ]


async def run(seconds: float) -> list[Row]:
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))

    print("embedded…", file=sys.stderr)
    store = EmbeddedStore(tmp / "budget.db")
    eng = await bench_engine(store, seconds)
    await store.close()
    base = await bench_sqlite_update(tmp / "update.db", seconds)
    rows += [Row("embedded (SQLite WAL)", t, eng[t], "single-row UPDATE transaction", base[t]) for t in TASKS]

    print("redis…", file=sys.stderr)
    server = RedisServer(appendonly=False).start()
    try:
        store = RedisStore(server.url)
        eng = await bench_engine(store, seconds)
        await store.close()
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        base = await bench_incrby(client, seconds)
        await client.aclose()
    finally:
        server.stop()
    rows += [Row("Redis", t, eng[t], "INCRBY round trip", base[t]) for t in TASKS]

    print("cluster…", file=sys.stderr)
    cluster = RedisCluster()
    for n in cluster.nodes:
        n.appendonly = False
    cluster.start()
    try:
        store = RedisStore(cluster.url, cluster=True)
        eng = await bench_engine(store, seconds)
        await store.close()
        client = aioredis.RedisCluster.from_url(cluster.url, decode_responses=True)
        base = await bench_incrby(client, seconds)
        await client.aclose()
    finally:
        cluster.stop()
    rows += [Row("Redis Cluster (3 masters)", t, eng[t], "INCRBY round trip", base[t]) for t in TASKS]
    return rows


def table(rows: list[Row], seconds: float) -> str:
    out = [
        "# Budget engine throughput",
        "",
        f"`python -m bench.engine` ({time.strftime('%Y-%m-%d %H:%M %Z')}, {seconds:g} s per measurement).",
        "One operation = `Engine.reserve` + `Engine.settle` (two store round trips: one EVALSHA each on Redis,",
        "one transaction each on SQLite). Ratio = engine operations / baseline operations per second.",
        "",
        *machine(),
        "",
        "| store | tasks | reserve+settle /s | baseline | baseline /s | ratio |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r.store} | {r.tasks} | {r.ops:,.0f} | {r.baseline} | {r.baseline_ops:,.0f} | {r.ratio:.2f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement time per row (default %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-engine.md"))
    args = ap.parse_args()
    rows = asyncio.run(run(args.seconds))
    text = table(rows, args.seconds)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
