"""Threshold alerts under concurrent load: two alerters ("worker processes") on one
store file, a local aiohttp webhook receiver, an injected clock for the calendar."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections import Counter
from decimal import Decimal

import pytest
from aiohttp import web

from extproc.engine.alerts import SIGNATURE_HEADER, Alerter
from extproc.engine.budget import Engine, Identity
from extproc.money import usd_to_nano
from extproc.server.webhooks import aiohttp_post
from extproc.stores.embedded import EmbeddedStore
from extproc.stores.redis_store import RedisStore
from tests.engine.conftest import make_policy
from tests.support.redis_server import RedisServer

SECRET = "s3cret-hook-key"
TEAM = "ml"
LIMIT_USD = "1.00"
CALLS = 20  # each charges limit / CALLS: together exactly 100%


class Receiver:
    """Webhooks on loopback: /slack, /signed, and /flaky that fails its first `fail` posts."""

    def __init__(self, fail: int) -> None:
        self.got: dict[str, list[tuple[bytes, dict[str, str]]]] = {"slack": [], "signed": [], "flaky": []}
        self.refused = 0
        self.fail = fail
        app = web.Application()
        app.router.add_post("/{name}", self.handle)
        self.runner = web.AppRunner(app)

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        if name == "flaky" and self.refused < self.fail:
            self.refused += 1
            return web.Response(status=503)
        self.got[name].append((body, dict(request.headers)))
        return web.Response(status=204)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"


class Tasks:
    """The service's spawn: background tasks, awaited by the test."""

    def __init__(self) -> None:
        self.live: set[asyncio.Future[object]] = set()

    def spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self.live.add(t)
        t.add_done_callback(self.live.discard)

    async def drain(self) -> None:
        while self.live:
            await asyncio.wait(list(self.live), timeout=10)


@pytest.fixture
async def receiver():
    r = Receiver(fail=2)
    url = await r.start()
    r.url = url  # type: ignore[attr-defined]
    yield r
    await r.runner.cleanup()


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.integration)])
async def two_stores(request, tmp_path):
    """Two store clients on one store: what two worker processes (or pods) share."""
    if request.param == "embedded":
        stores = [EmbeddedStore(tmp_path / "budget.db") for _ in range(2)]
        yield stores
    else:
        server = RedisServer().start()
        stores = [RedisStore(server.url) for _ in range(2)]
        try:
            yield stores
        finally:
            for s in stores:
                await s.close()
            server.stop()
        return
    for s in stores:
        await s.close()


def _policy(url: str):
    return make_policy(
        budgets=[{"scope": "team", "limits": [{"dimension": "cost", "limit": LIMIT_USD, "window": "day"}]}],
        alerts={
            "thresholds": ["0.5", "0.8", "1.0"],
            "webhooks": [
                {"url": f"{url}/slack", "kind": "slack"},
                {"url": f"{url}/signed", "kind": "signed", "secret_env": "EXTPROC_TEST_HOOK_SECRET"},
                {"url": f"{url}/flaky", "kind": "signed", "secret_env": "EXTPROC_TEST_HOOK_SECRET"},
            ],
            "attempts": 4,
            "backoff_seconds": "0.02",
        },
    )


async def _call(engine: Engine, alerter: Alerter, policy, who: Identity, cost: int) -> None:
    d = await engine.reserve(policy, who, run_id=None, reservation_id=None, estimate={"cost": cost, "requests": 1}, meta={})
    assert d.allowed, d.message
    await engine.settle(d.hold, {"cost": cost, "requests": 1})
    alerter.settled(policy, d)


async def _load(workers, policy, calls: int, cost: int) -> None:
    """`calls` concurrent calls spread over the workers, alternating callers of one team."""
    who = [Identity("alice", team=TEAM), Identity("bob", team=TEAM)]
    await asyncio.gather(*(_call(*workers[i % len(workers)], policy, who[i % 2], cost) for i in range(calls)))


async def test_each_threshold_fires_once_per_period_under_concurrent_load(two_stores, clock, receiver, monkeypatch):
    monkeypatch.setenv("EXTPROC_TEST_HOOK_SECRET", SECRET)
    policy = _policy(receiver.url)
    tasks = Tasks()
    workers = []
    for s in two_stores:
        engine = Engine(s, clock=clock)
        workers.append((engine, Alerter(engine, tasks.spawn, post=aiohttp_post, watch_delay=0.01)))
    cost = usd_to_nano(LIMIT_USD) // CALLS
    await _load(workers, policy, CALLS, cost)
    await tasks.drain()

    for name in ("slack", "signed", "flaky"):
        assert len(receiver.got[name]) == 3, name
    signed = [json.loads(body) for body, _ in receiver.got["signed"]]
    assert sorted(a["threshold"] for a in signed) == ["0.5", "0.8", "1.0"]
    assert {a["budget"] for a in signed} == {f"team:{TEAM}"}
    assert {a["period"] for a in signed} == {"2026-03-02@UTC"}
    for a in signed:  # seen when spend had crossed, never before
        assert Decimal(a["spent_usd"]) >= Decimal(a["threshold"]) * Decimal(a["limit_usd"])
    for body, headers in receiver.got["signed"] + receiver.got["flaky"]:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    texts = sorted(json.loads(body)["text"] for body, _ in receiver.got["slack"])
    assert [t.split(" reached ")[1].split("%")[0] for t in texts] == ["100", "50", "80"]
    assert receiver.refused == 2  # the flaky hook failed twice and was retried

    entries = await workers[0][0].ledger()
    alerts = [e for e in entries if e.meta.get("api") == "alert"]
    assert Counter(e.meta["usage_source"] for e in alerts) == {"alert_delivered": 9}
    flaky = [e.meta["alert"]["attempts"] for e in alerts if e.meta["alert"]["webhook"] == 2]
    assert sum(flaky) == 3 + receiver.refused
    assert all(not e.charged for e in alerts)

    # the next calendar day is a new period: its thresholds alert again
    clock.advance(86_400_000)
    await _load(workers, policy, CALLS // 2, cost)
    await tasks.drain()
    day2 = [json.loads(body) for body, _ in receiver.got["signed"][3:]]
    assert [(a["period"], a["threshold"]) for a in day2] == [("2026-03-03@UTC", "0.5")]


async def test_a_hook_that_never_answers_is_given_up_and_recorded(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("EXTPROC_TEST_HOOK_SECRET", SECRET)
    policy = make_policy(
        budgets=[{"scope": "team", "limits": [{"dimension": "cost", "limit": LIMIT_USD}]}],
        alerts={"thresholds": ["0.5"], "webhooks": [{"url": "http://127.0.0.1:9/none", "kind": "slack"}],
                "attempts": 3, "backoff_seconds": "0.01"},
    )  # fmt: skip
    tasks = Tasks()
    engine = Engine(EmbeddedStore(tmp_path / "budget.db"), clock=clock)
    try:
        await _load([(engine, Alerter(engine, tasks.spawn, post=aiohttp_post, watch_delay=0.01))], policy, 1, usd_to_nano("0.60"))
        await tasks.drain()
        (entry,) = [e for e in await engine.ledger() if e.meta.get("api") == "alert"]
        assert entry.meta["usage_source"] == "alert_failed"
        assert entry.meta["alert"]["attempts"] == 3 and entry.meta["alert"]["error"]
    finally:
        await engine.close()


async def test_no_store_read_while_no_threshold_is_near(tmp_path, clock):
    policy = _policy("http://127.0.0.1:9")
    tasks = Tasks()
    engine = Engine(EmbeddedStore(tmp_path / "budget.db"), clock=clock)
    try:
        await _load([(engine, Alerter(engine, tasks.spawn, post=aiohttp_post))], policy, 3, usd_to_nano("0.10"))
        assert not tasks.live  # 30% of the limit: the settle spawned nothing
    finally:
        await engine.close()
