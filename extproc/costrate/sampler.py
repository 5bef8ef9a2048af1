"""Sample one backend's metrics over HTTP and turn them into a ``CostRate``.

The only I/O of the package besides publishing: an aiohttp GET of the DCGM
exporter's (and vLLM's) ``/metrics``. Parsing is ``prometheus``, arithmetic is
``formula``. An unreachable, slow, oversized or malformed page never fails a
sample: power falls back to TDP x GPUs and the rate says so
(``source == "tdp_fallback"``, ``reason``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal

import aiohttp

from ..errors import UpstreamError
from ..policy.selfhosted import SelfHostedBackend
from . import prometheus
from .formula import CostRate, TokenMeter, cost_rate

log = logging.getLogger("extproc.costrate")

POWER = "DCGM_FI_DEV_POWER_USAGE"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"


class Sampler:
    """Samples one self-hosted backend. Keeps the token counter history between samples.

    ``session``: an aiohttp session to reuse (else one is created and owned).
    ``clock``: monotonic seconds for the token rate; ``wall``: epoch seconds stamped on the rate.
    """

    def __init__(
        self,
        backend: str,
        spec: SelfHostedBackend,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.spec = spec
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.meter = TokenMeter(spec.token_window_seconds)
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._wall = wall

    async def _get(self, url: str) -> list[prometheus.Sample]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(url, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise UpstreamError(f"GET {url}: HTTP {resp.status}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > prometheus.MAX_BYTES:
                    raise UpstreamError(f"GET {url}: metrics larger than {prometheus.MAX_BYTES} bytes")
                chunks.append(chunk)
        return prometheus.parse(b"".join(chunks))

    async def _fetch(self, url: str | None) -> tuple[list[prometheus.Sample] | None, str | None]:
        """The samples at ``url``, or None and why not."""
        if url is None:
            return None, "no metrics_url configured"
        try:
            return await self._get(url), None
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return None, f"{url} unreachable: {type(e).__name__}: {e}".rstrip(": ")
        except UpstreamError as e:
            return None, f"{url} unusable: {e}"

    async def sample(self) -> CostRate:
        spec = self.spec
        power_samples, reason = await self._fetch(spec.metrics_url)
        if spec.token_url == spec.metrics_url:
            token_samples = power_samples
        else:
            token_samples, _ = await self._fetch(spec.token_url)
        now = self._clock()

        power: Decimal | None = None
        if power_samples is not None:
            power = prometheus.total(power_samples, POWER)
            if power is None:
                reason = f"{spec.metrics_url} has no {POWER} samples"
            else:
                n = sum(1 for _ in prometheus.select(power_samples, POWER))
                if n != spec.gpu_count:
                    log.warning("%s: %d GPUs report %s, the policy says %d", self.backend, n, POWER, spec.gpu_count)
        if power is None:
            log.warning("%s: cost rate at TDP x GPUs: %s", self.backend, reason)

        tph: int | None = None
        if token_samples is not None:
            prompt = prometheus.total(token_samples, PROMPT_TOKENS)
            gen = prometheus.total(token_samples, GENERATION_TOKENS)
            if prompt is not None or gen is not None:
                tph = self.meter.observe((prompt or Decimal(0)) + (gen or Decimal(0)), now)

        return cost_rate(self.backend, spec, power_watts=power, tokens_per_hour=tph, sampled_at=self._wall(), reason=reason)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None
