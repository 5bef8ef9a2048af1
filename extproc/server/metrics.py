"""Prometheus metrics of decisions, latency, estimate error, store health and spend.

Spend per budget is labelled only for non-run scopes (runs are unbounded in
number; their spend is in the ledger). With several worker processes the
admin endpoint aggregates through prometheus-client's multiprocess mode.

The call path names what happened (`decided`, `settled`, ...); the updates are
tallied (`tally.py`) and reach prometheus-client in batches.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from .tally import FlushFirst, Tally

T = TypeVar("T")
TALLY = Tally()
REGISTRY.register(FlushFirst(TALLY))  # before the metrics below: a read of the registry flushes first

DECISIONS = Counter("extproc_decisions_total", "Budget decisions by outcome and blocking scope kind", ["outcome", "scope"])
RESERVE_SECONDS = Histogram(
    "extproc_reserve_seconds", "Time to reserve across all budgets (store round trip included)",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
SETTLE_SECONDS = Histogram(
    "extproc_settle_seconds", "Time to settle a reservation",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
ESTIMATE_RATIO = Histogram(
    "extproc_charged_to_reserved_ratio", "Charged cost / reserved cost per settled call (estimate error)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0),
)
STORE_ERRORS = Counter("extproc_store_errors_total", "Budget store operations that failed", ["op"])
INFLIGHT = Gauge("extproc_inflight_reservations", "Reservations held by this process", multiprocess_mode="livesum")
SPEND = Counter("extproc_spend_nano_usd_total", "Settled spend in nano-USD per budget (runs excluded)", ["budget"])
# The state of each cost limit (runs excluded) as of the last settle on it, per window
# (`total`, `day@UTC`, `roll3600s`, ...): what deploy/istio/prometheusrule.yaml alerts on.
BUDGET_LIMIT = Gauge(
    "extproc_budget_limit_nano_usd", "Cost limit of a budget in nano-USD (admin credits included)", ["budget", "window"],
    multiprocess_mode="mostrecent",
)
BUDGET_SPENT = Gauge(
    "extproc_budget_spent_nano_usd", "Settled spend of a budget in its current window, nano-USD, as of the last settle",
    ["budget", "window"], multiprocess_mode="mostrecent",
)
FAIL_OPEN = Counter("extproc_fail_open_total", "Requests let through unmetered because the store was down (fail_open)")
CALLERS_REFUSED = Counter(
    "extproc_grpc_callers_refused_total", "gRPC calls refused before any work: missing, wrong or placeholder caller token", ["reason"]
)
EXTENSIONS = Counter(
    "extproc_extensions_total", "Reservation growths of streams by outcome (ok, refused, error; touch: a long stream's TTL pushed)",
    ["outcome"],
)
CUTS = Counter("extproc_stream_cuts_total", "Streams the service ended because a budget could not grow (by reason)", ["reason"])
RESERVED_TO_CHARGED = Histogram(
    "extproc_reserved_to_charged_ratio", "Peak reserved / charged cost per settled call (false-refusal risk: high means over-reserving)",
    buckets=(1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1000.0),
)
OVERRUNS = Counter("extproc_overruns_total", "Settlements that charged more than the call's reservation (ledger meta: overrun)")


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}
_CHILDREN_MAX = 4096  # label sets are budgets x windows of the policy: bounded, but a reload can add new ones


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: prometheus-client validates and locks on every call."""
    key = (id(metric), labels)
    got = _CHILDREN.get(key)
    if got is None:
        if len(_CHILDREN) >= _CHILDREN_MAX:
            _CHILDREN.clear()
        got = _CHILDREN[key] = metric.labels(*labels)
    return got


def decided(outcome: str, scope: str) -> None:
    """One budget decision (`allow`, `downshift`, `block`, ...); `scope`: the blocking budget's kind."""
    TALLY.inc(child(DECISIONS, outcome, scope))


async def reserving(reservation: Awaitable[T]) -> T:
    """`reservation` awaited and timed (store round trips included), failed ones too: a store
    that times out is what the reserve latency should show."""
    t0 = time.perf_counter()
    try:
        return await reservation
    finally:
        TALLY.observe(RESERVE_SECONDS, time.perf_counter() - t0)


def held() -> None:
    TALLY.inc(INFLIGHT)


def released() -> None:
    """A hold ended without a settle (the call never reached the backend)."""
    TALLY.inc(INFLIGHT, -1.0)


def extended(outcome: str) -> None:
    """A stream's reservation grew (`ok`), had its TTL pushed (`touch`), or could not grow."""
    TALLY.inc(child(EXTENSIONS, outcome))


def cut(reason: str) -> None:
    TALLY.inc(child(CUTS, reason))


def settled(d: Any, done: Any, seconds: float) -> None:
    """Record one settled call (`engine.holds.Settled` of the hold of decision `d`)."""
    tally = TALLY
    tally.inc(INFLIGHT, -1.0)
    tally.observe(SETTLE_SECONDS, seconds)
    if done.reserved:
        tally.observe(ESTIMATE_RATIO, done.cost / done.reserved)
        if done.cost:
            tally.observe(RESERVED_TO_CHARGED, done.reserved / done.cost)
    if done.overrun:
        tally.inc(OVERRUNS)
    if not done.stored:
        tally.inc(child(STORE_ERRORS, "settle"))
    elif not done.replayed:
        cost, counted = done.cost, []
        for lim, st in zip(d.limits, d.states, strict=False):
            if lim.spec.dimension == "cost" and lim.scope != "run":
                spend, limit, spent = _budget_metrics(lim)
                if spend not in counted:  # a budget with a daily and a total limit spent the cost once
                    counted.append(spend)
                    tally.inc(spend, cost)
                tally.set(limit, st.limit)
                tally.set(spent, st.spent + cost)


_BUDGETS: dict[str, tuple[Any, Any, Any]] = {}


def _budget_metrics(lim: Any) -> tuple[Any, Any, Any]:
    """The spend counter and the limit and spent gauges of one cost limit (an `AppliedLimit`).
    Labelled by the budget's counters, `key:alice`, or `key@id:alice` for a budget of that key
    alone (policy `id`): the two are separate budgets with their own limits, not one."""
    got = _BUDGETS.get(lim.line.key)  # `<counter scope>:<id>|cost|<window>`: one per budget and window
    if got is None:
        if len(_BUDGETS) >= _CHILDREN_MAX:
            _BUDGETS.clear()
        budget, window = lim.line.key.partition("|")[0], lim.spec.window_id
        got = _BUDGETS[lim.line.key] = (
            SPEND.labels(budget), BUDGET_LIMIT.labels(budget, window), BUDGET_SPENT.labels(budget, window)
        )
    return got
