"""Issue 16: workflow budgets through real Envoy with the shipped demo policy: nested runs
held under their root, retry ceilings, tool-call budgets, the escalation gate, and the
spend of each level on every response; agent loops of the official SDKs."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from extproc.money import usd_to_nano
from tests.integration.conftest import ledger, shared_stack

pytestmark = pytest.mark.integration
DEMO = (Path(__file__).resolve().parents[2] / "policies" / "demo.yaml").read_text()
CAROL = "sk-demo-carol"  # team platform: only the key ($0.50) and org budgets besides her runs
TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
CLAUDE_TOOL = {"name": "search", "input_schema": {"type": "object", "properties": {}}}
STEP = [{"role": "user", "content": "next step"}]


def auth(**headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CAROL}", **headers}


async def chat(c: httpx.AsyncClient, run: str, *, model: str = "gpt-4o", tokens: int = 2000, **headers: str) -> httpx.Response:
    body = {"model": model, "messages": STEP, "max_tokens": tokens}
    return await c.post(
        "/v1/chat/completions", json=body, headers=auth(**{"x-run-id": run, "x-mock-output-tokens": str(tokens), **headers})
    )


@pytest.fixture(scope="module")
def demo_stack(request):
    """One stack on the demo policy (embedded store) for the tests that need no fresh books:
    each names its own runs and reads back only their ledger entries, and carol's $0.50 key
    covers them all (the nested loops' tree stops at its $0.25 run budget, the others spend
    under $0.01)."""
    with shared_stack(request, "workflow", DEMO) as s:
        yield s


def in_runs(*runs: str):
    return lambda e: e.meta.get("run") in runs


def charged_runs(entries) -> dict[str, int]:
    """Cost charged per run, from the ledger (what chargeback sees)."""
    out: dict[str, int] = {}
    for e in entries:
        run = e.meta.get("run")
        if run:
            out[run] = out.get(run, 0) + e.charged.get("cost", 0)
    return out


async def test_children_never_spend_past_their_parent_under_concurrency(make_stack):
    stack = make_stack(DEMO, store="redis")
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        first = await chat(c, "planner", tokens=100)  # the parent run exists once it made a call
        assert first.status_code == 200, first.text
        kids = ["search", "code", "review"]
        calls = [chat(c, kids[i % 3], **{"x-parent-run-id": "planner"}) for i in range(20)]  # $0.02 each
        answers = await asyncio.gather(*calls)
        ok = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code == 429]
        assert ok and refused and len(ok) + len(refused) == 20
        for r in refused:
            err = r.json()["error"]
            assert err["code"] == "insufficient_quota" and err["budget"]["scope"] == "run:carol/planner"
        # every response carries each level's spend, root first
        h = ok[0].headers
        assert h["x-budget-run-chain"].split(", ")[0] == "planner" and len(h["x-budget-run-spent-usd"].split(", ")) == 2
        budget = (await c.get("/v1/budget", headers=auth(**{"x-run-id": "search"}))).json()
    entries = await ledger(stack, expect=1 + len(ok))
    per_run = charged_runs(entries)
    children = sum(per_run.get(k, 0) for k in kids)
    assert {e.meta.get("parent_run") for e in entries if e.meta.get("run") in kids} == {"planner"}
    tree = children + per_run["planner"]
    assert usd_to_nano("0.25") - usd_to_nano("0.03") < tree <= usd_to_nano("0.25")  # spent what it could, never more
    assert budget["run_chain"] == ["planner", "search"]
    root = next(b for b in budget["budgets"] if b["scope"] == "run:carol/planner" and b["dimension"] == "cost")
    assert usd_to_nano(root["spent"]) == children + per_run["planner"]  # the parent's spent = its own + its children's


async def test_the_fourth_retry_in_a_run_is_refused(demo_stack):
    stack = demo_stack
    # the backend fails: the SDK retries twice per call (x-stainless-retry-count 1, 2), each retry counted
    client = openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1",
        api_key=CAROL,
        max_retries=2,
        timeout=30,
        # retry-after-ms: the SDK retries after 10 ms, not its 0.5 s / 1 s backoff
        default_headers={"x-run-id": "flaky", "x-mock-status": "500", "x-mock-output-tokens": "5", "x-mock-retry-after-ms": "10"},
    )
    with pytest.raises(openai.InternalServerError):  # attempts 0, 1, 2: two retries
        await client.chat.completions.create(model="gpt-4o-mini", messages=STEP, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as exc:  # retries 3 and then the 4th: refused, not retried
        await client.chat.completions.create(model="gpt-4o-mini", messages=STEP, max_tokens=5)
    await client.close()
    err = exc.value
    assert err.code == "retry_budget_exceeded" and err.response.headers["x-should-retry"] == "false"
    assert err.body["budget"]["dimension"] == "retries" and err.body["budget"]["spent"] == "3"
    attempts = await ledger(stack, expect=5, where=in_runs("flaky"))
    assert [e.charged.get("retries", 0) for e in attempts] == [0, 1, 1, 0, 1]
    assert all(e.charged.get("cost", 0) == 0 for e in attempts)  # nothing was served


async def test_tool_calls_budget_refuses_the_call_after_the_fifth(demo_stack):
    stack = demo_stack
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=CAROL, max_retries=0, default_headers={"x-run-id": "tools"})
    calls = 0
    for i in range(5):  # an agent loop: the model calls a tool, the client runs it and answers
        args = {"model": "gpt-4o-mini", "messages": STEP, "tools": [TOOL], "tool_choice": "required", "max_tokens": 5}
        if i % 2:
            stream = await client.chat.completions.create(**args, stream=True)
            calls += sum([len(c.delta.tool_calls or ()) async for chunk in stream for c in chunk.choices])
        else:
            r = await client.chat.completions.create(**args)
            calls += len(r.choices[0].message.tool_calls)
    assert calls == 5
    with pytest.raises(openai.RateLimitError) as exc:
        await client.chat.completions.create(model="gpt-4o-mini", messages=STEP, max_tokens=5)
    await client.close()
    assert exc.value.body["budget"]["dimension"] == "tool_calls" and exc.value.body["budget"]["spent"] == "5"
    entries = await ledger(stack, expect=5, where=in_runs("tools"))
    assert sum(e.charged.get("tool_calls", 0) for e in entries) == 5


async def test_escalation_past_the_threshold_is_downshifted(demo_stack):
    stack = demo_stack
    lowered = {"x-run-budget-usd": "0.01"}  # the run's limit: half of it is the escalation threshold
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        early = await chat(c, "esc", model="gpt-4o", tokens=100, **lowered)  # below the threshold: free
        assert early.headers["x-budget-selected-model"] == "gpt-4o"
        assert (await chat(c, "esc2", model="gpt-4o-mini", tokens=10000, **lowered)).status_code == 200  # past 50%
        late = await chat(c, "esc2", model="gpt-4o", tokens=100, **lowered)
    assert late.status_code == 200, late.text
    h = late.headers
    assert (h["x-budget-requested-model"], h["x-budget-selected-model"], h["x-budget-decision"]) == (
        "gpt-4o", "gpt-4o-mini", "downgrade"
    )  # fmt: skip
    assert late.json()["model"] == "gpt-4o-mini" and h["x-mock-backend"] == "backend_small"


async def test_nested_agent_loops_with_the_openai_and_anthropic_sdks(demo_stack):
    """A planner (openai) with three sub-agents: two anthropic loops that call tools and one openai
    loop stuck retrying a failing step; the tree stops when its budget is spent."""
    stack = demo_stack
    planner = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=CAROL, max_retries=0, default_headers={"x-run-id": "plan"})
    r = await planner.chat.completions.with_raw_response.create(model="gpt-4o", messages=STEP, max_tokens=50)
    assert r.headers["x-budget-run-chain"] == "plan"

    async def claude_loop(name: str) -> str:
        """An agent loop: the model calls a tool, the agent answers with its result, then works on."""
        client = anthropic.AsyncAnthropic(
            base_url=stack.url, api_key=CAROL, max_retries=0,
            default_headers={"baggage": f"budget.run={name},budget.parent_run=plan", "x-mock-output-tokens": "4000"},
        )  # fmt: skip
        args = {"model": "claude-sonnet-4-5", "max_tokens": 4000, "tools": [CLAUDE_TOOL]}
        try:
            msg = await client.messages.create(**args, messages=STEP, tool_choice={"type": "any"})
            (use,) = [b for b in msg.content if b.type == "tool_use"]
            result = {"type": "tool_result", "tool_use_id": use.id, "content": "3 results"}
            talk = [*STEP, {"role": "assistant", "content": msg.content}, {"role": "user", "content": [result]}]
            for _ in range(50):
                msg = await client.messages.create(**args, messages=talk)
                assert msg.stop_reason in ("end_turn", "max_tokens")
            return "ran out of steps"
        except anthropic.RateLimitError as e:
            return e.body["budget"]["scope"]
        finally:
            await client.close()

    async def retry_loop() -> str:
        client = openai.AsyncOpenAI(
            base_url=f"{stack.url}/v1", api_key=CAROL, max_retries=2,
            default_headers={"x-run-id": "stuck", "x-parent-run-id": "plan", "x-mock-status": "503", "x-mock-retry-after-ms": "10"},
        )  # fmt: skip
        try:
            for _ in range(5):
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=STEP, max_tokens=5)
                except openai.InternalServerError:
                    continue
            return "kept retrying"
        except openai.RateLimitError as e:
            return e.code or ""
        finally:
            await client.close()

    ends = await asyncio.gather(claude_loop("research"), claude_loop("writer"), retry_loop())
    assert ends[2] == "retry_budget_exceeded"
    assert ends[0] == ends[1] == "run:carol/plan"  # the tree's budget, the root's, stopped both sub-agents
    await planner.close()
    entries = await ledger(stack, expect=3, where=in_runs("plan", "research", "writer", "stuck"))  # the tree's
    assert sum(e.charged.get("tool_calls", 0) for e in entries if e.meta.get("run") in ("research", "writer")) == 2
    per_run = charged_runs(entries)
    assert sum(per_run.values()) <= usd_to_nano("0.25")
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c:
        doc = (await c.get("/v1/budget", headers=auth(**{"x-run-id": "plan"}))).json()
    root = next(b for b in doc["budgets"] if b["scope"] == "run:carol/plan" and b["dimension"] == "cost")
    assert usd_to_nano(root["spent"]) == sum(per_run.values())
    assert Decimal(root["remaining"]) < Decimal("0.25") * Decimal("0.5")
