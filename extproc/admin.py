"""Admin operations shared by the admin HTTP API and the `extproc budgets` /
`extproc ledger` commands: list budgets, set or raise a limit, credit a
balance, close a run, export the ledger. Thin over `Engine`; values cross
this boundary as decimal USD strings (cost) or integers (everything else).
"""

from __future__ import annotations

from typing import Any

from .engine.budget import Engine, Identity
from .ledger import render as render_ledger
from .money import usd_to_nano
from .policy.model import Policy
from .server import render


def identity(policy: Policy, principal: str) -> Identity:
    """The identity of a principal named in the policy (API key entry or principals table)."""
    for key in policy.keys:
        if key.principal == principal:
            return Identity.from_key(key)
    p = policy.principals_by_name.get(principal)
    if p is not None:
        return Identity(p.name, p.team, p.org, p.user, dict(p.labels))
    raise LookupError(f"principal {principal!r} is not in the policy")


def _units(dimension: str, value: str | int) -> int:
    return usd_to_nano(str(value)) if dimension == "cost" else int(value)


async def budgets(engine: Engine, policy: Policy, principal: str, run: str | None = None) -> dict[str, Any]:
    who = identity(policy, principal)
    snap = await engine.snapshot(policy, who, run_id=run)
    doc: dict[str, Any] = {
        "principal": who.principal,
        "team": who.team,
        "org": who.org,
        "run": run,
        "budgets": render.budget_rows(snap.limits, snap.states, snap.now_ms),
    }
    if snap.run is not None:
        doc["run_state"] = {"state": snap.run.state, "created_at_ms": snap.run.created_at_ms, "expires_at_ms": snap.run.expires_at_ms}
    return doc


async def adjust(
    engine: Engine,
    policy: Policy,
    *,
    principal: str,
    scope: str,
    dimension: str,
    set_limit: str | int | None = None,
    credit: str | int | None = None,
    window: str | None = None,
    run: str | None = None,
) -> list[dict[str, Any]]:
    if set_limit is None and credit is None:
        raise ValueError("give set_limit and/or credit")
    who = identity(policy, principal)
    rows = await engine.adjust(
        policy,
        who,
        scope=scope,
        dimension=dimension,
        window=window,
        run_id=run,
        set_limit=None if set_limit is None else _units(dimension, set_limit),
        credit=0 if credit is None else _units(dimension, credit),
    )
    return render.budget_rows([l for l, _ in rows], [s for _, s in rows], engine.clock())


async def close_run(engine: Engine, policy: Policy, *, principal: str, run: str) -> dict[str, Any]:
    state = await engine.close_run(policy, identity(policy, principal), run)
    return {"run": state.key, "state": state.state}


async def ledger(engine: Engine, *, since_ms: int, fmt: str) -> str:
    return render_ledger(await engine.store.ledger(since_ms=since_ms), fmt)
