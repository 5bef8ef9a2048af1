"""Ending a streamed answer mid-way, through real Envoy and the mock backend.

The transport under test is the servicer's (`extproc.server.ext_proc.exchange`
and `Reply`): an SSE answer is switched to FULL_DUPLEX_STREAMED, and a body
reply with `end_stream` replaces the current chunk with a clean ending and ends
the response there. What decides *when* to cut is not under test: a small
session below cuts after the number of chunks the client names in
`x-test-cut-after` (the budget session decides that in production). Checked:
both SDKs finish without an exception on the synthetic ending, the client's
response ends within 100 ms of the cut, Envoy resets the upstream request and
the backend stops generating (tokens generated after the cut are reported);
and a JSON client whose call is streamed from the backend gets one JSON body,
whole or cut.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anthropic
import grpc
import openai
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from extproc.server.ext_proc import exchange
from extproc.server.reply import Reply
from extproc.stack import Stack

pytestmark = pytest.mark.integration

TOKEN_DELAY_MS = 20
CUT_AFTER = 5  # body chunks: the first carries the stream's head, each later one a token
UNCUT_TOKENS = 500  # uncut, a stream would go on 10 s past the cut: every bound below is far from that
PROMPT_MS = 1000  # "promptly": under a loaded CI the client's and the backend's own scheduling add to this

CHAT_END = (
    b'data: {"id":"chatcmpl-cut","object":"chat.completion.chunk","created":0,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}]}\n\n'
    b": budget_exhausted\n\ndata: [DONE]\n\n"
)
MESSAGES_END = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},'
    b'"usage":{"output_tokens":%d}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def events(chunk: bytes) -> list[dict[str, Any]]:
    out = []
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {"):
            out.append(json.loads(line[6:]))
    return out


def tokens_in(chunk: bytes) -> int:
    """Tokens the mock generated for this chunk: one per content delta (chat) or text delta (messages)."""
    n = 0
    for e in events(chunk):
        if e.get("type") == "content_block_delta" or any(c.get("delta", {}).get("content") for c in e.get("choices", [])):
            n += 1
    return n


class CutSession:
    """Marks each request routable, and cuts the answer after `x-test-cut-after` chunks. A JSON
    call is asked of the backend as a stream and answered as one JSON body, assembled here."""

    def __init__(self, calls: dict[str, dict[str, Any]]) -> None:
        self.calls = calls
        self.call: dict[str, Any] = {}
        self.cut_after = 0
        self.json = False
        self.chunks = 0
        self.text = ""
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    async def request_headers(self, headers: Mapping[str, str], end_of_stream: bool, peer_id: str | None = None) -> Reply:
        self.call = self.calls.setdefault(headers.get("x-test-call", ""), {})
        self.call.update(request_id=headers.get("x-request-id"), path=headers.get(":path"), tokens_seen=0)
        self.cut_after = int(headers.get("x-test-cut-after", "0"))
        return Reply(set_headers=[("x-extproc-route", "metered")], clear_route_cache=True)

    async def request_body(self, body: bytes) -> Reply:
        req = json.loads(body)
        if req.get("stream"):
            return Reply()
        self.json = True  # the client wants JSON: ask the backend for a stream
        new = json.dumps({**req, "stream": True, "stream_options": {"include_usage": True}}).encode()
        return Reply(body=new, set_headers=[("content-length", str(len(new)))])

    async def response_headers(self, headers: Mapping[str, str]) -> Reply:
        if "text/event-stream" not in headers.get("content-type", ""):
            return Reply()
        if self.json:
            return Reply(set_headers=[("content-type", "application/json")], stream_response=True)
        return Reply(stream_response=True)

    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Reply:
        self.chunks += 1
        self.call["tokens_seen"] += tokens_in(chunk)
        cut = self.chunks == self.cut_after and not end_of_stream
        if cut:
            self.call["cut_at"] = time.time()
        if self.json:
            self._assemble(chunk)
            if cut or end_of_stream:
                return Reply(body=self._json("length" if cut else self.finish), end_stream=cut)
            return Reply(body=b"")  # withheld: the client gets one JSON body
        if not cut:
            return Reply()
        if "/v1/messages" in self.call["path"]:
            return Reply(body=MESSAGES_END % self.call["tokens_seen"], end_stream=True)
        return Reply(body=CHAT_END, end_stream=True)

    def after_reply(self) -> None:  # nothing kept for later: every decision here is in the reply
        pass

    def _assemble(self, chunk: bytes) -> None:
        for e in events(chunk):
            for c in e.get("choices", []):
                self.text += c.get("delta", {}).get("content") or ""
                self.finish = c.get("finish_reason") or self.finish
            self.usage = e.get("usage") or self.usage

    def _json(self, finish: str | None) -> bytes:
        body = {
            "id": "chatcmpl-assembled",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": finish}],
        }
        if self.usage:
            body["usage"] = self.usage
        return json.dumps(body).encode()


class CutServicer(epg.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.calls: dict[str, dict[str, Any]] = {}

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for resp in exchange(CutSession(self.calls), request_iterator):
            yield resp


class ServerThread:
    """The servicer on grpc.aio in a thread of its own, so the tests can use the sync SDKs."""

    def __init__(self, servicer: CutServicer, addr: str) -> None:
        self.servicer, self.addr = servicer, addr
        self.ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        server = grpc.aio.server()
        epg.add_ExternalProcessorServicer_to_server(self.servicer, server)
        server.add_insecure_port(self.addr)
        await server.start()
        self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
        self.ready.set()
        await self.stop_event.wait()
        await server.stop(0)

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    stack = Stack(policy="", token_delay_ms=TOKEN_DELAY_MS, backends=("backend",), workdir=tmp_path_factory.mktemp("cut"))
    servicer = CutServicer()
    server = ServerThread(servicer, stack.grpc)
    try:
        stack.start_backends()
        stack.backend_addrs["backend_small"] = f"127.0.0.1:{stack.backend_ports['backend']}"
        stack.start_envoy()  # before the gRPC server's threads exist: no fork() beside them
        server.start()
        yield stack, servicer
    finally:
        stack.stop()
        if server.ready.is_set():
            server.stop()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def envoy_stat(stack: Stack, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/stats?filter=^{name}$", timeout=5) as r:
        text = r.read().decode()
    return int(text.split(":")[1]) if ":" in text else 0


def backend_stream(stack: Stack, request_id: str) -> dict[str, Any]:
    """The mock's record of one stream, once it has stopped generating."""
    deadline = time.monotonic() + 3
    while True:
        streams = {s["request_id"]: s for s in get_json(f"{stack.backend_url()}/stats/streams")}
        if request_id in streams or time.monotonic() > deadline:
            return streams[request_id]
        time.sleep(0.02)


def check_cut(stack: Stack, call: dict[str, Any], client_end: float, resets_before: int) -> None:
    """The client's response ended promptly after the cut (on a quiet machine within ~10 ms), not
    when the backend would have finished; Envoy reset the upstream request and the backend stopped
    generating within a few tokens of the cut (on a quiet machine, one)."""
    end_ms = 1000 * (client_end - call["cut_at"])
    rec = backend_stream(stack, call["request_id"])
    after_cut = rec["tokens"] + rec["after_disconnect"] - call["tokens_seen"]
    stop_ms = 1000 * (rec["ended_at"] - call["cut_at"])
    print(f"\n{call['path']}: client saw the end {end_ms:.1f} ms after the cut; backend stopped {stop_ms:.0f} ms "
          f"after it, having generated {after_cut} token(s) after it ({TOKEN_DELAY_MS} ms per token)")
    assert end_ms < PROMPT_MS
    assert rec["disconnected"]
    assert after_cut <= PROMPT_MS // TOKEN_DELAY_MS and stop_ms < PROMPT_MS
    assert envoy_stat(stack, "cluster.backend.upstream_cx_destroy_local_with_active_rq") > resets_before


def test_openai_stream_cut_ends_clean_and_stops_the_backend(env) -> None:
    stack, servicer = env
    call = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test", max_retries=0)
    resets = envoy_stat(stack, "cluster.backend.upstream_cx_destroy_local_with_active_rq")
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=UNCUT_TOKENS,
        stream=True,
        extra_headers={"x-test-call": call, "x-test-cut-after": str(CUT_AFTER), "x-mock-output-tokens": str(UNCUT_TOKENS)},
    )
    chunks = list(stream)
    end = time.time()
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (CUT_AFTER - 1) + ["length"]
    assert sum(1 for c in chunks if c.choices[0].delta.content) == CUT_AFTER - 2  # the head, then tokens
    check_cut(stack, servicer.calls[call], end, resets)


def test_anthropic_stream_cut_ends_clean_and_stops_the_backend(env) -> None:
    stack, servicer = env
    call = uuid.uuid4().hex
    client = anthropic.Anthropic(base_url=stack.url, api_key="sk-ant-test", max_retries=0)
    resets = envoy_stat(stack, "cluster.backend.upstream_cx_destroy_local_with_active_rq")
    with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=UNCUT_TOKENS,
        messages=[{"role": "user", "content": "count"}],
        extra_headers={"x-test-call": call, "x-test-cut-after": str(CUT_AFTER), "x-mock-output-tokens": str(UNCUT_TOKENS)},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    end = time.time()
    assert final.stop_reason == "max_tokens"
    assert text and final.usage.output_tokens == servicer.calls[call]["tokens_seen"]
    check_cut(stack, servicer.calls[call], end, resets)


def test_uncut_stream_passes_whole(env) -> None:
    """Full duplex passes every chunk on when the session changes nothing."""
    stack = env[0]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-test-call": uuid.uuid4().hex},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_json_client_served_from_a_stream(env) -> None:
    """A non-streaming SDK call, streamed from the backend: the client gets one JSON body, with the
    content type rewritten and no chunk of SSE leaking through."""
    stack = env[0]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count"}], max_tokens=6,
        extra_headers={"x-test-call": uuid.uuid4().hex},
    )
    assert raw.headers["content-type"] == "application/json" and "content-length" not in raw.headers
    done = raw.parse()
    assert done.object == "chat.completion" and done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 6
    assert len(done.choices[0].message.content or "") > 0


def test_json_client_cut_mid_stream(env) -> None:
    """The same JSON call cut after a few chunks: one JSON body with what was generated so far, and
    the backend stops."""
    stack, servicer = env
    call = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test", max_retries=0)
    resets = envoy_stat(stack, "cluster.backend.upstream_cx_destroy_local_with_active_rq")
    done = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count"}], max_tokens=UNCUT_TOKENS,
        extra_headers={"x-test-call": call, "x-test-cut-after": str(CUT_AFTER), "x-mock-output-tokens": str(UNCUT_TOKENS)},
    )
    end = time.time()
    assert done.object == "chat.completion" and done.choices[0].finish_reason == "length"
    assert done.choices[0].message.content  # the tokens that passed before the cut
    check_cut(stack, servicer.calls[call], end, resets)
