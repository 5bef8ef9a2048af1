"""Render decisions for callers: response headers, refusal bodies, budget views.

Header names are fixed by DESIGN.md ("Decisions the caller can read"); token
windows also get OpenAI-style `x-ratelimit-*-tokens`, and the tightest cost
budget the IETF `RateLimit-Policy` / `RateLimit` fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine.budget import AppliedLimit, Decision
from ..engine.calls import Plan
from ..engine.recent import LoggedDecision
from ..money import nano_to_usd
from ..protocols.envelopes import error_body
from ..stores.base import LineState
from . import headers as H
from .reply import Immediate

TOKEN_DIMENSIONS = ("total_tokens", "input_tokens", "output_tokens")


def fmt(dimension: str, value: int) -> str:
    return nano_to_usd(value) if dimension == "cost" else str(value)


def _reset_seconds(lim: AppliedLimit, now_ms: int) -> int | None:
    if lim.reset_ms is not None:
        return max(0, -(-(lim.reset_ms - now_ms) // 1000))
    if lim.spec.window == "rolling":
        return lim.spec.seconds
    return None


def decision_value(d: Decision, changed: bool) -> str:
    if not d.allowed:
        return "block"
    if d.warned:
        return "advisory_warn"
    return "downgrade" if changed else "allow"


def state_headers(
    d: Decision,
    *,
    now_ms: int,
    price_version: str,
    run_id: str | None,
    requested_model: str = "",
    selected_model: str = "",
    clamped: bool = False,
    worst_case: int | None = None,
) -> list[tuple[str, str]]:
    """The decision headers. `worst_case` (nano-USD) is given for a right-sized reservation."""
    changed = clamped or (requested_model != selected_model)
    out = [
        (H.DECISION, decision_value(d, changed)),
        (H.DECISION_ID, d.decision_id),
        (H.RESERVATION_ID, d.hold.reservation_id),
        (H.MODE, d.mode.value),
        (H.RESERVED, nano_to_usd(d.reserved.get("cost", 0))),
        (H.PRICE_VERSION, price_version),
    ]
    if requested_model:
        out += [(H.REQUESTED_MODEL, requested_model), (H.SELECTED_MODEL, selected_model or requested_model)]
    if clamped:
        out.append((H.OUTPUT_CLAMPED, "true"))
    if requested_model:
        out.append((H.RESERVATION, "worst_case" if worst_case is None else "expected"))
        if worst_case is not None:
            out.append((H.WORST_CASE, nano_to_usd(worst_case)))
    tight = d.tightest("cost")
    if tight is not None:
        lim, st = tight
        out += [
            (H.SCOPE, lim.budget),
            (H.LIMIT, nano_to_usd(st.limit)),
            (H.SPENT, nano_to_usd(st.spent)),
            (H.REMAINING, nano_to_usd(max(0, st.remaining))),
        ]
        name = lim.budget.replace('"', "")
        reset = _reset_seconds(lim, now_ms)
        out.append(("ratelimit-policy", f'"{name}";q={st.limit};qu="nano-usd"' + (f";w={lim.spec.seconds}" if lim.spec.seconds else "")))
        out.append(("ratelimit", f'"{name}";r={max(0, st.remaining)}' + (f";t={reset}" if reset is not None else "")))
    for dim in TOKEN_DIMENSIONS:
        tight = d.tightest(dim)
        if tight is not None:
            lim, st = tight
            out += [("x-ratelimit-limit-tokens", str(st.limit)), ("x-ratelimit-remaining-tokens", str(max(0, st.remaining)))]
            reset = _reset_seconds(lim, now_ms)
            if reset is not None:
                out.append(("x-ratelimit-reset-tokens", f"{reset}s"))
            break
    if run_id:
        out.append((H.RUN_ID, run_id))
        out += run_spend(d)
    return out


def run_levels(d: Decision) -> list[tuple[str, LineState]]:
    """Each level of the call's run chain, root first, with its tightest cost line."""
    tight: dict[str, LineState] = {}
    for lim, st in zip(d.limits, d.states, strict=False):
        if lim.scope != "run" or lim.spec.dimension != "cost":
            continue
        if lim.scope_id not in tight or st.remaining < tight[lim.scope_id].remaining:
            tight[lim.scope_id] = st
    own = tight.pop(d.run, None) if d.run else None  # limits list the run first, then its ancestors root first
    levels = list(tight.items())
    return [*levels, (d.run, own)] if own is not None and d.run else levels


def run_spend(d: Decision, charged: int = 0) -> list[tuple[str, str]]:
    """Spend and remaining budget of every level of the run chain (`charged`: this call's
    settled cost, added to each level's spend once known)."""
    levels = run_levels(d)
    if not levels:
        return []
    return [
        (H.RUN_CHAIN, ", ".join(key.split("/", 1)[1] for key, _ in levels)),
        (H.RUN_SPENT, ", ".join(nano_to_usd(st.spent + charged) for _, st in levels)),
        (H.RUN_REMAINING, ", ".join(nano_to_usd(max(0, st.remaining)) for _, st in levels)),
    ]


def budget_object(d: Decision, alternatives: Sequence[dict[str, Any]]) -> dict[str, Any]:
    b = d.blocking
    assert b is not None and d.blocked is not None
    st = d.states[d.blocked]
    dim = b.spec.dimension
    return {
        "scope": b.budget,
        "dimension": dim,
        "window": b.spec.window,
        "limit": fmt(dim, st.limit),
        "spent": fmt(dim, st.spent),
        "reserved": fmt(dim, st.reserved),
        "remaining": fmt(dim, max(0, st.remaining)),
        "requested": fmt(dim, b.line.amount),
        "reset_at_ms": b.reset_ms,
        "retry_after_ms": d.retry_after_ms,
        "decision_id": d.decision_id,
        "alternatives": list(alternatives),
    }


def refusal(envelope: str, d: Decision, headers: list[tuple[str, str]], alternatives: Sequence[dict[str, Any]]) -> Immediate:
    b = d.blocking
    assert b is not None
    code = d.refusal_code
    msg = d.message
    fits = [a["model"] for a in alternatives if a.get("fits")]
    if fits:
        msg += f" Cheaper models that fit: {', '.join(fits)}."
    body = error_body(envelope, status=429, message=msg, type=code, code=code, budget=budget_object(d, alternatives))
    extra = [*headers, (H.BLOCKING_SCOPE, b.budget), ("content-type", "application/json")]
    if code == "rate_limit_exceeded":
        extra.append(("retry-after", str(d.retry_after_s)))
    else:
        extra.append((H.SHOULD_RETRY, "false"))
    return Immediate(429, tuple(extra), body)


def budget_rows(limits: Sequence[AppliedLimit], states: Sequence[LineState], now_ms: int) -> list[dict[str, Any]]:
    """The caller's budgets as JSON rows (the budget endpoint)."""
    rows = []
    for lim, st in zip(limits, states, strict=False):
        dim = lim.spec.dimension
        rows.append(
            {
                "scope": lim.budget,
                "dimension": dim,
                "window": lim.spec.window,
                "mode": lim.line.mode.value,
                "limit": fmt(dim, st.limit),
                "spent": fmt(dim, st.spent),
                "reserved": fmt(dim, st.reserved),
                "remaining": fmt(dim, max(0, st.remaining)),
                "soft_threshold": None if lim.spec.soft_threshold is None else str(lim.spec.soft_threshold),
                "reset_in_seconds": _reset_seconds(lim, now_ms),
            }
        )
    return rows


def log_metadata(d: Decision | None, cost: int, principal: str, model: str) -> dict[str, Any]:
    """What the access log prints of a settled call (Envoy dynamic metadata, extproc.budget)."""
    tight = d.tightest("cost") if d else None
    return {
        "cost_usd": nano_to_usd(cost),
        "scope": tight[0].budget if tight else "",
        "principal": principal,
        "model": model,
        "decision_id": d.decision_id if d else "",
    }


def logged(principal: str, run: str | None, plan: Plan, price_version: str, at_ms: int) -> LoggedDecision:
    """The decision as the log keeps it: what the lookup returns, rendered now (see engine/recent.py)."""
    d, c = plan.decision, plan.chosen
    doc = {
        "decision_id": d.decision_id,
        "principal": principal,
        "run": run,
        "decision": decision_value(d, plan.changed),
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
