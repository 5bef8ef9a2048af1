"""The embedded store: one SQLite file, the single-node default.

Why SQLite: durable across a crash of the service (WAL), atomic multi-line
reservations with one `BEGIN IMMEDIATE` transaction, and safe across several
worker processes on one host (SQLite's file lock serialises writers).

Never waiting on the event loop: each operation is a handful of indexed
statements, tens of microseconds, but a writer of another worker process can
hold the file lock. So writes run on the event loop only when they cannot wait:
the lock is free at once (busy timeout 0). A busy lock is tried again on the
loop a few times, after the other calls ready to run (another process's
transaction is over by then, mostly); then the writes, and always housekeeping
that can touch thousands of rows (expiry, ledger trims), run on one dedicated
thread per store, which waits for the lock. The loop touches the connection only
while nothing is queued on the thread (writes wait on the loop meanwhile), so
the two never share it. Doing the common case inline saves two thread hops per
operation; the writes that arrive in one turn of the event loop behind the first
share one transaction, a savepoint each (`_write`; bench/optimisations.md). A
lock held longer than `busy_timeout_s` (default 1 s, under Envoy's 2 s message
timeout) fails the operation with StoreUnavailable rather than stalling the
request. WAL checkpoints (which fsync) run every CHECKPOINT_EVERY writes, never
inside an inline commit: most of their work on a connection and thread of their
own while writes go on, the rest on the store's thread while writes wait for it
on the loop (`_start_checkpoint` says why).

The refusal rules are `extproc.rules` (the Redis scripts run the same rules,
held to them by shared vectors); line states, the decision on them and the
records a reservation leaves are `local.py` (shared with the journal store);
line wire format and key kinds are `wire.py`; the contract suite (tests/stores) holds both stores to the same
behaviour. Key layout of the `kv` table, per budget tree `tag` and line key `K`:

    tag|lim|K  admin limit override     tag|cr|K   admin credits
    tag|low|K  a run's lowered limit    tag|r|K    reserved (in flight)
    tag|s|K|P  spent in period P        tag|es|K   rolling spent (sum of `events`)
    tag|t0|K   first reservation (ms) of a duration line
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
    state_keys,
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_exp (k TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_exp_at ON kv_exp (at);
CREATE TABLE IF NOT EXISTS events (k TEXT NOT NULL, ts INTEGER NOT NULL, rid TEXT NOT NULL, amount INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_k_ts ON events (k, ts);
CREATE TABLE IF NOT EXISTS resv (
  tag TEXT NOT NULL, rid TEXT NOT NULL, state TEXT NOT NULL,
  created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, data TEXT NOT NULL,
  PRIMARY KEY (tag, rid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS resv_due ON resv (state, expires_at);
CREATE TABLE IF NOT EXISTS runs (
  tag TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL, state TEXT NOT NULL,
  created_at INTEGER NOT NULL, seen_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
  purge_at INTEGER NOT NULL, lines TEXT NOT NULL,
  PRIMARY KEY (tag, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_owner ON runs (tag, owner, state, expires_at);
CREATE INDEX IF NOT EXISTS runs_purge ON runs (purge_at);
CREATE TABLE IF NOT EXISTS run_chain (tag TEXT NOT NULL, key TEXT NOT NULL, chain TEXT NOT NULL, PRIMARY KEY (tag, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, tag TEXT NOT NULL, rid TEXT NOT NULL,
  outcome TEXT NOT NULL, reserved_at INTEGER NOT NULL, closed_at INTEGER NOT NULL,
  data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_closed ON ledger (closed_at);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, until INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (k TEXT PRIMARY KEY, until INTEGER NOT NULL) WITHOUT ROWID;
"""


T = TypeVar("T")
CHECKPOINT_EVERY = 1024  # writes between WAL checkpoints: ~10 MB of WAL, ~30 ms each (`_start_checkpoint`)
OPEN_WAIT_S = 10.0  # how long a start waits for other processes opening the same file
POLL_FIRST_S, POLL_MAX_S = 50e-6, 500e-6  # a write waiting for another process's lock retries this often (_begin)
RESTART_WAIT_MS = 20  # how long a checkpoint's second step waits for another process's write (`_checkpoint`)
INLINE_TRIES = 4  # a busy lock is tried this many times on the event loop before the write goes to the thread
MAX_BATCH = 64  # writes in one transaction at most (`_write`): each waits for all of its batch
_Op = tuple[Callable[[], Any], "asyncio.Future[Any]"]


class _LockBusy(Exception):
    """Another connection holds the write lock: this write goes to the store's thread."""


class EmbeddedStore:
    """SQLite-backed store. `path` ':memory:' is for tests only (not durable)."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", busy_timeout_s: float = 1.0) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extproc-sqlite")
        self._busy_ms = round(busy_timeout_s * 1000)
        # Operations handed to the thread and finished there: each counter has one writer (the loop, the
        # thread), so their difference says without a lock whether the thread may be using the connection.
        self._queued = self._finished = 0
        self._last_on_thread: asyncio.Future[Any] | None = None  # the thread runs its queue in order: idle once this is done
        self._writes = self._since_checkpoint = 0  # writes committed, and since the last checkpoint started
        self._pending: list[_Op] = []  # writes waiting for the next transaction (`_write`)
        self._flush_due = False  # a `_flush` is scheduled, or waits for the thread
        self._busy_tries = 0  # times the lock was found busy for the batch at the head of `_pending`
        self._checkpointing: asyncio.Task[None] | None = None  # a checkpoint running (`_start_checkpoint`)
        self._db = self._open(synchronous, busy_timeout_s)
        # the checkpoints' first step: a connection and a thread of its own (a file's WAL only)
        self._ckpt_db: sqlite3.Connection | None = None
        self._ckpt_pool: ThreadPoolExecutor | None = None
        if self.path != ":memory:":
            try:
                self._ckpt_db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
                self._ckpt_db.execute(f"PRAGMA synchronous={synchronous}")  # it fsyncs as the writes' connection would
            except sqlite3.Error as e:
                self._db.close()
                raise self._unavailable(e) from e
            self._ckpt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extproc-sqlite-ckpt")

    def _open(self, synchronous: str, busy_timeout_s: float) -> sqlite3.Connection:
        """The connection, set up. Several processes may open a new file at once, and switching it to
        WAL takes its lock without SQLite's busy handler ("database is locked" at once, one start in
        two with two workers): a busy open is tried again, for up to OPEN_WAIT_S."""
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
            try:
                db.execute("PRAGMA page_size=1024")  # small rows: a commit writes fewer bytes of dirty pages
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={synchronous}")
                db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints fsync: never in a commit (_start_checkpoint)
                db.executescript(_SCHEMA)
                db.execute("PRAGMA busy_timeout=0")  # from now on writes wait in _begin, never in SQLite's handler
                return db
            except sqlite3.Error as e:
                db.close()
                busy = getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise self._unavailable(e) from e
                time.sleep(random.uniform(0.005, 0.02))

    # -- transactions and the kv table ----------------------------------------

    def _unavailable(self, e: sqlite3.Error, detail: str = "") -> StoreUnavailable:
        """What a failing SQLite call becomes for the engine: the store is unavailable (fail closed)."""
        err = StoreUnavailable(f"embedded store {self.path}: {e}{detail}")
        err.__cause__ = e
        return err

    async def _write(self, fn: Callable[[], T], *, bulk: bool = False) -> T:
        """`fn` in a write transaction; the writes that arrive behind it in one turn are committed together.

        The first write of a turn of the event loop runs at once, alone, without yielding (one call at
        a time pays nothing for batching). Writes after it in the same turn queue and run at the next
        turn, each in its own savepoint of one transaction (group commit): one BEGIN and one COMMIT for
        all, and pages several of them touch (the budgets' counters, the tables' last pages) written to
        the WAL once (bench/optimisations.md). Each write still succeeds or fails alone, and answers
        only once its transaction is committed.

        Transactions run on the event loop when the lock is free; while the store's thread has work
        (the connection is its meanwhile) writes wait on the loop. A lock found busy is tried again on
        the loop after the calls ready to run have run, INLINE_TRIES times, before the batch goes to
        the thread: another process's transaction is over in tens of microseconds, and a hop to the
        thread costs more CPU than the transaction. `bulk` (housekeeping that can touch thousands of
        rows): alone, always on the thread."""
        if bulk:
            result: T = await self._on_thread(self._tx, fn, self._busy_ms)
            self._wrote(1)
            return result
        loop = asyncio.get_running_loop()
        if not self._flush_due:  # the first write of this loop turn runs now, as it would alone
            self._flush_due = True
            loop.call_soon(self._flush)
            if self._queued == self._finished:
                try:
                    result = self._tx(fn, 0)
                except _LockBusy:
                    pass  # tried again with the writes behind it
                else:
                    self._wrote(1)
                    return result
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, fut))
        return await fut

    def _flush(self, _: object = None) -> None:
        """Run the queued writes (up to MAX_BATCH) in one transaction on the loop, or wait for the thread."""
        if self._queued != self._finished:  # the thread has the connection: go on once it is done
            assert self._last_on_thread is not None
            self._last_on_thread.add_done_callback(self._flush)
            return
        batch = [op for op in self._pending[:MAX_BATCH] if not op[1].cancelled()]
        del self._pending[:MAX_BATCH]
        if batch:
            try:
                outcomes = self._tx_batch(batch, 0)
            except _LockBusy:
                self._pending[:0] = batch
                self._busy_tries += 1
                if self._busy_tries < INLINE_TRIES:
                    asyncio.get_running_loop().call_soon(self._flush)
                    return
                self._pending = self._pending[len(batch) :]
                self._on_thread(self._tx_batch, batch, self._busy_ms).add_done_callback(
                    lambda done: self._deliver(batch, done.exception() or done.result())
                )
            except BaseException as e:  # BEGIN or COMMIT failed: no write in the batch happened
                self._deliver(batch, e)
            else:
                self._deliver(batch, outcomes)
            self._busy_tries = 0
        if self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._flush_due = False

    def _deliver(self, batch: list[_Op], outcomes: list[tuple[bool, Any]] | BaseException) -> None:
        """Answer each write of a committed (or failed) batch, and count them towards a checkpoint."""
        for i, (_, fut) in enumerate(batch):
            if fut.done():  # its caller was cancelled while it ran: it happened all the same
                continue
            if isinstance(outcomes, BaseException):
                fut.set_exception(outcomes)
            elif outcomes[i][0]:
                fut.set_result(outcomes[i][1])
            else:
                fut.set_exception(outcomes[i][1])
        if not isinstance(outcomes, BaseException):
            self._wrote(len(batch))

    def _wrote(self, n: int) -> None:
        self._since_checkpoint += n
        self._writes += n
        if self._since_checkpoint >= CHECKPOINT_EVERY and self._checkpointing is None:
            self._since_checkpoint -= CHECKPOINT_EVERY
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        """A WAL checkpoint in two steps. The first copies the WAL's pages into the database and
        fsyncs it (~30 ms here) on a connection and thread of its own, while writes go on. The
        second, on the store's thread while writes wait for it on the loop (`_flush`), copies
        what was written during the first and fsyncs again (a few ms): a checkpoint that new
        frames overtake leaves the WAL unreset, and it would grow without bound. The second is a
        RESTART: it also holds back the writes of other processes on the file (for up to
        RESTART_WAIT_MS while one finishes), or with `--workers` their frames overtook every
        checkpoint and the WAL grew by ~5 MB per thousand writes."""
        self._checkpointing = asyncio.get_running_loop().create_task(self._checkpoint_in_two_steps())

    async def _checkpoint_in_two_steps(self) -> None:
        try:
            if self._ckpt_pool is not None:
                await asyncio.get_running_loop().run_in_executor(self._ckpt_pool, self._checkpoint, self._ckpt_db, "PASSIVE")
            await self._on_thread(self._checkpoint, self._db, "RESTART")
        finally:
            self._checkpointing = None

    async def _read(self, fn: Callable[[], T]) -> T:
        """`fn` outside a transaction (one consistent statement), on the store's own thread."""

        def go() -> T:
            try:
                return fn()
            except sqlite3.Error as e:
                raise self._unavailable(e) from e

        return await self._on_thread(go)

    def _on_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        def run() -> T:
            try:
                return fn(*args)
            finally:
                self._finished += 1  # the last thing the thread does with the connection

        fut = asyncio.get_running_loop().run_in_executor(self._pool, run)
        # counted once submitted (a closed pool raises above): the thread counts `_finished` before this
        # future resolves, so once the last one is done the counts are equal and `_thread_idle` returns
        self._queued += 1
        self._last_on_thread = fut
        return fut

    @staticmethod
    def _checkpoint(db: sqlite3.Connection | None, mode: str) -> None:
        """PASSIVE: copy what it can, wait for nobody. RESTART: wait (SQLite's busy handler, up to
        RESTART_WAIT_MS) for another process's write to end, hold new ones back, copy everything,
        so the next write starts the WAL again from its beginning."""
        assert db is not None
        with contextlib.suppress(sqlite3.Error):  # busy or failing: the next one tries again; commits do not need it
            if mode == "RESTART":
                db.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
            try:
                db.execute(f"PRAGMA wal_checkpoint({mode})")
            finally:
                if mode == "RESTART":
                    db.execute("PRAGMA busy_timeout=0")  # writes wait in _begin, never in SQLite's handler

    def _begin(self, wait_ms: int) -> None:
        """BEGIN IMMEDIATE, polling a busy lock every 50-500 µs for up to `wait_ms` (0 on the event loop:
        a busy lock raises _LockBusy at once). Not SQLite's busy handler: its sleeps grow to 100 ms, so a
        writer of another process that commits and begins again within microseconds kept the lock through
        every retry, and the waiting write failed after the whole timeout (two processes writing back to
        back: one failure in 3 s, `tests/stores/test_embedded_inline.py`)."""
        delay, deadline = POLL_FIRST_S, 0.0
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                busy = getattr(e, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or self._db.in_transaction:
                    raise self._unavailable(e) from e
                if not wait_ms:
                    raise _LockBusy from e
                now = time.monotonic()
                deadline = deadline or now + wait_ms / 1000
                if now >= deadline:
                    raise self._unavailable(e, f" (waited {wait_ms} ms)") from e
                time.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)
            except sqlite3.Error as e:
                raise self._unavailable(e) from e

    def _tx_batch(self, batch: list[_Op], wait_ms: int) -> list[tuple[bool, Any]]:
        """Each write of `batch` in one transaction: (True, result) or (False, the error it raised, its
        own changes rolled back). All of them at once first; if one raises, the transaction is rolled
        back and run again with each write in a savepoint (savepoints around every write cost 0.7% of
        a call's instructions at 32 calls in flight, and writes fail only when the store does)."""
        if len(batch) == 1:
            return [(True, self._tx(batch[0][0], wait_ms))]
        try:
            return self._tx(lambda: [(True, fn()) for fn, _ in batch], wait_ms)
        except _LockBusy:
            raise
        except Exception:
            return self._tx(lambda: [self._in_savepoint(fn) for fn, _ in batch], wait_ms)

    def _in_savepoint(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        self._db.execute("SAVEPOINT w")
        try:
            result = fn()
        except Exception as e:
            self._db.execute("ROLLBACK TO w")
            self._db.execute("RELEASE w")
            return False, self._unavailable(e) if isinstance(e, sqlite3.OperationalError) else e
        self._db.execute("RELEASE w")
        return True, result

    def _tx(self, fn: Callable[[], T], wait_ms: int) -> T:
        """Run `fn` in one write transaction (BEGIN IMMEDIATE: writers queue on the file lock, for up
        to `wait_ms`; 0 on the event loop, where a busy lock raises _LockBusy at once)."""
        self._begin(wait_ms)
        try:
            result = fn()
            self._db.execute("COMMIT")
            return result
        except BaseException as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise self._unavailable(e) from e
            raise

    def _get(self, k: str) -> int | None:
        row = self._db.execute("SELECT v FROM kv WHERE k=?", (k,)).fetchone()
        return None if row is None else row[0]

    def _set(self, k: str, v: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (k, v))

    def _add(self, k: str, delta: int) -> None:
        if delta:
            self._db.execute(
                "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = v + excluded.v", (k, delta)
            )

    def _add_many(self, deltas: list[tuple[str, int]]) -> None:
        self._db.executemany(
            "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = v + excluded.v", [d for d in deltas if d[1]]
        )

    # -- line evaluation -------------------------------------------------------

    def _states(self, tag: str, lines: Sequence[Line], now_ms: int) -> list[LineState]:
        """Every line's state with one read of the kv table (after trimming rolling windows)."""
        return self._read_states(tag, lines, now_ms)[0]

    def _read_states(self, tag: str, lines: Sequence[Line], now_ms: int) -> tuple[list[LineState], list[int | None]]:
        """`_states`, and the first reservation (ms) of each duration line (None before it and on other lines)."""
        keys: list[str] = []
        for line in lines:
            if line.window is Window.ROLLING and line.kind is Kind.COUNTER:
                self._trim(tag, line, now_ms)
            keys += state_keys(tag, line)
        got: dict[str, int] = {}
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[i : i + 500]
            got.update(self._db.execute(f"SELECT k, v FROM kv WHERE k IN ({','.join('?' * len(chunk))})", chunk).fetchall())
        return line_states(tag, lines, got, now_ms)

    def _trim(self, tag: str, line: Line, now_ms: int) -> None:
        """Drop rolling charges that left the window (ts <= now - window) from the running sum."""
        ek = f"{tag}|{EVENTS}|{line.key}"
        cutoff = now_ms - line.window_ms
        gone = self._db.execute("SELECT COALESCE(SUM(amount), 0) FROM events WHERE k=? AND ts<=?", (ek, cutoff)).fetchone()[0]
        if gone:
            self._db.execute("DELETE FROM events WHERE k=? AND ts<=?", (ek, cutoff))
            self._add(f"{tag}|{ROLLING_SUM}|{line.key}", -gone)

    def _retry_after(self, tag: str, line: Line, st: LineState, now_ms: int) -> int | None:
        sql = "SELECT ts, amount FROM events WHERE k=? ORDER BY ts"
        return retry_after(line, st, now_ms, lambda: self._db.execute(sql, (f"{tag}|{EVENTS}|{line.key}",)))

    # -- runs --------------------------------------------------------------------

    def _run_check(self, tag: str, run: RunRef, now_ms: int) -> tuple[RunRefusal | None, int | None, int | None]:
        row = self._db.execute("SELECT state, expires_at FROM runs WHERE tag=? AND key=?", (tag, run.key)).fetchone()
        if row is not None:
            if row[0] == "closed":
                return RunRefusal.CLOSED, None, None
            if row[1] <= now_ms:
                return RunRefusal.EXPIRED, None, None
            return self._chain_check(tag, run, now_ms, exists=True), None, None
        if (why := self._chain_check(tag, run, now_ms, exists=False)) is not None:
            return why, None, None
        active = self._db.execute(
            "SELECT COUNT(*) FROM runs WHERE tag=? AND owner=? AND state='active' AND expires_at>?", (tag, run.owner, now_ms)
        ).fetchone()[0]
        if active < run.max_active:
            return None, None, None
        (frees_at,) = self._db.execute(
            "SELECT expires_at FROM runs WHERE tag=? AND owner=? AND state='active' AND expires_at>? ORDER BY expires_at LIMIT 1 OFFSET ?",
            (tag, run.owner, now_ms, active - run.max_active),
        ).fetchone()
        return RunRefusal.LIMIT, frees_at - now_ms, active

    def _chain_check(self, tag: str, run: RunRef, now_ms: int, *, exists: bool) -> RunRefusal | None:
        """A nested run's ancestry (see base.py): recorded as given, every ancestor this owner's and active."""
        if exists:
            row = self._db.execute("SELECT chain FROM run_chain WHERE tag=? AND key=?", (tag, run.key)).fetchone()
            if (row[0] if row else "") != chain_json(run):
                return RunRefusal.PARENT
        for key in run.ancestors:
            a = self._db.execute("SELECT owner, state, expires_at FROM runs WHERE tag=? AND key=?", (tag, key)).fetchone()
            if a is None or a[0] != run.owner:
                return RunRefusal.PARENT
            if a[1] == "closed":
                return RunRefusal.CLOSED
            if a[2] <= now_ms:
                return RunRefusal.EXPIRED
        return None

    def _touch_run(self, tag: str, run: RunRef, lines: Sequence[Line], now_ms: int) -> None:
        exp = now_ms + run.ttl_ms
        keys = json.dumps(own_line_keys(run, lines))
        if run.ancestors:  # recorded once, with the run; activity anywhere in the tree keeps its ancestors alive
            self._db.execute("INSERT OR IGNORE INTO run_chain VALUES (?,?,?)", (tag, run.key, chain_json(run)))
            self._db.executemany(
                "UPDATE runs SET seen_at=?, expires_at=MAX(expires_at, ?), purge_at=MAX(purge_at, ?) WHERE tag=? AND key=?",
                [(now_ms, exp, exp + run.memory_ms, tag, a) for a in run.ancestors],
            )
        self._db.execute(
            "INSERT INTO runs VALUES (?,?,?,'active',?,?,?,?,?) ON CONFLICT(tag, key) DO UPDATE SET "
            "seen_at=excluded.seen_at, expires_at=excluded.expires_at, purge_at=excluded.purge_at, lines=excluded.lines",
            (tag, run.key, run.owner, now_ms, now_ms, exp, exp + run.memory_ms, keys),
        )
        for line in lines:
            if line.run and line.lower is not None:
                k = f"{tag}|{LOWERED}|{line.key}"
                cur = self._get(k)
                if cur is None or line.lower < cur:
                    self._set(k, line.lower)

    def _purge_runs(self, now_ms: int, limit: int) -> None:
        due = self._db.execute("SELECT tag, key, lines FROM runs WHERE purge_at<=? LIMIT ?", (now_ms, limit)).fetchall()
        for tag, key, lines_json in due:
            keys = json.loads(lines_json)
            if any(self._get(f"{tag}|{RESERVED}|{k}") for k in keys):
                self._db.execute("UPDATE runs SET purge_at=? WHERE tag=? AND key=?", (now_ms + PURGE_RETRY_MS, tag, key))
                continue
            for k in keys:
                self._db.executemany("DELETE FROM kv WHERE k=?", [(f"{tag}|{kind}|{k}",) for kind in RUN_KEY_KINDS])
                self._db.execute("DELETE FROM kv WHERE k=?", (f"{tag}|{SPENT}|{k}|",))
                self._db.execute("DELETE FROM events WHERE k=?", (f"{tag}|{EVENTS}|{k}",))
            self._db.execute("DELETE FROM runs WHERE tag=? AND key=?", (tag, key))
            self._db.execute("DELETE FROM run_chain WHERE tag=? AND key=?", (tag, key))

    # -- reservations -----------------------------------------------------------

    def _resv(self, tag: str, rid: str, now_ms: int) -> tuple[str, dict[str, Any]] | None:
        """The reservation record, unless it is a closed/refused one past its memory."""
        row = self._db.execute("SELECT state, expires_at, data FROM resv WHERE tag=? AND rid=?", (tag, rid)).fetchone()
        if row is None:
            return None
        if row[0] != Outcome.RESERVED.value and row[1] <= now_ms:
            self._db.execute("DELETE FROM resv WHERE tag=? AND rid=?", (tag, rid))
            return None
        return row[0], json.loads(row[2])

    def _evaluate(
        self, tag: str, rid: str, lines: Sequence[Line], now_ms: int, run: RunRef | None
    ) -> ReserveResult:
        checked = self._run_check(tag, run, now_ms) if run is not None else (None, None, None)
        states, firsts = self._read_states(tag, lines, now_ms)
        return decide(rid, lines, states, firsts, now_ms, checked, lambda i: self._retry_after(tag, lines[i], states[i], now_ms))

    def _reserve(
        self, tag: str, rid: str, lines: Sequence[Line], now_ms: int, ttl_ms: int, meta: Mapping[str, Any], run: RunRef | None
    ) -> ReserveResult:
        prior = self._resv(tag, rid, now_ms)
        if prior is not None:
            return replay_reserve(rid, prior[1])
        res = self._evaluate(tag, rid, lines, now_ms, run)
        if run is not None and res.reason is None:
            self._touch_run(tag, run, lines, now_ms)
        if not res.ok:
            self._db.execute(
                "INSERT OR REPLACE INTO resv VALUES (?,?,?,?,?,?)",
                (tag, rid, "refused", now_ms, now_ms + REFUSAL_MEMORY_MS, json.dumps(result_json(res))),
            )
            return res
        deltas = []
        for line in lines:
            if line.kind is Kind.DURATION:
                self._db.execute("INSERT OR IGNORE INTO kv (k, v) VALUES (?, ?)", (f"{tag}|{FIRST}|{line.key}", now_ms))
            else:
                deltas.append((f"{tag}|{RESERVED}|{line.key}", line.amount))
        self._add_many(deltas)
        res = taken(res, lines)
        self._db.execute(
            "INSERT OR REPLACE INTO resv VALUES (?,?,?,?,?,?)",
            (tag, rid, Outcome.RESERVED.value, now_ms, now_ms + ttl_ms, json.dumps(reservation_record(res, lines, meta, now_ms, run))),
        )
        return res

    def _close(
        self, tag: str, rid: str, outcome: Outcome, usage: Mapping[str, int] | None, now_ms: int, extra_meta: Mapping[str, Any] | None
    ) -> SettleResult:
        data = closable(self._resv(tag, rid, now_ms))
        if isinstance(data, SettleResult):
            return data
        lines = [line_from_wire(d) for d in data["lines"]]
        reserved, charged = charges(data, lines, outcome, usage)
        deltas = []
        for line in lines:
            if line.kind is Kind.DURATION:
                continue
            deltas.append((f"{tag}|{RESERVED}|{line.key}", -line.amount))
            amount = charged.get(line.dimension, 0)
            if line.kind is Kind.CONCURRENCY or not amount:
                continue
            if line.window is Window.ROLLING:
                self._db.execute("INSERT INTO events VALUES (?,?,?,?)", (f"{tag}|{EVENTS}|{line.key}", now_ms, rid, amount))
                deltas.append((f"{tag}|{ROLLING_SUM}|{line.key}", amount))
            else:
                sk = f"{tag}|{SPENT}|{line.key}|{line.period}"
                deltas.append((sk, amount))
                if line.window is Window.CALENDAR and line.period_ttl_s > 0:
                    # kept from the bucket's first charge: that already outlives the period by one more period
                    self._db.execute("INSERT OR IGNORE INTO kv_exp VALUES (?, ?)", (sk, now_ms + line.period_ttl_s * 1000))
        self._add_many(deltas)
        closed, entry = closed_records(data, lines, reserved, charged, now_ms, extra_meta)
        self._db.execute(
            "UPDATE resv SET state=?, expires_at=?, data=? WHERE tag=? AND rid=?",
            (outcome.value, now_ms + CLOSED_MEMORY_MS, closed, tag, rid),
        )
        self._db.execute(
            "INSERT INTO ledger (tag, rid, outcome, reserved_at, closed_at, data) VALUES (?,?,?,?,?,?)",
            (tag, rid, outcome.value, data["created_at"], now_ms, entry),
        )
        return SettleResult(outcome, charged)

    def _extend(self, tag: str, rid: str, delta: Mapping[str, int], now_ms: int, ttl_ms: int) -> ExtendResult:
        found = self._resv(tag, rid, now_ms)
        if found is None or found[0] != Outcome.RESERVED.value:
            return ExtendResult(False, False, ())
        data = found[1]
        lines = [line_from_wire(d) for d in data["lines"]]
        run, reason = data.get("run"), None
        if run is not None:
            row = self._db.execute("SELECT state, expires_at FROM runs WHERE tag=? AND key=?", (tag, run[0])).fetchone()
            if row is None:
                run = None  # purged: nothing to check or touch
            elif row[0] == "closed":
                reason = RunRefusal.CLOSED
            elif row[1] <= now_ms:
                reason = RunRefusal.EXPIRED
        states, firsts = self._read_states(tag, lines, now_ms)
        blocked = extension_blocked(lines, states, delta) if reason is None else None
        if run is not None and reason is None:
            exp = now_ms + run[2]
            self._db.execute(
                "UPDATE runs SET seen_at=?, expires_at=?, purge_at=? WHERE tag=? AND key=?",
                (now_ms, exp, exp + run[4], tag, run[0]),
            )
        deadline = earliest_deadline(lines, states, firsts, now_ms)
        if reason is not None or blocked is not None:
            return ExtendResult(False, True, tuple(states), blocked, reason, deadline)
        _, after, data = extended(data, lines, states, delta)
        self._add_many([(f"{tag}|{RESERVED}|{line.key}", delta.get(line.dimension, 0)) for line in lines if line.kind is Kind.COUNTER])
        self._db.execute(
            "UPDATE resv SET expires_at=?, data=? WHERE tag=? AND rid=?", (now_ms + ttl_ms, json.dumps(data), tag, rid)
        )
        return ExtendResult(True, True, tuple(after), None, None, deadline)

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
        return await self._write(lambda: self._reserve(tag, reservation_id, lines, now_ms, ttl_ms, meta, run))

    async def extend(
        self, tag: str, reservation_id: str, delta: Mapping[str, int], *, now_ms: int, ttl_ms: int
    ) -> ExtendResult:
        """One write transaction: check, grow and re-arm the TTL (not idempotent: each call adds)."""
        d = extension_delta(delta)
        return await self._write(lambda: self._extend(tag, reservation_id, d, now_ms, ttl_ms))

    async def check(self, tag: str, lines: Sequence[Line], *, now_ms: int, run: RunRef | None = None) -> ReserveResult:
        return await self._write(lambda: self._evaluate(tag, "", lines, now_ms, run))

    async def snapshot(self, lines: Sequence[Line], *, tag: str, now_ms: int) -> tuple[LineState, ...]:
        return await self._write(lambda: tuple(self._states(tag, lines, now_ms)))

    async def settle(
        self, tag: str, reservation_id: str, usage: Mapping[str, int], *, now_ms: int, meta: Mapping[str, Any] | None = None
    ) -> SettleResult:
        return await self._write(lambda: self._close(tag, reservation_id, Outcome.SETTLED, usage, now_ms, meta))

    async def release(self, tag: str, reservation_id: str, *, now_ms: int) -> SettleResult:
        return await self._write(lambda: self._close(tag, reservation_id, Outcome.RELEASED, {}, now_ms, None))

    async def expire(self, *, now_ms: int, limit: int = 100) -> int:
        """Settle reservations past their TTL at the reserved amount, forget closed
        ones past their memory, drop old calendar buckets, purge forgotten runs."""

        def run() -> int:
            due = self._db.execute(
                "SELECT tag, rid FROM resv WHERE state='reserved' AND expires_at<=? LIMIT ?", (now_ms, limit)
            ).fetchall()
            for tag, rid in due:
                self._close(tag, rid, Outcome.EXPIRED, None, now_ms, None)
            self._db.execute("DELETE FROM resv WHERE state!='reserved' AND expires_at<=?", (now_ms,))
            self._db.execute("DELETE FROM kv WHERE k IN (SELECT k FROM kv_exp WHERE at<=?)", (now_ms,))
            self._db.execute("DELETE FROM kv_exp WHERE at<=?", (now_ms,))
            self._db.execute("DELETE FROM alerts WHERE until<=?", (now_ms,))
            self._purge_runs(now_ms, limit)
            return len(due)

        return await self._write(run, bulk=True)

    async def adjust(self, tag: str, key: str, *, set_limit: int | None = None, credit: int = 0) -> None:
        def run() -> None:
            if set_limit is not None:
                self._set(f"{tag}|{LIMIT}|{key}", set_limit)
                self._db.execute("DELETE FROM kv WHERE k=?", (f"{tag}|{LOWERED}|{key}",))
            self._add(f"{tag}|{CREDIT}|{key}", credit)

        await self._write(run)

    def _run_row(self, tag: str, key: str, now_ms: int) -> RunState | None:
        row = self._db.execute(
            "SELECT r.owner, r.state, r.created_at, r.seen_at, r.expires_at, c.chain FROM runs r "
            "LEFT JOIN run_chain c ON c.tag=r.tag AND c.key=r.key WHERE r.tag=? AND r.key=?",
            (tag, key),
        ).fetchone()
        return None if row is None else run_state_of(key, row[0], row[1], row[2], row[3], row[4], now_ms, row[5])

    async def run_state(self, tag: str, run_key: str, *, now_ms: int) -> RunState | None:
        return await self._read(lambda: self._run_row(tag, run_key, now_ms))

    async def close_run(self, tag: str, run: RunRef, *, now_ms: int) -> RunState:
        def go() -> RunState:
            self._db.execute(
                "INSERT INTO runs VALUES (?,?,?,'closed',?,?,?,?,'[]') ON CONFLICT(tag, key) DO UPDATE SET "
                "state='closed', purge_at=excluded.purge_at",
                (tag, run.key, run.owner, now_ms, now_ms, now_ms, now_ms + run.memory_ms),
            )
            st = self._run_row(tag, run.key, now_ms)
            assert st is not None
            return st

        return await self._write(go)

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None, tag: str | None = None) -> list[LedgerEntry]:
        return await self._read(lambda: read_ledger(self._db, since_ms, limit, tag))

    async def ledger_page(
        self, *, since_ms: int = 0, after: str | None = None, limit: int = 1000
    ) -> tuple[list[LedgerEntry], str | None]:
        """Up to `limit` entries closed at or after `since_ms`, in append order, after the
        cursor `after`; and the cursor of the next page (None at the end)."""
        return await self._read(lambda: read_ledger_page(self._db, since_ms, after, limit))

    async def trim_ledger(self, *, before_ms: int, limit: int = 10_000) -> int:
        """Drop up to `limit` of the oldest entries closed before `before_ms` (the retention)."""
        return await self._write(lambda: trim_ledger(self._db, before_ms, limit), bulk=True)

    async def lead(self, name: str, owner: str, *, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew the lease `name` for `owner` until now + ttl; False while another owner holds it."""

        def go() -> bool:
            row = self._db.execute("SELECT owner, until FROM leases WHERE name=?", (name,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now_ms:
                return False
            self._db.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?)", (name, owner, now_ms + ttl_ms))
            return True

        return await self._write(go)

    async def claim_alert(self, tag: str, key: str, *, now_ms: int, ttl_ms: int) -> bool:
        """INSERT OR IGNORE after dropping an expired marker: one transaction, one winner."""
        k = f"{tag}|{key}"

        def go() -> bool:
            self._db.execute("DELETE FROM alerts WHERE k=? AND until<=?", (k, now_ms))
            return self._db.execute("INSERT OR IGNORE INTO alerts VALUES (?, ?)", (k, now_ms + ttl_ms)).rowcount == 1

        return await self._write(go)

    async def ping(self) -> None:
        await self._read(lambda: self._db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._pending:  # writes already asked for still happen
            await asyncio.wait([fut for _, fut in self._pending])
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        if self._ckpt_pool is not None and self._ckpt_db is not None:
            # first, on its thread: the last connection to close checkpoints the WAL (and fsyncs),
            # and that must be the store's own, on the store's thread, not this one on the loop
            await asyncio.get_running_loop().run_in_executor(self._ckpt_pool, self._ckpt_db.close)
            self._ckpt_pool.shutdown(wait=True)
        await self._read(self._db.close)
        self._pool.shutdown(wait=True)
