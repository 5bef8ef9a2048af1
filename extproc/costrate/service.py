"""``CostRates``: keeps every self-hosted backend's current rate, for the whole fleet.

Each refresh of a backend, in every process (sidecar, router, worker):

1. if this process may sample and wins the store's lease for the backend, it
   samples the metrics and writes the rate to the store (``RatePublisher``) and
   to ``sampler_sinks`` (the Kubernetes status: one writer, not one per pod);
2. otherwise it reads the rate the lease holder wrote;
3. either way the rate goes to ``sinks`` (the Prometheus gauges of this process)
   and to memory, where ``price_for_model`` / ``headers_for_backend`` read it
   without I/O on the request path.

So all sidecars use one value. A rate older than three sampling intervals
(the sampler died and nobody took over) is treated as unknown: the model is then
charged its static price from ``prices.models``. Without a store, every process
samples for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence

import aiohttp

from ..errors import StoreUnavailable
from ..money import Price
from ..policy.selfhosted import SelfHostedSpec
from .formula import CostRate
from .publish import RatePublisher, RateSink, response_headers
from .sampler import Sampler

log = logging.getLogger("extproc.costrate")

STALE_INTERVALS = 3


class CostRates:
    def __init__(
        self,
        spec: SelfHostedSpec,
        *,
        store: RatePublisher | None = None,
        sinks: Sequence[RateSink] = (),
        sampler_sinks: Sequence[RateSink] = (),
        sample: bool = True,
        owner: str | None = None,
        session: aiohttp.ClientSession | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.store = store
        self.sinks = tuple(sinks)
        self.sampler_sinks = tuple(sampler_sinks)
        self.sample = sample
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.samplers = {name: Sampler(name, b, session=session, wall=wall) for name, b in spec.backends.items()}
        self._wall = wall
        self._rates: dict[str, CostRate] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ request path (no I/O)

    def current(self, backend: str) -> CostRate | None:
        """The backend's rate, or None when unknown or stale."""
        rate = self._rates.get(backend)
        b = self.spec.backends.get(backend)
        if rate is None or b is None:
            return None
        if self._wall() - rate.sampled_at > STALE_INTERVALS * b.sample_interval_seconds:
            return None
        return rate

    def rate_for_model(self, model: str) -> CostRate | None:
        backend = self.spec.backend_of_model.get(model)
        return None if backend is None else self.current(backend)

    def price_for_model(self, model: str) -> Price | None:
        """The per-token price from the rate, or None: use the static price of ``prices.models``."""
        rate = self.rate_for_model(model)
        return None if rate is None else rate.price()

    def headers_for_backend(self, backend: str) -> list[tuple[str, str]]:
        """``x-backend-cost-rate-usd-per-hour`` (+ source) for a response that backend served."""
        if not self.spec.header:
            return []
        return response_headers(self.current(backend))

    def headers_for_model(self, model: str) -> list[tuple[str, str]]:
        backend = self.spec.backend_of_model.get(model)
        return [] if backend is None else self.headers_for_backend(backend)

    # ------------------------------------------------------------------ refresh

    async def refresh(self, backend: str) -> CostRate | None:
        b = self.spec.backends[backend]
        ttl = STALE_INTERVALS * b.sample_interval_seconds
        rate: CostRate | None = None
        sampled = False
        try:
            if self.store is None or not self.sample:
                leader = self.sample
            else:
                leader = await self.store.acquire(backend, self.owner, ttl)
            if leader:
                rate, sampled = await self.samplers[backend].sample(), True
                if self.store is not None:
                    await self.store.publish(rate)
            elif self.store is not None:
                rate = await self.store.read(backend)
        except StoreUnavailable as e:
            log.warning("cost rate of %s: store unavailable (%s)", backend, e)
            if self.sample and not sampled:
                rate, sampled = await self.samplers[backend].sample(), True
        if rate is None:
            return self.current(backend)
        self._rates[backend] = rate
        for sink in self.sinks + (self.sampler_sinks if sampled else ()):
            try:
                await sink.publish(rate)
            except Exception as e:  # a sink never stops the loop
                log.warning("cost rate of %s not published to %s: %s", backend, type(sink).__name__, e)
        return rate

    async def refresh_all(self) -> dict[str, CostRate | None]:
        return {name: await self.refresh(name) for name in self.spec.backends}

    async def _loop(self, backend: str) -> None:
        interval = self.spec.backends[backend].sample_interval_seconds
        while True:
            try:
                await self.refresh(backend)
            except Exception:
                log.exception("cost rate of %s: refresh failed", backend)
            await asyncio.sleep(interval)

    def start(self) -> None:
        """Refresh every backend in the background, each at its own interval."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._loop(name), name=f"costrate:{name}") for name in self.spec.backends]

    async def close(self) -> None:
        """Stop the loops and close the samplers, sinks and store given to this object."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for s in self.samplers.values():
            await s.close()
        for sink in self.sinks + self.sampler_sinks:
            await sink.close()
        if self.store is not None:
            await self.store.close()
