"""`make bench`: extproc against the alternatives, measured in one run on this machine.

Every configuration sits in front of the same mock inference backend process
(`extproc mock-backend`, no token delay for JSON; streams ask it for 2 ms per
token with `x-mock-delay-ms`, 16 tokens) and is driven by the same client
(bench/load.py):

  direct          client -> mock backend (the floor)
  envoy           Envoy, bootstrap derived from envoy/envoy.yaml minus the
                  header_mutation and ext_proc filters
  noop            Envoy (shipped config) + bench/noop_ext_proc.py: empty answers,
                  same processing modes, SSE switched to FULL_DUPLEX_STREAMED
  extproc-*       Envoy (shipped config) + `extproc serve`, embedded store (SQLite)
                  or Redis; budgets large enough that nothing is refused, so
                  every call reserves and settles
  litellm         the LiteLLM proxy, mock backend as an OpenAI-compatible provider

Each configuration is warmed up, then measured for a fixed time per cell:
JSON at concurrency 1 and 32 (p50/p99 latency, throughput), SSE at
concurrency 1 (time to first body byte, total). Writes bench/results.md,
bench/results.json (every number, CPU per component) and bench/results.png.

    python -m bench.run            # the full run (< 10 minutes)
    python -m bench.run --quick    # 2 s cells, for checking the harness
    python -m bench.run --only envoy,extproc-uds-1w --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import growth_cost
from extproc.stack import envoy_binary, free_port, render_envoy_config, shipped_envoy_config

from . import load, wrk
from .procs import Procs, system_busy, wait_connect, wait_http

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
API_KEY = "sk-bench"
CALLER_TOKEN = secrets.token_urlsafe(32)  # what Envoy sends the service (x-extproc-caller-token)
STREAM_TOKENS = 16
STREAM_DELAY_MS = 2
LITELLM_VENV = HERE / "out" / "litellm-venv"
FILTERS_REMOVED_FOR_BARE = ("envoy.filters.http.ext_proc", "envoy.filters.http.header_mutation")


@dataclass(frozen=True)
class Spec:
    id: str
    label: str
    kind: str  # direct | envoy | litellm
    filter: str | None = None  # None | noop | noop-1rt | noop-grpclib | noop-own | extproc
    store: str = "sqlite"  # sqlite | redis | journal (extproc only)
    transport: str = "tcp"  # tcp | uds (the Envoy -> ext_proc hop)
    workers: int = 1
    ablation: bool = False


@dataclass
class Outcome:
    spec: Spec
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_c32: dict[str, float] = field(default_factory=dict)  # cores used per component during JSON c=32
    error: str = ""
    notes: list[str] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    ext_proc_per_process: list[float] = field(default_factory=list)
    cpu_s: dict[str, dict[str, float]] = field(default_factory=dict)  # CPU seconds per component, per cell
    wrk_cut: int = 0  # requests wrk may have cut off at its deadlines (reserved, never answered to the client)

    def get(self, cell: str, key: str) -> float:
        v = self.cells.get(cell, {}).get(key)
        return float("nan") if v is None else float(v)


# ---------------------------------------------------------------- configuration files


def write_policy(path: Path) -> Path:
    """One model, one key; key, team and org budgets far above what a run can spend."""
    big = "1000000.00"
    policy = {
        "version": 1,
        "prices": {
            "version": "bench",
            "models": {"gpt-4o": {"input": "2.50", "output": "10.00", "output_limit": 16384, "context_window": 128000}},
        },
        "keys": [
            {"sha256": hashlib.sha256(API_KEY.encode()).hexdigest(), "principal": "bench", "team": "bench-team", "org": "bench-org"}
        ],
        "budgets": [
            {"scope": "key", "limits": [{"dimension": "cost", "limit": big}]},
            {"scope": "team", "limits": [{"dimension": "cost", "limit": big}]},
            {"scope": "org", "limits": [{"dimension": "cost", "limit": big, "window": "month"}]},
        ],
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def _endpoint(addr: str) -> dict[str, Any]:
    if addr.startswith("unix:"):
        return {"pipe": {"path": addr[5:]}}
    host, _, port = addr.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def bare_envoy_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The shipped bootstrap without the budget filters (and without the extproc cluster)."""
    found = set()
    for lst in cfg["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                hcm = f.get("typed_config", {})
                if "http_filters" not in hcm:
                    continue
                kept = []
                for hf in hcm["http_filters"]:
                    if hf["name"] in FILTERS_REMOVED_FOR_BARE:
                        found.add(hf["name"])
                    else:
                        kept.append(hf)
                hcm["http_filters"] = kept
    if "envoy.filters.http.ext_proc" not in found:
        raise RuntimeError("envoy/envoy.yaml has no envoy.filters.http.ext_proc filter: update bench/run.py")
    # Nothing marks requests without extproc: drop the closed-world route condition (same route table otherwise).
    for lst in cfg["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for vh in f.get("typed_config", {}).get("route_config", {}).get("virtual_hosts", []):
                    for route in vh["routes"]:
                        kept = [h for h in route["match"].get("headers", []) if h["name"] != "x-extproc-route"]
                        route["match"]["headers"] = kept
                        if not kept:
                            del route["match"]["headers"]
    cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"] if c["name"] != "extproc"]
    return cfg


def envoy_config(spec: Spec, *, listen_port: int, admin_port: int, backend: str, extproc_addrs: list[str]) -> dict[str, Any]:
    cfg = render_envoy_config(
        shipped_envoy_config(),
        listen_port=listen_port,
        admin_port=admin_port,
        backends={"backend": backend, "backend_small": backend},
        extproc=extproc_addrs[0] if extproc_addrs else "127.0.0.1:9",
        caller_token=CALLER_TOKEN,
    )
    if spec.filter is None:
        return bare_envoy_config(cfg)
    if len(extproc_addrs) > 1:  # one Unix socket per worker process: Envoy balances across them
        for cluster in cfg["static_resources"]["clusters"]:
            if cluster["name"] == "extproc":
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                    {"endpoint": {"address": _endpoint(a)}} for a in extproc_addrs
                ]
    return cfg


def litellm_config(path: Path, backend_port: int) -> Path:
    cfg = {
        "model_list": [
            {
                "model_name": "gpt-4o",
                "litellm_params": {"model": "openai/gpt-4o", "api_base": f"http://127.0.0.1:{backend_port}/v1", "api_key": "sk-mock"},
            }
        ],
        # x-mock-delay-ms must reach the mock backend for the stream test.
        "general_settings": {"master_key": API_KEY, "forward_client_headers_to_llm_api": True},
        # Proxy-wide budget: without a database LiteLLM only keeps an in-process cost
        # counter and says at start-up that the budget is not enforced at the proxy.
        "litellm_settings": {"max_budget": 1000000, "budget_duration": "30d"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------- LiteLLM install


def find_litellm(install: bool, log: Any) -> tuple[str | None, str]:
    """The `litellm` entry point: bench/out/litellm-venv, else the project venv, else install one."""
    cand = LITELLM_VENV / "bin" / "litellm"
    if cand.exists():
        return str(cand), _litellm_version(LITELLM_VENV / "bin" / "python")
    here = Path(PY).parent / "litellm"
    if here.exists():
        return str(here), _litellm_version(Path(PY))
    if not install:
        return None, "not installed (run without --no-install-litellm to install it into bench/out/litellm-venv)"
    # Its own venv: litellm[proxy] pins openai<3 and pulls uvloop, which would change the
    # project venv (and extproc's event loop) under the other measurements.
    log(f"installing litellm[proxy] into {LITELLM_VENV} (once; ~90 s)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True, timeout=120)
        r = subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], capture_output=True, text=True, timeout=400)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"could not be installed: {e}"
    if r.returncode != 0 or not cand.exists():
        return None, f"pip install 'litellm[proxy]' failed: {r.stderr.strip()[-400:]}"
    return str(cand), _litellm_version(LITELLM_VENV / "bin" / "python")


def _litellm_version(python: Path) -> str:
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "unknown"
    except (subprocess.SubprocessError, OSError):
        return "unknown"


# ---------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
        self.policy = write_policy(self.workdir / "policy.yaml")
        self.shared = Procs(self.workdir)
        self.backend_port = 0
        self.redis_url = ""
        self.outcomes: list[Outcome] = []
        self.t0 = time.monotonic()
        self.workers_note = ""

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- shared processes -------------------------------------------------------

    def start_backend(self) -> None:
        self.backend_port = free_port()
        p = self.shared.spawn("mock-backend", "backend", [PY, "-m", "extproc", "mock-backend", "--port", str(self.backend_port), "--token-delay-ms", "0"])
        wait_http(f"http://127.0.0.1:{self.backend_port}/healthz", 30, p)

    def start_redis(self) -> None:
        if self.redis_url:
            return
        binary = shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(PY).parent))
        if binary is None:
            sys.path.insert(0, str(ROOT))
            from tests.support.redis_server import redis_binary

            binary = redis_binary()
        port = free_port()
        rdir = self.workdir / "redis"
        rdir.mkdir()
        # AOF with fsync every second: the usual production durability for a budget store.
        p = self.shared.spawn("redis", "redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir), "--save", "",
                                                 "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "no"])
        wait_connect(f"127.0.0.1:{port}", 15, p)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    # -- one configuration ------------------------------------------------------

    def _wait_log(self, procs: Procs, names: list[str], text: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            procs.check_alive()
            if sum(procs.log(n).count(text) for n in names) >= count:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{names}: {count} x {text!r} not seen after {timeout}s")

    def start_filter(self, spec: Spec, procs: Procs, store_url: str) -> list[str]:
        if spec.filter in ("noop", "noop-1rt", "noop-grpclib", "noop-own"):
            base = [PY, "-m", "bench.noop_ext_proc"] + {"noop-1rt": ["--one-round-trip"], "noop-grpclib": ["--transport", "grpclib"],
                                                        "noop-own": ["--transport", "extproc"]}.get(spec.filter, [])
            ready = "noop ext_proc listening"
        else:
            token_file = self.workdir / "caller-token"
            token_file.write_text(CALLER_TOKEN + "\n")
            base = [PY, "-m", "extproc", "serve", "--policy", str(self.policy), "--store", store_url,
                    "--caller-token-file", str(token_file)]
            ready = "extproc listening"
        n = spec.workers
        if spec.transport == "uds":
            addrs = [f"unix:{self.workdir}/{spec.id}-{i}.sock" for i in range(n)]
            names = []
            for i, a in enumerate(addrs):
                names.append(f"{spec.id}-filter-{i}")
                procs.spawn(names[-1], "ext_proc", base + ["--grpc", a])
            for a, (_, _, p) in zip(addrs, procs.procs[-n:]):
                wait_connect(a, 60, p)
            return addrs
        addr = f"127.0.0.1:{free_port()}"
        if n > 1 and spec.filter == "extproc":
            name = f"{spec.id}-filter"
            p = procs.spawn(name, "ext_proc", base + ["--grpc", addr, "--workers", str(n)])
            try:
                wait_connect(addr, 60, p)
            except RuntimeError:
                if "--workers" not in procs.log(name):
                    raise
                procs.stop(name)
                self.workers_note = (f"`extproc serve --workers` was not available: {n} `extproc serve` processes were started "
                                     "on the same TCP port (SO_REUSEPORT, as the flag would)")
            else:
                # Envoy keeps its first connections: every worker must listen before Envoy connects.
                try:
                    self._wait_log(procs, [name], ready, n, 15)
                    self.workers_note = f"TCP with 2 processes used `extproc serve --workers {n}`"
                except TimeoutError:
                    self.workers_note = f"`extproc serve --workers {n}`: not every worker reported ready within 15 s"
                return [addr]
        names = []
        for i in range(n):
            names.append(f"{spec.id}-filter-{i}")
            procs.spawn(names[-1], "ext_proc", base + ["--grpc", addr])
            self._wait_log(procs, [names[-1]], ready, 1, 60)  # one at a time, so each really listens
        return [addr]

    def start(self, spec: Spec, procs: Procs, litellm_bin: str | None) -> str:
        """Start the configuration's processes; returns the URL the client talks to."""
        if spec.kind == "direct":
            return f"http://127.0.0.1:{self.backend_port}"
        if spec.kind == "litellm":
            assert litellm_bin is not None
            port = free_port()
            cfg = litellm_config(self.workdir / "litellm.yaml", self.backend_port)
            env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
            p = procs.spawn("litellm", "litellm", [litellm_bin, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=str(self.workdir))
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", 120, p)
            return f"http://127.0.0.1:{port}"
        addrs: list[str] = []
        if spec.filter is not None:
            if spec.filter == "extproc":
                if spec.store == "redis":
                    self.start_redis()
                store_url = self.store_url(spec)
            else:
                store_url = ""
            addrs = self.start_filter(spec, procs, store_url)
        port, admin = free_port(), free_port()
        cfg = envoy_config(spec, listen_port=port, admin_port=admin, backend=f"127.0.0.1:{self.backend_port}", extproc_addrs=addrs)
        path = self.workdir / f"{spec.id}-envoy.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        p = procs.spawn(f"{spec.id}-envoy", "envoy", [envoy_binary(), "-c", str(path), "--log-level", "warn", "--concurrency", "2",
                                                      "--disable-hot-restart"])
        wait_http(f"http://127.0.0.1:{admin}/ready", 60, p)
        wait_connect(f"127.0.0.1:{port}", 30, p)
        return f"http://127.0.0.1:{port}"

    # -- checks and measurement ---------------------------------------------------

    def headers(self, stream: bool) -> dict[str, str]:
        h = {"Authorization": f"Bearer {API_KEY}"}
        if stream:
            h["x-mock-delay-ms"] = str(STREAM_DELAY_MS)
        return h

    async def preflight(self, spec: Spec, url: str) -> int:
        """One JSON and one SSE call, checked for what each configuration must show. Returns 200s sent."""
        status, hdrs, body = await load.one(url, body=load.chat_body(), headers=self.headers(False))
        if status != 200:
            raise RuntimeError(f"JSON pre-flight: HTTP {status}: {body[:300]!r}")
        usage = json.loads(body).get("usage", {})
        if usage.get("completion_tokens") != STREAM_TOKENS:
            raise RuntimeError(f"JSON pre-flight: unexpected usage {usage}")
        if spec.filter == "extproc" and (hdrs.get("x-budget-decision") != "allow" or "x-budget-cost-usd" not in hdrs):
            raise RuntimeError(f"JSON pre-flight: no budget decision/settled cost in headers {hdrs}")
        t0 = time.perf_counter()
        status, hdrs, body = await load.one(url, body=load.chat_body(stream=True), headers=self.headers(True))
        took = (time.perf_counter() - t0) * 1000
        if status != 200 or b"data: [DONE]" not in body:
            raise RuntimeError(f"SSE pre-flight: HTTP {status}: {body[-300:]!r}")
        if spec.filter == "extproc" and b": x-budget-cost-usd=" not in body:
            raise RuntimeError(f"SSE pre-flight: stream not settled by extproc: {body[-300:]!r}")
        if took < STREAM_TOKENS * STREAM_DELAY_MS * 0.9:
            raise RuntimeError(f"SSE pre-flight took {took:.1f} ms: x-mock-delay-ms did not reach the backend")
        return 2

    def cpu_snapshot(self, procs: Procs) -> dict[str, float]:
        snap = {**self.shared.cpu_by_role(), **procs.cpu_by_role()}
        ru, rc = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        snap["client"] = ru.ru_utime + ru.ru_stime + rc.ru_utime + rc.ru_stime  # children: wrk, once it has exited
        snap["_busy"] = system_busy()
        for pid, cpu in procs.cpu_by_pid("ext_proc").items():
            snap[f"_pid{pid}"] = cpu
        return snap

    @staticmethod
    def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """CPU seconds per component between two snapshots (wrk, a child process, is counted as `client` by its own line)."""
        return {k: round(after[k] - before.get(k, 0.0), 4) for k in after if not k.startswith("_")}

    @staticmethod
    def cpu_shares(before: dict[str, float], after: dict[str, float], seconds: float) -> tuple[dict[str, float], list[float]]:
        """Cores used per component, 'other' = the rest of the machine; and per ext_proc process."""
        roles = {k: (after[k] - before.get(k, 0.0)) / seconds for k in after if not k.startswith("_")}
        busy = (after["_busy"] - before["_busy"]) / seconds
        roles["other"] = max(0.0, busy - sum(roles.values()))
        per_proc = [(after[k] - before.get(k, 0.0)) / seconds for k in after if k.startswith("_pid")]
        per_proc = [v for v in per_proc if v >= 0.02]  # worker processes, not an idle supervisor
        return {k: round(v, 2) for k, v in roles.items()}, [round(v, 2) for v in per_proc]

    async def measure(self, spec: Spec, url: str, procs: Procs, out: Outcome) -> int:
        a = self.args
        json_body, sse_body = load.chat_body(), load.chat_body(stream=True)
        ok = 0
        # Warm-up: connections, Envoy's upstream pools, token caches, SQLite pages.
        for body, stream, c, d in ((json_body, False, 32, a.warmup), (sse_body, True, 4, a.warmup / 2)):
            r = await load.run(url, body=body, headers=self.headers(stream), concurrency=c, duration_s=d)
            ok += r.statuses.get(200, 0)
        cells = (("json_c1", json_body, False, 1, a.duration), ("json_c32", json_body, False, 32, a.duration),
                 ("sse_c1", sse_body, True, 1, a.stream_duration))
        for name, body, stream, c, d in cells:
            before = self.cpu_snapshot(procs)
            r = await load.run(url, body=body, headers=self.headers(stream), concurrency=c, duration_s=d)
            after = self.cpu_snapshot(procs)
            ok += r.statuses.get(200, 0)
            procs.check_alive()
            out.cells[name] = {**r.summary(), "statuses": {str(k): v for k, v in r.statuses.items()}}
            out.cpu_s[name] = self.cpu_used(before, after)
            if name == "json_c32":
                out.cpu_c32, out.ext_proc_per_process = self.cpu_shares(before, after, d)
            s = out.cells[name]
            self.log(f"  {name:8s} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  ttfb50 {s['ttfb_p50_ms']:6.2f}  "
                     f"{s['rps']:7.0f} rps  errors {s['errors']}")
        if wrk.binary() is None or getattr(a, "no_wrk", False):
            return ok
        for name, c in (("wrk_c1", 1), ("wrk_c32", 32)):  # the second load generator, same request, same closed loop
            before = self.cpu_snapshot(procs)
            try:
                w = wrk.run(url, body=json_body, headers=self.headers(False), connections=c, duration_s=wrk_seconds(a.duration),
                            path=load.CHAT_PATH)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # bench/load.py's figures stand on their own
                out.notes.append(f"{name}: {e}")
                self.log(f"  {name}: not measured: {e}")
                continue
            after = self.cpu_snapshot(procs)
            procs.check_alive()
            ok += int(w["requests"])
            out.wrk_cut += int(w["in_flight_cut"])
            out.cells[name] = w
            out.cpu_s[name] = self.cpu_used(before, after)
            self.log(f"  {name:8s} p50 {w['p50_ms']:7.2f} ms  p99 {w['p99_ms']:7.2f} ms  {w['rps']:7.0f} rps  errors {w['errors']}")
        return ok

    def store_url(self, spec: Spec) -> str:
        if spec.store == "redis":
            return self.redis_url
        if spec.store == "journal":
            return f"journal:{self.workdir / (spec.id + '.journal')}"
        return f"sqlite:{self.workdir / (spec.id + '.db')}"

    async def check_ledger(self, spec: Spec, sent_ok: int, since_ms: int, cut: int = 0) -> dict[str, Any]:
        """Every 200 the client saw must be one settled ledger entry (the enforcement path really ran)."""
        from extproc.app import open_store

        store = open_store(self.store_url(spec))
        try:
            entries = await store.ledger(since_ms=since_ms)
        finally:
            await store.close()
        by: dict[str, int] = {}
        for e in entries:
            key = e.outcome.value if hasattr(e.outcome, "value") else str(e.outcome)
            by[key] = by.get(key, 0) + 1
        settled, extra = by.get("settled", 0), sum(by.values()) - sent_ok
        # wrk stops at its deadline with up to one request per connection in flight: those were reserved and are
        # settled or released without a client seeing the answer. Nothing else may differ.
        match = settled >= sent_ok and 0 <= extra <= cut if cut else settled == sent_ok and len(by) == 1
        return {"client_200s": sent_ok, "ledger": by, "match": match, "cut_by_wrk": cut}

    def run_spec(self, spec: Spec, litellm: tuple[str | None, str]) -> Outcome:
        out = Outcome(spec)
        self.log(f"{spec.id}: {spec.label}")
        if spec.kind == "litellm" and litellm[0] is None:
            out.error = f"LiteLLM {litellm[1]}"
            self.log(f"  skipped: {out.error}")
            return out
        procs = Procs(self.workdir)
        since_ms = int(time.time() * 1000) - 1000
        try:
            url = self.start(spec, procs, litellm[0])
            sent = asyncio.run(self.preflight(spec, url))
            sent += asyncio.run(self.measure(spec, url, procs, out))
            if spec.filter == "extproc":
                time.sleep(0.5)  # settles run in the background after the response
                procs.stop()  # graceful: waits for background settles
                try:
                    out.ledger = asyncio.run(self.check_ledger(spec, sent, since_ms, out.wrk_cut))
                except Exception as e:  # the check is evidence, not the benchmark
                    out.ledger = {"error": f"{type(e).__name__}: {e}"}
        except Exception as e:
            out.error = f"{type(e).__name__}: {e}"
            self.log(f"  FAILED: {out.error}")
            for name, _, proc in procs.procs:  # the workdir goes at the end: say now why a process died
                if proc.poll() is not None:
                    self.log(f"  {name} exited {proc.returncode}; the end of its log:\n" + procs.log(name)[-2000:])
        finally:
            procs.stop()
        return out

    def run(self) -> list[Outcome]:
        a = self.args
        only = set(a.only.split(",")) if a.only else None
        litellm = (None, "skipped (--no-litellm)") if a.no_litellm else (None, "")
        if not a.no_litellm and (only is None or "litellm" in only):
            litellm = find_litellm(not a.no_install_litellm, self.log)
        self.litellm_version = litellm[1] if litellm[0] else ""
        self.start_backend()
        try:
            plan = first_specs()
            for spec in plan:
                if only is None or spec.id in only:
                    self.outcomes.append(self.run_spec(spec, litellm))
            # The embedded-store variant with the best c=32 throughput is the headline;
            # the no-op baseline and Redis run with the same transport and workers.
            best = headline(self.outcomes)
            for spec in second_specs(best.spec if best else None):
                if only is None or spec.id in only or spec.id.split("@")[0] in only:
                    if any(o.spec.id == spec.id for o in self.outcomes):
                        continue
                    self.outcomes.append(self.run_spec(spec, litellm))
        finally:
            self.shared.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.outcomes


def _setup(s: Spec) -> str:
    return f"{s.transport}-{s.workers}w"


@contextlib.contextmanager
def one_stack(spec: Spec, *, filter_argv: Callable[[list[str]], list[str]] | None = None) -> Iterator[tuple[Bench, Procs, str]]:
    """One configuration's processes (mock backend, filter, Envoy) for the scripts that measure one thing on it
    (profile.py, transport.py, gc_pauses.py); `filter_argv` rewrites the filter's command line (a profiler, a
    wrapper). Yields the Bench, the configuration's processes and the URL to drive; all stopped and removed on exit."""
    bench = Bench(argparse.Namespace(duration=8.0, stream_duration=8.0, warmup=1.0))
    procs = Procs(bench.workdir)
    if filter_argv is not None:
        rewrite, spawn = filter_argv, procs.spawn

        def wrapped(name: str, role: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
            return spawn(name, role, rewrite(argv) if role == "ext_proc" else argv, **kw)

        procs.spawn = wrapped  # type: ignore[method-assign]
    bench.start_backend()
    try:
        yield bench, procs, bench.start(spec, procs, None)
    finally:
        procs.stop()
        bench.shared.stop()
        shutil.rmtree(bench.workdir, ignore_errors=True)


def first_specs() -> list[Spec]:
    return [
        Spec("direct", "client -> mock backend (no proxy)", "direct"),
        Spec("envoy", "Envoy, no filter", "envoy"),
        Spec("noop-tcp-1w", "Envoy + no-op ext_proc (TCP, 1 process)", "envoy", "noop", transport="tcp", workers=1),
        Spec("noop-1rt-tcp-1w", "Envoy + no-op ext_proc, 1 round trip (headers only, rest skipped by mode_override)", "envoy", "noop-1rt",
             transport="tcp", workers=1, ablation=True),
        Spec("extproc-tcp-1w", "Envoy + extproc, SQLite, TCP, 1 process (shipped defaults)", "envoy", "extproc", "sqlite", "tcp", 1, True),
        Spec("extproc-uds-1w", "Envoy + extproc, SQLite, Unix socket, 1 process", "envoy", "extproc", "sqlite", "uds", 1, True),
        Spec("extproc-tcp-2w", "Envoy + extproc, SQLite, TCP, 2 processes (SO_REUSEPORT)", "envoy", "extproc", "sqlite", "tcp", 2, True),
        Spec("extproc-uds-2w", "Envoy + extproc, SQLite, 2 processes, one Unix socket each", "envoy", "extproc", "sqlite", "uds", 2, True),
    ]


def second_specs(best: Spec | None) -> list[Spec]:
    t, w = (best.transport, best.workers) if best else ("uds", 1)
    setup = f"{t}-{w}w"
    where = {"tcp": "TCP", "uds": "Unix socket"}[t]
    procs = f"{w} process" + ("es" if w > 1 else "")
    out = []
    if setup != "tcp-1w":
        out.append(Spec(f"noop-{setup}", f"Envoy + no-op ext_proc ({where}, {procs})", "envoy", "noop", transport=t, workers=w))
    # The floor of the transport extproc serves on (its own gRPC server; the no-op above is grpc.aio, the baseline issue 14
    # names), and the grpclib library it served on before.
    out.append(Spec(f"noop-own-{setup}", f"Envoy + no-op ext_proc on extproc's gRPC server ({where}, {procs})", "envoy", "noop-own",
                    transport=t, workers=w, ablation=True))
    out.append(Spec(f"noop-grpclib-{setup}", f"Envoy + no-op ext_proc on grpclib ({where}, {procs})", "envoy", "noop-grpclib",
                    transport=t, workers=w, ablation=True))
    out.append(Spec(f"extproc-redis-{setup}", f"Envoy + extproc, Redis, {where}, {procs}", "envoy", "extproc", "redis", t, w))
    # The journal store (one process only: it owns its directory), on the headline's transport.
    out.append(Spec(f"extproc-journal-{t}-1w", f"Envoy + extproc, journal store, {where}, 1 process", "envoy", "extproc", "journal", t, 1))
    # Scale-out: the same Redis store with the other number of service processes behind the one Envoy.
    w2 = 1 if w == 2 else 2
    out.append(Spec(f"extproc-redis-{t}-{w2}w", f"Envoy + extproc, Redis, {where}, {w2} process" + ("es" if w2 > 1 else ""),
                    "envoy", "extproc", "redis", t, w2, ablation=True))
    out.append(Spec("litellm", "LiteLLM proxy (master key, no DB)", "litellm"))
    return out


def headline(outcomes: list[Outcome]) -> Outcome | None:
    cands = [o for o in outcomes if o.spec.filter == "extproc" and o.spec.store == "sqlite" and not o.error]
    return max(cands, key=lambda o: o.get("json_c32", "rps"), default=None)


def noop_for(outcomes: list[Outcome], spec: Spec, filter_: str = "noop") -> Outcome | None:
    for o in outcomes:
        if o.spec.filter == filter_ and _setup(o.spec) == _setup(spec) and not o.error:
            return o
    return None


def find(outcomes: list[Outcome], sid: str) -> Outcome | None:
    return next((o for o in outcomes if o.spec.id == sid and not o.error), None)


# ---------------------------------------------------------------- reporting


def machine() -> dict[str, str]:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
               platform.processor())
    try:
        envoy_v = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout.split("version:")[-1].strip()
        envoy_v = envoy_v.split("/")[1] if "/" in envoy_v else envoy_v
    except (OSError, subprocess.SubprocessError, RuntimeError):
        envoy_v = "unknown"
    return {
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_v,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _f(v: float, nd: int = 2) -> str:
    return "–" if v != v else f"{v:.{nd}f}"


def _d(v: float) -> str:
    return "–" if v != v else f"{v:+.2f}"


def report(bench: Bench, elapsed: float, load_before: str, load_after: str) -> str:
    outs = bench.outcomes
    m = machine()
    envoy, direct = find(outs, "envoy"), find(outs, "direct")
    best = headline(outs)
    redis_all = [o for o in outs if o.spec.filter == "extproc" and o.spec.store == "redis" and not o.error]
    redis = next((o for o in redis_all if best is None or _setup(o.spec) == _setup(best.spec)), redis_all[0] if redis_all else None)
    journal = next((o for o in outs if o.spec.filter == "extproc" and o.spec.store == "journal" and not o.error), None)
    lite = find(outs, "litellm")
    a = bench.args
    L: list[str] = []
    L.append("# Benchmark: extproc against the alternatives")
    L.append("")
    L.append(f"Machine: {m['cpu']}, {m['nproc']} cores (nproc), Linux {m['kernel']}, Python {m['python']}, Envoy {m['envoy']}"
             + (f", LiteLLM {bench.litellm_version}" if bench.litellm_version else "") + f". Date: {m['date']}. "
             f"Whole run: {elapsed / 60:.1f} min. Load average before / after: {load_before} / {load_after}.")
    L.append("")
    L.append(f"Generated by `make bench` (`python -m bench.run`). Every configuration fronts the same mock backend process and is "
             f"driven by the same client (`bench/load.py`, closed loop, keep-alive, on the same 2 cores as everything else). "
             f"Each cell ran {a.duration:g} s (streams {a.stream_duration:g} s) after a {a.warmup:g} s warm-up. JSON: "
             f"`POST /v1/chat/completions`, {STREAM_TOKENS} output tokens, no backend delay. SSE: the same with `stream: true` and "
             f"{STREAM_DELAY_MS} ms per token × {STREAM_TOKENS} tokens; TTFB is the time to the first byte of the body (the first event). "
             "Latencies in ms; rps = completed requests per second.")
    L.append("")
    L.append("| configuration | c=1 p50 | c=1 p99 | c=1 rps | c=32 p50 | c=32 p99 | c=32 rps | SSE TTFB p50 | SSE total p50 | errors |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for o in outs:
        name = f"`{o.spec.id}` {o.spec.label}"
        if best is not None and o is best:
            name += " **(headline)**"
        if o.error:
            L.append(f"| {name} | not measured: {o.error.splitlines()[0][:160]} |||||||||")
            continue
        errs = sum(int(o.cells.get(c, {}).get("errors", 0)) for c in o.cells)
        L.append(f"| {name} | {_f(o.get('json_c1', 'p50_ms'))} | {_f(o.get('json_c1', 'p99_ms'))} | {_f(o.get('json_c1', 'rps'), 0)} | "
                 f"{_f(o.get('json_c32', 'p50_ms'))} | {_f(o.get('json_c32', 'p99_ms'))} | {_f(o.get('json_c32', 'rps'), 0)} | "
                 f"{_f(o.get('sse_c1', 'ttfb_p50_ms'))} | {_f(o.get('sse_c1', 'p50_ms'))} | {errs} |")
    L.append("")
    if best is not None:
        L.append(f"Headline: `{best.spec.id}`, the embedded-store variant with the highest c=32 throughput in this run; the no-op "
                 "baseline and the Redis configuration were then run with the same transport and number of processes.")
        L.append("")
    # -- the second load generator
    L += wrk_section(outs, envoy, a.duration)
    # -- added latency
    if envoy is not None:
        L.append("## Added latency and throughput kept, against Envoy without the filter")
        L.append("")
        L.append("| configuration | + c=1 p50 | + c=1 p99 | + SSE TTFB p50 | + SSE total p50 | c=32 rps vs Envoy | c=32 rps vs no-op (same transport/processes) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for o in outs:
            if o.error or o.spec.kind != "envoy" or o is envoy:
                continue
            noop = noop_for(outs, o.spec) if o.spec.filter == "extproc" else None
            vs_noop = f"{100 * o.get('json_c32', 'rps') / noop.get('json_c32', 'rps'):.0f}%" if noop else "–"
            L.append(f"| `{o.spec.id}` | {_d(o.get('json_c1', 'p50_ms') - envoy.get('json_c1', 'p50_ms'))} | "
                     f"{_d(o.get('json_c1', 'p99_ms') - envoy.get('json_c1', 'p99_ms'))} | "
                     f"{_d(o.get('sse_c1', 'ttfb_p50_ms') - envoy.get('sse_c1', 'ttfb_p50_ms'))} | "
                     f"{_d(o.get('sse_c1', 'p50_ms') - envoy.get('sse_c1', 'p50_ms'))} | "
                     f"{100 * o.get('json_c32', 'rps') / envoy.get('json_c32', 'rps'):.0f}% | {vs_noop} |")
        L.append("")
    if direct is not None:
        L.append("## The whole gateway against calling the backend directly")
        L.append("")
        L.append("What a user adds by putting a budget gateway in the path (Envoy + extproc as one unit, or LiteLLM).")
        L.append("")
        L.append("| configuration | + c=1 p50 | + c=1 p99 | + SSE TTFB p50 | c=32 rps vs direct |")
        L.append("|---|---:|---:|---:|---:|")
        for o in outs:
            if o.error or o is direct or o.spec.filter == "noop-1rt":
                continue
            L.append(f"| `{o.spec.id}` | {_d(o.get('json_c1', 'p50_ms') - direct.get('json_c1', 'p50_ms'))} | "
                     f"{_d(o.get('json_c1', 'p99_ms') - direct.get('json_c1', 'p99_ms'))} | "
                     f"{_d(o.get('sse_c1', 'ttfb_p50_ms') - direct.get('sse_c1', 'ttfb_p50_ms'))} | "
                     f"{100 * o.get('json_c32', 'rps') / direct.get('json_c32', 'rps'):.0f}% |")
        L.append("")
    # -- targets
    L.append("## Targets (issue 14)")
    L.append("")
    shipped = find(outs, "extproc-tcp-1w")  # what `extproc serve` runs without flags, when it is not the headline
    for o in [x for x in (best, shipped if shipped is not best else None, redis, journal) if x is not None]:
        store = {"sqlite": "embedded store", "redis": "Redis", "journal": "journal store"}[o.spec.store]
        if o is shipped:
            store += ", shipped defaults"
        L.append(f"**{store}** (`{o.spec.id}`):")
        L.append("")
        rows = []
        if envoy is not None:
            add = o.get("json_c1", "p50_ms") - envoy.get("json_c1", "p50_ms")
            rows.append(("adds ≤ 1.5 ms p50 at c=1 over Envoy without the filter", f"{add:+.2f} ms", add <= 1.5))
            ttfb = o.get("sse_c1", "ttfb_p50_ms") - envoy.get("sse_c1", "ttfb_p50_ms")
            rows.append(("adds ≤ 2 ms to stream TTFB (p50, c=1)", f"{ttfb:+.2f} ms", ttfb <= 2))
        noop = noop_for(outs, o.spec)
        if noop is not None:
            ratio = o.get("json_c32", "rps") / noop.get("json_c32", "rps")
            rows.append((f"keeps ≥ 70% of the no-op ext_proc's c=32 throughput (`{noop.spec.id}`)", f"{100 * ratio:.0f}%", ratio >= 0.7))
        same = noop_for(outs, o.spec, "noop-own")
        if same is not None:  # not a target: the same ratio against the no-op on extproc's own transport
            ratio = o.get("json_c32", "rps") / same.get("json_c32", "rps")
            rows.append((f"(for reference) share of the no-op's c=32 throughput on extproc's gRPC server (`{same.spec.id}`)",
                         f"{100 * ratio:.0f}%", None))
        if envoy is not None and "wrk_c1" in o.cells and "wrk_c1" in envoy.cells:
            add = o.get("wrk_c1", "p50_ms") - envoy.get("wrk_c1", "p50_ms")
            rows.append(("wrk: adds ≤ 1.5 ms p50 at c=1 over Envoy without the filter", f"{add:+.2f} ms", add <= 1.5))
        if noop is not None and "wrk_c32" in o.cells and "wrk_c32" in noop.cells:
            ratio = o.get("wrk_c32", "rps") / noop.get("wrk_c32", "rps")
            rows.append((f"wrk: keeps ≥ 70% of the no-op's c=32 throughput (`{noop.spec.id}`)", f"{100 * ratio:.0f}%", ratio >= 0.7))
        if direct is not None and lite is not None:
            ours = o.get("json_c1", "p50_ms") - direct.get("json_c1", "p50_ms")
            theirs = lite.get("json_c1", "p50_ms") - direct.get("json_c1", "p50_ms")
            rows.append(("beats LiteLLM's added latency (c=1 p50, Envoy + extproc vs LiteLLM, both over direct)",
                         f"{ours:+.2f} vs {theirs:+.2f} ms", ours < theirs))
            ours_t = o.get("sse_c1", "ttfb_p50_ms") - direct.get("sse_c1", "ttfb_p50_ms")
            theirs_t = lite.get("sse_c1", "ttfb_p50_ms") - direct.get("sse_c1", "ttfb_p50_ms")
            rows.append(("beats LiteLLM's added stream TTFB (p50, both over direct)", f"{ours_t:+.2f} vs {theirs_t:+.2f} ms", ours_t < theirs_t))
        elif lite is None:
            rows.append(("beats LiteLLM's added latency", "LiteLLM not measured", None))
        L.append("| target | measured | |")
        L.append("|---|---:|---|")
        for t, v, met in rows:
            L.append(f"| {t} | {v} | {'met' if met else ('n/a' if met is None else '**not met**')} |")
        L.append("")
    # -- what the optimisations bought
    L.append("## What each optimisation bought (embedded store)")
    L.append("")
    base = find(outs, "extproc-tcp-1w")
    if base is not None:
        L.append("| change from `extproc-tcp-1w` (shipped defaults) | c=1 p50 | c=32 rps | SSE TTFB p50 |")
        L.append("|---|---:|---:|---:|")
        for sid, what in (("extproc-uds-1w", "Unix socket instead of TCP"), ("extproc-tcp-2w", "2 processes on one TCP port (SO_REUSEPORT)"),
                          ("extproc-uds-2w", "2 processes, one Unix socket each (Envoy balances)")):
            o = find(outs, sid)
            if o is None:
                continue
            L.append(f"| {what} | {_d(o.get('json_c1', 'p50_ms') - base.get('json_c1', 'p50_ms'))} ms | "
                     f"{100 * (o.get('json_c32', 'rps') / base.get('json_c32', 'rps') - 1):+.0f}% | "
                     f"{_d(o.get('sse_c1', 'ttfb_p50_ms') - base.get('sse_c1', 'ttfb_p50_ms'))} ms |")
        L.append("")
    L += optimisations_table()
    n4, n1 = find(outs, "noop-tcp-1w"), find(outs, "noop-1rt-tcp-1w")
    if n4 is not None and n1 is not None:
        per_rt = (n4.get("json_c1", "p50_ms") - n1.get("json_c1", "p50_ms")) / 3
        L.append(f"Round trips: the no-op with all four JSON phases (`noop-tcp-1w`) against the no-op that answers the request headers "
                 f"and skips the rest with `mode_override` (`noop-1rt-tcp-1w`): {per_rt:.2f} ms p50 at c=1 per avoided round trip, "
                 f"c=32 throughput {n1.get('json_c32', 'rps'):.0f} vs {n4.get('json_c32', 'rps'):.0f} rps. extproc skips the "
                 "body and response phases on unmetered paths, skips the response body after a non-2xx answer, and streams "
                 "(rather than buffers) SSE responses; the four phases of a metered JSON call are the minimum for reserve-then-settle.")
        L.append("")
    if bench.workers_note:
        L.append(f"Workers: {bench.workers_note}.")
        L.append("")
    # -- CPU
    L.append("## Where the two cores went (JSON, c=32)")
    L.append("")
    roles = ["client", "envoy", "ext_proc", "backend", "redis", "litellm", "other"]
    L.append("| configuration | " + " | ".join(roles) + " | ext_proc per process |")
    L.append("|---|" + "---:|" * (len(roles) + 1))
    for o in outs:
        if o.error or not o.cpu_c32:
            continue
        cells = [_f(o.cpu_c32[r]) if r in o.cpu_c32 and (r != "redis" or o.spec.store == "redis") else "–" for r in roles]
        per = " / ".join(f"{v:.2f}" for v in o.ext_proc_per_process) if len(o.ext_proc_per_process) > 1 else "–"
        L.append(f"| `{o.spec.id}` | " + " | ".join(cells) + f" | {per} |")
    L.append("")
    others = [o.cpu_c32.get("other", 0.0) for o in outs if o.cpu_c32]
    if others and max(others) >= 0.2:
        L.append(f"**Noisy machine:** processes outside the benchmark used {min(others):.2f}–{max(others):.2f} of the 2 cores "
                 "during the c=32 cells of this run; absolute numbers are lower and p99s wider than on a quiet machine.")
        L.append("")
    L.append("Cores used per component (CPU seconds / wall seconds; the machine has 2). `other` is everything else that ran on "
             "the machine meanwhile (not part of the benchmark): the closer to 0, the cleaner the numbers. The client shares "
             "the machine with the system under test; every configuration pays the same client.")
    L.append("")
    L += cpu_per_call_section(outs, [x for x in (best, redis, journal) if x is not None])
    # -- evidence
    checks = [o for o in outs if o.ledger]
    if checks:
        L.append("## Enforcement really ran")
        L.append("")
        L.append("Every call was reserved and settled: the store's ledger after each extproc configuration, against the 200s the client saw "
                 "(warm-up and pre-flight included).")
        L.append("")
        for o in checks:
            g = o.ledger
            if "error" in g:
                L.append(f"- `{o.spec.id}`: ledger not read ({g['error']})")
            else:
                cut = f" (wrk cut off at most {g['cut_by_wrk']} in flight at its deadlines)" if g.get("cut_by_wrk") else ""
                L.append(f"- `{o.spec.id}`: {g['client_200s']} responses, ledger {g['ledger']}{cut} — {'match' if g['match'] else '**MISMATCH**'}")
        L.append("")
    L.append("## Notes")
    L.append("")
    L.append("- Envoy without the filter: the shipped `envoy/envoy.yaml` with `envoy.filters.http.header_mutation` and "
             "`envoy.filters.http.ext_proc` removed, derived at run time (`bench/run.py: bare_envoy_config`). All Envoys run with "
             "`--concurrency 2` and the shipped access log.")
    L.append("- The no-op ext_proc (`bench/noop_ext_proc.py`) runs on grpc.aio (`noop-*`, the baseline issue 14 names), on "
             "extproc's own gRPC server (`noop-own-*`) or on the grpclib library extproc served on before (`noop-grpclib-*`), and answers every phase with an empty "
             "CommonResponse; SSE responses are switched to FULL_DUPLEX_STREAMED with `mode_override` (chunks echoed), as extproc does.")
    L.append("- Policy: one key with key, team and org cost budgets of $1,000,000 (nothing is refused), so every call takes the full "
             "path: identity, early budget check, body parse, token estimate, atomic reservation across three budgets, settle from "
             "`usage` (JSON) or from the parsed stream (SSE, with `include_usage` injected and stripped again).")
    L.append("- Redis: `redis-server` with AOF, `appendfsync everysec`, over TCP on loopback.")
    L.append("- LiteLLM: `litellm --config` (1 uvicorn worker, its default), the mock backend as `openai/gpt-4o` with `api_base`; "
             "auth by master key; `litellm_settings.max_budget` set. Its per-key/team budgets (virtual keys) need a Postgres "
             "database, which cannot be provisioned here (Prisma downloads its engines at run time), and without one LiteLLM "
             "states that the proxy-wide budget is not enforced: so this is LiteLLM as a plain proxy with cost tracking, the "
             "cheapest LiteLLM there is. Installed into its own venv (`bench/out/litellm-venv`) because `litellm[proxy]` "
             "downgrades `openai` and adds `uvloop`, which would change the project venv.")
    L.append("- Machine noise: other processes shared the 2 cores during this run if the load average above is well over 0; "
             "compare rows of one run only.")
    return "\n".join(L) + "\n"


OPTIMISATIONS = HERE / "optimisations.md"


def optimisations_table() -> list[str]:
    """The code changes, each measured in process before and after it (bench/optimisations.md, kept by hand)."""
    if not OPTIMISATIONS.exists():
        return []
    text = OPTIMISATIONS.read_text().strip().splitlines()
    body = [line for line in text if not line.startswith("# ")]  # its own title is replaced by this section's
    while body and not body[0].strip():
        body.pop(0)
    return [*body, ""]


def wrk_seconds(duration: float) -> float:
    return max(2.0, round(duration / 2))


def wrk_section(outs: list[Outcome], envoy: Outcome | None, bench_duration: float) -> list[str]:
    L = ["## Second load generator: wrk", ""]
    measured = [o for o in outs if not o.error and "wrk_c32" in o.cells]
    if not measured:
        L += [f"**{wrk.missing_note()}.**" if wrk.binary() is None else "**wrk was not run (`--no-wrk`).**", ""]
        return L
    L.append("The same JSON request, driven by `wrk -t 1` (C, epoll; body and headers from a generated Lua script) in the same closed "
             f"loop, 1 and 32 connections, {wrk_seconds(bench_duration):g} s cells (half of bench/load.py's, to keep `make bench` under "
             "10 minutes), right after bench/load.py's cells. wrk measures total latency only.")
    L.append("")
    L.append("| configuration | c=1 p50 | c=1 p99 | c=1 rps | c=32 p50 | c=32 p99 | c=32 rps | + c=1 p50 vs Envoy | c=32 rps vs no-op | errors |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for o in measured:
        noop = noop_for(outs, o.spec) if o.spec.filter == "extproc" else None
        vs_noop = f"{100 * o.get('wrk_c32', 'rps') / noop.get('wrk_c32', 'rps'):.0f}%" if noop and "wrk_c32" in noop.cells else "–"
        add = _d(o.get("wrk_c1", "p50_ms") - envoy.get("wrk_c1", "p50_ms")) if envoy is not None and o is not envoy else "–"
        errs = int(o.cells["wrk_c1"].get("errors", 0)) + int(o.cells["wrk_c32"].get("errors", 0))
        L.append(f"| `{o.spec.id}` | {_f(o.get('wrk_c1', 'p50_ms'))} | {_f(o.get('wrk_c1', 'p99_ms'))} | {_f(o.get('wrk_c1', 'rps'), 0)} | "
                 f"{_f(o.get('wrk_c32', 'p50_ms'))} | {_f(o.get('wrk_c32', 'p99_ms'))} | {_f(o.get('wrk_c32', 'rps'), 0)} | {add} | {vs_noop} | {errs} |")
    L.append("")
    return L


GATEWAY = ("envoy", "ext_proc", "redis")  # what an operator sizes: the proxy, the service, the store


def cpu_per_call(o: Outcome, cell: str) -> dict[str, float] | None:
    """CPU-ms per completed call, per component, over one cell (None if not measured)."""
    cpu, n = o.cpu_s.get(cell), int(o.cells.get(cell, {}).get("requests", 0))
    if not cpu or not n:
        return None
    return {k: 1000 * v / n for k, v in cpu.items()}


def cpu_per_call_section(outs: list[Outcome], sized: list[Outcome]) -> list[str]:
    L = ["## CPU per call and sizing (JSON, c=32)", ""]
    L.append("CPU-ms per completed call for each component: utime+stime from /proc/<pid>/stat (the process and its children) "
             "before and after the cell, divided by the calls completed in it. `store` is redis-server; the embedded (SQLite) "
             "and journal stores run inside the service and are counted there. calls/s per core = 1000 / CPU-ms.")
    L.append("")
    L.append("| configuration | load generator | calls | Envoy ms | service ms | store ms | gateway total ms | calls/s per core (gateway) "
             "| service calls/s per core |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for o in outs:
        if o.error or o.spec.kind != "envoy" or o.spec.filter is None:
            continue
        for cell, gen in (("json_c32", "bench/load.py"), ("wrk_c32", "wrk")):
            per = cpu_per_call(o, cell)
            if per is None:
                continue
            total = sum(per.get(k, 0.0) for k in GATEWAY)
            store = f"{per['redis']:.3f}" if o.spec.store == "redis" and "redis" in per and o.spec.filter == "extproc" else "–"
            svc = per.get("ext_proc", 0.0)
            L.append(f"| `{o.spec.id}` | {gen} | {o.cells[cell]['requests']} | {per.get('envoy', 0.0):.3f} | {svc:.3f} | {store} | "
                     f"{total:.3f} | {1000 / total:.0f} | {1000 / svc:.0f} |" if total and svc else
                     f"| `{o.spec.id}` | {gen} | {o.cells[cell]['requests']} | – | – | – | – | – | – |")
    L.append("")
    for o in sized:
        per = cpu_per_call(o, "json_c32")
        if per is None or not per.get("ext_proc"):
            continue
        env, svc, st = per.get("envoy", 0.0), per["ext_proc"], per.get("redis", 0.0) if o.spec.store == "redis" else 0.0
        store_txt = (f", Redis {st:.2f} ms ({1000 / st:,.0f} calls/s per core)" if st else f", the {o.spec.store} store inside the service")
        L.append(f"Sizing (`{o.spec.id}`): per metered JSON call the service uses {svc:.2f} CPU-ms ({1000 / svc:,.0f} calls/s per core), "
                 f"Envoy {env:.2f} ms ({1000 / env:,.0f} calls/s per core){store_txt}. For N calls/s: "
                 f"service cores ≈ N × {svc / 1000:.5f}, Envoy cores ≈ N × {env / 1000:.5f}"
                 + (f", Redis cores ≈ N × {st / 1000:.5f}" if st else "") + "; add headroom for p99, as the table above shows at full load.")
        L.append("")
    return L


def chart(bench: Bench, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart (pip install matplotlib)"
    outs = [o for o in bench.outcomes if not o.error]
    if not outs:
        return "nothing measured"
    best = headline(bench.outcomes)
    labels = [o.spec.id for o in outs]
    colors = ["#d62728" if o is best else ("#9e9e9e" if o.spec.ablation else "#1f77b4") for o in outs]
    panels = [("JSON c=1 p50 latency (ms)", lambda o: o.get("json_c1", "p50_ms")),
              ("JSON c=32 throughput (req/s)", lambda o: o.get("json_c32", "rps")),
              ("SSE TTFB p50, c=1 (ms)", lambda o: o.get("sse_c1", "ttfb_p50_ms")),
              ("JSON c=32 p99 latency (ms)", lambda o: o.get("json_c32", "p99_ms"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 0.45 * len(outs) + 2.2), sharey=True)
    ys = list(range(len(outs)))[::-1]
    for ax, (title, fn) in zip(axes, panels):
        vals = [fn(o) for o in outs]
        ax.barh(ys, [0 if v != v else v for v in vals], color=colors)
        for y, v in zip(ys, vals):
            if v == v:
                ax.text(v, y, f" {v:.0f}" if v >= 100 else f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.25)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=9)
    m = machine()
    fig.suptitle(f"extproc benchmark — {m['cpu']}, {m['nproc']} cores, {m['date']} (red: headline extproc; grey: ablations)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per JSON cell (default %(default)s)")
    ap.add_argument("--stream-duration", type=float, default=6.0, help="seconds per SSE cell (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per configuration (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="2 s cells, 1 s warm-up: checks the harness, numbers are rough")
    ap.add_argument("--only", default="", help="comma-separated configuration ids (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--no-wrk", action="store_true", help="bench/load.py only, even if wrk is installed")
    ap.add_argument("--no-install-litellm", action="store_true", help="do not create bench/out/litellm-venv if LiteLLM is missing")
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args(argv)
    if args.list:
        for s in first_specs() + second_specs(None):
            print(f"{s.id:24s} {s.label}")
        return 0
    if args.quick:
        args.duration, args.stream_duration, args.warmup = 2.0, 2.0, 1.0
    os.chdir(ROOT)
    load_before = Path("/proc/loadavg").read_text().split()[0]
    bench = Bench(args)
    t0 = time.monotonic()
    bench.run()
    elapsed = time.monotonic() - t0
    load_after = Path("/proc/loadavg").read_text().split()[0]
    out = Path(args.out)
    md = report(bench, elapsed, load_before, load_after)
    try:  # the cost of growing reservations during a stream (issue 12), beside the table
        md += "\n" + "\n".join(asyncio.run(growth_cost.run(2000, 1.0, 3))) + "\n"
    except Exception as e:  # a failed side measurement is reported, not fatal
        md += f"\n## Cost of extensions\n\n**not measured**: {type(e).__name__}: {e}\n"
    note = chart(bench, out.with_suffix(".png"))
    if note:
        md += f"\nChart: {note}\n"
    out.write_text(md)
    raw = {"machine": machine(), "args": vars(args), "elapsed_s": round(elapsed, 1),
           "outcomes": [{"spec": asdict(o.spec), "cells": o.cells, "cpu_c32": o.cpu_c32, "cpu_s": o.cpu_s, "ext_proc_per_process": o.ext_proc_per_process, "error": o.error, "ledger": o.ledger} for o in bench.outcomes]}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    print(md)
    bench.log(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.json')}")
    return 1 if any(o.error and o.spec.kind != "litellm" for o in bench.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
