"""Reserve, settle and release across every budget that applies to a call.

One call to `Engine.reserve` builds the lines (one per limit of each budget
that applies: key, team, org, user, labels, run), asks the store to take them
atomically (and to check and touch the run in the same step), and returns a
`Decision` the caller can render. `settle` charges the real usage to the same
lines; `release` gives everything back.

Each line is its own counter (`scope:instance|dimension|window`): a budget
for one instance (`id: alice`) counts on `key@id:alice|…`, apart from the
budget for every key (`key:alice|…`), so a call counts once on each; the
policy refuses two limits that would still share a counter.

Runs: a run id is namespaced under its principal (`RunRef.key` =
"principal/run-id"); the store creates it on first sight, refreshes its TTL
on every attempt, caps the principal's active runs, and keeps the lowest
limit a client asked for (`run_overrides`). A refusal by the run itself
(closed, expired, over the cap) is a `Decision` with `reason` set and a
synthetic blocking limit appended, so renderers that read
`blocking`/`states[blocked]` keep working.

Admin operations (`adjust`, `close_run`, `snapshot`, `run_state`), the
ledger export (`ledger_pages`) and housekeeping (`reap`) are thin methods
over the store, addressed the way a request is: policy + identity (+ run id)
+ scope + dimension. Callers outside the engine (server, admin, CLI) go
through these methods, never through the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from ..errors import StoreUnavailable
from ..money import nano_to_usd
from ..policy.model import MAX_EXACT, BudgetSpec, KeySpec, LimitSpec, Policy
from ..records import fast_init
from ..rules import PROBE, Kind, Line, LineState, Mode, Window
from ..stores.base import (
    ExtendResult,
    LedgerEntry,
    ReserveResult,
    RunRef,
    RunRefusal,
    RunState,
    SettleResult,
    Store,
)
from .windows import calendar_period
from .workflow import ATTEMPTS, Ancestry, ModelsUsed, Workflow, attempts_line_key

log = logging.getLogger("extproc.engine")

REAPER_LEASE = "reaper"  # the store lease that makes one worker process (or pod) the reaper


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A fresh random id (128 bits, 32 hex digits) for a reservation or a decision: uuid4's
    randomness without building a UUID object (0.6 instead of 3.9 us; two per call)."""
    return os.urandom(16).hex()


@fast_init
@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, resolved from a trusted source."""

    principal: str
    team: str | None = None
    org: str | None = None
    user: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_key(cls, key: KeySpec) -> Identity:
        return cls(key.principal, key.team, key.org, key.user, dict(key.labels))

    @property
    def tag(self) -> str:
        """The budget tree: every counter of one call lives under it (one Redis Cluster shard)."""
        return f"org:{self.org}" if self.org else "default"

    def scope_value(self, scope: str, run_id: str | None) -> str | None:
        if scope == "key":
            return self.principal
        if scope == "run":
            return f"{self.principal}/{run_id}" if run_id else None
        if scope.startswith("label:"):
            return self.labels.get(scope[6:])
        value: str | None = getattr(self, scope)  # org, team or user: the policy admits no other scope here
        return value


@fast_init
@dataclass(frozen=True, slots=True)
class AppliedLimit:
    scope: str
    scope_id: str
    spec: LimitSpec
    line: Line
    reset_ms: int | None  # calendar reset time; None for other windows

    @property
    def budget(self) -> str:
        return f"{self.scope}:{self.scope_id}"


KIND_OF = {"concurrency": Kind.CONCURRENCY, "duration": Kind.DURATION}


def _amount(dimension: str, usage: Mapping[str, int]) -> int:
    if dimension == "concurrency":
        return 1
    if dimension == "duration":
        return 0
    return usage.get(dimension, 0)


# Counted only after the fact (the tool calls a model returned): nothing to reserve, so the
# line refuses once spent reaches its limit (actuals_only), whatever the policy's mode.
AFTER_THE_FACT = ("tool_calls",)
RETRY_DIMENSIONS = ("retries", ATTEMPTS)


@fast_init
@dataclass(frozen=True, slots=True)
class Hold:
    """What settle/release need to find a reservation again."""

    tag: str
    reservation_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    decision_id: str
    hold: Hold
    limits: tuple[AppliedLimit, ...]
    states: tuple[LineState, ...]
    blocked: int | None
    warned: tuple[int, ...]
    retry_after_ms: int | None
    reserved: Mapping[str, int]  # the estimate reserved (cost nano-USD, tokens, requests)
    mode: Mode
    reason: RunRefusal | None = None  # refused by the run (closed / expired / over the cap), not a budget line
    run: str | None = None  # the run's key ("principal/run-id") when the request belongs to a run
    replayed: bool = False  # the store replayed the first outcome of this reservation id
    deadline_ms: int | None = None  # wall-clock instant the earliest run deadline (duration limit) passes

    @property
    def blocking(self) -> AppliedLimit | None:
        return None if self.blocked is None else self.limits[self.blocked]

    @property
    def refusal_code(self) -> str:
        """insufficient_quota when waiting cannot help (balances, calendar quotas, closed or
        expired runs, a request larger than the whole limit); rate_limit_exceeded when time
        frees room (rolling windows, concurrency, the active-run cap)."""
        b = self.blocking
        if b is None or self.blocked is None:
            return ""
        if self.reason is not None:
            return _REASON_CODES.get(self.reason, "insufficient_quota")
        if b.spec.dimension in RETRY_DIMENSIONS:
            return "retry_budget_exceeded"
        if b.spec.window == "rolling" or b.spec.dimension == "concurrency":
            st = self.states[self.blocked]
            if b.line.amount > st.limit + b.line.margin:
                return "insufficient_quota"  # never fits, however long the caller waits
            return "rate_limit_exceeded"
        return "insufficient_quota"

    @property
    def retry_after_s(self) -> int | None:
        """Whole seconds for a Retry-After header (rounded up), None for insufficient_quota."""
        if self.refusal_code != "rate_limit_exceeded":
            return None
        return max(1, -(-(self.retry_after_ms or 1000) // 1000))

    @property
    def message(self) -> str:
        """One sentence for the refusal envelope ("" when allowed)."""
        b = self.blocking
        if b is None or self.blocked is None:
            return ""
        st = self.states[self.blocked]
        if self.reason is RunRefusal.CLOSED:
            return f"Run {self.run} (or a run it is nested under) was closed by an administrator; start a new run id."
        if self.reason is RunRefusal.EXPIRED:
            return f"Run {self.run} (or a run it is nested under) expired after a period without requests; start a new run id."
        if self.reason is RunRefusal.LIMIT:
            return (
                f"Principal {b.scope_id} already has {st.reserved} active runs (the limit is {st.limit}); "
                f"finish or wait for one to expire before starting run {self.run}."
            )
        if self.reason is RunRefusal.PARENT:
            return (
                f"Run {self.run}: its parent run is unknown or no longer active, or the run was started under "
                "another parent; a child run names an active run of the same caller, the same one every time."
            )
        if self.reason is RunRefusal.DEPTH:
            return f"Run {self.run} would be nested {st.spent} deep; this gateway allows at most {st.limit} ancestor runs."
        if self.reason is RunRefusal.ESCALATION:
            return (
                f"Run {self.run} is past {st.spent}% of its budget (the escalation threshold is {st.limit}%); "
                "it may not move to a model pricier than those it used so far: ask for one of those."
            )
        if self.reason is RunRefusal.ATTEMPTS or b.spec.dimension == ATTEMPTS:
            return f"This call was already attempted {st.spent} times (the limit is {st.limit} attempts); stop retrying it."
        dim = b.spec.dimension
        if dim == "retries":
            return f"Run {b.scope_id} has used its {st.limit} retries; stop retrying and fix the failing step."
        if dim == "tool_calls":
            return f"Run {b.scope_id} has used its {st.limit} tool calls ({st.spent} made)."
        if dim == "duration":
            return f"Run {b.scope_id} has used its wall-clock budget of {st.limit}s."
        if dim == "concurrency":
            return f"Budget {b.budget} allows {st.limit} requests in flight and {st.reserved} are."
        f = nano_to_usd if dim == "cost" else str
        room = f" (and {f(b.line.headroom)} left for calls in flight to grow)" if b.line.headroom else ""
        return (
            f"Budget {b.budget} cannot cover this request: {dim} limit {f(st.limit)}, spent {f(st.spent)}, "
            f"reserved {f(st.reserved)}, this request needs up to {f(b.line.amount)}{room}."
        )

    def tightest(self, dimension: str = "cost") -> tuple[AppliedLimit, LineState] | None:
        """The limit of `dimension` with the least remaining (what the headers report)."""
        best = None
        for lim, st in zip(self.limits, self.states, strict=False):
            if lim.spec.dimension == dimension and (best is None or st.remaining < best[1].remaining):
                best = (lim, st)
        return best


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """Every limit that applies to a caller (and run) with its state, for admin and the budget endpoint."""

    limits: tuple[AppliedLimit, ...]
    states: tuple[LineState, ...]
    run: RunState | None
    now_ms: int

    def rows(self) -> list[tuple[AppliedLimit, LineState]]:
        return list(zip(self.limits, self.states, strict=False))


def run_key(who: Identity, run_id: str) -> str:
    return f"{who.principal}/{run_id}"


def _synthetic_spec(dimension: str, limit: int) -> LimitSpec:
    """The spec of a limit the engine adds itself (attempts per key, a refusal that names its
    cause): never validated, since no policy can write these dimensions."""
    return LimitSpec.model_construct(dimension=dimension, limit=limit, window="total")  # type: ignore[arg-type]


_REASON_CODES = {
    RunRefusal.LIMIT: "rate_limit_exceeded",
    RunRefusal.DEPTH: "run_depth_exceeded",
    RunRefusal.ATTEMPTS: "retry_budget_exceeded",
    RunRefusal.ESCALATION: "model_escalation_refused",
}


def _engine_refusal(policy: Policy, who: Identity, run: RunRef | None, wf: Workflow | None) -> tuple[RunRefusal, LineState] | None:
    """What the engine refuses before asking the store: a run nested deeper than the policy
    allows, a call retried more often than its attempts per call. State: (limit, seen)."""
    if wf is None:
        return None
    if run is not None and wf.depth > policy.runs.max_depth:
        return RunRefusal.DEPTH, LineState("", policy.runs.max_depth, wf.depth, 0)
    cap = policy.runs.max_attempts_per_call
    if cap is not None and wf.retry + 1 > cap:
        return RunRefusal.ATTEMPTS, LineState("", cap, wf.retry, 0)
    return None


def _run_refusal_limit(who: Identity, run: RunRef, result: ReserveResult) -> tuple[AppliedLimit, LineState]:
    """A synthetic limit that names what refused: the principal's run cap, or the run itself."""
    if result.reason is RunRefusal.LIMIT:
        key = f"key:{who.principal}|active_runs"
        line = Line(key, Kind.CONCURRENCY, "concurrency", run.max_active, 1)
        spec = LimitSpec(dimension="concurrency", limit=run.max_active)
        state = LineState(key, run.max_active, 0, result.active_runs or run.max_active)
        return AppliedLimit("key", who.principal, spec, line, None), state
    key = f"run:{run.key}|{result.reason.value if result.reason else 'refused'}"
    line = Line(key, Kind.COUNTER, "requests", 0, 1)
    return AppliedLimit("run", run.key, LimitSpec(dimension="requests", limit=0), line, None), LineState(key, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class _Template:
    """What a limit's line looks like for every caller: computed once per policy."""

    lim: LimitSpec
    suffix: str  # "|dimension|window-id"
    kind: Kind
    mode: Mode
    window: Window
    window_ms: int
    margin: int


def _compile(policy: Policy) -> tuple[tuple[BudgetSpec, tuple[_Template, ...]], ...]:
    specs: Sequence[BudgetSpec] = policy.budgets
    if policy.runs.limits:
        specs = (*specs, BudgetSpec(scope="run", limits=policy.runs.limits))
    out = []
    for spec in specs:
        templates = []
        for lim in spec.limits:
            mode = lim.mode or spec.mode or policy.enforcement.mode
            if lim.dimension in AFTER_THE_FACT and mode is not Mode.ADVISORY:
                mode = Mode.ACTUALS_ONLY
            window = Window.CALENDAR if lim.window in ("day", "week", "month") else Window(lim.window)
            templates.append(
                _Template(
                    lim,
                    f"|{lim.dimension}|{lim.window_id}",
                    KIND_OF.get(lim.dimension, Kind.COUNTER),
                    mode,
                    window,
                    (lim.seconds or 0) * 1000,
                    int(Decimal(lim.value) * policy.enforcement.soft_gate_margin) if mode is Mode.SOFT_GATE else 0,
                )
            )
        out.append((spec, tuple(templates)))
    return tuple(out)


class Engine:
    """Budget decisions over a store. Stateless apart from the store, the clock and a
    cache of each policy's compiled limits (policies are frozen)."""

    def __init__(self, store: Store, *, clock: Callable[[], int] = now_ms) -> None:
        self.store = store
        self.clock = clock
        self.ancestry = Ancestry(store, lambda: self.clock())  # nested runs: each run's recorded ancestors
        self.models_used = ModelsUsed()  # the escalation gate's baseline, per run
        self._compiled: dict[int, tuple[Policy, tuple[tuple[BudgetSpec, tuple[_Template, ...]], ...]]] = {}

    def _templates(self, policy: Policy) -> tuple[tuple[BudgetSpec, tuple[_Template, ...]], ...]:
        hit = self._compiled.get(id(policy))
        if hit is None or hit[0] is not policy:
            if len(self._compiled) >= 16:  # policies are reloaded rarely; keep the last few
                self._compiled.clear()
            hit = self._compiled[id(policy)] = (policy, _compile(policy))
        return hit[1]

    def _applicable(self, policy: Policy, who: Identity, run_id: str | None) -> Iterator[tuple[BudgetSpec, tuple[_Template, ...], str]]:
        """Every budget (with its compiled limits) that applies to this caller and run, and its scope instance."""
        for spec, templates in self._templates(policy):
            value = who.scope_value(spec.scope, run_id)
            if value is None or (spec.id is not None and spec.id != value and spec.scope != "run"):
                continue
            yield spec, templates, value

    def limits_for(
        self,
        policy: Policy,
        who: Identity,
        run_id: str | None,
        amounts: Mapping[str, int],
        now: int,
        *,
        run_overrides: Mapping[str, int] | None = None,
        workflow: Workflow | None = None,
    ) -> tuple[AppliedLimit, ...]:
        """One line per limit of every applicable budget. Run lines carry the client's
        lowered limit for their dimension (`run_overrides`, internal units). A nested run
        also gets one line per limit of each ancestor run (their counters, root first),
        and a call with an idempotency key its per-key attempts line."""
        out = []
        lowers = run_overrides or {}
        ancestors = workflow.ancestors if workflow is not None and run_id else ()
        for spec, templates, own in self._applicable(policy, who, run_id):
            is_run = spec.scope == "run"
            instances = (own, *(run_key(who, a) for a in ancestors)) if is_run else (own,)
            for value in instances:
                prefix = f"{spec.counter_scope}:{value}"  # `key@id:alice` for a budget of that key alone
                lower = lowers if value == own else {}  # a header lowers the caller's own run only
                for t in templates:
                    lim = t.lim
                    period, reset, keep = "", None, 0
                    if t.window is Window.CALENDAR:
                        period, reset, keep = calendar_period(lim.window, lim.timezone, now)
                    line = Line(
                        prefix + t.suffix,
                        t.kind,
                        lim.dimension,
                        lim.value,
                        _amount(lim.dimension, amounts),
                        t.mode,
                        t.window,
                        period,
                        t.window_ms,
                        t.margin,
                        keep,
                        is_run,
                        lower.get(lim.dimension) if is_run else None,
                    )
                    out.append(AppliedLimit(spec.scope, value, lim, line, reset))
        if run_id and workflow is not None and workflow.attempt_key:
            out.append(self._attempts_limit(policy, who, run_id, workflow.attempt_key))
        return tuple(out)

    @staticmethod
    def _attempts_limit(policy: Policy, who: Identity, run_id: str, digest: str) -> AppliedLimit:
        """The attempts of one idempotency key in the run: one counted per attempt, capped by
        `runs.max_attempts_per_call` (else only counted: its spent is the retry depth)."""
        cap = policy.runs.max_attempts_per_call or MAX_EXACT
        key = run_key(who, run_id)
        line = Line(attempts_line_key(key, digest), Kind.COUNTER, ATTEMPTS, cap, 1, run=True)
        return AppliedLimit("run", key, _synthetic_spec(ATTEMPTS, cap), line, None)

    async def place(self, policy: Policy, who: Identity, run_id: str | None, workflow: Workflow) -> Workflow:
        """`workflow` with the run's ancestors (workflow.Ancestry) and, for a call with an
        idempotency key, the attempts already made with it as its retry depth. At most two
        store reads, the first calls of a run only (ancestries are cached). Without a run:
        unchanged (nesting and attempt counting live in runs)."""
        if not run_id:
            return workflow
        wf = await self.ancestry.resolve(who.tag, who.principal, run_id, workflow)
        if wf.attempt_key:
            line = self._attempts_limit(policy, who, run_id, wf.attempt_key).line
            (st,) = await self.store.snapshot([line], tag=who.tag, now_ms=self.clock())
            if st.spent > wf.retry:
                wf = replace(wf, retry=st.spent)
        return wf

    def run_ref(self, policy: Policy, who: Identity, run_id: str | None) -> RunRef | None:
        if not run_id:
            return None
        return RunRef(
            key=run_key(who, run_id),
            owner=who.principal,
            ttl_ms=policy.runs.ttl_seconds * 1000,
            max_active=policy.runs.max_active_per_principal,
        )

    def _decision(
        self, policy: Policy, who: Identity, run: RunRef | None, rid: str, limits: tuple[AppliedLimit, ...],
        result: ReserveResult, amounts: Mapping[str, int],
    ) -> Decision:  # fmt: skip
        states, blocked = result.states, result.blocked
        if result.reason is RunRefusal.PARENT and run is not None:
            self.ancestry.forget(who.tag, run.key)  # read the recorded ancestry again next time
        if result.reason is not None and run is not None:
            extra, st = _run_refusal_limit(who, run, result)
            limits, states, blocked = (*limits, extra), (*states, st), len(limits)
        return Decision(
            allowed=result.ok,
            decision_id=new_id(),
            hold=Hold(who.tag, rid),
            limits=limits,
            states=tuple(states),
            blocked=blocked,
            warned=result.warned,
            retry_after_ms=result.retry_after_ms,
            reserved=amounts,
            mode=policy.enforcement.mode,
            reason=result.reason,
            run=run.key if run else None,
            replayed=result.replayed,
            deadline_ms=result.deadline_ms,
        )

    @staticmethod
    def _amounts(estimate: Mapping[str, int], workflow: Workflow | None = None) -> dict[str, int]:
        amounts = {k: int(v) for k, v in estimate.items()}
        amounts["total_tokens"] = amounts.get("input_tokens", 0) + amounts.get("output_tokens", 0)
        if workflow is not None and workflow.retry:
            amounts["retries"] = 1
        if workflow is not None and workflow.attempt_key:
            amounts[ATTEMPTS] = 1
        return amounts

    @staticmethod
    def _partial(amounts: Mapping[str, int] | None) -> dict[str, int]:
        """`_amounts` for what names only some dimensions (an extension's delta, headroom):
        total_tokens is added only when input or output tokens are given."""
        out = {k: int(v) for k, v in (amounts or {}).items()}
        if "input_tokens" in out or "output_tokens" in out:
            out["total_tokens"] = out.get("input_tokens", 0) + out.get("output_tokens", 0)
        return out

    def _with_headroom(self, limits: tuple[AppliedLimit, ...], headroom: Mapping[str, int] | None) -> tuple[AppliedLimit, ...]:
        room = self._partial(headroom)
        if not any(room.values()):
            return limits
        return tuple(
            replace(l, line=replace(l.line, headroom=room[l.line.dimension]))
            if l.line.kind is Kind.COUNTER and room.get(l.line.dimension)
            else l
            for l in limits
        )

    @staticmethod
    def _nested(run: RunRef | None, limits: Sequence[AppliedLimit], workflow: Workflow | None) -> RunRef | None:
        """The run with its ancestors (keys, root first) and their lines among `limits`."""
        if run is None or workflow is None or not workflow.ancestors:
            return run
        theirs = frozenset(l.line.key for l in limits if l.scope == "run" and l.scope_id != run.key)
        owner = run.key.split("/", 1)[0]
        return replace(run, ancestors=tuple(f"{owner}/{a}" for a in workflow.ancestors), inherited=theirs)

    def refuse_run(self, policy: Policy, who: Identity, run_id: str, reason: RunRefusal, limit: int, seen: int) -> Decision:
        """A refusal the engine decides with no store state (the escalation gate): nothing taken."""
        return self._refused(policy, who, self.run_ref(policy, who, run_id), "", (reason, LineState("", limit, seen, 0)), {})

    def _refused(
        self, policy: Policy, who: Identity, run: RunRef | None, rid: str, early: tuple[RunRefusal, LineState],
        amounts: Mapping[str, int],
    ) -> Decision:  # fmt: skip
        """A refusal the engine made without the store (`_engine_refusal`): nothing was taken."""
        reason, st = early
        scope, scope_id = ("run", run.key) if run is not None else ("key", who.principal)
        dimension = {RunRefusal.DEPTH: "depth", RunRefusal.ESCALATION: "escalation_percent"}.get(reason, ATTEMPTS)
        key = f"{scope}:{scope_id}|{reason.value}"
        line = Line(key, Kind.COUNTER, dimension, st.limit, 1)
        lim = AppliedLimit(scope, scope_id, _synthetic_spec(dimension, st.limit), line, None)
        return Decision(
            allowed=False, decision_id=new_id(), hold=Hold(who.tag, rid), limits=(lim,),
            states=(replace(st, key=key),), blocked=0, warned=(), retry_after_ms=None, reserved=amounts,
            mode=policy.enforcement.mode, reason=reason, run=run.key if run else None,
        )  # fmt: skip

    async def reserve(
        self,
        policy: Policy,
        who: Identity,
        *,
        run_id: str | None,
        reservation_id: str | None,
        estimate: Mapping[str, int],
        meta: Mapping[str, Any],
        run_overrides: Mapping[str, int] | None = None,
        headroom: Mapping[str, int] | None = None,
        workflow: Workflow | None = None,
    ) -> Decision:
        """Reserve `estimate` ({cost, input_tokens, output_tokens, requests}) on every applicable
        limit, all or nothing, in one store round trip. `run_overrides` ({dimension: limit},
        see `runs.run_overrides_from_headers`) lowers the run's limits for good. `headroom`
        ({dimension: amount}; total_tokens follows input + output tokens) must fit on top of
        the estimate on every counter limit of that dimension but is not taken: room left
        for the streams in flight to extend into (fairness under pressure). `workflow`
        places the call in its run tree and says whether it is a retry (workflow.py)."""
        now = self.clock()
        amounts = self._amounts(estimate, workflow)
        limits = self.limits_for(policy, who, run_id, amounts, now, run_overrides=run_overrides, workflow=workflow)
        limits = self._with_headroom(limits, headroom)
        run = self._nested(self.run_ref(policy, who, run_id), limits, workflow)
        rid = reservation_id or new_id()
        if (early := _engine_refusal(policy, who, run, workflow)) is not None:
            return self._refused(policy, who, run, rid, early, amounts)
        result = await self.store.reserve(
            who.tag,
            rid,
            [l.line for l in limits],
            now_ms=now,
            ttl_ms=policy.reservation_ttl_seconds * 1000,
            meta={**meta, "principal": who.principal, "run": run_id, "estimate": amounts, **(workflow.meta() if workflow else {})},
            run=run,
        )
        return self._decision(policy, who, run, rid, limits, result, amounts)

    async def check(
        self,
        policy: Policy,
        who: Identity,
        *,
        run_id: str | None = None,
        estimate: Mapping[str, int] | None = None,
        run_overrides: Mapping[str, int] | None = None,
        headroom: Mapping[str, int] | None = None,
        workflow: Workflow | None = None,
    ) -> Decision:
        """What `reserve` would decide now, taking nothing (ext_authz, the early header check).
        Without an estimate it probes with the smallest request (`PROBE`): refused means a
        budget, step cap, run deadline or the run itself is already spent."""
        now = self.clock()
        amounts = self._amounts(PROBE if estimate is None else estimate, workflow)
        limits = self.limits_for(policy, who, run_id, amounts, now, run_overrides=run_overrides, workflow=workflow)
        limits = self._with_headroom(limits, headroom)
        run = self._nested(self.run_ref(policy, who, run_id), limits, workflow)
        if (early := _engine_refusal(policy, who, run, workflow)) is not None:
            return self._refused(policy, who, run, "", early, amounts)
        result = await self.store.check(who.tag, [l.line for l in limits], now_ms=now, run=run)
        return self._decision(policy, who, run, "", limits, result, amounts)

    async def extend(self, policy: Policy, hold: Hold, delta: Mapping[str, int]) -> ExtendResult:
        """Grow a held reservation by `delta` ({cost, input_tokens, output_tokens, ...};
        total_tokens follows input + output tokens) on every counter limit of those
        dimensions, all or none, in one store round trip, and push its TTL to now +
        `reservation_ttl_seconds`. Refused (ok False): a limit cannot take the delta, a run
        deadline passed, or the run was closed (`reason`); found False: the reservation is no
        longer held (settled, released, expired). Not idempotent: every call adds."""
        return await self.store.extend(
            hold.tag, hold.reservation_id, self._partial(delta), now_ms=self.clock(), ttl_ms=policy.reservation_ttl_seconds * 1000
        )

    async def settle(self, hold: Hold, usage: Mapping[str, int], meta: Mapping[str, Any] | None = None) -> SettleResult:
        return await self.store.settle(hold.tag, hold.reservation_id, usage, now_ms=self.clock(), meta=meta)

    async def release(self, hold: Hold) -> SettleResult:
        return await self.store.release(hold.tag, hold.reservation_id, now_ms=self.clock())

    async def settle_retrying(self, hold: Hold, usage: Mapping[str, int], meta: Mapping[str, Any] | None = None) -> None:
        """`settle` in the background after the store refused it; the reservation's TTL is the backstop."""
        await _retrying(lambda: self.settle(hold, usage, meta), f"settling {hold.reservation_id}", delay=0.2)

    async def release_retrying(self, hold: Hold) -> None:
        """`release` in the background for a request that will never run (the store failed after the hold)."""
        await _retrying(lambda: self.release(hold), f"releasing {hold.reservation_id}", delay=0.0)

    async def expire(self) -> int:
        return await self.store.expire(now_ms=self.clock())

    async def record(self, tag: str, record_id: str, meta: Mapping[str, Any]) -> None:
        """A zero-charge ledger entry with `meta` (an alert delivery): a reservation of no
        line, settled at once, so the ledger export shows it among the calls."""
        now = self.clock()
        await self.store.reserve(tag, record_id, [], now_ms=now, ttl_ms=60_000, meta=meta)
        await self.store.settle(tag, record_id, {}, now_ms=now)

    # -- housekeeping and the store's health -------------------------------------

    async def reap(self, owner: str, *, lease_ms: int, ledger_retention_ms: int | None = None) -> int | None:
        """One reaper per store: when `owner` holds (or takes) the reaper lease, expire
        reservations past their TTL and trim the ledger past its retention; returns how
        many expired, or None when another owner (worker process, pod) holds the lease."""
        now = self.clock()
        if not await self.store.lead(REAPER_LEASE, owner, now_ms=now, ttl_ms=lease_ms):
            return None
        n = await self.store.expire(now_ms=now)
        if ledger_retention_ms:
            await self.store.trim_ledger(before_ms=now - ledger_retention_ms)
        return n

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        await self.store.ping()

    async def close(self) -> None:
        await self.store.close()

    # -- ledger ----------------------------------------------------------------

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None) -> list[LedgerEntry]:
        """Ledger entries closed at or after `since_ms`, by close time (small reads; export pages)."""
        return await self.store.ledger(since_ms=since_ms, limit=limit)

    async def ledger_pages(self, *, since_ms: int = 0, page: int = 1000) -> AsyncIterator[list[LedgerEntry]]:
        """The ledger for export, `page` entries at a time in the store's append order:
        never read whole."""
        after: str | None = None
        while True:
            entries, after = await self.store.ledger_page(since_ms=since_ms, after=after, limit=page)
            if entries:
                yield entries
            if after is None:
                return

    # -- admin -----------------------------------------------------------------

    async def snapshot_lines(
        self, policy: Policy, who: Identity, *, run_id: str | None = None, workflow: Workflow | None = None
    ) -> BudgetSnapshot:
        """Every budget of this caller (and run, and the run's ancestors) as the store sees it
        now; one store read, no run state (the budget endpoint)."""
        now = self.clock()
        limits = self.limits_for(policy, who, run_id, {}, now, workflow=workflow)
        states = await self.store.snapshot([l.line for l in limits], tag=who.tag, now_ms=now)
        return BudgetSnapshot(limits, states, None, now)

    async def snapshot(self, policy: Policy, who: Identity, *, run_id: str | None = None) -> BudgetSnapshot:
        """Every budget of this caller (and run) as the store sees it now, plus the run's state."""
        snap = await self.snapshot_lines(policy, who, run_id=run_id)
        if not run_id:
            return snap
        run = await self.store.run_state(who.tag, run_key(who, run_id), now_ms=snap.now_ms)
        return BudgetSnapshot(snap.limits, snap.states, run, snap.now_ms)

    async def adjust(
        self,
        policy: Policy,
        who: Identity,
        *,
        scope: str,
        dimension: str,
        window: str | None = None,
        run_id: str | None = None,
        set_limit: int | None = None,
        credit: int = 0,
    ) -> list[tuple[AppliedLimit, LineState]]:
        """Admin: set (raise or lower) and/or credit the limits of `scope` on `dimension`
        (every window, or only `window`) for this caller. Units are internal (nano-USD for
        cost). Setting a run's limit also drops the client's lowered limit. Returns the
        adjusted limits with their new state; LookupError when nothing matches."""
        now = self.clock()
        matches = [
            l
            for l in self.limits_for(policy, who, run_id, {}, now)
            if l.scope == scope and l.spec.dimension == dimension and (window is None or l.spec.window == window)
        ]
        if not matches:
            raise LookupError(f"no {dimension} limit of scope {scope!r} applies to {who.principal}")
        for l in matches:
            await self.store.adjust(who.tag, l.line.key, set_limit=set_limit, credit=credit)
        states = await self.store.snapshot([l.line for l in matches], tag=who.tag, now_ms=self.clock())
        return list(zip(matches, states, strict=True))

    async def set_limit(
        self, policy: Policy, who: Identity, *, scope: str, dimension: str, limit: int, **kw: Any
    ) -> list[tuple[AppliedLimit, LineState]]:
        return await self.adjust(policy, who, scope=scope, dimension=dimension, set_limit=limit, **kw)

    async def credit(
        self, policy: Policy, who: Identity, *, scope: str, dimension: str, amount: int, **kw: Any
    ) -> list[tuple[AppliedLimit, LineState]]:
        return await self.adjust(policy, who, scope=scope, dimension=dimension, credit=amount, **kw)

    async def close_run(self, policy: Policy, who: Identity, run_id: str) -> RunState:
        """Admin: refuse every further reservation of this run (in-flight ones still settle)."""
        run = self.run_ref(policy, who, run_id)
        assert run is not None
        return await self.store.close_run(who.tag, run, now_ms=self.clock())

    async def run_state(self, who: Identity, run_id: str) -> RunState | None:
        return await self.store.run_state(who.tag, run_key(who, run_id), now_ms=self.clock())


async def _retrying(op: Callable[[], Awaitable[Any]], what: str, *, delay: float, tries: int = 12) -> None:
    for _ in range(tries):
        await asyncio.sleep(delay)
        try:
            await op()
            return
        except StoreUnavailable:
            delay = min(max(delay, 0.1) * 2, 10.0)
    log.error("giving up %s; the reaper will expire it at the reserved amount", what)
