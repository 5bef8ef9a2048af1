"""Threshold alerts: once per threshold per period per budget line, to webhooks.

After a call settles, `Alerter.settled` looks at the states its decision saw
at reserve time (in memory, no I/O): a line is *near* a threshold when
spent + reserved there (plus this call's overrun) reaches threshold × limit
and this process has not yet seen that threshold claimed. Only then a
background task reads the line's settled spend from the store; when spend has
crossed, the store's atomic marker (`claim_alert`: SET NX PX / INSERT OR
IGNORE) picks the one process of the fleet that delivers it. A near line
whose spend has not yet crossed while reservations are still held on it is
watched (re-read) until they settle, so a threshold crossed by another
process's late settle is still seen here.

The marker's key is line key + calendar period + threshold: a new day, week
or month alerts again; a `total` window alerts once. Rolling windows do not
alert (their spend falls again): the PrometheusRule covers rates.

Delivery runs in the background, never on the request path: each webhook is
tried `attempts` times with exponential backoff; every delivery (and every
giving up) is recorded in the ledger as a zero-charge entry (api `alert`,
usage_source `alert_delivered` / `alert_failed`, principal = the budget,
request_id = the alert key), so `extproc ledger export` shows it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from ..errors import StoreUnavailable
from ..money import nano_to_usd
from ..policy.model import AlertsSpec, Policy, WebhookSpec
from ..rules import Line, LineState, Window
from .budget import AppliedLimit, Decision, Engine

log = logging.getLogger("extproc.alerts")

SIGNATURE_HEADER = "x-extproc-signature"
TOTAL_MARK_MS = 366 * 86_400_000  # a total window's marker: once, for a year
WATCH_DELAY_S = 0.5  # re-read a near line this often while reservations are held on it
WATCH_ROUNDS = 1200  # at most (10 minutes): the reservation TTL ends holds in the end
SEEN_CAP = 100_000  # the in-memory "already claimed" set is bounded

Spawn = Callable[[Awaitable[Any]], None]


@dataclass(frozen=True, slots=True)
class Alert:
    tag: str
    budget: str  # "team:ml"
    line_key: str
    window: str  # the limit's window id: total, day@UTC, ...
    period: str  # the calendar bucket ("2026-11-23"), "" for total
    threshold: Decimal
    limit: int  # nano-USD
    spent: int  # nano-USD, settled, when the crossing was seen
    at_ms: int

    @property
    def key(self) -> str:
        """The once-only marker: budget line, calendar period, threshold."""
        return f"alert:{self.line_key}|{self.period}|{self.threshold}"

    def body(self) -> dict[str, Any]:
        return {
            "type": "extproc.budget_threshold",
            "budget": self.budget,
            "line": self.line_key,
            "window": self.window,
            "period": self.period,
            "threshold": str(self.threshold),
            "limit_usd": nano_to_usd(self.limit),
            "spent_usd": nano_to_usd(self.spent),
            "at_ms": self.at_ms,
            "alert_id": self.key,
        }

    def text(self) -> str:
        pct = (self.threshold * 100).normalize()
        period = f" ({self.window} {self.period})" if self.period else ""
        return (
            f"Budget {self.budget}{period} reached {pct:f}% of its limit: "
            f"spent {nano_to_usd(self.spent)} of {nano_to_usd(self.limit)} USD."
        )


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: `sha256=<hex HMAC-SHA256 of the body>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def webhook_secret(hook: WebhookSpec) -> bytes:
    """Read at each delivery, so a rotated secret file or env value applies without a reload."""
    if hook.secret_file is not None:
        return Path(hook.secret_file).read_bytes().strip()
    value = os.environ.get(hook.secret_env or "")
    if not value:
        raise LookupError(f"environment variable {hook.secret_env} is empty or unset")
    return value.encode()


def request_for(hook: WebhookSpec, alert: Alert) -> tuple[bytes, dict[str, str]]:
    """The body and headers one webhook receives for one alert."""
    if hook.kind == "slack":
        return json.dumps({"text": alert.text()}).encode(), {"content-type": "application/json"}
    body = json.dumps(alert.body(), sort_keys=True).encode()
    return body, {"content-type": "application/json", SIGNATURE_HEADER: sign(webhook_secret(hook), body)}


class Post(Protocol):
    async def __call__(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        """POST and return the HTTP status (raise on a connection error)."""
        ...


def _eligible(spec: AlertsSpec, lim: AppliedLimit) -> bool:
    return (
        lim.spec.dimension == "cost"
        and lim.line.window is not Window.ROLLING
        and (spec.scopes is None or lim.scope in spec.scopes)
    )


class Alerter:
    """One per worker process. `settled` is the request path's only cost: a comparison per line."""

    def __init__(self, engine: Engine, spawn: Spawn, *, post: Post, watch_delay: float = WATCH_DELAY_S) -> None:
        self.engine, self.spawn, self.post, self.watch_delay = engine, spawn, post, watch_delay
        self._seen: set[str] = set()  # alert keys known claimed (by this process or another)
        # tag|line key|period -> a watch task runs; True: a settle came since its last read
        self._watching: dict[str, bool] = {}

    def settled(self, policy: Policy, d: Decision, overrun: int = 0) -> None:
        """After a call's settle: start a background check of each line near a threshold."""
        spec = policy.alerts
        if spec is None:
            return
        for lim, st in zip(d.limits, d.states, strict=False):
            if not _eligible(spec, lim) or st.limit <= 0:
                continue
            bound = st.spent + st.reserved + overrun
            for t in spec.thresholds:
                if bound < t * st.limit:
                    break
                if f"{d.hold.tag}|alert:{lim.line.key}|{lim.line.period}|{t}" not in self._seen:
                    self._watch(policy, spec, d.hold.tag, lim)
                    break

    def _watch(self, policy: Policy, spec: AlertsSpec, tag: str, lim: AppliedLimit) -> None:
        watch = f"{tag}|{lim.line.key}|{lim.line.period}"
        if watch in self._watching:
            self._watching[watch] = True  # the running watch reads the line once more
            return
        self._watching[watch] = False
        self.spawn(self._check(spec, tag, lim, watch))

    async def _check(self, spec: AlertsSpec, tag: str, lim: AppliedLimit, watch: str) -> None:
        try:
            for _ in range(WATCH_ROUNDS):
                self._watching[watch] = False
                (st,) = await self.engine.store.snapshot([lim.line], tag=tag, now_ms=self.engine.clock())
                pending = await self._claim_crossed(spec, tag, lim, st)
                if not pending or (st.reserved == 0 and not self._watching[watch]):
                    return  # nothing left to cross, or nothing in flight here or elsewhere that could cross it
                if not self._watching[watch]:
                    await asyncio.sleep(self.watch_delay)
        except StoreUnavailable as e:
            log.warning("alert check of %s skipped: %s", lim.line.key, e)
        finally:
            del self._watching[watch]

    async def _claim_crossed(self, spec: AlertsSpec, tag: str, lim: AppliedLimit, st: LineState) -> bool:
        """Claim and send every threshold the settled spend crossed; True if a higher one remains."""
        for t in spec.thresholds:
            alert = alert_of(tag, lim, st, t, self.engine.clock())
            seen = f"{tag}|{alert.key}"
            if seen in self._seen:
                continue
            if st.spent < t * st.limit:
                return True
            if len(self._seen) >= SEEN_CAP:
                self._seen.clear()
            self._seen.add(seen)
            ttl = lim.line.period_ttl_s * 1000 if lim.line.window is Window.CALENDAR else TOTAL_MARK_MS
            if await self.engine.store.claim_alert(tag, alert.key, now_ms=alert.at_ms, ttl_ms=ttl):
                log.info("budget alert: %s", alert.text())
                for i, hook in enumerate(spec.webhooks):
                    self.spawn(self.deliver(spec, hook, i, alert))
        return False

    async def deliver(self, spec: AlertsSpec, hook: WebhookSpec, index: int, alert: Alert) -> bool:
        """POST `alert` to one webhook, retried with exponential backoff; recorded in the ledger."""
        delay, error = float(spec.backoff_seconds), ""
        for attempt in range(1, spec.attempts + 1):
            try:
                body, headers = request_for(hook, alert)
                status = await self.post(hook.url, body, headers, float(hook.timeout_seconds))
                if 200 <= status < 300:
                    await self._record(alert, hook, index, "alert_delivered", attempt, "")
                    return True
                error = f"HTTP {status}"
            except Exception as e:  # any failure of a webhook is retried, then recorded
                error = f"{type(e).__name__}: {e}"
            log.warning("alert %s to %s: attempt %d/%d failed (%s)", alert.key, hook.url, attempt, spec.attempts, error)
            if attempt < spec.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        await self._record(alert, hook, index, "alert_failed", spec.attempts, error)
        return False

    async def _record(self, alert: Alert, hook: WebhookSpec, index: int, source: str, attempts: int, error: str) -> None:
        meta = {
            "api": "alert", "usage_source": source, "principal": alert.budget, "request_id": alert.key,
            "alert": alert.body() | {"webhook": index, "kind": hook.kind, "attempts": attempts, "error": error},
        }  # fmt: skip
        rid = "alert-" + hashlib.sha256(f"{alert.key}|{index}".encode()).hexdigest()[:32]
        try:
            await self.engine.record(alert.tag, rid, meta)
        except StoreUnavailable as e:
            log.error("alert %s (%s) not recorded in the ledger: %s", alert.key, source, e)


def alert_of(tag: str, lim: AppliedLimit, st: LineState, threshold: Decimal, now: int) -> Alert:
    line: Line = lim.line
    return Alert(tag, lim.budget, line.key, lim.spec.window_id, line.period, threshold, st.limit, st.spent, now)

