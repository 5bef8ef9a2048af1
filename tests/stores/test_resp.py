"""stores/resp.py against a real redis-server: pipelined order, AUTH and SELECT from the URL, NOSCRIPT,
a restarted server, and a server that never answers (the timeout fails the calls, then a fresh connection)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from redis.exceptions import ResponseError

from extproc.stores import resp
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    s = RedisServer(appendonly=False, args=("--requirepass", "s3cret")).start()
    yield s
    s.stop()


def _url(server: RedisServer, db: int = 0) -> str:
    return f"redis://:s3cret@127.0.0.1:{server.port}/{db}"


async def test_pipelined_commands_resolve_in_order_and_auth_select_apply(server):
    client = resp.Pipelined(_url(server, 3), timeout=2)
    try:
        replies = await asyncio.gather(*(client.execute("INCR", "n") for _ in range(500)))
        assert sorted(replies) == list(range(1, 501)) and replies == sorted(replies)  # in order, none lost
        assert await client.execute("CLIENT", "INFO") is not None
        assert "db=3" in await client.execute("CLIENT", "INFO")
        with pytest.raises(ResponseError):
            await client.execute("INCR", "no", "such", "arity")
        assert await client.execute("GET", "n") == "500"  # an error reply leaves the pipeline in step
    finally:
        await client.close()
    wrong = resp.Pipelined(f"redis://:nope@127.0.0.1:{server.port}/0", timeout=2)
    with pytest.raises(ResponseError):
        await wrong.execute("PING")


async def test_scripts_load_themselves_when_redis_has_forgotten_them(server):
    client = resp.Pipelined(_url(server), timeout=2)
    try:
        script = resp.Script(client, "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
        await client.execute("SCRIPT", "FLUSH")
        assert await script(["k"], ["a", 41]) == ["k", "a", 42]  # NOSCRIPT, then EVAL
        assert await script(["k"], ["b", 1]) == ["k", "b", 2]  # EVALSHA from now on
        failing = resp.Script(client, "return redis.error_reply('nope')")
        with pytest.raises(ResponseError, match="nope"):
            await failing([], [])
    finally:
        await client.close()


async def test_a_dropped_connection_is_retried_once_and_a_dead_server_fails_closed(server):
    client, other = resp.Pipelined(_url(server), timeout=2), resp.Pipelined(_url(server), timeout=2)
    try:
        mine = await client.execute("CLIENT", "ID")
        blocked = asyncio.ensure_future(client.execute("BLPOP", "never", 1))  # in flight when its connection goes
        await asyncio.sleep(0.1)
        assert await other.execute("CLIENT", "KILL", "ID", mine) == 1
        assert await blocked is None  # tried again on a fresh connection, where BLPOP timed out
        assert await client.execute("CLIENT", "ID") != mine
        await asyncio.to_thread(server.kill)
        with pytest.raises(ConnectionError):
            await client.execute("PING")  # the retry meets no server either: fail, no hang
        await asyncio.to_thread(server.start)
        assert await client.execute("PING") == "PONG"  # reconnects without being told
    finally:
        await client.close()
        await other.close()


async def test_a_server_that_never_answers_fails_within_the_timeout():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    client = resp.Pipelined(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    try:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionError, match="no reply within"):
            await asyncio.gather(*(client.execute("PING") for _ in range(3)))
        assert asyncio.get_running_loop().time() - t0 < 1.5  # tried twice: two timeouts, not more
    finally:
        await client.close()
        silent.close()


def test_commands_run_on_uvloop(server):
    """`extproc serve` runs on uvloop when it is installed, whose transports are not asyncio.Transport
    subclasses: the connection once failed an isinstance check there, and so did every call."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[object]:
        client = resp.Pipelined(_url(server, 5), timeout=2)
        try:
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            await client.execute("DEL", "uv")
            return list(await asyncio.gather(*(client.execute("INCR", "uv") for _ in range(50))))
        finally:
            await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == list(range(1, 51))
