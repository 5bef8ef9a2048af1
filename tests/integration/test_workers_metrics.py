"""`extproc serve --workers 2`: the admin endpoint's /metrics (worker 0, reading every worker's
shared files) counts every call, whichever worker served it. Metric updates are tallied in
each worker and written to the files every second (extproc/server/tally.py), so a call that
worker 1 served reaches the scrape only through that flush."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.security.test_caller_auth import metered_call, serve  # noqa: F401  # serve: the fixture

pytestmark = pytest.mark.integration

CALLS = 24


def _decisions(families: object) -> float:
    return sum(s.value for f in families for s in f.samples if s.name == "extproc_decisions_total")


async def test_metrics_count_the_calls_of_every_worker(serve, tmp_path):  # noqa: F811
    state = tmp_path / "state"
    state.mkdir()
    svc = serve("--workers", "2", "--allow-unauthenticated-callers", "--state-dir", str(state))
    deadline = time.monotonic() + 30  # the port answers once one worker listens: wait for the other too
    while svc.log.read_text().count("extproc listening") < 2:
        assert time.monotonic() < deadline, svc.log.read_text()[-3000:]
        await asyncio.sleep(0.05)
    for i in range(CALLS):  # a channel each: a new connection, which the kernel gives either worker
        replies = await metered_call(svc.grpc, None, f"w-{i}", f"w-run-{i}")
        assert not any(r.HasField("immediate_response") for r in replies), replies

    deadline, seen = time.monotonic() + 10, 0.0
    while time.monotonic() < deadline:
        r = svc.admin_get("/metrics")
        assert r.status_code == 200
        seen = _decisions(text_string_to_metric_families(r.text))
        if seen == CALLS:
            break
        await asyncio.sleep(0.2)
    assert seen == CALLS

    # both workers served calls: each one's own file holds only its share
    (metrics_dir,) = state.iterdir()
    shares = [_decisions(MultiProcessCollector.merge([str(f)], accumulate=False)) for f in sorted(metrics_dir.glob("counter_*.db"))]
    assert len(shares) == 2 and all(shares) and sum(shares) == CALLS, shares
