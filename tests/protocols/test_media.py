"""Request facts for non-text inputs: media parts, previous_response_id, built-in tools."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest

from extproc.errors import BadRequest
from extproc.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES
from extproc.protocols.media import MediaPart, b64_size, from_url, image_size, tool_kind

Image = pytest.importorskip("PIL.Image")


def encoded(fmt: str, size: tuple[int, int] = (123, 45), **kw: Any) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("PNG", {}),
        ("GIF", {}),
        ("JPEG", {}),
        ("JPEG", {"icc_profile": b"p" * 70_000}),  # the frame header 70 KB in
        ("WEBP", {"lossless": True}),
        ("WEBP", {"quality": 50}),
        ("WEBP", {"exif": b"Exif\0\0" + b"x" * 10}),  # extended (VP8X)
    ],
)
def test_image_size_from_headers(fmt: str, kw: dict[str, Any]) -> None:
    for size in ((123, 45), (1, 1), (3000, 17)):
        assert image_size(encoded(fmt, size, **kw)) == size


@pytest.mark.parametrize("data", ["", "AAAA", "not base64 at all!", "/9j/" + "A" * 40, "iVBORw0KGgo="])
def test_unreadable_headers_give_none(data: str) -> None:
    assert image_size(data) is None


def test_b64_size_is_the_decoded_size() -> None:
    for n in range(10):
        raw = bytes(range(n))
        assert b64_size(base64.b64encode(raw).decode()) == n


def test_data_urls() -> None:
    png = encoded("PNG")
    assert from_url("image", f"data:image/png;base64,{png}", detail="low") == MediaPart(
        "image", "base64", "low", "image/png", b64_size(png), 123, 45
    )
    assert from_url("image", "https://x/y.png") == MediaPart("image", "url")
    assert from_url("file", "data:text/plain,hello") == MediaPart("file", "text", None, "text/plain", 5)


def test_tool_kind_drops_the_version_date() -> None:
    assert tool_kind("web_search_20250305") == "web_search"
    assert tool_kind("web_search_preview_2025_03_11") == "web_search_preview"
    assert tool_kind("code_interpreter") == "code_interpreter"


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


PNG = encoded("PNG")
PDF = base64.b64encode(b"%PDF-1.7\n" + b"0" * 991).decode()
WAV = base64.b64encode(b"RIFF" + b"\0" * 96).decode()


def test_chat_media_parts() -> None:
    facts = OPENAI_CHAT.parse_request(
        body(
            {
                "model": "gpt-4o",
                "web_search_options": {},
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "look"},
                            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
                            {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}},
                            {"type": "image_url", "image_url": "https://x/z.jpg"},
                            {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
                            {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}", "filename": "a.pdf"}},
                            {"type": "file", "file": {"file_id": "file-1"}},
                        ],
                    }
                ],
            }
        )
    )
    assert facts.media == (
        MediaPart("image", "base64", "high", "image/png", b64_size(PNG), 123, 45),
        MediaPart("image", "url"),
        MediaPart("image", "url"),
        MediaPart("audio", "base64", None, "wav", 100),
        MediaPart("file", "base64", None, "application/pdf", 1000),
        MediaPart("file", "file_id"),
    )
    assert [m.where for m in facts.media] == [f"messages[0].content[{j}]" for j in range(1, 7)]  # named in errors
    assert facts.images == 3
    assert facts.builtin_tools == {"web_search"}
    assert facts.previous_response_id is None
    assert all(PNG not in s and PDF not in s for s in facts.segments)  # payloads are not text


def test_responses_media_previous_response_and_builtin_tools() -> None:
    facts = OPENAI_RESPONSES.parse_request(
        body(
            {
                "model": "gpt-5",
                "previous_response_id": "resp_123",
                "tools": [
                    {"type": "web_search"},
                    {"type": "web_search_preview_2025_03_11"},
                    {"type": "file_search", "vector_store_ids": ["vs_1"]},
                    {"type": "code_interpreter", "container": {"type": "auto"}},
                    {"type": "function", "name": "f", "parameters": {}},
                    {"type": "custom", "name": "g"},
                ],
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "what is this"},
                            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "low"},
                            {"type": "input_image", "file_id": "file-9", "detail": "auto"},
                            {"type": "input_image", "image_url": "https://x/y.png"},
                            {"type": "input_file", "file_data": f"data:application/pdf;base64,{PDF}", "filename": "a.pdf"},
                            {"type": "input_file", "file_url": "https://x/a.pdf"},
                            {"type": "input_file", "file_id": "file-2"},
                            {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
                        ],
                    }
                ],
            }
        )
    )
    assert facts.previous_response_id == "resp_123"
    assert facts.builtin_tools == {"web_search", "web_search_preview", "file_search", "code_interpreter"}
    assert facts.has_tools
    assert facts.media == (
        MediaPart("image", "base64", "low", "image/png", b64_size(PNG), 123, 45),
        MediaPart("image", "file_id", "auto"),
        MediaPart("image", "url"),
        MediaPart("file", "base64", None, "application/pdf", 1000),
        MediaPart("file", "url"),
        MediaPart("file", "file_id"),
        MediaPart("audio", "base64", None, "wav", 100),
    )
    assert facts.images == 3


def test_responses_previous_response_id_must_be_a_string() -> None:
    with pytest.raises(BadRequest) as info:
        OPENAI_RESPONSES.parse_request(body({"model": "m", "previous_response_id": 7, "input": "hi"}))
    assert info.value.param == "previous_response_id"


def test_anthropic_images_documents_and_server_tools() -> None:
    jpeg = encoded("JPEG", (640, 480))
    facts = ANTHROPIC_MESSAGES.parse_request(
        body(
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 100,
                "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}],
                "tools": [
                    {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                    {"type": "web_fetch_20250910", "name": "web_fetch"},
                    {"type": "code_execution_20250825", "name": "code_execution"},
                    {"name": "get_weather", "input_schema": {"type": "object"}},
                    {"type": "custom", "name": "h", "input_schema": {"type": "object"}},
                ],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg}},
                            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                            {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
                            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
                            {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
                            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"}},
                            {"type": "tool_result", "tool_use_id": "t", "content": [
                                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
                            ]},
                            {"type": "text", "text": "compare"},
                        ],
                    }
                ],
            }
        )
    )
    assert facts.media == (
        MediaPart("image", "base64", None, "image/jpeg", b64_size(jpeg), 640, 480),
        MediaPart("image", "url"),
        MediaPart("image", "file_id"),
        MediaPart("document", "base64", None, "application/pdf", 1000),
        MediaPart("document", "url"),
        MediaPart("image", "base64", None, "image/png", b64_size(PNG), 123, 45),
    )
    assert facts.media[4].where == "messages[0].content[4]"
    assert facts.media[5].where == "messages[0].content[6].content[0]"
    assert facts.images == 4
    assert facts.builtin_tools == {"web_search", "web_fetch", "code_execution", "mcp"}
    assert any("plain" in s for s in facts.segments)  # a text document stays text


def test_odd_media_shapes_never_raise_and_are_unknown() -> None:
    facts = OPENAI_CHAT.parse_request(
        body(
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": 5},
                            {"type": "input_audio", "input_audio": {"data": 3}},
                            {"type": "file", "file": []},
                        ],
                    }
                ],
            }
        )
    )
    assert [(m.kind, m.source) for m in facts.media] == [("image", "unknown"), ("audio", "unknown"), ("file", "unknown")]
    facts = ANTHROPIC_MESSAGES.parse_request(
        body({"model": "m", "messages": [{"role": "user", "content": [{"type": "image", "source": "x"}]}]})
    )
    assert facts.media == (MediaPart("image", "unknown"),)
