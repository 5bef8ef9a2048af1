"""The deterministic usage rules: what a request will cost, decided up front.

Tests assert costs to the token, so every figure the mock reports is a pure
function of the request body, its ``x-mock-*`` headers and the config. The
rules (also summarised in the package docstring):

Prompt tokens are the tiktoken ``o200k_base`` count of the request's text,
the pieces joined with ``"\\n"`` in request order (see ``prompt_text``):

- chat: the text of every message (string content, or the ``text`` parts of
  list content), system messages included where they appear;
- messages (Anthropic): ``system`` (string or text blocks) first, then the
  text of every message;
- completions: ``prompt`` (a string, or a list of strings);
- responses: ``instructions`` first, then ``input`` (a string, or the text of
  message items);
- embeddings: each input string counted on its own, then summed.

Output tokens per choice are ``x-mock-output-tokens`` if given, else
``config.default_output_tokens``; either is capped by the request's max field
(chat: ``max_completion_tokens`` else ``max_tokens``; responses:
``max_output_tokens``; completions and messages: ``max_tokens``). When the cap
cut the answer short the finish reason is ``length`` / ``max_tokens``. The text
is ``" hello"`` per token (exactly one o200k token each).

``x-mock-cached-tokens: K`` (clamped to the prompt) reports K prompt tokens as
cache reads; ``x-mock-cache-write-tokens: W`` (Anthropic) reports W as cache
writes (clamped to what is left); Anthropic's ``input_tokens`` is the prompt
minus both. ``x-mock-reasoning-tokens: R`` adds R hidden tokens per choice,
counted in completion/output tokens (the cap applies to visible text only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.tokenizers import count_tokens

TOKEN_TEXT = " hello"
"""One o200k token; the generated text is this repeated once per output token."""

MAX_CHOICES = 128


class BadRequest(Exception):
    """The request is malformed; answered with 400 in the API's error envelope."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Knobs:
    """Per-request test controls, read from ``x-mock-*`` headers."""

    output_tokens: int | None = None
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    status: int | None = None
    delay_ms: float | None = None
    first_byte_delay_ms: float = 0.0
    no_usage: bool = False
    retry_after_ms: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Knobs:
        """Parse the knobs; a header that is present but not a number is a BadRequest."""
        if not any(k[:7].lower() == "x-mock-" for k in headers):
            return _NO_KNOBS
        status = _int(headers, "x-mock-status")
        return cls(
            output_tokens=_int(headers, "x-mock-output-tokens"),
            cached_tokens=_int(headers, "x-mock-cached-tokens") or 0,
            cache_write_tokens=_int(headers, "x-mock-cache-write-tokens") or 0,
            reasoning_tokens=_int(headers, "x-mock-reasoning-tokens") or 0,
            status=status if status is not None and status >= 400 else None,
            delay_ms=_float(headers, "x-mock-delay-ms"),
            first_byte_delay_ms=_float(headers, "x-mock-first-byte-delay-ms") or 0.0,
            no_usage=headers.get("x-mock-no-usage", "").strip().lower() in ("1", "true", "yes"),
            retry_after_ms=_float(headers, "x-mock-retry-after-ms"),
        )


_NO_KNOBS = Knobs()


def _int(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadRequest(f"header {name} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise BadRequest(f"header {name} must be a non-negative integer, got {raw!r}")
    return value


def _float(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        raise BadRequest(f"header {name} must be a non-negative number, got {raw!r}") from None
    if not value >= 0:  # also rejects NaN
        raise BadRequest(f"header {name} must be a non-negative number, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class Usage:
    """Token figures of one request; ``output`` and ``reasoning`` are per choice."""

    prompt: int
    output: int = 0
    reasoning: int = 0
    n: int = 1
    cached: int = 0
    cache_write: int = 0
    truncated: bool = False

    @property
    def completion(self) -> int:
        """All generated tokens, every choice, reasoning included (OpenAI semantics)."""
        return (self.output + self.reasoning) * self.n

    @property
    def uncached_input(self) -> int:
        """Anthropic's ``input_tokens``: the prompt minus cache reads and writes."""
        return self.prompt - self.cached - self.cache_write

    @property
    def text(self) -> str:
        return TOKEN_TEXT * self.output


# --------------------------------------------------------------------------- prompt text


def _parts_text(content: Any, out: list[str]) -> None:
    """Append a message's text: string content, or the text parts of list content."""
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)


def _messages_text(messages: Any, out: list[str], field: str = "messages") -> None:
    if not isinstance(messages, list):
        raise BadRequest(f"'{field}' must be a list", field)
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest(f"each of '{field}' must be an object", field)
        _parts_text(message.get("content"), out)


def prompt_pieces(api: str, body: dict[str, Any]) -> list[str]:
    """The texts whose tokens make up the prompt, in order (embeddings: one per input)."""
    out: list[str] = []
    if api == "chat":
        if "messages" not in body:
            raise BadRequest("'messages' is a required property", "messages")
        _messages_text(body["messages"], out)
    elif api == "messages":
        if "messages" not in body:
            raise BadRequest("messages: Field required", "messages")
        _parts_text(body.get("system"), out)
        _messages_text(body["messages"], out)
    elif api == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            out.append(prompt)
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            out.extend(prompt)
        else:
            raise BadRequest("'prompt' must be a string or a list of strings", "prompt")
    elif api == "responses":
        _parts_text(body.get("instructions"), out)
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(inp)
        elif isinstance(inp, list):
            for item in inp:
                if isinstance(item, dict) and (item.get("type", "message") == "message"):
                    _parts_text(item.get("content"), out)
        elif inp is not None:
            raise BadRequest("'input' must be a string or a list of items", "input")
    elif api == "embeddings":
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(inp)
        elif isinstance(inp, list) and inp and all(isinstance(p, str) for p in inp):
            out.extend(inp)
        else:
            raise BadRequest("'input' must be a string or a non-empty list of strings", "input")
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown api {api!r}")
    return out


def prompt_text(api: str, body: dict[str, Any]) -> str:
    """The single string whose o200k count is the prompt (not for embeddings)."""
    return "\n".join(prompt_pieces(api, body))


def count_prompt(api: str, body: dict[str, Any]) -> int:
    """Prompt tokens of a request, per the rules in the module docstring."""
    pieces = prompt_pieces(api, body)
    if api == "embeddings":
        return sum(count_tokens(p) for p in pieces)
    return count_tokens("\n".join(pieces)) if pieces else 0


# --------------------------------------------------------------------------- output


_MAX_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
    "embeddings": (),
}


def _max_tokens(api: str, body: dict[str, Any]) -> int | None:
    for field in _MAX_FIELDS[api]:
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"'{field}' must be a non-negative integer", field)
        return value
    if api == "messages":
        raise BadRequest("max_tokens: Field required", "max_tokens")
    return None


def _choices(api: str, body: dict[str, Any]) -> int:
    if api not in ("chat", "completions"):
        return 1
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"'n' must be an integer between 1 and {MAX_CHOICES}", "n")
    return n


def decide(api: str, body: dict[str, Any], knobs: Knobs, default_output_tokens: int) -> Usage:
    """All token figures for a request; raises BadRequest for a malformed one."""
    prompt = count_prompt(api, body)
    cached = min(knobs.cached_tokens, prompt)
    if api == "embeddings":
        return Usage(prompt=prompt)
    cap = _max_tokens(api, body)
    n = _choices(api, body)
    desired = knobs.output_tokens if knobs.output_tokens is not None else default_output_tokens
    output = desired if cap is None else min(desired, cap)
    return Usage(
        prompt=prompt,
        output=output,
        reasoning=knobs.reasoning_tokens,
        n=n,
        cached=cached,
        cache_write=min(knobs.cache_write_tokens, prompt - cached) if api == "messages" else 0,
        truncated=cap is not None and desired > cap,
    )
