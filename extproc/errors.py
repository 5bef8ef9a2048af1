"""Exception tree. Who was wrong decides the HTTP status and the envelope.

    ExtprocError
    ├── ClientError            the caller sent something we refuse (4xx)
    │   ├── BadRequest         malformed JSON, bad fields, oversized body (400/413)
    │   ├── Unauthenticated    missing or unknown API key (401)
    │   ├── RouteDenied        a path the policy lists as denied (403)
    │   ├── NoRoute            a path that is no route of the policy (404)
    │   ├── MethodNotAllowed   a route's path with a method it does not list (405)
    │   ├── UnknownModel       no price for the model and no override (400)
    │   ├── ToolNotPriced      a built-in tool with no per-call price in the policy (400)
    │   └── InputNotBounded    input whose size cannot be known and the policy sets no worst case for (400)
    ├── UpstreamError          the backend sent something unparseable (never the client's fault)
    ├── PolicyError            a policy file is invalid (raised at load, never per request)
    ├── ConfigError            the service's start-up settings are unsafe or incomplete (never per request)
    └── StoreUnavailable       the budget store cannot be reached (503, fail closed)
"""

from __future__ import annotations


class ExtprocError(Exception):
    """Base of every error extproc raises on purpose."""


class ClientError(ExtprocError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(ClientError):
    pass


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class Unauthenticated(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class RouteDenied(ClientError):
    status = 403
    type = "permission_error"
    code = "route_denied"


class NoRoute(ClientError):
    status = 404
    type = "not_found_error"
    code = "unknown_route"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class UnknownModel(ClientError):
    status = 400
    code = "model_not_priced"


class ToolNotPriced(ClientError):
    status = 400
    code = "tool_not_priced"


class InputNotBounded(ClientError):
    """Input the gateway cannot size (a file by URL or id, a stored conversation) and
    for which the policy reserves no worst case: refused, never guessed."""

    status = 400
    code = "input_not_bounded"


class UpstreamError(ExtprocError):
    """The backend's response could not be parsed (distinct from a bad request)."""


class PolicyError(ExtprocError):
    """A policy file failed validation; the message lists every problem."""


class ConfigError(ExtprocError):
    """The service refuses to start: a setting is missing, unreadable or unsafe; the message says which."""


class StoreUnavailable(ExtprocError):
    """The budget store did not answer; callers fail closed unless policy says fail_open."""
