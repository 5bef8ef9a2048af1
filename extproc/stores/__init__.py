"""Budget stores: one small async interface (`base.Store`), several backends.

Only `extproc.app` / `extproc.cli` pick a concrete store (`app.open_store`);
`parse_url` is the one reading of a store URL, shared with the cost-rate store.
"""

from __future__ import annotations

from typing import Literal

StoreKind = Literal["sqlite", "redis", "cluster"]


def parse_url(url: str) -> tuple[StoreKind, str]:
    """`sqlite:PATH` / `sqlite:///abs/path`, `redis://…` (or `rediss://`, `unix://`), `redis+cluster://host:port`
    -> (kind, what to open: a file path or a redis:// URL)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "redis", url
    if url.startswith("redis+cluster://"):
        return "cluster", "redis://" + url[len("redis+cluster://"):]
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        return "sqlite", path[2:] if path.startswith("///") else path
    raise ValueError(f"unknown store URL {url!r}: use sqlite:PATH, redis://HOST:PORT or redis+cluster://HOST:PORT")
