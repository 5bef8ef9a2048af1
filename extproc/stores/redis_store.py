"""Redis and Redis Cluster stores: counters and reservations live under one
hash tag per budget tree (`xp:{tag}:…`), so a reservation is one Lua script on
one shard. Single Redis and Cluster differ only in the client object; the
scripts, key layout and parsing are shared (envoyproxy/ratelimit hides its
topology the same way).
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any, Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, TimeoutError as RedisTimeoutError

from ..errors import StoreUnavailable
from .base import LedgerEntry, Line, LineState, Outcome, ReserveResult, SettleResult, normalize_usage

REFUSAL_MEMORY_MS = 60_000
CLOSED_MEMORY_MS = 86_400_000
TAGS_KEY = "xp:tags"  # index of hash tags, so the reaper and exports can find every tree


def _script(name: str) -> str:
    return resources.files("extproc.stores").joinpath("lua", name).read_text()


def _prefix(tag: str) -> str:
    if "{" in tag or "}" in tag:
        raise ValueError(f"budget tag must not contain braces: {tag!r}")
    return f"xp:{{{tag}}}:"


def _line_json(lines: Sequence[Line]) -> str:
    return json.dumps(
        [
            [l.key, l.kind.value, l.dimension, l.limit, l.amount, l.mode.value, l.window.value, l.period, l.window_ms, l.margin, l.period_ttl_s]
            for l in lines
        ],
        separators=(",", ":"),
    )


def _parse_result(rid: str, keys: Sequence[str], replayed: bool, text: str) -> ReserveResult:
    parts = text.split(";")
    ok, blocked, retry, warned = parts[0] == "1", int(parts[1]), int(parts[2]), parts[3]
    states = []
    for key, st in zip(keys, parts[4:]):
        limit, spent, reserved = (int(x) for x in st.split(","))
        states.append(LineState(key, limit, spent, reserved))
    return ReserveResult(
        ok,
        rid,
        tuple(states),
        None if blocked < 0 else blocked,
        tuple(int(w) for w in warned.split(",")) if warned else (),
        None if retry < 0 else retry,
        replayed,
    )


class RedisStore:
    """Store on one Redis server or a Redis Cluster (pass `cluster=True`)."""

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout: float = 2.0) -> None:
        self.url = url
        if cluster:
            self._r: Any = aioredis.RedisCluster.from_url(
                url, decode_responses=True, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        else:
            self._r = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                health_check_interval=0,
                retry_on_timeout=False,
            )
        self._reserve = self._r.register_script(_script("reserve.lua"))
        self._close = self._r.register_script(_script("close.lua"))
        self._known_tags: set[str] = set()
        # redis-py's cluster client races when many tasks trigger its lazy
        # initialisation at once; initialise it once, under a lock.
        self._cluster_ready = not cluster
        self._init_lock = asyncio.Lock()

    async def _ensure_ready(self) -> None:
        async with self._init_lock:
            if not self._cluster_ready:
                await self._r.initialize()
                self._cluster_ready = True

    async def _call(self, coro_fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            if not self._cluster_ready:
                await self._ensure_ready()
            return await coro_fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {type(e).__name__}: {e}") from e

    async def _remember_tag(self, tag: str) -> None:
        if tag not in self._known_tags:
            await self._call(self._r.sadd, TAGS_KEY, tag)
            self._known_tags.add(tag)

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
        await self._remember_tag(tag)
        estimate = normalize_usage(meta.get("estimate") or {})
        replayed, text = await self._call(
            self._reserve,
            keys=[_prefix(tag)],
            args=[
                reservation_id,
                now_ms,
                ttl_ms,
                _line_json(lines),
                json.dumps(dict(meta), separators=(",", ":")),
                json.dumps(estimate, separators=(",", ":")),
                REFUSAL_MEMORY_MS,
                "0",
            ],
        )
        return _parse_result(reservation_id, [l.key for l in lines], bool(replayed), text)

    async def snapshot(self, lines: Sequence[Line], *, tag: str, now_ms: int) -> tuple[LineState, ...]:
        _, text = await self._call(
            self._reserve,
            keys=[_prefix(tag)],
            args=["", now_ms, 0, _line_json(lines), "{}", "{}", 0, "1"],
        )
        return _parse_result("", [l.key for l in lines], False, text).states

    async def _close_one(
        self, tag: str, rid: str, outcome: Outcome, usage: Mapping[str, int], now_ms: int, meta: Mapping[str, Any] | None
    ) -> SettleResult:
        found, replayed, state, charged = await self._call(
            self._close,
            keys=[_prefix(tag)],
            args=[
                rid,
                outcome.value,
                now_ms,
                json.dumps(normalize_usage(usage), separators=(",", ":")),
                json.dumps(dict(meta or {}), separators=(",", ":")),
                CLOSED_MEMORY_MS,
            ],
        )
        return SettleResult(Outcome(state), json.loads(charged), bool(replayed), bool(found))

    async def settle(
        self, tag: str, reservation_id: str, usage: Mapping[str, int], *, now_ms: int, meta: Mapping[str, Any] | None = None
    ) -> SettleResult:
        return await self._close_one(tag, reservation_id, Outcome.SETTLED, usage, now_ms, meta)

    async def release(self, tag: str, reservation_id: str, *, now_ms: int) -> SettleResult:
        return await self._close_one(tag, reservation_id, Outcome.RELEASED, {}, now_ms, None)

    async def _tags(self) -> list[str]:
        return sorted(await self._call(self._r.smembers, TAGS_KEY))

    async def expire(self, *, now_ms: int, limit: int = 100) -> int:
        done = 0
        for tag in await self._tags():
            due = await self._call(self._r.zrangebyscore, _prefix(tag) + "exp", "-inf", now_ms, start=0, num=limit)
            for rid in due:
                await self._close_one(tag, rid, Outcome.EXPIRED, {}, now_ms, None)
                done += 1
        return done

    async def adjust(self, tag: str, key: str, *, set_limit: int | None = None, credit: int = 0) -> None:
        await self._remember_tag(tag)
        p = _prefix(tag)
        if set_limit is not None:
            await self._call(self._r.set, p + "lim:" + key, set_limit)
        if credit:
            await self._call(self._r.incrby, p + "cr:" + key, credit)

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None) -> list[LedgerEntry]:
        out: list[LedgerEntry] = []
        for tag in await self._tags():
            rows = await self._call(self._r.xrange, _prefix(tag) + "ledger", min=f"{since_ms}-0", max="+")
            for seq, f in rows:
                meta = json.loads(f["meta"])
                meta.update(json.loads(f.get("extra") or "{}"))
                out.append(
                    LedgerEntry(
                        seq,
                        tag,
                        f["rid"],
                        Outcome(f["outcome"]),
                        json.loads(f["reserved"]),
                        json.loads(f["charged"]),
                        meta,
                        int(f["reserved_at"]),
                        int(f["closed_at"]),
                        tuple(json.loads(f["lines"])),
                    )
                )
        out.sort(key=lambda e: (e.closed_at_ms, e.seq))
        return out if limit is None else out[:limit]

    async def ping(self) -> None:
        await self._call(self._r.ping)

    async def close(self) -> None:
        await self._r.aclose()
