"""Does Envoy still honour `mode_override` with `send_body_without_waiting_for_header_response`?

Issue 14 asked whether the request body can be sent without waiting for the
headers reply (one blocking wait on the request side instead of two). Envoy
sends the body early only in STREAMED (or FULL_DUPLEX_STREAMED) body mode, and
with the option on it ignores every `mode_override`; extproc depends on those
overrides (unmetered and public routes skip the rest of the stream, flat routes
skip the bodies, SSE answers switch to STREAMED, non-2xx answers skip their
body). Envoy's source says the same of a FULL_DUPLEX_STREAMED body mode in the
filter config, which the third variant checks. This checks it against the
Envoy binary in use: the no-op ext_proc
answers the request headers with "skip everything else", and Envoy's counters
say how many messages each request still cost.

    python -m bench.envoy_options [--requests 10] [--variant early-body]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request
from typing import Any

import yaml

from extproc.stack import envoy_binary, free_port

from . import load
from .procs import Procs, wait_connect, wait_http
from .run import PY, Bench, Spec, envoy_config


def _ext_proc_filter(cfg: dict[str, Any]) -> dict[str, Any]:
    for lst in cfg["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for hf in f["typed_config"].get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.ext_proc":
                        return dict(hf["typed_config"])
    raise RuntimeError("no ext_proc filter in envoy/envoy.yaml")


VARIANTS = {
    "shipped": ("shipped config (BUFFERED request body)", {}),
    "early-body": ("STREAMED request body + send_body_without_waiting_for_header_response",
                   {"send_body_without_waiting_for_header_response": True, "processing_mode": {"request_body_mode": "STREAMED"}}),
    "full-duplex-response": ("response_body_mode FULL_DUPLEX_STREAMED in the filter config (trailers sent, as it requires)",
                             {"processing_mode": {"response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND"}}),
}


def messages_per_request(variant: str, requests: int) -> dict[str, Any]:
    bench = Bench(argparse.Namespace(duration=1, stream_duration=1, warmup=0))
    procs = Procs(bench.workdir)
    bench.start_backend()
    try:
        addr = f"127.0.0.1:{free_port()}"
        p = procs.spawn("noop", "ext_proc", [PY, "-m", "bench.noop_ext_proc", "--one-round-trip", "--grpc", addr])
        wait_connect(addr, 30, p)
        port, admin = free_port(), free_port()
        cfg = envoy_config(Spec("options", "options", "envoy", "noop-1rt"), listen_port=port, admin_port=admin,
                           backend=f"127.0.0.1:{bench.backend_port}", extproc_addrs=[addr])
        tc = _ext_proc_filter(cfg)
        for k, v in VARIANTS[variant][1].items():
            tc[k] = {**tc[k], **v} if isinstance(v, dict) else v
        for lst in cfg["static_resources"]["listeners"]:
            for chain in lst["filter_chains"]:
                for f in chain["filters"]:
                    for hf in f["typed_config"].get("http_filters", []):
                        if hf["name"] == "envoy.filters.http.ext_proc":
                            hf["typed_config"] = tc
        path = bench.workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg))
        e = procs.spawn("envoy", "envoy", [envoy_binary(), "-c", str(path), "--log-level", "warn", "--concurrency", "1",
                                            "--disable-hot-restart"])
        wait_http(f"http://127.0.0.1:{admin}/ready", 60, e)
        statuses: dict[int, int] = {}
        for _ in range(requests):  # a non-200 is reported, not fatal: the message count is the question
            status, _, _ = asyncio.run(load.one(f"http://127.0.0.1:{port}", body=load.chat_body(), headers={"Authorization": "Bearer x"}))
            statuses[status] = statuses.get(status, 0) + 1
        stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json&filter=ext_proc").read()
        got = {s["name"].rsplit(".", 1)[-1]: s.get("value", 0) for s in json.loads(stats)["stats"] if "name" in s}
        return {**{k: got.get(k, 0) / requests for k in ("stream_msgs_sent", "stream_msgs_received")}, "statuses": statuses}
    finally:
        procs.stop()
        bench.shared.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--variant", choices=list(VARIANTS), action="append", help="default: all")
    a = ap.parse_args()
    for variant in a.variant or list(VARIANTS):
        m = messages_per_request(variant, a.requests)
        print(f"{VARIANTS[variant][0]}: {m['stream_msgs_sent']:g} messages to ext_proc per request after a 'skip the rest' "
              f"mode_override (1 = the override was honoured); client saw {m['statuses']}")


if __name__ == "__main__":
    main()
