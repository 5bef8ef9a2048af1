"""Calendar buckets: ids, resets across DST, and the hot-path cache agrees with the computation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.engine.windows import _compute, calendar_period
from tests.engine.conftest import local_ms

ZONES = ["UTC", "America/New_York", "Europe/London", "Asia/Kolkata", "Australia/Lord_Howe", "America/Havana"]


def test_buckets_and_resets():
    ny = "America/New_York"
    assert calendar_period("day", ny, local_ms(ny, 2026, 11, 1, 12)) == ("2026-11-01@America/New_York", local_ms(ny, 2026, 11, 2), 2 * 86400)
    assert calendar_period("week", "UTC", local_ms("UTC", 2026, 1, 1, 5))[0] == "2026-W01@UTC"  # Thursday of ISO week 1
    assert calendar_period("week", "UTC", local_ms("UTC", 2026, 1, 1, 5))[1] == local_ms("UTC", 2026, 1, 5)
    assert calendar_period("month", "UTC", local_ms("UTC", 2026, 2, 28, 23, 59))[:2] == ("2026-02@UTC", local_ms("UTC", 2026, 3, 1))
    # the last millisecond of a day and the first of the next
    end = local_ms(ny, 2026, 3, 9)
    assert calendar_period("day", ny, end - 1)[0] == "2026-03-08@America/New_York"
    assert calendar_period("day", ny, end)[0] == "2026-03-09@America/New_York"


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["day", "week", "month"]),
    tz=st.sampled_from(ZONES),
    times=st.lists(st.integers(1_600_000_000_000, 1_900_000_000_000), min_size=1, max_size=20),
    steps=st.lists(st.integers(-3_600_000, 90_000_000), min_size=1, max_size=20),
)
def test_cache_matches_computation(kind, tz, times, steps):
    for t in times:
        for d in [0, *steps]:
            assert calendar_period(kind, tz, t + d) == _compute(kind, tz, t + d)[1]
