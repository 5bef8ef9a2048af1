"""Integration fixtures: real Envoy, the real service, the mock backend, real Redis.

`make_stack(policy_text, store=...)` starts an `extproc.stack.Stack` (the same
code `extproc stack` and `make demo` run) and stops it after the test.

The stacks of one pytest process (`make_stack`'s and a `shared_stack`; under xdist, one
worker's) call one mock backend process (`worker_backend`, clusters backend and
backend_small) unless a test asks for its own (`own_backend=True`, or any backend setting:
`backends`, `backend_command`, `token_delay_ms`...): the mock keeps no state a call could
leave to the next one but its hit counters, which tests reset or read as a difference, and
a worker runs one test at a time. One start fewer per stack and per module (~0.6 CPU-s:
Python, aiohttp and the o200k BPE ranks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from extproc.stack import Stack
from extproc.stores.base import LedgerEntry
from extproc.stores.embedded import EmbeddedStore
from extproc.stores.redis_store import RedisStore
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


# Stack settings that start or change the stack's own backends: a stack given one keeps them.
_BACKEND_SETTINGS = ("backends", "backend_command", "backend_ready_path", "backend_addrs", "backend_ports", "token_delay_ms")


@pytest.fixture(scope="session")
def worker_backend(tmp_path_factory) -> Iterator[Stack]:
    """The mock backend (clusters backend and backend_small, one process) that the stacks of this
    pytest process call: a Stack that runs only its backends; its `backend_ports` are what they use."""
    backends = Stack(policy="", workdir=tmp_path_factory.mktemp("mock-backend"))
    try:
        backends.start_backends()
    except Exception:
        print(f"--- mock-backend log ---\n{backends.log('mock-backend')[-4000:]}")
        backends.stop()
        raise
    yield backends
    backends.stop()


def _backend_kw(request, kw: dict) -> dict:
    """Stack settings that point a stack at the worker's mock backend, unless `kw` sets its own."""
    if kw.pop("own_backend", False) or any(k in kw for k in _BACKEND_SETTINGS):
        return kw
    shared: Stack = request.getfixturevalue("worker_backend")
    if shared.procs[0][1].poll() is not None:
        raise RuntimeError(f"the worker's mock backend exited:\n{shared.log('mock-backend')[-4000:]}")
    return {**kw, "backends": (), "backend_ports": dict(shared.backend_ports)}


@pytest.fixture
def make_stack(tmp_path: Path, request):
    stacks: list[Stack] = []

    def make(policy_text: str, *, store: str = "embedded", **kw) -> Stack:
        kw = _backend_kw(request, kw)
        policy = tmp_path / f"policy{len(stacks)}.yaml"
        policy.write_text(policy_text)
        if store == "embedded":
            store_url = f"sqlite:{tmp_path / f'budget{len(stacks)}.db'}"
        elif store == "redis":
            server = request.getfixturevalue("redis_server")
            if not stacks or stacks[-1].store != server.url:
                server.flush()  # the server is shared by the session: each test starts from empty books
            store_url = server.url
        else:
            store_url = store
        stack = Stack(policy=str(policy), store=store_url, workdir=tmp_path / f"stack{len(stacks)}", **kw)
        stacks.append(stack)
        try:
            stack.start()
        except Exception:
            for name in ("extproc", "envoy", "mock-backend"):
                print(f"--- {name} log ---\n{stack.log(name)[-4000:]}")
            raise
        return stack

    yield make
    for s in stacks:
        s.stop()


@contextlib.contextmanager
def shared_stack(request, name: str, policy_text: str, **kw) -> Iterator[Stack]:
    """A running stack (embedded store) on `policy_text` for the tests of a module that share it:
    a module-scoped fixture (its `request`) yields it. Each of those tests reads back only its own calls."""
    kw = _backend_kw(request, kw)
    d = request.getfixturevalue("tmp_path_factory").mktemp(name)
    (d / "policy.yaml").write_text(policy_text)
    with Stack(policy=str(d / "policy.yaml"), store=f"sqlite:{d / 'budget.db'}", workdir=d / "stack", **kw) as s:
        yield s


def open_store(url: str):
    if url.startswith("sqlite:"):
        return EmbeddedStore(url[len("sqlite:"):])
    return RedisStore(url)


def after(entries: list[LedgerEntry]) -> Callable[[LedgerEntry], bool]:
    """`where` for `ledger`: the entries written since `entries` was read."""
    seen = {e.seq for e in entries}
    return lambda e: e.seq not in seen


async def ledger(stack: Stack, *, expect: int = 1, timeout: float = 5.0, where: Callable[[LedgerEntry], bool] | None = None):
    """The stack's ledger, read straight from its store (what chargeback exports).

    Settlement of an aborted stream happens when Envoy closes the ext_proc
    stream, just after the client sees the end; wait until `expect` entries exist.
    `where`: only the entries it accepts (one test's calls on a stack that tests share).
    """
    store = open_store(stack.store)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            entries = [e for e in await store.ledger() if where is None or where(e)]
            if len(entries) >= expect or asyncio.get_running_loop().time() > deadline:
                return entries
            await asyncio.sleep(0.05)
    finally:
        await store.close()
