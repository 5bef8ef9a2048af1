"""Command line: `extproc serve | stack | mock-backend | policy check`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, TextIO

from . import logs, startup

if TYPE_CHECKING:
    from .engine.budget import Engine
    from .policy.model import Policy

DEFAULT_STORE = "sqlite:var/budget.db"


@startup.collector_paused()  # until app.serve is ready (startup.settle), in the one process or each spawned worker
def _serve_one(
    args: argparse.Namespace, admin: str | None, log: tuple[str, str] | None = None, metrics: str | None = None
) -> None:
    from .app import serve

    if log is not None:  # a spawned worker starts with no logging configured
        logs.setup(*log)

    # asyncio's own loop, whatever else is installed: what is tested and measured (uvloop brought no
    # consistent gain, bench/optimisations.md), and a loop that changed with the machine hid a bug once
    asyncio.run(
        serve(
            args.policy, args.store, args.grpc, admin_addr=admin, admin_token_file=args.admin_token_file,
            caller_token_file=args.caller_token_file, allow_unauthenticated_callers=args.allow_unauthenticated_callers,
            socket_mode=args.socket_mode, shutdown_grace=args.shutdown_grace, metrics_addr=metrics,
            health_interval=args.health_interval,
        )
    )


def _check_serve_settings(args: argparse.Namespace) -> None:
    """Refuse to start (once, before any worker) on unsafe or unreadable settings."""
    from .errors import ConfigError
    from .server.callers import CallerGate
    from .stores import parse_url

    with contextlib.suppress(ValueError):  # an unknown URL is refused when the store opens
        if args.workers > 1 and parse_url(args.store)[0] == "journal":
            raise ConfigError(
                f"--store {args.store} keeps its counters in one process: it cannot serve --workers {args.workers} "
                "(use --workers 1, or sqlite:PATH / redis:// for several worker processes)"
            )

    CallerGate.configure(args.grpc, args.caller_token_file, allow_unauthenticated=args.allow_unauthenticated_callers)
    if args.admin:
        from .server.admin import load_token  # aiohttp, the engine, the policy: ~0.6 CPU-s a refusal above need not pay

        load_token(args.admin_token_file)


def _serve(args: argparse.Namespace) -> int:
    """One process per core is the scaling unit: N workers share the gRPC port (SO_REUSEPORT)."""
    from .errors import ConfigError

    try:
        _check_serve_settings(args)
    except ConfigError as e:
        print(f"extproc serve: {e}", file=sys.stderr)
        return 2
    if args.workers <= 1:
        _serve_one(args, args.admin, metrics=args.metrics)
        return 0
    if args.grpc.startswith("unix:"):
        raise SystemExit("--workers > 1 needs a TCP --grpc address (a Unix socket path cannot be shared)")
    import multiprocessing as mp
    import shutil
    import tempfile

    # Metrics of all workers are aggregated by the admin endpoint of worker 0, through files
    # in a fresh directory under --state-dir: under readOnlyRootFilesystem there is no
    # writable /tmp, so the image points it at a mounted emptyDir / tmpfs.
    try:
        metrics_dir = tempfile.mkdtemp(prefix="extproc-metrics-", dir=args.state_dir)
    except OSError as e:
        print(f"extproc serve: --workers needs a writable --state-dir ({args.state_dir or tempfile.gettempdir()}): {e}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
    ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC state
    workers = [
        ctx.Process(
            target=_serve_one,
            args=(args, args.admin if i == 0 else None, (args.log_level, args.log_format or "json"),
                  args.metrics if i == 0 else None),
            daemon=False,
        )
        for i in range(args.workers)
    ]
    for w in workers:
        w.start()

    def forward(signum: int, frame: object) -> None:
        for w in workers:
            if w.pid and w.is_alive():
                os.kill(w.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    status = 0
    for w in workers:
        w.join()
        status = status or (w.exitcode or 0)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _name_port(text: str) -> tuple[str, int]:
    name, sep, port = text.rpartition("=")
    if not sep or not name or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT, got {text!r}")
    return name, int(port)


@startup.collector_paused()  # until the mock listens (startup.settle)
def _mock_backend(args: argparse.Namespace) -> int:
    from .mock_backend import MockConfig, run

    config = MockConfig(token_delay_ms=args.token_delay_ms, name=args.name, gpus=args.gpus, tdp_watts=args.tdp_watts)
    run(args.host, args.port, config, metrics_port=args.metrics_port, also=dict(args.also))
    return 0


def _stack(args: argparse.Namespace) -> int:
    from .stack import Stack

    stack = Stack(policy=args.policy, port=args.port, store=args.store, token_delay_ms=args.token_delay_ms, quiet=not args.verbose)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack.start()
    print(f"ready {stack.url}", flush=True)
    try:
        while not stop:
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; stopping (logs in {stack.workdir})", file=sys.stderr)
                    stop = True
            time.sleep(0.2)
    finally:
        stack.stop()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.policy)


def _admin_engine(args: argparse.Namespace) -> tuple[Engine, Policy]:
    from .app import open_store
    from .engine.budget import Engine
    from .policy.loader import load_policy

    return Engine(open_store(args.store)), load_policy(args.policy)


def _budgets(args: argparse.Namespace) -> int:
    import json

    from .server import admin

    async def run() -> object:
        engine, policy = _admin_engine(args)
        try:
            if args.budgets_command == "list":
                return await admin.budgets(engine, policy, args.principal, args.run)
            if args.budgets_command == "close-run":
                return await admin.close_run(engine, policy, principal=args.principal, run=args.run)
            return await admin.adjust(
                engine, policy, principal=args.principal, scope=args.scope, dimension=args.dimension,
                set_limit=args.value if args.budgets_command == "set-limit" else None,
                credit=args.value if args.budgets_command == "credit" else None,
                window=args.window, run=args.run,
            )
        finally:
            await engine.close()

    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


def _ledger_export(args: argparse.Namespace) -> int:
    """Page by page from the store to the file: the ledger is never held whole."""
    from .app import open_store
    from .engine.budget import Engine
    from .ledger import parse_since
    from .server.admin import export_ledger

    async def run(out: TextIO) -> int:
        async def write(text: str) -> None:
            out.write(text)

        engine = Engine(open_store(args.store))
        try:
            return await export_ledger(engine, since_ms=parse_since(args.since), fmt=args.format, write=write)
        finally:
            await engine.close()

    if args.out:
        with open(args.out, "w", newline="") as f:
            n = asyncio.run(run(f))
        print(f"wrote {n} ledger entries to {args.out}", file=sys.stderr)
    else:
        asyncio.run(run(sys.stdout))
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    from .errors import PolicyError
    from .policy.loader import load_policy

    status = 0
    for path in args.files:
        try:
            p = load_policy(path)
        except PolicyError as e:
            print(e, file=sys.stderr)
            status = 1
        else:
            print(f"{path}: ok ({len(p.prices.models)} models, {len(p.keys)} keys, {len(p.budgets)} budgets)")
    return status


def _policy_schema(args: argparse.Namespace) -> int:
    import json

    from .policy.model import Policy

    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def _octal_mode(text: str) -> int:
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(text)
    return mode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extproc", description="Budget enforcement for LLM traffic behind Envoy ext_proc.")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=("json", "text"), default=None,
                   help="json (default for serve: one object per line) or text (default for the other commands)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ext_proc gRPC service")
    s.add_argument("--policy", required=True, help="policy YAML file")
    s.add_argument("--store", default=DEFAULT_STORE,
                   help="sqlite:PATH (default %(default)s), journal:DIR (one process), redis://HOST:PORT, redis+cluster://HOST:PORT")
    s.add_argument("--grpc", default="127.0.0.1:50051", help="host:port or unix:/path (default %(default)s)")
    s.add_argument("--socket-mode", type=_octal_mode, default=None,
                   help="file mode of a unix: --grpc socket, octal (default 0666: the pod-private emptyDir is the "
                        "boundary, so the pod's Envoy, another uid, can connect; 0660 with a shared fsGroup)")
    s.add_argument("--workers", type=int, default=1, help="worker processes sharing the gRPC port (TCP only)")
    s.add_argument("--state-dir", default=os.environ.get("EXTPROC_STATE_DIR") or None,
                   help="writable directory for the workers' shared metrics files (--workers > 1); default "
                        "$EXTPROC_STATE_DIR, else the system temp dir. Mount an emptyDir / tmpfs there under a "
                        "read-only root filesystem")
    s.add_argument("--admin", default=None, help="admin HTTP host:port (metrics, budgets, ledger); keep it on loopback")
    s.add_argument("--metrics", default=None,
                   help="host:port serving only GET /metrics (e.g. 0.0.0.0:9464 for Prometheus), apart from --admin, "
                        "which keeps budgets and the ledger on loopback")
    s.add_argument("--admin-token-file", default=None,
                   help="file holding the admin bearer token(s), one per line, re-read when it changes (else $EXTPROC_ADMIN_TOKEN)")
    s.add_argument("--caller-token-file", default=os.environ.get("EXTPROC_CALLER_TOKEN_FILE") or None,
                   help="file holding the token(s) Envoy must send in gRPC metadata x-extproc-caller-token, one per line, "
                        "re-read when it changes (default $EXTPROC_CALLER_TOKEN_FILE). Required on a TCP --grpc address")
    s.add_argument("--allow-unauthenticated-callers", action="store_true",
                   help="serve a TCP --grpc address without a caller token: for local development only, or a port that "
                        "nothing but the pod's own Envoy can reach (prefer a unix: socket, which needs no token). "
                        "Principals then come from API keys only")
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds the calls in flight get to finish after SIGTERM (default %(default)s); "
                        "at least the longest stream you allow, and below the pod's terminationGracePeriodSeconds")
    s.add_argument("--health-interval", type=_positive_seconds, default=2.0,
                   help="seconds between the store pings behind grpc.health.v1 (default %(default)s): how soon "
                        "health turns NOT_SERVING when the store goes away, and SERVING when it is back")
    s.set_defaults(fn=_serve)

    m = sub.add_parser("mock-backend", help="run the mock GPU inference backend (OpenAI + Anthropic APIs)")
    m.add_argument("--port", type=int, default=8000)
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--name", default="mock")
    m.add_argument("--token-delay-ms", type=float, default=0.0)
    m.add_argument("--gpus", type=int, default=1)
    m.add_argument("--tdp-watts", type=float, default=700.0)
    m.add_argument("--metrics-port", type=int, default=None,
                   help="also serve only /metrics on this port (like a DCGM exporter beside the inference port)")
    m.add_argument("--also", action="append", type=_name_port, default=[], metavar="NAME=PORT",
                   help="serve another backend named NAME on PORT from this process (its own counters); repeatable")
    m.set_defaults(fn=_mock_backend)

    st = sub.add_parser("stack", help="run mock backend + service + Envoy locally until SIGINT/SIGTERM")
    st.add_argument("--policy", required=True)
    st.add_argument("--port", type=int, default=10000)
    st.add_argument("--store", default=None, help="default: a fresh sqlite file in a temp dir")
    st.add_argument("--token-delay-ms", type=float, default=5.0)
    st.add_argument("--verbose", action="store_true", help="show the children's logs")
    st.set_defaults(fn=_stack)

    b = sub.add_parser("budgets", help="list budgets, set or credit limits, close runs (directly on the store)")
    bsub = b.add_subparsers(dest="budgets_command", required=True)
    for name, helptext in (
        ("list", "a principal's budgets with limit, spent, reserved, remaining"),
        ("set-limit", "set (raise or lower) a limit; cost in USD"),
        ("credit", "add to a limit (top up); cost in USD"),
        ("close-run", "refuse every further call of a run"),
    ):
        c = bsub.add_parser(name, help=helptext)
        c.add_argument("--policy", required=True)
        c.add_argument("--store", default=DEFAULT_STORE)
        c.add_argument("--principal", required=True)
        c.add_argument("--run", default=None, required=name == "close-run")
        if name in ("set-limit", "credit"):
            c.add_argument("--scope", required=True, help="key | team | org | user | run | label:<name>")
            c.add_argument("--dimension", default="cost")
            c.add_argument("--window", default=None)
            c.add_argument("value", help="USD for cost (e.g. 5.00), an integer otherwise")
        c.set_defaults(fn=_budgets)

    lg = sub.add_parser("ledger", help="ledger tools")
    lsub = lg.add_subparsers(dest="ledger_command", required=True)
    ex = lsub.add_parser("export", help="export ledger entries for chargeback")
    ex.add_argument("--store", default=DEFAULT_STORE)
    ex.add_argument("--since", default="0", help="ISO date/time (UTC) or epoch ms")
    ex.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    ex.add_argument("--out", default=None, help="file (default stdout)")
    ex.set_defaults(fn=_ledger_export)

    d = sub.add_parser("demo", help="start the local stack and narrate a budget scenario")
    d.add_argument("--policy", default="policies/demo.yaml")
    d.set_defaults(fn=_demo)

    pol = sub.add_parser("policy", help="policy tools")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    c = psub.add_parser("check", help="validate policy files and print precise errors")
    c.add_argument("files", nargs="+")
    c.set_defaults(fn=_policy_check)
    sc = psub.add_parser("schema", help="print the policy JSON Schema (for editors)")
    sc.set_defaults(fn=_policy_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format or ("json" if args.command == "serve" else "text"))
    return int(args.fn(args) or 0)
