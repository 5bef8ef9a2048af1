"""One bad policy file per validation error, each checked against its exact message
(the `# expect:` line at the top of the file), as envoyproxy/ratelimit does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.cli import main as cli
from extproc.errors import PolicyError
from extproc.policy.loader import PolicyHolder, load_policy, parse_policy

BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_each_bad_policy_fails_with_its_precise_message(path):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    message = str(exc.value)
    assert expected in message
    assert str(path) in message, "the message names the file"


def test_policy_check_cli_prints_errors_and_fails(capsys):
    assert cli(["policy", "check", str(BAD[0])]) == 1
    assert str(BAD[0]) in capsys.readouterr().err


def test_policy_schema_is_json_schema(capsys):
    assert cli(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["type"] == "object" and "prices" in schema["properties"]


def test_reload_keeps_last_good_policy(tmp_path):
    good = Path(__file__).parents[2] / "policies" / "demo.yaml"
    path = tmp_path / "p.yaml"
    path.write_text(good.read_text())
    holder = PolicyHolder.from_file(path)
    first = holder.current
    path.write_text("version: 1\nprices: {models: {}}\nbudgets: [{scope: nowhere}]\n")
    assert holder.reload() is False and holder.current is first
    path.write_text(good.read_text().replace('limit: "0.50"', 'limit: "0.75"'))
    assert holder.reload() is True and holder.current is not first


MODELS = 'prices: {models: {m: {input: "1", output: "1"}}}\n'


def test_the_old_top_level_image_tokens_is_inputs_image_tokens():
    assert parse_policy(MODELS + "image_tokens: 900\n").inputs.image_tokens == 900
    policy = parse_policy(MODELS + "image_tokens: 900\ninputs: {unsized_part_tokens: 5000}\n")
    assert (policy.inputs.image_tokens, policy.inputs.unsized_part_tokens) == (900, 5000)
    defaults = parse_policy(MODELS).inputs
    assert defaults.unsized_part_tokens is None and defaults.previous_response_tokens is None  # refuse, never guess


def test_budgets_that_count_on_different_counters_are_allowed():
    policy = parse_policy(
        MODELS
        + """
budgets:
  - {scope: key, limits: [{dimension: cost, limit: "5"}, {dimension: cost, limit: "1", window: day}]}
  - {scope: key, id: alice, limits: [{dimension: cost, limit: "2"}]}
  - {scope: key, id: bob, limits: [{dimension: cost, limit: "2"}]}
  - {scope: team, limits: [{dimension: cost, limit: "1", window: day, timezone: Europe/Paris}]}
  - {scope: team, limits: [{dimension: cost, limit: "1", window: day}, {dimension: cost, limit: "1", window: rolling, seconds: 60}]}
runs:
  limits: [{dimension: cost, limit: "0.5"}]
"""
    )
    assert [b.counter_scope for b in policy.budgets] == ["key", "key@id", "key@id", "team", "team"]
