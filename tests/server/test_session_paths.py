"""Every path of one ext_proc stream, driven on the session over a real embedded store:
JSON, SSE, aborts before and after the usage, non-2xx, store down before and after a
reservation (fail closed and fail open), clamp, ext_authz, and the phase table."""

from __future__ import annotations

import hashlib
import json

import pytest

from extproc.engine.budget import Engine
from extproc.errors import StoreUnavailable
from extproc.policy.loader import PolicyHolder, parse_policy
from extproc.server.gate import Gate
from extproc.server.lifecycle import PhaseError
from extproc.server.services import Services
from extproc.server.session import Session
from extproc.stores.embedded import EmbeddedStore

KEY = "sk-paths"
POLICY = f"""
version: 1
prices:
  models:
    m: {{ input: "1.00", output: "2.00", output_limit: 1000 }}
    thinker: {{ input: "1.00", output: "2.00", output_limit: 1000, reasoning: true }}
keys:
  - {{ sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, principal: p, team: t }}
routes:
  - {{ path: /dispatch, action: unmetered }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "1.00" }}]
"""
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = {":path": "/v1/chat/completions", ":method": "POST", **AUTH}


class DownStore(EmbeddedStore):
    """A real store that can be switched off (every call raises StoreUnavailable)."""

    down = False

    async def reserve(self, *a, **kw):
        if self.down:
            raise StoreUnavailable("down")
        return await super().reserve(*a, **kw)

    async def settle(self, *a, **kw):
        if self.down:
            raise StoreUnavailable("down")
        return await super().settle(*a, **kw)

    async def check(self, *a, **kw):
        if self.down:
            raise StoreUnavailable("down")
        return await super().check(*a, **kw)


def make(tmp_path, extra: str = "") -> tuple[Services, DownStore]:
    store = DownStore(tmp_path / "b.db")
    return Services(PolicyHolder(parse_policy(POLICY + extra)), Engine(store)), store


@pytest.fixture
async def world(tmp_path):
    services, store = make(tmp_path)
    yield services, store
    await store.close()


def chat(model: str = "m", *, stream: bool = False, max_tokens: int = 100) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def started(services: Services, body: bytes) -> Session:
    s = Session(services)
    assert (await s.request_headers(CHAT, False)).immediate is None
    r = await s.request_body(body)
    assert r.immediate is None, r.immediate
    return s


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


DELTA = {"choices": [{"index": 0, "delta": {"content": "hello there"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 20}}


async def outcomes(store) -> list[tuple[str, str, int]]:
    return [(e.outcome.value, e.meta.get("usage_source", ""), e.charged.get("cost", 0)) for e in await store.ledger()]


async def test_json_settles_on_its_usage(world):
    services, store = world
    s = await started(services, chat())
    await s.response_headers({":status": "200", "content-type": "application/json"})
    r = await s.response_body(json.dumps({"usage": {"prompt_tokens": 10, "completion_tokens": 20}}).encode(), True)
    assert ("x-budget-cost-usd", "0.00005") in r.set_headers  # 10 x $1/1M + 20 x $2/1M
    assert ("x-budget-cost-source", "body") in r.set_headers
    assert await outcomes(store) == [], "the reply that tells the cost leaves before the store is written"
    await s.close()  # the servicer closes every stream once its last reply is sent
    assert await outcomes(store) == [("settled", "body", 50_000)]


async def test_an_estimated_cost_says_so(world):
    services, _ = world
    s = await started(services, chat(stream=True))
    await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    r = await s.response_body(sse(DELTA) + b"data: [DONE]\n\n", True)  # a stream that reported no usage
    assert b": x-budget-cost-source=counted\n\n: x-budget-cost-usd=" in r.body
    s = await started(services, chat())
    await s.response_headers({":status": "200", "content-type": "application/json"})
    r = await s.response_body(b'{"id": "no usage here"}', True)
    assert ("x-budget-cost-source", "estimate") in r.set_headers


async def test_sse_settles_on_the_final_usage_and_appends_the_cost_comment(world):
    services, store = world
    s = await started(services, chat(stream=True))
    r = await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    assert r.stream_response
    await s.response_body(sse(DELTA), False)
    r = await s.response_body(sse(USAGE) + b"data: [DONE]\n\n", True)
    assert r.body is not None and r.body.endswith(b": x-budget-cost-usd=0.00005\n\n")
    await s.close()
    assert await outcomes(store) == [("settled", "stream", 50_000)]


async def test_a_client_gone_after_the_usage_is_charged_the_usage(world):
    services, store = world
    s = await started(services, chat(stream=True))
    await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    await s.response_body(sse(DELTA, USAGE) + b"data: [DONE]\n\n", False)  # the SDK hangs up at [DONE]
    await s.close()
    assert await outcomes(store) == [("settled", "stream", 50_000)]


async def test_a_client_gone_before_the_usage_is_charged_what_was_counted(world):
    services, store = world
    s = await started(services, chat(stream=True))
    await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    await s.response_body(sse(DELTA), False)
    await s.close()
    ((outcome, source, cost),) = await outcomes(store)
    assert (outcome, source) == ("settled", "aborted_counted") and 0 < cost < s.hold.decision.reserved["cost"]


async def test_a_reasoning_model_without_usage_is_charged_its_reservation(world):
    services, store = world
    s = await started(services, chat("thinker", stream=True))
    await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    await s.response_body(sse(DELTA), False)
    await s.close()
    assert await outcomes(store) == [("settled", "aborted_reserved", s.hold.decision.reserved["cost"])]


async def test_a_client_gone_before_any_response_is_charged_its_input_estimate(world):
    services, store = world
    s = await started(services, chat())
    await s.close()
    ((outcome, source, cost),) = await outcomes(store)
    assert (outcome, source) == ("settled", "aborted") and cost == s.plan.chosen.input_tokens * 1000


async def test_a_non_2xx_answer_releases_exactly_once(world):
    services, store = world
    s = await started(services, chat())
    r = await s.response_headers({":status": "503"})
    assert r.skip_response_body
    await s.close()  # nothing left to do
    assert await outcomes(store) == [("released", "", 0)]


async def test_store_down_before_the_reservation_fails_closed(world):
    services, store = world
    s = Session(services)
    await s.request_headers(CHAT, False)
    store.down = True
    r = await s.request_body(chat())
    assert r.immediate is not None and r.immediate.status == 503
    assert json.loads(r.immediate.body)["error"]["code"] == "budget_store_unavailable"


async def test_store_down_before_the_reservation_fails_open_when_the_policy_says_so(tmp_path):
    services, store = make(tmp_path, "failure_mode: fail_open\n")
    try:
        s = Session(services)
        await s.request_headers(CHAT, False)
        store.down = True
        r = await s.request_body(chat())
        assert r.immediate is None
        r = await s.response_headers({":status": "200", "content-type": "application/json"})
        assert ("x-budget-failure-mode", "fail_open") in r.set_headers
    finally:
        await store.close()


async def test_store_down_after_the_reservation_settles_in_the_background(world):
    services, store = world
    s = await started(services, chat())
    await s.response_headers({":status": "200", "content-type": "application/json"})
    store.down = True
    r = await s.response_body(json.dumps({"usage": {"prompt_tokens": 10, "completion_tokens": 20}}).encode(), True)
    assert ("x-budget-cost-usd", "0.00005") in r.set_headers  # the caller is told what it will be charged
    await s.close()  # the store refuses the settle: retried in the background
    store.down = False
    for task in list(services.background):
        await task
    assert await outcomes(store) == [("settled", "body", 50_000)]


async def test_clamp_lowers_the_forwarded_cap_to_what_fits(tmp_path):
    services, store = make(tmp_path, "decisions: { output_clamp: true }\n")
    services.policy = PolicyHolder(parse_policy(POLICY.replace('limit: "1.00"', 'limit: "0.001"') + "decisions: { output_clamp: true }\n"))
    try:
        s = Session(services)
        await s.request_headers(CHAT, False)
        r = await s.request_body(chat(max_tokens=1000))  # worst case $0.002 > the $0.001 limit
        assert r.immediate is None and s.plan.clamped
        cap = json.loads(r.body)["max_tokens"]  # the field the client used
        assert 64 <= cap < 1000 and ("x-budget-output-clamped", "true") in (await s.response_headers({":status": "200"})).set_headers
    finally:
        await store.close()


async def test_ext_authz_allows_listed_routes_with_identity_and_refuses_metered_ones(world):
    services, _ = world
    dispatch = {":path": "/dispatch", ":method": "POST"}
    assert await Gate(services).authorize({**dispatch, **AUTH}, None) is None
    r = await Gate(services).authorize(dispatch, None)
    assert r is not None and r.immediate.status == 401
    r = await Gate(services).authorize(CHAT, None)
    assert r is not None and r.immediate.status == 403
    assert await Gate(services).authorize({":path": "/health", ":method": "GET"}, None) is None


async def test_an_impossible_phase_is_a_bug_that_raises(world):
    services, _ = world
    s = Session(services)
    with pytest.raises(PhaseError):
        await s.request_body(chat())  # a body before any headers


async def test_envoys_own_local_reply_passes_without_a_request(world):
    """A request Envoy rejected itself (an encoded slash) still passes the response phases."""
    services, store = world
    r = await Session(services).response_headers({":status": "400"})
    assert r.immediate is None and r.skip_response_body
    assert await store.ledger() == []


async def test_the_budget_endpoint_reads_the_run_as_a_metered_call_does(world):
    services, _ = world
    budget = {":path": "/v1/budget", ":method": "GET", **AUTH}
    r = await Session(services).request_headers({**budget, "x-run-id": "job-1"}, True)
    assert r.immediate is not None and r.immediate.status == 200
    assert json.loads(r.immediate.body)["run"] == "job-1"
    r = await Session(services).request_headers({**budget, "x-run-id": "x" * 200}, True)
    assert r.immediate is not None and r.immediate.status == 400  # the same bound as on a metered call


class _Envoy:
    """The servicer's stream as Envoy drives it: the messages of one JSON call in, and at each
    reply sent, how many ledger entries the store holds."""

    metadata = None

    def __init__(self, store, messages) -> None:
        self.store, self.messages, self.entries_at_send = store, messages, []

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.messages:
            raise StopAsyncIteration
        return self.messages.pop(0)

    async def send_message(self, message) -> None:
        self.entries_at_send.append(len(await self.store.ledger()))


def _json_call(usage: dict) -> list:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    def headers(pairs: dict) -> ep.HttpHeaders:
        return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]))

    return [
        ep.ProcessingRequest(request_headers=headers(CHAT)),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=chat(), end_of_stream=True)),
        ep.ProcessingRequest(response_headers=headers({":status": "200", "content-type": "application/json"})),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=json.dumps({"usage": usage}).encode(), end_of_stream=True)),
    ]


async def test_the_settle_is_written_just_after_the_last_reply_leaves(world):
    """Off the caller's latency: Envoy gets the cost with the last reply, the store takes it next."""
    from extproc.server.callers import CallerGate
    from extproc.server.ext_proc import ExternalProcessor

    services, store = world
    envoy = _Envoy(store, _json_call({"prompt_tokens": 10, "completion_tokens": 20}))
    await ExternalProcessor(services, CallerGate(None, True)).Process(envoy)  # type: ignore[arg-type]
    assert envoy.entries_at_send == [0, 0, 0, 0]
    while services.background:  # the stream's close, spawned when the handler ends
        await next(iter(services.background))
    assert await outcomes(store) == [("settled", "body", 50_000)]


async def test_a_hold_past_half_its_ttl_is_settled_before_the_caller_is_told_its_cost(tmp_path):
    """Past half its TTL the reaper may expire a hold (charging the reservation) before a later
    write: then the store is written first, so the cost the caller is told is what was charged."""
    now = [1_700_000_000_000]
    store = DownStore(tmp_path / "b.db")
    services = Services(PolicyHolder(parse_policy(POLICY + "reservation_ttl_seconds: 10\n")), Engine(store, clock=lambda: now[0]))
    try:
        s = await started(services, chat())
        await s.response_headers({":status": "200", "content-type": "application/json"})
        now[0] += 5_000
        r = await s.response_body(json.dumps({"usage": {"prompt_tokens": 10, "completion_tokens": 20}}).encode(), True)
        assert ("x-budget-cost-usd", "0.00005") in r.set_headers
        assert await outcomes(store) == [("settled", "body", 50_000)]  # before close
        await s.close()
        assert len(await store.ledger()) == 1
    finally:
        await store.close()


async def test_a_stream_reset_as_the_last_reply_leaves_still_books_its_charge(world):
    """Envoy (or a client gone) resets the stream while the last reply is sent: the handler is
    cancelled, and the charge it decided is booked all the same by the close the servicer spawns."""
    import asyncio

    from extproc.server.callers import CallerGate
    from extproc.server.ext_proc import ExternalProcessor

    class Reset(_Envoy):
        async def send_message(self, message) -> None:
            await super().send_message(message)
            if len(self.entries_at_send) == 4:
                raise asyncio.CancelledError  # what grpc_server does to a handler whose stream was reset

    services, store = world
    envoy = Reset(store, _json_call({"prompt_tokens": 10, "completion_tokens": 20}))
    with pytest.raises(asyncio.CancelledError):
        await ExternalProcessor(services, CallerGate(None, True)).Process(envoy)  # type: ignore[arg-type]
    while services.background:
        await next(iter(services.background))
    assert await outcomes(store) == [("settled", "body", 50_000)]
