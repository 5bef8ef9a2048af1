"""Configuration of one mock inference backend.

Kept in its own module so the generator, the GPU model and the HTTP layer can
share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MockConfig:
    """Knobs fixed for the life of a mock backend (per-request knobs are headers).

    token_delay_ms: real time between streamed tokens (and tokens x delay before a
        non-streaming answer), so load, latency and streaming are realistic.
    default_output_tokens: tokens generated per choice when the request does not
        say (capped by the request's max-tokens field).
    gpus, tdp_watts, idle_watts: the simulated hardware behind /metrics.
    name: reported in the ``x-mock-backend`` header and the DCGM ``Hostname`` label,
        so tests can tell which of several backends served a call.
    """

    token_delay_ms: float = 0
    default_output_tokens: int = 16
    gpus: int = 1
    tdp_watts: float = 700
    idle_watts: float = 60
    name: str = "mock"
