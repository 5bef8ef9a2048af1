"""Admin: the operations (list budgets, set or credit a limit, close a run,
export the ledger) shared by the HTTP API and the `extproc budgets` /
`extproc ledger` commands, and the HTTP API itself. Thin over `Engine`; values
cross this boundary as decimal USD strings (cost) or integers (everything else).

The HTTP API: metrics and health open, everything else behind a bearer token.

Binds to loopback by default (DESIGN.md "Failure semantics"). Without a
configured token the protected endpoints answer 403: an admin API is never
open by accident. A token file is re-read when it changes (tokens.py), so the
token rotates without a restart. /metrics is open: its labels name budgets,
so it is served only on the admin address the operator chooses.

    GET  /healthz                       GET /metrics
    GET  /admin/budgets?principal=P[&run=R]
    POST /admin/budgets/adjust          {principal, scope, dimension, set_limit?, credit?, window?, run?}
    POST /admin/runs/close              {principal, run}
    GET  /admin/ledger?since=ISO|ms&format=jsonl|csv
    GET  /admin/principals
    GET  /admin/activity?principal=P[&since=ISO|ms][&buckets=N]   runs and spend over time (ledger)
    GET  /admin/refusals?principal=P[&limit=N]   this process's recent refusals (DecisionLog)
    GET  /admin/page                    the budget page: HTML without data, open; it asks for
                                        the token and reads everything else from the above
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
)

from .. import ledger as ledger_export
from ..engine.budget import Engine, Identity
from ..engine.recent import DecisionLog
from ..ledger import parse_since
from ..money import nano_to_usd, usd_to_nano
from ..policy.loader import PolicyHolder
from ..policy.model import Policy
from . import metrics, page, render
from .tokens import Tokens

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- operations (HTTP and CLI) ---------------------------------------------------


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
        doc["run_state"] = {"state": snap.run.state, "created_at_ms": snap.run.created_at_ms, "expires_at_ms": snap.run.expires_at_ms,
                            "ancestors": [k.split("/", 1)[1] for k in snap.run.ancestors]}  # nested runs, root first
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


async def export_ledger(engine: Engine, *, since_ms: int, fmt: str, write: Callable[[str], Awaitable[object]]) -> int:
    """Write the ledger page by page (never read whole); returns the entry count."""
    return await ledger_export.export(engine.ledger_pages(since_ms=since_ms), write, fmt)


def principals(policy: Policy) -> list[str]:
    """Every principal the policy names (API keys and the principals table), sorted."""
    return sorted({k.principal for k in policy.keys} | set(policy.principals_by_name))


async def activity(engine: Engine, policy: Policy, principal: str, *, since_ms: int, buckets: int = 48) -> dict[str, Any]:
    """The principal's runs named in the ledger since `since_ms` (with their state now) and
    its charged cost per time bucket, from one pass over the ledger pages."""
    if not 1 <= buckets <= 1000:
        raise ValueError("buckets must be 1..1000")
    who = identity(policy, principal)
    now = engine.clock()
    since_ms = min(since_ms, now - 1)
    step = -(-(now - since_ms) // buckets)
    spend = [0] * buckets
    runs: dict[str, dict[str, Any]] = {}
    async for entries in engine.ledger_pages(since_ms=since_ms):
        for e in entries:
            if e.meta.get("principal") != who.principal:
                continue
            cost = e.charged.get("cost", 0)
            spend[min(buckets - 1, max(0, (e.closed_at_ms - since_ms) // step))] += cost
            if run := e.meta.get("run"):
                r = runs.setdefault(run, {"run": run, "calls": 0, "charged": 0, "last_ms": 0})
                r["calls"] += 1
                r["charged"] += cost
                r["last_ms"] = max(r["last_ms"], e.closed_at_ms)
    out_runs = []
    for r in sorted(runs.values(), key=lambda r: -r["last_ms"]):
        st = await engine.run_state(who, r["run"])
        out_runs.append({**r, "charged": nano_to_usd(r["charged"]), "state": st.state if st else "unknown",
                         "expires_at_ms": st.expires_at_ms if st else None})
    return {
        "principal": who.principal,
        "since_ms": since_ms,
        "now_ms": now,
        "step_ms": step,
        "spend": [{"t_ms": since_ms + i * step, "charged": nano_to_usd(v)} for i, v in enumerate(spend)],
        "runs": out_runs,
    }


def refusals(decisions: DecisionLog, policy: Policy, principal: str, limit: int = 50) -> dict[str, Any]:
    """This process's latest refusals of the principal (the decision log is per process)."""
    who = identity(policy, principal)
    rows = []
    for entry in decisions.refusals(who.principal, limit):
        rows.append({
            "decision_id": entry.decision_id,
            "at_ms": entry.at_ms,
            "run": entry.run,
            "code": entry.code,
            "scope": entry.scope,
            "message": entry.message,
        })
    return {"principal": who.principal, "refusals": rows}


# -- HTTP ------------------------------------------------------------------------


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        return reg
    return REGISTRY


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def _metrics(request: web.Request) -> web.Response:
    metrics.TALLY.flush()  # with several workers the registry read below is their files, not this process
    return web.Response(body=generate_latest(_registry()), headers={"content-type": CONTENT_TYPE_LATEST})


def make_metrics_app() -> web.Application:
    """Only GET /metrics (no token, like the admin API's): for `serve --metrics`, an address
    Prometheus can scrape while the admin API stays on loopback."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    return app


def make_admin_app(engine: Engine, policy: PolicyHolder, tokens: Tokens, decisions: DecisionLog | None = None) -> web.Application:
    log = decisions if decisions is not None else DecisionLog()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/") and request.path != "/admin/page":
            if not tokens:
                return _error(403, "admin API disabled: no admin token configured (EXTPROC_ADMIN_TOKEN or --admin-token-file)")
            given = request.headers.get("authorization", "")
            if given[:7].lower() != "bearer " or not tokens.accepts(given[7:].strip()):
                return _error(401, "missing or wrong admin token")
        try:
            return await handler(request)
        except (LookupError, ValueError) as e:
            return _error(400, str(e))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_budgets(request: web.Request) -> web.Response:
        q = request.query
        if "principal" not in q:
            raise ValueError("principal is required")
        return web.json_response(await budgets(engine, policy.current, q["principal"], q.get("run")))

    async def post_adjust(request: web.Request) -> web.Response:
        body = await _json(request)
        rows = await adjust(
            engine,
            policy.current,
            principal=body["principal"],
            scope=body["scope"],
            dimension=body["dimension"],
            set_limit=body.get("set_limit"),
            credit=body.get("credit"),
            window=body.get("window"),
            run=body.get("run"),
        )
        return web.json_response({"adjusted": rows})

    async def post_close_run(request: web.Request) -> web.Response:
        body = await _json(request)
        return web.json_response(await close_run(engine, policy.current, principal=body["principal"], run=body["run"]))

    async def get_ledger(request: web.Request) -> web.StreamResponse:
        fmt = request.query.get("format", "jsonl")
        if fmt not in ledger_export.FORMATS:
            raise ValueError(f"unknown format {fmt!r}: jsonl or csv")
        since = parse_since(request.query.get("since", "0"))
        resp = web.StreamResponse(headers={"content-type": "text/csv" if fmt == "csv" else "application/x-ndjson"})
        await resp.prepare(request)
        await export_ledger(engine, since_ms=since, fmt=fmt, write=lambda text: resp.write(text.encode()))
        await resp.write_eof()
        return resp

    async def get_principals(request: web.Request) -> web.Response:
        return web.json_response({"principals": principals(policy.current)})

    async def get_activity(request: web.Request) -> web.Response:
        q = request.query
        if "principal" not in q:
            raise ValueError("principal is required")
        since = parse_since(q["since"]) if "since" in q else engine.clock() - 24 * 3600 * 1000
        doc = await activity(engine, policy.current, q["principal"], since_ms=since, buckets=int(q.get("buckets", "48")))
        return web.json_response(doc)

    async def get_refusals(request: web.Request) -> web.Response:
        q = request.query
        if "principal" not in q:
            raise ValueError("principal is required")
        return web.json_response(refusals(log, policy.current, q["principal"], min(500, max(1, int(q.get("limit", "50"))))))

    app = web.Application(middlewares=[auth])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/budgets", get_budgets)
    app.router.add_post("/admin/budgets/adjust", post_adjust)
    app.router.add_post("/admin/runs/close", post_close_run)
    app.router.add_get("/admin/ledger", get_ledger)
    app.router.add_get("/admin/principals", get_principals)
    app.router.add_get("/admin/activity", get_activity)
    app.router.add_get("/admin/refusals", get_refusals)
    app.router.add_get("/admin/page", page.handler)
    return app


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise ValueError(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    for field in ("principal",):
        if field not in body:
            raise ValueError(f"{field} is required")
    return body


async def start_admin(app: web.Application, addr: str) -> web.AppRunner:
    host, _, port = addr.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner


def load_token(path: str | None) -> Tokens:
    """The admin tokens: from `path` (re-read when it changes), else $EXTPROC_ADMIN_TOKEN (may be none)."""
    if path:
        return Tokens.from_file(path, "admin token")
    return Tokens.from_env("EXTPROC_ADMIN_TOKEN")
