"""An agent's fan-out against a budget (issue "Enforce during the stream"): served, cut, refused.

Through the real stack (mock backend + `extproc serve` + Envoy) with the demo
policy, bob's key ($0.50) calls `gpt-4o` with the official `openai` SDK, no
`max_tokens`, as an agent does:

1. *fits*: 5 sequential calls (the warm-up: the service learns what bob's calls
   really generate), then 20 in parallel whose real total fits the budget.
   Worst-case reservations (16,384 output tokens, ~$0.16 each) would serve 3.
2. *overflows*: each call really generates 4,000 tokens (~$0.04; 12 fit in
   $0.50). After a warm-up of 5 such calls, bob's key is credited back to
   $0.50 available, then 20 calls fan out. Every call must be served whole,
   cut cleanly (`finish_reason: "length"`, no SDK exception) or refused (429);
   spend must stay within the limit to the nano-dollar.

Both run with streamed calls, and again with JSON calls on a policy that sets
`upstream_stream: true` for gpt-4o (the service streams from the backend and
returns the JSON). A third check: a run whose wall-clock limit passes
mid-stream is cut, and how long after its deadline the client saw the end.

Writes bench/results-fanout.md.

    python -m bench.fanout [--calls 20] [--tokens 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from extproc.money import nano_to_usd, usd_to_nano
from extproc.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
DEMO_POLICY = ROOT / "policies" / "demo.yaml"
BOB = "sk-demo-bob"
PROMPT = [{"role": "user", "content": "Plan the next step of the refactor and explain it."}]


def demo_policy(*, upstream_stream: bool = False, run_seconds: int | None = None) -> str:
    """The shipped demo policy, optionally with gpt-4o streamed upstream or a run wall-clock limit."""
    doc = yaml.safe_load(DEMO_POLICY.read_text())
    if upstream_stream:
        doc["prices"]["models"]["gpt-4o"]["upstream_stream"] = True
    if run_seconds is not None:
        doc["runs"]["limits"] = [*doc["runs"]["limits"], {"dimension": "duration", "limit": run_seconds}]
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class Outcome:
    served: int = 0  # complete, uncut, on the model asked for
    downshifted: int = 0  # complete on a cheaper model (the demo policy downshifts gpt-4o to gpt-4o-mini)
    cut: int = 0  # ended by the service in the API's terms (finish_reason "length")
    refused: int = 0  # 429 before anything was generated
    errors: list[str] = field(default_factory=list)  # anything else: an SDK exception, a 5xx
    output_tokens: list[int] = field(default_factory=list)

    def row(self) -> str:
        return f"{self.served} served, {self.downshifted} downshifted, {self.cut} cut, {self.refused} refused, {len(self.errors)} errors"


async def one_call(client: openai.AsyncOpenAI, *, stream: bool, tokens: int | None, delay_ms: float, run: str | None = None) -> tuple[str, int]:
    """One agent step: ("served" | "downshifted" | "cut" | "refused", output tokens seen). Raises anything else."""
    headers = {"x-mock-delay-ms": str(delay_ms)}
    if tokens is not None:
        headers["x-mock-output-tokens"] = str(tokens)
    if run is not None:
        headers["x-run-id"] = run
    try:
        if stream:
            finish, text, model = None, [], ""
            response = await client.chat.completions.create(model="gpt-4o", messages=PROMPT, stream=True, extra_headers=headers)  # type: ignore[arg-type]
            async for chunk in response:
                model = chunk.model or model
                for choice in chunk.choices:
                    text.append(choice.delta.content or "")
                    finish = choice.finish_reason or finish
            out = "".join(text).count(" hello")
        else:
            completion = await client.chat.completions.create(model="gpt-4o", messages=PROMPT, extra_headers=headers)  # type: ignore[arg-type]
            finish, model = completion.choices[0].finish_reason, completion.model
            out = (completion.choices[0].message.content or "").count(" hello")
    except openai.RateLimitError:
        return "refused", 0
    if finish == "length":
        return "cut", out
    if finish != "stop":
        raise AssertionError(f"unexpected finish_reason {finish!r}")
    return ("served" if model == "gpt-4o" else "downshifted"), out


async def fan_out(client: openai.AsyncOpenAI, n: int, *, stream: bool, tokens: int | None, delay_ms: float) -> Outcome:
    results = await asyncio.gather(*(one_call(client, stream=stream, tokens=tokens, delay_ms=delay_ms) for _ in range(n)), return_exceptions=True)
    o = Outcome()
    for r in results:
        if isinstance(r, BaseException):
            o.errors.append(f"{type(r).__name__}: {r}")
            continue
        kind, out = r
        setattr(o, kind, getattr(o, kind) + 1)
        o.output_tokens.append(out)
    return o


async def key_state(stack: Stack, principal: str = "bob") -> dict[str, Any]:
    """bob's key cost line as the store sees it: limit (with credits), spent, reserved (nano-USD)."""
    async with httpx.AsyncClient(base_url=stack.admin_url, headers={"authorization": f"Bearer {stack.admin_token}"}, timeout=10) as a:
        doc = (await a.get("/admin/budgets", params={"principal": principal})).json()
        for row in doc["budgets"]:
            if row["scope"] == f"key:{principal}" and row["dimension"] == "cost":
                return {k: usd_to_nano(row[k]) for k in ("limit", "spent", "reserved")}
    raise LookupError("no key cost budget for bob")


async def credit_back(stack: Stack, available_usd: str, principal: str = "bob") -> None:
    """Credit bob's key so exactly `available_usd` is left (after a warm-up spent some)."""
    st = await key_state(stack, principal)
    missing = usd_to_nano(available_usd) - (st["limit"] - st["spent"] - st["reserved"])
    if missing > 0:
        async with httpx.AsyncClient(base_url=stack.admin_url, headers={"authorization": f"Bearer {stack.admin_token}"}, timeout=10) as a:
            r = await a.post("/admin/budgets/adjust", json={"principal": principal, "scope": "key", "dimension": "cost", "credit": nano_to_usd(missing)})
            r.raise_for_status()


async def settled(stack: Stack, timeout: float = 10.0) -> dict[str, Any]:
    """bob's key once nothing is reserved any more (streams settle as Envoy closes them)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await key_state(stack)
        if st["reserved"] == 0 or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.05)


@dataclass
class Scenario:
    name: str
    outcome: Outcome
    state: dict[str, Any]  # bob's key after it settled
    seconds: float


async def fits(stack: Stack, *, stream: bool, calls: int = 20, delay_ms: float = 0.5) -> Scenario:
    async with openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=BOB, max_retries=0, timeout=60) as client:
        for _ in range(5):
            await one_call(client, stream=stream, tokens=None, delay_ms=delay_ms)
        t0 = time.perf_counter()
        outcome = await fan_out(client, calls, stream=stream, tokens=None, delay_ms=delay_ms)
    return Scenario(f"fits ({'stream' if stream else 'json'})", outcome, await settled(stack), time.perf_counter() - t0)


async def overflows(stack: Stack, *, stream: bool, calls: int = 20, tokens: int = 4000, delay_ms: float = 0.5) -> Scenario:
    async with openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=BOB, max_retries=0, timeout=120) as client:
        for _ in range(5):
            await one_call(client, stream=stream, tokens=tokens, delay_ms=0)
        await credit_back(stack, "0.50")
        t0 = time.perf_counter()
        outcome = await fan_out(client, calls, stream=stream, tokens=tokens, delay_ms=delay_ms)
    return Scenario(f"overflows ({'stream' if stream else 'json'})", outcome, await settled(stack), time.perf_counter() - t0)


async def deadline(stack: Stack, *, seconds: int) -> float:
    """Seconds between a run's wall-clock deadline (its first reservation + `seconds`, as the
    store recorded it) and the end of its stream as the client saw it."""
    async with openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=BOB, max_retries=0, timeout=60) as client:
        kind, _ = await one_call(client, stream=True, tokens=seconds * 400, delay_ms=5, run="deadline-run")
    ended_ms = time.time() * 1000
    if kind != "cut":
        raise AssertionError(f"the run's stream was {kind}, not cut at its deadline")
    async with httpx.AsyncClient(base_url=stack.admin_url, headers={"authorization": f"Bearer {stack.admin_token}"}, timeout=10) as a:
        doc = (await a.get("/admin/budgets", params={"principal": "bob", "run": "deadline-run"})).json()
    return (ended_ms - (doc["run_state"]["created_at_ms"] + seconds * 1000)) / 1000


def report(rows: list[Scenario], late: float | None) -> str:
    out = ["# Fan-out against a $0.50 key (bench/fanout.py)", "",
           "| scenario | outcome | key spent | limit | reserved after | time |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for s in rows:
        st = s.state
        out.append(
            f"| {s.name} | {s.outcome.row()} | ${nano_to_usd(st['spent'])} | ${nano_to_usd(st['limit'])} "
            f"| ${nano_to_usd(st['reserved'])} | {s.seconds:.2f} s |"
        )
    if late is not None:
        out += ["", f"Run wall-clock deadline: the stream ended {late * 1000:.0f} ms after it (client side)."]
    return "\n".join(out) + "\n"


async def main_async(args: argparse.Namespace) -> str:
    rows: list[Scenario] = []
    for upstream in (False, True):
        stream = not upstream
        with Stack(policy=_write(demo_policy(upstream_stream=upstream))) as stack:
            rows.append(await fits(stack, stream=stream, calls=args.calls))
            rows.append(await overflows(stack, stream=stream, calls=args.calls, tokens=args.tokens))
    with Stack(policy=_write(demo_policy(run_seconds=2))) as stack:
        late = await deadline(stack, seconds=2)
    return report(rows, late)


def _write(text: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return f.name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--tokens", type=int, default=4000)
    args = p.parse_args()
    text = asyncio.run(main_async(args))
    (ROOT / "bench" / "results-fanout.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
