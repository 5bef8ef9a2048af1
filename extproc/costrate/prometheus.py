"""A small parser for the Prometheus text exposition format (version 0.0.4). No I/O.

Enough for DCGM exporter and vLLM ``/metrics``: ``# HELP`` / ``# TYPE`` and
other comments are skipped; a sample is ``name{label="value",...} value
[timestamp]``; names may contain ``:`` (``vllm:prompt_tokens_total``); label
values may contain escaped ``\\\\``, ``\\"`` and ``\\n``; values may be
``NaN``, ``+Inf`` and ``-Inf``. Values are ``Decimal`` (exact, as the exporter
printed them). The input is bounded; a line that is not a sample is an
``UpstreamError`` (the exporter is wrong, never the client).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..errors import UpstreamError

MAX_BYTES = 8 * 1024 * 1024
"""Refuse an exposition larger than this (a DCGM page is a few hundred KiB)."""

MAX_LINE = 64 * 1024

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_SPECIAL = {"nan": Decimal("NaN"), "+inf": Decimal("Infinity"), "inf": Decimal("Infinity"), "-inf": Decimal("-Infinity")}


class MetricsParseError(UpstreamError):
    """The metrics text is not valid exposition format."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: Decimal

    def label(self, name: str) -> str | None:
        for k, v in self.labels:
            if k == name:
                return v
        return None


def _labels(line: str, pos: int, lineno: int) -> tuple[tuple[tuple[str, str], ...], int]:
    """Parse ``{a="x",b="y"}`` starting at ``line[pos] == "{"``; return labels and the index after ``}``."""
    out: list[tuple[str, str]] = []
    pos += 1
    n = len(line)
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == "}":
            return tuple(out), pos + 1
        m = _LABEL_NAME.match(line, pos)
        if not m:
            raise MetricsParseError(f"line {lineno}: bad label name at column {pos + 1}")
        key = m.group()
        pos = m.end()
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n or line[pos] != "=":
            raise MetricsParseError(f'line {lineno}: expected =" after label {key!r}')
        pos += 1
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n or line[pos] != '"':
            raise MetricsParseError(f'line {lineno}: expected =" after label {key!r}')
        pos += 1
        buf: list[str] = []
        while True:
            if pos >= n:
                raise MetricsParseError(f"line {lineno}: unterminated value of label {key!r}")
            c = line[pos]
            if c == "\\":
                esc = _ESCAPES.get(line[pos + 1 : pos + 2])
                if esc is None:
                    raise MetricsParseError(f"line {lineno}: bad escape in label {key!r}")
                buf.append(esc)
                pos += 2
            elif c == '"':
                pos += 1
                break
            else:
                buf.append(c)
                pos += 1
        out.append((key, "".join(buf)))
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ",":
            pos += 1
        elif pos < n and line[pos] == "}":
            return tuple(out), pos + 1
        else:
            raise MetricsParseError(f"line {lineno}: expected , or }} after label {key!r}")


def _value(token: str, lineno: int) -> Decimal:
    special = _SPECIAL.get(token.lower())
    if special is not None:
        return special
    try:
        return Decimal(token)
    except InvalidOperation:
        raise MetricsParseError(f"line {lineno}: {token[:40]!r} is not a number") from None


def parse_line(line: str, lineno: int = 1) -> Sample | None:
    """One line: a Sample, or None for blank lines and comments."""
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    if len(s) > MAX_LINE:
        raise MetricsParseError(f"line {lineno}: longer than {MAX_LINE} characters")
    m = _NAME.match(s)
    if not m:
        raise MetricsParseError(f"line {lineno}: no metric name")
    name, pos = m.group(), m.end()
    labels: tuple[tuple[str, str], ...] = ()
    if pos < len(s) and s[pos] == "{":
        labels, pos = _labels(s, pos, lineno)
    rest = s[pos:].split()
    if not rest or len(rest) > 2 or (pos < len(s) and s[pos] not in " \t"):
        raise MetricsParseError(f"line {lineno}: expected `value [timestamp]` after {name}")
    return Sample(name, labels, _value(rest[0], lineno))


def parse(text: str | bytes) -> list[Sample]:
    """Every sample of an exposition, in order."""
    if len(text) > MAX_BYTES:
        raise MetricsParseError(f"metrics larger than {MAX_BYTES} bytes")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    out: list[Sample] = []
    for i, line in enumerate(text.split("\n"), 1):
        sample = parse_line(line, i)
        if sample is not None:
            out.append(sample)
    return out


def select(samples: Iterable[Sample], name: str) -> Iterator[Sample]:
    return (s for s in samples if s.name == name)


def total(samples: Iterable[Sample], name: str) -> Decimal | None:
    """Sum of the finite samples named ``name``; None when there is none."""
    found = [s.value for s in select(samples, name) if s.value.is_finite()]
    return sum(found, Decimal(0)) if found else None
