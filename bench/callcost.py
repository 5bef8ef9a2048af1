"""What one metered JSON call costs the service in CPU, in process: no Envoy, no sockets.

Drives `ExternalProcessor.Process` (the real servicer: protobuf in, Session,
protobuf out) with the four messages Envoy sends for a metered OpenAI chat call
(request headers, buffered request body, response headers, buffered response
body), then waits for the background close, over a real store (SQLite by
default, `--store journal:` for the journal store, `--store redis://...` for
Redis; `sqlite:` / `journal:` with no path take a fresh temporary one). Reports CPU µs per call: the whole
process (event loop plus the store's thread) and the event-loop thread alone.
gRPC's own transport (HTTP/2 framing, grpclib) is not in it: the no-op
ext_proc's figures in results.md price that.

    python -m bench.callcost [--calls 2000] [--inflight 32] [--store journal: | redis://127.0.0.1:6379/0] [--cprofile]

`--inflight K` runs K calls at once (the service at concurrency K: the embedded
store commits the writes of one loop turn together).

For an instruction count that does not depend on what else runs on the
machine, run it under callgrind twice and subtract (start-up cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.callcost --calls 0
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m bench.callcost --calls 300
    (instructions per call = (Ir[300] - Ir[0]) / 300, Ir from valgrind's "Collected" line)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.app import open_store
from extproc.engine.budget import Engine
from extproc.policy.loader import PolicyHolder
from extproc.server.callers import CallerGate
from extproc.server.ext_proc import ExternalProcessor
from extproc.server.services import Services

from . import load
from .run import API_KEY, write_policy

RESPONSE = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 16}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 14, "completion_tokens": 16, "total_tokens": 30},
    },
    separators=(",", ":"),
).encode()


def _headers(pairs: list[tuple[str, str]], end_of_stream: bool = False) -> ep.HttpHeaders:
    msg = ep.HttpHeaders(end_of_stream=end_of_stream)
    for k, v in pairs:
        msg.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    return msg


def request(i: int, body: bytes) -> list[ep.ProcessingRequest]:
    """The request side Envoy sends for call `i` (its own x-request-id), with the headers Envoy adds."""
    req = [(":authority", "127.0.0.1:10000"), (":path", load.CHAT_PATH), (":method", "POST"), (":scheme", "http"),
           ("content-type", "application/json"), ("content-length", str(len(body))), ("authorization", f"Bearer {API_KEY}"),
           ("x-forwarded-proto", "http"), ("x-request-id", f"00000000-0000-4000-8000-{i:012d}")]
    return [ep.ProcessingRequest(request_headers=_headers(req)), ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))]


def messages(i: int) -> list[ep.ProcessingRequest]:
    """What Envoy sends for call `i`: its request (`request`), then a JSON answer."""
    resp = [(":status", "200"), ("content-type", "application/json"), ("content-length", str(len(RESPONSE))),
            ("date", "Wed, 02 Dec 2026 05:00:00 GMT"), ("server", "uvicorn"), ("x-envoy-upstream-service-time", "1")]
    return [
        *request(i, load.chat_body()),
        ep.ProcessingRequest(response_headers=_headers(resp)),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=RESPONSE, end_of_stream=True)),
    ]


class _Stream:
    """What `Process` uses of grpclib's server stream: the messages in (parsed from their wire bytes, as the
    transport does), the replies out (serialised, as the transport does), no metadata."""

    metadata = None

    def __init__(self, wire: list[bytes]) -> None:
        self.wire = wire
        self.sent: list[ep.ProcessingResponse] = []

    def __aiter__(self) -> _Stream:  # an iterator object, as grpclib's stream is (an async generator left
        return self  # unfinished would be finalized through the loop's self-pipe, which the real stream never is)

    async def __anext__(self) -> ep.ProcessingRequest:
        if not self.wire:
            raise StopAsyncIteration
        return ep.ProcessingRequest.FromString(self.wire.pop(0))

    async def send_message(self, message: ep.ProcessingResponse) -> None:
        message.SerializeToString()
        self.sent.append(message)


async def one_call(proc: ExternalProcessor, services: Services, i: int, *, wait: bool = True) -> list[ep.ProcessingResponse]:
    """One call's four messages; `wait`: and its background close (else the caller waits for them all)."""
    stream = _Stream([m.SerializeToString() for m in messages(i)])
    await proc.Process(stream)  # type: ignore[arg-type]
    out = stream.sent
    if wait and services.background:
        await asyncio.wait(list(services.background))
    return out


async def run_calls(proc: ExternalProcessor, services: Services, first: int, calls: int, inflight: int) -> None:
    """`calls` calls, `inflight` at a time (each of `inflight` lanes runs its share one after another)."""
    if inflight == 1:
        for i in range(first, first + calls):
            await one_call(proc, services, i)
        return

    async def lane(k: int) -> None:
        for i in range(first + k, first + calls, inflight):
            await one_call(proc, services, i, wait=False)

    await asyncio.gather(*(lane(k) for k in range(inflight)))
    while services.background:
        await asyncio.wait(list(services.background))


async def measure(store_url: str, calls: int, warmup: int, profile: cProfile.Profile | None, inflight: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        policy = write_policy(Path(tmp) / "policy.yaml")
        url = store_url or "sqlite:"
        if url in ("sqlite:", "journal:"):  # a fresh store: ids of an earlier run would replay
            url += f"{tmp}/callcost.db" if url == "sqlite:" else f"{tmp}/callcost"
        store = open_store(url)
        services = Services(PolicyHolder.from_file(policy), Engine(store))
        proc = ExternalProcessor(services, CallerGate(None, True))
        try:
            for i in range(warmup):
                out = await one_call(proc, services, i)
            if warmup:
                assert len(out) == 4 and not out[0].HasField("immediate_response"), out[0]
                names = [h.header.key for h in out[3].response_body.response.header_mutation.set_headers]
                assert "x-budget-cost-usd" in names, names
            cpu0, thr0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
            if profile is not None:
                profile.enable()
            await run_calls(proc, services, warmup, calls, inflight)
            if profile is not None:
                profile.disable()
            cpu, thr, wall = time.process_time() - cpu0, time.thread_time() - thr0, time.perf_counter() - wall0
        finally:
            await store.close()
    n = max(1, calls)
    return {"calls": calls, "inflight": inflight, "cpu_us_per_call": round(1e6 * cpu / n, 1), "loop_thread_cpu_us_per_call": round(1e6 * thr / n, 1),
            "wall_us_per_call": round(1e6 * wall / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--store", default="", help="a store URL (default: SQLite in a temporary directory; journal: for the journal store)")
    ap.add_argument("--cprofile", action="store_true", help="profile the measured calls (slower; shares, not absolute times)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--inflight", type=int, default=1, help="calls in flight at once (a service at that concurrency)")
    a = ap.parse_args()
    prof = cProfile.Profile() if a.cprofile else None
    print(json.dumps(asyncio.run(measure(a.store, a.calls, a.warmup, prof, a.inflight))))
    if prof is not None:
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(a.top)
        st.sort_stats("cumtime").print_stats(a.top)


if __name__ == "__main__":
    main()
