"""tiktoken encodings that work air-gapped.

tiktoken downloads its BPE files on first use. extproc ships them as package
data (see data/tiktoken/PROVENANCE.md) and points TIKTOKEN_CACHE_DIR there
unless the operator already set it, so no network is ever needed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_DATA = Path(__file__).parent / "data" / "tiktoken"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_DATA))

import tiktoken  # noqa: E402  (must import after the cache dir is set)

KNOWN_ENCODINGS = ("o200k_base", "cl100k_base")


@functools.lru_cache(maxsize=None)
def get_encoding(name: str) -> tiktoken.Encoding:
    """Return a cached encoding; raises ValueError for encodings we do not ship."""
    if name not in KNOWN_ENCODINGS:
        raise ValueError(f"unknown tiktoken encoding {name!r}; known: {', '.join(KNOWN_ENCODINGS)}")
    return tiktoken.get_encoding(name)


def count_tokens(text: str, encoding: str = "o200k_base") -> int:
    """Token count of `text`; special-token strings are counted as plain text."""
    return len(get_encoding(encoding).encode(text, disallowed_special=()))
