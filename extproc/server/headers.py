"""Names of the headers extproc reads and writes (DESIGN.md "Decisions the caller can read")."""

from __future__ import annotations

DECISION = "x-budget-decision"
DECISION_ID = "x-budget-decision-id"
RESERVATION_ID = "x-budget-reservation-id"
MODE = "x-budget-enforcement-mode"
BLOCKING_SCOPE = "x-budget-blocking-scope"
SCOPE = "x-budget-scope"
REMAINING = "x-budget-remaining-usd"
LIMIT = "x-budget-limit-usd"
SPENT = "x-budget-spent-usd"
RESERVED = "x-budget-reserved-usd"
RESERVATION = "x-budget-reservation"  # "expected": right-sized, grows with the stream; "worst_case"
WORST_CASE = "x-budget-worst-case-usd"  # with "expected": what the worst case would have reserved
REQUESTED_MODEL = "x-budget-requested-model"
SELECTED_MODEL = "x-budget-selected-model"
OUTPUT_CLAMPED = "x-budget-output-clamped"
PRICE_VERSION = "x-budget-price-table-version"
COST = "x-budget-cost-usd"
COST_SOURCE = "x-budget-cost-source"  # what the cost was computed from: the ledger's usage_source
RUN_ID = "x-run-id"
# nested runs: one comma-separated entry per level of the run's chain, root first
RUN_CHAIN = "x-budget-run-chain"  # the run ids
RUN_SPENT = "x-budget-run-spent-usd"  # each level's settled spend (the SSE comment: including this call)
RUN_REMAINING = "x-budget-run-remaining-usd"  # each level's cost limit less spent and reserved (this call included)
SHOULD_RETRY = "x-should-retry"
FAILURE_MODE = "x-budget-failure-mode"

# Set by the service on every request it lets through (value: the route's action). Envoy routes
# only requests that carry it, so a request the service did not classify never reaches a
# backend; the edge's header_mutation strips client copies of every x-extproc-* header.
VERDICT = "x-extproc-route"
