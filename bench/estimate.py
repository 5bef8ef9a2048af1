"""Estimate cost of a 100k-token agent context: cold, then resent with one new message.

An agent resends its whole growing context every step. extproc caches token
counts per message, so the second request only tokenizes the new message.
Reports the median of several runs for: parse (JSON → facts), estimate cold
(fresh cache), estimate cached (same context + one new message), and the
whole body phase (parse + cached estimate). Writes bench/results-estimate.md.

    python -m bench.estimate
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from decimal import Decimal
from pathlib import Path

from extproc.estimate import TokenCounter, estimate
from extproc.protocols.schemas import schema_by_name
from extproc.tokenizers import count_tokens, get_encoding

WORDS = "budget agent reserve settle envelope stream token window ledger principal gateway mesh".split()


def make_context(target_tokens: int = 100_000) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a careful agent. " * 20}]
    total, i = 0, 0
    while total < target_tokens:
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] + str(i * 31 + j) for j in range(180))
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": text})
        total += count_tokens(text)
        i += 1
    return messages


def _est(facts, counter: TokenCounter) -> int:
    e = estimate(facts, counter=counter, encoding="o200k_base", safety_factor=Decimal(1), output_limit=4096,
                 fallback_output=4096)
    return e.input_tokens


def median_ms(fn, runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> str:
    get_encoding("o200k_base")
    schema = schema_by_name("openai.chat")
    assert schema is not None
    ctx = make_context()
    body1 = json.dumps({"model": "gpt-4o", "messages": ctx, "max_tokens": 1000}).encode()
    ctx2 = ctx + [{"role": "user", "content": "And now the next step, please: what remains of the budget?"}]
    body2 = json.dumps({"model": "gpt-4o", "messages": ctx2, "max_tokens": 1000}).encode()
    facts1 = schema.parse_request(body1, max_bytes=64 << 20)
    facts2 = schema.parse_request(body2, max_bytes=64 << 20)
    tokens = _est(facts1, TokenCounter())

    parse_ms = median_ms(lambda: schema.parse_request(body2, max_bytes=64 << 20))
    cold_ms = median_ms(lambda: _est(facts1, TokenCounter()), runs=5)

    def cached() -> None:
        counter = TokenCounter()
        _est(facts1, counter)  # the previous step filled the cache
        t0 = time.perf_counter()
        _est(facts2, counter)
        cached_times.append((time.perf_counter() - t0) * 1000)

    cached_times: list[float] = []
    for _ in range(7):
        cached()
    cached_ms = statistics.median(cached_times)

    warm = TokenCounter()
    _est(facts1, warm)
    body_phase_ms = median_ms(lambda: _est(schema.parse_request(body2, max_bytes=64 << 20), warm))

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    lines = [
        f"# Estimate benchmark ({len(ctx)} messages, {tokens:,} input tokens, {len(body1) / 1024:.0f} KiB body)",
        "",
        f"Machine: {cpu}, Python {platform.python_version()}. Median of 5-7 runs.",
        "",
        "| step | ms |",
        "|---|---:|",
        f"| parse request body (JSON → facts) | {parse_ms:.2f} |",
        f"| estimate, cold cache (tokenize everything) | {cold_ms:.2f} |",
        f"| estimate, same context + 1 new message (cached) | {cached_ms:.3f} |",
        f"| body phase: parse + cached estimate | {body_phase_ms:.2f} |",
        "",
        f"Target: cached estimate ≤ 2 ms — {'met' if cached_ms <= 2 else 'NOT met'}.",
    ]
    out = "\n".join(lines) + "\n"
    Path(__file__).with_name("results-estimate.md").write_text(out)
    return out


if __name__ == "__main__":
    print(main())
