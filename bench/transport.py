"""The filter process's transport cost per call: syscalls, context switches, CPU, and the c=1 latency.

Starts the benchmark's stack (mock backend, Envoy with the shipped config, one
filter process on a Unix socket: the no-op ext_proc on grpc.aio, on grpclib or
on extproc's own gRPC server, or `extproc serve` with the embedded store), drives JSON at concurrency 32 and attaches `perf
stat` to the filter process for the measured window, then measures c=1.
Variants run the filter with extra `grpc.aio.server` options (patched in by a
wrapper process; they matter to the grpc.aio no-op only) and alternate `--rounds` times, since the machine may be shared.
Syscalls and context switches per call do not depend on what else runs on the
machine; CPU-ms per call does (a little). To compare two commits of extproc,
run it in a checkout of each, alternately (bench/optimisations.md).

    python -m bench.transport [--filter extproc] [--seconds 5] [--rounds 3]
        [--variant 'bdp-off={"grpc.http2.bdp_probe": 0}'] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import runpy
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import load
from .run import HERE, PY, Spec, one_stack

DEFAULT_VARIANTS = ["default={}", 'bdp-off={"grpc.http2.bdp_probe": 0}']


def _wrapped(argv: list[str], options: dict[str, Any]) -> list[str]:
    """`argv` (PY -m module ...) run by this module's --wrap, which adds `options` to every grpc.aio.server."""
    assert argv[1] == "-m"
    return [PY, "-m", "bench.transport", "--wrap", json.dumps(options), argv[2], *argv[3:]]


def _wrap(options_json: str, module: str, args: list[str]) -> None:
    import grpc.aio

    extra = list(json.loads(options_json).items())
    real = grpc.aio.server

    def server(*a: Any, options: Any = None, **kw: Any) -> Any:
        return real(*a, options=[*(options or []), *extra], **kw)

    grpc.aio.server = server  # type: ignore[assignment]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _perf_counts(pid: int, seconds: float, run_load: Any) -> tuple[dict[str, int], Any]:
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        result = run_load()
    finally:
        perf.send_signal(2)
        _, err = perf.communicate(timeout=30)
    counts: dict[str, int] = {}
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            counts[parts[2]] = int(parts[0])
    return counts, result


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(filter_: str, name: str, options: dict[str, Any], seconds: float) -> dict[str, float]:
    spec = Spec(f"transport-{name}", name, "envoy", filter_, "sqlite", "uds", 1)
    with one_stack(spec, filter_argv=lambda argv: _wrapped(argv, options)) as (bench, procs, url):
        body, headers = load.chat_body(), bench.headers(False)
        asyncio.run(load.run(url, body=body, headers=headers, concurrency=32, duration_s=1.0))
        pid = next(p.pid for _, role, p in procs.procs if role == "ext_proc")
        cpu0 = _cpu_s(pid)
        counts, r = _perf_counts(pid, seconds, lambda: asyncio.run(
            load.run(url, body=body, headers=headers, concurrency=32, duration_s=seconds)))
        cpu = _cpu_s(pid) - cpu0
        n = max(1, r.ok)
        c1 = asyncio.run(load.run(url, body=body, headers=headers, concurrency=1, duration_s=seconds))
        return {"rps": r.rps, "calls": n, "cpu_ms": 1000 * cpu / n, "syscalls": counts.get("raw_syscalls:sys_enter", 0) / n,
                "cswitches": counts.get("context-switches", 0) / n, "c1_p50_ms": c1.pct(50)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--wrap":
        _wrap(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", choices=["noop", "noop-grpclib", "noop-own", "extproc"], default="noop",
                    help="noop: on grpc.aio; noop-grpclib / noop-own: on grpclib / on extproc's gRPC server")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", help="name=JSON object of grpc server options (repeatable)")
    a = ap.parse_args()
    os.chdir(HERE.parent)
    variants = [(v.split("=", 1)[0], json.loads(v.split("=", 1)[1])) for v in (a.variant or DEFAULT_VARIANTS)]
    got: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    for _ in range(a.rounds):
        for name, opts in variants:
            got[name].append(measure(a.filter, name, opts, a.seconds))
            print(name, {k: round(v, 3) for k, v in got[name][-1].items()}, file=sys.stderr, flush=True)
    print(f"| {a.filter} variant | c=32 rps | service CPU-ms per call | syscalls per call | context switches per call | c=1 p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in got.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {name} | {med['rps']:.0f} | {med['cpu_ms']:.3f} | {med['syscalls']:.1f} | {med['cswitches']:.1f} | {med['c1_p50_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
