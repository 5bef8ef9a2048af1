"""The per-request session driven directly (no gRPC), over a real embedded store."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from extproc.engine.budget import Engine
from extproc.errors import StoreUnavailable
from extproc.policy.loader import PolicyHolder, parse_policy
from extproc.server.services import Services
from extproc.server.session import Session
from extproc.stores.embedded import EmbeddedStore

KEY = "sk-session"
POLICY = f"""
version: 1
prices:
  models:
    big: {{ input: "10.00", output: "10.00", output_limit: 1000, downshift_to: [small] }}
    small: {{ input: "0.10", output: "0.10", output_limit: 1000 }}
keys:
  - {{ sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, principal: p, team: t, org: o }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "0.01", soft_threshold: "0.5" }}]
"""
HEADERS = {":path": "/v1/chat/completions", ":method": "POST", "authorization": f"Bearer {KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def services(tmp_path):
    store = EmbeddedStore(tmp_path / "b.db")
    clock = Clock()
    s = Services(PolicyHolder(parse_policy(POLICY)), Engine(store, clock=clock))
    s.clock = clock  # type: ignore[attr-defined]
    yield s
    await store.close()


def body(model: str, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def call(services: Services, rid: str, model: str, max_tokens: int):
    """Request headers and body, each reply followed by `after_reply` as the servicer does once it sent it."""
    s = Session(services)
    r = await s.request_headers({**HEADERS, "x-request-id": rid}, False)
    s.after_reply()
    if r.immediate is not None:
        return s, r, "headers"
    r = await s.request_body(body(model, max_tokens))
    s.after_reply()
    return s, r, "body"


async def test_a_spent_budget_is_refused_on_headers_from_recent_state_until_it_ages_out(services):
    s, r, phase = await call(services, "a", "small", 1000)
    assert r.immediate is None and phase == "body"
    await s.response_headers({":status": "200", "content-type": "application/json"})
    await s.response_body(json.dumps({"usage": {"prompt_tokens": 100000, "completion_tokens": 0}}).encode(), True)
    await s.close()
    # the key's $0.01 is now spent (100k input tokens x $0.10/1M); the next refusal comes from the reservation
    _, r, phase = await call(services, "b", "small", 10)
    assert r.immediate is not None and r.immediate.status == 429 and phase == "body"
    # and the one after is refused on its headers, before its body is uploaded
    _, r, phase = await call(services, "c", "small", 10)
    assert r.immediate is not None and r.immediate.status == 429 and phase == "headers"
    assert json.loads(r.immediate.body)["error"]["code"] == "insufficient_quota"
    services.clock.now += 1001  # type: ignore[attr-defined]
    _, r, phase = await call(services, "d", "small", 10)
    assert phase == "body", "a stale recent state never refuses on its own"


async def test_a_call_that_crosses_the_soft_threshold_moves_to_the_cheaper_model(services):
    # big's worst case: 600 output tokens x $10/1M + input = $0.0061 > 50% of $0.01 -> moved to small
    s, r, _ = await call(services, "x", "big", 600)
    assert r.immediate is None
    assert s.plan is not None and s.plan.chosen.name == "small"
    assert json.loads(r.body)["model"] == "small"
    assert ("x-extproc-model", "small") in r.set_headers and r.clear_route_cache
    entries = await services.engine.ledger()
    # the first hold (on big) was released; its id is the session's, never the client's x-request-id
    assert [(e.reservation_id, e.outcome.value) for e in entries] == [(s.reservation_id, "released")]
    assert entries[0].meta["request_id"] == "x"


RUN_POLICY = POLICY + """
runs:
  limits:
    - { dimension: cost, limit: "0.005" }
"""


@pytest.fixture
async def run_services(tmp_path):
    store = EmbeddedStore(tmp_path / "runs.db")
    s = Services(PolicyHolder(parse_policy(RUN_POLICY)), Engine(store, clock=Clock()))
    yield s
    await store.close()


async def test_a_client_may_lower_its_run_budget_and_a_later_request_cannot_raise_it(run_services):
    lowered = {**HEADERS, "x-run-id": "r1", "x-run-budget-usd": "0.0001"}
    s = Session(run_services)
    assert (await s.request_headers({**lowered, "x-request-id": "1"}, False)).immediate is None
    r = await s.request_body(body("small", 2000))  # ~$0.0002 worst case > the lowered $0.0001
    assert r.immediate is not None and r.immediate.status == 429
    assert json.loads(r.immediate.body)["error"]["budget"]["limit"] == "0.0001"
    # the header is gone: the run keeps its lowered limit
    s = Session(run_services)
    assert (await s.request_headers({**HEADERS, "x-run-id": "r1", "x-request-id": "2"}, False)).immediate is None
    r = await s.request_body(body("small", 2000))
    assert r.immediate is not None and json.loads(r.immediate.body)["error"]["budget"]["limit"] == "0.0001"
    # and a higher value than the policy's has no effect
    s = Session(run_services)
    await s.request_headers({**HEADERS, "x-run-id": "r2", "x-run-budget-usd": "99", "x-request-id": "3"}, False)
    r = await s.request_body(body("small", 10))
    assert r.immediate is None
    assert dict(s._headers(s.plan.decision))["x-budget-limit-usd"] == "0.005"


async def test_a_malformed_run_limit_header_is_a_clear_400(run_services):
    s = Session(run_services)
    r = await s.request_headers({**HEADERS, "x-run-id": "r1", "x-run-budget-usd": "lots"}, False)
    assert r.immediate is not None and r.immediate.status == 400
    assert json.loads(r.immediate.body)["error"]["param"] == "x-run-budget-usd"


SOFT_POLICY = POLICY.replace("budgets:", "enforcement: { mode: soft_gate, soft_gate_margin: \"0.5\" }\nbudgets:").replace(
    ', soft_threshold: "0.5"', ""
)


@pytest.fixture
async def soft_services(tmp_path):
    store = EmbeddedStore(tmp_path / "soft.db")
    s = Services(PolicyHolder(parse_policy(SOFT_POLICY)), Engine(store, clock=Clock()))
    yield s
    await store.close()


async def test_soft_gate_headers_do_not_refuse_what_the_margin_still_allows(soft_services):
    """soft_gate admits up to limit + margin; the early refusal on request headers used to
    stop at the limit (a third copy of the rules), refusing calls Engine.check allows."""
    s, r, _ = await call(soft_services, "a", "small", 10)
    assert r.immediate is None
    await s.response_headers({":status": "200", "content-type": "application/json"})
    # $0.012 spent on a $0.01 limit with a 50% margin ($0.015): over the limit, inside the margin
    await s.response_body(json.dumps({"usage": {"prompt_tokens": 120000, "completion_tokens": 0}}).encode(), True)
    who = s.caller.who
    assert (await soft_services.engine.check(soft_services.policy.current, who)).allowed
    s, r, phase = await call(soft_services, "b", "small", 10)  # its decision saw spent > limit
    assert r.immediate is None
    await s.response_headers({":status": "200", "content-type": "application/json"})
    await s.response_body(json.dumps({"usage": {"prompt_tokens": 10, "completion_tokens": 1}}).encode(), True)
    assert (await soft_services.engine.check(soft_services.policy.current, who)).allowed
    _, r, phase = await call(soft_services, "c", "small", 10)
    assert phase == "body" and r.immediate is None, "refused on headers although the margin allows it"


class FailingSecondReserve(EmbeddedStore):
    """A real store whose second reservation finds the store unreachable."""

    reserves = 0

    async def reserve(self, *a, **kw):
        self.reserves += 1
        if self.reserves == 2:
            raise StoreUnavailable("store went away")
        return await super().reserve(*a, **kw)


async def test_a_store_error_during_downshift_releases_the_first_hold(tmp_path):
    store = FailingSecondReserve(tmp_path / "f.db")
    services = Services(PolicyHolder(parse_policy(POLICY)), Engine(store, clock=Clock()))
    try:
        # big's worst case crosses the soft threshold: the first hold is on big, the second
        # reservation (on small) hits the store error
        s, r, _ = await call(services, "x", "big", 600)
        assert r.immediate is not None and r.immediate.status == 503
        for _ in range(50):  # released in the background (the store may still be down)
            if await store.ledger():
                break
            await asyncio.sleep(0.05)
        entries = await store.ledger()
        assert [(e.reservation_id, e.outcome.value) for e in entries] == [(s.reservation_id, "released")]
    finally:
        await store.close()


async def test_a_settle_that_crosses_thresholds_alerts_from_the_background(services):
    from extproc.engine.alerts import Alerter

    posted: list[dict] = []

    async def post(url, body, headers, timeout):  # a webhook that accepts everything
        posted.append(json.loads(body))
        return 200

    alerts = "\nalerts: {thresholds: ['0.5', '1.0'], webhooks: [{url: 'http://127.0.0.1:9/hook', kind: slack}]}\n"
    services.policy = PolicyHolder(parse_policy(POLICY + alerts))
    services.alerts = Alerter(services.engine, services.spawn, post=post, watch_delay=0.01)
    s, r, _ = await call(services, "a", "small", 1000)
    assert r.immediate is None
    await s.response_headers({":status": "200", "content-type": "application/json"})
    assert not services.background, "nothing near a threshold before the usage is known"
    await s.response_body(json.dumps({"usage": {"prompt_tokens": 100000, "completion_tokens": 0}}).encode(), True)
    await s.close()
    while services.background:
        await asyncio.wait(list(services.background), timeout=5)
    assert sorted(p["text"].split(" reached ")[1].split("%")[0] for p in posted) == ["100", "50"]
    # the gauges the PrometheusRule divides show the same crossing
    from prometheus_client import REGISTRY

    labels = {"budget": "key:p", "window": "total"}
    spent = REGISTRY.get_sample_value("extproc_budget_spent_nano_usd", labels)
    limit = REGISTRY.get_sample_value("extproc_budget_limit_nano_usd", labels)
    assert limit and spent is not None and spent / limit >= 1.0


async def test_a_budget_with_two_cost_windows_counts_its_spend_once(services):
    """extproc_spend_nano_usd_total is per budget: a daily and a total limit on one key do not
    double it; each window's spent gauge shows the call once."""
    from prometheus_client import REGISTRY

    two_windows = POLICY.replace(
        '[{ dimension: cost, limit: "0.01", soft_threshold: "0.5" }]',
        '[{ dimension: cost, limit: "1.00" }, { dimension: cost, limit: "0.50", window: day, timezone: UTC }]',
    )
    assert two_windows != POLICY
    services.policy = PolicyHolder(parse_policy(two_windows))

    def spend() -> float:
        return REGISTRY.get_sample_value("extproc_spend_nano_usd_total", {"budget": "key:p"}) or 0.0

    before = spend()
    s, r, _ = await call(services, "two-windows", "small", 10)
    assert r.immediate is None
    await s.response_headers({":status": "200", "content-type": "application/json"})
    await s.response_body(json.dumps({"usage": {"prompt_tokens": 100000, "completion_tokens": 0}}).encode(), True)
    await s.close()
    charged = 10_000_000  # 100k input tokens x $0.10/1M = $0.01
    assert spend() - before == charged
    for window in ("total", "day@UTC"):
        assert REGISTRY.get_sample_value("extproc_budget_spent_nano_usd", {"budget": "key:p", "window": window}) == charged


class SlowlyFailingReserve(EmbeddedStore):
    """A store whose reservations time out (a lock held elsewhere, an unreachable Redis)."""

    async def reserve(self, *a, **kw):
        await asyncio.sleep(0.05)
        raise StoreUnavailable("timed out")


async def test_a_reservation_that_fails_is_timed_too(tmp_path):
    """extproc_reserve_seconds is what the reserve-latency panels read: a store that fails slowly
    must show there, not leave the histogram looking healthy."""
    from prometheus_client import REGISTRY

    def timed() -> tuple[float, float]:
        count = REGISTRY.get_sample_value("extproc_reserve_seconds_count") or 0.0
        return count, REGISTRY.get_sample_value("extproc_reserve_seconds_sum") or 0.0

    store = SlowlyFailingReserve(tmp_path / "f.db")
    services = Services(PolicyHolder(parse_policy(POLICY)), Engine(store, clock=Clock()))
    try:
        (count, total) = timed()
        _, r, _ = await call(services, "slow", "small", 10)
        assert r.immediate is not None and r.immediate.status == 503
        (count_after, total_after) = timed()
        assert count_after == count + 1 and total_after - total >= 0.05
    finally:
        await store.close()


async def test_a_keys_own_budget_and_the_every_key_budget_are_two_budgets_in_the_metrics(services):
    """A budget for one key (`id`) has its own counters beside the budget for every key: its own
    limit and spent gauges too (`key@id:p`), not one label the two overwrite in turn."""
    from prometheus_client import REGISTRY

    both = POLICY.replace(
        '[{ dimension: cost, limit: "0.01", soft_threshold: "0.5" }]',
        '[{ dimension: cost, limit: "1.00" }]\n  - scope: key\n    id: p\n    limits: [{ dimension: cost, limit: "0.50" }]',
    )
    assert both != POLICY
    services.policy = PolicyHolder(parse_policy(both))
    s, r, _ = await call(services, "own-and-every", "small", 10)
    assert r.immediate is None
    await s.response_headers({":status": "200", "content-type": "application/json"})
    await s.response_body(json.dumps({"usage": {"prompt_tokens": 100000, "completion_tokens": 0}}).encode(), True)
    await s.close()

    def gauge(name: str, budget: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"budget": budget, "window": "total"})

    assert gauge("extproc_budget_limit_nano_usd", "key:p") == 1_000_000_000
    assert gauge("extproc_budget_limit_nano_usd", "key@id:p") == 500_000_000
    assert gauge("extproc_budget_spent_nano_usd", "key:p") == gauge("extproc_budget_spent_nano_usd", "key@id:p") == 10_000_000
