"""Metric updates added up in plain Python and applied to prometheus-client in batches.

Each prometheus-client update takes a lock (with several workers it also writes a shared
file), and each set of a "mostrecent" gauge reads the clock. A settled call made 16 such
updates, 5% of the instructions of the whole call. A tallied update is one dict operation
instead (a set also notes the time: `Tally.set` says why). `flush()` applies what has added up:

- a collector registered in this process's registry ahead of the metrics flushes before
  every read of the registry (an exposition, `get_sample_value`), so one process never
  shows a stale figure;
- with several worker processes, each worker also flushes every `FLUSH_S`, because the
  scrape reads the workers' shared files, not their memory. Figures from another worker
  can therefore be up to `FLUSH_S` late.

Only the event loop's thread may update or flush a tally: the dicts are swapped, not locked.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

FLUSH_S = 1.0


class _Observed:
    """Observations of one histogram not yet applied: counts per bucket and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, histogram: Any) -> None:
        self.bounds: list[float] = list(histogram._upper_bounds)  # ascending, the last is +Inf
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0


class Tally:
    """Pending updates of prometheus-client metrics (or their labelled children)."""

    __slots__ = ("_added", "_set", "_observed")

    def __init__(self) -> None:
        self._added: dict[Any, float] = {}  # counter or gauge -> amount to add (a gauge may go down)
        self._set: dict[Any, tuple[float, float]] = {}  # gauge -> its latest value, and when it was set
        self._observed: dict[Any, _Observed] = {}

    def inc(self, metric: Any, amount: float = 1.0) -> None:
        added = self._added
        added[metric] = added.get(metric, 0.0) + amount

    def set(self, gauge: Any, value: float) -> None:
        """The gauge's new value. A gauge is either set or added to, never both. The time of the
        set is kept: with several workers a "mostrecent" gauge shows the latest set of any worker,
        not the value of the worker that flushed last."""
        self._set[gauge] = (value, time.time())

    def observe(self, histogram: Any, value: float) -> None:
        """As `histogram.observe(value)`: into the first bucket whose bound is >= value."""
        o = self._observed.get(histogram)
        if o is None:
            o = self._observed[histogram] = _Observed(histogram)
        o.counts[bisect_left(o.bounds, value)] += 1
        o.sum += value

    def flush(self) -> None:
        """Apply every pending update to prometheus-client, once per metric."""
        added, self._added = self._added, {}
        for metric, amount in added.items():
            metric.inc(amount)
        latest, self._set = self._set, {}
        for gauge, (value, at) in latest.items():
            if gauge._is_most_recent:  # as `Gauge.set` does, with the time of the set rather than now
                gauge._value.set(float(value), timestamp=at)
            else:
                gauge.set(value)
        observed, self._observed = self._observed, {}
        for histogram, o in observed.items():
            # prometheus-client has no public way to add many observations at once; these are the
            # same values `observe()` adds to (tests/server/test_tally.py pins that against it)
            histogram._sum.inc(o.sum)
            for bucket, n in zip(histogram._buckets, o.counts, strict=True):
                if n:
                    bucket.inc(n)


class FlushFirst:
    """A collector with no metrics of its own, registered before the tallied metrics: the
    registry collects in registration order, so every read sees the tally applied."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        self.tally.flush()
        return iter(())
