"""Issue 15: the Grafana dashboard in deploy/ queries only metrics the service exports.

Every PromQL expression (panel targets and template queries) is parsed by a real PromQL
parser (Grafana's variables replaced by values of their kind first), and each metric name it
selects must be one the service's prometheus_client registry exposes, with the sample suffixes
(`_total`, `_bucket`, `_sum`, `_count`) of the metric's type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
from prometheus_client import REGISTRY, CollectorRegistry

import extproc.server.metrics  # noqa: F401  # registers the service's metrics in REGISTRY
from extproc.costrate.publish import PrometheusGauges
from tests.deploy.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "extproc-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"), "gauge": ("",)}
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m", "$budget": ".*"}


def exported() -> set[str]:
    """The sample names the service's registry serves (the cost-rate gauges in a registry of their own)."""
    gauges = CollectorRegistry()
    PrometheusGauges(gauges)
    names = set()
    for reg in (REGISTRY, gauges):
        for family in reg.collect():
            if family.name.startswith("extproc_"):
                names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            elif k == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                yield v["query"]
            else:
                yield from queries(v)
    elif isinstance(node, list):
        for v in node:
            yield from queries(v)


def promql(expr: str) -> str:
    """Grafana variables replaced; `label_values(metric, label)` is Grafana's, its first argument a selector."""
    m = re.fullmatch(r"label_values\((.+),\s*\w+\)", expr.strip())
    if m:
        expr = m.group(1)
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def selected(expr: str) -> list[str]:
    names: list[str] = []
    promql_parser.walk(promql_parser.parse(expr), lambda n: names.append(n.name) if isinstance(n, promql_parser.VectorSelector) else None)
    return names


def test_every_dashboard_query_parses_and_names_an_exported_metric():
    dash = json.loads(DASHBOARD.read_text())
    known = exported()
    exprs = list(queries(dash))
    assert len(exprs) >= len(dash["panels"])
    used = set()
    for expr in exprs:
        names = selected(promql(expr))
        assert names, f"no metric in {expr!r}"
        unknown = [n for n in names if n not in known]
        assert not unknown, f"{expr!r} names {unknown}, not exported (known: {sorted(known)})"
        used |= set(names)
    # the panels: spend per budget, decisions by outcome, estimate error, reservation latency, cost rates
    for name in ("extproc_spend_nano_usd_total", "extproc_decisions_total", "extproc_charged_to_reserved_ratio_bucket",
                 "extproc_reserve_seconds_bucket", "extproc_backend_cost_rate_usd_per_hour"):
        assert name in used


def test_the_check_catches_a_misspelt_metric():
    assert selected(promql("sum(rate(extproc_decision_total[$__rate_interval]))")) == ["extproc_decision_total"]
    assert "extproc_decision_total" not in exported()
    assert "extproc_decisions_total" in exported() and "extproc_reserve_seconds_bucket" in exported()


def test_the_dashboard_takes_its_prometheus_from_a_variable():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
