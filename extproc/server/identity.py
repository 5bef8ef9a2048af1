"""Who is calling: the principal from a trusted source, never from a forgeable one.

Order: the API-key map (keys stored as sha256), then a principal header that
the Envoy edge sets after jwt_authn (trusted only if the policy says the edge
strips client copies, as the shipped configs do), then the mTLS peer's URI SAN
(an Envoy attribute, which a client cannot set).

The header and the attribute are Envoy's word, so they count only when the
gRPC call itself came from an authenticated Envoy (`caller_authenticated`,
see callers.py): anyone else can put anything in a ProcessingRequest.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..engine.budget import Identity
from ..engine.calls import Caller
from ..engine.runs import run_overrides_from_headers
from ..engine.workflow import from_headers as workflow_from_headers
from ..errors import BadRequest, Unauthenticated
from ..policy.model import Policy, PrincipalSpec


def api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def _from_principal(p: PrincipalSpec) -> Identity:
    return Identity(p.name, p.team, p.org, p.user, dict(p.labels))


def resolve(
    policy: Policy, headers: Mapping[str, str], peer_id: str | None = None, *, caller_authenticated: bool = False
) -> Identity:
    """The caller's identity, or Unauthenticated with a message that says what was missing."""
    ident = policy.identity
    key = api_key(headers) if ident.api_keys else None
    if key is not None:
        spec = policy.key_spec(key)
        if spec is not None:
            return Identity.from_key(spec)
    if ident.principal_header and ident.edge_strips_headers and caller_authenticated:
        name = headers.get(ident.principal_header)
        if name:
            p = policy.principals_by_name.get(name)
            if p is None:
                raise Unauthenticated(f"principal {name!r} is not known to this gateway's policy")
            return _from_principal(p)
    if ident.mtls_peer and peer_id and caller_authenticated:
        p = policy.principals_by_peer.get(peer_id)
        if p is not None:
            return _from_principal(p)
    if key is not None:
        raise Unauthenticated("unknown API key")
    raise Unauthenticated("missing API key (Authorization: Bearer … or x-api-key)")


def caller(
    policy: Policy, headers: Mapping[str, str], peer_id: str | None, *, authenticated: bool, reservation_id: str
) -> Caller:
    """Who is calling and under which run (lowered run limits included). Raises ClientError."""
    who = resolve(policy, headers, peer_id, caller_authenticated=authenticated)
    run_id = None
    for name in policy.runs.headers:
        value = headers.get(name)
        if value:
            if len(value) > 128 or not value.isprintable():
                raise BadRequest(f"{name} must be at most 128 printable characters", param=name)
            run_id = value
            break
    bag_run, workflow = workflow_from_headers(policy.runs, headers)  # parent run, retry depth, traceparent
    run_id = run_id or bag_run
    # a client may lower (never raise) its run's limits; the store keeps the lowest
    overrides = (run_overrides_from_headers(headers) or None) if run_id else None
    request_id = headers.get("x-request-id", "")[:128] or reservation_id  # correlation only
    return Caller(who, run_id, overrides, reservation_id, request_id, workflow=workflow)
