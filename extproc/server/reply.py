"""What the session tells Envoy for one phase, as plain data.

The gRPC servicer turns a `Reply` into a ProcessingResponse; keeping protobuf
out of the session lets tests drive it directly and keeps it readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ClientError
from ..protocols.envelopes import error_body


@dataclass(frozen=True, slots=True)
class Immediate:
    """Answer the client now; the request never reaches a backend."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(slots=True)
class Reply:
    set_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None  # replaces the buffered body, or this streamed chunk (b"": withhold it)
    # Streamed response body only: `body` is the last the client gets; the response ends here and
    # Envoy resets the upstream request, so the backend stops generating (a cut, or a JSON answer
    # assembled from a stream). Ignored on a buffered body, which is whole already.
    end_stream: bool = False
    clear_route_cache: bool = False
    immediate: Immediate | None = None
    # Processing-mode overrides (only honoured on header phases):
    skip_rest: bool = False  # no body, no response phases for this request
    headers_only: bool = False  # no request or response body; response headers still sent (flat-priced routes)
    stream_response: bool = False  # switch the response body to FULL_DUPLEX_STREAMED (chunk by chunk)
    skip_response_body: bool = False  # response body not needed
    metadata: dict[str, Any] | None = None  # Envoy dynamic metadata (namespace extproc.budget)


def json_reply(status: int, body: bytes, extra: list[tuple[str, str]] | None = None) -> Reply:
    """Answer the client now with a JSON body (the service's own answers and refusals)."""
    return Reply(immediate=Immediate(status, (("content-type", "application/json"), *(extra or [])), body))


def client_error(envelope: str, e: ClientError, retry_after: int | None = None) -> Reply:
    """A 4xx in the envelope of the API that was called."""
    body = error_body(envelope, status=e.status, message=e.message, type=e.type, code=e.code, param=e.param)
    return json_reply(e.status, body, [("retry-after", str(retry_after))] if retry_after else None)


def store_unavailable(envelope: str) -> Reply:
    """Fail closed: the store cannot be reached, so nothing is sent upstream."""
    body = error_body(
        envelope,
        status=503,
        message="The budget service cannot reach its store; the request was not sent (fail closed).",
        type="server_error",
        code="budget_store_unavailable",
    )
    return json_reply(503, body, [("x-budget-decision", "block"), ("retry-after", "1")])
