"""tiktoken encodings that work air-gapped, and token counts that never raise.

tiktoken downloads its BPE files on first use. extproc ships them as package
data (see data/tiktoken/PROVENANCE.md), so no network is ever needed, and reads
them itself: the file is checked against the sha256 tiktoken pins, then parsed
in a few whole-file C-level passes instead of tiktoken's loop of one
`base64.b64decode` call per line, a token's rank being its line number (both
encodings load in ~0.30-0.34 s of CPU where parsing the rank column too took
~0.36-0.40 s, and tiktoken's loader more; the service and the mock backend load
them at start). The ranks, pattern and special tokens handed to
`tiktoken.Encoding` are tiktoken's own (tests compare them with tiktoken's
constructors), so every count is tiktoken's. TIKTOKEN_CACHE_DIR still points
there unless the operator set it, for code that calls tiktoken directly.

Bounded counting. tiktoken first cuts text into "pieces" with a regex, then
runs BPE on each piece. Two inputs hurt it: a long whitespace run makes the
regex (`\\s+(?!\\S)`) backtrack until it fails ("Max stack size exceeded",
around 1M spaces), and one long piece (8 MB of "a") makes BPE superlinear
(seconds). `count_text` therefore never hands tiktoken more than `CHUNK`
characters at once, and cuts only at *hard boundaries*: positions where the
o200k and cl100k regexes always end a piece and where neither side's pieces
depend on the other (no lookbehind; the only lookahead, `(?!\\S)`, and
cl100k's `\\s++$` concern whitespace at the cut, and the char before a hard
boundary is never whitespace). Summing the chunks is then exactly the count
of the whole text. The hard boundaries used:

- a non-whitespace char followed by a space (every piece type ends there:
  letters, digits, and punctuation, whose only tail is `[\\r\\n/]*`);
- a letter or digit followed by a newline, an ASCII punctuation mark other
  than `'` (contractions), or a CJK comma/full stop/!?:; (a letter piece
  ends at any non-letter non-mark; a digit piece at any non-digit).

Where a window of `CHUNK` characters has no hard boundary, the rest of the
text is counted as its UTF-8 byte length. That is an upper bound: every
token is at least one byte. Normal prose, code and JSON never get there
(a boundary is at most a few characters away), so their count is exact
(tests compare with tiktoken on the whole text); 1M spaces or 8 MB of one
letter get the byte bound. `lower_bound`: no token is longer than
`max_token_bytes` (128 in both encodings), so bytes/128 is never more.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_DATA = Path(__file__).parent / "data" / "tiktoken"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_DATA))

import tiktoken  # noqa: E402  (must import after the cache dir is set)


@dataclass(frozen=True)
class _Spec:
    """What tiktoken_ext.openai_public builds an encoding from (its file by sha1 of the URL)."""

    file: str
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


_SPECS = {
    "o200k_base": _Spec(
        "fb374d419588a4632f3f557e76b4b70aebbca790",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
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
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": _Spec(
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

KNOWN_ENCODINGS = tuple(_SPECS)

CHUNK = 8192
"""Most characters tiktoken sees in one call (bounds its regex and BPE work)."""

# Hard boundaries sit right after the first char of a match (see the module doc).
# Python's \s is a superset of Unicode White_Space, so \S never calls whitespace
# non-whitespace; [^\W_] is letters and digits (Python's alnum), never `_` or marks.
_SPACE_AFTER = re.compile(r"\S ")
_OTHER = re.compile(r"[^\W_][\r\n!-&(-/:-@\[-`{-~\u3001\u3002\uff01\uff0c\uff1a\uff1b\uff1f]")


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """Return a cached encoding; raises ValueError for encodings we do not ship."""
    if name not in KNOWN_ENCODINGS:
        raise ValueError(f"unknown tiktoken encoding {name!r}; known: {', '.join(KNOWN_ENCODINGS)}")
    spec = _SPECS[name]
    return tiktoken.Encoding(
        name, pat_str=spec.pat_str, mergeable_ranks=load_ranks(_DATA / spec.file, spec.sha256),
        special_tokens=dict(spec.special_tokens),
    )


def load_ranks(path: Path, sha256: str) -> dict[bytes, int]:
    """A .tiktoken file (one `base64-token rank` line per token) as tiktoken's `load_tiktoken_bpe`
    reads it, once its sha256 is the expected one."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 is not {sha256} (a corrupted or replaced BPE file)")
    words = data.split()
    n = len(words) // 2
    if len(words) % 2 or words[1] != b"0" or int(words[-1]) != n - 1:
        raise ValueError(f"{path}: not one `token rank` line per token, in rank order from 0")
    # A token's rank is its line number in the pinned files (tests compare the ranks with tiktoken's
    # loader; the sha256 pins the bytes), so the rank column is not parsed: 0.16 -> 0.11 CPU-s for o200k.
    return dict(zip(map(binascii.a2b_base64, words[::2]), range(n), strict=True))


@functools.cache
def max_token_bytes(encoding: str) -> int:
    """The longest token of `encoding`, in bytes (128 for o200k and cl100k). Computed once:
    it scans the whole vocabulary (~0.3 s), and every large request's lower bound needs it."""
    return max(len(b) for b in get_encoding(encoding).token_byte_values())


def utf8_len(text: str) -> int:
    """UTF-8 length of `text` (lone surrogates, which JSON allows, count 3 bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _boundary(text: str, lo: int, hi: int) -> int:
    """The first hard boundary index found in (lo, hi], or -1."""
    m = _SPACE_AFTER.search(text, lo, hi + 1) or _OTHER.search(text, lo, hi + 1)
    return m.start() + 1 if m else -1


def _last_boundary(text: str, lo: int, hi: int) -> int:
    """The last hard boundary index found in (lo, hi], or -1."""
    return max((m.start() + 1 for p in (_SPACE_AFTER, _OTHER) for m in p.finditer(text, lo, hi + 1)), default=-1)


def plan(text: str, chunk: int = CHUNK) -> Iterator[tuple[int, int, bool]]:
    """Spans (start, end, exact) covering `text`: exact spans end at hard boundaries
    and are at most `chunk` long; the one inexact span, if any, is the rest of the text.

    A span shorter than `chunk // 2` is followed by a longer one or by the end,
    so there are at most 4 * len(text) / chunk + 2 tiktoken calls."""
    pos, n = 0, len(text)
    while n - pos > chunk:
        cut = _boundary(text, pos + chunk // 2, pos + chunk)
        if cut < 0:  # the last boundary of the first half: the next window starts at the gap
            cut = _last_boundary(text, pos, pos + chunk // 2)
        if cut < 0:
            yield pos, n, False
            return
        yield pos, cut, True
        pos = cut
    if pos < n:
        yield pos, n, True


def count_text(text: str, encoding: str = "o200k_base", chunk: int = CHUNK) -> tuple[int, bool]:
    """(tokens, exact): tiktoken's count of `text`, or an upper bound when `exact` is False.

    Never raises on any text (special-token strings count as plain text); each
    tiktoken call sees at most `chunk` characters."""
    enc = get_encoding(encoding)
    if len(text) <= chunk:
        return _encode_len(enc, text)
    total, exact = 0, True
    for start, end, ok in plan(text, chunk):
        piece = text[start:end]
        if ok:
            n, ok = _encode_len(enc, piece)
        else:
            n = utf8_len(piece)
        total += n
        exact = exact and ok
    return total, exact


def _encode_len(enc: tiktoken.Encoding, text: str) -> tuple[int, bool]:
    try:
        return len(enc.encode_ordinary(text)), True
    except BaseException as e:  # a Rust panic is a BaseException (pyo3's PanicException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return utf8_len(text), False  # what tiktoken cannot handle still gets a bound, never a 5xx


def count_tokens(text: str, encoding: str = "o200k_base") -> int:
    """Token count of `text` (an upper bound for pathological text, see `count_text`)."""
    return count_text(text, encoding)[0]


def lower_bound(byte_length: int, pieces: int, encoding: str) -> int:
    """Fewest tokens `pieces` non-empty texts of `byte_length` UTF-8 bytes in all can have."""
    return max(pieces, math.ceil(byte_length / max_token_bytes(encoding)))
