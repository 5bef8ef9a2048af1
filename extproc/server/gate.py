"""What a request's headers decide, for ext_proc and ext_authz alike.

The path is normalised and matched against the policy's routes (closed world),
the caller identified from trusted sources, and a caller whose budget is
already spent refused before any body is uploaded. `Session` (ext_proc) goes on
to the body and the response; ext_authz stops here (`authorize`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

from ..engine.budget import Decision, Hold, new_id
from ..engine.calls import Caller, Plan
from ..engine.recent import spent_line
from ..errors import (
    ClientError,
    MethodNotAllowed,
    NoRoute,
    RouteDenied,
    StoreUnavailable,
)
from ..policy.routes import RouteMatch
from ..protocols.paths import BadPath, RequestPath
from ..protocols.paths import normalize as normalize_path
from ..protocols.schemas import Schema, schema_by_name
from . import identity, metrics, render
from .lifecycle import Phase
from .reply import Reply, client_error, store_unavailable
from .services import Services

log = logging.getLogger("extproc.session")


def _envelope_guess(path: RequestPath) -> str:
    """The error envelope before a route is known: Anthropic's under /v1/messages, else OpenAI's."""
    return "anthropic" if [s.lower() for s in path.segments[:2]] == ["v1", "messages"] else "openai"


class Gate:
    def __init__(self, services: Services, *, caller_authenticated: bool = False) -> None:
        self.s = services
        self.policy = services.policy.current  # one snapshot for the whole request
        self.authenticated = caller_authenticated
        self.phase = Phase.START
        self.reservation_id = new_id()  # ours, per stream: never a header the client can set
        self.envelope = "openai"
        self.route: RouteMatch | None = None
        self.schema: Schema | None = None
        self.caller: Caller | None = None
        self.plan: Plan | None = None
        self.fail_open = False  # the store was down and the policy says fail_open

    def _path(self, headers: Mapping[str, str]) -> RequestPath | Reply:
        try:
            path = normalize_path(headers.get(":path", ""))
        except BadPath as e:
            return self._refuse(e)
        self.envelope = _envelope_guess(path)
        return path

    def _route(self, path: RequestPath, method: str) -> RouteMatch | Reply:
        route, path_known = self.policy.route_table.find(path.segments, method)
        if route is None:
            if path_known:
                return self._refuse(MethodNotAllowed(f"{method} is not allowed on {path.path}"))
            return self._refuse(NoRoute(f"{path.path} is not a route of this gateway"))
        self.route = route
        self.schema = schema_by_name(route.spec.api) if route.spec.api else None
        self.envelope = self.schema.envelope if self.schema else self.envelope
        return route

    async def authorize(self, headers: Mapping[str, str], peer_id: str | None) -> Reply | None:
        """ext_authz (None = allow): it sees no body and meters nothing, so it lets through only
        `public` routes and listed `unmetered` ones (an orchestrator's dispatch endpoint) with a
        verified identity and budget room; a metered route must pass the ext_proc filter."""
        path = self._path(headers)
        if isinstance(path, Reply):
            return path
        route = self._route(path, headers.get(":method", ""))
        if isinstance(route, Reply):
            return route
        if route.spec.action == "public":
            return None
        if route.spec.action != "unmetered":
            why = route.spec.note if route.spec.action == "deny" else "it is metered, and this gate (ext_authz) cannot meter it"
            return self._refuse(RouteDenied(f"{path.path} is not served through this gateway: {why}"))
        return await self.gate(headers, peer_id)

    async def gate(self, headers: Mapping[str, str], peer_id: str | None, *, ask_store: bool = True) -> Reply | None:
        """Identity, run, and a refusal if a budget is already spent (no body needed): ext_authz asks
        the store; ext_proc uses this process's recent decision and leaves the rest to the reservation."""
        try:
            self.caller = identity.caller(
                self.policy, headers, peer_id, authenticated=self.authenticated, reservation_id=self.reservation_id
            )
        except ClientError as e:
            return self._refuse(e)
        c, engine = self.caller, self.s.engine
        if c.run_id and c.workflow is not None:  # nested runs: the recorded ancestry (cached after a run's first calls)
            try:
                self.caller = c = replace(c, workflow=await engine.place(self.policy, c.who, c.run_id, c.workflow))
            except ClientError as e:
                return self._refuse(e)
            except StoreUnavailable as e:
                return self._store_down(e)
        if ask_store:
            try:
                checked = await engine.check(
                    self.policy, c.who, run_id=c.run_id, run_overrides=c.run_overrides, workflow=c.workflow
                )
            except StoreUnavailable as e:
                return self._store_down(e)
            return None if checked.allowed else self._early_refusal(checked, checked.blocked)
        recent = self.s.recent.get(c.who, c.run_id, engine.clock())
        if recent is None:
            return None
        self.caller = replace(c, recent=recent)
        spent = spent_line(recent)
        return None if spent is None else self._early_refusal(recent, spent)

    def _headers(self, d: Decision) -> list[tuple[str, str]]:
        plan, caller = self.plan, self.caller
        return render.state_headers(
            d,
            now_ms=self.s.engine.clock(),
            price_version=self.policy.prices.version,
            run_id=caller.run_id if caller else None,
            requested_model=plan.requested if plan else "",
            selected_model=plan.chosen.name if plan else "",
            clamped=plan.clamped if plan else False,
            worst_case=plan.chosen.worst_cost if plan and plan.chosen.right_sized else None,
        )

    def _early_refusal(self, d: Decision, blocked: int | None) -> Reply:
        assert self.caller is not None and blocked is not None
        hold = Hold(self.caller.who.tag, self.reservation_id)
        refusal = replace(d, allowed=False, decision_id=new_id(), blocked=blocked, hold=hold)
        metrics.decided("block", refusal.limits[blocked].scope)
        return self._done(Reply(immediate=render.refusal(self.envelope, refusal, self._headers(refusal), [])))

    def _done(self, reply: Reply) -> Reply:
        self.phase = Phase.DONE
        return reply

    def _refuse(self, e: ClientError, retry_after: int | None = None) -> Reply:
        return self._done(client_error(self.envelope, e, retry_after))

    def _store_down(self, e: StoreUnavailable) -> Reply:
        metrics.child(metrics.STORE_ERRORS, "reserve").inc()
        if self.policy.failure_mode == "fail_open":
            metrics.FAIL_OPEN.inc()
            log.error("budget store unavailable, letting %s through unmetered (failure_mode fail_open): %s", self.reservation_id, e)
            self.fail_open = True
            return self._done(Reply(headers_only=True))  # no body to read; the response passes unmetered
        log.error("budget store unavailable, refusing %s (fail closed): %s", self.reservation_id, e)
        return self._done(store_unavailable(self.envelope))
