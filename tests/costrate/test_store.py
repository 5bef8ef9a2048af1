"""The shared rate store: one contract, every backend (SQLite file, Redis, Redis Cluster)."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest

from extproc.costrate import RatePublisher, RedisRatePublisher, SQLiteRatePublisher, cost_rate, open_rate_publisher
from extproc.errors import StoreUnavailable
from tests.support.redis_server import RedisCluster, RedisServer, with_redis

from .conftest import backend_spec, closed_port


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer(appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster():
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=with_redis("sqlite"))
async def pub(request, tmp_path):
    if request.param == "sqlite":
        p: RatePublisher = SQLiteRatePublisher(tmp_path / "budget.db")
    elif request.param == "redis":
        p = open_rate_publisher(request.getfixturevalue("redis_server").url)
    else:
        p = open_rate_publisher("redis+cluster://" + request.getfixturevalue("redis_cluster").url[len("redis://"):])
    yield p
    await p.close()


def rate(backend: str, watts: str = "300", tph: int | None = 1_000_000):
    return cost_rate(backend, backend_spec(), power_watts=Decimal(watts), tokens_per_hour=tph, sampled_at=1234.5)


def fresh() -> str:
    return f"b-{uuid.uuid4().hex[:8]}"


async def test_publish_then_read_is_exact_and_last_writer_wins(pub):
    b = fresh()
    assert await pub.read(b) is None
    first = rate(b, "300")
    await pub.publish(first)
    assert await pub.read(b) == first
    second = cost_rate(b, backend_spec(), power_watts=None, tokens_per_hour=None, sampled_at=2000.0, reason="down")
    await pub.publish(second)
    got = await pub.read(b)
    assert got == second and got.source == "tdp_fallback" and got.reason == "down"
    assert await pub.read(fresh()) is None


async def test_lease_has_one_holder_and_renews(pub):
    b = fresh()
    assert await pub.acquire(b, "pod-a", 30)
    assert not await pub.acquire(b, "pod-b", 30)
    assert await pub.acquire(b, "pod-a", 30)  # renewal by the holder
    assert await pub.acquire(fresh(), "pod-b", 30)  # other backends are independent


@pytest.mark.integration
async def test_lease_expires(redis_server, tmp_path):
    clock = Clock()
    sqlite = SQLiteRatePublisher(tmp_path / "lease.db", clock=clock)
    redis = RedisRatePublisher(redis_server.url)
    try:
        b = fresh()
        assert await sqlite.acquire(b, "pod-a", 10)
        clock.now += 9
        assert not await sqlite.acquire(b, "pod-b", 10)
        clock.now += 2
        assert await sqlite.acquire(b, "pod-b", 10)
        assert not await sqlite.acquire(b, "pod-a", 10)

        assert await redis.acquire(b, "pod-a", 0.2)
        assert not await redis.acquire(b, "pod-b", 0.2)
        await asyncio.sleep(0.3)  # Redis keeps its own time: let the 200 ms lease lapse
        assert await redis.acquire(b, "pod-b", 0.2)
    finally:
        await sqlite.close()
        await redis.close()


async def test_two_connections_to_one_sqlite_file_share_the_value(tmp_path):
    a, b = SQLiteRatePublisher(tmp_path / "x.db"), SQLiteRatePublisher(tmp_path / "x.db")
    try:
        r = rate("gpu")
        await a.publish(r)
        assert await b.read("gpu") == r
    finally:
        await a.close()
        await b.close()


async def test_unreachable_redis_is_store_unavailable():
    p = RedisRatePublisher(f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await p.read("gpu")
        with pytest.raises(StoreUnavailable):
            await p.publish(rate("gpu"))
        with pytest.raises(StoreUnavailable):
            await p.acquire("gpu", "me", 1)
    finally:
        await p.close()


async def test_store_urls(tmp_path):
    assert isinstance(open_rate_publisher("redis://127.0.0.1:1/0"), RedisRatePublisher)
    beside = open_rate_publisher(f"journal:{tmp_path}/j")  # a journal store's directory: a file of its own
    assert isinstance(beside, SQLiteRatePublisher) and (tmp_path / "j" / "cost_rates.db").exists()
    await beside.close()
    with pytest.raises(ValueError, match="unknown store URL"):
        open_rate_publisher("memcached://x")
