"""PathScanner: the values at wanted key paths of a JSON document fed in pieces."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.protocols.jsonscan import PathScanner

PATHS = {("type",), ("usage",), ("response", "usage"), ("message", "usage")}


def scan(raw: bytes, chunks: list[int] | None = None, paths: Any = PATHS, **kw: Any) -> dict[str, Any]:
    s = PathScanner(paths, **kw)
    cuts = [0, *(chunks or []), len(raw)]
    for a, b in itertools.pairwise(cuts):
        s.feed(raw[a:b])
    return s.result()


def expected(obj: dict[str, Any]) -> dict[str, Any]:
    """What json.loads sees at the wanted paths (the last duplicate key wins)."""
    out: dict[str, Any] = {}
    for path in PATHS:
        node: Any = obj
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            target = out
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = node
    return out


TRICKY = {
    "type": "response.completed",
    "response": {
        "instructions": 'say "usage":{"input_tokens":999} \\ and \\"usage\\": too',
        "tools": [{"type": "function", "parameters": {"properties": {"usage": {"type": "string"}}}}],
        "output": [{"usage": {"input_tokens": 1}}, [[{"usage": 2}]]],
        "usage": {"input_tokens": 5, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 1}},
        "metadata": {"usage": "no", 'a"usage': "z", "é\u2028": "😀"},
    },
    "message": {"nested": {"usage": 3}},
}


def test_only_the_wanted_paths_are_kept() -> None:
    raw = json.dumps(TRICKY).encode()
    assert scan(raw) == {
        "type": "response.completed",
        "response": {"usage": TRICKY["response"]["usage"]},
    }


def test_every_split_offset_and_unicode_escapes() -> None:
    for ensure_ascii in (True, False):
        raw = json.dumps(TRICKY, ensure_ascii=ensure_ascii, indent=1).encode()
        want = scan(raw)
        for i in range(len(raw) + 1):
            assert scan(raw, [i]) == want, i
        assert scan(raw, list(range(1, len(raw)))) == want


def test_five_mib_terminal_event_split_at_many_offsets() -> None:
    usage = {"input_tokens": 1_200_000, "output_tokens": 4000, "input_tokens_details": {"cached_tokens": 0}}
    event = {
        "type": "response.completed",
        "sequence_number": 812,
        "response": {
            "id": "resp_1",
            "instructions": ("You are a careful agent.\n\"Quote\" \\ tab\t" * 130_000),
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "done"}]}],
            "usage": usage,
            "metadata": {},
        },
    }
    raw = json.dumps(event).encode()
    assert len(raw) > 5 << 20
    want = {"type": "response.completed", "response": {"usage": usage}}
    assert scan(raw) == want
    step = len(raw) // 13
    for i in range(0, len(raw), step):  # including inside the usage object and its key
        assert scan(raw, [i]) == want
    tail = raw.rindex(b'"usage"')
    for i in range(tail - 3, tail + 40, 3):
        assert scan(raw, [i, i + 1]) == want
    assert scan(raw, list(range(64 << 10, len(raw), 64 << 10))) == want


def string_end_by_walking(data: bytes, i: int) -> int:
    """Where string content starting at `i` stops, one byte at a time (the reference)."""
    while i < len(data):
        if data[i] == 0x22:
            return i
        if data[i] == 0x5C:
            if i + 1 == len(data):
                return i
            i += 1
        i += 1
    return i


def test_string_end_agrees_with_a_byte_walk_on_every_short_string() -> None:
    from extproc.protocols.jsonscan import _string_end

    for size in range(8):
        for t in itertools.product(b'a"\\', repeat=size):
            data = bytes(t)
            for i in range(size):
                assert _string_end(data, i, size) == string_end_by_walking(data, i), (data, i)


def test_backslash_runs_before_quotes_at_every_split() -> None:
    runs = {f"k{k}": "x" + "\\" * k + '"y' for k in range(6)} | {f"e{k}": "x" + "\\" * k for k in range(6)}
    raw = json.dumps({"response": {"instructions": runs, **runs, "usage": {"n": 1}}, **runs, "type": "t"}).encode()
    want = {"type": "t", "response": {"usage": {"n": 1}}}
    for i in range(len(raw) + 1):
        assert scan(raw, [i]) == want, i


def test_value_over_the_bound_is_dropped_and_long_keys_ignored() -> None:
    raw = json.dumps({"usage": {"x": "y" * 100}, "type": "t", "k" * 500: 1}).encode()
    assert scan(raw, max_value_bytes=50) == {"type": "t"}


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"usage":', b'{"usage": {"a": 1', b"[1,2", b'{"type": "x"', b"\xff\xfe", b"}}}]]]", b'"\\'],
)
def test_malformed_json_never_raises(raw: bytes) -> None:
    for i in range(len(raw) + 1):
        result = scan(raw, [i])
        assert result in ({}, {"type": "x"})


def test_invalid_paths() -> None:
    with pytest.raises(ValueError):
        PathScanner(set())
    with pytest.raises(ValueError):
        PathScanner({()})


KEYS = st.sampled_from(["type", "usage", "response", "message", "x", 'u"s', "\\"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5) | KEYS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), obj=st.dictionaries(KEYS, JSON, max_size=5), indent=st.none() | st.integers(0, 2))
def test_agrees_with_json_loads(data: st.DataObject, obj: dict[str, Any], indent: int | None) -> None:
    raw = json.dumps(obj, indent=indent).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    assert scan(raw, cuts) == expected(obj)
