"""The shared current rate: one Redis key or one SQLite row per backend.

Kept apart from ``extproc.stores`` (whose interface is budgets and the ledger):
a rate is a last-writer-wins value plus a sampler lease, nothing atomic across
keys. Open one with ``open_rate_publisher(url)`` using the same URL as the
budget store (``sqlite:PATH``, ``journal:DIR``, ``redis://…``, ``redis+cluster://…``).

Layout. Redis: ``extproc:costrate:{<backend>}`` holds the rate as JSON (Decimals
as strings); ``extproc:costrate:{<backend>}:lease`` holds the sampling owner with
a TTL. SQLite: table ``cost_rates(backend PRIMARY KEY, data, owner, lease_until)``
in the store's file (``cost_rates.db`` in a journal store's directory).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import StoreUnavailable
from ..stores import parse_url
from .formula import CostRate

_PREFIX = "extproc:costrate:"

# Take the lease if free, renew it if ours; answer whether we hold it.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def _key(backend: str) -> str:
    return f"{_PREFIX}{{{backend}}}"


class RedisRatePublisher:
    """Rates in Redis (single node or cluster: both keys of a backend share one hash tag)."""

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout: float = 2.0) -> None:
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            self._r: Any = RedisCluster.from_url(url, socket_timeout=socket_timeout)
        else:
            from redis.asyncio import Redis

            self._r = Redis.from_url(url, socket_timeout=socket_timeout)
        self._acquire = self._r.register_script(_ACQUIRE)

    async def publish(self, rate: CostRate) -> None:
        from redis.exceptions import RedisError

        try:
            await self._r.set(_key(rate.backend), json.dumps(rate.to_json()))
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"cost rate not published: {e}") from e

    async def read(self, backend: str) -> CostRate | None:
        from redis.exceptions import RedisError

        try:
            raw = await self._r.get(_key(backend))
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"cost rate not read: {e}") from e
        return None if raw is None else CostRate.from_json(json.loads(raw))

    async def acquire(self, backend: str, owner: str, ttl_s: float) -> bool:
        from redis.exceptions import RedisError

        try:
            got = await self._acquire(keys=[_key(backend) + ":lease"], args=[owner, max(1, int(ttl_s * 1000))])
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"cost rate lease: {e}") from e
        return int(got) == 1

    async def close(self) -> None:
        await self._r.aclose()


class SQLiteRatePublisher:
    """Rates in a SQLite file (the embedded store's file works: its own table).

    Statements are single-row and indexed, so they run inline on the event loop,
    as the embedded budget store does.
    """

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self._db = sqlite3.connect(str(path), timeout=2.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS cost_rates (backend TEXT PRIMARY KEY, data TEXT, owner TEXT, lease_until REAL)"
        )
        self._clock = clock

    def _run(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cost rate store: {e}") from e

    async def publish(self, rate: CostRate) -> None:
        self._run(
            "INSERT INTO cost_rates (backend, data) VALUES (?, ?) ON CONFLICT(backend) DO UPDATE SET data = excluded.data",
            (rate.backend, json.dumps(rate.to_json())),
        )

    async def read(self, backend: str) -> CostRate | None:
        rows = self._run("SELECT data FROM cost_rates WHERE backend = ?", (backend,))
        if not rows or rows[0][0] is None:
            return None
        return CostRate.from_json(json.loads(rows[0][0]))

    async def acquire(self, backend: str, owner: str, ttl_s: float) -> bool:
        now = self._clock()
        rows = self._run(
            "INSERT INTO cost_rates (backend, owner, lease_until) VALUES (?, ?, ?) "
            "ON CONFLICT(backend) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until "
            "WHERE cost_rates.owner IS NULL OR cost_rates.owner = excluded.owner OR cost_rates.lease_until < ? "
            "RETURNING owner",
            (backend, owner, now + ttl_s, now),
        )
        return bool(rows) and rows[0][0] == owner

    async def close(self) -> None:
        self._db.close()


def open_rate_publisher(url: str) -> RedisRatePublisher | SQLiteRatePublisher:
    """The rate store at the budget store's URL."""
    kind, target = parse_url(url)
    if kind == "sqlite":
        return SQLiteRatePublisher(target)
    if kind == "journal":  # the journal store's files are its own: the rates get a SQLite file beside them
        Path(target).mkdir(parents=True, exist_ok=True)
        return SQLiteRatePublisher(Path(target) / "cost_rates.db")
    return RedisRatePublisher(target, cluster=kind == "cluster")
