"""Worst-case input tokens of what is not text: images, audio, files, documents, stored conversations."""

from __future__ import annotations

import base64
import io
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.errors import InputNotBounded
from extproc.estimate import (
    ANTHROPIC_MAX_TOKENS,
    anthropic_image_tokens,
    estimate,
    media_tokens,
    openai_image_tokens,
    part_tokens,
)
from extproc.policy.model import InputsSpec
from extproc.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES
from extproc.protocols.media import MediaPart

Image = pytest.importorskip("PIL.Image")

DEFAULTS = InputsSpec()


def png(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


# -- the providers' formulas, against the examples their docs give ------------------


@pytest.mark.parametrize(
    ("size", "detail", "tokens"),
    [
        ((1024, 1024), "high", 765),  # no 2048 resize, 768x768, 4 tiles
        ((2048, 4096), "high", 1105),  # 1024x2048, then 768x1536, 6 tiles
        ((2048, 4096), "auto", 1105),  # auto is priced as high (the worst it can pick)
        ((2048, 4096), None, 1105),
        ((4096, 8192), "low", 85),  # low: a fixed cost
        ((500, 500), "high", 255),  # never scaled up: one tile
        ((513, 500), "high", 425),
        ((768, 2048), "high", 1445),  # the most a high-detail image can cost: 2 x 4 tiles
    ],
)
def test_openai_tiles(size: tuple[int, int], detail: str | None, tokens: int) -> None:
    assert openai_image_tokens(*size, detail) == tokens


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        ((200, 200), 54),  # ceil(40000 / 750)
        ((1000, 1000), 1334),
        ((1092, 1092), 1590),
        ((784, 1568), 1640),  # the largest size the docs list as not resized
        ((3136, 1568), ANTHROPIC_MAX_TOKENS),  # long edge 3136 -> 1568x784
        ((8000, 8000), ANTHROPIC_MAX_TOKENS),
    ],
)
def test_anthropic_area(size: tuple[int, int], tokens: int) -> None:
    assert anthropic_image_tokens(*size) == tokens


@given(st.integers(1, 20_000), st.integers(1, 20_000), st.sampled_from([None, "low", "high", "auto"]))
def test_a_sized_image_never_costs_more_than_the_unknown_size_worst_case(w: int, h: int, detail: str | None) -> None:
    worst = DEFAULTS.image_tokens
    assert openai_image_tokens(w, h, detail) <= worst
    assert anthropic_image_tokens(w, h) <= worst


# -- parts ----------------------------------------------------------------------------


def test_images_by_url_or_file_or_unreadable_header_cost_the_policy_worst_case() -> None:
    costs = InputsSpec(image_tokens=2000)
    for source in ("url", "file_id", "unknown", "base64"):  # base64 whose header could not be read
        part = MediaPart("image", source)
        assert part_tokens(part, costs, anthropic=False) == 2000
        assert part_tokens(part, costs, anthropic=True) == 2000
    # OpenAI's low detail is a fixed cost, whatever the size: no worst case needed
    assert part_tokens(MediaPart("image", "url", "low"), costs, anthropic=False) == 85


def test_inline_audio_files_and_documents_cost_their_rate_per_kib_rounded_up() -> None:
    costs = InputsSpec(audio_tokens_per_kib=10, file_tokens_per_kib=100, document_tokens_per_kib=1000)
    assert part_tokens(MediaPart("audio", "base64", size=1024), costs, anthropic=False) == 10
    assert part_tokens(MediaPart("audio", "base64", size=1025), costs, anthropic=False) == 11
    assert part_tokens(MediaPart("file", "base64", size=10 * 1024), costs, anthropic=False) == 1000
    assert part_tokens(MediaPart("file", "text", size=1), costs, anthropic=False) == 1  # a text data URL
    assert part_tokens(MediaPart("document", "base64", size=512), costs, anthropic=True) == 500
    assert part_tokens(MediaPart("audio", "base64", size=0), costs, anthropic=False) == 0


@pytest.mark.parametrize("kind", ["audio", "file", "document"])
@pytest.mark.parametrize("source", ["url", "file_id", "unknown"])
def test_a_part_of_unknown_size_is_refused_unless_the_policy_sets_a_worst_case(kind: str, source: str) -> None:
    part = MediaPart(kind, source, where="messages[2].content[1]")  # type: ignore[arg-type]
    with pytest.raises(InputNotBounded) as info:
        part_tokens(part, DEFAULTS, anthropic=False)
    assert info.value.status == 400 and info.value.code == "input_not_bounded"
    assert info.value.param == "messages[2].content[1]"
    assert "`messages[2].content[1]`" in info.value.message and "inputs.unsized_part_tokens" in info.value.message
    assert part_tokens(part, InputsSpec(unsized_part_tokens=50_000), anthropic=False) == 50_000


# -- whole requests, parsed as the service does -------------------------------------


def test_chat_request_with_every_kind_of_part() -> None:
    pdf = base64.b64encode(b"%PDF" + b"x" * 4092).decode()  # 4 KiB decoded
    wav = base64.b64encode(b"w" * 2048).decode()  # 2 KiB
    facts = OPENAI_CHAT.parse_request(
        body(
            {
                "model": "gpt-4o",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png((1024, 1024))}", "detail": "high"}},
                            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png((2048, 4096))}"}},
                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                            {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
                            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
                            {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{pdf}"}},
                        ],
                    }
                ],
            }
        )
    )
    c = DEFAULTS
    expected = 765 + 1105 + 85 + c.image_tokens + 2 * c.audio_tokens_per_kib + 4 * c.file_tokens_per_kib
    assert media_tokens(facts, c, api="openai.chat") == expected


def test_a_file_by_id_names_its_place_in_the_request() -> None:
    facts = OPENAI_CHAT.parse_request(
        body({"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "file", "file": {"file_id": "file-1"}}]}]})
    )
    with pytest.raises(InputNotBounded) as info:
        media_tokens(facts, DEFAULTS, api="openai.chat")
    assert info.value.param == "messages[0].content[1]"


def test_anthropic_images_use_the_area_formula_and_documents_their_rate() -> None:
    pdf = base64.b64encode(b"%PDF" + b"x" * 1020).decode()  # 1 KiB
    facts = ANTHROPIC_MESSAGES.parse_request(
        body(
            {
                "model": "claude",
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png((1000, 1000))}},
                            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}},
                        ],
                    }
                ],
            }
        )
    )
    assert media_tokens(facts, DEFAULTS, api="anthropic.messages") == 1334 + DEFAULTS.document_tokens_per_kib
    # the same image through an OpenAI API is priced by tiles
    assert media_tokens(facts, DEFAULTS, api="openai.chat") == 765 + DEFAULTS.document_tokens_per_kib


def test_previous_response_id_is_refused_unless_the_policy_reserves_for_it() -> None:
    facts = OPENAI_RESPONSES.parse_request(body({"model": "gpt-5", "previous_response_id": "resp_1", "input": "and then?"}))
    with pytest.raises(InputNotBounded) as info:
        media_tokens(facts, DEFAULTS, api="openai.responses")
    assert info.value.param == "previous_response_id" and "inputs.previous_response_tokens" in info.value.message
    assert media_tokens(facts, InputsSpec(previous_response_tokens=64_000), api="openai.responses") == 64_000


def test_estimate_adds_media_times_the_safety_factor_and_stops_at_the_context_window() -> None:
    facts = OPENAI_CHAT.parse_request(body({"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}]}))
    kw: dict[str, Any] = dict(encoding="o200k_base", output_limit=None, fallback_output=4096, text_tokens=10)
    base = estimate(facts, safety_factor=Decimal(1), **kw).input_tokens
    assert estimate(facts, safety_factor=Decimal(1), media_tokens=1000, **kw).input_tokens == base + 1000
    assert estimate(facts, safety_factor=Decimal("1.5"), media_tokens=1000, **kw).input_tokens == -(-(base + 1000) * 3 // 2)
    capped = estimate(facts, safety_factor=Decimal(1), media_tokens=10**9, context_window=128_000, **kw)
    assert capped.input_tokens == 128_000 and capped.output_tokens == 7
