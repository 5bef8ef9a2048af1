"""The Prometheus text parser: fed strings, no sockets."""

from __future__ import annotations

from decimal import Decimal

import pytest

from extproc.costrate import prometheus
from extproc.costrate.prometheus import MetricsParseError, Sample, parse, parse_line, total
from extproc.mock_backend.gpu import SimulatedGPU
from extproc.mock_backend.stats import Stats

DCGM = """\
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-a",modelName="NVIDIA H100 80GB HBM3",Hostname="n1"} 312.517
DCGM_FI_DEV_POWER_USAGE{gpu="1",UUID="GPU-b",modelName="NVIDIA H100 80GB HBM3",Hostname="n1"} 98.25 1700000000000
DCGM_FI_DEV_GPU_UTIL{gpu="0"} 87
"""


def test_dcgm_exporter_page():
    samples = parse(DCGM)
    assert [s.name for s in samples] == ["DCGM_FI_DEV_POWER_USAGE"] * 2 + ["DCGM_FI_DEV_GPU_UTIL"]
    assert samples[0].label("modelName") == "NVIDIA H100 80GB HBM3"
    assert samples[0].label("absent") is None
    assert samples[1].value == Decimal("98.25")  # timestamp ignored
    assert total(samples, "DCGM_FI_DEV_POWER_USAGE") == Decimal("410.767")  # exact, no float drift
    assert total(samples, "nothing") is None


def test_the_mock_backends_own_page_parses():
    gpu, stats = SimulatedGPU(gpus=2, tdp_watts=700, idle_watts=60), Stats()
    stats.prompt("llama", 11)
    stats.generated("llama", 5)
    stats.generated('we"ird\\model', 2)
    samples = parse(gpu.prometheus() + stats.prometheus())
    assert total(samples, "DCGM_FI_DEV_POWER_USAGE") == Decimal(120)
    assert total(samples, "vllm:prompt_tokens_total") == Decimal(11)
    assert total(samples, "vllm:generation_tokens_total") == Decimal(7)
    assert {s.label("model_name") for s in prometheus.select(samples, "vllm:generation_tokens_total")} == {
        "llama",
        'we"ird\\model',
    }


def test_label_escapes_spaces_and_empty_label_sets():
    s = parse_line(r'm{a="x\"y",b="back\\slash", c = "new\nline" ,} 1')
    assert s == Sample("m", (("a", 'x"y'), ("b", "back\\slash"), ("c", "new\nline")), Decimal(1))
    assert parse_line("m{} 2") == Sample("m", (), Decimal(2))
    assert parse_line("plain_metric 3e2") == Sample("plain_metric", (), Decimal("3E+2"))


def test_special_values_are_not_summed():
    samples = parse("x NaN\nx +Inf\nx -Inf\nx 4\n")
    assert samples[0].value.is_nan()
    assert samples[1].value == Decimal("Infinity")
    assert total(samples, "x") == Decimal(4)


def test_comments_and_blank_lines_are_skipped():
    assert parse("\n# anything at all {\n   \n#TYPE x counter\n") == []
    assert parse_line("   # HELP x y") is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("{a=\"b\"} 1", "no metric name"),
        ("m{a=\"b\" 1", "expected , or }"),
        ("m{a=b} 1", 'expected ="'),
        ("m{a=\"unterminated} 1", "unterminated"),
        ("m{a=\"\\q\"} 1", "bad escape"),
        ("m{1a=\"x\"} 1", "bad label name"),
        ("m", "expected `value"),
        ("m 1 2 3", "expected `value"),
        ("m{a=\"b\"}1", "expected `value"),
        ("m one", "is not a number"),
    ],
)
def test_malformed_lines_are_upstream_errors_with_the_line_number(line, message):
    with pytest.raises(MetricsParseError, match=message) as e:
        parse("ok 1\n" + line + "\n")
    assert "line 2" in str(e.value)


def test_bounded_input():
    with pytest.raises(MetricsParseError, match="larger than"):
        parse(b"x 1\n" * (prometheus.MAX_BYTES // 4 + 1))
    with pytest.raises(MetricsParseError, match="longer than"):
        parse_line("x" * (prometheus.MAX_LINE + 1) + " 1")


def test_bytes_input_with_bad_utf8_is_tolerated():
    assert parse(b'm{a="\xff"} 1\n')[0].value == 1
