"""Longest event-loop stall while the service handles one hostile body (issue 10).

In process, no Envoy: a `Session` over a real embedded store handles a large body
from a key with almost no budget left, while a 1 ms ticker measures how long the
event loop was blocked: what the other callers of the same worker feel, whatever
the machine's load (bench/hostile.py measures the whole stack, which depends on it).
Caches are warmed by one request first, as in a running service.

    python -m bench.stall [--mb 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
from pathlib import Path

from bench.hostile import attack_body
from extproc.engine.budget import Engine
from extproc.policy.loader import PolicyHolder, parse_policy
from extproc.server.services import Services
from extproc.server.session import Session
from extproc.stores.embedded import EmbeddedStore

KEY = "sk-stall-mallory"
POLICY = f"""
version: 1
prices:
  models:
    gpt-4o: {{ input: "2.50", output: "10.00" }}
keys:
  - {{ sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, principal: mallory }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "0.001" }}]
"""
HEADERS = {":path": "/v1/chat/completions", ":method": "POST", "authorization": f"Bearer {KEY}"}


async def one(services: Services, body: bytes) -> int:
    s = Session(services)
    await s.request_headers(HEADERS, False)
    r = await s.request_body(body)
    return r.immediate.status if r.immediate else 200


class Ticker:
    """A task that wakes every 1 ms and keeps the longest gap it saw beyond that."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.running = True

    async def run(self) -> None:
        last = time.perf_counter()
        while self.running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - 0.001)
            last = now


async def main(mb: float, repeat: int) -> None:
    store = EmbeddedStore(Path(tempfile.mkdtemp()) / "budget.db")
    services = Services(PolicyHolder(parse_policy(POLICY)), Engine(store))
    print("| body | status | ms per request | longest loop stall, ms |\n|---|---:|---:|---:|")
    try:
        for kind in ("prose", "letter", "spaces", "tiny"):
            body = attack_body(kind, mb)
            await one(services, body)  # warm caches
            ticker = Ticker()
            task = asyncio.create_task(ticker.run())
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            for _ in range(repeat):
                status = await one(services, body)
            took = (time.perf_counter() - t0) / repeat
            ticker.running = False
            await task
            print(f"| {kind} ({len(body) / 1e6:.1f} MB) | {status} | {took * 1e3:.0f} | {ticker.worst * 1e3:.1f} |")
    finally:
        services.counter.close()
        await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.mb, args.repeat))
