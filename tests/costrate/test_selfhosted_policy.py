"""The self_hosted policy section: one bad input per error, exact messages; the runner."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from extproc.costrate.__main__ import load_spec, main
from extproc.policy.selfhosted import SelfHostedBackend, SelfHostedSpec

from .conftest import SPEC

ROOT = Path(__file__).resolve().parents[2]


def bad(**over: Any) -> str:
    with pytest.raises(ValidationError) as e:
        SelfHostedBackend.model_validate({**SPEC, **over})
    return str(e.value)


def test_valid_backend_keeps_exact_decimals():
    b = SelfHostedBackend.model_validate(SPEC)
    assert b.purchase_price_usd == Decimal("30000") and b.pue == Decimal("1.3")
    assert b.token_url is None and b.sample_interval_seconds == 15


@pytest.mark.parametrize(
    "over, message",
    [
        ({"usd_per_kwh": 0.12}, "floats are not exact"),
        ({"pue": "1.3.1"}, "is not a non-negative decimal number"),
        ({"purchase_price_usd": "-5"}, "is not a non-negative decimal number"),
        ({"pue": "0.9"}, "pue must be between 1 and 5"),
        ({"amortization_years": 0}, "amortization_years must be > 0"),
        ({"amortization_years": 51}, "amortization_years must be <= 50"),
        ({"yearly_maintenance_share": 15}, "a share, not a percentage"),
        ({"tdp_watts": 0}, "tdp_watts must be > 0"),
        ({"gpu_count": 0}, "greater than 0"),
        ({"metrics_url": "mock-gpu:8000/metrics"}, "is not an http(s) URL"),
        ({"models": ["a", "a"]}, "models are listed twice"),
        ({"colour": "green"}, "Extra inputs are not permitted"),
    ],
)
def test_each_error_says_what_is_wrong(over, message):
    assert message in bad(**over)


def test_a_model_served_by_two_backends_is_refused():
    with pytest.raises(ValidationError, match="served by both 'a' and 'b'"):
        SelfHostedSpec.model_validate({"backends": {"a": {**SPEC, "models": ["m"]}, "b": {**SPEC, "models": ["m"]}}})


def test_kubernetes_status_needs_an_inference_service():
    with pytest.raises(ValidationError, match="names no inference_service"):
        SelfHostedSpec.model_validate({"kubernetes_status": True, "backends": {"a": SPEC}})
    with pytest.raises(ValidationError, match="String should match pattern"):
        SelfHostedSpec.model_validate({"backends": {"a": {**SPEC, "inference_service": {"namespace": "Bad_NS", "name": "x"}}}})


def test_rate_priced_models_need_a_static_price_too():
    s = SelfHostedSpec.model_validate({"backends": {"a": {**SPEC, "models": ["llama", "qwen"]}}})
    assert s.backend_of_model == {"llama": "a", "qwen": "a"}
    s.check_models_priced(["llama", "qwen", "gpt-4o"])
    with pytest.raises(ValueError, match="'qwen' need a static price"):
        s.check_models_priced(["llama"])


def test_compose_selfhosted_file_is_valid():
    s = load_spec(ROOT / "compose" / "selfhosted.yaml")
    assert list(s.backends) == ["mock-gpu"]


def test_runner_samples_once_and_reports_the_fallback(tmp_path, capsys):
    cfg = tmp_path / "sh.yaml"
    cfg.write_text(yaml.safe_dump({"self_hosted": {"backends": {"gpu": {**SPEC, "metrics_url": "http://127.0.0.1:9/metrics"}}}}))
    assert main(["--config", str(cfg), "--store", f"sqlite:{tmp_path / 'r.db'}", "--once"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpu: $1.593218265/h source=tdp_fallback (http://127.0.0.1:9/metrics unreachable")


def test_runner_needs_the_section(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("version: 1\n")
    with pytest.raises(SystemExit, match="no top-level self_hosted"):
        load_spec(cfg)
