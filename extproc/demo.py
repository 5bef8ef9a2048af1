"""`extproc demo`: start the local stack and narrate a short budget scenario.

Served calls with their budget headers, a streamed call settled on its real
usage, an agent's fan-out that the budget refuses with readable 429s, and the
final spend beside each cap. Exits 0 when every step behaved as described.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import yaml

from .engine.budget import Engine, Identity
from .money import nano_to_usd
from .policy.loader import load_policy
from .stack import Stack

KEYS = {"alice": "sk-demo-alice", "bob": "sk-demo-bob", "carol": "sk-demo-carol"}


def say(text: str = "") -> None:
    print(text, flush=True)


def _budget_headers(r: httpx.Response) -> str:
    keep = ("x-budget-decision", "x-budget-scope", "x-budget-limit-usd", "x-budget-spent-usd", "x-budget-remaining-usd",
            "x-budget-reserved-usd", "x-budget-cost-usd")
    return "\n".join(f"      {k}: {r.headers[k]}" for k in keep if k in r.headers)


async def scenario(stack: Stack, policy_path: str) -> bool:
    ok = True
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as c:
        say("1. alice asks gpt-4o-mini a question (max_tokens 200).")
        r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['alice']}"},
                         json={"model": "gpt-4o-mini", "max_tokens": 200, "messages": [{"role": "user", "content": "What is a budget?"}]})
        say(f"   -> HTTP {r.status_code}; usage {r.json().get('usage')}")
        say(_budget_headers(r))
        ok &= r.status_code == 200

        say("\n2. alice streams an answer from gpt-4o; the gateway settles on the stream's real usage.")
        async with c.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['alice']}"},
                            json={"model": "gpt-4o", "max_tokens": 300, "stream": True,
                                  "messages": [{"role": "user", "content": "Stream me something."}]}) as s:
            chunks, comment = 0, ""
            async for line in s.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                elif line.startswith(": x-budget-cost-usd="):
                    comment = line
            say(f"   -> HTTP {s.status_code}; {chunks} chunks streamed; settled cost arrives as an SSE comment: {comment!r}")
            ok &= s.status_code == 200 and bool(comment)

        say("\n3. bob's agent fans out 20 parallel gpt-4o calls, each allowed up to 16000 output tokens.")
        say("   Each reserves its worst case ($0.16+) before it runs; bob's key budget is $0.50.")
        async def one() -> httpx.Response:
            return await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['bob']}", "x-mock-delay-ms": "10"},
                                json={"model": "gpt-4o", "max_tokens": 16000, "messages": [{"role": "user", "content": "plan step"}]})
        results = await asyncio.gather(*(one() for _ in range(20)))
        served = sum(r.status_code == 200 for r in results)
        refused = [r for r in results if r.status_code == 429]
        downshifted = sum(r.headers.get("x-budget-selected-model") == "gpt-4o-mini" for r in results if r.status_code == 200)
        say(f"   -> {served} served ({downshifted} of them downshifted to gpt-4o-mini once gpt-4o no longer fit),")
        say(f"      {len(refused)} refused with 429 before reaching any model.")
        if refused:
            err = refused[0].json()["error"]
            say(f"   refusal body: code={err['code']!r}, x-should-retry={refused[0].headers.get('x-should-retry')}")
            say(f"   message: {err['message']}")
            say(f"   budget: {json.dumps(err['budget'])}")
        ok &= served >= 1 and len(refused) >= 1 and served + len(refused) == 20
        hits = sum([int((await c.get(f"{stack.backend_url(b)}/stats")).json()["hits"]) for b in stack.backend_ports])
        say(f"   the backends saw {hits} calls in all (1 + 1 + {served}): refused calls cost nothing and reached nothing.")
        ok &= hits == 2 + served

        ok &= await streamed_fan_out(c)

        say("\n4. carol calls llama-3.1-8b on the self-hosted GPU backend; its price comes from the GPU's cost rate.")
        rate = None
        for _ in range(40):  # the first DCGM sample arrives within a couple of seconds
            r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['carol']}", "x-mock-delay-ms": "20"},
                             json={"model": "llama-3.1-8b", "max_tokens": 64, "messages": [{"role": "user", "content": "hello GPU"}]})
            ok &= r.status_code == 200
            rate = r.headers.get("x-backend-cost-rate-usd-per-hour")
            if rate:
                break
            await asyncio.sleep(0.25)
        say(f"   -> HTTP {r.status_code}; x-backend-cost-rate-usd-per-hour: {rate} "
            f"({r.headers.get('x-backend-cost-rate-source')}); cost {r.headers.get('x-budget-cost-usd')}")
        ok &= rate is not None

        ok &= await nested_runs(c)

    say("\n6. Final spend beside each cap (read from the budget store):")
    await asyncio.sleep(0.3)  # the streamed call settles as its stream closes
    ok &= await print_budgets(stack, policy_path)
    say("\n7. Backend cost rates (published to the store by the service):")
    ok &= await print_rates(stack, policy_path)
    return ok


async def streamed_fan_out(c: httpx.AsyncClient) -> bool:
    """The same fan-out streamed: reservations right-sized from what bob's calls really produce."""
    say("\n3b. bob's agent streams instead (no max_tokens): 3 calls, then the same 20 in parallel.")
    say("   A stream reserves its input plus what bob's recent calls really produced, and the reservation")
    say("   grows with the stream before each chunk is released (cut cleanly if it cannot).")
    bob = {"authorization": f"Bearer {KEYS['bob']}", "x-mock-delay-ms": "0"}
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "plan step"}]}

    async def one() -> tuple[int, str, bool]:
        async with c.stream("POST", "/v1/chat/completions", headers=bob, json=body) as s:
            text = (await s.aread()).decode()
            return s.status_code, s.headers.get("x-budget-reserved-usd", ""), '"finish_reason":"stop"' in text.replace(" ", "")

    for _ in range(3):
        await one()
    results = await asyncio.gather(*(one() for _ in range(20)))
    served = sum(status == 200 and whole for status, _, whole in results)
    say(f"   -> {served} of 20 served whole; each reserved ${results[-1][1]} instead of the $0.16+ worst case.")
    return served == 20


async def nested_runs(c: httpx.AsyncClient) -> bool:
    """A planner run with three sub-agents, one stuck retrying, until the tree's budget is spent."""
    say("\n5. carol's planner (run 'plan') starts three sub-agents that name it as their parent")
    say("   (x-parent-run-id: plan); every child call also reserves on the planner's run ($0.25 for the tree).")
    carol = {"authorization": f"Bearer {KEYS['carol']}"}
    step = {"messages": [{"role": "user", "content": "next step"}]}
    r = await c.post("/v1/chat/completions", headers={**carol, "x-run-id": "plan"}, json={"model": "gpt-4o-mini", "max_tokens": 50, **step})
    ok = r.status_code == 200

    async def sub_agent(name: str) -> tuple[int, httpx.Response]:
        headers = {**carol, "x-run-id": name, "x-parent-run-id": "plan", "x-mock-output-tokens": "2000", "x-mock-delay-ms": "0"}
        for served in range(50):  # about $0.02 a step
            r = await c.post("/v1/chat/completions", headers=headers, json={"model": "gpt-4o", "max_tokens": 2000, **step})
            if r.status_code != 200:
                return served, r
        return 50, r

    async def retry_loop() -> tuple[int, httpx.Response]:
        headers = {**carol, "x-run-id": "flaky", "x-parent-run-id": "plan", "x-mock-status": "503"}
        for retry in range(1, 10):  # what an SDK sends while the backend keeps failing
            r = await c.post("/v1/chat/completions", headers={**headers, "x-stainless-retry-count": str(retry)},
                             json={"model": "gpt-4o-mini", "max_tokens": 5, **step})
            if r.status_code == 429:
                return retry, r
        return 0, r

    (a, ra), (b, rb), (retried, rr) = await asyncio.gather(sub_agent("research"), sub_agent("writer"), retry_loop())
    for name, n, resp in (("research", a, ra), ("writer", b, rb)):
        scope = resp.json()["error"]["budget"]["scope"] if resp.status_code == 429 else "-"
        say(f"   -> sub-agent {name}: {n} steps served, then HTTP {resp.status_code} from {scope}")
        ok &= resp.status_code == 429 and scope == "run:carol/plan"
    code = rr.json()["error"]["code"] if rr.status_code == 429 else "-"
    say(f"   -> sub-agent flaky (backend failing, retrying): retry {retried} refused with {code!r}, "
        f"x-should-retry={rr.headers.get('x-should-retry')}")
    ok &= code == "retry_budget_exceeded"
    doc = (await c.get("/v1/budget", headers={**carol, "x-run-id": "research"})).json()
    root = next(row for row in doc["budgets"] if row["scope"] == "run:carol/plan" and row["dimension"] == "cost")
    say(f"   GET /v1/budget for research shows its chain {doc['run_chain']}; the planner's run spent "
        f"{root['spent']} of {root['limit']} (its own call and all its sub-agents').")
    return ok and doc["run_chain"] == ["plan", "research"]


async def print_rates(stack: Stack, policy_path: str) -> bool:
    from .costrate import open_rate_publisher
    from .costrate.__main__ import describe

    policy = load_policy(policy_path)
    rates = open_rate_publisher(stack.store or "")
    try:
        found = True
        for backend in policy.self_hosted.backends:
            rate = await rates.read(backend)
            say("   " + describe(rate, backend).rstrip())
            found &= rate is not None
        return found
    finally:
        await rates.close()


async def print_budgets(stack: Stack, policy_path: str) -> bool:
    from .app import open_store

    policy = load_policy(policy_path)
    store = open_store(stack.store or "")
    engine = Engine(store)
    rows: dict[str, tuple[str, int, int, int]] = {}
    try:
        for key in policy.keys:
            who = Identity.from_key(key)
            limits = engine.limits_for(policy, who, None, {}, engine.clock())
            states = await store.snapshot([l.line for l in limits], tag=who.tag, now_ms=engine.clock())
            for lim, st in zip(limits, states, strict=True):
                rows[lim.budget + " " + lim.spec.window] = (lim.spec.dimension, st.limit, st.spent, st.reserved)
    finally:
        await store.close()
    say(f"   {'budget':28} {'limit':>10} {'spent':>12} {'reserved':>10} {'remaining':>12}")
    fine = True
    for name, (dim, limit, spent, reserved) in sorted(rows.items()):
        f = nano_to_usd if dim == "cost" else str
        say(f"   {name:28} {f(limit):>10} {f(spent):>12} {f(reserved):>10} {f(limit - spent - reserved):>12}")
        fine &= spent + reserved <= limit
    return fine


def _point_metrics_at(policy_path: str, stack: Stack) -> str:
    """A copy of the policy whose self-hosted backends read the stack's mock GPU metrics."""
    assert stack.workdir is not None
    doc = yaml.safe_load(Path(policy_path).read_text())
    for name, backend in (doc.get("self_hosted") or {}).get("backends", {}).items():
        if name in stack.backend_ports:
            backend["metrics_url"] = f"{stack.backend_url(name)}/metrics"
    out = stack.workdir / "policy.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(out)


def run_demo(policy_path: str) -> int:
    say("Starting the local stack: mock GPU backends, extproc service, Envoy (real binary)...")
    stack = Stack(policy=str(Path(policy_path).resolve()), token_delay_ms=2)
    try:
        stack.start_backends()
        stack.policy = _point_metrics_at(policy_path, stack)
        stack.start_service()
        stack.start_envoy()
        say(f"ready {stack.url}  (logs in {stack.workdir})\n")
        ok = asyncio.run(scenario(stack, stack.policy))
    finally:
        stack.stop()
    say("\nDemo " + ("finished: every budget held." if ok else "FAILED: see above."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else "policies/demo.yaml"))
