"""Bounded work per caller (issue 10): does one hostile key slow everyone else down?

Two parts:

1. In process, no stack: how long the event loop stalls while an 8 MB prompt is
   counted inline (the old path) versus with `TokenCounter.count_async` (the
   pool; tiktoken releases the GIL), measured by a 1 ms ticker task.
2. Through the real stack (`extproc.stack.Stack`: mock backend + `extproc serve`
   + Envoy): victims (two keys, closed loop) alone, then the same load while one
   key with an almost spent budget sends large prompts in a loop. The target:
   victims' p99 within 2x of the baseline, zero victim errors. Each attack:
   `prose` (8 MB of ordinary words), `letter` (8 MB of "a"), `spaces` (1M
   spaces), `tiny` (~6 MB of 150k tiny messages).

Writes bench/results-hostile.md.

    python -m bench.hostile [--duration 10] [--concurrency 4] [--attacks prose,letter,spaces,tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.load import Result, chat_body, one, run
from extproc.estimate import TokenCounter
from extproc.stack import Stack

VICTIMS = ("sk-hostile-alice", "sk-hostile-bob")
ATTACKER = "sk-hostile-mallory"
WORDS = "budget agent reserve settle envelope stream token window ledger principal gateway mesh".split()


def prose(size: int) -> str:
    rng = random.Random(1)
    out, n = [], 0
    while n < size:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def attack_body(kind: str, mb: float) -> bytes:
    size = int(mb * 1_000_000)
    if kind == "tiny":
        msgs = ",".join('{"role":"user","content":"m%06d"}' % i for i in range(size // 40))
        return ('{"model":"gpt-4o","max_tokens":16,"messages":[' + msgs + "]}").encode()
    content = {"prose": lambda: prose(size), "letter": lambda: "a" * size, "spaces": lambda: " " * min(size, 1_000_000)}[kind]()
    return json.dumps({"model": "gpt-4o", "max_tokens": 16, "messages": [{"role": "user", "content": content}]}).encode()


def write_policy(path: Path, max_body: int) -> Path:
    def key(k: str, who: str) -> dict[str, str]:
        return {"sha256": hashlib.sha256(k.encode()).hexdigest(), "principal": who, "team": who, "org": "bench"}

    policy = {
        "version": 1,
        "prices": {"version": "bench", "models": {"gpt-4o": {"input": "2.50", "output": "10.00", "output_limit": 16384}}},
        "keys": [key(VICTIMS[0], "alice"), key(VICTIMS[1], "bob"), key(ATTACKER, "mallory")],
        "budgets": [
            {"scope": "key", "id": "mallory", "limits": [{"dimension": "cost", "limit": "0.0001"}]},
            {"scope": "org", "limits": [{"dimension": "cost", "limit": "1000000.00"}]},
        ],
        "max_body_bytes": max_body,
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


# -- part 1: event-loop stalls in process -------------------------------------


async def _max_stall_ms(work: Callable[[], Any]) -> tuple[float, float]:
    """(longest gap between 1 ms ticks, duration) while `work()` (a coroutine) runs."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    done.set()
    await t
    return max(gaps) * 1000, took * 1000


async def loop_stalls(mb: float) -> list[tuple[str, float, float]]:
    text = prose(int(mb * 1_000_000))
    rows = []
    for label, inline in (("inline on the event loop (old path)", True), ("count_async (pool)", False)):
        counter = TokenCounter()
        try:

            async def work(inline: bool = inline, counter: TokenCounter = counter) -> None:
                if inline:
                    counter.count_segments([text], "o200k_base")
                else:
                    await counter.count_async([text], "o200k_base", owner="mallory")

            stalls = [await _max_stall_ms(work) for _ in range(3)]
            rows.append((label, statistics.median(s for s, _ in stalls), statistics.median(d for _, d in stalls)))
        finally:
            counter.close()
    return rows


# -- part 2: through the stack ------------------------------------------------


async def victims(url: str, concurrency: int, duration: float) -> list[Result]:
    body = chat_body()
    per = max(1, concurrency // len(VICTIMS))
    return list(
        await asyncio.gather(
            *(run(url, body=body, headers={"Authorization": f"Bearer {k}"}, concurrency=per, duration_s=duration) for k in VICTIMS)
        )
    )


async def attacker(url: str, body: bytes, stop: asyncio.Event, statuses: dict[int, int], lanes: int) -> None:
    async def lane() -> None:
        while not stop.is_set():
            try:
                status, _, _ = await one(url, body=body, headers={"Authorization": f"Bearer {ATTACKER}"})
            except (TimeoutError, OSError, ValueError, IndexError):
                status = -1
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(lane() for _ in range(lanes)))


def merge(results: list[Result]) -> dict[str, Any]:
    lat = sorted(x for r in results for x in r.latencies_ms)
    statuses: dict[int, int] = {}
    for r in results:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] if lat else float("nan")

    return {"requests": len(lat), "errors": sum(r.errors for r in results), "statuses": statuses, "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": lat[-1] if lat else float("nan")}


async def through_stack(stack: Stack, attacks: list[str], concurrency: int, duration: float, mb: float, lanes: int) -> list[dict[str, Any]]:
    url = stack.url
    status, _, text = await one(url, body=chat_body(), headers={"Authorization": f"Bearer {VICTIMS[0]}"})
    assert status == 200, text[:300]
    await victims(url, concurrency, 1.0)  # warm up
    rows = [{"run": "baseline (no attacker)", **merge(await victims(url, concurrency, duration))}]
    for kind in attacks:
        body = attack_body(kind, mb)
        stop, statuses = asyncio.Event(), {}
        atk = asyncio.create_task(attacker(url, body, stop, statuses, lanes))
        await asyncio.sleep(0.5)  # the first attack requests are in flight
        res = merge(await victims(url, concurrency, duration))
        stop.set()
        await atk
        rows.append({"run": f"attack {kind} ({len(body) / 1e6:.1f} MB body)", **res, "attacker": statuses})
    return rows


def report(stalls: list[tuple[str, float, float]], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = rows[0]["p99_ms"]
    lines = [
        "# Hostile-caller benchmark (issue 10: bounded work per caller)",
        "",
        f"`python -m bench.hostile --duration {args.duration} --concurrency {args.concurrency} --mb {args.mb} --lanes {args.lanes}`"
        f" on {time.strftime('%Y-%m-%d')}; 2 shared cores, so compare rows of one run.",
        "",
        f"## Event-loop stall while counting {args.mb} MB of prose (median of 3)",
        "",
        "| path | longest stall of a 1 ms ticker, ms | count took, ms |",
        "|---|---:|---:|",
        *[f"| {label} | {stall:.1f} | {took:.0f} |" for label, stall, took in stalls],
        "",
        "## Victims (two keys, closed loop) through Envoy + extproc",
        "",
        "| run | victim requests | victim errors | p50 ms | p99 ms | p99 / baseline | max ms | attacker statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r["p99_ms"] / base if base else float("nan")
        lines.append(
            f"| {r['run']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio:.2f} | {r['max_ms']:.0f} | {r.get('attacker', '')} |"
        )
    worst = max((r["p99_ms"] / base for r in rows[1:]), default=0.0) if base else float("nan")
    errors = sum(r["errors"] for r in rows[1:])
    lines += ["", f"Target: victims' p99 ≤ 2× baseline and zero victim errors — {'met' if worst <= 2 and errors == 0 else 'NOT met'} (worst {worst:.2f}×, {errors} errors)."]
    return "\n".join(lines) + "\n"


async def amain(args: argparse.Namespace) -> str:
    stalls = await loop_stalls(args.mb)
    attacks = [a for a in args.attacks.split(",") if a]
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as d:
        policy = write_policy(Path(d) / "policy.yaml", 16 * 1024 * 1024 - 65536)
        stack = Stack(policy=str(policy), workdir=Path(d) / "stack", backends=("backend",))
        with stack:
            rows = await through_stack(stack, attacks, args.concurrency, args.duration, args.mb, args.lanes)
    out = report(stalls, rows, args)
    if not args.no_write:
        Path(__file__).with_name("results-hostile.md").write_text(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--concurrency", type=int, default=4, help="victim connections (split over two keys)")
    ap.add_argument("--mb", type=float, default=8.0, help="attack body size")
    ap.add_argument("--lanes", type=int, default=1, help="attacker connections")
    ap.add_argument("--attacks", default="prose,letter,spaces,tiny")
    ap.add_argument("--no-write", action="store_true")
    print(asyncio.run(amain(ap.parse_args(argv))))


if __name__ == "__main__":
    main()
