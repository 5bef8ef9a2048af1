"""Issue 7: hostile input through real Envoy. Every case gets a clear answer,
nothing reaches the backend unmetered, the service keeps serving, and the
ledger reconciles afterwards."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.integration.conftest import sha, shared_stack
from tests.integration.reconcile import reconcile

pytestmark = pytest.mark.integration

ALICE, BOB = "sk-abuse-alice", "sk-abuse-bob"
POLICY = f"""
version: 1
prices:
  models:
    gpt-4o-mini: {{ input: "0.15", output: "0.60", output_limit: 4096 }}
keys:
  - {{ sha256: {sha(ALICE)}, principal: alice, team: t, org: o }}
  - {{ sha256: {sha(BOB)}, principal: bob, team: t, org: o }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "1.00" }}]
runs:
  max_active_per_principal: 50
  limits:
    - {{ dimension: cost, limit: "0.001" }}
max_body_bytes: 1048576
"""


@pytest.fixture(scope="module")
def stack(request):
    with shared_stack(request, "abuse", POLICY) as s:
        yield s


def chat(**kw):
    return {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}], **kw}


async def _hits(c: httpx.AsyncClient, stack) -> int:
    """Requests that reached any backend (gpt-4o-mini is routed to backend_small)."""
    return sum([(await c.get(f"{stack.backend_url(name)}/stats")).json()["hits"] for name in stack.backend_ports])


BAD_BODIES = {
    "deeply_nested_json": (b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    "non_utf8": (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}', 400),
    "negative_max_tokens": (chat(max_tokens=-5), 400),
    "absurd_max_tokens": (chat(max_tokens=10**12), 400),
    "string_max_tokens": (chat(max_tokens="lots"), 400),
    "n_1000": (chat(n=1000), 400),
    "not_an_object": (b"[1, 2, 3]", 400),
    "body_over_policy_limit": (chat(messages=[{"role": "user", "content": "x" * 1_200_000}]), 413),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_hostile_bodies_get_clear_errors_and_never_reach_the_backend(stack, case):
    body, status = BAD_BODIES[case]
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        before = await _hits(c, stack)
        hdrs = {"authorization": f"Bearer {ALICE}", "content-type": "application/json"}
        r = await c.post("/v1/chat/completions", content=body if isinstance(body, bytes) else None,
                         json=None if isinstance(body, bytes) else body, headers=hdrs)
        assert r.status_code == status, r.text[:300]
        err = r.json()["error"]
        assert err["message"] and err["code"]
        assert await _hits(c, stack) == before
        assert (await c.post("/v1/chat/completions", json=chat(), headers=hdrs)).status_code == 200


async def test_huge_body_beyond_envoy_buffer_and_huge_headers_are_refused(stack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as c:
        before = await _hits(c, stack)
        big = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"y" * (20 << 20) + b'"}]}'
        try:
            r = await c.post("/v1/chat/completions", content=big, headers={"authorization": f"Bearer {ALICE}"})
            assert r.status_code == 413
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            pass  # Envoy answered 413 and closed the connection while the upload was still going
        try:
            r = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {ALICE}", "x-junk": "z" * 100_000})
            assert r.status_code == 431
        except (httpx.ReadError, httpx.RemoteProtocolError):
            pass  # Envoy's codec rejected the header block and closed the connection
        assert await _hits(c, stack) == before


async def test_forged_run_header_of_another_principal_does_not_touch_their_run(stack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        bob_run = {"authorization": f"Bearer {BOB}", "x-run-id": "shared-name"}
        r = await c.post("/v1/chat/completions", json=chat(max_tokens=1000), headers=bob_run)
        assert r.status_code == 200 and r.headers["x-budget-scope"] == "run:bob/shared-name"
        # alice uses the same run id: runs are namespaced under their principal
        r = await c.post("/v1/chat/completions", json=chat(max_tokens=1000), headers={**bob_run, "authorization": f"Bearer {ALICE}"})
        assert r.status_code == 200 and r.headers["x-budget-scope"] == "run:alice/shared-name"
        bob = (await c.get("/v1/budget", headers=bob_run)).json()
        alice = (await c.get("/v1/budget", headers={**bob_run, "authorization": f"Bearer {ALICE}"})).json()
    bob_run_row = next(b for b in bob["budgets"] if b["scope"] == "run:bob/shared-name")
    alice_run_row = next(b for b in alice["budgets"] if b["scope"] == "run:alice/shared-name")
    assert bob_run_row["spent"] == alice_run_row["spent"] != "0"


@pytest.mark.parametrize("run_id", ["x" * 500, "bad\tid", "bad\x01id"])
async def test_malformed_run_ids_are_refused(stack, run_id):
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as c:
        try:
            r = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {ALICE}", "x-run-id": run_id})
        except (httpx.LocalProtocolError, httpx.ReadError, httpx.RemoteProtocolError):
            return  # the client library or Envoy's codec refuses a control character outright
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-run-id"


async def test_thousands_of_distinct_run_ids_hit_the_active_run_cap(stack):
    """A client minting run ids cannot create unbounded state: the per-principal cap holds."""
    hdrs = {"authorization": f"Bearer {BOB}"}
    sem = asyncio.Semaphore(16)

    async def one(c: httpx.AsyncClient, i: int) -> httpx.Response:
        async with sem:
            return await c.post("/v1/chat/completions", json=chat(max_tokens=5), headers={**hdrs, "x-run-id": f"mint-{i}"})

    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as c:
        before = await _hits(c, stack)
        results = await asyncio.gather(*(one(c, i) for i in range(1200)))
        hits = await _hits(c, stack) - before
    served = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(served) + len(refused) == 1200
    assert len(served) <= 50 - 1, "bob already has one active run from an earlier test"
    assert hits == len(served)
    err = refused[0].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "active runs" in err["message"]
    assert refused[0].headers.get("retry-after")


async def test_ledger_reconciles_after_abuse(stack):
    await reconcile(stack)
