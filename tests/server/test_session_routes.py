"""Closed world, driven on the session directly: every path is metered, listed or refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from extproc.engine.budget import Engine
from extproc.policy.loader import PolicyHolder, parse_policy
from extproc.server.services import Services
from extproc.server.session import Session
from extproc.stores.embedded import EmbeddedStore

KEY = "sk-routes"
POLICY = f"""
version: 1
prices:
  models:
    gpt-4o: {{ input: "2.50", output: "10.00", output_limit: 1000 }}
keys:
  - {{ sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, principal: p, team: t }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "0.01" }}]
routes:
  - {{ path: /v1/rerank, action: flat, price: "0.004" }}
deployments: {{ prod-4o: gpt-4o }}
"""
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
async def services(tmp_path):
    store = EmbeddedStore(tmp_path / "b.db")
    yield Services(PolicyHolder(parse_policy(POLICY)), Engine(store))
    await store.close()


def headers(path: str, method: str = "POST", **extra: str) -> dict[str, str]:
    return {":path": path, ":method": method, **extra}


def error(reply) -> tuple[int, dict]:
    assert reply.immediate is not None
    return reply.immediate.status, json.loads(reply.immediate.body)


@pytest.mark.parametrize(
    ("path", "method", "status", "code"),
    [
        ("/nope", "POST", 404, "unknown_route"),
        ("/v1/chat/completions", "GET", 405, "method_not_allowed"),
        ("/v1/chat%2Fcompletions", "POST", 400, "invalid_path"),
        ("/invocations", "POST", 403, "route_denied"),
        ("/v1/audio/speech", "POST", 403, "route_denied"),
    ],
)
async def test_what_is_not_a_listed_route_is_refused_in_the_envelope(services, path, method, status, code):
    for extra in ({}, AUTH):  # with or without a key
        got, body = error(await Session(services).request_headers(headers(path, method, **extra), False))
        assert (got, body["error"]["code"]) == (status, code)
        assert body["error"]["message"]


async def test_anthropic_paths_get_the_anthropic_envelope(services):
    got, body = error(await Session(services).request_headers(headers("/v1/messages/nope"), False))
    assert got == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"


async def test_unmetered_routes_still_need_identity_and_public_ones_do_not(services):
    got, _ = error(await Session(services).request_headers(headers("/v1/models", "GET"), True))
    assert got == 401
    r = await Session(services).request_headers(headers("/v1/models", "GET", **AUTH), True)
    assert r.immediate is None and r.skip_rest
    r = await Session(services).request_headers(headers("/health", "GET"), True)
    assert r.immediate is None and r.skip_rest and ("x-extproc-route", "public") in r.set_headers


async def test_the_backend_is_sent_the_path_that_was_matched(services):
    r = await Session(services).request_headers(headers("/V1//chat/completion%73/?x=1", **AUTH), False)
    assert r.immediate is None
    assert (":path", "/v1/chat/completions?x=1") in r.set_headers and r.clear_route_cache
    assert ("x-extproc-route", "meter") in r.set_headers, "Envoy routes only what the service classified"
    r = await Session(services).request_headers(headers("/v1/chat/completions", **AUTH), False)
    assert not any(k == ":path" for k, _ in r.set_headers)
    assert ("x-extproc-route", "meter") in r.set_headers


async def test_a_flat_route_reserves_on_headers_and_settles_on_a_2xx(services):
    s = Session(services)
    r = await s.request_headers(headers("/v1/rerank", **AUTH), False)
    assert r.immediate is None and r.headers_only
    r = await s.response_headers({":status": "200"})
    assert ("x-budget-cost-usd", "0.004") in r.set_headers
    s2 = Session(services)
    await s2.request_headers(headers("/v1/rerank", **AUTH), False)
    await s2.response_headers({":status": "503"})
    entries = await services.engine.ledger()
    assert [(e.outcome.value, e.charged.get("cost", 0)) for e in entries] == [("settled", 4_000_000), ("released", 0)]
    # $0.006 is left: one more $0.004 hold fits, a second does not
    outcomes = []
    for _ in range(2):
        s = Session(services)
        r = await s.request_headers(headers("/v1/rerank", **AUTH), False)
        outcomes.append(r.immediate.status if r.immediate else 200)
    assert outcomes == [200, 429]


async def test_an_azure_deployment_path_names_the_model(services):
    s = Session(services)
    r = await s.request_headers(headers("/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21", **AUTH), False)
    assert r.immediate is None
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}).encode()
    r = await s.request_body(body)
    assert r.immediate is None and s.plan is not None and s.plan.chosen.name == "gpt-4o"
    s = Session(services)
    await s.request_headers(headers("/openai/deployments/unknown/chat/completions", **AUTH), False)
    got, err = error(await s.request_body(body))
    assert got == 400 and err["error"]["code"] == "model_not_priced"


async def test_a_client_request_id_never_names_the_reservation(services):
    ids = set()
    for _ in range(3):
        s = Session(services)
        await s.request_headers(headers("/v1/chat/completions", **AUTH, **{"x-request-id": "same"}), False)
        r = await s.request_body(json.dumps({"model": "gpt-4o", "max_tokens": 10, "messages": []}).encode())
        assert r.immediate is None
        ids.add(s.plan.decision.hold.reservation_id)
        await s.response_headers({":status": "200", "content-type": "application/json"})
        await s.response_body(b'{"usage": {"prompt_tokens": 10, "completion_tokens": 5}}', True)
        await s.close()
    assert len(ids) == 3
    entries = await services.engine.ledger()
    assert len(entries) == 3 and {e.meta["request_id"] for e in entries} == {"same"}
