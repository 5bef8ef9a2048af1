"""Request and token counters: ``/stats`` for tests, vLLM counters for ``/metrics``.

A hit is counted the moment an inference request arrives (before any
generation, errors included), so a test can compare hits with the number of
requests a gateway let through. ``/stats/reset`` zeroes the test counters only;
the vLLM Prometheus counters stay monotonic, as a real server's would.

A stream whose client goes away stops generating at the next token, as vLLM
aborts a request whose connection closed: ``disconnects`` counts such streams
and ``generated_after_disconnect`` the tokens generated for nobody (the one in
progress when the client left). ``/stats/streams`` lists the last streams, each
with its ``x-request-id``, tokens sent and when generation stopped, so a test
can tell how long a backend kept generating after a gateway cut a stream.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from .gpu import escape_label


class Stats:
    """Counters of one mock backend (single event loop, so no locking)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._model_tokens: dict[str, list[int]] = {}  # model -> [prompt, generation], never reset
        self.reset()

    def reset(self) -> None:
        self.hits = 0
        self.by_path: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.disconnects = 0
        self.generated_after_disconnect = 0
        self.streams: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)

    def hit(self, path: str) -> None:
        self.hits += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1

    def model(self, model: str) -> None:
        self.by_model[model] = self.by_model.get(model, 0) + 1

    def prompt(self, model: str, n: int) -> None:
        self.prompt_tokens += n
        self._totals(model)[0] += n

    def generated(self, model: str, n: int) -> None:
        self.generation_tokens += n
        self._totals(model)[1] += n

    def stream_ended(self, request_id: str, model: str, tokens: int, *, after_disconnect: int | None) -> None:
        """One stream is over: `tokens` were sent; `after_disconnect` is None when it ran to its end,
        else how many tokens were generated after its client had gone (then it stopped)."""
        if after_disconnect is not None:
            self.disconnects += 1
            self.generated_after_disconnect += after_disconnect
        self.streams.append(
            {
                "request_id": request_id,
                "model": model,
                "tokens": tokens,
                "disconnected": after_disconnect is not None,
                "after_disconnect": after_disconnect or 0,
                "ended_at": time.time(),
            }
        )

    def _totals(self, model: str) -> list[int]:
        totals = self._model_tokens.get(model)
        if totals is None:
            totals = self._model_tokens[model] = [0, 0]
        return totals

    def snapshot(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "by_path": dict(self.by_path),
            "by_model": dict(self.by_model),
            "in_flight": self.in_flight,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "disconnects": self.disconnects,
            "generated_after_disconnect": self.generated_after_disconnect,
        }

    def prometheus(self) -> str:
        """vLLM's token counters, one sample per model served."""
        lines = [
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
        ]
        lines += [
            f'vllm:prompt_tokens_total{{model_name="{escape_label(m)}"}} {float(t[0])}' for m, t in self._model_tokens.items()
        ]
        lines += [
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
        ]
        lines += [
            f'vllm:generation_tokens_total{{model_name="{escape_label(m)}"}} {float(t[1])}'
            for m, t in self._model_tokens.items()
        ]
        return "\n".join(lines) + "\n"
