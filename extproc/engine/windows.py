"""Calendar windows: which bucket "now" falls in, and when it resets."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


_last: dict[tuple[str, str], tuple[int, int, tuple[str, int, int]]] = {}


def calendar_period(kind: str, tz: str, now_ms: int) -> tuple[str, int, int]:
    """(bucket id, reset time ms, seconds to keep the bucket) for day/week/month in `tz`."""
    hit = _last.get((kind, tz))
    if hit is not None and hit[0] <= now_ms < hit[1]:
        return hit[2]  # same bucket as the last call: no date arithmetic on the hot path
    start_ms, result = _compute(kind, tz, now_ms)
    if len(_last) > 256:
        _last.clear()
    _last[(kind, tz)] = (start_ms, result[1], result)
    return result


def _compute(kind: str, tz: str, now_ms: int) -> tuple[int, tuple[str, int, int]]:
    now = datetime.fromtimestamp(now_ms / 1000, _zone(tz))
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        start, end = midnight, midnight + timedelta(days=1)
        bucket = start.strftime("%Y-%m-%d")
    elif kind == "week":
        start = midnight - timedelta(days=now.weekday())
        end = start + timedelta(days=7)
        iso = start.isocalendar()
        bucket = f"{iso.year}-W{iso.week:02d}"
    elif kind == "month":
        start = midnight.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        bucket = start.strftime("%Y-%m")
    else:
        raise ValueError(f"not a calendar window: {kind}")
    # Re-anchor across DST changes: build the end in the zone, not by adding hours.
    end = end.replace(tzinfo=None).replace(tzinfo=_zone(tz))
    reset_ms = int(end.timestamp() * 1000)
    keep_s = int((end - start).total_seconds()) * 2
    start_ms = int(start.replace(tzinfo=None).replace(tzinfo=_zone(tz)).timestamp() * 1000)
    return start_ms, (f"{bucket}@{tz}", reset_ms, keep_s)
