"""Two checkouts of extproc, alternated on one configuration: c=1 p50 and c=32 throughput.

The machine's speed drifts (a shared VM): figures from runs minutes apart are
not comparable, so a change is judged by alternating the two sides, round after
round, each on a fresh stack (mock backend, `extproc serve` from that checkout,
Envoy). Run from the newer checkout; `--other` is the older one (e.g. a
`git worktree add /tmp/before <commit>`), whose own bench/ harness starts its
processes, so the script works with commits that predate it as long as their
bench/run.py has `Bench` and `Spec`.

    python -m bench.ab --other /tmp/before [--store redis] [--workers 1,2] [--transport tcp] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .run import HERE, PY

# Runs inside one checkout (cwd = its root): one stack per worker count, warm-up, c=1 then c=32.
_SIDE = """
import argparse, asyncio, json, shutil, sys
sys.path.insert(0, ".")
from bench import load
from bench.procs import Procs
from bench.run import Bench, Spec
store, workers, transport = sys.argv[1], [int(w) for w in sys.argv[2].split(",")], sys.argv[3]
bench = Bench(argparse.Namespace(duration=3, stream_duration=3, warmup=1))
bench.start_backend()
if store == "redis":
    bench.start_redis()
try:
    for w in workers:
        procs = Procs(bench.workdir)
        try:
            url = bench.start(Spec(f"ab-{w}w", "ab", "envoy", "extproc", store, transport, w), procs, None)
            body, h = load.chat_body(), bench.headers(False)
            asyncio.run(load.run(url, body=body, headers=h, concurrency=32, duration_s=1))
            asyncio.run(load.run(url, body=body, headers=h, concurrency=1, duration_s=1))
            c1 = asyncio.run(load.run(url, body=body, headers=h, concurrency=1, duration_s=3))
            c32 = asyncio.run(load.run(url, body=body, headers=h, concurrency=32, duration_s=4))
            print(json.dumps({"workers": w, "c1_p50_ms": c1.pct(50), "c32_rps": c32.rps}), flush=True)
        finally:
            procs.stop()
finally:
    bench.shared.stop()
    shutil.rmtree(bench.workdir, ignore_errors=True)
"""


def side(root: Path, store: str, workers: str, transport: str) -> list[dict[str, float]]:
    out = subprocess.run([PY, "-c", _SIDE, store, workers, transport], cwd=root, capture_output=True, text=True, timeout=600, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, type=Path, help="the other checkout's root")
    ap.add_argument("--store", choices=["sqlite", "journal", "redis"], default="sqlite")
    ap.add_argument("--workers", default="1", help="comma-separated process counts, e.g. 1,2")
    ap.add_argument("--transport", choices=["uds", "tcp"], default="uds", help="how Envoy reaches the service (the headline: tcp)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    this = HERE.parent
    print("| round | side | processes | c=1 p50 ms | c=32 rps |")
    print("|---:|---|---:|---:|---:|")
    for r in range(1, a.rounds + 1):
        for name, root in (("other", a.other.resolve()), ("this", this)):
            for row in side(root, a.store, a.workers, a.transport):
                print(f"| {r} | {name} | {row['workers']:.0f} | {row['c1_p50_ms']:.2f} | {row['c32_rps']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
