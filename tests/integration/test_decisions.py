"""Issue 5: decisions an agent can read, through real Envoy."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from extproc.money import Price, nano_to_usd
from tests.integration.conftest import ledger, sha, shared_stack

pytestmark = pytest.mark.integration

ALICE, BOB = "sk-agent-alice", "sk-agent-bob"
MINI = Price.per_million("0.15", "0.60")


def policy(*, run_limit: str = "0.01", key_limit: str = "1.00", downshift: bool = True, clamp: bool = False, steps: int = 200) -> str:
    return f"""
version: 1
prices:
  version: agents-7
  models:
    gpt-4o: {{ input: "2.50", output: "10.00", output_limit: 4096, capabilities: {{ vision: true }}, downshift_to: [gpt-4o-mini] }}
    gpt-4o-mini: {{ input: "0.15", output: "0.60", output_limit: 4096, capabilities: {{ vision: true }} }}
keys:
  - {{ sha256: {sha(ALICE)}, principal: alice, team: research, org: acme }}
  - {{ sha256: {sha(BOB)}, principal: bob, team: research, org: acme }}
principals:
  - {{ name: bob, team: research, org: acme }}
identity:
  edge_strips_headers: true
routes:  # the orchestrator's dispatch endpoint, gated by ext_authz (identity + budget room)
  - {{ path: /dispatch, action: unmetered }}
decisions:
  downshift: {str(downshift).lower()}
  output_clamp: {str(clamp).lower()}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "{key_limit}" }}]
runs:
  headers: [x-run-id]
  limits:
    - {{ dimension: cost, limit: "{run_limit}", soft_threshold: "0.8" }}
    - {{ dimension: requests, limit: {steps} }}
"""


@pytest.fixture(scope="module")
def default_stack(request):
    """One stack on policy() for the agent loop (alice's run task-42) and the forged identity
    test (one call of alice's outside any run, and bob's untouched budgets): each reads back
    only its own ledger entries."""
    with shared_stack(request, "decisions", policy()) as s:
        yield s


async def test_agent_loop_is_downshifted_past_soft_threshold_then_refused_with_alternatives(default_stack):
    stack = default_stack
    run = {"x-run-id": "task-42", "x-mock-output-tokens": "300"}
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=ALICE, max_retries=2, default_headers=run)
    served: list[tuple[str, str, httpx.Headers]] = []
    refusal = None
    for _ in range(60):
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "next step"}], max_tokens=300
            )
        except openai.RateLimitError as e:
            refusal = e
            break
        r = raw.parse()
        served.append((r.model, raw.headers["x-mock-backend"], raw.headers))
    await client.close()

    big = [s for s in served if s[2]["x-budget-selected-model"] == "gpt-4o"]
    small = [s for s in served if s[2]["x-budget-selected-model"] == "gpt-4o-mini"]
    assert big and small, "first the requested model, then the cheaper one"
    assert served.index(big[-1]) < served.index(small[0]), "downshift happens once the run nears its cap"
    for model, backend, h in big:
        assert (model, backend, h["x-budget-decision"]) == ("gpt-4o", "backend", "allow")
    for model, backend, h in small:
        # the cheaper backend (not the original) served the call: the route followed the rewritten model
        assert (model, backend, h["x-budget-decision"]) == ("gpt-4o-mini", "backend_small", "downgrade")
        assert h["x-budget-requested-model"] == "gpt-4o"
        assert h["x-budget-scope"] == "run:alice/task-42"
    # gpt-4o's worst case here is >= 300 output tokens x $10/1M = $0.003; the soft threshold is 80% of $0.01
    first_small, last_big = small[0][2], big[-1][2]
    assert Decimal(last_big["x-budget-spent-usd"]) + Decimal("0.003") <= Decimal("0.008")
    assert Decimal(first_small["x-budget-spent-usd"]) + Decimal("0.003") > Decimal("0.008")

    assert refusal is not None, "the run's budget eventually refuses"
    body = refusal.body
    assert refusal.code == "insufficient_quota" and refusal.response.headers["x-should-retry"] == "false"
    budget = body["budget"]
    assert budget["scope"] == "run:alice/task-42"
    (alt,) = budget["alternatives"]
    assert alt["model"] == "gpt-4o-mini" and alt["capable"] is True
    remaining = Decimal(budget["remaining"]) * 10**9
    mini_estimate = Decimal(alt["estimate_usd"]) * 10**9
    assert alt["fits"] is (mini_estimate <= remaining) is False

    # the budget endpoint, answered by the service itself, shows the same numbers as the ledger and headers
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c:
        hits_before = sum([(await c.get(f"{stack.backend_url(n)}/stats")).json()["hits"] for n in ("backend", "backend_small")])
        doc = (await c.get("/v1/budget", headers={"authorization": f"Bearer {ALICE}", "x-run-id": "task-42"})).json()
        hits_after = sum([(await c.get(f"{stack.backend_url(n)}/stats")).json()["hits"] for n in ("backend", "backend_small")])
        assert hits_after == hits_before, "the budget endpoint never reaches a backend"
        decision = (await c.get(f"/v1/budget/decisions/{first_small['x-budget-decision-id']}", headers={"authorization": f"Bearer {ALICE}"})).json()
    run_row = next(b for b in doc["budgets"] if b["scope"] == "run:alice/task-42" and b["dimension"] == "cost")
    entries = await ledger(stack, expect=len(served), where=lambda e: e.meta.get("run") == "task-42")
    spent = sum(e.charged.get("cost", 0) for e in entries if e.meta.get("run") == "task-42")
    assert run_row["spent"] == nano_to_usd(spent) == budget["spent"]
    assert run_row["limit"] == refusal.response.headers["x-budget-limit-usd"] == "0.01"
    assert Decimal(run_row["remaining"]) == Decimal(budget["remaining"])
    steps = next(b for b in doc["budgets"] if b["dimension"] == "requests")
    assert steps["spent"] == str(len(served))
    assert decision["selected_model"] == "gpt-4o-mini" and decision["requested_model"] == "gpt-4o"
    assert decision["decision"] == "downgrade" and decision["price_table_version"] == "agents-7"


async def test_refusal_offers_a_cheaper_model_that_fits(make_stack):
    stack = make_stack(policy(run_limit="0.002", downshift=False))
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c:
        r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {ALICE}", "x-run-id": "r1"},
                         json={"model": "gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429
    (alt,) = r.json()["error"]["budget"]["alternatives"]
    assert alt["model"] == "gpt-4o-mini" and alt["fits"] is True
    # worst case of the cheaper model: a few input tokens + 1000 output tokens at its prices
    assert MINI.cost(1, 1000) <= Decimal(alt["estimate_usd"]) * 10**9 <= MINI.cost(50, 1000)
    assert "gpt-4o-mini" in r.json()["error"]["message"]


async def test_output_clamp_lowers_max_tokens_to_what_fits(make_stack):
    stack = make_stack(policy(run_limit="0.002", downshift=False, clamp=True))
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c:
        r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {ALICE}", "x-run-id": "r1", "x-mock-output-tokens": "4000"},
                         json={"model": "gpt-4o", "max_tokens": 4000, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-budget-output-clamped"] == "true" and r.headers["x-budget-decision"] == "downgrade"
    out = r.json()["usage"]["completion_tokens"]
    assert 64 <= out < 200, "the backend saw the lowered max_tokens"
    assert Decimal(r.headers["x-budget-reserved-usd"]) <= Decimal("0.002")


async def test_forged_identity_header_does_not_draw_on_that_identity(default_stack):
    stack = default_stack
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c:
        body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        # a client without a key claims to be bob: Envoy strips the header, so the service sees no identity
        r = await c.post("/v1/chat/completions", json=body, headers={"x-extproc-principal": "bob"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # alice claims to be bob: she is charged, bob is not
        r = await c.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {ALICE}", "x-extproc-principal": "bob"})
        assert r.status_code == 200 and r.headers["x-budget-scope"] == "key:alice"
        rid = r.headers["x-budget-reservation-id"]
        bob = (await c.get("/v1/budget", headers={"authorization": f"Bearer {BOB}"})).json()
    assert all(b["spent"] == "0" for b in bob["budgets"])
    (entry,) = await ledger(stack, where=lambda e: e.reservation_id == rid)
    assert entry.meta["principal"] == "alice"


async def test_policy_edit_takes_effect_without_restart_and_a_bad_edit_is_rejected(make_stack):
    stack = make_stack(policy(key_limit="0.00001"))
    path = Path(stack.policy)
    body = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    hdrs = {"authorization": f"Bearer {ALICE}"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c:
        assert (await c.post("/v1/chat/completions", json=body, headers=hdrs)).status_code == 429
        path.write_text(policy(key_limit="1.00"))
        for _ in range(50):
            r = await c.post("/v1/chat/completions", json=body, headers=hdrs)
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200, "the raised limit took effect without a restart"
        path.write_text("version: 1\nprices: {models: {}}\nbudgets: [{scope: nowhere}]\n")
        deadline = time.monotonic() + 10
        while "policy reload rejected" not in stack.log("extproc") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log = stack.log("extproc")
        assert "policy reload rejected" in log and "budgets[0].scope" in log
        # structured logs: one JSON object per line
        (rejected,) = [json.loads(l) for l in log.splitlines() if "policy reload rejected" in l]
        assert rejected["level"] == "error" and rejected["logger"] == "extproc.policy" and rejected["ts"].endswith("Z")
        r = await c.post("/v1/chat/completions", json=body, headers=hdrs)
        assert r.status_code == 200, "traffic keeps flowing on the last good policy"


async def test_ext_authz_gate_refuses_a_spent_run_with_the_same_envelope(make_stack, worker_backend, tmp_path):
    # One service for both filters: use up the run's 3 steps through ext_proc, then gate dispatch with ext_authz.
    stack = make_stack(policy(steps=3))
    from extproc.stack import Stack

    gate = Stack(policy=stack.policy, store=stack.store, grpc=stack.grpc, envoy_config=str(Path(__file__).parents[2] / "envoy" / "ext_authz.yaml"),
                 backends=(), backend_ports={"backend": worker_backend.backend_ports["backend"]},  # the worker's mock
                 workdir=tmp_path / "gate", caller_token=stack.caller_token)  # the service's token
    gate.start_envoy()
    try:
        hdrs = {"authorization": f"Bearer {ALICE}", "x-run-id": "job-1", "x-mock-output-tokens": "150"}
        async with httpx.AsyncClient(timeout=10) as c:
            ok = await c.post(f"{gate.url}/dispatch", headers=hdrs, json={"task": "first"})
            assert ok.status_code == 200, ok.text
            for _ in range(3):  # the run's steps, through the metered inference path
                r = await c.post(f"{stack.url}/v1/chat/completions", headers=hdrs,
                                 json={"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "work"}]})
                assert r.status_code == 200
            await ledger(stack, expect=3)
            denied = await c.post(f"{gate.url}/dispatch", headers=hdrs, json={"task": "next"})
            other_run = await c.post(f"{gate.url}/dispatch", headers={**hdrs, "x-run-id": "job-2"}, json={"task": "x"})
    finally:
        gate.stop()
    assert denied.status_code == 429
    err = denied.json()["error"]
    assert err["code"] == "insufficient_quota" and err["budget"]["scope"] == "run:alice/job-1"
    assert err["budget"]["dimension"] == "requests" and err["budget"]["spent"] == "3"
    assert denied.headers["x-should-retry"] == "false"
    assert other_run.status_code == 200
