"""The session prices non-text input and refuses what it cannot bound (400 input_not_bounded)."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest

from extproc.engine.budget import Engine
from extproc.estimate import (
    PER_REQUEST_OVERHEAD,
    PER_SEGMENT_OVERHEAD,
    openai_image_tokens,
)
from extproc.policy.loader import PolicyHolder, parse_policy
from extproc.server.services import Services
from extproc.server.session import Session
from extproc.stores.embedded import EmbeddedStore
from extproc.tokenizers import count_tokens

Image = pytest.importorskip("PIL.Image")

KEY = "sk-inputs"
BASE = f"""
version: 1
prices:
  models:
    gpt: {{ input: "1.00", output: "1.00", output_limit: 100, context_window: 100000 }}
keys:
  - {{ sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, principal: p }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "10.00" }}]
"""


def headers(path: str = "/v1/chat/completions") -> dict[str, str]:
    return {":path": path, ":method": "POST", "authorization": f"Bearer {KEY}"}


@pytest.fixture
async def make_services(tmp_path):
    stores = []

    def make(extra: str = "") -> Services:
        store = EmbeddedStore(tmp_path / f"b{len(stores)}.db")
        stores.append(store)
        return Services(PolicyHolder(parse_policy(BASE + extra)), Engine(store))

    yield make
    for s in stores:
        await s.close()


async def send(services: Services, body: dict, path: str = "/v1/chat/completions") -> tuple[Session, object]:
    s = Session(services)
    assert (await s.request_headers(headers(path), False)).immediate is None
    return s, await s.request_body(json.dumps(body).encode())


def png_url(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


FILE_BY_ID = {"model": "gpt", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}


async def test_a_file_by_id_is_refused_with_a_400_naming_the_part(make_services):
    s, r = await send(make_services(), FILE_BY_ID)
    assert r.immediate is not None and r.immediate.status == 400
    error = json.loads(r.immediate.body)["error"]
    assert error["code"] == "input_not_bounded" and error["param"] == "messages[0].content[0]"
    assert s.plan is None and s.hold is None  # nothing was reserved


async def test_a_stored_conversation_is_refused_unless_the_policy_reserves_for_it(make_services):
    body = {"model": "gpt", "max_output_tokens": 10, "previous_response_id": "resp_1", "input": "go on"}
    _, r = await send(make_services(), body, "/v1/responses")
    assert r.immediate is not None and r.immediate.status == 400
    assert json.loads(r.immediate.body)["error"]["param"] == "previous_response_id"
    s, r = await send(make_services("inputs: {previous_response_tokens: 50000}\n"), body, "/v1/responses")
    assert r.immediate is None and s.plan is not None and s.plan.chosen.input_tokens > 50_000


async def test_reservation_includes_images_and_the_unsized_worst_case(make_services):
    services = make_services("inputs: {unsized_part_tokens: 7000, image_tokens: 1500}\n")
    content = [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": png_url((1024, 1024))}},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        {"type": "file", "file": {"file_id": "file-1"}},
    ]
    s, r = await send(services, {"model": "gpt", "max_tokens": 10, "messages": [{"role": "user", "content": content}]})
    assert r.immediate is None and s.plan is not None
    text = count_tokens("user\ncompare", "o200k_base") + PER_SEGMENT_OVERHEAD + PER_REQUEST_OVERHEAD
    assert s.plan.chosen.input_tokens == text + openai_image_tokens(1024, 1024, None) + 1500 + 7000
    assert s.plan is not None and s.plan.decision.reserved["input_tokens"] == s.plan.chosen.input_tokens
