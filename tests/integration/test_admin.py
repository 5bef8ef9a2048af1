"""Issue 7: the admin API (token-protected) and the budgets / ledger commands."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.money import usd_to_nano
from tests.integration.conftest import ledger, sha, shared_stack

pytestmark = pytest.mark.integration

KEY = "sk-admin-alice"
POLICY = f"""
version: 1
prices:
  models:
    gpt-4o-mini: {{ input: "0.15", output: "0.60", output_limit: 4096 }}
keys:
  - {{ sha256: {sha(KEY)}, principal: alice, team: t, org: o }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "0.00005" }}]
"""

BODY = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def admin_stack(request):
    """One stack on POLICY for the token check (it only reads) and the top-up flow."""
    with shared_stack(request, "admin", POLICY) as s:
        yield s


async def test_admin_api_requires_its_token(admin_stack):
    stack = admin_stack
    async with httpx.AsyncClient(base_url=stack.admin_url, timeout=10) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/admin/budgets", params={"principal": "alice"})).status_code == 401
        wrong = await c.get("/admin/budgets", params={"principal": "alice"}, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await c.get("/admin/budgets", params={"principal": "alice"}, headers={"authorization": f"Bearer {stack.admin_token}"})
        assert ok.status_code == 200 and ok.json()["principal"] == "alice"


async def test_top_up_close_run_and_export_through_the_admin_api(admin_stack):
    stack = admin_stack
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    user = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c, httpx.AsyncClient(base_url=stack.admin_url, headers=admin, timeout=10) as a:
        assert (await c.post("/v1/chat/completions", json=BODY, headers=user)).status_code == 429
        r = await a.post("/admin/budgets/adjust", json={"principal": "alice", "scope": "key", "dimension": "cost", "credit": "0.01"})
        assert r.status_code == 200 and r.json()["adjusted"][0]["limit"] == "0.01005"
        assert (await c.post("/v1/chat/completions", json=BODY, headers=user)).status_code == 200
        assert (await c.post("/v1/chat/completions", json=BODY, headers={**user, "x-run-id": "job"})).status_code == 200
        r = await a.post("/admin/runs/close", json={"principal": "alice", "run": "job"})
        assert r.status_code == 200 and r.json()["state"] == "closed"
        refused = await c.post("/v1/chat/completions", json=BODY, headers={**user, "x-run-id": "job"})
        assert refused.status_code == 429
        await ledger(stack, expect=2)
        jsonl = (await a.get("/admin/ledger", params={"format": "jsonl"})).text
        rows = [json.loads(l) for l in jsonl.splitlines()]
        assert len(rows) == 2 and {r["principal"] for r in rows} == {"alice"}
        assert all(r["outcome"] == "settled" and float(r["charged_usd"]) > 0 for r in rows)
        samples = [s for f in text_string_to_metric_families((await a.get("/metrics")).text) for s in f.samples]
        decisions = {(s.labels["outcome"], s.labels["scope"]): s.value for s in samples if s.name == "extproc_decisions_total"}
        # the first call (the key's budget) and the last (the closed run) were refused
        assert decisions.get(("allow", ""), 0) >= 2 and decisions.get(("block", "key"), 0) >= 1, decisions
        assert decisions.get(("block", "run"), 0) >= 1, decisions
        count = {s.name: s.value for s in samples if s.name.endswith("_seconds_count")}
        # every call that reached a reservation was timed: the two allowed ones and the first, refused
        assert count["extproc_reserve_seconds_count"] >= 3 and count["extproc_settle_seconds_count"] >= 2, count


def extproc(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "extproc", "--log-level", "WARNING", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


async def test_cli_budgets_and_ledger_export_work_on_the_store(make_stack, tmp_path):
    stack = make_stack(POLICY.replace('"0.00005"', '"1.00"'))
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c:
        for _ in range(3):
            assert (await c.post("/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"})).status_code == 200
    await ledger(stack, expect=3)
    out = tmp_path / "ledger.csv"
    extproc("ledger", "export", "--store", stack.store, "--format", "csv", "--out", str(out), "--since", "2020-01-01")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 3 and all(r["model"] == "gpt-4o-mini" for r in rows)
    doc = json.loads(extproc("budgets", "list", "--policy", stack.policy, "--store", stack.store, "--principal", "alice"))
    key_row = next(b for b in doc["budgets"] if b["scope"] == "key:alice")
    total = sum(usd_to_nano(r["charged_usd"]) for r in rows)
    assert usd_to_nano(key_row["spent"]) == total
    credited = json.loads(extproc("budgets", "credit", "--policy", stack.policy, "--store", stack.store, "--principal", "alice", "--scope", "key", "2.00"))
    assert credited[0]["limit"] == "3"
