"""Tallied metric updates (extproc/server/tally.py) expose exactly what the same updates made
directly on prometheus-client would: counters, gauges set and added to, and histograms,
values on bucket bounds included. The histogram flush writes prometheus-client's own fields,
so this comparison is also what catches a prometheus-client upgrade that moves them."""

from __future__ import annotations

import asyncio
import re
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc.server import metrics
from extproc.server.tally import FlushFirst, Tally

BOUNDS = (0.001, 0.01, 0.1, 1.0)
VALUES = [0.0, 0.0005, 0.001, 0.0010000001, 0.01, 0.05, 0.1, 1.0, 1.5, 1e9, -1.0]


def _metrics(reg: CollectorRegistry) -> tuple[Counter, Gauge, Gauge, Histogram]:
    return (
        Counter("t_calls_total", "calls", ["outcome"], registry=reg),
        Gauge("t_inflight", "in flight", registry=reg),
        Gauge("t_spent", "spent", ["budget"], registry=reg),
        Histogram("t_seconds", "seconds", buckets=BOUNDS, registry=reg),
    )


def _exposition(reg: CollectorRegistry) -> str:
    return re.sub(r"^.*_created.*\n", "", generate_latest(reg).decode(), flags=re.M)


def test_a_flushed_tally_exposes_what_direct_updates_expose():
    direct_reg, tallied_reg = CollectorRegistry(), CollectorRegistry()
    calls, inflight, spent, seconds = _metrics(direct_reg)
    t_calls, t_inflight, t_spent, t_seconds = _metrics(tallied_reg)
    tally = Tally()
    for i, v in enumerate(VALUES):
        calls.labels("allow" if i % 3 else "block").inc(i)
        tally.inc(t_calls.labels("allow" if i % 3 else "block"), i)
        inflight.inc()
        tally.inc(t_inflight)
        if i % 2:
            inflight.dec()
            tally.inc(t_inflight, -1.0)
        spent.labels("key:a").set(v)
        tally.set(t_spent.labels("key:a"), v)
        seconds.observe(v)
        tally.observe(t_seconds, v)
    assert _exposition(direct_reg) != _exposition(tallied_reg)  # nothing applied before the flush
    tally.flush()
    assert _exposition(direct_reg) == _exposition(tallied_reg)
    tally.flush()  # a second flush adds nothing twice
    assert _exposition(direct_reg) == _exposition(tallied_reg)


def test_every_read_of_a_registry_sees_its_tally_applied():
    reg, tally = CollectorRegistry(), Tally()
    reg.register(FlushFirst(tally))
    calls, _, _, seconds = _metrics(reg)
    tally.inc(calls.labels("allow"), 2)
    tally.observe(seconds, 0.05)
    assert reg.get_sample_value("t_calls_total", {"outcome": "allow"}) == 2
    assert reg.get_sample_value("t_seconds_bucket", {"le": "0.1"}) == 1
    assert "t_seconds_count 1.0" in generate_latest(reg).decode()


def test_the_services_metrics_are_current_at_every_read_of_the_default_registry():
    """The flushing collector is registered ahead of the service's metrics."""
    before = REGISTRY.get_sample_value("extproc_decisions_total", {"outcome": "allow", "scope": ""}) or 0.0
    metrics.decided("allow", "")
    metrics.TALLY.observe(metrics.RESERVE_SECONDS, 0.0003)
    assert REGISTRY.get_sample_value("extproc_decisions_total", {"outcome": "allow", "scope": ""}) == before + 1
    assert (REGISTRY.get_sample_value("extproc_reserve_seconds_bucket", {"le": "0.0005"}) or 0) >= 1


def test_with_several_workers_a_mostrecent_gauge_shows_the_latest_set_not_the_latest_flush(tmp_path, monkeypatch):
    """A budget's spent gauge ("mostrecent") set by two workers: the scrape shows the value set
    last, as it did before the tally, even when the worker that set it flushes first."""
    from prometheus_client import values
    from prometheus_client.multiprocess import MultiProcessCollector

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    def worker(pid: int) -> tuple[Gauge, Tally]:  # a process's gauge: its own file, as with --workers
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid))
        gauge = Gauge("t_spent", "spent", ["budget"], multiprocess_mode="mostrecent", registry=None)
        return gauge.labels("key:a"), Tally()

    (first, first_tally), (last, last_tally) = worker(1), worker(2)
    first_tally.set(first, 100.0)
    time.sleep(0.01)
    last_tally.set(last, 200.0)
    last_tally.flush()
    time.sleep(0.01)
    first_tally.flush()  # its second-by-second flush comes after the other's
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(tmp_path))  # type: ignore[no-untyped-call]
    assert reg.get_sample_value("t_spent", {"budget": "key:a"}) == 200.0


async def test_a_workers_flushes_go_on_after_one_fails(monkeypatch, caplog):
    """With several workers only the one-second flushes bring a worker's figures to the shared
    files: one that fails (a full metrics directory) is logged, and the next ones still run."""
    from extproc import app

    flushes: list[int] = []

    class FailingOnce:
        def flush(self) -> None:
            flushes.append(1)
            if len(flushes) == 1:
                raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics, "TALLY", FailingOnce())
    task = asyncio.create_task(app._flush_metrics(0.001))
    try:
        async with asyncio.timeout(5):
            while len(flushes) < 3 and not task.done():
                await asyncio.sleep(0.001)
    finally:
        task.cancel()
    assert len(flushes) >= 3, "the flushes stopped after one failed"
    assert "No space left on device" in caplog.text
