"""Workflow context that travels with a call: its place in a run tree, its retry depth.

Agents fail in ways one call cannot show: a retry loop where every attempt
passes on its own, a sub-agent tree that fans out. A call says where it sits
(all of it optional, none of it trusted beyond the caller's own runs):

- its parent run: `x-parent-run-id` (policy `runs.parent_headers`) or the W3C
  `baggage` member `budget.parent_run` (the run itself may come as
  `budget.run`). Runs are namespaced under the principal, so a parent is always
  one of the caller's own runs. The store records a run's ancestry when the run
  is created (the parent must exist and be active) and never changes it;
  `Ancestry` reads it once per run and process and caches it (immutable while
  the run lives; the store re-checks it atomically on every reservation).
- its retry depth: `x-stainless-retry-count` (the official SDKs; policy
  `runs.retry_headers`), or the attempts already made with the same
  `Idempotency-Key` in the run (counted by the store on a per-key line).

The engine turns that into lines (budget.py `limits_for`): one per limit of
every ancestor run (the tree is held under its root by the same atomic
reserve), a `retries` amount of 1 on a retry, a per-key `attempts` line.
Pure values and header parsing here; the one store read is `Ancestry.resolve`.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..errors import BadRequest
from ..records import fast_init

if TYPE_CHECKING:
    from ..policy.model import RunsSpec
    from ..stores.base import Store

MAX_BAGGAGE_BYTES = 8192  # W3C baggage: at most 8192 bytes in all
MAX_RUN_ID = 128
ATTEMPTS = "attempts"  # the per-idempotency-key line's dimension (charged 1 per attempt)
KEEP_ON_RELEASE = ("retries", ATTEMPTS)  # charged even when the attempt is released: it was made
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_RETRY = re.compile(r"^\d{1,6}$")


@fast_init
@dataclass(frozen=True, slots=True)
class Workflow:
    """Where a call sits in its workflow. Ancestors are run ids (not keys), root first."""

    parent: str | None = None
    ancestors: tuple[str, ...] = ()
    retry: int = 0  # this attempt's retry depth: 0 is the first attempt
    attempt_key: str | None = None  # a digest of the call's idempotency key
    traceparent: str = ""

    @property
    def depth(self) -> int:
        return len(self.ancestors)

    def meta(self) -> dict[str, Any]:
        """What the ledger keeps of it (chargeback rebuilds the invocation tree from these)."""
        out: dict[str, Any] = {}
        if self.ancestors:
            out["parent_run"] = self.ancestors[-1]
            out["ancestors"] = list(self.ancestors)
        if self.retry:
            out["retry"] = self.retry
        if self.traceparent:
            out["traceparent"] = self.traceparent
        return out


def _run_id(value: str, name: str) -> str:
    if len(value) > MAX_RUN_ID or not value.isprintable():
        raise BadRequest(f"{name} must be at most {MAX_RUN_ID} printable characters", param=name)
    return value


def baggage(headers: Mapping[str, str]) -> dict[str, str]:
    """The members of a W3C `baggage` header (properties dropped, values percent-decoded)."""
    raw = headers.get("baggage", "")
    if not raw:
        return {}
    if len(raw) > MAX_BAGGAGE_BYTES:
        raise BadRequest(f"baggage is longer than {MAX_BAGGAGE_BYTES} bytes", param="baggage")
    out: dict[str, str] = {}
    for member in raw.split(","):
        kv = member.split(";", 1)[0]
        if "=" not in kv:
            continue  # W3C: a malformed member is skipped, the others still count
        key, value = kv.split("=", 1)
        out.setdefault(key.strip(), unquote(value.strip()))
    return out


def from_headers(runs: RunsSpec, headers: Mapping[str, str]) -> tuple[str | None, Workflow]:
    """The run id named in baggage (None if not there) and the call's workflow context.
    Raises BadRequest (param = the header) for a malformed value."""
    bag = baggage(headers) if (runs.baggage_run or runs.baggage_parent) else {}
    run = bag.get(runs.baggage_run) if runs.baggage_run else None
    parent = next((headers[h] for h in runs.parent_headers if headers.get(h)), None)
    if parent is None and runs.baggage_parent:
        parent = bag.get(runs.baggage_parent) or None
    retry = 0
    for h in runs.retry_headers:
        raw = headers.get(h)
        if raw:
            if not _RETRY.match(raw.strip()):
                raise BadRequest(f"{h} must be a non-negative integer", param=h)
            retry = int(raw)
            break
    key = headers.get(runs.idempotency_header) if runs.idempotency_header else None
    digest = hashlib.sha256(key.encode()).hexdigest()[:24] if key else None
    tp = headers.get("traceparent", "").strip().lower()
    return (
        _run_id(run, "baggage") if run else None,
        Workflow(
            parent=_run_id(parent, "x-parent-run-id") if parent else None,
            retry=retry,
            attempt_key=digest,
            traceparent=tp if _TRACEPARENT.match(tp) else "",
        ),
    )


def attempts_line_key(run_key: str, digest: str) -> str:
    return f"run:{run_key}|{ATTEMPTS}@{digest}|total"


class Ancestry:
    """Each run's recorded ancestors, read from the store once per run and process."""

    def __init__(self, store: Store, clock: Callable[[], int], size: int = 50_000) -> None:
        self.store, self.clock, self._size = store, clock, size
        self._known: OrderedDict[tuple[str, str], tuple[str, ...]] = OrderedDict()

    async def _recorded(self, tag: str, key: str) -> tuple[str, ...] | None:
        hit = self._known.get((tag, key))
        if hit is not None:
            return hit
        st = await self.store.run_state(tag, key, now_ms=self.clock())
        if st is None:
            return None
        ids = tuple(a.split("/", 1)[1] for a in st.ancestors)
        self._known[(tag, key)] = ids
        if len(self._known) > self._size:
            self._known.popitem(last=False)
        return ids

    def forget(self, tag: str, key: str) -> None:
        """After the store refused the ancestry we sent (the run restarted under another parent)."""
        self._known.pop((tag, key), None)

    async def resolve(self, tag: str, principal: str, run_id: str, wf: Workflow) -> Workflow:
        """`wf` with the run's ancestors: recorded ones for a known run (a parent header must
        agree with them), else the parent's ancestors and the parent for a new one. An unknown
        parent is left to the store, which refuses it (`run_parent`)."""
        known = await self._recorded(tag, f"{principal}/{run_id}")
        if known is not None:
            if wf.parent is not None and (not known or known[-1] != wf.parent):
                was = f"under {known[-1]!r}" if known else "as a root run"
                raise BadRequest(f"run {run_id!r} was started {was}; it cannot move to parent {wf.parent!r}", param="x-parent-run-id")
            return replace(wf, ancestors=known)
        if wf.parent is None:
            return wf
        if wf.parent == run_id:
            raise BadRequest("a run cannot be its own parent", param="x-parent-run-id")
        above = await self._recorded(tag, f"{principal}/{wf.parent}") or ()
        return replace(wf, ancestors=(*above, wf.parent))


class ModelsUsed:
    """The priciest model each run has used so far (its per-token input + output price), as
    this process saw it: the escalation gate's baseline. Bounded; a run this process has not
    seen yet has no baseline, so its first call here is never taken for an escalation."""

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._runs: OrderedDict[str, tuple[int, str]] = OrderedDict()

    def get(self, run_key: str) -> tuple[int, str] | None:
        return self._runs.get(run_key)

    def note(self, run_key: str, rank: int, model: str) -> None:
        cur = self._runs.get(run_key)
        if cur is None or rank > cur[0]:
            self._runs[run_key] = (rank, model)
        self._runs.move_to_end(run_key)
        if len(self._runs) > self._size:
            self._runs.popitem(last=False)
