"""What full duplex costs per chunk against STREAMED, through real Envoy.

The service switches every SSE answer to FULL_DUPLEX_STREAMED (the one mode in
which it can end a response mid-stream); before, it switched them to STREAMED.
This runs the same streamed calls through Envoy (shipped config) and the no-op
ext_proc (`bench/noop_ext_proc.py --sse-mode ...`, chunks passed unchanged) in
each mode, and straight to the mock backend as the floor, and reports:

- time to first body byte of a 1-token stream (p50 / p90 over `--ttfb-calls`);
- a fast stream (`--tokens` tokens, one every `--fast-delay-ms`): tokens/s,
  the ext_proc body messages Envoy sent per stream (it coalesces what arrives
  while a chunk is being processed), Envoy + ext_proc CPU per 1,000 messages;
- a paced stream (`--paced-tokens` at `--paced-delay-ms`): the mean gap between
  the chunks the client receives, and the wall time added per chunk over direct.

    python -m bench.stream_modes [--tokens 1000] [--fast-delay-ms 1] [--repeat 3] [--out bench/results-stream-modes.md]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.procs import Procs
from extproc.stack import envoy_binary, free_port, render_envoy_config, shipped_envoy_config, wait_connect, wait_http

PY = sys.executable
MODES = ("direct", "streamed", "duplex")


def body(tokens: int) -> dict[str, Any]:
    return {"model": "gpt-4o", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "go"}]}


def envoy_counter(admin: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^{name}$", timeout=5) as r:
        text = r.read().decode()
    return int(text.split(":")[1]) if ":" in text else 0


def stream(client: httpx.Client, url: str, tokens: int, delay_ms: float) -> tuple[float, list[float]]:
    """(time to first byte, arrival time of each read) of one streamed call, from the request."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    knobs = {"x-mock-delay-ms": str(delay_ms), "x-mock-output-tokens": str(tokens)}
    with client.stream("POST", url, json=body(tokens), headers=knobs) as r:
        r.raise_for_status()
        for _ in r.iter_raw():
            arrivals.append(time.perf_counter() - t0)
    return arrivals[0], arrivals


def measure(mode: str, url: str, procs: Procs, admin: int | None, a: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with httpx.Client(timeout=60) as client:
        for _ in range(5):  # warm-up: connections, ext_proc stream setup
            stream(client, url, 4, 0)
        ttfb = sorted(stream(client, url, 1, 0)[0] for _ in range(a.ttfb_calls))
        out["ttfb_p50_ms"] = 1000 * ttfb[len(ttfb) // 2]
        out["ttfb_p90_ms"] = 1000 * ttfb[int(len(ttfb) * 0.9)]
        msgs0 = envoy_counter(admin, "http.ingress.ext_proc.stream_msgs_sent") if admin else 0
        cpu0 = procs.cpu_by_role()
        durations = [stream(client, url, a.tokens, a.fast_delay_ms)[1][-1] for _ in range(a.repeat)]
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in procs.cpu_by_role().items()}
        msgs = (envoy_counter(admin, "http.ingress.ext_proc.stream_msgs_sent") - msgs0) if admin else 0
        # each stream: request headers, request body, response headers, then the body messages
        body_msgs = max(0, msgs / a.repeat - 3)
        out["tokens_per_s"] = a.tokens / statistics.median(durations)
        out["body_msgs_per_stream"] = body_msgs
        out["gateway_cpu_ms_per_1k_chunks"] = (
            1000 * (cpu.get("envoy", 0.0) + cpu.get("ext_proc", 0.0)) / (a.repeat * body_msgs) * 1000 if body_msgs else 0.0
        )
        paced = [stream(client, url, a.paced_tokens, a.paced_delay_ms)[1] for _ in range(a.repeat)]
        gaps = [statistics.mean(b - a_ for a_, b in itertools.pairwise(arr)) for arr in paced if len(arr) > 1]
        out["paced_gap_ms"] = 1000 * statistics.median(gaps)
        out["paced_total_ms"] = 1000 * statistics.median(arr[-1] for arr in paced)
    return out


def run_mode(mode: str, backend: int, a: argparse.Namespace, workdir: Path) -> dict[str, float]:
    if mode == "direct":
        return measure(mode, f"http://127.0.0.1:{backend}/v1/chat/completions", Procs(workdir), None, a)
    procs = Procs(workdir)
    grpc_addr, port, admin = f"127.0.0.1:{free_port()}", free_port(), free_port()
    try:
        noop = procs.spawn(f"noop-{mode}", "ext_proc", [PY, "-m", "bench.noop_ext_proc", "--grpc", grpc_addr, "--sse-mode", mode])
        wait_connect(grpc_addr, 30, noop)
        cfg = render_envoy_config(
            shipped_envoy_config(), listen_port=port, admin_port=admin, extproc=grpc_addr,
            backends={"backend": f"127.0.0.1:{backend}", "backend_small": f"127.0.0.1:{backend}"},
        )
        path = workdir / f"envoy-{mode}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        envoy = procs.spawn(f"envoy-{mode}", "envoy", [envoy_binary(), "-c", str(path), "--log-level", "warn",
                                                        "--concurrency", "1", "--disable-hot-restart"])
        wait_http(f"http://127.0.0.1:{admin}/ready", 60, envoy)
        return measure(mode, f"http://127.0.0.1:{port}/v1/chat/completions", procs, admin, a)
    finally:
        procs.stop()


def report(results: dict[str, dict[str, float]], a: argparse.Namespace) -> str:
    d = results["direct"]
    lines = [
        "# Streamed answers: FULL_DUPLEX_STREAMED vs STREAMED",
        "",
        f"`python -m bench.stream_modes --tokens {a.tokens} --fast-delay-ms {a.fast_delay_ms:g} --repeat {a.repeat}` on this machine: mock backend, Envoy 1.40 "
        "(shipped config, `--concurrency 1`), the no-op ext_proc passing every chunk unchanged; one call at a time.",
        "",
        "| mode | TTFB p50 ms | TTFB p90 ms | fast stream tokens/s | ext_proc body msgs / stream | Envoy+ext_proc CPU ms / 1k msgs "
        f"| paced gap ms ({a.paced_delay_ms:g} ms/token) | paced added ms / chunk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        added = (r["paced_total_ms"] - d["paced_total_ms"]) / a.paced_tokens
        msgs = f"{r['body_msgs_per_stream']:.0f}" if mode != "direct" else "-"
        cpu = f"{r['gateway_cpu_ms_per_1k_chunks']:.0f}" if mode != "direct" else "-"
        lines.append(
            f"| {mode} | {r['ttfb_p50_ms']:.2f} | {r['ttfb_p90_ms']:.2f} | {r['tokens_per_s']:.0f} | {msgs} | {cpu} "
            f"| {r['paced_gap_ms']:.2f} | {added:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1000, help="tokens of the fast stream")
    ap.add_argument("--fast-delay-ms", type=float, default=1.0, help="the fast stream's pacing (0 writes it all at once)")
    ap.add_argument("--repeat", type=int, default=3, help="streams per measurement")
    ap.add_argument("--ttfb-calls", type=int, default=40)
    ap.add_argument("--paced-tokens", type=int, default=100)
    ap.add_argument("--paced-delay-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, help="also write the table here")
    a = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stream-modes-"))
    procs = Procs(workdir)
    try:
        backend = free_port()
        mock = procs.spawn("mock", "backend", [PY, "-m", "extproc", "mock-backend", "--port", str(backend)])
        wait_http(f"http://127.0.0.1:{backend}/healthz", 30, mock)
        results = {mode: run_mode(mode, backend, a, workdir) for mode in MODES}
    finally:
        procs.stop()
    text = report(results, a)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
