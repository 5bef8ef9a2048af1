"""One copy of the rules: the Python module and the Lua the Redis scripts run
answer every shared vector alike (tests/stores/rule_vectors.py)."""

from __future__ import annotations

import json

import pytest
import redis

from extproc.rules import Kind, Line, LineState, Mode, blocks, over, rolling_need
from extproc.stores.redis_store import rules_lua
from tests.stores.rule_vectors import VECTORS

# Runs rules.lua (after the wire prelude, exactly as the store's scripts do) on each vector.
HARNESS = """
local out = {}
for i, v in ipairs(cjson.decode(ARGV[1])) do
  local need = ''
  if v.kind == KIND_COUNTER then need = string.format('%d', rule_need(v.mode, v.limit, v.spent, v.reserved, v.amount, v.margin, v.headroom)) end
  out[i] = cjson.encode({rule_over(v.kind, v.limit, v.spent, v.reserved, v.amount),
    rule_blocks(v.kind, v.mode, v.limit, v.spent, v.reserved, v.amount, v.margin, v.headroom), need})
end
return out
"""


def _python(v: dict) -> list:
    line = Line("k", Kind(v["kind"]), "cost", v["limit"], v["amount"], Mode(v["mode"]), margin=v["margin"], headroom=v["headroom"])
    st = LineState("k", v["limit"], v["spent"], v["reserved"])
    need = str(rolling_need(line, st)) if line.kind is Kind.COUNTER else ""
    return [over(line, st), blocks(line, st), need]


def _expected(v: dict) -> list:
    return [v["over"], v["blocks"], "" if v["need"] is None else str(v["need"])]


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"{v['kind']}-{v['mode']}-{v['limit']}-{v['spent']}-{v['reserved']}-{v['amount']}+{v['headroom']}")
def test_python_rules_answer_the_vectors(v):
    assert _python(v) == _expected(v)


@pytest.mark.integration
def test_lua_rules_answer_the_same_vectors(redis_server):
    with redis.Redis(port=redis_server.port, decode_responses=True) as r:
        got = r.eval(rules_lua() + HARNESS, 0, json.dumps(VECTORS))
    assert [json.loads(g) for g in got] == [_expected(v) for v in VECTORS]


def test_every_kind_and_mode_has_vectors():
    seen = {(v["kind"], v["mode"]) for v in VECTORS}
    assert seen == {(k.value, m.value) for k in Kind for m in Mode}
