"""Engine tests: a real embedded store, an injected clock, small policies built inline."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from extproc.engine.budget import Engine, Identity
from extproc.policy.model import Policy
from extproc.stores.embedded import EmbeddedStore


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms

    def set_local(self, tz: str, *args: int) -> None:
        self.now = local_ms(tz, *args)


def local_ms(tz: str, *args: int) -> int:
    return int(datetime(*args, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def make_policy(**kw: Any) -> Policy:
    return Policy.model_validate({"prices": {"models": {"m": {"input": "1", "output": "2"}}}, **kw})


ALICE = Identity("alice", team="ml", org="acme")
BOB = Identity("bob", team="ml", org="acme")


@pytest.fixture
def clock() -> Clock:
    return Clock(local_ms("UTC", 2026, 3, 2, 12, 0, 0))


@pytest.fixture
async def engine(tmp_path, clock):
    store = EmbeddedStore(tmp_path / "budget.db")
    yield Engine(store, clock=clock)
    await store.close()


def usd(x: str) -> int:
    from extproc.money import usd_to_nano

    return usd_to_nano(x)
