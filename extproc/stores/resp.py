"""One pipelined Redis connection for the store's scripts (reserve, extend, close: every call's hot path).

Why not redis-py here: each command through redis-py's asyncio client takes a
connection from its pool, encodes every argument in Python, goes through its
retry wrapper and back: ~100 µs of CPU, twice per call (`python -m
bench.callcost --store redis://... --cprofile`). Redis answers in order, so
one connection carries every call in flight: a command is packed by hiredis
(C), written, and its future queued; replies, parsed by hiredis, resolve the
futures in the same order.

Same failure rules as the rest of the store: a connection that fails or a
reply that does not come within the socket timeout fails every command in
flight on it (the store turns that into StoreUnavailable: fail closed), and
each command is tried once more on a fresh connection, as redis-py's client
was configured to. Redis errors (a script's error, NOSCRIPT) are
`ResponseError`, as from redis-py. Plain `redis://` and `unix://` URLs only;
TLS and Cluster stay on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ResponseError


class ConnectionLost(ConnectionError):
    """The connection failed or timed out: every command in flight on it failed."""


def supported(url: str) -> bool:
    return urlsplit(url).scheme in ("redis", "unix")


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods)
        self.transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.lost or self.transport is None:
            raise ConnectionLost("connection closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append((fut, time.monotonic()))
        self.transport.write(packed)
        if self._timer is None:
            self._timer = loop.call_later(self.timeout, self._check)
        return fut

    def _check(self) -> None:
        """Replies come in order: if the oldest command has waited the timeout, the connection is stuck."""
        self._timer = None
        if not self.waiting or self.lost:
            return
        waited = time.monotonic() - self.waiting[0][1]
        if waited >= self.timeout:
            self._fail(ConnectionLost(f"no reply within {self.timeout} s"))
            if self.transport is not None:
                self.transport.abort()
            return
        self._timer = asyncio.get_running_loop().call_later(self.timeout - waited, self._check)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self._fail(ConnectionLost("unexpected reply"))
                if self.transport is not None:
                    self.transport.abort()
                return
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection lost: {exc}" if exc else "connection closed by Redis"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(error)


class Pipelined:
    """Commands over one shared connection, opened (and reopened) on demand."""

    def __init__(self, url: str, *, timeout: float) -> None:
        opts = parse_url(url)
        self._path: str | None = opts.get("path")
        self._host, self._port = opts.get("host", "localhost"), int(opts.get("port", 6379))
        self._db = int(opts.get("db") or 0)
        self._username, self._password = opts.get("username"), opts.get("password")
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._opening: asyncio.Future[_Connection] | None = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self.timeout)

        async def connect() -> None:
            if self._path is not None:
                await loop.create_unix_connection(lambda: conn, self._path)
            else:
                await loop.create_connection(lambda: conn, self._host, self._port)
            if self._password is not None:
                auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                _check(await conn.send(_pack(auth)))
            if self._db:
                _check(await conn.send(_pack(("SELECT", self._db))))

        try:
            await asyncio.wait_for(connect(), self.timeout)
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        return conn

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        if self._opening is None:  # one connect at a time; every caller waits for it
            self._opening = asyncio.ensure_future(self._open())
        opening = self._opening
        try:
            conn = await asyncio.shield(opening)
        finally:
            if self._opening is opening and opening.done():
                self._opening = None
        self._conn = conn
        return conn

    async def execute(self, *args: Any) -> Any:
        packed = _pack(args)
        for attempt in (0, 1):
            conn = await self._connection()
            try:
                return _check(await conn.send(packed))
            except ConnectionLost:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None


def _pack(args: Sequence[Any]) -> bytes:
    packed: bytes = hiredis.pack_command(tuple(args))
    return packed


def _check(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        raise ResponseError(str(reply))
    return reply


class Script:
    """EVALSHA of a script over the pipelined connection; EVAL (which also caches it) when Redis lacks it."""

    def __init__(self, client: Pipelined, text: str) -> None:
        self.client, self.text = client, text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
            return await self.client.execute("EVAL", self.text, len(keys), *keys, *args)
