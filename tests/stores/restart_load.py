"""Load for the restart tests: concurrent reserve -> settle | release | (left open)
through the Engine, reporting every settle that returned.

Run as a child process (`python -m tests.stores.restart_load STORE_URL`, sqlite:PATH or
journal:DIR) it drives that store until it is killed, printing "settled <rid> <cost>" after each
settle returns. The Redis restart test imports `run_load` and drives it in-process.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Callable

from extproc.engine.budget import Engine, Identity
from extproc.errors import StoreUnavailable
from extproc.policy.model import Policy

POLICY = Policy.model_validate(
    {
        "prices": {"models": {"m": {"input": "1", "output": "2"}}},
        "budgets": [
            {"scope": "key", "limits": [{"dimension": "cost", "limit": "1000000"}, {"dimension": "concurrency", "limit": 1000}]},
            {"scope": "team", "limits": [{"dimension": "total_tokens", "limit": 10**12}]},
        ],
        "runs": {"max_active_per_principal": 1000, "limits": [{"dimension": "requests", "limit": 10**9}]},
        "reservation_ttl_seconds": 600,
    }
)
WHO = Identity("alice", team="ml", org="acme")
COST = 1_000  # nano-USD per call, a fixed charge so the books are easy to read


async def run_load(
    engine: Engine,
    *,
    tasks: int,
    on_settled: Callable[[str, int], None],
    stop: asyncio.Event,
    failures: list[str] | None = None,
) -> None:
    ids = itertools.count()

    async def worker(w: int) -> None:
        while not stop.is_set():
            n = next(ids)
            rid = f"w{w}-{n}"
            try:
                d = await engine.reserve(
                    POLICY, WHO, run_id=f"run{w % 4}", reservation_id=rid,
                    estimate={"cost": 2 * COST, "input_tokens": 5, "output_tokens": 5, "requests": 1}, meta={"model": "m"},
                )  # fmt: skip
            except StoreUnavailable as e:
                if failures is not None:
                    failures.append(str(e))
                await asyncio.sleep(0.01)
                continue
            assert d.allowed, d.message
            if n % 10 == 9:
                continue  # left open: the reaper must settle it
            await asyncio.sleep(0)
            for _attempt in range(200):  # settle like the session does: retry until the store answers
                try:
                    if n % 10 == 8:
                        await engine.release(d.hold)
                    else:
                        r = await engine.settle(d.hold, {"cost": COST, "input_tokens": 5, "output_tokens": 3, "requests": 1})
                        on_settled(rid, r.charged.get("cost", 0))
                    break
                except StoreUnavailable as e:
                    if failures is not None:
                        failures.append(str(e))
                    await asyncio.sleep(0.02)

    await asyncio.gather(*(worker(w) for w in range(tasks)))


async def _child(url: str) -> None:
    from extproc.app import open_store
    from extproc.stores import parse_url
    from extproc.stores.journal import JournalStore

    kind, path = parse_url(url)  # the journal store compacts every 64 KiB: the kill may land in a compaction
    engine = Engine(JournalStore(path, compact_bytes=1 << 16) if kind == "journal" else open_store(url))

    def report(rid: str, cost: int) -> None:
        sys.stdout.write(f"settled {rid} {cost}\n")
        sys.stdout.flush()

    await run_load(engine, tasks=16, on_settled=report, stop=asyncio.Event())


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1]))
