"""The journal store: counters in the process, every change appended to a journal.

Single process only. State lives in Python dicts; each operation is one
synchronous piece of Python on the event loop (no await between reading and
writing), so a reservation is atomic by construction, and no thread hop is
paid on the hot path. The semantics are the embedded store's: both decide
with `local.py` over the same kv keys (the contract suite in tests/stores runs
on both).

Durability is the embedded store's (SQLite WAL, synchronous=NORMAL): every
operation's effects are handed to the OS with one write() before it returns,
so a crash of the process (SIGKILL) loses nothing that was acknowledged; the
journal is fsynced every `fsync_interval_s` and on close, so a crash of the
OS may lose the last moments.

Files in the store's directory:

    LOCK                 flock'ed by the one process that owns the store
    journal-<gen>.log    one line per operation: crc32 (8 hex) + " " + a JSON
                         array of effect records + "\\n"
    snapshot-<gen>.log   the whole state at the start of journal <gen>, as the
                         effect records that recreate it (same line format)
    ledger.db            the ledger (SQLite), fed from the journal in batches

Records are effects (a counter's new value, a record put or dropped), not
operations, so replaying them does not run the rules: a change of the rules'
code cannot change what a journal replays to. A torn last line (a crash in the
middle of a write: it has no newline) is cut off; a whole line that fails its
checksum is damage, and the store refuses to open.

Memory: what the embedded store keeps in its file is here in the process:
counters, reservations in flight, runs, and every reservation closed in the
last CLOSED_MEMORY_MS (a day; each is remembered so that a retry replays its
outcome), about 0.8 KB per closed call (`python -m bench.journal_compact`).

Compaction: once the journal passes `compact_bytes` and twice the last
snapshot's size (so writing snapshots costs at most about half as much as
writing the journal, however large the state grows), a new journal starts, the
state is copied (shallowly: records are immutable) on the loop, and the store's
thread writes the snapshot (temporary file, fsync, rename) and deletes the
older files. Opening loads the newest snapshot and replays every journal from
its generation on.

The ledger is not kept in memory (retention is months): closed reservations'
entries are journaled with their operation and appended to `ledger.db` by the
store's thread in batches; ledger reads and trims run on that thread after the
entries still pending. `ledger.db` records how far it got, so replay after a
crash re-appends exactly the entries it missed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import heapq
import logging
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson

from ..errors import StoreUnavailable
from . import _json as json
from .base import (
    CLOSED_MEMORY_MS,
    REFUSAL_MEMORY_MS,
    ExtendResult,
    Kind,
    LedgerEntry,
    Line,
    LineState,
    Outcome,
    ReserveResult,
    RunRef,
    RunRefusal,
    RunState,
    SettleResult,
    Window,
    chain_json,
    extension_delta,
    own_line_keys,
    run_state_of,
)
from .local import (
    LEDGER_COLUMNS,
    charges,
    closable,
    closed_records,
    decide,
    earliest_deadline,
    extended,
    extension_blocked,
    line_states,
    read_ledger,
    read_ledger_page,
    replay_reserve,
    reservation_record,
    result_json,
    retry_after,
    taken,
    trim_ledger,
)
from .wire import (
    CREDIT,
    EVENTS,
    FIRST,
    LIMIT,
    LOWERED,
    PURGE_RETRY_MS,
    RESERVED,
    ROLLING_SUM,
    RUN_KEY_KINDS,
    SPENT,
    line_from_wire,
)

log = logging.getLogger("extproc.store")
T = TypeVar("T")
K = TypeVar("K")

COMPACT_BYTES = 64 << 20  # a journal this long (and twice the last snapshot) is compacted into a snapshot
FSYNC_INTERVAL_S = 1.0  # the journal is fsynced this long after a write (and on close)
LEDGER_BATCH = 512  # ledger entries appended to ledger.db in one transaction
_AFTER = 1 << 63  # sorts after every amount: (ts, _AFTER) follows every charge at ts
SNAPSHOT_CHUNK = 256  # records per snapshot line: few enough to die young (no GC pass stalls the loop)

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
  seq INTEGER PRIMARY KEY, tag TEXT NOT NULL, rid TEXT NOT NULL,
  outcome TEXT NOT NULL, reserved_at INTEGER NOT NULL, closed_at INTEGER NOT NULL,
  data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_closed ON ledger (closed_at);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
"""

# A run's record: (owner, state, created_at, seen_at, expires_at, purge_at, own line keys, chain json).
Run = tuple[str, str, int, int, int, int, list[str], str]
Ledgered = tuple[int, str, str, str, int, int, str]  # a ledger row, in LEDGER_COLUMNS order


class _Schedule(Generic[K]):
    """When each key is next due: a heap with one live entry per key, which housekeeping pops
    instead of scanning every record. A record whose due time moved later keeps its entry; the
    entry is checked against the record when it comes up and put back for the new time."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, K]] = []
        self._at: dict[K, int] = {}  # the time of each key's live entry

    def add(self, key: K, at: int) -> None:
        """`key` is due at `at` (or at its earlier entry, checked then)."""
        cur = self._at.get(key)
        if cur is None or at < cur:
            self._at[key] = at
            heapq.heappush(self._heap, (at, key))

    def due(self, now_ms: int, when: Callable[[K], int | None], limit: int | None = None) -> list[K]:
        """Up to `limit` keys due by `now_ms`, earliest first; `when(key)` is the record's due time
        now (None: the record is gone). A key due later is put back, not returned."""
        out: list[K] = []
        while self._heap and self._heap[0][0] <= now_ms and (limit is None or len(out) < limit):
            at, key = heapq.heappop(self._heap)
            if self._at.get(key) != at:
                continue  # a stale entry: the key has an earlier one
            del self._at[key]
            cur = when(key)
            if cur is None:
                continue
            if cur > now_ms:
                self.add(key, cur)
            else:
                out.append(key)
        return out


class JournalStore:
    """In-process counters journaled to `path` (a directory). One process at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        compact_bytes: int = COMPACT_BYTES,
        fsync_interval_s: float = FSYNC_INTERVAL_S,
        ledger_batch: int = LEDGER_BATCH,
    ) -> None:
        self.path = Path(path)
        self._compact_bytes = compact_bytes
        self._fsync_interval = fsync_interval_s
        self._ledger_batch = ledger_batch
        # state: counters, their expiry, rolling charges (sorted by ts), reservations, runs, leases, alerts
        self._kv: dict[str, int] = {}
        self._kv_exp: dict[str, int] = {}
        self._events: dict[str, list[tuple[int, int]]] = {}
        self._live: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}  # reserved: (expires_at, record)
        self._parsed: dict[tuple[str, str], list[Line]] = {}  # a live record's lines, parsed (a cache, not state)
        self._closed: dict[tuple[str, str], tuple[str, int, str]] = {}  # settled/released/expired: (state, forget_at, json)
        self._refused: dict[tuple[str, str], tuple[str, int, str]] = {}  # refused: ("refused", forget_at, json)
        self._runs: dict[tuple[str, str], Run] = {}
        self._by_owner: dict[tuple[str, str], set[str]] = {}  # (tag, owner) -> run keys
        self._leases: dict[str, tuple[str, int]] = {}
        self._alerts: dict[str, int] = {}
        # derived indexes (not state): when calendar buckets, runs and alert markers are due
        self._exp_due: _Schedule[str] = _Schedule()
        self._purge_due: _Schedule[tuple[str, str]] = _Schedule()
        self._alert_due: _Schedule[str] = _Schedule()
        self._seq = 1  # the next ledger entry's seq
        self._pending: list[Ledgered] = []  # ledger entries not yet handed to ledger.db
        self._through = 0  # ledger.db holds every entry up to this seq
        self._unflushed: list[Ledgered] = []  # the thread's: a batch ledger.db refused, retried first
        self._ops: list[list[Any]] = []  # the current operation's records
        self._apply: dict[str, Callable[[list[Any]], None]] = {
            "k": self._a_kv, "x": self._a_kv_exp, "e": self._a_event, "E": self._a_trim, "l": self._a_live,
            "c": self._a_closed, "d": self._a_drop, "r": self._a_run, "R": self._a_unrun, "L": self._a_ledger,
            "q": self._a_seq, "s": self._a_lease, "a": self._a_alert, "A": self._a_unalert,
        }  # fmt: skip
        self._broken: str | None = None
        self._closed_store = False
        self._compacting = False
        self._jbytes = 0
        self._compact_at = compact_bytes  # max(compact_bytes, 2 x the last snapshot): set by _compacted, _recover
        self._fsync_due = False
        self._background: list[Future[Any]] = []
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self.path)
        except OSError as e:
            raise StoreUnavailable(f"journal store {self.path}: {e}") from e
        try:
            self._db = sqlite3.connect(self.path / "ledger.db", isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            os.close(self._lock_fd)
            raise StoreUnavailable(f"journal store {self.path}/ledger.db: {e}") from e
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_LEDGER_SCHEMA)
            row = self._db.execute("SELECT v FROM meta WHERE k='through'").fetchone()
            self._through = 0 if row is None else row[0]
            self._gen = self._recover()
            self._fd = os.open(self._journal(self._gen), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._jbytes = os.fstat(self._fd).st_size
        except (OSError, sqlite3.Error, ValueError) as e:
            self._db.close()
            os.close(self._lock_fd)
            raise StoreUnavailable(f"journal store {self.path}: {e}") from e
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extproc-journal")

    # -- files -------------------------------------------------------------------

    def _journal(self, gen: int) -> Path:
        return self.path / f"journal-{gen:08d}.log"

    def _snapshot(self, gen: int) -> Path:
        return self.path / f"snapshot-{gen:08d}.log"

    def _gens(self, prefix: str) -> list[int]:
        return sorted(int(p.name[len(prefix) + 1 : -4]) for p in self.path.glob(f"{prefix}-*.log"))

    def _recover(self) -> int:
        """Load the newest snapshot and replay the journals after it; the generation to append to."""
        snaps = self._gens("snapshot")
        gen = snaps[-1] if snaps else 0
        if gen:
            size, good, ended = self._replay_file(self._snapshot(gen))
            if good != size or not ended:
                raise ValueError(f"snapshot {self._snapshot(gen).name} is incomplete")
            self._compact_at = max(self._compact_bytes, 2 * size)
        journals = [g for g in self._gens("journal") if g >= gen]
        for g in journals:
            size, good, _ = self._replay_file(self._journal(g))
            if good < size:
                log.warning("journal store %s: dropped a torn record at the end of %s (%d bytes)",
                            self.path, self._journal(g).name, size - good)  # fmt: skip
                os.truncate(self._journal(g), good)
        for p in self.path.glob("*.tmp"):
            p.unlink()
        self._drop_before(gen)
        return max([gen, *journals]) or 1

    def _drop_before(self, gen: int) -> None:
        """Delete the journals and snapshots that snapshot `gen` replaces."""
        for g in self._gens("journal"):
            if g < gen:
                self._journal(g).unlink()
        for g in self._gens("snapshot"):
            if g < gen:
                self._snapshot(g).unlink()

    def _replay_file(self, path: Path) -> tuple[int, int, bool]:
        """Apply the records of every whole line of `path`, one line at a time: its size, the
        length of its whole lines, and whether the last one was the snapshot's end mark. Bytes
        after the last newline are a torn write (a crash in the middle of it: orjson writes no
        raw newline, so only the end of a record can be missing); a whole line with a bad
        checksum is damage, an error."""
        pos, ended = 0, False
        with open(path, "rb") as f:  # line by line: a journal can be larger than the memory to spare
            for line in f:
                if not line.endswith(b"\n"):
                    break
                payload = line[9:-1]
                if len(line) < 11 or line[8:9] != b" " or line[:8] != b"%08x" % zlib.crc32(payload):
                    raise ValueError(f"{path.name} is damaged at byte {pos} (a record fails its checksum)")
                ops = orjson.loads(payload)
                ended = ops == [["end"]]
                if not ended:
                    for op in ops:
                        self._apply[op[0]](op)
                pos += len(line)
            size = os.fstat(f.fileno()).st_size
        return size, pos, ended

    # -- recording effects -------------------------------------------------------

    def _do(self, op: list[Any]) -> None:
        """Apply one effect to the state and record it for the operation's journal line."""
        self._apply[op[0]](op)
        self._ops.append(op)

    def _op(self, fn: Callable[[], T]) -> T:
        """Run one operation: its effects are written to the journal (one write) before it returns."""
        if self._broken is not None or self._closed_store:
            raise StoreUnavailable(f"journal store {self.path}: {self._broken or 'closed'}")
        try:
            return fn()
        finally:
            if self._ops:
                self._commit()

    def _commit(self) -> None:
        payload = orjson.dumps(self._ops)
        self._ops = []
        line = b"%08x %b\n" % (zlib.crc32(payload), payload)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            # The state holds effects the journal does not: fail closed until a restart replays the journal.
            self._broken = f"journal write failed ({e}); restart the service"
            raise StoreUnavailable(f"journal store {self.path}: {self._broken}") from e
        self._jbytes += len(line)
        if len(self._pending) >= self._ledger_batch:
            self._background.append(self._pool.submit(self._flush_in_background, self._take_pending()))
        if not self._fsync_due:  # the first write since the last fsync: the next one comes in fsync_interval_s
            self._fsync_due = True
            asyncio.get_running_loop().call_later(self._fsync_interval, self._fsync_soon)
        if self._jbytes >= self._compact_at and not self._compacting:
            self._compact()
        if len(self._background) > 64:
            self._background = [f for f in self._background if not f.done()]

    def _fsync_soon(self) -> None:
        self._fsync_due = False
        if not self._closed_store:
            self._background.append(self._pool.submit(self._fsync, self._fd))

    def _fsync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:  # durability across an OS crash is at risk; a process crash loses nothing
            log.error("journal store %s: fsync failed: %s", self.path, e)

    # -- appliers: one per record kind, shared by the live path and replay -------

    def _a_kv(self, op: list[Any]) -> None:
        if op[2] is None:
            self._kv.pop(op[1], None)
        else:
            self._kv[op[1]] = op[2]

    def _a_kv_exp(self, op: list[Any]) -> None:
        if op[2] is None:
            self._kv_exp.pop(op[1], None)
        else:
            self._kv_exp[op[1]] = op[2]
            self._exp_due.add(op[1], op[2])

    def _a_event(self, op: list[Any]) -> None:
        evs = self._events.setdefault(op[1], [])
        ev = (op[2], op[3])
        if not evs or evs[-1] <= ev:
            evs.append(ev)
        else:
            bisect.insort(evs, ev)

    def _a_trim(self, op: list[Any]) -> None:
        """Drop the charges of a rolling window at or before op[2] (all of them when None)."""
        if op[2] is None:
            self._events.pop(op[1], None)
            return
        evs = self._events.get(op[1])
        if evs:
            del evs[: bisect.bisect_right(evs, (op[2], _AFTER))]
            if not evs:
                del self._events[op[1]]

    def _a_live(self, op: list[Any]) -> None:
        self._live[(op[1], op[2])] = (op[3], op[4])
        self._parsed.pop((op[1], op[2]), None)

    def _lines(self, tag: str, rid: str, data: dict[str, Any]) -> list[Line]:
        """A live reservation's lines: as reserve / extend left them, else parsed from its record."""
        lines = self._parsed.get((tag, rid))
        if lines is None:
            lines = self._parsed[(tag, rid)] = [line_from_wire(d) for d in data["lines"]]
        return lines

    def _a_closed(self, op: list[Any]) -> None:
        key = (op[1], op[2])
        self._live.pop(key, None)
        self._parsed.pop(key, None)
        memory = self._refused if op[3] == "refused" else self._closed
        memory.pop(key, None)  # re-inserted last: each memory stays in (about) expiry order
        memory[key] = (op[3], op[4], op[5])

    def _a_drop(self, op: list[Any]) -> None:
        key = (op[1], op[2])
        self._live.pop(key, None)
        self._parsed.pop(key, None)
        self._closed.pop(key, None)
        self._refused.pop(key, None)

    def _a_run(self, op: list[Any]) -> None:
        tag, key, row = op[1], op[2], tuple(op[3:])
        self._runs[(tag, key)] = row
        self._purge_due.add((tag, key), row[5])
        self._by_owner.setdefault((tag, row[0]), set()).add(key)

    def _a_unrun(self, op: list[Any]) -> None:
        row = self._runs.pop((op[1], op[2]), None)
        if row is not None:
            owned = self._by_owner.get((op[1], row[0]))
            if owned is not None:
                owned.discard(op[2])
                if not owned:
                    del self._by_owner[(op[1], row[0])]

    def _a_ledger(self, op: list[Any]) -> None:
        seq = op[1]
        self._seq = max(self._seq, seq + 1)
        if seq > self._through:
            self._pending.append((seq, op[2], op[3], op[4], op[5], op[6], op[7]))

    def _a_seq(self, op: list[Any]) -> None:
        self._seq = max(self._seq, op[1])

    def _a_lease(self, op: list[Any]) -> None:
        self._leases[op[1]] = (op[2], op[3])

    def _a_alert(self, op: list[Any]) -> None:
        self._alerts[op[1]] = op[2]
        self._alert_due.add(op[1], op[2])

    def _a_unalert(self, op: list[Any]) -> None:
        self._alerts.pop(op[1], None)

    # -- counters ------------------------------------------------------------------

    def _add(self, k: str, delta: int) -> None:
        """`_do(["k", k, v + delta])`, inlined: the hot path's commonest effect."""
        if delta:
            v = self._kv[k] = self._kv.get(k, 0) + delta
            self._ops.append(["k", k, v])

    def _read_states(self, tag: str, lines: Sequence[Line], now_ms: int) -> tuple[list[LineState], list[int | None]]:
        """Every line's state (after trimming rolling windows), and the first reservation (ms)
        of each duration line (None before it and on other lines)."""
        for line in lines:
            if line.window is Window.ROLLING and line.kind is Kind.COUNTER:
                self._trim(tag, line, now_ms)
        return line_states(tag, lines, self._kv, now_ms)

    def _trim(self, tag: str, line: Line, now_ms: int) -> None:
        """Drop rolling charges that left the window (ts <= now - window) from the running sum."""
        ek = f"{tag}|{EVENTS}|{line.key}"
        evs = self._events.get(ek)
        cutoff = now_ms - line.window_ms
        if not evs or evs[0][0] > cutoff:
            return
        gone = sum(a for ts, a in evs[: bisect.bisect_right(evs, (cutoff, _AFTER))])
        self._do(["E", ek, cutoff])
        self._add(f"{tag}|{ROLLING_SUM}|{line.key}", -gone)

    def _retry_after(self, tag: str, line: Line, st: LineState, now_ms: int) -> int | None:
        return retry_after(line, st, now_ms, lambda: self._events.get(f"{tag}|{EVENTS}|{line.key}", ()))

    # -- runs --------------------------------------------------------------------

    def _put_run(self, tag: str, key: str, row: Run) -> None:
        self._do(["r", tag, key, *row])

    def _run_check(self, tag: str, run: RunRef, now_ms: int) -> tuple[RunRefusal | None, int | None, int | None]:
        row = self._runs.get((tag, run.key))
        if row is not None:
            if row[1] == "closed":
                return RunRefusal.CLOSED, None, None
            if row[4] <= now_ms:
                return RunRefusal.EXPIRED, None, None
            return self._chain_check(tag, run, now_ms, row), None, None
        if (why := self._chain_check(tag, run, now_ms, None)) is not None:
            return why, None, None
        expiries = sorted(
            r[4] for k in self._by_owner.get((tag, run.owner), ()) if (r := self._runs[(tag, k)])[1] == "active" and r[4] > now_ms
        )
        active = len(expiries)
        if active < run.max_active:
            return None, None, None
        return RunRefusal.LIMIT, expiries[active - run.max_active] - now_ms, active

    def _chain_check(self, tag: str, run: RunRef, now_ms: int, row: Run | None) -> RunRefusal | None:
        """A nested run's ancestry (see base.py): recorded as given, every ancestor this owner's and active."""
        if row is not None and row[7] != chain_json(run):
            return RunRefusal.PARENT
        for key in run.ancestors:
            a = self._runs.get((tag, key))
            if a is None or a[0] != run.owner:
                return RunRefusal.PARENT
            if a[1] == "closed":
                return RunRefusal.CLOSED
            if a[4] <= now_ms:
                return RunRefusal.EXPIRED
        return None

    def _touch_run(self, tag: str, run: RunRef, lines: Sequence[Line], now_ms: int) -> None:
        exp = now_ms + run.ttl_ms
        keys = own_line_keys(run, lines)
        for a in run.ancestors:  # activity anywhere in the tree keeps its ancestors alive
            r = self._runs.get((tag, a))
            if r is not None:
                self._put_run(tag, a, (r[0], r[1], r[2], now_ms, max(r[4], exp), max(r[5], exp + run.memory_ms), r[6], r[7]))
        row = self._runs.get((tag, run.key))
        if row is None:
            self._put_run(tag, run.key, (run.owner, "active", now_ms, now_ms, exp, exp + run.memory_ms, keys, chain_json(run)))
        else:  # the ancestry is recorded once, with the run
            self._put_run(tag, run.key, (row[0], row[1], row[2], now_ms, exp, exp + run.memory_ms, keys, row[7] or chain_json(run)))
        for line in lines:
            if line.run and line.lower is not None:
                k = f"{tag}|{LOWERED}|{line.key}"
                cur = self._kv.get(k)
                if cur is None or line.lower < cur:
                    self._do(["k", k, line.lower])

    def _purge_at(self, key: tuple[str, str]) -> int | None:
        row = self._runs.get(key)
        return None if row is None else row[5]

    def _purge_runs(self, now_ms: int, limit: int) -> None:
        for tag, key in self._purge_due.due(now_ms, self._purge_at, limit):
            row = self._runs[(tag, key)]
            keys = row[6]
            if any(self._kv.get(f"{tag}|{RESERVED}|{k}") for k in keys):
                self._put_run(tag, key, (*row[:5], now_ms + PURGE_RETRY_MS, *row[6:]))
                continue
            for k in keys:
                for kk in [*(f"{tag}|{kind}|{k}" for kind in RUN_KEY_KINDS), f"{tag}|{SPENT}|{k}|"]:
                    if kk in self._kv:
                        self._do(["k", kk, None])
                if f"{tag}|{EVENTS}|{k}" in self._events:
                    self._do(["E", f"{tag}|{EVENTS}|{k}", None])
            self._do(["R", tag, key])

    # -- reservations -----------------------------------------------------------

    def _resv(self, tag: str, rid: str, now_ms: int) -> tuple[str, dict[str, Any]] | None:
        """The reservation record, unless it is a closed/refused one past its memory."""
        key = (tag, rid)
        live = self._live.get(key)
        if live is not None:
            return Outcome.RESERVED.value, live[1]
        rec = self._closed.get(key) or self._refused.get(key)
        if rec is None:
            return None
        if rec[1] <= now_ms:
            self._do(["d", tag, rid])
            return None
        data: dict[str, Any] = json.loads(rec[2])
        return rec[0], data

    def _evaluate(self, tag: str, rid: str, lines: Sequence[Line], now_ms: int, run: RunRef | None) -> ReserveResult:
        checked = self._run_check(tag, run, now_ms) if run is not None else (None, None, None)
        states, firsts = self._read_states(tag, lines, now_ms)
        return decide(rid, lines, states, firsts, now_ms, checked, lambda i: self._retry_after(tag, lines[i], states[i], now_ms))

    def _reserve(
        self, tag: str, rid: str, lines: Sequence[Line], now_ms: int, ttl_ms: int, meta: dict[str, Any], run: RunRef | None
    ) -> ReserveResult:
        prior = self._resv(tag, rid, now_ms)
        if prior is not None:
            return replay_reserve(rid, prior[1])
        res = self._evaluate(tag, rid, lines, now_ms, run)
        if run is not None and res.reason is None:
            self._touch_run(tag, run, lines, now_ms)
        if not res.ok:
            self._do(["c", tag, rid, "refused", now_ms + REFUSAL_MEMORY_MS, json.dumps(result_json(res))])
            return res
        for line in lines:
            if line.kind is Kind.DURATION:
                k = f"{tag}|{FIRST}|{line.key}"
                if k not in self._kv:
                    self._do(["k", k, now_ms])
            else:
                self._add(f"{tag}|{RESERVED}|{line.key}", line.amount)
        res = taken(res, lines)
        record = reservation_record(res, lines, meta, now_ms, run)
        self._do(["l", tag, rid, now_ms + ttl_ms, record])
        self._parsed[(tag, rid)] = list(lines)
        return res

    def _close(
        self, tag: str, rid: str, outcome: Outcome, usage: Mapping[str, int] | None, now_ms: int, extra_meta: Mapping[str, Any] | None
    ) -> SettleResult:
        data = closable(self._resv(tag, rid, now_ms))
        if isinstance(data, SettleResult):
            return data
        lines = self._lines(tag, rid, data)
        reserved, charged = charges(data, lines, outcome, usage)
        for line in lines:
            if line.kind is Kind.DURATION:
                continue
            self._add(f"{tag}|{RESERVED}|{line.key}", -line.amount)
            amount = charged.get(line.dimension, 0)
            if line.kind is Kind.CONCURRENCY or not amount:
                continue
            if line.window is Window.ROLLING:
                self._do(["e", f"{tag}|{EVENTS}|{line.key}", now_ms, amount])
                self._add(f"{tag}|{ROLLING_SUM}|{line.key}", amount)
            else:
                sk = f"{tag}|{SPENT}|{line.key}|{line.period}"
                self._add(sk, amount)
                if line.window is Window.CALENDAR and line.period_ttl_s > 0 and sk not in self._kv_exp:
                    # kept from the bucket's first charge: that already outlives the period by one more period
                    self._do(["x", sk, now_ms + line.period_ttl_s * 1000])
        closed, entry = closed_records(data, lines, reserved, charged, now_ms, extra_meta)
        self._do(["c", tag, rid, outcome.value, now_ms + CLOSED_MEMORY_MS, closed])
        self._do(["L", self._seq, tag, rid, outcome.value, data["created_at"], now_ms, entry])
        return SettleResult(outcome, charged)

    def _extend(self, tag: str, rid: str, delta: Mapping[str, int], now_ms: int, ttl_ms: int) -> ExtendResult:
        live = self._live.get((tag, rid))
        if live is None:
            self._resv(tag, rid, now_ms)  # forgets a closed record past its memory, as the embedded store does
            return ExtendResult(False, False, ())
        data = live[1]
        lines = self._lines(tag, rid, data)
        run, reason = data.get("run"), None
        if run is not None:
            row = self._runs.get((tag, run[0]))
            if row is None:
                run = None  # purged: nothing to check or touch
            elif row[1] == "closed":
                reason = RunRefusal.CLOSED
            elif row[4] <= now_ms:
                reason = RunRefusal.EXPIRED
        states, firsts = self._read_states(tag, lines, now_ms)
        blocked = extension_blocked(lines, states, delta) if reason is None else None
        if run is not None and reason is None:
            r = self._runs[(tag, run[0])]
            exp = now_ms + run[2]
            self._put_run(tag, run[0], (r[0], r[1], r[2], now_ms, exp, exp + run[4], r[6], r[7]))
        deadline = earliest_deadline(lines, states, firsts, now_ms)
        if reason is not None or blocked is not None:
            return ExtendResult(False, True, tuple(states), blocked, reason, deadline)
        grown, after, record = extended(data, lines, states, delta)
        for line in lines:
            if line.kind is Kind.COUNTER:
                self._add(f"{tag}|{RESERVED}|{line.key}", delta.get(line.dimension, 0))
        self._do(["l", tag, rid, now_ms + ttl_ms, record])
        self._parsed[(tag, rid)] = grown
        return ExtendResult(True, True, tuple(after), None, None, deadline)

    def _expire(self, now_ms: int, limit: int) -> int:
        due = [key for key, (exp, _) in self._live.items() if exp <= now_ms][:limit]
        for tag, rid in due:
            self._close(tag, rid, Outcome.EXPIRED, None, now_ms, None)
        for memory in (self._closed, self._refused):
            gone = []
            for key, rec in memory.items():  # about expiry order; a straggler is forgotten when read (_resv)
                if rec[1] > now_ms:
                    break
                gone.append(key)
            for tag, rid in gone:
                self._do(["d", tag, rid])
        for k in self._exp_due.due(now_ms, self._kv_exp.get):
            if k in self._kv:
                self._do(["k", k, None])
            self._do(["x", k, None])
        for k in self._alert_due.due(now_ms, self._alerts.get):
            self._do(["A", k])
        self._purge_runs(now_ms, limit)
        return len(due)

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
        run: RunRef | None = None,
    ) -> ReserveResult:
        m = json.loads(json.dumps(meta))  # as the embedded store keeps it; raises before any change
        return self._op(lambda: self._reserve(tag, reservation_id, lines, now_ms, ttl_ms, m, run))

    async def extend(
        self, tag: str, reservation_id: str, delta: Mapping[str, int], *, now_ms: int, ttl_ms: int
    ) -> ExtendResult:
        """Check, grow and re-arm the TTL in one step (not idempotent: each call adds)."""
        d = extension_delta(delta)
        return self._op(lambda: self._extend(tag, reservation_id, d, now_ms, ttl_ms))

    async def check(self, tag: str, lines: Sequence[Line], *, now_ms: int, run: RunRef | None = None) -> ReserveResult:
        return self._op(lambda: self._evaluate(tag, "", lines, now_ms, run))

    async def snapshot(self, lines: Sequence[Line], *, tag: str, now_ms: int) -> tuple[LineState, ...]:
        return self._op(lambda: tuple(self._read_states(tag, lines, now_ms)[0]))

    async def settle(
        self, tag: str, reservation_id: str, usage: Mapping[str, int], *, now_ms: int, meta: Mapping[str, Any] | None = None
    ) -> SettleResult:
        extra = json.loads(json.dumps(meta)) if meta else None  # raises before any change
        return self._op(lambda: self._close(tag, reservation_id, Outcome.SETTLED, usage, now_ms, extra))

    async def release(self, tag: str, reservation_id: str, *, now_ms: int) -> SettleResult:
        return self._op(lambda: self._close(tag, reservation_id, Outcome.RELEASED, {}, now_ms, None))

    async def expire(self, *, now_ms: int, limit: int = 100) -> int:
        """Settle reservations past their TTL at the reserved amount, forget closed
        ones past their memory, drop old calendar buckets, purge forgotten runs."""
        return self._op(lambda: self._expire(now_ms, limit))

    async def adjust(self, tag: str, key: str, *, set_limit: int | None = None, credit: int = 0) -> None:
        def go() -> None:
            if set_limit is not None:
                self._do(["k", f"{tag}|{LIMIT}|{key}", set_limit])
                if f"{tag}|{LOWERED}|{key}" in self._kv:
                    self._do(["k", f"{tag}|{LOWERED}|{key}", None])
            self._add(f"{tag}|{CREDIT}|{key}", credit)

        self._op(go)

    def _run_row(self, tag: str, key: str, now_ms: int) -> RunState | None:
        r = self._runs.get((tag, key))
        return None if r is None else run_state_of(key, r[0], r[1], r[2], r[3], r[4], now_ms, r[7] or None)

    async def run_state(self, tag: str, run_key: str, *, now_ms: int) -> RunState | None:
        return self._op(lambda: self._run_row(tag, run_key, now_ms))

    async def close_run(self, tag: str, run: RunRef, *, now_ms: int) -> RunState:
        def go() -> RunState:
            r = self._runs.get((tag, run.key))
            purge = now_ms + run.memory_ms
            if r is None:
                self._put_run(tag, run.key, (run.owner, "closed", now_ms, now_ms, now_ms, purge, [], ""))
            else:
                self._put_run(tag, run.key, (r[0], "closed", r[2], r[3], r[4], purge, r[6], r[7]))
            st = self._run_row(tag, run.key, now_ms)
            assert st is not None
            return st

        return self._op(go)

    async def lead(self, name: str, owner: str, *, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew the lease `name` for `owner` until now + ttl; False while another owner holds it."""

        def go() -> bool:
            held = self._leases.get(name)
            if held is not None and held[0] != owner and held[1] > now_ms:
                return False
            self._do(["s", name, owner, now_ms + ttl_ms])
            return True

        return self._op(go)

    async def claim_alert(self, tag: str, key: str, *, now_ms: int, ttl_ms: int) -> bool:
        k = f"{tag}|{key}"

        def go() -> bool:
            until = self._alerts.get(k)
            if until is not None and until > now_ms:
                return False
            self._do(["a", k, now_ms + ttl_ms])
            return True

        return self._op(go)

    # -- the ledger (ledger.db, on the store's thread) --------------------------------

    def _take_pending(self) -> list[Ledgered]:
        batch, self._pending = self._pending, []
        return batch

    def _flush_ledger(self, batch: list[Ledgered]) -> None:
        """Append journaled entries to ledger.db (on the thread), with how far it got. A batch that
        fails stays with the thread for the next flush; compaction fails while one does, so the
        journal holding it is kept."""
        batch = self._unflushed + batch
        if not batch:
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT OR IGNORE INTO ledger ({LEDGER_COLUMNS}) VALUES (?,?,?,?,?,?,?)", batch)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('through', MAX(?, COALESCE((SELECT v FROM meta WHERE k='through'), 0)))",
                             (batch[-1][0],))  # fmt: skip
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._unflushed = batch
            raise
        self._unflushed = []

    def _flush_in_background(self, batch: list[Ledgered]) -> None:
        try:
            self._flush_ledger(batch)
        except sqlite3.Error as e:
            log.error("journal store %s: ledger.db append failed (retried with the next batch): %s", self.path, e)

    async def _ledger_io(self, fn: Callable[[], T]) -> T:
        """`fn` on the store's thread, after every entry closed so far reached ledger.db."""
        if self._broken is not None or self._closed_store:
            raise StoreUnavailable(f"journal store {self.path}: {self._broken or 'closed'}")
        batch = self._take_pending()

        def go() -> T:
            try:
                self._flush_ledger(batch)
                return fn()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"journal store {self.path}/ledger.db: {e}") from e

        return await asyncio.wrap_future(self._pool.submit(go))

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None, tag: str | None = None) -> list[LedgerEntry]:
        return await self._ledger_io(lambda: read_ledger(self._db, since_ms, limit, tag))

    async def ledger_page(
        self, *, since_ms: int = 0, after: str | None = None, limit: int = 1000
    ) -> tuple[list[LedgerEntry], str | None]:
        """Up to `limit` entries closed at or after `since_ms`, in append order, after the
        cursor `after`; and the cursor of the next page (None at the end)."""
        return await self._ledger_io(lambda: read_ledger_page(self._db, since_ms, after, limit))

    async def trim_ledger(self, *, before_ms: int, limit: int = 10_000) -> int:
        """Drop up to `limit` of the oldest entries closed before `before_ms` (the retention)."""
        return await self._ledger_io(lambda: trim_ledger(self._db, before_ms, limit))

    # -- compaction ----------------------------------------------------------------

    def _compact(self) -> None:
        """Start journal gen+1 and hand a copy of the state to the thread, which writes it as snapshot gen+1."""
        try:
            fd = os.open(self._journal(self._gen + 1), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            log.error("journal store %s: cannot start a new journal: %s", self.path, e)
            self._jbytes = 0  # try again after as many bytes more
            return
        old_fd, self._fd = self._fd, fd
        self._gen += 1
        self._jbytes = 0
        self._compacting = True
        pending = self._take_pending()  # in ledger.db before the journal holding them goes
        state = self._state_copy()
        fut = self._pool.submit(self._write_snapshot, self._gen, state, old_fd, pending)
        fut.add_done_callback(self._compacted)
        self._background.append(fut)

    def _compacted(self, fut: Future[int]) -> None:
        if (e := fut.exception()) is not None:
            log.error("journal store %s: compaction failed (the journal keeps growing): %s", self.path, e)
        else:
            self._compact_at = max(self._compact_bytes, 2 * fut.result())
        self._compacting = False

    def _state_copy(self) -> tuple[Any, ...]:
        """Everything a snapshot holds, copied shallowly (records are replaced, never changed in place)."""
        events = {k: v.copy() for k, v in self._events.items()}
        return (self._kv.copy(), self._kv_exp.copy(), events, self._live.copy(), self._closed.copy(), self._refused.copy(),
                self._runs.copy(), self._leases.copy(), self._alerts.copy(), self._seq)  # fmt: skip

    @staticmethod
    def _snapshot_records(state: tuple[Any, ...]) -> Iterator[list[Any]]:
        kv, kv_exp, events, live, closed, refused, runs, leases, alerts, seq = state
        yield ["q", seq]
        for k, v in kv.items():
            yield ["k", k, v]
        for k, at in kv_exp.items():
            yield ["x", k, at]
        for ek, evs in events.items():
            for ts, amount in evs:
                yield ["e", ek, ts, amount]
        for (tag, rid), (exp, data) in live.items():
            yield ["l", tag, rid, exp, data]
        for memory in (closed, refused):
            for (tag, rid), rec in memory.items():
                yield ["c", tag, rid, *rec]
        for (tag, key), row in runs.items():
            yield ["r", tag, key, *row]
        for name, (owner, until) in leases.items():
            yield ["s", name, owner, until]
        for k, until in alerts.items():
            yield ["a", k, until]

    def _write_snapshot(self, gen: int, state: tuple[Any, ...], old_fd: int, pending: list[Ledgered]) -> int:
        """On the thread: close the old journal, flush the ledger, write snapshot `gen` (tmp, fsync,
        rename), drop older files. Returns the snapshot's size."""
        self._fsync(old_fd)
        os.close(old_fd)
        self._flush_ledger(pending)
        tmp = self._snapshot(gen).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            chunk: list[list[Any]] = []
            for rec in self._snapshot_records(state):
                chunk.append(rec)
                if len(chunk) >= SNAPSHOT_CHUNK:
                    f.write(_line(chunk))
                    chunk = []
            if chunk:
                f.write(_line(chunk))
            f.write(_line([["end"]]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._snapshot(gen))
        _fsync_dir(self.path)
        self._drop_before(gen)
        return self._snapshot(gen).stat().st_size

    # -- health and shutdown --------------------------------------------------------

    async def ping(self) -> None:
        if self._broken is not None or self._closed_store:
            raise StoreUnavailable(f"journal store {self.path}: {self._broken or 'closed'}")

    async def close(self) -> None:
        if self._closed_store:
            return
        self._closed_store = True
        batch = self._take_pending()

        def go() -> None:
            with contextlib.suppress(sqlite3.Error):
                self._flush_ledger(batch)
            self._db.close()
            self._fsync(self._fd)
            os.close(self._fd)

        try:
            await asyncio.wrap_future(self._pool.submit(go))
        finally:
            self._pool.shutdown(wait=True)
            os.close(self._lock_fd)


def _lock(path: Path) -> int:
    """flock the directory's LOCK file (held until the fd closes), or say who holds it."""
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreUnavailable(
            f"journal store {path} is in use by another process (pid {holder}): it keeps its counters in that "
            "process, so only one process may open it (use sqlite: or redis:// for several workers)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _line(ops: list[list[Any]]) -> bytes:
    payload = orjson.dumps(ops)
    return b"%08x %b\n" % (zlib.crc32(payload), payload)
