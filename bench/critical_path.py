"""What Envoy waits for: the service's time per ext_proc message of one metered call, in process.

At c=1 a call's added latency is Envoy's round trips plus, for each of the four
messages it waits on, the service's work from the message in to its reply out.
Work done after a reply (the settle booked in `close`, the decision log in
`after_reply`) costs CPU but no latency. This drives the real servicer
(`ExternalProcessor.Process`: protobuf in, `Session`, protobuf out) over a real
store, as bench/callcost.py does, and reports per message the median thread CPU
time (µs) from the message handed over to its reply sent, and the background
close after the stream: for a JSON call (request headers, request body, response
headers, response body) and with `--stream` for an SSE call (the first chunk is
what a stream's time to first byte waits on). Thread CPU, not wall time: the
machine is shared, and a descheduled process is not the service's cost.

    python -m bench.critical_path [--store journal: | redis://...] [--stream] [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.app import open_store
from extproc.engine.budget import Engine
from extproc.mock_backend import generate
from extproc.mock_backend.usage import Usage
from extproc.policy.loader import PolicyHolder
from extproc.server.callers import CallerGate
from extproc.server.ext_proc import ExternalProcessor
from extproc.server.services import Services

from . import callcost, load
from .run import write_policy

JSON_NAMES = ["request headers", "request body", "response headers", "response body"]
SSE_NAMES = ["request headers", "request body", "response headers", "first chunk"]


def sse_messages(i: int) -> list[ep.ProcessingRequest]:
    """What Envoy sends for an SSE call: the request, SSE response headers, then the mock's chunks."""
    resp = [(":status", "200"), ("content-type", "text/event-stream"), ("date", "Wed, 02 Dec 2026 05:00:00 GMT")]
    plan = generate.chat_stream(id="chatcmpl-bench", created=1, model="gpt-4o", usage=Usage(prompt=14, output=16), include_usage=True)
    out = [*callcost.request(i, load.chat_body(stream=True)), ep.ProcessingRequest(response_headers=callcost._headers(resp))]
    chunks = [plan.head, *plan.steps]
    out += [ep.ProcessingRequest(response_body=ep.HttpBody(body=c)) for c in chunks]
    out.append(ep.ProcessingRequest(response_body=ep.HttpBody(body=plan.tail, end_of_stream=True)))
    return out


class _TimedStream(callcost._Stream):
    """callcost's stream, timing each message from handed over to its reply sent (thread CPU)."""

    def __init__(self, wire: list[bytes], times: dict[int, list[float]]) -> None:
        super().__init__(wire)
        self.times, self.k, self.t0 = times, 0, 0.0

    async def __anext__(self) -> ep.ProcessingRequest:
        if not self.wire:
            raise StopAsyncIteration
        msg = ep.ProcessingRequest.FromString(self.wire.pop(0))
        self.t0 = time.thread_time()
        return msg

    async def send_message(self, message: ep.ProcessingResponse) -> None:
        message.SerializeToString()
        self.times[self.k].append(time.thread_time() - self.t0)
        self.k += 1


async def measure(store_url: str, stream: bool, calls: int, rounds: int, warmup: int = 300) -> dict[str, Any]:
    make = sse_messages if stream else callcost.messages
    names = SSE_NAMES if stream else JSON_NAMES
    with tempfile.TemporaryDirectory() as tmp:
        policy = write_policy(Path(tmp) / "policy.yaml")
        url = store_url or "sqlite:"
        if url in ("sqlite:", "journal:"):
            url += f"{tmp}/cp.db" if url == "sqlite:" else f"{tmp}/cp"
        store = open_store(url)
        services = Services(PolicyHolder.from_file(policy), Engine(store))
        proc = ExternalProcessor(services, CallerGate(None, True))
        per_round: list[dict[str, float]] = []
        i = 0
        try:
            for r in range(rounds + 1):  # round 0 warms up
                times: dict[int, list[float]] = defaultdict(list)
                closes: list[float] = []
                for _ in range(warmup if r == 0 else calls):
                    s = _TimedStream([m.SerializeToString() for m in make(i)], times)
                    i += 1
                    await proc.Process(s)  # type: ignore[arg-type]
                    t0 = time.thread_time()
                    if services.background:  # the stream's close: booking the settle
                        await asyncio.wait(list(services.background))
                    closes.append(time.thread_time() - t0)
                if r:
                    row = {names[k]: statistics.median(times[k]) * 1e6 for k in range(4)}
                    row["sum (Envoy waits)"] = sum(row.values())
                    row["close (after the last reply)"] = statistics.median(closes) * 1e6
                    per_round.append(row)
        finally:
            await store.close()
    return {k: round(statistics.median(r[k] for r in per_round), 1) for k in per_round[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="", help="a store URL (default: SQLite in a temporary directory; journal: for the journal store)")
    ap.add_argument("--stream", action="store_true", help="an SSE call (the first chunk instead of the response body)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="the median of the rounds' medians is reported")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(measure(a.store, a.stream, a.calls, a.rounds))))


if __name__ == "__main__":
    main()
