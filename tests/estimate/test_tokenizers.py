"""Token counting never raises, is exact on normal text, and bounds pathological text.

Speed is checked by what tiktoken is asked to do (how many calls, how many
characters each), not by the clock."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import extproc.tokenizers as tk
from extproc.tokenizers import CHUNK, count_text, get_encoding, lower_bound, max_token_bytes, plan, utf8_len

ENCODINGS = ("o200k_base", "cl100k_base")
ROOT = Path(__file__).resolve().parents[2]

# The hard-boundary argument in extproc/tokenizers.py reads these two patterns;
# a tiktoken release that changes them must re-open that argument.
PATTERNS = {
    "o200k_base": "|".join(
        [
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"\p{N}{1,3}",
            r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        ]
    ),
    "cl100k_base": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}


def tiktoken_count(text: str, encoding: str) -> int:
    return len(get_encoding(encoding).encode_ordinary(text))


@pytest.fixture
def calls(monkeypatch):
    """Lengths of the texts handed to tiktoken."""
    seen: list[int] = []
    real = tk._encode_len

    def spy(enc, text):
        seen.append(len(text))
        return real(enc, text)

    monkeypatch.setattr(tk, "_encode_len", spy)
    return seen


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_regex_the_boundaries_rely_on_is_unchanged(encoding):
    assert get_encoding(encoding)._pat_str == PATTERNS[encoding]
    assert max_token_bytes(encoding) == 128


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_encoding_is_the_one_tiktoken_builds(encoding):
    """extproc parses the shipped BPE file itself (faster than tiktoken's loader); the ranks,
    pattern and special tokens must be exactly what tiktoken's own constructor builds."""
    import tiktoken_ext.openai_public

    want = getattr(tiktoken_ext.openai_public, encoding)()  # reads the same shipped file (TIKTOKEN_CACHE_DIR)
    got = get_encoding(encoding)
    assert got.name == want["name"] and got._pat_str == want["pat_str"]
    assert got._special_tokens == want["special_tokens"]
    assert got._mergeable_ranks == want["mergeable_ranks"]


def test_a_bpe_file_that_is_not_the_pinned_one_is_refused(tmp_path):
    src = tk._DATA / tk._SPECS["cl100k_base"].file
    changed = tmp_path / "bpe"
    changed.write_bytes(src.read_bytes().replace(b" 0\n", b" 1\n", 1))
    with pytest.raises(ValueError, match="sha256"):
        tk.load_ranks(changed, tk._SPECS["cl100k_base"].sha256)
    assert len(tk.load_ranks(src, tk._SPECS["cl100k_base"].sha256)) == 100256


def normal_texts() -> dict[str, str]:
    code = "\n".join(p.read_text() for p in sorted((ROOT / "extproc").rglob("*.py")))
    rows = [{"id": i, "name": f"item-{i}", "tags": ["a", "b"], "price": i * 1.25, "note": "ok\n" * (i % 3)} for i in range(4000)]
    prose = (ROOT / "README.md").read_text()
    return {
        "python source of this repo": code,
        "json rows": json.dumps(rows, indent=2),
        "readme": prose * 8,
        "chinese": "预算网关在请求到达模型之前估计令牌数量，并为每个调用者预留费用。" * 3000,
        "japanese": "エージェントは長い文脈を毎回送り直します。最後のメッセージだけが新しいです！" * 3000,
        "mixed scripts": ("Привет, мир! Γειά σου. مرحبا بالعالم. नमस्ते दुनिया। 안녕하세요 세계 🙂 café naïve\n" * 4000),
        "base64": __import__("base64").b64encode(random.Random(1).randbytes(300_000)).decode(),
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", list(normal_texts()))
def test_normal_text_is_counted_exactly_in_bounded_calls(encoding, name, calls):
    text = normal_texts()[name]
    assert len(text) > 4 * CHUNK  # long enough to be cut
    n, exact = count_text(text, encoding)
    assert exact
    assert n == tiktoken_count(text, encoding)
    assert max(calls) <= CHUNK and sum(calls) == len(text)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cuts_never_change_the_count_random_texts(encoding):
    """Tiny chunks force a cut wherever a hard boundary exists: exact spans must sum
    to tiktoken's count of the whole text, and inexact ones must stay above it."""
    rng = random.Random(7)
    alphabet = list("abAé ,.!/5\n\t中，") + [" ", " ", "  ", "\n\n", "'ll", " '", "😀", "_", "\r\n", "\u00a0", "\x1c", "'S", "\u0301", "ि", "   \n", "ab"]
    exact_seen = 0
    for _ in range(600):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 300)))
        full = tiktoken_count(text, encoding)
        for chunk in (6, 12, 24):
            n, exact = count_text(text, encoding, chunk=chunk)
            assert n == full if exact else n >= full, (text, chunk)
            exact_seen += exact
    assert exact_seen > 300  # the exact path with many cuts really ran


PATHOLOGICAL = {
    "1M spaces": lambda: " " * 1_000_000,
    "1M spaces inside prose": lambda: "hello there " * 1000 + " " * 1_000_000 + "x and more words" * 1000,
    "8 MB of one letter": lambda: "a" * 8_000_000,
    "8 MB of one CJK letter": lambda: "中" * 2_700_000,
    "2M tabs and newlines": lambda: "\t\n" * 1_000_000,
    "1M punctuation": lambda: "!/" * 500_000,
    "emoji run": lambda: "😀" * 500_000,
    "mixed scripts without spaces": lambda: "aé中ि😀!" * 300_000,
    "lone surrogates": lambda: "\ud800x" * 100_000,
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_text_gets_a_bound_without_long_calls(encoding, name, calls):
    text = PATHOLOGICAL[name]()
    n, _exact = count_text(text, encoding)
    size = utf8_len(text)
    assert lower_bound(size, 1, encoding) <= n <= size
    assert all(c <= CHUNK for c in calls)
    assert len(calls) <= 4 * len(text) // CHUNK + 2


def test_the_bound_of_a_run_starts_where_the_run_starts():
    """Prose before a run of spaces keeps its exact count; the rest is bytes."""
    prose = "The budget gateway reserves money before the call. " * 400
    text = prose + " " * 1_000_000
    spans = list(plan(text))
    assert all(ok for _, _, ok in spans[:-1]) and not spans[-1][2]
    start = spans[-1][0]
    assert len(prose) - CHUNK <= start <= len(prose)
    n, exact = count_text(text)
    assert not exact and n == tiktoken_count(text[:start], "o200k_base") + len(text) - start


def test_tiktoken_itself_fails_on_a_long_space_run():
    """Why the chunking exists (if tiktoken fixes this, the test says so)."""
    with pytest.raises(ValueError, match="stack"):
        get_encoding("o200k_base").encode("x" + " " * 1_000_000 + "y", disallowed_special=())
    assert count_text("x" + " " * 1_000_000 + "y")[0] > 0


def test_the_longest_token_is_computed_once_per_encoding():
    """It scans the whole vocabulary; a large request's lower bound must not pay that each time."""
    from extproc.tokenizers import max_token_bytes

    max_token_bytes.cache_clear()
    assert max_token_bytes("o200k_base") == max_token_bytes("o200k_base") == 128
    assert max_token_bytes.cache_info().misses == 1
