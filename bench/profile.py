"""Where does `extproc serve` spend its time under load? py-spy on the c=32 JSON run.

Starts the benchmark's headline stack (mock backend, one `extproc serve` on a
Unix socket with the embedded store, Envoy with the shipped config), drives
JSON at concurrency 32 and samples the service with py-spy (native frames
included, so time inside grpc's C core and SQLite shows up). Prints the top
functions by self time and by inclusive time, and writes the collapsed stacks
to bench/out/profile-<store>.txt (feed them to flamegraph.pl or speedscope).

    python -m bench.profile [--store redis] [--seconds 8]

py-spy comes from bench/out/tools (python3 -m venv bench/out/tools &&
bench/out/tools/bin/pip install py-spy) or PATH. Without it, the service is
run under cProfile instead (slower, Python frames only).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import load
from .run import HERE, PY, Spec, one_stack


def _pyspy() -> str | None:
    cand = HERE / "out" / "tools" / "bin" / "py-spy"
    return str(cand) if cand.exists() else shutil.which("py-spy")


def summarize(raw: Path, top: int) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        # frames look like "fn (path/to/file.py:123)": group by function and file, not line
        names = [f.split(":")[0] + ")" if "(" in f and ":" in f else f for f in frames]
        self_t[names[-1]] += count
        for name in set(names):
            incl[name] += count
    out = [f"{total} samples", "", f"top {top} by self time:"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in self_t.most_common(top)]
    out += ["", f"top {top} by inclusive time (extproc and grpc frames):"]
    shown = 0
    for name, c in incl.most_common():
        if any(k in name for k in ("extproc/", "grpc", "sqlite", "redis", "protobuf", "json", "tiktoken")):
            out.append(f"  {100 * c / total:5.1f}%  {name}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    ap.add_argument("--filter", choices=["extproc", "noop-own", "noop-grpclib"], default="extproc",
                    help="what to profile: extproc, or the no-op on extproc's gRPC server or on grpclib (the transport alone)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cprofile", action="store_true", help="use cProfile even if py-spy is there")
    ap.add_argument("--spy-args", default="--gil", help="extra py-spy record flags (default %(default)s: only the thread holding "
                    "the GIL, i.e. where Python CPU goes; try --native or --idle)")
    a = ap.parse_args()
    os.chdir(HERE.parent)
    spy = None if a.cprofile else _pyspy()
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    tag = a.store if a.filter == "extproc" else a.filter
    prof_path = out_dir / f"profile-{tag}.prof"
    spec = Spec("profile", "profiled", "envoy", a.filter, a.store, "uds", 1)
    # without py-spy the service runs under cProfile: the same command, wrapped
    under_cprofile = None if spy is not None else (lambda argv: [PY, "-m", "cProfile", "-o", str(prof_path), *argv[1:]])
    with one_stack(spec, filter_argv=under_cprofile) as (bench, procs, url):
        body, headers = load.chat_body(), bench.headers(False)
        asyncio.run(load.run(url, body=body, headers=headers, concurrency=a.concurrency, duration_s=2.0))
        pid = next(p.pid for _, role, p in procs.procs if role == "ext_proc")
        sampler = None
        raw = out_dir / f"profile-{tag}.txt"
        if spy is not None:
            sampler = subprocess.Popen([spy, "record", *a.spy_args.split(), "-r", "250", "-f", "raw", "-o", str(raw), "-d", str(int(a.seconds)),
                                        "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
        r = asyncio.run(load.run(url, body=body, headers=headers, concurrency=a.concurrency, duration_s=a.seconds))
        print(f"load: {r.rps:.0f} rps, p50 {r.pct(50):.1f} ms, p99 {r.pct(99):.1f} ms, errors {r.errors}")
        if sampler is not None:
            _, err = sampler.communicate(timeout=60)
            if sampler.returncode != 0:
                print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
                return 1
            print(summarize(raw, a.top))
            print(f"\ncollapsed stacks: {raw}")
        else:
            for _, role, p in procs.procs:
                if role == "ext_proc":
                    p.send_signal(signal.SIGTERM)
                    p.wait(30)
            st = pstats.Stats(str(prof_path))
            st.sort_stats("tottime").print_stats(a.top)
            st.sort_stats("cumtime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
