"""Redis and Redis Cluster stores: counters and reservations live under one
hash tag per budget tree (`xp:{tag}:…`), so a reservation is one Lua script on
one shard: one EVALSHA round trip per reserve and per settle. Single Redis and
Cluster differ only in the client object; the scripts, key layout and parsing
are shared (envoyproxy/ratelimit hides its topology the same way).

Key layout under the prefix `xp:{tag}:` for a line key `K` (the embedded
store's `kv` names in brackets):

    lim:K low:K cr:K r:K s:K|P t0:K   strings (as embedded)
    e:K  zset of rolling charges (member "rid:ts:amount", score ts)   es:K their sum
    resv:<id>  hash: a reservation (state, result, lines, meta, estimate, until)
    exp        zset: reserved ids by TTL deadline (the reaper's queue)
    run:<key>  hash: a run (state, owner, created_at, seen_at, expires_at, lines)
    ra:<owner> zset: the owner's runs by expiry (the active-run cap)
    rp         zset: runs by purge time
    ledger     stream: one entry per settle / release / expiry

Failures: any connection error or timeout becomes `StoreUnavailable` within
the socket timeout; the client reconnects by itself once Redis is back (one
immediate retry on a fresh connection covers pooled sockets that died).
"""

from __future__ import annotations

import asyncio
from . import _json as json
from importlib import resources
from typing import Any, Mapping, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, TimeoutError as RedisTimeoutError

from ..errors import StoreUnavailable
from .base import (
    CLOSED_MEMORY_MS,
    REFUSAL_MEMORY_MS,
    LedgerEntry,
    Line,
    LineState,
    Outcome,
    ReserveResult,
    RunRef,
    RunRefusal,
    RunState,
    SettleResult,
    normalize_usage,
    run_state_of,
    usage_of_lines,
)

TAGS_KEY = "xp:tags"  # index of hash tags, so the reaper and exports can find every tree
PURGE_RETRY_MS = 60_000


def _script(name: str) -> str:
    return resources.files("extproc.stores").joinpath("lua", name).read_text()


def _prefix(tag: str) -> str:
    if "{" in tag or "}" in tag:
        raise ValueError(f"budget tag must not contain braces: {tag!r}")
    return f"xp:{{{tag}}}:"


def _lines_json(lines: Sequence[Line]) -> str:
    return json.dumps(
        [
            [
                l.key, l.kind.value, l.dimension, l.limit, l.amount, l.mode.value, l.window.value, l.period,
                l.window_ms, l.margin, l.period_ttl_s, int(l.run), -1 if l.lower is None else l.lower,
            ]
            for l in lines
        ]
    )  # fmt: skip


def _run_args(run: RunRef | None, lines: Sequence[Line]) -> tuple[str, str]:
    if run is None:
        return "", "[]"
    return (
        json.dumps([run.key, run.owner, run.ttl_ms, run.max_active, run.memory_ms]),
        json.dumps([l.key for l in lines if l.run]),
    )


def _parse_result(rid: str, keys: Sequence[str], replayed: bool, text: str) -> ReserveResult:
    parts = text.split(";")
    ok, blocked, retry, warned, reason, active = parts[0] == "1", int(parts[1]), int(parts[2]), parts[3], parts[4], int(parts[5])
    states = []
    for key, st in zip(keys, parts[6:]):
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
        RunRefusal(reason) if reason else None,
        None if active < 0 else active,
    )


class RedisStore:
    """Store on one Redis server or a Redis Cluster (pass `cluster=True`)."""

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout: float = 2.0, max_connections: int = 256) -> None:
        self.url = url
        if cluster:
            self._r: Any = aioredis.RedisCluster.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                max_connections=max_connections,
                retry=Retry(NoBackoff(), 1),
            )
        else:
            self._r = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                health_check_interval=0,
                max_connections=max_connections,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        self._reserve = self._r.register_script(_script("reserve.lua"))
        self._close = self._r.register_script(_script("close.lua"))
        self._admin = self._r.register_script(_script("admin.lua"))
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
        except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(f"redis {self.url}: {type(e).__name__}: {e}") from e
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
        run: RunRef | None = None,
    ) -> ReserveResult:
        await self._remember_tag(tag)
        estimate = normalize_usage(meta.get("estimate") or usage_of_lines(lines))
        run_json, run_lines = _run_args(run, lines)
        replayed, text = await self._call(
            self._reserve,
            keys=[_prefix(tag)],
            args=[
                reservation_id,
                now_ms,
                ttl_ms,
                _lines_json(lines),
                json.dumps(dict(meta)),
                json.dumps(estimate),
                REFUSAL_MEMORY_MS,
                "0",
                run_json,
                run_lines,
            ],
        )
        return _parse_result(reservation_id, [l.key for l in lines], bool(replayed), text)

    async def check(self, tag: str, lines: Sequence[Line], *, now_ms: int, run: RunRef | None = None) -> ReserveResult:
        run_json, run_lines = _run_args(run, lines)
        _, text = await self._call(
            self._reserve,
            keys=[_prefix(tag)],
            args=["", now_ms, 0, _lines_json(lines), "{}", "{}", 0, "1", run_json, run_lines],
        )
        return _parse_result("", [l.key for l in lines], False, text)

    async def snapshot(self, lines: Sequence[Line], *, tag: str, now_ms: int) -> tuple[LineState, ...]:
        return (await self.check(tag, lines, now_ms=now_ms)).states

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
                json.dumps(normalize_usage(usage)),
                json.dumps(dict(meta or {})),
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
        """Settle reservations past their TTL at the reserved amount (at most `limit`), purge forgotten runs."""
        done = 0
        for tag in await self._tags():
            p = _prefix(tag)
            if done < limit:
                due = await self._call(self._r.zrangebyscore, p + "exp", "-inf", now_ms, start=0, num=limit - done)
                for rid in due:
                    await self._close_one(tag, rid, Outcome.EXPIRED, {}, now_ms, None)
                    done += 1
            await self._call(self._admin, keys=[p], args=["purge", now_ms, limit, PURGE_RETRY_MS])
        return done

    async def adjust(self, tag: str, key: str, *, set_limit: int | None = None, credit: int = 0) -> None:
        await self._remember_tag(tag)
        await self._call(
            self._admin, keys=[_prefix(tag)], args=["adjust", key, "" if set_limit is None else int(set_limit), int(credit)]
        )

    async def run_state(self, tag: str, run_key: str, *, now_ms: int) -> RunState | None:
        r = await self._call(self._admin, keys=[_prefix(tag)], args=["run_state", run_key])
        return _run_state(run_key, r, now_ms)

    async def close_run(self, tag: str, run: RunRef, *, now_ms: int) -> RunState:
        await self._remember_tag(tag)
        r = await self._call(self._admin, keys=[_prefix(tag)], args=["close_run", run.key, run.owner, now_ms, run.memory_ms])
        st = _run_state(run.key, r, now_ms)
        assert st is not None
        return st

    async def ledger(self, *, since_ms: int = 0, limit: int | None = None, tag: str | None = None) -> list[LedgerEntry]:
        out: list[LedgerEntry] = []
        for tg in [tag] if tag is not None else await self._tags():
            rows = await self._call(self._r.xrange, _prefix(tg) + "ledger", min="-", max="+")
            for seq, f in rows:
                closed_at = int(f["closed_at"])
                if closed_at < since_ms:
                    continue
                meta = json.loads(f["meta"])
                meta.update(json.loads(f.get("extra") or "{}"))
                lines = json.loads(f["lines"])
                out.append(
                    LedgerEntry(
                        seq,
                        tg,
                        f["rid"],
                        Outcome(f["outcome"]),
                        json.loads(f["reserved"]),
                        json.loads(f["charged"]),
                        meta,
                        int(f["reserved_at"]),
                        closed_at,
                        tuple(lines) if isinstance(lines, list) else (),
                    )
                )
        out.sort(key=lambda e: (e.closed_at_ms, tuple(int(x) for x in e.seq.split("-"))))
        return out if limit is None else out[:limit]

    async def ping(self) -> None:
        await self._call(self._r.ping)

    async def close(self) -> None:
        await self._r.aclose()


def _run_state(key: str, r: Sequence[Any], now_ms: int) -> RunState | None:
    if not r:
        return None
    owner, state, created, seen, expires = r
    return run_state_of(key, owner, state, int(created), int(seen), int(expires), now_ms)
