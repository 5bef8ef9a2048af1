"""Right-sized streams on the session over a real embedded store: the reservation grows with
the output, a step that does not fit ends the stream cleanly, a JSON call streamed upstream
gets its JSON back, and spend never passes the limit."""

from __future__ import annotations

import hashlib
import json

from extproc.engine.budget import Engine, Identity
from extproc.policy.loader import PolicyHolder, parse_policy
from extproc.server.services import Services
from extproc.server.session import Session
from extproc.stores.embedded import EmbeddedStore

KEY = "sk-growth"
# $1/1M in, $1000/1M out: one output token is 1,000 nano-USD, so the numbers read easily.
POLICY = f"""
version: 1
prices:
  models:
    m: {{ input: "1.00", output: "1000.00", output_limit: 1000, expected_output_tokens: 50 }}
    j: {{ input: "1.00", output: "1000.00", output_limit: 1000, expected_output_tokens: 50, upstream_stream: true }}
keys:
  - {{ sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, principal: p }}
streaming: {{ extend_step_tokens: 16, admission_headroom: 0 }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "{{limit}}" }}]
"""
CHAT = {":path": "/v1/chat/completions", ":method": "POST", "authorization": f"Bearer {KEY}"}


def services(tmp_path, limit: str = "1.00") -> tuple[Services, EmbeddedStore]:
    store = EmbeddedStore(tmp_path / "b.db")
    return Services(PolicyHolder(parse_policy(POLICY.replace("{limit}", limit))), Engine(store)), store


def body(model: str = "m", *, stream: bool = True) -> bytes:
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


def chunk(text: str, finish: str | None = None) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}  # fmt: skip


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


async def started(svc: Services, b: bytes) -> tuple[Session, dict[str, str]]:
    s = Session(svc)
    assert (await s.request_headers(CHAT, False)).immediate is None
    r = await s.request_body(b)
    assert r.immediate is None, r.immediate
    h = await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    return s, dict(h.set_headers)


async def key_line(store: EmbeddedStore, svc: Services):
    """The key's cost line as the store sees it now."""
    policy = svc.policy.current
    snap = await svc.engine.snapshot_lines(policy, Identity.from_key(policy.keys[0]))
    return snap.states[0]


async def test_a_stream_reserves_its_expected_output_and_grows_before_the_chunk_passes(tmp_path):
    svc, store = services(tmp_path)
    s, headers = await started(svc, body())
    assert headers["x-budget-reservation"] == "expected"
    assert float(headers["x-budget-worst-case-usd"]) > float(headers["x-budget-reserved-usd"])
    reserved_before = (await key_line(store, svc)).reserved
    r = await s.response_body(sse(*[chunk(" hello")] * 60), False)  # 60 tokens > the 50 expected
    assert r.body is None or b"hello" in r.body  # forwarded, not cut
    assert not r.end_stream
    assert (await key_line(store, svc)).reserved > reserved_before  # grown before the chunk was released
    r = await s.response_body(sse(chunk("", "stop")) + b"data: [DONE]\n\n", True)
    assert b"x-budget-cost-usd" in r.body
    await s.close()
    line = await key_line(store, svc)
    assert line.reserved == 0 and line.spent <= line.limit
    entry = (await store.ledger())[0]
    assert entry.meta["usage_source"] == "counted" and entry.charged["output_tokens"] == 60
    await store.close()


async def test_a_step_that_does_not_fit_ends_the_stream_cleanly_and_charges_within_the_limit(tmp_path):
    # $0.15 = 150 output tokens at most (the input costs a few nano-dollars); 114 are reserved at first
    svc, store = services(tmp_path, limit="0.15")
    s, _ = await started(svc, body())
    out = b""
    for _ in range(20):
        r = await s.response_body(sse(*[chunk(" hello")] * 10), False)
        out += r.body if r.body is not None else sse(*[chunk(" hello")] * 10)
        if r.end_stream:
            break
    assert r.end_stream, "the stream was never cut"
    await s.close()  # Envoy closes the stream: the cut's charge is booked, nothing more
    assert b": budget_exhausted scope=key:p\n\n" in out
    assert b'"finish_reason": "length"' in out or b'"finish_reason":"length"' in out
    assert out.rstrip().endswith(b"data: [DONE]")
    line = await key_line(store, svc)
    assert line.reserved == 0 and line.spent <= line.limit
    entry = (await store.ledger())[0]
    assert entry.meta["usage_source"] == "cut"
    delivered = out.count(b" hello")
    assert entry.charged["output_tokens"] >= delivered  # every token the client got is charged
    await s.close()  # a second close charges nothing more
    assert len(await store.ledger()) == 1
    await store.close()


async def test_a_json_call_streamed_upstream_gets_its_json_assembled(tmp_path):
    svc, store = services(tmp_path)
    s = Session(svc)
    await s.request_headers(CHAT, False)
    r = await s.request_body(body("j", stream=False))
    forwarded = json.loads(r.body)
    assert forwarded["stream"] is True and forwarded["stream_options"] == {"include_usage": True}
    h = await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    assert h.stream_response and ("content-type", "application/json") in h.set_headers
    assert ("content-encoding", "identity") in h.set_headers  # the JSON is sent decoded, whatever the stream's coding
    r = await s.response_body(sse(*[chunk(" hello")] * 5), False)
    assert r.body == b""  # withheld until the JSON is whole
    usage = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "j", "choices": [],
             "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}}  # fmt: skip
    r = await s.response_body(sse(chunk("", "stop"), usage) + b"data: [DONE]\n\n", True)
    doc = json.loads(r.body)
    assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["content"] == " hello" * 5
    assert doc["usage"]["completion_tokens"] == 6
    await s.close()
    assert (await store.ledger())[0].meta["usage_source"] == "stream"
    await store.close()


async def test_history_right_sizes_the_next_calls(tmp_path):
    svc, store = services(tmp_path)
    for _ in range(3):  # min_history
        s, _ = await started(svc, body())
        u = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 8, "completion_tokens": 200}}  # fmt: skip
        await s.response_body(sse(chunk(" hello"), u) + b"data: [DONE]\n\n", True)
        await s.close()
    s, headers = await started(svc, body())
    # 8+ input tokens at $1/1M and 200 + 64 (the end margin) output at $1000/1M: the history, not the policy's 50
    assert 0.264 <= float(headers["x-budget-reserved-usd"]) < 0.265
    await s.close()
    await store.close()


async def test_the_budget_endpoint_says_what_a_stream_reserves_before_it_grows(tmp_path):
    svc, store = services(tmp_path)
    s = Session(svc)
    r = await s.request_headers({":path": "/v1/budget", ":method": "GET", "authorization": f"Bearer {KEY}"}, True)
    doc = json.loads(r.immediate.body)
    assert doc["expected_output_tokens"] == {"m": 50 + 64, "j": 50 + 64}  # the policy's hint plus the end margin
    await store.close()


async def test_a_streamed_answer_that_cannot_be_assembled_ends_in_the_api_error_envelope(tmp_path):
    svc, store = services(tmp_path)
    s = Session(svc)
    await s.request_headers(CHAT, False)
    await s.request_body(body("j", stream=False))
    await s.response_headers({":status": "200", "content-type": "text/event-stream"})
    error = {"error": {"message": "the model crashed", "type": "server_error"}}
    r = await s.response_body(sse(chunk(" hello"), error), True)  # an error event mid-stream: no JSON answer to make
    doc = json.loads(r.body)
    assert doc["error"]["code"] == "upstream_unassemblable" and "the model crashed" in doc["error"]["message"]
    await s.close()
    line = await key_line(store, svc)
    assert line.reserved == 0 and len(await store.ledger()) == 1  # settled, not left to expire
    await store.close()


async def test_a_long_stream_pushes_its_ttl_so_the_reaper_never_expires_it(tmp_path):
    from extproc.policy.loader import PolicyHolder, parse_policy

    now = [1_000_000]
    store = EmbeddedStore(tmp_path / "b.db")
    text = POLICY.replace("{limit}", "1.00") + "reservation_ttl_seconds: 2\n"
    svc = Services(PolicyHolder(parse_policy(text)), Engine(store, clock=lambda: now[0]))
    s, _ = await started(svc, body())
    for _ in range(4):  # 6 s of a stream that never needs to grow, past three TTLs
        now[0] += 1500
        await s.response_body(sse(chunk(" hello")), False)
        assert await store.expire(now_ms=now[0]) == 0  # touched every half TTL: nothing to reap
    r = await s.response_body(sse(chunk("", "stop")) + b"data: [DONE]\n\n", True)
    assert b"x-budget-cost-usd" in r.body
    await s.close()
    (entry,) = await store.ledger()
    assert entry.outcome.value == "settled" and entry.meta["usage_source"] == "counted"
    await store.close()
