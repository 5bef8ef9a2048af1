"""Shared vectors for the refusal rules: one table, run against `extproc.rules`
(Python: the embedded store and the early refusal) and `stores/lua/rules.lua`
(the Redis scripts) by test_rule_vectors.py, so the two copies cannot drift.

Each row: the line (kind, mode, amount, margin, headroom), the state (limit,
spent, reserved), and what the rules answer: `over` (advisory warns), `blocks`
(refused), `need` (rolling windows: settled spend that must leave the window;
counters only). The edges sit exactly at the limit and at limit + margin.
Headroom must fit on top of the amount on gating counter lines; `over` (what
is actually taken) and the other kinds ignore it.
"""

from __future__ import annotations

# kind, mode, limit, spent, reserved, amount, margin -> over, blocks, need (headroom 0 unless given)
VECTORS: list[dict] = []


def _row(kind, mode, limit, spent, reserved, amount, margin, over, blocks, need=None, headroom=0):  # type: ignore[no-untyped-def]
    VECTORS.append(dict(kind=kind, mode=mode, limit=limit, spent=spent, reserved=reserved, amount=amount,
                        margin=margin, over=over, blocks=blocks, need=need, headroom=headroom))  # fmt: skip


# hard_gate counter: spent + reserved + amount > limit
_row("counter", "hard_gate", 100, 60, 30, 10, 0, False, False, 0)
_row("counter", "hard_gate", 100, 60, 30, 11, 0, True, True, 1)
_row("counter", "hard_gate", 100, 100, 0, 0, 0, False, False, 0)
_row("counter", "hard_gate", 100, 100, 0, 1, 0, True, True, 1)
_row("counter", "hard_gate", 0, 0, 0, 0, 0, False, False, 0)
# soft_gate: the margin is slack above the limit
_row("counter", "soft_gate", 100, 60, 30, 20, 10, True, False, 0)
_row("counter", "soft_gate", 100, 60, 30, 21, 10, True, True, 1)
_row("counter", "soft_gate", 100, 110, 0, 0, 10, True, False, 0)
_row("counter", "soft_gate", 100, 110, 0, 1, 10, True, True, 1)
_row("counter", "soft_gate", 100, 50, 0, 5, 0, False, False, -45)
# actuals_only: only settled spend counts
_row("counter", "actuals_only", 100, 99, 500, 500, 0, True, False, 0)
_row("counter", "actuals_only", 100, 100, 0, 0, 0, False, True, 1)
_row("counter", "actuals_only", 100, 130, 0, 1, 0, True, True, 31)
# advisory: never blocks, warns when over
_row("counter", "advisory", 100, 90, 0, 11, 0, True, False, 1)
_row("counter", "advisory", 100, 90, 0, 10, 0, False, False, 0)
# concurrency: reserved + amount > limit, in every blocking mode (the mode does not soften it)
for m in ("hard_gate", "soft_gate", "actuals_only"):
    _row("concurrency", m, 2, 0, 1, 1, 5, False, False)
    _row("concurrency", m, 2, 0, 2, 1, 5, True, True)
_row("concurrency", "advisory", 2, 0, 2, 1, 0, True, False)
# duration: spent (seconds since the first reservation) >= limit
for m in ("hard_gate", "soft_gate", "actuals_only"):
    _row("duration", m, 60, 59, 0, 0, 5, False, False)
    _row("duration", m, 60, 60, 0, 0, 5, True, True)
_row("duration", "advisory", 60, 61, 0, 0, 0, True, False)
# headroom: must fit on top of the amount on gating counters, is not what `over` warns about
_row("counter", "hard_gate", 100, 60, 30, 5, 0, False, False, 0, headroom=5)
_row("counter", "hard_gate", 100, 60, 30, 5, 0, False, True, 1, headroom=6)
_row("counter", "soft_gate", 100, 60, 30, 5, 10, False, False, 0, headroom=15)
_row("counter", "soft_gate", 100, 60, 30, 5, 10, False, True, 1, headroom=16)
_row("counter", "actuals_only", 100, 99, 0, 5, 0, True, False, 0, headroom=500)
_row("counter", "advisory", 100, 60, 30, 5, 0, False, False, 1, headroom=6)
_row("concurrency", "hard_gate", 2, 0, 1, 1, 0, False, False, headroom=5)
_row("duration", "hard_gate", 60, 59, 0, 0, 0, False, False, headroom=5)
