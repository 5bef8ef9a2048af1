"""The admin HTTP API: metrics and health open, everything else behind a bearer token.

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
"""

from __future__ import annotations

import json
import os
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from .. import admin
from ..engine.budget import Engine
from ..ledger import parse_since
from ..policy.loader import PolicyHolder
from .tokens import Tokens

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    return REGISTRY


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def make_admin_app(engine: Engine, policy: PolicyHolder, tokens: Tokens) -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
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

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(_registry()), headers={"content-type": CONTENT_TYPE_LATEST})

    async def budgets(request: web.Request) -> web.Response:
        q = request.query
        if "principal" not in q:
            raise ValueError("principal is required")
        return web.json_response(await admin.budgets(engine, policy.current, q["principal"], q.get("run")))

    async def adjust(request: web.Request) -> web.Response:
        body = await _json(request)
        rows = await admin.adjust(
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

    async def close_run(request: web.Request) -> web.Response:
        body = await _json(request)
        return web.json_response(await admin.close_run(engine, policy.current, principal=body["principal"], run=body["run"]))

    async def ledger(request: web.Request) -> web.Response:
        fmt = request.query.get("format", "jsonl")
        text = await admin.ledger(engine, since_ms=parse_since(request.query.get("since", "0")), fmt=fmt)
        return web.Response(text=text, content_type="text/csv" if fmt == "csv" else "application/x-ndjson")

    app = web.Application(middlewares=[auth])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/budgets", budgets)
    app.router.add_post("/admin/budgets/adjust", adjust)
    app.router.add_post("/admin/runs/close", close_run)
    app.router.add_get("/admin/ledger", ledger)
    return app


async def _json(request: web.Request) -> dict:
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
