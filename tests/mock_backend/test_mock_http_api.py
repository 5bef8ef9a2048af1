"""Wire-level shapes of every endpoint, the header knobs and /stats, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from mock_backend_helpers import parse_sse, sse_json

from extproc.tokenizers import count_tokens

USER = [{"role": "user", "content": "What is the capital of France?"}]
USER_TOKENS = count_tokens("What is the capital of France?")


async def post(http: aiohttp.ClientSession, url: str, body: Any, **headers: str) -> tuple[int, Any, bytes]:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"content-type": "application/json", **hdrs}) as r:
        raw = await r.read()
        parsed = json.loads(raw) if r.content_type == "application/json" else None
        return r.status, parsed, raw


async def test_chat_json_exact_usage(base: str, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, f"{base}/v1/chat/completions", {"model": "llama", "messages": USER})
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "llama"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " hello" * 16, "refusal": None, "annotations": []}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": USER_TOKENS,
        "completion_tokens": 16,
        "total_tokens": USER_TOKENS + 16,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_chat_knobs_n_cached_reasoning(base: str, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(
        http,
        f"{base}/v1/chat/completions",
        {"model": "m", "messages": USER, "n": 2, "max_completion_tokens": 4},
        x_mock_output_tokens="9",
        x_mock_cached_tokens="3",
        x_mock_reasoning_tokens="5",
    )
    assert status == 200
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["choices"][1]["message"]["content"] == " hello" * 4
    assert body["usage"]["prompt_tokens"] == USER_TOKENS
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert body["usage"]["completion_tokens"] == (4 + 5) * 2
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 10}


async def test_chat_stream_include_usage(base: str, http: aiohttp.ClientSession) -> None:
    req = {"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{base}/v1/chat/completions", json=req, headers={"x-mock-output-tokens": "3"}) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-mock-backend"] == "mock"
        chunks = sse_json(await r.read())
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == [" hello"] * 3
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "stop"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["prompt_tokens"] == USER_TOKENS


async def test_chat_stream_without_include_usage_or_with_no_usage(base: str, http: aiohttp.ClientSession) -> None:
    req = {"model": "m", "messages": USER, "stream": True}
    _, _, raw = await post(http, f"{base}/v1/chat/completions", req)
    chunks = sse_json(raw)
    assert all("usage" not in c and c["choices"] for c in chunks)
    req["stream_options"] = {"include_usage": True}
    _, _, raw = await post(http, f"{base}/v1/chat/completions", req, x_mock_no_usage="1")
    chunks = sse_json(raw)
    assert all("usage" not in c and c["choices"] for c in chunks)


async def test_completions_json_and_stream(base: str, http: aiohttp.ClientSession) -> None:
    req = {"model": "m", "prompt": "Once upon a time", "max_tokens": 5}
    status, body, _ = await post(http, f"{base}/v1/completions", req)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " hello" * 5 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == count_tokens("Once upon a time")
    assert body["usage"]["completion_tokens"] == 5
    _, _, raw = await post(http, f"{base}/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_json(raw)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == " hello" * 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == body["usage"]["total_tokens"]


async def test_responses_json_and_stream(base: str, http: aiohttp.ClientSession) -> None:
    req = {"model": "gpt", "input": "Say hi", "instructions": "Be brief", "max_output_tokens": 6}
    status, body, _ = await post(http, f"{base}/v1/responses", req, x_mock_cached_tokens="1")
    assert status == 200 and body["object"] == "response" and body["status"] == "completed"
    item = body["output"][0]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0]["type"] == "output_text" and item["content"][0]["text"] == " hello" * 6
    prompt = count_tokens("Be brief\nSay hi")
    assert body["usage"] == {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 1, "cache_write_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + 6,
    }
    _, _, raw = await post(http, f"{base}/v1/responses", {**req, "stream": True})
    events = parse_sse(raw)
    names = [e for e, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 6,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    payloads = [json.loads(d) for _, d in events]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert payloads[-1]["response"]["usage"]["output_tokens"] == 6
    assert payloads[-1]["response"]["usage"]["input_tokens"] == prompt


async def test_embeddings(base: str, http: aiohttp.ClientSession) -> None:
    inputs = ["first input text", "second"]
    status, body, _ = await post(http, f"{base}/v1/embeddings", {"model": "emb", "input": inputs})
    assert status == 200 and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 8 for d in body["data"])
    n = sum(count_tokens(t) for t in inputs)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}


async def test_messages_json_and_stream(base: str, http: aiohttp.ClientSession) -> None:
    req = {"model": "claude", "max_tokens": 100, "system": "You are terse.", "messages": USER}
    prompt = count_tokens("You are terse.\n" + USER[0]["content"])
    hdrs = {"x_mock_cached_tokens": "2", "x_mock_cache_write_tokens": "3", "x_mock_output_tokens": "4"}
    status, body, _ = await post(http, f"{base}/v1/messages", req, **hdrs)
    assert status == 200 and body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": " hello" * 4}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"] == {
        "input_tokens": prompt - 5,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 2,
        "output_tokens": 4,
    }
    _, _, raw = await post(http, f"{base}/v1/messages", {**req, "stream": True}, **hdrs)
    events = parse_sse(raw)
    assert [e for e, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(d) for _, d in events]
    assert all(name == p["type"] for (name, _), p in zip(events, payloads, strict=True))
    start_usage = payloads[0]["message"]["usage"]
    assert start_usage == {**body["usage"], "output_tokens": 1}
    assert payloads[3]["delta"] == {"type": "text_delta", "text": " hello"}
    assert payloads[-2]["usage"]["output_tokens"] == 4
    assert payloads[-2]["delta"]["stop_reason"] == "end_turn"


async def test_errors_use_each_api_envelope(base: str, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, f"{base}/v1/messages", {"model": "c", "messages": USER})
    assert status == 400
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    status, body, _ = await post(http, f"{base}/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body, _ = await post(http, f"{base}/v1/chat/completions", {"messages": USER})
    assert status == 400 and body["error"]["param"] == "model"
    status, body, _ = await post(http, f"{base}/v1/messages", {"model": "c", "max_tokens": 5, "messages": USER}, x_mock_status="529")
    assert status == 529 and body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    req = {"model": "m", "messages": USER, "stream": True}
    status, body, _ = await post(http, f"{base}/v1/chat/completions", req, x_mock_status="500")
    assert status == 500 and body["error"]["type"] == "server_error"
    status, body, _ = await post(http, f"{base}/v1/chat/completions", req, x_mock_status="429")
    assert status == 429 and body["error"]["type"] == "rate_limit_error"


async def test_a_forced_error_can_say_when_to_retry(base: str, http: aiohttp.ClientSession) -> None:
    req = json.dumps({"model": "m", "messages": USER}).encode()
    hdrs = {"content-type": "application/json", "x-mock-status": "503"}
    async with http.post(f"{base}/v1/chat/completions", data=req, headers={**hdrs, "x-mock-retry-after-ms": "10"}) as r:
        assert r.status == 503 and r.headers["retry-after-ms"] == "10"
    async with http.post(f"{base}/v1/chat/completions", data=req, headers=hdrs) as r:
        assert r.status == 503 and "retry-after-ms" not in r.headers


async def test_stats_count_hits_and_tokens(base: str, http: aiohttp.ClientSession) -> None:
    chat = {"model": "a", "messages": USER, "max_tokens": 3}
    await post(http, f"{base}/v1/chat/completions", chat)
    await post(http, f"{base}/v1/chat/completions", {**chat, "stream": True})
    await post(http, f"{base}/v1/messages", {"model": "b", "messages": USER, "max_tokens": 2})
    await post(http, f"{base}/v1/chat/completions", chat, x_mock_status="500")
    await post(http, f"{base}/v1/embeddings", {"model": "e", "input": "abc"})
    async with http.get(f"{base}/stats") as r:
        stats = await r.json()
    assert stats == {
        "hits": 5,
        "by_path": {"/v1/chat/completions": 3, "/v1/messages": 1, "/v1/embeddings": 1},
        "by_model": {"a": 3, "b": 1, "e": 1},
        "in_flight": 0,
        "prompt_tokens": USER_TOKENS * 3 + count_tokens("abc"),
        "generation_tokens": 3 + 3 + 2,
        "disconnects": 0,
        "generated_after_disconnect": 0,
    }
    async with http.post(f"{base}/stats/reset") as r:
        assert (await r.json())["hits"] == 0
    async with http.get(f"{base}/stats") as r:
        assert (await r.json())["by_path"] == {}


async def test_hit_counted_on_arrival_and_in_flight(start_mock, http: aiohttp.ClientSession) -> None:
    base = await start_mock(token_delay_ms=20)
    task = asyncio.create_task(post(http, f"{base}/v1/chat/completions", {"model": "m", "messages": USER, "max_tokens": 10}))
    await asyncio.sleep(0.08)
    async with http.get(f"{base}/stats") as r:
        stats = await r.json()
    assert (stats["hits"], stats["in_flight"], stats["generation_tokens"]) == (1, 1, 0)
    await task
    async with http.get(f"{base}/stats") as r:
        stats = await r.json()
    assert (stats["in_flight"], stats["generation_tokens"]) == (0, 10)


async def test_streaming_really_streams(start_mock, http: aiohttp.ClientSession) -> None:
    base = await start_mock(token_delay_ms=20)
    req = {"model": "m", "messages": USER, "max_tokens": 10, "stream": True}
    t0 = time.perf_counter()
    first = None
    raw = b""
    async with http.post(f"{base}/v1/chat/completions", json=req) as r:
        async for chunk in r.content.iter_any():
            if first is None:
                first = time.perf_counter() - t0
            raw += chunk
    total = time.perf_counter() - t0
    assert len(sse_json(raw)) == 11
    assert total >= 0.19
    assert first is not None and first < total / 3


async def test_per_request_delay_and_first_byte_delay(start_mock, http: aiohttp.ClientSession) -> None:
    base = await start_mock(token_delay_ms=500)
    req = {"model": "m", "messages": USER, "max_tokens": 5}
    t0 = time.perf_counter()
    status, _, _ = await post(http, f"{base}/v1/chat/completions", req, x_mock_delay_ms="0", x_mock_first_byte_delay_ms="100")
    elapsed = time.perf_counter() - t0
    assert status == 200 and 0.09 <= elapsed < 0.4


async def test_healthz_and_backend_header(start_mock, http: aiohttp.ClientSession) -> None:
    base = await start_mock(name="gpu-node-7")
    async with http.get(f"{base}/healthz") as r:
        assert r.status == 200 and await r.text() == "ok"
        assert r.headers["x-mock-backend"] == "gpu-node-7"


async def test_client_disconnect_mid_stream(start_mock, http: aiohttp.ClientSession) -> None:
    base = await start_mock(token_delay_ms=20)
    req = {"model": "m", "messages": USER, "max_tokens": 50, "stream": True}
    async with http.post(f"{base}/v1/chat/completions", json=req) as r:
        await r.content.readline()
        await asyncio.sleep(0.07)
        r.close()
    for _ in range(50):
        async with http.get(f"{base}/stats") as s:
            stats = await s.json()
        if stats["in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert stats["in_flight"] == 0
    assert 0 < stats["generation_tokens"] < 50


async def test_stream_stops_when_client_leaves_and_says_so(start_mock, http: aiohttp.ClientSession) -> None:
    """A client that hangs up mid-stream stops the generation at the next token: the stream is
    counted as disconnected, with at most the token in progress generated for nobody."""
    base = await start_mock(token_delay_ms=20)
    req = {"model": "m", "messages": USER, "max_tokens": 50, "stream": True}
    await post(http, f"{base}/v1/chat/completions", {**req, "max_tokens": 3}, x_request_id="whole")
    async with http.post(f"{base}/v1/chat/completions", json=req, headers={"x-request-id": "cut"}) as r:
        await r.content.readline()
        await asyncio.sleep(0.07)
        r.close()
        left = time.time()
    for _ in range(50):
        async with http.get(f"{base}/stats") as s:
            stats = await s.json()
        if stats["disconnects"]:
            break
        await asyncio.sleep(0.02)
    async with http.get(f"{base}/stats/streams") as s:
        streams = {st["request_id"]: st for st in await s.json()}
    assert streams["whole"]["tokens"] == 3 and not streams["whole"]["disconnected"]
    cut = streams["cut"]
    assert cut["disconnected"] and 0 < cut["tokens"] < 10
    assert stats["disconnects"] == 1 and stats["generated_after_disconnect"] == cut["after_disconnect"] <= 1
    assert cut["ended_at"] - left < 0.1  # stopped within about one token of the hang-up
    assert stats["generation_tokens"] == 3 + cut["tokens"] + cut["after_disconnect"]
