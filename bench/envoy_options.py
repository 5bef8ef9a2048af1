"""Does Envoy still honour `mode_override` with `send_body_without_waiting_for_header_response`?

Issue 14 asked whether the request body can be sent without waiting for the
headers reply (one blocking wait on the request side instead of two). Envoy
sends the body early only in STREAMED (or FULL_DUPLEX_STREAMED) body mode, and
with the option on it ignores every `mode_override`; extproc depends on those
overrides (unmetered and public routes skip the rest of the stream, flat routes
skip the bodies, SSE answers switch to STREAMED, non-2xx answers skip their
body). This checks it against the Envoy binary in use: the no-op ext_proc
answers the request headers with "skip everything else", and Envoy's counters
say how many messages each request still cost.

    python -m bench.envoy_options [--requests 10]
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


def messages_per_request(send_body_early: bool, requests: int) -> dict[str, float]:
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
        if send_body_early:  # the only body mode in which Envoy sends the body before the headers reply
            tc["processing_mode"]["request_body_mode"] = "STREAMED"
            tc["send_body_without_waiting_for_header_response"] = True
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
        for _ in range(requests):
            status, _, body = asyncio.run(load.one(f"http://127.0.0.1:{port}", body=load.chat_body(), headers={"Authorization": "Bearer x"}))
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json&filter=ext_proc").read()
        got = {s["name"].rsplit(".", 1)[-1]: s.get("value", 0) for s in json.loads(stats)["stats"] if "name" in s}
        return {k: got.get(k, 0) / requests for k in ("stream_msgs_sent", "stream_msgs_received")}
    finally:
        procs.stop()
        bench.shared.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10)
    a = ap.parse_args()
    for early in (False, True):
        m = messages_per_request(early, a.requests)
        what = "STREAMED body + send_body_without_waiting_for_header_response" if early else "shipped config (BUFFERED body)"
        print(f"{what}: {m['stream_msgs_sent']:g} messages to ext_proc per request after a 'skip the rest' mode_override "
              f"(1 = the override was honoured)")


if __name__ == "__main__":
    main()
