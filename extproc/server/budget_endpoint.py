"""`GET <budget_path>` and `GET <budget_path>/decisions/{id}`: answered by the service itself.

An agent asks what it has left before it spends; nothing reaches a backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..errors import ClientError, StoreUnavailable
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
