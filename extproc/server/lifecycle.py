"""The phases of one ext_proc stream and the moves between them (h11's style: a table).

Envoy sends request headers, then (unless told to skip) the request body, then
response headers and response body chunks; trailers are ignored. A move the
table does not list is a bug in Envoy's config or ours, and raises.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    START = "start"
    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    DONE = "done"  # answered by the service itself, or settled/released: nothing more to decide


NEXT: dict[Phase, frozenset[Phase]] = {
    # Envoy's own local reply (a path it rejected, a route timeout) passes the response
    # phases of a stream whose request never reached this filter.
    Phase.START: frozenset({Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS}),
    Phase.REQUEST_HEADERS: frozenset({Phase.REQUEST_BODY, Phase.RESPONSE_HEADERS}),  # flat routes skip the body
    Phase.REQUEST_BODY: frozenset({Phase.RESPONSE_HEADERS}),
    Phase.RESPONSE_HEADERS: frozenset({Phase.RESPONSE_BODY}),
    Phase.RESPONSE_BODY: frozenset({Phase.RESPONSE_BODY}),
    Phase.DONE: frozenset({Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY}),  # Envoy may still pass a response through
}


class PhaseError(RuntimeError):
    """A message arrived that this stream's phase does not allow."""


def advance(current: Phase, new: Phase) -> Phase:
    if new not in NEXT[current]:
        raise PhaseError(f"ext_proc message {new.value} after {current.value}")
    return new
