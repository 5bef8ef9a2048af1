"""A reserve whose reply was lost (the store took it, then the connection dropped) is given back."""

from __future__ import annotations

import asyncio

import pytest

from extproc.engine.budget import Engine
from extproc.engine.calls import Caller, CallInput, Planner
from extproc.errors import StoreUnavailable
from extproc.protocols.schemas import schema_by_name
from extproc.stores.embedded import EmbeddedStore
from tests.engine.conftest import ALICE, make_policy


class LostReplyStore(EmbeddedStore):
    """Takes the reservation, then fails as if the connection dropped before the reply."""

    lose = True

    async def reserve(self, *a, **kw):
        result = await super().reserve(*a, **kw)
        if self.lose:
            self.lose = False
            raise StoreUnavailable("connection lost after the command was sent")
        return result


def policy():
    return make_policy(budgets=[{"scope": "key", "limits": [{"dimension": "cost", "limit": "1.00"}]}])


async def reserved(engine: Engine, pol) -> int:
    snap = await engine.snapshot_lines(pol, ALICE)
    return snap.states[0].reserved


@pytest.mark.parametrize("flat", [False, True], ids=["metered", "flat"])
async def test_a_reservation_whose_reply_was_lost_is_released_in_the_background(tmp_path, clock, flat):
    store = LostReplyStore(tmp_path / "b.db")
    engine, pol = Engine(store, clock=clock), policy()
    tasks: list[asyncio.Future] = []
    planner = Planner(engine, pol, spawn=lambda c: tasks.append(asyncio.ensure_future(c)))
    caller = Caller(ALICE, reservation_id="r1")
    with pytest.raises(StoreUnavailable):
        if flat:
            await planner.reserve_flat(caller, 1000, api="flat:/x")
        else:
            facts = schema_by_name("openai.chat").parse_request(b'{"model": "m", "max_tokens": 10, "messages": []}', max_bytes=1 << 20)
            await planner.plan(CallInput(facts, {"o200k_base": 1}), caller, api="openai.chat")
    assert await reserved(engine, pol) > 0  # the store did take it
    await asyncio.gather(*tasks)
    assert await reserved(engine, pol) == 0
    (entry,) = await store.ledger()
    assert entry.reservation_id == "r1" and entry.outcome.value == "released"
    await store.close()
