"""Redis and Redis Cluster stores: counters and reservations live under one
hash tag per budget tree (`xp:{tag}:…`), so a reservation is one Lua script on
one shard: one EVALSHA round trip per reserve, per extension and per settle. Single Redis and
Cluster differ only in the client object; the scripts, key layout and parsing
are shared (envoyproxy/ratelimit hides its topology the same way).

Key layout under the prefix `xp:{tag}:` for a line key `K` (the embedded
store's `kv` names in brackets):

    lim:K low:K cr:K r:K s:K|P t0:K   strings (as embedded)
    e:K  zset of rolling charges (member "rid:ts:amount", score ts)   es:K their sum
    resv:<id>  hash: a reservation (state, result, lines, meta, estimate, run, until)
    exp        zset: reserved ids by TTL deadline (the reaper's queue)
    run:<key>  hash: a run (state, owner, created_at, seen_at, expires_at, lines)
    ra:<owner> zset: the owner's runs by expiry (the active-run cap)
    rp         zset: runs by purge time
    ledger     stream: one entry per settle / release / expiry, read in pages
               (XRANGE COUNT), trimmed by the reaper past the policy's retention

Failures: any connection error or timeout becomes `StoreUnavailable` within
the socket timeout; the client reconnects by itself once Redis is back (one
immediate retry on a fresh connection covers pooled sockets that died).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import StoreUnavailable
from . import _json as json
from . import redacted, resp
from .base import (
    CLOSED_MEMORY_MS,
    REFUSAL_MEMORY_MS,
    ExtendResult,
    LedgerEntry,
    Line,
    LineState,
    Outcome,
    ReserveResult,
    RunRef,
    RunRefusal,
    RunState,
    SettleResult,
    chain_json,
    extension_delta,
    normalize_usage,
    own_line_keys,
    run_state_of,
    usage_of_lines,
)
from .wire import PURGE_RETRY_MS, lines_json, lua_prelude

TAGS_KEY = "xp:tags"  # index of hash tags, so the reaper and exports can find every tree
LEDGER_PAGE = 1000  # XRANGE COUNT: a stream is never read whole


def _lua(name: str) -> str:
    return resources.files("extproc.stores").joinpath("lua", name).read_text()


def rules_lua() -> str:
    """The wire prelude and the shared rules: what every script starts with."""
    return lua_prelude() + _lua("rules.lua")


def script(name: str) -> str:
    """A script as Redis runs it: the wire prelude, the shared rules, the line readers, then the script itself."""
    return rules_lua() + _lua("lines.lua") + _lua(name)


def _prefix(tag: str) -> str:
    if "{" in tag or "}" in tag:
        raise ValueError(f"budget tag must not contain braces: {tag!r}")
    return f"xp:{{{tag}}}:"


def _run_args(run: RunRef | None, lines: Sequence[Line]) -> tuple[str, str, str]:
    if run is None:
        return "", "[]", ""
    return (
        json.dumps([run.key, run.owner, run.ttl_ms, run.max_active, run.memory_ms]),
        json.dumps(own_line_keys(run, lines)),
        chain_json(run),
    )


def _parse_result(rid: str, keys: Sequence[str], replayed: bool, text: str) -> ReserveResult:
    parts = text.split(";")
    ok, blocked, retry, warned, reason, active = parts[0] == "1", int(parts[1]), int(parts[2]), parts[3], parts[4], int(parts[5])
    states = []
    for key, st in zip(keys, parts[6:], strict=False):
        limit, spent, reserved = (int(x) for x in st.split(","))
        states.append(LineState(key, limit, spent, reserved))
    deadline = int(parts[6 + len(keys)]) if len(parts) > 6 + len(keys) else -1  # absent in older results
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
        None if deadline < 0 else deadline,
    )


def _parse_extend(reply: Sequence[str]) -> ExtendResult:
    ok, found, blocked, reason, deadline = reply[0].split(";")
    states = []
    for i in range(1, len(reply), 2):
        limit, spent, reserved = (int(x) for x in reply[i + 1].split(","))
        states.append(LineState(reply[i], limit, spent, reserved))
    return ExtendResult(
        ok == "1",
        found == "1",
        tuple(states),
        None if int(blocked) < 0 else int(blocked),
        RunRefusal(reason) if reason else None,
        None if int(deadline) < 0 else int(deadline),
    )


class RedisStore:
    """Store on one Redis server or a Redis Cluster (pass `cluster=True`)."""

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout: float = 2.0, max_connections: int = 256) -> None:
        self.url = redacted(url)  # what errors and logs show: never the password
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
        # The scripts (every call's reserve and settle) go over one pipelined connection (resp.py says why);
        # TLS and Cluster keep redis-py's client for them too.
        self._pipelined = None if cluster or not resp.supported(url) else resp.Pipelined(url, timeout=socket_timeout)
        register = self._r.register_script if self._pipelined is None else partial(resp.Script, self._pipelined)
        self._reserve = register(script("reserve.lua"))
        self._close = register(script("close.lua"))
        self._extend = register(script("extend.lua"))
        self._admin = register(script("admin.lua"))
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

    async def _call(self, coro_fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Await one client call (replies are untyped RESP values); connection errors → StoreUnavailable."""
        try:
            if not self._cluster_ready:
                await self._ensure_ready()
            return await coro_fn(*args, **kwargs)
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as e:
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
        run_json, run_lines, chain = _run_args(run, lines)
        replayed, text = await self._call(
            self._reserve,
            keys=[_prefix(tag)],
            args=[
                reservation_id,
                now_ms,
                ttl_ms,
                lines_json(lines),
                json.dumps(dict(meta)),
                json.dumps(estimate),
                REFUSAL_MEMORY_MS,
                "0",
                run_json,
                run_lines,
                chain,
            ],
        )
        return _parse_result(reservation_id, [l.key for l in lines], bool(replayed), text)

    async def extend(
        self, tag: str, reservation_id: str, delta: Mapping[str, int], *, now_ms: int, ttl_ms: int
    ) -> ExtendResult:
        """One EVALSHA of extend.lua: check, grow and re-arm the TTL in one step (not idempotent)."""
        reply = await self._call(
            self._extend, keys=[_prefix(tag)], args=[reservation_id, now_ms, ttl_ms, json.dumps(extension_delta(delta))]
        )
        return _parse_extend(reply)

    async def check(self, tag: str, lines: Sequence[Line], *, now_ms: int, run: RunRef | None = None) -> ReserveResult:
        run_json, run_lines, chain = _run_args(run, lines)
        _, text = await self._call(
            self._reserve,
            keys=[_prefix(tag)],
            args=["", now_ms, 0, lines_json(lines), "{}", "{}", 0, "1", run_json, run_lines, chain],
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
            after = None
            while True:
                page, after = await self._ledger_tag(tg, since_ms, after, LEDGER_PAGE)
                out += page
                if after is None:
                    break
        out.sort(key=lambda e: (e.closed_at_ms, tuple(int(x) for x in e.seq.split("-"))))
        return out if limit is None else out[:limit]

    async def _ledger_tag(self, tag: str, since_ms: int, after: str | None, count: int) -> tuple[list[LedgerEntry], str | None]:
        """One XRANGE page of one tree's stream: its entries closed at or after `since_ms`, and the
        id to continue after (None at the end of the stream)."""
        rows = await self._call(self._r.xrange, _prefix(tag) + "ledger", min="-" if after is None else f"({after}", max="+", count=count)
        entries = [e for e in (_entry(tag, seq, f) for seq, f in rows) if e.closed_at_ms >= since_ms]
        return entries, (rows[-1][0] if len(rows) == count else None)

    async def ledger_page(
        self, *, since_ms: int = 0, after: str | None = None, limit: int = 1000
    ) -> tuple[list[LedgerEntry], str | None]:
        """Up to `limit` entries closed at or after `since_ms`, tree by tree in stream order, after
        the cursor `after`; and the cursor of the next page (None at the end)."""
        tag, stream_id = json.loads(after) if after else (None, None)
        out: list[LedgerEntry] = []
        for tg in await self._tags():
            if tag is not None and tg < tag:
                continue
            sid = stream_id if tg == tag else None
            while True:
                page, sid = await self._ledger_tag(tg, since_ms, sid, limit - len(out))
                out += page
                if sid is None:
                    break
                if len(out) >= limit:
                    return out, json.dumps([tg, sid])
        return out, None

    async def trim_ledger(self, *, before_ms: int, limit: int = 10_000) -> int:
        """Drop the oldest entries of every tree closed before `before_ms` (up to `limit` per tree)."""
        dropped = 0
        for tag in await self._tags():
            dropped += await self._call(self._admin, keys=[_prefix(tag)], args=["trim_ledger", before_ms, limit])
        return dropped

    async def lead(self, name: str, owner: str, *, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew the lease `name` for `owner` until now + ttl; False while another owner holds it."""
        key = f"xp:lease:{{{name}}}"
        return bool(await self._call(self._admin, keys=[key], args=["lease", owner, now_ms, ttl_ms]))

    async def claim_alert(self, tag: str, key: str, *, now_ms: int, ttl_ms: int) -> bool:
        """SET NX PX on one key of the tree (Redis's clock expires it)."""
        return bool(await self._call(self._r.set, f"{_prefix(tag)}alert:{key}", now_ms, nx=True, px=ttl_ms))

    async def ping(self) -> None:
        await self._call(self._r.ping)

    async def close(self) -> None:
        if self._pipelined is not None:
            await self._pipelined.close()
        await self._r.aclose()


def _entry(tag: str, seq: str, f: Mapping[str, str]) -> LedgerEntry:
    meta = json.loads(f["meta"])
    meta.update(json.loads(f.get("extra") or "{}"))
    lines = json.loads(f["lines"])
    return LedgerEntry(
        seq,
        tag,
        f["rid"],
        Outcome(f["outcome"]),
        json.loads(f["reserved"]),
        json.loads(f["charged"]),
        meta,
        int(f["reserved_at"]),
        int(f["closed_at"]),
        tuple(lines) if isinstance(lines, list) else (),
    )


def _run_state(key: str, r: Sequence[Any], now_ms: int) -> RunState | None:
    if not r:
        return None
    owner, state, created, seen, expires, chain = (*r, None)[:6]
    return run_state_of(key, owner, state, int(created), int(seen), int(expires), now_ms, chain)
