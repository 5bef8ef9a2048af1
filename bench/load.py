"""A lean closed-loop HTTP/1.1 load generator (asyncio Protocol, keep-alive).

One client for every configuration of the benchmark, so differences in the
numbers come from what sits between the client and the mock backend, never
from the client. Each of `concurrency` connections sends a request, waits for
the whole response, and sends the next one, until the time box ends.

It is deliberately small: requests are pre-built bytes and the response parser
only understands what the gateways send (Content-Length or chunked bodies), so
the client spends as little of the machine's two cores as it can. Per request
it records the total latency and the time to the first byte of the body
(TTFB; for an SSE stream that is the first event, which is what a user sees).

    python -m bench.load http://127.0.0.1:10000 -c 32 -d 5 [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CHAT_PATH = "/v1/chat/completions"


def chat_body(*, model: str = "gpt-4o", stream: bool = False, max_tokens: int = 16) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello sixteen times, please."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def build_request(url: str, body: bytes, headers: dict[str, str], path: str = CHAT_PATH) -> bytes:
    u = urlsplit(url)
    lines = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Conn(asyncio.Protocol):
    """One keep-alive connection; `request()` sends pre-built bytes and parses one response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[tuple[int, float, bytes]] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.state = 0  # 0 head, 1 content-length body, 2 chunked body, 3 until close
        self.status = 0
        self.length = 0
        self.first_body = 0.0
        self.body = bytearray()
        self.keep_body = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self.state == 3:
                self.done.set_result((self.status, self.first_body, bytes(self.body)))
            else:
                self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def request(self, data: bytes, keep_body: bool) -> asyncio.Future[tuple[int, float, bytes]]:
        assert self.transport is not None
        self._reset()
        self.keep_body = keep_body
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.buf += data
        now = time.perf_counter()
        while self.done is not None and not self.done.done():
            if self.state == 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).split(b"\r\n")
                del self.buf[: end + 4]
                self.status = int(head[0].split(b" ", 2)[1])
                chunked, length = False, None
                for line in head[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value.strip())
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    self.state = 2
                elif length is not None:
                    self.state, self.length = 1, length
                    if length == 0:
                        self._finish()
                        return
                else:
                    self.state = 3
                continue
            if self.buf and not self.first_body:
                self.first_body = now
            if self.state == 1:
                if len(self.buf) < self.length:
                    return
                if self.keep_body:
                    self.body += self.buf[: self.length]
                del self.buf[: self.length]
                self._finish()
                return
            if self.state == 2:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(self.buf[:eol]).split(b";", 1)[0], 16)
                if size == 0:
                    tail = self.buf.find(b"\r\n\r\n", eol)  # no trailers are expected: "0\r\n\r\n"
                    if tail < 0:
                        return
                    del self.buf[: tail + 4]
                    self._finish()
                    return
                if len(self.buf) < eol + 2 + size + 2:
                    return
                if self.keep_body:
                    self.body += self.buf[eol + 2 : eol + 2 + size]
                del self.buf[: eol + 2 + size + 2]
                continue
            if self.state == 3:
                if self.keep_body:
                    self.body += self.buf
                self.buf.clear()
                return

    def _finish(self) -> None:
        assert self.done is not None
        self.done.set_result((self.status, self.first_body or time.perf_counter(), bytes(self.body)))


@dataclass
class Result:
    """Latencies in milliseconds of the requests that completed inside the time box."""

    concurrency: int
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    first_error: str = ""
    client_cpu_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def pct(self, p: float, which: str = "latency") -> float:
        data = sorted(self.latencies_ms if which == "latency" else self.ttfb_ms)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        return data[k]

    def summary(self) -> dict[str, float | int | str]:
        return {
            "concurrency": self.concurrency,
            "requests": self.ok,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.pct(50), 3),
            "p99_ms": round(self.pct(99), 3),
            "ttfb_p50_ms": round(self.pct(50, "ttfb"), 3),
            "ttfb_p99_ms": round(self.pct(99, "ttfb"), 3),
            "client_cpu_share": round(self.client_cpu_s / self.duration_s, 3) if self.duration_s else 0.0,
            "first_error": self.first_error[:300],
        }


async def _open(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, host, port)
    return proto


async def run(
    url: str,
    *,
    body: bytes,
    headers: dict[str, str] | None = None,
    concurrency: int = 1,
    duration_s: float = 5.0,
    path: str = CHAT_PATH,
    timeout_s: float = 30.0,
) -> Result:
    """Closed loop for `duration_s`; only requests that *finish* inside the box are counted."""
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    data = build_request(url, body, headers or {}, path)
    res = Result(concurrency, duration_s)
    conns = [await _open(host, port) for _ in range(concurrency)]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker(i: int) -> None:
        conn = conns[i]
        while True:
            now = time.perf_counter()
            if now >= deadline:
                return
            if conn.closed:
                conn = await _open(host, port)
                conns[i] = conn
            t0 = time.perf_counter()
            try:
                status, first, _raw = await asyncio.wait_for(conn.request(data, keep_body=False), timeout_s)
            except (TimeoutError, OSError, ConnectionError, ValueError) as e:
                res.errors += 1
                res.first_error = res.first_error or f"{type(e).__name__}: {e}"
                if conn.transport is not None:
                    conn.transport.close()
                conn.closed = True
                continue
            t1 = time.perf_counter()
            res.statuses[status] = res.statuses.get(status, 0) + 1
            if t1 > deadline:
                return
            if status != 200:
                res.errors += 1
                if not res.first_error:
                    res.first_error = f"HTTP {status}"
                continue
            res.latencies_ms.append((t1 - t0) * 1000)
            res.ttfb_ms.append((first - t0) * 1000)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    res.client_cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return res


async def one(url: str, *, body: bytes, headers: dict[str, str] | None = None, path: str = CHAT_PATH) -> tuple[int, dict[str, str], bytes]:
    """One request with its response headers and body (for the pre-flight checks)."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(build_request(url, body, {**(headers or {}), "Connection": "close"}, path))
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(-1), 30)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if "chunked" in hdrs.get("transfer-encoding", ""):
        out, pos = bytearray(), 0
        while True:
            eol = rest.index(b"\r\n", pos)
            size = int(rest[pos:eol].split(b";")[0], 16)
            if size == 0:
                break
            out += rest[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
        rest = bytes(out)
    return status, hdrs, rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("-c", "--concurrency", type=int, default=1)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--key", default="sk-bench")
    ap.add_argument("--token-delay-ms", type=float, default=None, help="x-mock-delay-ms for the mock backend")
    a = ap.parse_args()
    headers = {"Authorization": f"Bearer {a.key}"}
    if a.token_delay_ms is not None:
        headers["x-mock-delay-ms"] = f"{a.token_delay_ms:g}"
    r = asyncio.run(run(a.url, body=chat_body(stream=a.stream), headers=headers, concurrency=a.concurrency, duration_s=a.duration))
    print(json.dumps({**r.summary(), "statuses": r.statuses}, indent=2))


if __name__ == "__main__":
    main()
