"""Wiring: build the store, the engine and the gRPC server (ext_proc, ext_authz,
grpc.health.v1); run the reaper and the policy reloader. The only module (with
cli.py) that picks a concrete store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from . import startup
from .engine.alerts import Alerter
from .engine.budget import Engine
from .policy.loader import PolicyHolder
from .server import metrics
from .server.admin import load_token, make_admin_app, make_metrics_app, start_admin
from .server.callers import CallerGate
from .server.ext_authz import Authorization
from .server.ext_proc import ExternalProcessor
from .server.grpc_server import DEFAULT_SOCKET_MODE, GrpcServer
from .server.health import StoreHealth
from .server.services import Services
from .server.tally import FLUSH_S
from .server.webhooks import aiohttp_post
from .stores import parse_url, redacted
from .stores.base import Store
from .tokenizers import get_encoding

if TYPE_CHECKING:  # the cost-rate service is imported only when a policy has self-hosted backends
    from .costrate import CostRates, RateSink

log = logging.getLogger("extproc")

def open_store(url: str) -> Store:
    """The store a URL names (see `stores.parse_url`)."""
    kind, target = parse_url(url)
    if kind == "sqlite":
        from .stores.embedded import EmbeddedStore

        return EmbeddedStore(target)
    if kind == "journal":
        from .stores.journal import JournalStore

        return JournalStore(target)
    from .stores.redis_store import RedisStore

    return RedisStore(target, cluster=kind == "cluster")


TRIM_EVERY_S = 60.0  # the ledger retention is enforced this often


async def _reaper(engine: Engine, holder: PolicyHolder, interval: float) -> None:
    """Expire reservations whose owner vanished (DESIGN.md lifecycle step 6) and trim
    the ledger past the policy's retention. Every worker process (and pod) runs this
    loop, but only the one holding the store's reaper lease does the work."""
    owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    last_trim = float("-inf")
    while True:
        await asyncio.sleep(interval)
        try:
            retention = None
            days = holder.current.ledger_retention_days
            if days and time.monotonic() - last_trim >= TRIM_EVERY_S:
                retention = days * 86_400_000
            n = await engine.reap(owner, lease_ms=int(interval * 5000), ledger_retention_ms=retention)
            if n is not None and retention is not None:
                last_trim = time.monotonic()
            if n:
                log.warning("expired %d reservation(s) past their TTL at the reserved amount", n)
        except Exception as e:  # the store may be down; try again next tick
            log.error("reaper: %s", e)


async def _watch_policy(holder: PolicyHolder, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        if holder.changed_on_disk():
            holder.reload()


async def _flush_metrics(interval: float) -> None:
    """With several workers a scrape reads their shared files: apply this worker's tally to them."""
    while True:
        await asyncio.sleep(interval)
        try:
            metrics.TALLY.flush()
        except Exception:  # e.g. a full metrics directory: the next flushes must still run
            log.exception("this worker's metrics could not be written to the shared files")


def _cost_rates(holder: PolicyHolder, store_url: str) -> CostRates | None:
    """Live cost rates of the policy's self-hosted backends (None when it has none)."""
    spec = holder.current.self_hosted
    if not spec.backends:
        return None
    from .costrate import CostRates, PrometheusGauges, open_rate_publisher

    sampler_sinks: list[RateSink] = []
    if spec.kubernetes_status:
        from .costrate.k8s import KubernetesStatusPublisher

        sampler_sinks.append(KubernetesStatusPublisher(spec))
    rates = CostRates(spec, store=open_rate_publisher(store_url), sinks=[PrometheusGauges.default()], sampler_sinks=sampler_sinks)
    rates.start()
    return rates


async def serve(
    policy_path: str | Path,
    store_url: str,
    grpc_addr: str,
    *,
    admin_addr: str | None = None,
    admin_token_file: str | None = None,
    caller_token_file: str | None = None,
    allow_unauthenticated_callers: bool = False,
    reap_interval: float = 1.0,
    socket_mode: int | None = None,
    shutdown_grace: float = 30.0,
    metrics_addr: str | None = None,
    health_interval: float = 2.0,
) -> None:
    callers = CallerGate.configure(grpc_addr, caller_token_file, allow_unauthenticated=allow_unauthenticated_callers)
    admin_tokens = load_token(admin_token_file) if admin_addr else None
    holder = PolicyHolder.from_file(policy_path)
    for enc in {m.encoding for m in holder.current.prices.models.values()}:
        get_encoding(enc)  # load BPE ranks now, not on the first request
    store = open_store(store_url)
    engine = Engine(store)
    rates = _cost_rates(holder, store_url)
    services = Services(holder, engine, rates=rates)
    services.alerts = Alerter(engine, services.spawn, post=aiohttp_post)
    health = StoreHealth(engine.ping, interval=health_interval)  # no caller token: probes carry none (see server/health.py)
    server = GrpcServer([ExternalProcessor(services, callers), Authorization(services, callers)], always=[health])
    await health.start()
    await server.start(grpc_addr, socket_mode=DEFAULT_SOCKET_MODE if socket_mode is None else socket_mode)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, holder.reload)
    tasks = [
        asyncio.create_task(_reaper(engine, holder, reap_interval)),
        asyncio.create_task(_watch_policy(holder, 1.0)),
    ]
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        tasks.append(asyncio.create_task(_flush_metrics(FLUSH_S)))
    admin_runner = None
    if admin_addr and admin_tokens is not None:
        admin_runner = await start_admin(make_admin_app(engine, holder, admin_tokens, services.decisions), admin_addr)
        log.info("admin API on http://%s", admin_addr)
    metrics_runner = None
    if metrics_addr:
        metrics_runner = await start_admin(make_metrics_app(), metrics_addr)
        log.info("metrics on http://%s/metrics", metrics_addr)
    unauthenticated = callers.tokens is None and not callers.trusted_without_token
    log.log(logging.WARNING if unauthenticated else logging.INFO, "gRPC callers: %s", callers.describe())
    log.info("extproc serving ext_proc on %s (store %s, policy %s)", grpc_addr, redacted(store_url), policy_path)
    startup.settle()  # what start-up built (modules, the policy, BPE ranks, the store) frozen
    print(f"extproc listening {grpc_addr}", flush=True)
    await stop.wait()
    # Graceful stop: health turns NOT_SERVING, no new calls are accepted, and the calls in
    # flight (a streamed response's ext_proc stream lasts as long as the stream) get up to
    # shutdown_grace seconds to finish before they are cancelled.
    log.info("stopping: %g s for the calls in flight", shutdown_grace)
    await health.stop()
    await server.stop(shutdown_grace)
    for runner in (admin_runner, metrics_runner):
        if runner is not None:
            await runner.cleanup()
    for t in tasks:
        t.cancel()
    if rates is not None:
        await rates.close()
    if services.background:
        await asyncio.wait(services.background, timeout=5)
    await engine.close()
    metrics.TALLY.flush()
