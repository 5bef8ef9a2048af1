"""What growing a reservation during a stream costs (issue "Enforce during the stream").

Through the real stack (mock backend + `extproc serve` + Envoy, embedded store),
the same streamed `gpt-4o` call (`--tokens` output tokens, one every
`--delay-ms`) runs sequentially under two policies:

- `worst_case`: `streaming.right_size: false`, the call reserves its whole
  output cap at once and never extends;
- `growing`: the call reserves an expected output of 16 tokens and grows by
  `extend_step_tokens` (64) as the stream passes: an extension every ~64
  tokens, far more often than a real call (which reserves its p95).

Reported per mode: tokens/s of one call, mean gap between the chunks the
client receives, extensions per call (from the service's
`extproc_extensions_total`), and the added time per extension. `make bench`
appends the table to bench/results.md ("Cost of extensions").

    python -m bench.growth_cost [--tokens 2000] [--delay-ms 1] [--calls 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass

import httpx
import yaml

from bench.fanout import DEMO_POLICY
from extproc.stack import Stack

MODES = ("worst_case", "growing")


def policy(mode: str) -> str:
    doc = yaml.safe_load(DEMO_POLICY.read_text())
    doc["budgets"] = [{"scope": "key", "limits": [{"dimension": "cost", "limit": "1000.00"}]}]
    doc.pop("runs", None)
    if mode == "worst_case":
        doc["streaming"] = {"right_size": False}
    else:
        doc["prices"]["models"]["gpt-4o"]["expected_output_tokens"] = 16
        doc["streaming"] = {"extend_step_tokens": 64, "min_history": 1000}  # never right-sized from history
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class Row:
    mode: str
    tokens_per_s: float
    chunk_gap_ms: float
    extensions_per_call: float
    seconds_per_call: float


async def extensions(stack: Stack) -> float:
    async with httpx.AsyncClient(base_url=stack.admin_url, timeout=10) as a:
        text = (await a.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith('extproc_extensions_total{outcome="ok"}'))


async def one(c: httpx.AsyncClient, tokens: int, delay_ms: float) -> tuple[float, list[float], int]:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Write a long answer."}]}
    headers = {"authorization": "Bearer sk-demo-bob", "x-mock-output-tokens": str(tokens), "x-mock-delay-ms": str(delay_ms)}
    t0 = time.perf_counter()
    gaps, last, got = [], None, 0
    async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for chunk in r.aiter_bytes():
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            got += chunk.count(b" hello")
    if got != tokens:
        raise RuntimeError(f"expected {tokens} tokens, got {got}")
    return time.perf_counter() - t0, gaps, got


async def measure(mode: str, *, tokens: int, delay_ms: float, calls: int) -> Row:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(policy(mode))
    with Stack(policy=f.name) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as c:
            await one(c, 50, 0)  # warm-up: connections, caches
            before = await extensions(stack)
            times, gaps = [], []
            for _ in range(calls):
                t, g, _ = await one(c, tokens, delay_ms)
                times.append(t)
                gaps += g
            ext = (await extensions(stack) - before) / calls
    t = statistics.median(times)
    return Row(mode, tokens / t, statistics.mean(gaps) * 1000 if gaps else 0.0, ext, t)


def section(rows: list[Row], *, tokens: int, delay_ms: float) -> list[str]:
    base = next(r for r in rows if r.mode == "worst_case")
    out = [
        "## Cost of extensions (bench/growth_cost.py)", "",
        f"One streamed `gpt-4o` call of {tokens} tokens, one every {delay_ms:g} ms, through Envoy and extproc "
        "(embedded store), sequentially. `growing` reserves 16 tokens and extends every 64: far more often than a real "
        "right-sized call, which reserves its p95.", "",
        "| mode | tokens/s | mean gap between chunks | extensions per call | s per call | added per extension |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        added = (r.seconds_per_call - base.seconds_per_call) / r.extensions_per_call * 1000 if r.extensions_per_call else 0.0
        out.append(
            f"| {r.mode} | {r.tokens_per_s:,.0f} | {r.chunk_gap_ms:.2f} ms | {r.extensions_per_call:.1f} | "
            f"{r.seconds_per_call:.3f} | {added:+.3f} ms |"
        )
    return out + [""]


async def run(tokens: int, delay_ms: float, calls: int) -> list[str]:
    rows = [await measure(m, tokens=tokens, delay_ms=delay_ms, calls=calls) for m in MODES]
    return section(rows, tokens=tokens, delay_ms=delay_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--delay-ms", type=float, default=1.0)
    p.add_argument("--calls", type=int, default=5)
    a = p.parse_args()
    print("\n".join(asyncio.run(run(a.tokens, a.delay_ms, a.calls))))


if __name__ == "__main__":
    main()
