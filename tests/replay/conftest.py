"""Replay fixtures: the recorded corpus, the replay backend, and one real Envoy + extproc stack.

The stack starts no mock backend: both upstream clusters (`backend`, and
`backend_small` that the route picks for gpt-4o-mini) point at the replay
backend. The policy prices every model the corpus asks for, with a distinct
price per token class so a token counted in the wrong class shows up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest

from extproc.errors import BadRequest
from extproc.money import Price
from extproc.protocols.schemas import schema_by_name
from extproc.stack import Stack
from tests.replay.server import ReplayServer, load_corpus

pytestmark = pytest.mark.integration

KEY = "sk-replay-corpus-key"
PRICE = {"input": "1.234567", "output": "9.876543", "cached_input": "0.111111", "cache_write": "2.222222"}


def price() -> Price:
    return Price.per_million(PRICE["input"], PRICE["output"], PRICE["cached_input"], PRICE["cache_write"])


def policy_text(models: list[str], tools: set[str] = frozenset()) -> str:
    """Every model at one price; every built-in tool the corpus enables priced at $0 per call
    (the recorded usage carries no tool fees; an unpriced tool would be refused)."""
    lines = ["version: 1", "prices:", "  version: replay-corpus", "  models:"]
    fees = json.dumps({t: "0" for t in sorted(tools)})
    for m in models:
        lines.append(
            f"    {json.dumps(m)}: {{input: \"{PRICE['input']}\", output: \"{PRICE['output']}\", "
            f"cached_input: \"{PRICE['cached_input']}\", cache_write: \"{PRICE['cache_write']}\", "
            f"output_limit: 128000, context_window: 2000000, tool_calls: {fees}}}"
        )
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    lines += [
        "keys:",
        f"  - {{sha256: {sha}, principal: replay, team: replay, org: replay}}",
        "budgets:",
        "  - scope: key",
        '    limits: [{dimension: cost, limit: "1000000"}]',
    ]
    return "\n".join(lines) + "\n"


API_SCHEMA = {
    "anthropic.messages": "anthropic.messages",
    "openai.chat_completions": "openai.chat",
    "openai.completions": "openai.completions",
    "openai.embeddings": "openai.embeddings",
    "openai.responses": "openai.responses",
}


def builtin_tools(corpus) -> set[str]:
    """The built-in tools the recorded requests enable, as extproc names them."""
    tools: set[str] = set()
    for ex in corpus.values():
        schema = schema_by_name(API_SCHEMA[ex["api"]])
        with contextlib.suppress(BadRequest):  # recorded malformed requests are refused before pricing
            tools |= schema.parse_request(ex["request"]["body"].encode()).builtin_tools
    return tools


@pytest.fixture(scope="session")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def replay(corpus):
    server = ReplayServer(exchanges=corpus).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, corpus, replay):
    work: Path = tmp_path_factory.mktemp("replay-stack")
    models = sorted({json.loads(ex["request"]["body"])["model"] for ex in corpus.values()})
    policy = work / "policy.yaml"
    policy.write_text(policy_text(models, builtin_tools(corpus)))
    s = Stack(
        policy=str(policy),
        store=f"sqlite:{work / 'budget.db'}",
        workdir=work / "stack",
        backends=(),
        backend_addrs={"backend": replay.addr, "backend_small": replay.addr},
    )
    try:
        s.start()
    except Exception:
        for name in ("extproc", "envoy"):
            print(f"--- {name} log ---\n{s.log(name)[-4000:]}")
        raise
    yield s
    s.stop()
