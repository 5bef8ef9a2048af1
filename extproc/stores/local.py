"""What the two stores that decide in Python (embedded: SQLite, journal: in process) share:
line states from their counters, the decision on them, and the records a reservation
leaves (its reservation record, the closed record, the ledger entry). Written once, here;
each store only reads and writes its own storage around these.

Counters are read by their kv key `tag|<kind>|<line key>` (kinds in `wire.py`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..rules import blocks, deadline_ms, over, rolling_need
from . import _json as json
from .base import (
    Kind,
    LedgerEntry,
    Line,
    LineState,
    Mode,
    Outcome,
    ReserveResult,
    RunRef,
    RunRefusal,
    SettleResult,
    Window,
    normalize_usage,
    usage_of_lines,
)
from .wire import CREDIT, FIRST, LIMIT, LOWERED, RESERVED, ROLLING_SUM, SPENT, line_to_wire


def state_keys(tag: str, line: Line) -> list[str]:
    """The kv keys `line_states` reads for one line."""
    k = line.key
    keys = [f"{tag}|{LIMIT}|{k}", f"{tag}|{CREDIT}|{k}"]
    if line.run:
        keys.append(f"{tag}|{LOWERED}|{k}")
    if line.kind is Kind.DURATION:
        keys.append(f"{tag}|{FIRST}|{k}")
        return keys
    keys.append(f"{tag}|{RESERVED}|{k}")
    if line.kind is Kind.COUNTER:
        keys.append(spent_key(tag, line))
    return keys


def spent_key(tag: str, line: Line) -> str:
    """Where a counter line's spend is: the rolling sum, else the period's bucket."""
    return f"{tag}|{ROLLING_SUM}|{line.key}" if line.window is Window.ROLLING else f"{tag}|{SPENT}|{line.key}|{line.period}"


def line_states(tag: str, lines: Sequence[Line], got: Mapping[str, int], now_ms: int) -> tuple[list[LineState], list[int | None]]:
    """Every line's state from the counters in `got` (rolling windows already trimmed), and the
    first reservation (ms) of each duration line (None before it and on other lines)."""
    out: list[LineState] = []
    firsts: list[int | None] = []
    for line in lines:
        k = line.key
        override = got.get(f"{tag}|{LIMIT}|{k}")
        limit = (line.limit if override is None else override) + got.get(f"{tag}|{CREDIT}|{k}", 0)
        if line.run:
            low = got.get(f"{tag}|{LOWERED}|{k}")
            if low is not None and low < limit:
                limit = low
            if line.lower is not None and line.lower < limit:
                limit = line.lower
        if line.kind is Kind.DURATION:
            t0 = got.get(f"{tag}|{FIRST}|{k}")
            firsts.append(t0)
            out.append(LineState(k, limit, 0 if t0 is None else (now_ms - t0) // 1000, 0))
            continue
        firsts.append(None)
        spent = got.get(spent_key(tag, line), 0) if line.kind is Kind.COUNTER else 0
        out.append(LineState(k, limit, spent, got.get(f"{tag}|{RESERVED}|{k}", 0)))
    return out, firsts


def retry_after(line: Line, st: LineState, now_ms: int, charges: Callable[[], Iterable[tuple[int, int]]]) -> int | None:
    """When the blocked `line` would pass: a rolling window's `charges()` ((ts, amount), oldest
    first) leave it one by one; concurrency retries in a second; nothing else frees with time."""
    if line.kind is Kind.CONCURRENCY:
        return 1000 if line.amount <= st.limit else None
    if line.kind is not Kind.COUNTER or line.window is not Window.ROLLING:
        return None
    need = rolling_need(line, st)
    if need > st.spent:
        return None  # frees only when reservations close, or never
    freed = 0
    for ts, amount in charges():
        freed += amount
        if freed >= need:
            return max(1, int(ts) + line.window_ms - now_ms)
    return None


def decide(
    rid: str,
    lines: Sequence[Line],
    states: list[LineState],
    firsts: list[int | None],
    now_ms: int,
    run_check: tuple[RunRefusal | None, int | None, int | None],
    retry_of: Callable[[int], int | None],
) -> ReserveResult:
    """What a reservation attempt answers: refused by its run (`run_check`), by the first
    gating line that blocks (`retry_of(index)` says when it would pass), or ok."""
    reason, retry, active = run_check
    blocked: int | None = None
    warned: list[int] = []
    for i, (line, st) in enumerate(zip(lines, states, strict=True)):
        if line.mode is Mode.ADVISORY:
            if over(line, st):
                warned.append(i)
        elif blocked is None and blocks(line, st):
            blocked = i
    if reason is not None:
        blocked = None
    elif blocked is not None:
        retry = retry_of(blocked)
    ok = reason is None and blocked is None
    deadline = earliest_deadline(lines, states, firsts, now_ms)
    return ReserveResult(ok, rid, tuple(states), blocked, tuple(warned), retry, False, reason, active, deadline)


def taken(res: ReserveResult, lines: Sequence[Line]) -> ReserveResult:
    """The ok result `res` after its amounts were reserved (duration lines take nothing)."""
    after = [st if line.kind is Kind.DURATION else LineState(st.key, st.limit, st.spent, st.reserved + line.amount)
             for line, st in zip(lines, res.states, strict=True)]  # fmt: skip (a constructor: half of replace()'s cost)
    return ReserveResult(True, res.reservation_id, tuple(after), None, res.warned, deadline_ms=res.deadline_ms)


def reservation_record(
    res: ReserveResult, lines: Sequence[Line], meta: Mapping[str, Any], now_ms: int, run: RunRef | None
) -> dict[str, Any]:
    """What a store keeps of a reservation it took: its answer (replayed to a retry), lines, meta, estimate."""
    record = result_json(res)
    record.update(
        lines=[line_to_wire(l) for l in lines],
        meta=dict(meta),
        estimate=normalize_usage(meta.get("estimate") or usage_of_lines(lines)),
        created_at=now_ms,
        run=None if run is None else [run.key, run.owner, run.ttl_ms, run.max_active, run.memory_ms],
    )
    return record


def charges(
    data: Mapping[str, Any], lines: Sequence[Line], outcome: Outcome, usage: Mapping[str, int] | None
) -> tuple[dict[str, int], dict[str, int]]:
    """(what the reservation stood for, what closing it with `outcome` charges): expiry charges
    the estimate, a release nothing, a settle the usage."""
    reserved: dict[str, int] = data.get("estimate") or normalize_usage(data["meta"].get("estimate") or usage_of_lines(lines))
    if outcome is Outcome.EXPIRED:
        return reserved, dict(reserved)
    if outcome is Outcome.RELEASED:
        return reserved, {}
    return reserved, normalize_usage(usage or {})


def closed_records(
    data: Mapping[str, Any], lines: Sequence[Line], reserved: dict[str, int], charged: dict[str, int], now_ms: int,
    extra_meta: Mapping[str, Any] | None,
) -> tuple[str, str]:
    """The JSON of the closed reservation's record (replayed to a retry) and of its ledger entry."""
    meta = dict(data["meta"])
    if extra_meta:
        meta.update(extra_meta)
    closed = {k: data.get(k) for k in ("ok", "blocked", "retry_after_ms", "warned", "states", "deadline_ms")}
    closed.update(charged=charged, closed_at=now_ms)
    entry = {"reserved": reserved, "charged": charged, "meta": meta, "lines": [l.key for l in lines]}
    return json.dumps(closed), json.dumps(entry)


def extension_blocked(lines: Sequence[Line], states: Sequence[LineState], delta: Mapping[str, int]) -> int | None:
    """The first line that refuses the extension: a counter of a dimension in `delta` that the
    delta would take over (no headroom), or a duration line past its deadline."""
    for i, (line, st) in enumerate(zip(lines, states, strict=True)):
        if line.kind is Kind.COUNTER and line.dimension in delta:
            probe = replace(line, amount=delta[line.dimension], headroom=0)
        elif line.kind is Kind.DURATION:
            probe = replace(line, amount=0)
        else:
            continue
        if blocks(probe, st):
            return i
    return None


def extended(
    data: Mapping[str, Any], lines: Sequence[Line], states: Sequence[LineState], delta: Mapping[str, int]
) -> tuple[list[Line], list[LineState], dict[str, Any]]:
    """The grown lines, their states after the extension, and the reservation's new record."""
    grown, after = [], []
    for line, st in zip(lines, states, strict=True):
        d = delta.get(line.dimension, 0) if line.kind is Kind.COUNTER else 0
        if d:
            line, st = replace(line, amount=line.amount + d), replace(st, reserved=st.reserved + d)
        grown.append(line)
        after.append(st)
    estimate = dict(data.get("estimate") or {})
    for dim, d in delta.items():
        estimate[dim] = estimate.get(dim, 0) + d
    return grown, after, {**data, "lines": [line_to_wire(l) for l in grown], "estimate": estimate}


def closable(found: tuple[str, dict[str, Any]] | None) -> dict[str, Any] | SettleResult:
    """The data of a reservation record (state, data) to close, or what closing answers when
    there is nothing to: unknown or refused (not found), closed already (its first outcome, replayed)."""
    if found is None or found[0] == "refused":
        return SettleResult(Outcome.RELEASED, {}, found=False)
    if found[0] != Outcome.RESERVED.value:
        return SettleResult(Outcome(found[0]), found[1].get("charged", {}), replayed=True)
    return found[1]


# The ledger table both stores keep in SQLite (the embedded store's file; the journal store's ledger.db).
LEDGER_COLUMNS = "seq, tag, rid, outcome, reserved_at, closed_at, data"


def read_ledger(db: sqlite3.Connection, since_ms: int, limit: int | None, tag: str | None) -> list[LedgerEntry]:
    """Entries closed at or after `since_ms` (of one tree), by close time."""
    sql = f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE closed_at>=?"
    args: list[Any] = [since_ms]
    if tag is not None:
        sql += " AND tag=?"
        args.append(tag)
    sql += " ORDER BY closed_at, seq LIMIT ?"
    args.append(-1 if limit is None else limit)
    return [ledger_entry(*row) for row in db.execute(sql, args).fetchall()]


def read_ledger_page(db: sqlite3.Connection, since_ms: int, after: str | None, limit: int) -> tuple[list[LedgerEntry], str | None]:
    """Up to `limit` entries closed at or after `since_ms`, in append order, after the cursor `after`;
    and the cursor of the next page (None at the end)."""
    sql = f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE seq>? AND closed_at>=? ORDER BY seq LIMIT ?"
    rows = db.execute(sql, (int(after or 0), since_ms, limit)).fetchall()
    return [ledger_entry(*row) for row in rows], (str(rows[-1][0]) if len(rows) == limit else None)


def trim_ledger(db: sqlite3.Connection, before_ms: int, limit: int) -> int:
    """Drop up to `limit` of the oldest entries closed before `before_ms`."""
    sql = "DELETE FROM ledger WHERE seq IN (SELECT seq FROM ledger WHERE closed_at<? ORDER BY seq LIMIT ?)"
    return db.execute(sql, (before_ms, limit)).rowcount


def ledger_entry(seq: int, tag: str, rid: str, outcome: str, reserved_at: int, closed_at: int, data: str) -> LedgerEntry:
    """A ledger row (`ledger` table of either store) as the interface speaks it."""
    d = json.loads(data)
    return LedgerEntry(
        str(seq), tag, rid, Outcome(outcome), d["reserved"], d["charged"], d["meta"], reserved_at, closed_at, tuple(d["lines"])
    )


def result_json(r: ReserveResult) -> dict[str, Any]:
    return {
        "ok": r.ok,
        "blocked": r.blocked,
        "retry_after_ms": r.retry_after_ms,
        "warned": list(r.warned),
        "reason": None if r.reason is None else r.reason.value,
        "active_runs": r.active_runs,
        "states": [[s.key, s.limit, s.spent, s.reserved] for s in r.states],
        "deadline_ms": r.deadline_ms,
    }


def replay_reserve(rid: str, rec: dict[str, Any]) -> ReserveResult:
    reason = rec.get("reason")
    return ReserveResult(
        rec["ok"],
        rid,
        tuple(LineState(*s) for s in rec["states"]),
        rec.get("blocked"),
        tuple(rec.get("warned", ())),
        rec.get("retry_after_ms"),
        replayed=True,
        reason=None if reason is None else RunRefusal(reason),
        active_runs=rec.get("active_runs"),
        deadline_ms=rec.get("deadline_ms"),
    )


def earliest_deadline(lines: Sequence[Line], states: Sequence[LineState], firsts: Sequence[int | None], now_ms: int) -> int | None:
    found = [d for line, st, t0 in zip(lines, states, firsts, strict=True) if (d := deadline_ms(line, st.limit, t0, now_ms)) is not None]
    return min(found, default=None)
