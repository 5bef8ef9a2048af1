"""The standard gRPC health service (`grpc.health.v1.Health`), fed by a store probe.

Kubernetes `grpc:` probes, `grpc_health_probe` and Envoy's gRPC health checks
ask it. It answers SERVING while the budget store answers a ping, and
NOT_SERVING from the first failed or slow ping until one succeeds again: a
pod whose store is unreachable would refuse every metered request (fail
closed), so it should leave the load balancer's rotation.

Probes send no caller token, and need none: the service says nothing about
budgets or principals. The token gate (callers.py) guards only the ext_proc
and ext_authz servicers. The empty service name "" and the two servicer names
all report the store's status; "liveness" reports SERVING until shutdown (a
liveness probe must not restart pods because Redis is away).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from grpc_health.v1 import health_pb2

from .grpc_server import GRPCError, Handler, Status

log = logging.getLogger("extproc.health")

SERVICES = ("", "envoy.service.ext_proc.v3.ExternalProcessor", "envoy.service.auth.v3.Authorization")
LIVENESS = "liveness"  # SERVING while the process serves gRPC at all, whatever the store says
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class StoreHealth:
    """The health service (handlers of grpc_server.py: Check and Watch) and the periodic probe that sets its status."""

    def __init__(self, ping: Callable[[], Awaitable[None]], *, interval: float = 2.0, timeout: float = 1.0) -> None:
        self.ping = ping
        self.interval = interval
        self.timeout = timeout
        self.serving: bool | None = None  # unknown until the first probe
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()  # set and replaced on every change: wakes the watchers
        self._shutting_down = False
        self._task: asyncio.Task[None] | None = None

    def set(self, service: str, status: int) -> None:
        if self._shutting_down or self._status.get(service) == status:
            return
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    async def probe(self) -> bool:
        """Ping the store once and publish the result; True when it answered in time."""
        try:
            await asyncio.wait_for(self.ping(), self.timeout)
            ok = True
        except Exception as e:
            ok = False
            if self.serving is not False:
                log.error("store unreachable, health NOT_SERVING: %s", e or type(e).__name__)
        if ok and self.serving is False:
            log.warning("store reachable again, health SERVING")
        self.serving = ok
        for name in SERVICES:
            self.set(name, SERVING if ok else NOT_SERVING)
        return ok

    async def start(self) -> None:
        """Probe once now (the server must not say SERVING before it knows), then every `interval`."""
        self.set(LIVENESS, SERVING)
        await self.probe()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe()

    async def stop(self) -> None:
        """Say NOT_SERVING to every watcher (graceful shutdown) and stop probing."""
        if self._task is not None:
            self._task.cancel()
        for name in list(self._status):
            self.set(name, NOT_SERVING)
        self._shutting_down = True

    # -- grpc.health.v1.Health ----------------------------------------------------

    async def Check(self, stream: Any) -> None:
        request = await stream.recv_message()
        status = self._status.get(request.service)
        if status is None:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {request.service!r}")
        await stream.send_message(health_pb2.HealthCheckResponse(status=status))

    async def Watch(self, stream: Any) -> None:
        request = await stream.recv_message()
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await stream.send_message(health_pb2.HealthCheckResponse(status=status))
                last = status
            await changed.wait()

    def __mapping__(self) -> dict[str, Handler]:
        req, resp = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        return {
            "/grpc.health.v1.Health/Check": Handler(self.Check, req, resp),
            "/grpc.health.v1.Health/Watch": Handler(self.Watch, req, resp),
        }
