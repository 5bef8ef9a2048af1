"""Prometheus metrics of decisions, latency, estimate error, store health and spend.

Spend per budget is labelled only for non-run scopes (runs are unbounded in
number; their spend is in the ledger). With several worker processes the
admin endpoint aggregates through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

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


def settled(d: Any, done: Any, seconds: float) -> None:
    """Record one settled call (`engine.holds.Settled` of the hold of decision `d`)."""
    INFLIGHT.dec()
    SETTLE_SECONDS.observe(seconds)
    if done.reserved:
        ESTIMATE_RATIO.observe(done.cost / done.reserved)
        if done.cost:
            RESERVED_TO_CHARGED.observe(done.reserved / done.cost)
    if done.overrun:
        OVERRUNS.inc()
    if not done.stored:
        child(STORE_ERRORS, "settle").inc()
    elif not done.replayed:
        for lim, st in zip(d.limits, d.states, strict=False):
            if lim.spec.dimension == "cost" and lim.scope != "run":
                child(SPEND, lim.budget).inc(done.cost)
                window = lim.spec.window_id
                child(BUDGET_LIMIT, lim.budget, window).set(st.limit)
                child(BUDGET_SPENT, lim.budget, window).set(st.spent + done.cost)
