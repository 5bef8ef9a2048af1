"""What both stores write down alike: the line wire format, the key kinds of a
budget tree, and the housekeeping constants. Written once, here.

The Redis scripts do not repeat any of it: `lua_prelude()` turns these names
into Lua locals (`F_AMOUNT`, `K_RESERVED`, `MODE_SOFT_GATE`, ...) that are
prepended to every script, together with `lua/rules.lua` (the refusal rules of
`extproc.rules`).

A line on the wire is a JSON array in `LINE_FIELDS` order; `lower` is -1 for
none, `run` is 0/1. Arrays written before a field existed (a reservation
taken by an older version) are shorter: readers take a missing `run`/`lower`
as 0/none and a missing `headroom` as 0. Keys of a budget tree are
`<kind><sep><line key>`, with `sep` "|" in the embedded store's kv table and
":" under Redis' `xp:{tag}:`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..rules import Kind, Line, Mode, Window
from . import _json as json

LINE_FIELDS = (
    "key", "kind", "dimension", "limit", "amount", "mode", "window", "period",
    "window_ms", "margin", "period_ttl_s", "run", "lower", "headroom",
)  # fmt: skip

# Key kinds: one counter of one line each (the calendar bucket adds "|period").
LIMIT = "lim"  # admin limit override
CREDIT = "cr"  # admin credits
LOWERED = "low"  # a run's lowered limit
RESERVED = "r"  # reserved (in flight)
SPENT = "s"  # spent in a period: s|K|P
ROLLING_SUM = "es"  # rolling spent: the sum of the window's events
EVENTS = "e"  # rolling charges
FIRST = "t0"  # first reservation (ms) of a duration line
KEY_KINDS = {"LIMIT": LIMIT, "CREDIT": CREDIT, "LOWERED": LOWERED, "RESERVED": RESERVED, "SPENT": SPENT,
             "ROLLING_SUM": ROLLING_SUM, "EVENTS": EVENTS, "FIRST": FIRST}  # fmt: skip
RUN_KEY_KINDS = (LIMIT, CREDIT, LOWERED, RESERVED, ROLLING_SUM, FIRST)  # purged with a run (besides s|K| and e|K)

PURGE_RETRY_MS = 60_000  # a run still holding reservations is purged this much later


def line_to_wire(line: Line) -> list[Any]:
    return [
        line.key, line.kind.value, line.dimension, line.limit, line.amount, line.mode.value, line.window.value,
        line.period, line.window_ms, line.margin, line.period_ttl_s, int(line.run), -1 if line.lower is None else line.lower,
        line.headroom,
    ]  # fmt: skip


def line_from_wire(d: Sequence[Any]) -> Line:
    run, lower = (bool(d[11]), None if d[12] < 0 else d[12]) if len(d) > 12 else (False, None)
    headroom = d[13] if len(d) > 13 else 0
    return Line(d[0], Kind(d[1]), d[2], d[3], d[4], Mode(d[5]), Window(d[6]), d[7], d[8], d[9], d[10], run, lower, headroom)


def lines_json(lines: Sequence[Line]) -> str:
    return json.dumps([line_to_wire(l) for l in lines])


def lua_prelude() -> str:
    """Lua locals for the wire format: field indices, key prefixes (with ':'), enum values."""
    out = [f"local F_{name.upper()} = {i}" for i, name in enumerate(LINE_FIELDS, 1)]
    out += [f"local K_{name} = '{kind}:'" for name, kind in KEY_KINDS.items()]
    for enum in (Kind, Mode, Window):
        out += [f"local {enum.__name__.upper()}_{m.name} = '{m.value}'" for m in enum]
    return "\n".join(out) + "\n"
