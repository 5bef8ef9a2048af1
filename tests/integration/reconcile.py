"""After a fault: the ledger reconciles with the counters, and nothing stays reserved."""

from __future__ import annotations

import asyncio
import functools
import os

from extproc.engine.budget import Engine, Identity
from extproc.policy.loader import load_policy
from extproc.policy.model import Policy
from extproc.stack import Stack
from tests.integration.conftest import open_store


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> Policy:
    return load_policy(path)


def policy_of(stack: Stack) -> Policy:
    """The stack's policy file, parsed once per version of it (the security module reconciles
    after each of its ~460 tests)."""
    st = os.stat(stack.policy)
    return _load(stack.policy, st.st_mtime_ns, st.st_size)


async def reconcile(stack: Stack, *, timeout: float = 15.0, within_limits: bool = False) -> dict[str, tuple[int, int]]:
    """Wait until no cost line holds a reservation, then check sum(ledger charges) == spent per line.

    Returns {line key: (spent, ledger sum)}. Expired reservations count: the
    reaper settles them at their reserved amount and the ledger says so.
    `within_limits` also checks spent <= limit on every line (hard-gate policies).
    """
    policy = policy_of(stack)
    store = open_store(stack.store or "")
    engine = Engine(store)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await store.expire(now_ms=engine.clock())  # what any live service's reaper does
            entries = await store.ledger()
            lines = []
            for key in policy.keys:
                who = Identity.from_key(key)
                runs = {e.meta.get("run") for e in entries if e.meta.get("principal") == who.principal}
                for run in runs:
                    for lim in engine.limits_for(policy, who, run, {}, engine.clock()):
                        if lim.spec.dimension == "cost":
                            lines.append((who.tag, lim.line))
            states = []
            for tag, line in lines:
                (st,) = await store.snapshot([line], tag=tag, now_ms=engine.clock())
                states.append((tag, line, st))
            if all(st.reserved == 0 for _, _, st in states) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        out = {}
        for tag, line, st in states:
            total = sum(e.charged.get("cost", 0) for e in entries if line.key in e.lines and e.tag == tag)
            out[line.key] = (st.spent, total)
            assert st.reserved == 0, f"{line.key}: {st.reserved} still reserved past the TTL"
            assert st.spent == total, f"{line.key}: spent {st.spent} != ledger {total}"
            assert not within_limits or st.spent <= st.limit, f"{line.key}: spent {st.spent} > limit {st.limit}"
        return out
    finally:
        await store.close()
