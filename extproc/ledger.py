"""Ledger export for chargeback: flat rows, JSONL or CSV, money as decimal USD strings."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from .money import nano_to_usd
from .stores.base import LedgerEntry

COLUMNS = (
    "seq", "closed_at", "reserved_at", "outcome", "reservation_id", "request_id", "principal", "run", "model",
    "requested_model", "api", "usage_source", "input_tokens", "output_tokens", "reserved_usd", "charged_usd", "tag",
)


FORMATS = ("jsonl", "csv")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(value: str) -> int:
    """`--since`: epoch milliseconds, or an ISO 8601 date/time (UTC when no zone is given)."""
    if value.isdigit():
        return int(value)
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def row(e: LedgerEntry) -> dict[str, Any]:
    m = e.meta
    return {
        "seq": e.seq,
        "closed_at": _iso(e.closed_at_ms),
        "reserved_at": _iso(e.reserved_at_ms),
        "outcome": e.outcome.value,
        "reservation_id": e.reservation_id,
        "request_id": m.get("request_id", ""),
        "principal": m.get("principal", ""),
        "run": m.get("run") or "",
        "model": m.get("model", ""),
        "requested_model": m.get("requested_model", ""),
        "api": m.get("api", ""),
        "usage_source": m.get("usage_source", "expired" if e.outcome.value == "expired" else ""),
        "input_tokens": e.charged.get("input_tokens", 0),
        "output_tokens": e.charged.get("output_tokens", 0),
        "reserved_usd": nano_to_usd(e.reserved.get("cost", 0)),
        "charged_usd": nano_to_usd(e.charged.get("cost", 0)),
        "tag": e.tag,
    }


def render(entries: Iterable[LedgerEntry], fmt: str, *, header: bool = True) -> str:
    """Entries as JSONL or CSV text (`header`: the CSV column line first)."""
    buf = io.StringIO()
    if fmt == "csv":
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        if header:
            w.writeheader()
        for e in entries:
            w.writerow(row(e))
    elif fmt == "jsonl":
        for e in entries:
            buf.write(json.dumps(row(e)) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}: jsonl or csv")
    return buf.getvalue()


async def export(pages: AsyncIterator[Sequence[LedgerEntry]], write: Callable[[str], Awaitable[object]], fmt: str) -> int:
    """Write every page as it comes (`Engine.ledger_pages`), the CSV header once; returns the entry count."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: jsonl or csv")
    n = 0
    if fmt == "csv":
        await write(render((), fmt))
    async for page in pages:
        await write(render(page, fmt, header=False))
        n += len(page)
    return n
