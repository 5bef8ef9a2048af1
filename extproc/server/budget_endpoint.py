"""`GET <budget_path>` and `GET <budget_path>/decisions/{id}`: answered by the service itself.

An agent asks what it has left before it spends; nothing reaches a backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..engine.calls import Plan
from ..engine.recent import LoggedDecision
from ..errors import ClientError, StoreUnavailable
from ..money import nano_to_usd
from ..policy.model import Policy
from ..protocols.envelopes import error_body
from . import identity, render
from .reply import Reply, client_error, json_reply, store_unavailable
from .services import Services


def is_budget_path(policy: Policy, method: str, path: str) -> bool:
    base = policy.decisions.budget_path
    return method == "GET" and (path == base or path.startswith(base + "/decisions/"))


async def answer(s: Services, policy: Policy, path: str, headers: Mapping[str, str], peer_id: str | None, *, authenticated: bool) -> Reply:
    try:  # the same reading of identity and run as a metered call (run header validated there)
        caller = identity.caller(policy, headers, peer_id, authenticated=authenticated, reservation_id="")
    except ClientError as e:
        return client_error("openai", e)
    who, run_id = caller.who, caller.run_id
    if "/decisions/" in path:
        entry = s.decisions.get(path.rsplit("/", 1)[1])
        if entry is None or entry.principal != who.principal:
            body = error_body("openai", status=404, message="no such decision", type="invalid_request_error", code="not_found")
            return json_reply(404, body)
        return json_reply(200, json.dumps(entry.doc).encode())
    try:
        wf = await s.engine.place(policy, who, run_id, caller.workflow) if run_id and caller.workflow else None
        snap = await s.engine.snapshot_lines(policy, who, run_id=run_id, workflow=wf)
    except ClientError as e:
        return client_error("openai", e)
    except StoreUnavailable:
        return store_unavailable("openai")
    doc = {
        "principal": who.principal,
        "team": who.team,
        "org": who.org,
        "run": run_id,
        "run_chain": [*wf.ancestors, run_id] if wf is not None else ([run_id] if run_id else []),
        "price_table_version": policy.prices.version,
        "budgets": render.budget_rows(snap.limits, snap.states, snap.now_ms),
        # what a streamed call of each model reserves for output (per choice) before it grows; absent: its worst case
        "expected_output_tokens": {
            name: n
            for name, spec in policy.prices.models.items()
            if (n := s.expected_output(policy, who.principal, name, spec)) is not None
        },
    }
    return json_reply(200, json.dumps(doc).encode())


def logged(principal: str, run: str | None, plan: Plan, price_version: str, at_ms: int) -> LoggedDecision:
    """The decision as the log keeps it: what the lookup returns, rendered now (see engine/recent.py)."""
    d, c = plan.decision, plan.chosen
    doc = {
        "decision_id": d.decision_id,
        "principal": principal,
        "run": run,
        "decision": render.decision_value(d, plan.changed),
        "requested_model": plan.requested,
        "selected_model": c.name,
        "scopes": tuple(sorted({lim.budget for lim in d.limits})),  # a tuple of str: untracked by the collector
        "estimate": {"cost_usd": nano_to_usd(c.cost), "input_tokens": c.input_tokens, "output_tokens": c.output_tokens},
        "reservation": "expected" if c.right_sized else "worst_case",  # expected: grows with the stream up to the max
        "worst_case_usd": nano_to_usd(c.worst_cost or c.cost),
        "effective_max_output": c.output_cap,
        "output_clamped": plan.clamped,
        "price_source": c.price_source,
        "blocking_scope": d.blocking.budget if d.blocking else None,
        "price_table_version": price_version,
        "reservation_id": d.hold.reservation_id,
    }
    scope = d.blocking.budget if d.blocking else ""
    return LoggedDecision(d.decision_id, principal, run, d.allowed, at_ms, d.refusal_code, scope, d.message, doc)
