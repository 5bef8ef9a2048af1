"""deploy/istio/prometheusrule.yaml: every metric it names is one the service exports, with
the labels it groups by, and its thresholds are the policy's alert thresholds."""

from __future__ import annotations

import re
from decimal import Decimal

import yaml
from prometheus_client import REGISTRY, generate_latest

import extproc.server.metrics  # noqa: F401 - registers the service's metrics
from extproc.policy.model import AlertsSpec, Policy
from tests.deploy.test_istio import objects, one


def _rules() -> list[dict]:
    return [r for g in one("PrometheusRule")["spec"]["groups"] for r in g["rules"]]


def _exported() -> dict[str, set[str]]:
    """Metric names in the service's exposition (counters with `_total`), with their label names."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", generate_latest(REGISTRY).decode(), re.M))
    labels = {c._name: set(c._labelnames) for c in list(REGISTRY._collector_to_names) if hasattr(c, "_labelnames")}  # type: ignore[attr-defined]
    out: dict[str, set[str]] = {}
    for name, kind in types.items():
        base = labels.get(name, set())
        out[name + "_total" if kind == "counter" else name] = base
    return out


def test_every_metric_the_rule_names_is_exported_with_the_labels_it_groups_by():
    exported = _exported()
    rules = _rules()
    assert rules
    for rule in rules:
        names = set(re.findall(r"\bextproc_[a-z_]+", rule["expr"]))
        assert names, rule["alert"]
        for name in names:
            assert name in exported, f"{rule['alert']} names {name}, which the service does not export"
            for group in re.findall(r"by \(([^)]*)\)", rule["expr"]):
                assert {g.strip() for g in group.split(",")} <= exported[name], (rule["alert"], name)


def test_the_rule_thresholds_are_the_policys_alert_thresholds():
    from_rules = sorted(Decimal(r["labels"]["threshold"]) for r in _rules())
    assert from_rules == sorted(Decimal(re.findall(r">= ([0-9.]+)\s*$", r["expr"])[0]) for r in _rules())
    assert tuple(from_rules) == AlertsSpec().thresholds
    shipped = [o for o in objects() if o["kind"] == "ConfigMap"]
    for cm in shipped:
        for text in cm.get("data", {}).values():
            doc = yaml.safe_load(text)
            if isinstance(doc, dict) and "prices" in doc:
                policy = Policy.model_validate(doc)
                if policy.alerts is not None:
                    assert tuple(from_rules) == policy.alerts.thresholds

