"""Error bodies in the envelope of the API that was called (pure, no I/O).

OpenAI SDKs read `error.code` ("insufficient_quota" is not retried by the
official clients when paired with `x-should-retry: false`); Anthropic SDKs
read `error.type`. Both carry the `budget` object so an agent can plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "api_error",
}


def error_body(
    envelope: str,
    *,
    status: int,
    message: str,
    type: str,
    code: str,
    param: str | None = None,
    budget: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise one error in the OpenAI or Anthropic envelope."""
    if envelope == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
        if budget is not None:
            body["budget"] = budget
    else:
        err: dict[str, Any] = {"message": message, "type": type, "code": code, "param": param}
        if budget is not None:
            err["budget"] = budget
        body = {"error": err}
    return json.dumps(body, separators=(",", ":")).encode()
