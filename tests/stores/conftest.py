"""Every test in tests/stores runs against every store: embedded, journal, Redis, Redis Cluster."""

from __future__ import annotations

import uuid

import pytest
import redis

from extproc.stores.embedded import EmbeddedStore
from extproc.stores.journal import JournalStore
from extproc.stores.redis_store import RedisStore
from tests.support.redis_server import RedisCluster, RedisServer, with_redis


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster():
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["journal", *with_redis("embedded")])
async def store(request, tmp_path):
    kind = request.param
    if kind == "embedded":
        s = EmbeddedStore(tmp_path / "budget.db")
    elif kind == "journal":
        s = JournalStore(tmp_path / "journal")
    elif kind == "redis":
        server = request.getfixturevalue("redis_server")
        _flush([server.port])
        s = RedisStore(server.url)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        _flush([n.port for n in cluster.nodes])
        s = RedisStore(cluster.url, cluster=True)
    s.kind = kind  # type: ignore[attr-defined]
    yield s
    await s.close()


def _flush(ports: list[int]) -> None:
    """Each test starts from an empty Redis: the reaper and the ledger span every tree."""
    for port in ports:
        with redis.Redis(port=port) as r:
            r.flushall()


@pytest.fixture
def tag():
    """A fresh budget tree per test, so Redis-backed tests never see each other's counters."""
    return f"t{uuid.uuid4().hex[:10]}"
