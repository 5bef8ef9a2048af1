"""The replay backend: answers each request with a recorded exchange's status, headers and body bytes.

The client names the exchange with `x-replay-id`; Envoy forwards the header
to the upstream, which is this server. SSE bodies are written in chunks
(`x-replay-chunking`: `events` splits after each blank line, as providers
flush per event; `bytes:N` cuts every N bytes, through lines, JSON and UTF-8
sequences), each write followed by a short pause so the ext_proc STREAMED path
sees them as separate body chunks. `x-replay-linger-ms` holds the response
open that long after the last byte, the way a provider's terminating chunk
can lag its `data: [DONE]`. What the server received (after extproc rewrote
it) is kept per `x-replay-tag` for the test to inspect.

Runs in a thread with its own event loop so synchronous fixtures can own it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

CORPUS = Path(__file__).parent / "corpus"
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


def load_corpus() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(CORPUS.glob("*.json"))}


def response_bytes(ex: dict[str, Any]) -> bytes:
    r = ex["response"]
    return base64.b64decode(r["body_base64"]) if "body_base64" in r else r["body"].encode("utf-8")


def split_events(body: bytes) -> list[bytes]:
    """Chunks ending after each blank line (LF or CRLF framing); the tail, if any, last."""
    out, start, i = [], 0, 0
    while i < len(body):
        for sep in (b"\r\n\r\n", b"\n\n"):
            if body.startswith(sep, i):
                out.append(body[start : i + len(sep)])
                start = i = i + len(sep)
                break
        else:
            i += 1
    if start < len(body):
        out.append(body[start:])
    return out


def chunks(body: bytes, how: str) -> list[bytes]:
    if how.startswith("bytes:"):
        n = int(how.split(":", 1)[1])
        return [body[i : i + n] for i in range(0, len(body), n)]
    if how == "whole":
        return [body]
    return split_events(body)


@dataclass
class ReplayServer:
    exchanges: dict[str, dict[str, Any]] = field(default_factory=load_corpus)
    port: int = 0
    received: dict[str, dict[str, Any]] = field(default_factory=dict)
    # 1 ms keeps the pieces apart as well as 3 ms did (Envoy's ext_proc stream_msgs_sent for the
    # 13.5 kB oai-chat-sse-usage-n2 cut every 7 bytes: 1935 of 1938 pieces at 1 ms, 1922 at 3 ms,
    # 686 with no pause) at 40 % of the time; the corpus's bytes:7 cases sleep 25 s, not 76 s.
    pause_s: float = 0.001

    def start(self) -> ReplayServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def boot() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = self._runner.addresses[0][1]

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(boot())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="replay-backend", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("replay backend did not start")
        return self

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ident = request.headers.get("x-replay-id", "")
        ex = self.exchanges.get(ident)
        body = await request.read()
        tag = request.headers.get("x-replay-tag")
        if tag:
            self.received[tag] = {"path": request.path_qs, "headers": dict(request.headers), "body": body}
        if ex is None:
            return web.Response(status=599, text=f"no recorded exchange {ident!r}")
        status = ex["response"]["status"]
        headers = [(k, v) for k, v in ex["response"]["headers"] if k.lower() not in HOP_BY_HOP]
        payload = response_bytes(ex)
        is_sse = any(k.lower() == "content-type" and "text/event-stream" in v for k, v in headers)
        linger = float(request.headers.get("x-replay-linger-ms", "0")) / 1000
        if not is_sse and not linger:
            resp = web.Response(status=status, body=payload)
            for k, v in headers:
                resp.headers.add(k, v)
            return resp
        resp = web.StreamResponse(status=status)
        for k, v in headers:
            resp.headers.add(k, v)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for piece in chunks(payload, request.headers.get("x-replay-chunking", "events") if is_sse else "whole"):
            await resp.write(piece)
            await asyncio.sleep(self.pause_s)
        if linger:
            await asyncio.sleep(linger)
        await resp.write_eof()
        return resp
