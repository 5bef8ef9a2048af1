"""What the session tells Envoy for one phase, as plain data.

The gRPC servicer turns a `Reply` into a ProcessingResponse; keeping protobuf
out of the session lets tests drive it directly and keeps it readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Immediate:
    """Answer the client now; the request never reaches a backend."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(slots=True)
class Reply:
    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None  # replaces the buffered body, or this streamed chunk
    clear_route_cache: bool = False
    immediate: Immediate | None = None
    # Processing-mode overrides (only honoured on header phases):
    skip_rest: bool = False  # no body, no response phases for this request
    headers_only: bool = False  # no request or response body; response headers still sent (flat-priced routes)
    stream_response: bool = False  # switch the response body to STREAMED
    skip_response_body: bool = False  # response body not needed
    metadata: dict[str, Any] | None = None  # Envoy dynamic metadata (namespace extproc.budget)
