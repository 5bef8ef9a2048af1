"""Issue 7: faults through real Envoy. After each, the ledger reconciles and no
reservation outlives its TTL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import after, ledger, sha, shared_stack
from tests.integration.reconcile import reconcile
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

KEY = "sk-fault"


def policy(*, failure_mode: str = "fail_closed", ttl: int = 600) -> str:
    return f"""
version: 1
prices:
  models:
    gpt-4o-mini: {{ input: "0.15", output: "0.60", output_limit: 4096 }}
keys:
  - {{ sha256: {sha(KEY)}, principal: ops, team: sre, org: acme }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "10.00" }}]
  - scope: team
    limits: [{{ dimension: cost, limit: "20.00" }}]
failure_mode: {failure_mode}
reservation_ttl_seconds: {ttl}
"""


def call(c: httpx.AsyncClient, **headers: str):
    return c.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}", **headers},
        json={"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "ping"}]},
    )


@pytest.fixture
def own_redis():
    server = RedisServer().start()
    yield server
    server.stop()


async def test_redis_killed_under_load_fails_closed_then_recovers_without_restart(make_stack, own_redis):
    stack = make_stack(policy(), store=own_redis.url)
    async with httpx.AsyncClient(base_url=stack.url, timeout=15) as c:
        assert (await call(c)).status_code == 200
        load = [asyncio.ensure_future(call(c, **{"x-mock-delay-ms": "5"})) for _ in range(20)]
        await asyncio.sleep(0.05)
        own_redis.kill()
        results = await asyncio.gather(*load, return_exceptions=True)
        down = await call(c)
        assert down.status_code == 503
        err = down.json()["error"]
        assert err["code"] == "budget_store_unavailable" and "fail closed" in err["message"]
        for r in results:
            assert not isinstance(r, BaseException)
            assert r.status_code in (200, 503), r.text
        own_redis.start()  # same port, AOF on: the data comes back
        for _ in range(50):
            r = await call(c)
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200, "the service reconnected by itself"
    # settles that failed while Redis was down are retried in the background, or expire at their TTL
    await reconcile(stack, timeout=20)


async def test_fail_open_policy_lets_traffic_through_and_records_it(own_redis, make_stack):  # the stack stops first
    stack = make_stack(policy(failure_mode="fail_open"), store=own_redis.url)
    async with httpx.AsyncClient(base_url=stack.url, timeout=15) as c:
        own_redis.kill()
        r = await call(c)
        assert r.status_code == 200
        assert r.headers["x-budget-failure-mode"] == "fail_open"
    assert "letting" in stack.log("extproc") and "fail_open" in stack.log("extproc")
    # Redis back before the stack stops: the service's background release of the call's
    # reservation id lands, so its stop does not wait out the retries (up to 5 s).
    own_redis.start()


async def test_service_killed_mid_stream_reservation_expires_and_is_reconciled(make_stack):
    stack = make_stack(policy(ttl=2))
    async with httpx.AsyncClient(base_url=stack.url, timeout=15) as c:
        body = {"model": "gpt-4o-mini", "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": "long"}]}
        hdrs = {"authorization": f"Bearer {KEY}", "x-mock-output-tokens": "200", "x-mock-delay-ms": "20"}
        got, failed = 0, None
        try:
            async with c.stream("POST", "/v1/chat/completions", json=body, headers=hdrs) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        got += 1
                        if got == 3:
                            stack.procs_by_name("extproc").kill()
        except httpx.HTTPError as e:
            failed = e
        # failure_mode_allow: false -> Envoy does not pretend the stream completed
        assert failed is not None or got < 200
        # with the service gone, Envoy fails closed: nothing unmetered gets through
        r = await call(c)
        assert r.status_code >= 500
        stack.start_service()
        (entry,) = await ledger(stack, expect=1, timeout=15)  # the restarted service's reaper expires it
        assert entry.outcome.value == "expired"
        assert entry.charged["cost"] == entry.reserved["cost"] > 0
        assert (await call(c)).status_code == 200
    await reconcile(stack)


def short_route_timeout(tmp_path: Path) -> str:
    """The shipped Envoy config with a 1 s route timeout (Envoy ignores client x-envoy-* timeouts)."""
    cfg = yaml.safe_load((Path(__file__).parents[2] / "envoy" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        route["route"]["timeout"] = "1s"
    out = tmp_path / "envoy-short-timeout.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


@pytest.fixture(scope="module")
def short_timeout_stack(request, tmp_path_factory):
    """policy() behind a 1 s route timeout, shared by the backend faults: each reads back only
    the ledger entry its own call wrote, and reconciles the whole books."""
    timeout_config = short_route_timeout(tmp_path_factory.mktemp("faults-envoy"))
    with shared_stack(request, "faults", policy(), envoy_config=timeout_config) as s:
        yield s


@pytest.mark.parametrize("fault", ["status_500", "status_429", "timeout"])
async def test_backend_errors_and_timeouts_release_the_reservation(short_timeout_stack, fault):
    stack = short_timeout_stack
    before = await ledger(stack, expect=0)
    async with httpx.AsyncClient(base_url=stack.url, timeout=15) as c:
        if fault == "timeout":
            r = await call(c, **{"x-mock-delay-ms": "200"})  # ~3 s of work against a 1 s route timeout
            assert r.status_code == 504
        else:
            code = fault.split("_")[1]
            r = await call(c, **{"x-mock-status": code})
            assert r.status_code == int(code)
    (entry,) = await ledger(stack, where=after(before))
    assert entry.outcome.value == "released" and entry.charged.get("cost", 0) == 0
    await reconcile(stack)
