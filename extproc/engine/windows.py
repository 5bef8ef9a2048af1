"""Calendar windows: which bucket "now" falls in, and when it resets."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def calendar_period(kind: str, tz: str, now_ms: int) -> tuple[str, int, int]:
    """(bucket id, reset time ms, seconds to keep the bucket) for day/week/month in `tz`."""
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
    return f"{bucket}@{tz}", reset_ms, keep_s
