"""RecentStates keeps only what can still be read: entries past their ttl leave on the next put."""

from __future__ import annotations

from typing import Any

from extproc.engine.budget import Identity
from extproc.engine.recent import RecentStates


def _who(name: str) -> Identity:
    return Identity(principal=name)


def test_stale_entries_leave_on_the_next_put_and_fresh_ones_stay_readable():
    recent = RecentStates(ttl_ms=1000, size=50_000)
    d: Any = object()  # the log stores decisions as they are
    for i in range(100):
        recent.put(_who(f"p{i}"), None, d, now_ms=0)
    assert len(recent) == 100 and recent.get(_who("p7"), None, now_ms=1000) is d
    recent.put(_who("late"), "run-1", d, now_ms=1001)  # every earlier entry is past the ttl now
    assert len(recent) == 1
    assert recent.get(_who("p7"), None, now_ms=1001) is None
    assert recent.get(_who("late"), "run-1", now_ms=1500) is d


def test_a_refreshed_entry_moves_to_the_young_end_and_the_size_still_bounds():
    recent = RecentStates(ttl_ms=1000, size=3)
    d: Any = object()
    recent.put(_who("a"), None, d, now_ms=0)
    recent.put(_who("b"), None, d, now_ms=500)
    recent.put(_who("a"), None, d, now_ms=900)  # refreshed: now younger than b
    recent.put(_who("c"), None, d, now_ms=1200)  # b (500) is still within the ttl: kept
    assert len(recent) == 3
    recent.put(_who("d"), None, d, now_ms=1300)  # over the size: the oldest (b) goes
    assert recent.get(_who("b"), None, now_ms=1300) is None and recent.get(_who("a"), None, now_ms=1300) is d
    assert len(recent) == 3
