"""A mock GPU inference backend standing in for vLLM / OpenAI / Anthropic.

Used by tests, the demo and benchmarks: responses are faithful enough for the
official ``openai`` and ``anthropic`` SDKs (JSON and SSE), and usage figures
are exact and deterministic so tests can assert costs to the token.

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/embeddings``, ``/v1/messages``; ``GET /stats``,
``POST /stats/reset``, ``GET /stats/streams`` (the last streams: tokens sent, and
whether their client left mid-way), ``GET /metrics`` (DCGM power/utilisation gauges and
vLLM token counters), ``GET /healthz``. Every response carries
``x-mock-backend: <config.name>``.

Usage rules (details in ``usage``):

- Prompt tokens: o200k_base count of the request's text joined with "\\n"
  (chat: all messages' text; messages: ``system`` then messages; completions:
  ``prompt``; responses: ``instructions`` then ``input``; embeddings: the sum
  over input strings). ``usage.prompt_text(api, body)`` gives the exact string.
- Output tokens per choice: ``x-mock-output-tokens`` else
  ``config.default_output_tokens``, capped by the request's max field
  (``max_completion_tokens``/``max_tokens``, ``max_output_tokens``,
  ``max_tokens``); capped => finish ``length`` / stop ``max_tokens``. Text is
  ``" hello"`` per token, streamed one token per delta. ``n`` choices multiply
  completion tokens.
- ``x-mock-cached-tokens: K``: OpenAI ``cached_tokens=K`` (prompt unchanged);
  Anthropic ``cache_read_input_tokens=K`` and ``input_tokens`` reduced by K.
  ``x-mock-cache-write-tokens: W`` (Anthropic): ``cache_creation_input_tokens=W``,
  ``input_tokens`` reduced by W. ``x-mock-reasoning-tokens: R``: R extra tokens
  per choice inside completion/output tokens and ``reasoning_tokens``.
- ``x-mock-status: CODE`` (>= 400): that status with the API's error envelope
  (still a hit); ``x-mock-retry-after-ms: MS`` adds OpenAI's ``retry-after-ms: MS``
  to it (how long the SDKs wait before retrying). ``x-mock-delay-ms``: per-token delay for this request;
  ``x-mock-first-byte-delay-ms``: delay before the first byte.
  ``x-mock-no-usage: 1``: usage omitted (streams and JSON), even with
  ``include_usage``.
"""

from .app import BACKEND, make_app
from .config import MockConfig
from .server import run, serve

__all__ = ["BACKEND", "MockConfig", "make_app", "run", "serve"]
