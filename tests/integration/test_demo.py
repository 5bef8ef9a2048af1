"""`make demo` runs `extproc demo`: the narrated scenario must pass and print its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_prints_budgets_and_cost_rates():
    r = subprocess.run(
        [sys.executable, "-m", "extproc", "--log-level", "WARNING", "demo", "--policy", "policies/demo.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "refused with 429" in out and "insufficient_quota" in out
    assert "20 of 20 served whole" in out  # the streamed fan-out: right-sized reservations
    assert "limit        spent   reserved    remaining" in out
    assert "key:bob total" in out and "team:research total" in out
    assert "Backend cost rates" in out and "source=dcgm" in out
    assert out.count("then HTTP 429 from run:carol/plan") == 2 and "refused with 'retry_budget_exceeded'" in out
    assert "shows its chain ['plan', 'research']" in out
    assert out.rstrip().endswith("Demo finished: every budget held.")
