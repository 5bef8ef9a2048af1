"""The store interface every backend implements, and the values it speaks.

A reservation touches a set of *lines*: one limit of one budget (for example
"team:ml, cost, calendar day"). `reserve` checks every line and takes all of
them or none, atomically, inside the store (one Lua script on Redis, one
transaction on the embedded store). The engine computes amounts and limits;
the store owns counters, key layout and atomicity, nothing else.

Transitions are idempotent: `reserve` with a known id replays its first
outcome, and `settle` / `release` / expiry after a reservation has left the
`reserved` state return the first terminal outcome unchanged. A refused
reservation is remembered for `REFUSAL_MEMORY_MS` (a retry with the same id
replays the refusal), a closed one for `CLOSED_MEMORY_MS`; neither is ever
in the ledger unless it was reserved.

Extensions (`extend`): a reservation still in the `reserved` state may grow
while its call runs (a stream's output). Atomically across its lines: every
counter line of a dimension in the delta must still pass the rules with the
delta as amount (its own reservation already counted in `reserved`; no
headroom), and every duration line must be before its deadline; then the
reserved counters, the lines' amounts and the estimate (what expiry charges)
grow, and the expiry moves to now + ttl. Anything refuses: nothing changes.
Extensions are NOT idempotent: each call adds its delta (a caller that
retries after a timeout may extend twice; the surplus is given back when the
reservation settles). A closed run refuses the extension (`reason`), an
active one has its expiry pushed as by a reservation attempt.

Runs (`RunRef`): a reservation may belong to a run. The store checks the run
inside the same atomic step as the lines: a closed run, an expired run (no
reservation attempt for `ttl_ms`) and a new run beyond the owner's cap of
active runs are refused with `reason` set. Any other attempt *touches* the
run: creates it on first sight, pushes its expiry to now + ttl, and keeps the
lowest limit a client asked for on each of its lines (`Line.lower`), so a
later request cannot raise it back. The reaper purges a run's record and
counters `memory_ms` after it expired or was closed; only then may its id
start afresh.

Nested runs (`RunRef.ancestors`, root first): the run's ancestry is recorded
when the run is created and never changes. In the same atomic step every
ancestor must exist, belong to the same owner and be active (a closed
ancestor refuses as `run_closed`, an expired one as `run_expired`, a missing
one, another owner's or a run recorded under other ancestors as
`run_parent`), and an accepted attempt pushes every ancestor's expiry too.
The reservation carries the ancestors' lines like any other (`run` set, so
their lowered limits apply); they are the ancestors' own counters, never
purged with the child (`own_line_keys`).

Counter semantics and the refusal rules live in `extproc.rules` (one copy,
mirrored by lua/rules.lua and held to it by shared test vectors):

- ROLLING window: spent = sum of charges settled in (now - window_ms, now].
  `retry_after_ms` is exact: the smallest wait after which the same request
  fits if nothing else changes (None when waiting alone cannot help).
- Effective limit = (admin override, else the line's limit) + credits,
  then capped by the run's lowered limit.

The interface is split by who calls it: `Reservations` (the hot path),
`Admin`, `Reaper` (housekeeping, one elected caller per store), `Ledger`
(reads for export) and `Alerts` (the once-per-threshold marker); `Store` is
all of them, what a backend implements.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..records import fast_init
from ..rules import Kind, Line, LineState, Mode, Window
from . import _json as json

__all__ = [
    "Kind", "Line", "LineState", "Mode", "Window",  # re-exported: the neutral types live in extproc.rules
    "Outcome", "RunRefusal", "RunRef", "RunState", "ReserveResult", "ExtendResult", "SettleResult", "LedgerEntry",
    "Reservations", "Admin", "Reaper", "Ledger", "Alerts", "Store",
    "REFUSAL_MEMORY_MS", "CLOSED_MEMORY_MS", "RUN_MEMORY_MS", "USAGE_FIELDS",
    "usage_of_lines", "run_state_of", "normalize_usage", "extension_delta", "own_line_keys", "chain_json",
]  # fmt: skip


class Outcome(str, enum.Enum):
    RESERVED = "reserved"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


REFUSAL_MEMORY_MS = 60_000  # a refused id replays its refusal this long
CLOSED_MEMORY_MS = 86_400_000  # a settled/released/expired id replays its outcome this long
RUN_MEMORY_MS = 86_400_000  # an expired or closed run is remembered (refused) this long


class RunRefusal(str, enum.Enum):
    """Why a reservation was refused by its run rather than by a line."""

    CLOSED = "run_closed"  # an admin closed the run
    EXPIRED = "run_expired"  # no activity for the run TTL
    LIMIT = "run_limit"  # a new run beyond the owner's cap of active runs
    PARENT = "run_parent"  # a nested run's parent is unknown, another owner's, or not the one it was started under
    DEPTH = "run_depth_exceeded"  # a nested run deeper than the policy allows (decided before the store)
    ATTEMPTS = "call_attempts"  # a retry past the policy's attempts per call (decided before the store)
    ESCALATION = "model_escalation"  # past the run's escalation threshold, a pricier model than it used (engine)


# What a settled call used; lines pick their dimension from it.
USAGE_FIELDS = ("cost", "input_tokens", "output_tokens", "total_tokens", "requests", "retries", "attempts", "tool_calls")


@dataclass(frozen=True, slots=True)
class RunRef:
    """The run a reservation belongs to. `key` is unique within the tag ("principal/run-id")."""

    key: str
    owner: str
    ttl_ms: int
    max_active: int
    memory_ms: int = RUN_MEMORY_MS
    ancestors: tuple[str, ...] = ()  # keys of the run's ancestors, root first (nested runs)
    inherited: frozenset[str] = frozenset()  # keys of the ancestors' lines in a reservation (theirs, not this run's)


@dataclass(frozen=True, slots=True)
class RunState:
    """A run as the store knows it. `state` is active | expired | closed (expired is derived from the clock)."""

    key: str
    owner: str
    state: str
    created_at_ms: int
    seen_at_ms: int
    expires_at_ms: int
    ancestors: tuple[str, ...] = ()  # recorded when the run was created, root first


@fast_init
@dataclass(frozen=True, slots=True)
class ReserveResult:
    ok: bool
    reservation_id: str
    states: tuple[LineState, ...]
    blocked: int | None = None  # index of the first line that did not fit
    warned: tuple[int, ...] = ()  # advisory lines that would have blocked
    retry_after_ms: int | None = None  # rolling/concurrency/run cap: when enough frees up
    replayed: bool = False
    reason: RunRefusal | None = None  # refused by the run, not by a line (then blocked is None)
    active_runs: int | None = None  # with reason LIMIT: the owner's active runs
    deadline_ms: int | None = None  # earliest wall-clock deadline of the gating duration lines (first ms + limit s)


@dataclass(frozen=True, slots=True)
class ExtendResult:
    """What `extend` did. `states` has one entry per line of the reservation: after the
    extension when ok, as found when refused (empty when the reservation was not found)."""

    ok: bool
    found: bool  # the reservation is (still) in the reserved state
    states: tuple[LineState, ...]
    blocked: int | None = None  # index of the first line that refused
    reason: RunRefusal | None = None  # the reservation's run was closed (or expired)
    deadline_ms: int | None = None  # earliest wall-clock deadline of the gating duration lines


@fast_init
@dataclass(frozen=True, slots=True)
class SettleResult:
    outcome: Outcome  # the reservation's terminal state (first one wins)
    charged: Mapping[str, int]  # usage charged per USAGE_FIELDS name
    replayed: bool = False
    found: bool = True


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    seq: str
    tag: str
    reservation_id: str
    outcome: Outcome
    reserved: Mapping[str, int]
    charged: Mapping[str, int]
    meta: Mapping[str, Any]
    reserved_at_ms: int
    closed_at_ms: int
    lines: tuple[str, ...] = field(default=())


class Reservations(Protocol):
    """The hot path: what every metered request calls. All times are ms since epoch."""

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
    ) -> ReserveResult: ...

    async def check(self, tag: str, lines: Sequence[Line], *, now_ms: int, run: RunRef | None = None) -> ReserveResult:
        """What `reserve` would answer now, taking and recording nothing (reservation_id is "")."""
        ...

    async def settle(
        self, tag: str, reservation_id: str, usage: Mapping[str, int], *, now_ms: int, meta: Mapping[str, Any] | None = None
    ) -> SettleResult: ...

    async def release(self, tag: str, reservation_id: str, *, now_ms: int) -> SettleResult: ...

    async def extend(
        self, tag: str, reservation_id: str, delta: Mapping[str, int], *, now_ms: int, ttl_ms: int
    ) -> ExtendResult:
        """Grow a reserved reservation by `delta` ({usage field: amount > 0}) on every counter
        line of those dimensions, all lines or none, and push its expiry to now + ttl.
        Not idempotent: every call adds (see the module docstring)."""
        ...


class Admin(Protocol):
    """Reading and changing budgets and runs from outside a request (admin API, CLI, budget endpoint)."""

    async def snapshot(self, lines: Sequence[Line], *, tag: str, now_ms: int) -> tuple[LineState, ...]: ...

    async def adjust(self, tag: str, key: str, *, set_limit: int | None = None, credit: int = 0) -> None:
        """Override a line's limit (also dropping a run's client-lowered limit)
        and/or add a credit (raises its limit by `credit`; negative takes back)."""
        ...

    async def run_state(self, tag: str, run_key: str, *, now_ms: int) -> RunState | None: ...

    async def close_run(self, tag: str, run: RunRef, *, now_ms: int) -> RunState:
        """Refuse every further reservation of the run (creating it closed if unseen)."""
        ...


class Reaper(Protocol):
    """Housekeeping, run by one elected caller per store (`lead`), not by every worker."""

    async def lead(self, name: str, owner: str, *, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew the lease `name` for `owner` until now + ttl. False while another
        owner holds an unexpired lease: that one does the work."""
        ...

    async def expire(self, *, now_ms: int, limit: int = 100) -> int:
        """Settle up to `limit` reservations past their TTL at the reserved amount (outcome
        `expired`), forget closed records past their memory, purge runs whose memory
        passed (record and counters; the ledger stays). Returns how many expired."""
        ...

    async def trim_ledger(self, *, before_ms: int, limit: int = 10_000) -> int:
        """Drop the oldest ledger entries closed before `before_ms` (the policy's retention)."""
        ...


class Ledger(Protocol):
    """Reading the ledger: whole for small reads, in pages for export."""

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None, tag: str | None = None) -> list[LedgerEntry]:
        """Entries closed at or after `since_ms` (store clock = the callers' now_ms), by close time."""
        ...

    async def ledger_page(
        self, *, since_ms: int = 0, after: str | None = None, limit: int = 1000
    ) -> tuple[list[LedgerEntry], str | None]:
        """Up to `limit` entries closed at or after `since_ms`, in the store's append order, after
        the opaque cursor `after` (None: from the start); and the next cursor (None at the end)."""
        ...


class Alerts(Protocol):
    """The once-only marker of threshold alerts, shared by every worker process and pod."""

    async def claim_alert(self, tag: str, key: str, *, now_ms: int, ttl_ms: int) -> bool:
        """Atomically mark `key` of tree `tag` as claimed until now + ttl: True for the one
        caller that set it, False while it is set (then someone else sends that alert)."""
        ...


class Store(Reservations, Admin, Reaper, Ledger, Alerts, Protocol):
    """A whole backend: what `app.open_store` returns."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers (the health probe)."""
        ...

    async def close(self) -> None: ...


def usage_of_lines(lines: Sequence[Line]) -> dict[str, int]:
    """The usage a reservation stands for when the caller gave no estimate (what expiry charges)."""
    usage: dict[str, int] = {}
    for line in lines:
        if line.kind is Kind.COUNTER and line.amount:
            usage[line.dimension] = max(usage.get(line.dimension, 0), line.amount)
    return usage


def run_state_of(
    key: str, owner: str, state: str, created: int, seen: int, expires: int, now_ms: int, chain: str | None = None
) -> RunState:
    if state == "active" and expires <= now_ms:
        state = "expired"
    return RunState(key, owner, state, created, seen, expires, tuple(json.loads(chain)) if chain else ())


def own_line_keys(run: RunRef, lines: Sequence[Line]) -> list[str]:
    """The keys of the run's own lines in a reservation: purged with the run (its ancestors' are not)."""
    return [l.key for l in lines if l.run and l.key not in run.inherited]


def chain_json(run: RunRef) -> str:
    """The run's ancestry as both stores record and compare it ("" for a root run)."""
    return json.dumps(list(run.ancestors)) if run.ancestors else ""


def extension_delta(delta: Mapping[str, int]) -> dict[str, int]:
    """The usage fields of an extension's delta with something to add; a negative amount
    is a caller's bug (an extension never shrinks a reservation)."""
    out = {}
    for k, v in delta.items():
        n = int(v)
        if n < 0:
            raise ValueError(f"an extension only grows a reservation: {k}={n}")
        if n and k in USAGE_FIELDS:
            out[k] = n
    return out


def normalize_usage(usage: Mapping[str, int]) -> dict[str, int]:
    """Fill `total_tokens` from input + output when absent; drop zero fields."""
    out = {k: int(v) for k, v in usage.items() if k in USAGE_FIELDS and int(v)}
    if "total_tokens" not in out and ("input_tokens" in out or "output_tokens" in out):
        out["total_tokens"] = out.get("input_tokens", 0) + out.get("output_tokens", 0)
    return out
