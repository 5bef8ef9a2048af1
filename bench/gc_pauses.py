"""How long does the cyclic garbage collector stop `extproc serve` under load?

Starts the benchmark's stack (mock backend, Envoy with the shipped config,
`extproc serve` on a Unix socket) with the service wrapped so that every
collection is logged: its generation and the CPU time of the collecting thread
(thread_time, so a busy machine does not inflate it). Drives JSON at
concurrency 32 and reports, for the collections during the load only, how many
of each generation ran, their total and their longest. A full (generation 2)
collection walks every tracked object the process holds, and every call in
flight waits for it: what long-lived state holds (caches, logs) decides its
length.

    python -m bench.gc_pauses [--store sqlite|journal|redis] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import load
from .run import HERE, PY, Spec, one_stack


def _wrap(log_path: str, args: list[str]) -> None:
    """Run `python -m extproc ...` with a gc callback appending `generation cpu_ms t_s` lines to `log_path`."""
    out = open(log_path, "a", buffering=1)  # noqa: SIM115  # open for the life of the process
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            out.write(f"{info['generation']} {(time.thread_time() - started[0]) * 1000:.3f} {time.time():.3f}\n")

    gc.callbacks.append(on_gc)
    sys.argv = ["extproc", *args]
    runpy.run_module("extproc", run_name="__main__", alter_sys=True)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--wrap":
        _wrap(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "journal", "redis"], default="sqlite")
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    os.chdir(HERE.parent)
    log_path = Path(tempfile.mkdtemp(prefix="extproc-gc-")) / "gc.log"
    spec = Spec("gc", "gc pauses", "envoy", "extproc", a.store, "uds", 1)
    # argv is [PY, "-m", "extproc", ...]: the same command, run through _wrap
    with one_stack(spec, filter_argv=lambda argv: [PY, "-m", "bench.gc_pauses", "--wrap", str(log_path), *argv[3:]]) as (
        bench, _, url
    ):
        body, headers = load.chat_body(), bench.headers(False)
        asyncio.run(load.run(url, body=body, headers=headers, concurrency=32, duration_s=1.0))
        t0 = time.time()
        r = asyncio.run(load.run(url, body=body, headers=headers, concurrency=32, duration_s=a.seconds))
        t1 = time.time()
    rows = [line.split() for line in log_path.read_text().splitlines()]
    shutil.rmtree(log_path.parent, ignore_errors=True)
    during = [(int(g), float(ms)) for g, ms, t in rows if t0 <= float(t) <= t1]
    print(f"{a.store} store, c=32 for {a.seconds:g} s: {r.ok} calls, p50 {r.pct(50):.1f} ms, p99 {r.pct(99):.1f} ms")
    print("| generation | collections | CPU ms total | CPU ms longest | CPU µs per call |")
    print("|---:|---:|---:|---:|---:|")
    for gen in (0, 1, 2):
        ms = [m for g, m in during if g == gen]
        if ms:
            print(f"| {gen} | {len(ms)} | {sum(ms):.1f} | {max(ms):.2f} | {1000 * sum(ms) / max(1, r.ok):.1f} |")
        else:
            print(f"| {gen} | 0 | – | – | – |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
