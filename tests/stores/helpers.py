"""Line builders and small readers shared by the store contract tests."""

from __future__ import annotations

from typing import Any

from extproc.stores.base import Kind, Line, LineState, Mode, Window

NOW = 1_700_000_000_000  # every test drives the store's clock explicitly
TTL = 60_000


def cost(key: str, limit: int, amount: int = 0, **kw: Any) -> Line:
    return Line(key=key, kind=Kind.COUNTER, dimension="cost", limit=limit, amount=amount, **kw)


def counter(key: str, dimension: str, limit: int, amount: int = 0, **kw: Any) -> Line:
    return Line(key=key, kind=Kind.COUNTER, dimension=dimension, limit=limit, amount=amount, **kw)


def concurrency(key: str, limit: int, **kw: Any) -> Line:
    return Line(key=key, kind=Kind.CONCURRENCY, dimension="concurrency", limit=limit, amount=1, **kw)


def duration(key: str, limit_s: int, **kw: Any) -> Line:
    return Line(key=key, kind=Kind.DURATION, dimension="duration", limit=limit_s, amount=0, **kw)


def rolling(key: str, limit: int, amount: int = 0, window_ms: int = 60_000, **kw: Any) -> Line:
    return cost(key, limit, amount, window=Window.ROLLING, window_ms=window_ms, **kw)


def calendar(key: str, limit: int, amount: int, period: str, **kw: Any) -> Line:
    return cost(key, limit, amount, window=Window.CALENDAR, period=period, period_ttl_s=2 * 86400, **kw)


def mode(line: Line, m: Mode, margin: int = 0) -> Line:
    from dataclasses import replace

    return replace(line, mode=m, margin=margin)


async def state(store, tag: str, line: Line, now: int = NOW) -> LineState:
    (st,) = await store.snapshot([line], tag=tag, now_ms=now)
    return st


async def spent_reserved(store, tag: str, line: Line, now: int = NOW) -> tuple[int, int]:
    st = await state(store, tag, line, now)
    return st.spent, st.reserved


async def entries(store, tag: str, rid: str | None = None) -> list:
    out = await store.ledger(tag=tag)
    return [e for e in out if rid is None or e.reservation_id == rid]


async def take(store, tag: str, rid: str, lines, now: int = NOW, *, ttl: int = TTL, meta=None, run=None):
    return await store.reserve(tag, rid, list(lines), now_ms=now, ttl_ms=ttl, meta=meta or {}, run=run)
