"""A simulated GPU whose utilisation and power follow the mock's load.

Energy-aware policies read DCGM gauges; the mock must make them move the way a
real node does: up under load, back to idle within seconds of the load stopping.

Utilisation is deterministic given the load:

    util = min(1, in_flight / (SLOTS_PER_GPU * gpus)
                  + tokens_in_last_window / (window_s * TOKENS_PER_S_PER_GPU * gpus))

so one in-flight request on one GPU already reads 1/8 = 12.5 %, and the token
term fades out ``window_s`` (2 s) after the last token. Power is
``idle + (tdp - idle) * util``; all GPUs share the load evenly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

SLOTS_PER_GPU = 8
"""Concurrent sequences that saturate one simulated GPU."""

TOKENS_PER_S_PER_GPU = 2000.0
"""Generation throughput that saturates one simulated GPU."""

GPU_MODEL = "NVIDIA H100 80GB HBM3"

_BUCKET_S = 0.1


class SimulatedGPU:
    """Load accounting for ``gpus`` identical GPUs, rendered as DCGM exporter gauges."""

    def __init__(
        self,
        *,
        gpus: int = 1,
        tdp_watts: float = 700,
        idle_watts: float = 60,
        hostname: str = "mock",
        window_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gpus = max(1, gpus)
        self.tdp_watts = tdp_watts
        self.idle_watts = idle_watts
        self.hostname = hostname
        self.window_s = window_s
        self.in_flight = 0
        self._clock = clock
        self._buckets: deque[list[float]] = deque()  # [bucket start, tokens]
        self._window_tokens = 0.0

    def begin(self) -> None:
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1

    def add_tokens(self, n: int) -> None:
        """Record ``n`` tokens generated now."""
        if n <= 0:
            return
        now = self._clock()
        start = now - (now % _BUCKET_S)
        buckets = self._buckets
        if buckets and buckets[-1][0] == start:
            buckets[-1][1] += n
        else:
            buckets.append([start, float(n)])
        self._window_tokens += n
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        buckets = self._buckets
        while buckets and buckets[0][0] + _BUCKET_S <= horizon:
            self._window_tokens -= buckets.popleft()[1]
        if not buckets:
            self._window_tokens = 0.0

    def utilisation(self) -> float:
        """Fraction 0..1 of the node busy right now."""
        self._expire(self._clock())
        slots = self.in_flight / (SLOTS_PER_GPU * self.gpus)
        tokens = self._window_tokens / (self.window_s * TOKENS_PER_S_PER_GPU * self.gpus)
        return min(1.0, max(0.0, slots + tokens))

    def power_watts(self, utilisation: float | None = None) -> float:
        util = self.utilisation() if utilisation is None else utilisation
        return self.idle_watts + (self.tdp_watts - self.idle_watts) * util

    def prometheus(self) -> str:
        """DCGM-exporter style gauges, one sample per GPU."""
        util = self.utilisation()
        power = self.power_watts(util)
        host = escape_label(self.hostname)
        labels = [
            f'gpu="{i}",UUID="GPU-{host}-{i}",modelName="{GPU_MODEL}",Hostname="{host}"' for i in range(self.gpus)
        ]
        lines = [
            "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
            "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
        ]
        lines += [f"DCGM_FI_DEV_POWER_USAGE{{{lab}}} {power:.3f}" for lab in labels]
        lines += [
            "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).",
            "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
        ]
        pct = round(util * 100)
        lines += [f"DCGM_FI_DEV_GPU_UTIL{{{lab}}} {pct}" for lab in labels]
        return "\n".join(lines) + "\n"


def escape_label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
