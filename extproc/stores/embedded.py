"""The embedded store: one SQLite file, the single-node default.

Why SQLite: durable across a crash of the service (WAL), atomic multi-line
reservations with one `BEGIN IMMEDIATE` transaction, and safe across several
worker processes on one host (SQLite's file lock serialises writers). Each
operation is a handful of indexed statements, tens of microseconds, so it runs
inline on the event loop; a thread hop would cost more than the work.

The counter semantics mirror `lua/*.lua` of the Redis store exactly; the
shared contract suite (tests/stores) holds both to the same behaviour.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import StoreUnavailable
from .base import (
    Kind,
    LedgerEntry,
    Line,
    LineState,
    Mode,
    Outcome,
    ReserveResult,
    SettleResult,
    Window,
    normalize_usage,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (k TEXT NOT NULL, ts INTEGER NOT NULL, rid TEXT NOT NULL, amount INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_k_ts ON events (k, ts);
CREATE TABLE IF NOT EXISTS resv (
  tag TEXT NOT NULL, rid TEXT NOT NULL, state TEXT NOT NULL,
  created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, data TEXT NOT NULL,
  PRIMARY KEY (tag, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS resv_due ON resv (state, expires_at);
CREATE TABLE IF NOT EXISTS ledger (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, tag TEXT NOT NULL, rid TEXT NOT NULL,
  outcome TEXT NOT NULL, reserved_at INTEGER NOT NULL, closed_at INTEGER NOT NULL,
  data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_closed ON ledger (closed_at);
"""

REFUSAL_MEMORY_MS = 60_000  # how long a refused id replays its refusal
SETTLED_MEMORY_MS = 86_400_000  # how long a closed reservation replays its outcome


class EmbeddedStore:
    """SQLite-backed store. `path` ':memory:' is for tests only (not durable)."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)

    # -- small kv helpers (inside a transaction) ------------------------------

    def _get(self, k: str) -> int | None:
        row = self._db.execute("SELECT v FROM kv WHERE k=?", (k,)).fetchone()
        return None if row is None else row[0]

    def _add(self, k: str, delta: int) -> None:
        if delta:
            self._db.execute(
                "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = v + excluded.v", (k, delta)
            )

    def _begin(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"embedded store {self.path}: {e}") from e

    # -- line evaluation -------------------------------------------------------

    def _limit(self, tag: str, line: Line) -> int:
        override = self._get(f"{tag}|lim|{line.key}")
        credit = self._get(f"{tag}|cr|{line.key}") or 0
        return (line.limit if override is None else override) + credit

    def _spent(self, tag: str, line: Line, now_ms: int) -> int:
        if line.window is Window.ROLLING:
            ek = f"{tag}|e|{line.key}"
            cutoff = now_ms - line.window_ms
            gone = self._db.execute("SELECT COALESCE(SUM(amount), 0) FROM events WHERE k=? AND ts<=?", (ek, cutoff)).fetchone()[0]
            if gone:
                self._db.execute("DELETE FROM events WHERE k=? AND ts<=?", (ek, cutoff))
                self._add(f"{tag}|es|{line.key}", -gone)
            return self._get(f"{tag}|es|{line.key}") or 0
        return self._get(self._spent_key(tag, line.key, line.period)) or 0

    @staticmethod
    def _spent_key(tag: str, key: str, period: str) -> str:
        return f"{tag}|s|{key}|{period}"

    def _state(self, tag: str, line: Line, now_ms: int) -> LineState:
        limit = self._limit(tag, line)
        if line.kind is Kind.DURATION:
            t0 = self._get(f"{tag}|t0|{line.key}")
            spent = 0 if t0 is None else (now_ms - t0) // 1000
            return LineState(line.key, limit, spent, 0)
        reserved = self._get(f"{tag}|r|{line.key}") or 0
        spent = 0 if line.kind is Kind.CONCURRENCY else self._spent(tag, line, now_ms)
        return LineState(line.key, limit, spent, reserved)

    def _retry_after(self, tag: str, line: Line, st: LineState, now_ms: int) -> int | None:
        if line.kind is Kind.CONCURRENCY:
            return 1000
        if line.window is not Window.ROLLING:
            return None
        need = st.spent + st.reserved + line.amount - st.limit
        if line.amount > st.limit or need > st.spent:
            return None  # frees only when reservations settle, or never
        freed = 0
        for ts, amount in self._db.execute(
            "SELECT ts, amount FROM events WHERE k=? ORDER BY ts", (f"{tag}|e|{line.key}",)
        ):
            freed += amount
            if freed >= need:
                return max(1, ts + line.window_ms - now_ms + 1)
        return None

    # -- Store interface -------------------------------------------------------

    async def reserve(
        self,
        tag: str,
        reservation_id: str,
        lines: Sequence[Line],
        *,
        now_ms: int,
        ttl_ms: int,
        meta: Mapping[str, Any],
    ) -> ReserveResult:
        self._begin()
        try:
            prior = self._db.execute("SELECT state, data FROM resv WHERE tag=? AND rid=?", (tag, reservation_id)).fetchone()
            if prior is not None:
                self._db.execute("COMMIT")
                return _replay_reserve(reservation_id, json.loads(prior[1]))
            states: list[LineState] = []
            blocked: int | None = None
            warned: list[int] = []
            for i, line in enumerate(lines):
                st = self._state(tag, line, now_ms)
                states.append(st)
                if line.mode is Mode.ADVISORY:
                    if _over(line, st):
                        warned.append(i)
                elif blocked is None and _blocks(line, st):
                    blocked = i
            if blocked is not None:
                retry = self._retry_after(tag, lines[blocked], states[blocked], now_ms)
                record = {"ok": False, "blocked": blocked, "retry_after_ms": retry, "states": [_st(s) for s in states]}
                self._db.execute(
                    "INSERT INTO resv VALUES (?,?,?,?,?,?)",
                    (tag, reservation_id, "refused", now_ms, now_ms + REFUSAL_MEMORY_MS, json.dumps(record)),
                )
                self._db.execute("COMMIT")
                return ReserveResult(False, reservation_id, tuple(states), blocked, tuple(warned), retry)
            after = []
            for line, st in zip(lines, states):
                if line.kind is Kind.DURATION:
                    self._db.execute("INSERT OR IGNORE INTO kv (k, v) VALUES (?, ?)", (f"{tag}|t0|{line.key}", now_ms))
                    after.append(st)
                else:
                    self._add(f"{tag}|r|{line.key}", line.amount)
                    after.append(LineState(st.key, st.limit, st.spent, st.reserved + line.amount))
            record = {
                "ok": True,
                "warned": warned,
                "states": [_st(s) for s in after],
                "lines": [_line_json(l) for l in lines],
                "meta": dict(meta),
                "created_at": now_ms,
            }
            self._db.execute(
                "INSERT INTO resv VALUES (?,?,?,?,?,?)",
                (tag, reservation_id, Outcome.RESERVED.value, now_ms, now_ms + ttl_ms, json.dumps(record)),
            )
            self._db.execute("COMMIT")
            return ReserveResult(True, reservation_id, tuple(after), None, tuple(warned))
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _close(
        self, tag: str, rid: str, outcome: Outcome, usage: Mapping[str, int] | None, now_ms: int, extra_meta: Mapping[str, Any] | None
    ) -> SettleResult:
        row = self._db.execute("SELECT state, data FROM resv WHERE tag=? AND rid=?", (tag, rid)).fetchone()
        if row is None or row[0] == "refused":
            return SettleResult(Outcome.RELEASED, {}, found=False)
        state, data = row[0], json.loads(row[1])
        if state != Outcome.RESERVED.value:
            return SettleResult(Outcome(state), data.get("charged", {}), replayed=True)
        lines = [_line_from_json(d) for d in data["lines"]]
        reserved = normalize_usage(data["meta"].get("estimate") or _usage_of_lines(lines))
        if outcome is Outcome.EXPIRED:
            usage = reserved
        charged = normalize_usage(usage or {})
        for line in lines:
            if line.kind is Kind.DURATION:
                continue
            self._add(f"{tag}|r|{line.key}", -line.amount)
            if line.kind is Kind.CONCURRENCY:
                continue
            amount = charged.get(line.dimension, 0)
            if not amount:
                continue
            if line.window is Window.ROLLING:
                self._db.execute("INSERT INTO events VALUES (?,?,?,?)", (f"{tag}|e|{line.key}", now_ms, rid, amount))
                self._add(f"{tag}|es|{line.key}", amount)
            else:
                self._add(self._spent_key(tag, line.key, line.period), amount)
        meta = dict(data["meta"])
        if extra_meta:
            meta.update(extra_meta)
        data.update(charged=charged, closed_at=now_ms, meta=meta)
        self._db.execute(
            "UPDATE resv SET state=?, expires_at=?, data=? WHERE tag=? AND rid=?",
            (outcome.value, now_ms + SETTLED_MEMORY_MS, json.dumps(data), tag, rid),
        )
        entry = {"reserved": reserved, "charged": charged, "meta": meta, "lines": [l.key for l in lines]}
        self._db.execute(
            "INSERT INTO ledger (tag, rid, outcome, reserved_at, closed_at, data) VALUES (?,?,?,?,?,?)",
            (tag, rid, outcome.value, data["created_at"], now_ms, json.dumps(entry)),
        )
        return SettleResult(outcome, charged)

    async def settle(
        self, tag: str, reservation_id: str, usage: Mapping[str, int], *, now_ms: int, meta: Mapping[str, Any] | None = None
    ) -> SettleResult:
        return self._in_tx(self._close, tag, reservation_id, Outcome.SETTLED, usage, now_ms, meta)

    async def release(self, tag: str, reservation_id: str, *, now_ms: int) -> SettleResult:
        return self._in_tx(self._close, tag, reservation_id, Outcome.RELEASED, {}, now_ms, None)

    def _in_tx(self, fn, *args):  # type: ignore[no-untyped-def]
        self._begin()
        try:
            result = fn(*args)
            self._db.execute("COMMIT")
            return result
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    async def expire(self, *, now_ms: int, limit: int = 100) -> int:
        def run() -> int:
            due = self._db.execute(
                "SELECT tag, rid FROM resv WHERE state='reserved' AND expires_at<=? LIMIT ?", (now_ms, limit)
            ).fetchall()
            for tag, rid in due:
                self._close(tag, rid, Outcome.EXPIRED, None, now_ms, None)
            self._db.execute(
                "DELETE FROM resv WHERE state!='reserved' AND expires_at<=?", (now_ms,)
            )
            return len(due)

        return self._in_tx(run)

    async def snapshot(self, lines: Sequence[Line], *, tag: str, now_ms: int) -> tuple[LineState, ...]:
        return self._in_tx(lambda: tuple(self._state(tag, l, now_ms) for l in lines))

    async def adjust(self, tag: str, key: str, *, set_limit: int | None = None, credit: int = 0) -> None:
        def run() -> None:
            if set_limit is not None:
                self._db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (f"{tag}|lim|{key}", set_limit))
            self._add(f"{tag}|cr|{key}", credit)

        self._in_tx(run)

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None) -> list[LedgerEntry]:
        rows = self._db.execute(
            "SELECT seq, tag, rid, outcome, reserved_at, closed_at, data FROM ledger WHERE closed_at>=? ORDER BY seq LIMIT ?",
            (since_ms, -1 if limit is None else limit),
        ).fetchall()
        out = []
        for seq, tag, rid, outcome, reserved_at, closed_at, data in rows:
            d = json.loads(data)
            out.append(
                LedgerEntry(str(seq), tag, rid, Outcome(outcome), d["reserved"], d["charged"], d["meta"], reserved_at, closed_at, tuple(d["lines"]))
            )
        return out

    async def ping(self) -> None:
        self._db.execute("SELECT 1")

    async def close(self) -> None:
        self._db.close()


# -- shared pure helpers (also the reference for the Lua scripts) --------------


def _over(line: Line, st: LineState) -> bool:
    """Would this line exceed its limit if the amount were taken?"""
    if line.kind is Kind.DURATION:
        return st.spent >= st.limit
    if line.kind is Kind.CONCURRENCY:
        return st.reserved + line.amount > st.limit
    return st.spent + st.reserved + line.amount > st.limit


def _blocks(line: Line, st: LineState) -> bool:
    """The mode-specific refusal rule for one line."""
    if line.mode is Mode.ADVISORY:
        return False
    if line.kind is not Kind.COUNTER:
        return _over(line, st)
    if line.mode is Mode.ACTUALS_ONLY:
        return st.spent >= st.limit
    if line.mode is Mode.SOFT_GATE:
        return st.spent + st.reserved + line.amount > st.limit + line.margin
    return st.spent + st.reserved + line.amount > st.limit


def _usage_of_lines(lines: Sequence[Line]) -> dict[str, int]:
    """The usage a reservation stands for (what expiry charges)."""
    usage: dict[str, int] = {}
    for line in lines:
        if line.kind is Kind.COUNTER:
            usage[line.dimension] = max(usage.get(line.dimension, 0), line.amount)
    return usage


def _st(s: LineState) -> list[Any]:
    return [s.key, s.limit, s.spent, s.reserved]


def _replay_reserve(rid: str, rec: dict[str, Any]) -> ReserveResult:
    states = tuple(LineState(*s) for s in rec["states"])
    return ReserveResult(
        rec["ok"], rid, states, rec.get("blocked"), tuple(rec.get("warned", ())), rec.get("retry_after_ms"), replayed=True
    )


def _line_json(l: Line) -> list[Any]:
    return [l.key, l.kind.value, l.dimension, l.limit, l.amount, l.mode.value, l.window.value, l.period, l.window_ms, l.margin, l.period_ttl_s]


def _line_from_json(d: list[Any]) -> Line:
    return Line(d[0], Kind(d[1]), d[2], d[3], d[4], Mode(d[5]), Window(d[6]), d[7], d[8], d[9], d[10])
