"""Budget stores: one small async interface (`base.Store`), several backends.

Only `extproc.app` / `extproc.cli` pick a concrete store (`app.open_store`);
`parse_url` is the one reading of a store URL, shared with the cost-rate store.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit, urlunsplit

StoreKind = Literal["sqlite", "journal", "redis", "cluster"]


def parse_url(url: str) -> tuple[StoreKind, str]:
    """`sqlite:PATH` / `sqlite:///abs/path`, `journal:DIR` / `journal:///abs/dir` (a directory, one process
    only), `redis://…` (or `rediss://`, `unix://`), `redis+cluster://host:port`
    -> (kind, what to open: a path or a redis:// URL). A Redis password goes in the URL,
    `redis://:PASSWORD@host:port/0` (or `redis://USER:PASSWORD@…` with ACLs), URL-encoded;
    log the URL only through `redacted`."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "redis", url
    if url.startswith("redis+cluster://"):
        return "cluster", "redis://" + url[len("redis+cluster://"):]
    for kind in ("sqlite", "journal"):
        if url.startswith(f"{kind}:"):
            path = url[len(kind) + 1 :]
            return kind, path[2:] if path.startswith("///") else path
    raise ValueError(
        f"unknown store URL {url!r}: use sqlite:PATH, journal:DIR, redis://HOST:PORT or redis+cluster://HOST:PORT"
    )


def redacted(url: str) -> str:
    """The store URL with its password replaced by `***`: what logs may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
